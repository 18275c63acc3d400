//! Where an import reads files from, as an operator writes it (`migrator.source`, `--source`,
//! `api.fallback_url`): parsed once, when the configuration is read, so a bad value is an
//! error naming its key before anything starts.

use std::path::PathBuf;

/// Where files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Filetracker v1: `DIR/files/<path>` plain files, mtime = version.
    V1Dir(PathBuf),
    /// Filetracker v2 (`filetracker-server -d DIR`): `DIR/links/<path>` symlinks (their own
    /// mtime = version) to gzip blobs `DIR/blobs/<aa>/<sha256>`.
    V2Dir(PathBuf),
    /// A running Filetracker v2 server (its root URL): `GET /list/`, then each file.
    Http(String),
    /// An upstream s3dedup deployment's bucket, adopted in place: `upstream:BUCKET:sqlite:PATH`
    /// or `upstream:BUCKET:postgres://…`. The store must be configured with the same bucket.
    Upstream { bucket: String, db: UpstreamDb },
    /// Another s3dedup store, named by its configuration file (`s3dedup:PATH`): any metadata
    /// backend, any object store. Files are copied object by object, verified, with their
    /// versions; its remembered deletions are carried over.
    Store(PathBuf),
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("http://") {
            return Ok(Source::Http(s.trim_end_matches('/').to_owned()));
        }
        if s.starts_with("https://") {
            return Err(
                "https sources are not supported: use the old server's http address".into(),
            );
        }
        if let Some(rest) = s.strip_prefix("upstream:") {
            let bad = || {
                format!(
                    "bad upstream source {:?}: expected upstream:BUCKET:sqlite:PATH or \
                     upstream:BUCKET:postgres://USER@HOST/DB",
                    redact(s)
                )
            };
            let (bucket, db) = rest.split_once(':').ok_or_else(bad)?;
            if !valid_bucket(bucket) {
                return Err(bad());
            }
            let db = match db.split_once(':') {
                Some(("sqlite", path)) if !path.is_empty() => UpstreamDb::Sqlite(path.into()),
                Some(("postgres" | "postgresql", _)) => UpstreamDb::Postgres(db.to_owned()),
                _ => return Err(bad()),
            };
            return Ok(Source::Upstream {
                bucket: bucket.to_owned(),
                db,
            });
        }
        match s.split_once(':') {
            Some(("v1", dir)) if !dir.is_empty() => Ok(Source::V1Dir(dir.into())),
            Some(("v2", dir)) if !dir.is_empty() => Ok(Source::V2Dir(dir.into())),
            Some(("s3dedup", file)) if !file.is_empty() => Ok(Source::Store(file.into())),
            _ => Err(format!(
                "unknown source {s:?}: expected v1:DIR, v2:DIR, http://HOST:PORT, \
                 s3dedup:CONFIG_FILE or upstream:BUCKET:sqlite:PATH / upstream:BUCKET:postgres://…"
            )),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::V1Dir(d) => write!(f, "v1:{}", d.display()),
            Source::V2Dir(d) => write!(f, "v2:{}", d.display()),
            Source::Http(u) => f.write_str(u),
            Source::Upstream { bucket, db } => write!(f, "upstream:{bucket}:{db}"),
            Source::Store(file) => write!(f, "s3dedup:{}", file.display()),
        }
    }
}

impl Source {
    /// For directory sources, the directory the walk starts in (`files/` or `links/`).
    pub fn walk_root(&self) -> Option<PathBuf> {
        match self {
            Source::V1Dir(d) => Some(d.join("files")),
            Source::V2Dir(d) => Some(d.join("links")),
            Source::Http(_) | Source::Upstream { .. } | Source::Store(_) => None,
        }
    }
}

/// An old Filetracker server's root URL (`http://HOST:PORT`), as `api.fallback_url` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldServerUrl(String);

impl OldServerUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for OldServerUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<Source>() {
            Ok(Source::Http(url)) => Ok(OldServerUrl(url)),
            _ => Err("must be the old server's http://HOST:PORT".into()),
        }
    }
}

/// Deserializes a value written as a string; an empty string is none.
pub(crate) fn optional<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let s = <String as serde::Deserialize>::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// Where the upstream deployment keeps its metadata.
#[derive(Clone, PartialEq, Eq)]
pub enum UpstreamDb {
    /// One SQLite file; tables shared by all buckets.
    Sqlite(PathBuf),
    /// A PostgreSQL URL; tables prefixed by the bucket name.
    Postgres(String),
}

impl std::fmt::Display for UpstreamDb {
    /// As in the source syntax, without a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamDb::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            UpstreamDb::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl std::fmt::Debug for UpstreamDb {
    /// Never the password: configurations are printed in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpstreamDb({self})")
    }
}

/// Bucket names become table names on PostgreSQL: only what cannot break out of an identifier.
pub(crate) fn valid_bucket(bucket: &str) -> bool {
    !bucket.is_empty()
        && bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A PostgreSQL URL without its password, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!("v1:/srv/ft".parse(), Ok(Source::V1Dir("/srv/ft".into())));
        assert_eq!("v2:/srv/ft".parse(), Ok(Source::V2Dir("/srv/ft".into())));
        assert!("v3:/x".parse::<Source>().is_err());
        assert!("v1:".parse::<Source>().is_err());
        let other: Source = "s3dedup:/etc/s3dedup/old.toml".parse().unwrap();
        assert_eq!(other, Source::Store("/etc/s3dedup/old.toml".into()));
        assert_eq!(other.to_string(), "s3dedup:/etc/s3dedup/old.toml");
        assert!("s3dedup:".parse::<Source>().is_err());
        assert_eq!(
            "http://127.0.0.1:9999/".parse(),
            Ok(Source::Http("http://127.0.0.1:9999".into()))
        );
        assert!("https://x".parse::<Source>().is_err());
        assert_eq!(
            "upstream:files:sqlite:/var/lib/s3dedup/db.sqlite".parse(),
            Ok(Source::Upstream {
                bucket: "files".into(),
                db: UpstreamDb::Sqlite("/var/lib/s3dedup/db.sqlite".into())
            })
        );
        let pg: Source = "upstream:my-files:postgres://ft:secret@db/ft"
            .parse()
            .unwrap();
        assert_eq!(pg.to_string(), "upstream:my-files:postgres://ft@db/ft");
        assert!("upstream:bad\"name:sqlite:/x".parse::<Source>().is_err());
        assert!("upstream:files:mysql://x".parse::<Source>().is_err());
    }

    #[test]
    fn an_old_server_is_an_http_address() {
        let url: OldServerUrl = "http://old:9999/".parse().unwrap();
        assert_eq!(url.as_str(), "http://old:9999");
        assert!("v2:/srv".parse::<OldServerUrl>().is_err());
        let pg: Source = "upstream:b:postgres://ft:secret@db/ft".parse().unwrap();
        assert!(!format!("{pg:?}").contains("secret"), "{pg:?}");
    }
}
