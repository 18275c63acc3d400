//! Where secret files are found, and reading them once, before a program gives up root: the S3
//! secret key and the PostgreSQL password.
//!
//! The shipped units pass `/etc/s3dedup/secrets/` in with `LoadCredential=secrets:…`, so a
//! file `NAME` there is `$CREDENTIALS_DIRECTORY/secrets_NAME` to the daemon, and the
//! configuration names it so. An operator running a program by hand has no
//! `$CREDENTIALS_DIRECTORY`; the same names then resolve to the directory the units load them
//! from, beside the configuration file, so a manual run finds what the service finds.

use std::path::{Path, PathBuf};

use crate::config::{Config, PostgresConfig, Secret, StoreBackend};

/// What `LoadCredential=secrets:DIR` puts before the name of each file in `DIR`.
pub const CREDENTIAL_PREFIX: &str = "secrets_";

/// A secret file that cannot be read; names the key, the path and where it was looked for.
#[derive(Debug, thiserror::Error)]
#[error("cannot read secret for `{key}` from {path} ({looked}): {source}")]
pub struct SecretError {
    pub key: String,
    pub path: PathBuf,
    pub looked: String,
    pub source: std::io::Error,
}

/// Where relative secret file names are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretFiles {
    /// systemd's `$CREDENTIALS_DIRECTORY` (`LoadCredential=`).
    Credentials(PathBuf),
    /// Outside systemd, with a configuration file in this directory: `secrets_NAME` is
    /// `DIR/secrets/NAME` (what the units load as credentials), any other name `DIR/NAME`.
    BesideConfig(PathBuf),
    /// Neither: relative to the working directory.
    WorkingDirectory,
}

impl SecretFiles {
    /// The credentials directory when systemd gave one, else beside `config_file`.
    pub fn new(credentials: Option<PathBuf>, config_file: Option<&Path>) -> Self {
        match (credentials, config_file.and_then(Path::parent)) {
            (Some(dir), _) => SecretFiles::Credentials(dir),
            (None, Some(dir)) if !dir.as_os_str().is_empty() => {
                SecretFiles::BesideConfig(dir.to_owned())
            }
            (None, Some(_)) => SecretFiles::BesideConfig(PathBuf::from(".")),
            (None, None) => SecretFiles::WorkingDirectory,
        }
    }

    /// The file a configured name refers to.
    pub fn locate(&self, file: &Path) -> PathBuf {
        if file.is_absolute() {
            return file.to_owned();
        }
        match self {
            SecretFiles::Credentials(dir) => dir.join(file),
            SecretFiles::BesideConfig(dir) => {
                match file
                    .to_str()
                    .and_then(|f| f.strip_prefix(CREDENTIAL_PREFIX))
                {
                    Some(name) if !name.is_empty() => dir.join("secrets").join(name),
                    _ => dir.join(file),
                }
            }
            SecretFiles::WorkingDirectory => file.to_owned(),
        }
    }

    fn describe(&self) -> String {
        match self {
            SecretFiles::Credentials(dir) => {
                format!("$CREDENTIALS_DIRECTORY {}", dir.display())
            }
            SecretFiles::BesideConfig(dir) => format!(
                "no $CREDENTIALS_DIRECTORY: `{CREDENTIAL_PREFIX}NAME` is {}/secrets/NAME",
                dir.display()
            ),
            SecretFiles::WorkingDirectory => {
                "no $CREDENTIALS_DIRECTORY and no config file: relative to the working directory"
                    .into()
            }
        }
    }
}

/// The secrets a configuration uses, read. A store is opened from these, so a program reads
/// its secret files before it drops root, and only once.
#[derive(Debug, Default, Clone)]
pub struct Secrets {
    /// `store.s3.secret_access_key[_file]`, when the store is S3.
    pub s3_secret_access_key: Option<Secret>,
    /// `metadata.postgres.password[_file]`, when PostgreSQL holds metadata or locks.
    pub postgres_password: Option<Secret>,
}

impl Secrets {
    /// Reads the secrets `cfg` needs: an inline value as it is, a file from where `files` says.
    pub fn read(cfg: &Config, files: &SecretFiles) -> Result<Self, SecretError> {
        let s3 = &cfg.store.s3;
        Ok(Secrets {
            s3_secret_access_key: match cfg.store.backend {
                StoreBackend::S3 => read_one(
                    &s3.secret_access_key,
                    s3.secret_access_key_file.as_deref(),
                    "store.s3.secret_access_key_file",
                    files,
                )?,
                StoreBackend::Local => None,
            },
            postgres_password: match cfg.uses_postgres() {
                true => Self::postgres_password(&cfg.metadata.postgres, files)?,
                false => None,
            },
        })
    }

    /// The PostgreSQL password alone (also for tests that hold only `[metadata.postgres]`).
    pub fn postgres_password(
        pg: &PostgresConfig, files: &SecretFiles,
    ) -> Result<Option<Secret>, SecretError> {
        read_one(
            &pg.password,
            pg.password_file.as_deref(),
            "metadata.postgres.password_file",
            files,
        )
    }
}

fn read_one(
    inline: &Secret, file: Option<&Path>, key: &str, files: &SecretFiles,
) -> Result<Option<Secret>, SecretError> {
    if !inline.0.is_empty() {
        return Ok(Some(inline.clone()));
    }
    let Some(file) = file else { return Ok(None) };
    read_file(file, key, files).map(Some)
}

/// The secret file `file` names (for configuration key `key`), found where `files` says,
/// without its line ending.
pub(crate) fn read_file(
    file: &Path, key: &str, files: &SecretFiles,
) -> Result<Secret, SecretError> {
    let path = files.locate(file);
    let text = std::fs::read_to_string(&path).map_err(|source| SecretError {
        key: key.into(),
        path: path.clone(),
        looked: files.describe(),
        source,
    })?;
    Ok(Secret(text.trim_end_matches(['\r', '\n']).to_owned()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The password of a test's `[metadata.postgres]` (inline, or a file in the working
    /// directory).
    pub(crate) fn password(pg: &PostgresConfig) -> Option<String> {
        Secrets::postgres_password(pg, &SecretFiles::WorkingDirectory)
            .expect("the test's password")
            .map(|s| s.0)
    }
    use crate::config::load;
    use crate::config::tests::ov;

    fn s3_with_file(name: &str) -> Config {
        load(
            None,
            &[
                ov("store.backend", "s3"),
                ov("store.s3.bucket", "b"),
                ov("store.s3.secret_access_key_file", name),
            ],
        )
        .unwrap()
    }

    #[test]
    fn under_systemd_names_are_credentials() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secrets_s3"), "s3cr3t\n").unwrap();
        let files = SecretFiles::new(Some(dir.path().to_owned()), Some(Path::new("/x/c.toml")));
        let s = Secrets::read(&s3_with_file("secrets_s3"), &files).unwrap();
        assert_eq!(s.s3_secret_access_key.unwrap().0, "s3cr3t");
    }

    #[test]
    fn by_hand_the_same_names_resolve_beside_the_config() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::create_dir(etc.path().join("secrets")).unwrap();
        std::fs::write(etc.path().join("secrets/s3"), "s3cr3t").unwrap();
        let config = etc.path().join("s3dedup.toml");
        let files = SecretFiles::new(None, Some(&config));
        assert_eq!(files, SecretFiles::BesideConfig(etc.path().to_owned()));
        let s = Secrets::read(&s3_with_file("secrets_s3"), &files).unwrap();
        assert_eq!(s.s3_secret_access_key.unwrap().0, "s3cr3t");
        assert_eq!(files.locate(Path::new("other")), etc.path().join("other"));
        assert_eq!(files.locate(Path::new("/abs/f")), PathBuf::from("/abs/f"));
    }

    #[test]
    fn a_missing_file_names_key_path_and_rule() {
        let etc = tempfile::tempdir().unwrap();
        let files = SecretFiles::new(None, Some(&etc.path().join("s3dedup.toml")));
        let e = Secrets::read(&s3_with_file("secrets_s3"), &files).unwrap_err();
        let msg = e.to_string();
        for want in [
            "store.s3.secret_access_key_file",
            "secrets/s3",
            "no $CREDENTIALS_DIRECTORY",
        ] {
            assert!(msg.contains(want), "{want} not in: {msg}");
        }
    }

    #[test]
    fn unused_secrets_are_not_read() {
        let cfg = load(None, &[ov("store.s3.secret_access_key_file", "nowhere")]).unwrap();
        let s = Secrets::read(&cfg, &SecretFiles::WorkingDirectory).unwrap();
        assert!(s.s3_secret_access_key.is_none());
        let cfg = load(None, &[ov("metadata.postgres.password", "pw")]).unwrap();
        assert!(
            Secrets::read(&cfg, &SecretFiles::WorkingDirectory)
                .unwrap()
                .postgres_password
                .is_none()
        );
    }
}
