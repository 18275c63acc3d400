//! Who may do what: principals with an argon2 password hash, a role and optional path prefixes,
//! checked against the HTTP Basic credentials the Filetracker client sends from the user and
//! password in its URL.
//!
//! argon2 costs tens of milliseconds a check by design, and the client authenticates every
//! request. A credential verified once is remembered as a keyed SHA-256 of it (the key is
//! random per load, so nothing remembered survives a reload or can be computed elsewhere);
//! later requests with it cost one hash. A wrong password always costs a full verification,
//! which the API bounds in number and per source address.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::config::{AuthConfig, AuthMode, Role};
use crate::secrets::{self, SecretError, SecretFiles};

/// What a request does, as far as rights go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// GET or HEAD of a file, or a listing.
    Read,
    /// PUT.
    Write,
    /// DELETE.
    Delete,
    /// `/health`, `/status`, `/version`, `/metrics` when they are not public.
    Status,
}

impl Action {
    fn needs(self) -> Role {
        match self {
            Action::Read | Action::Status => Role::Read,
            Action::Write => Role::Write,
            Action::Delete => Role::Admin,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Write => "write",
            Action::Delete => "delete",
            Action::Status => "see",
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Read => "read",
        Role::Write => "write",
        Role::Admin => "admin",
    }
}

/// An `[auth]` section that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error(
        "auth.users[{index}] ({user}): the password hash from {from} is not an argon2 hash in \
         PHC form ($argon2id$...; make one with s3dedup-api --hash-password): {message}"
    )]
    BadHash {
        index: usize,
        user: String,
        from: String,
        message: String,
    },
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Why a request is refused: 401 for the first three, 403 for the last.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "authentication required: send HTTP Basic credentials (user:password@ in the client's URL)"
    )]
    Missing,
    #[error("malformed Authorization header: {0}")]
    Malformed(&'static str),
    #[error("wrong user name or password")]
    Wrong,
    #[error("user {user} (role {role}) may not {verb} {what}")]
    Forbidden {
        user: String,
        role: &'static str,
        verb: &'static str,
        what: String,
    },
}

/// User and password from an `Authorization: Basic` header. `Debug` hides the password.
pub struct Credentials {
    user: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Parses the `Authorization` header's value (`None`: there was none).
    pub fn from_header(value: Option<&[u8]>) -> Result<Credentials, Refusal> {
        let value = value.ok_or(Refusal::Missing)?;
        let text = std::str::from_utf8(value).map_err(|_| Refusal::Malformed("not UTF-8"))?;
        let (scheme, encoded) = text
            .trim()
            .split_once(' ')
            .ok_or(Refusal::Malformed("expected `Basic <base64>`"))?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(Refusal::Malformed("only the Basic scheme is accepted"));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| Refusal::Malformed("credentials are not base64"))?;
        let raw = String::from_utf8(raw).map_err(|_| Refusal::Malformed("not UTF-8"))?;
        let (user, password) = raw
            .split_once(':')
            .ok_or(Refusal::Malformed("expected user:password"))?;
        Ok(Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }
}

/// One configured user.
#[derive(Debug)]
pub struct Principal {
    name: String,
    role: Role,
    /// Without trailing `/`; empty: everything.
    prefixes: Vec<String>,
    hash: String,
    /// The keyed digest of the last credential verified for this user.
    remembered: Mutex<Option<[u8; 32]>>,
}

impl Principal {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this principal may do `action` on `path` (a file, or the directory listed;
    /// `None`: the whole store, or no path at all for [`Action::Status`]).
    pub fn may(&self, action: Action, path: Option<&str>) -> Result<(), Refusal> {
        let within = match (action, path) {
            (Action::Status, _) => true,
            (_, None) => self.prefixes.is_empty(),
            (_, Some(p)) => self.prefixes.is_empty() || self.prefixes.iter().any(|x| under(p, x)),
        };
        if self.role >= action.needs() && within {
            return Ok(());
        }
        Err(Refusal::Forbidden {
            user: self.name.clone(),
            role: role_name(self.role),
            verb: action.verb(),
            what: match (action, path) {
                (Action::Status, _) => "the server's status".into(),
                (_, None) => "the whole store".into(),
                (_, Some(p)) if self.prefixes.is_empty() => p.into(),
                (_, Some(p)) => format!("{p} (limited to {})", self.shown_prefixes()),
            },
        })
    }

    fn shown_prefixes(&self) -> String {
        let shown: Vec<String> = self.prefixes.iter().map(|p| format!("{p}/")).collect();
        shown.join(", ")
    }
}

/// `path` is `prefix` or below it (`prefix` without its trailing `/`).
fn under(path: &str, prefix: &str) -> bool {
    let path = path.trim_end_matches('/');
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The principals of one loaded configuration.
#[derive(Debug)]
pub struct Principals {
    mode: AuthMode,
    public_status: bool,
    max_failures_per_minute: u32,
    users: HashMap<String, Arc<Principal>>,
    /// Keys the remembered digests.
    key: [u8; 32],
    /// Verified against for unknown users, so that they take as long as a wrong password.
    decoy: String,
}

impl Principals {
    /// Reads `[auth]`, and the hash files it names from where `files` says.
    pub fn load(cfg: &AuthConfig, files: &SecretFiles) -> Result<Principals, AuthConfigError> {
        let mut users = HashMap::new();
        for (index, u) in cfg.users.iter().enumerate() {
            let (hash, from) = match (&u.password_hash, &u.password_hash_file) {
                (Some(h), _) => (h.clone(), "password_hash".to_owned()),
                (None, Some(file)) => {
                    let key = format!("auth.users[{index}].password_hash_file");
                    let hash = secrets::read_file(file, &key, files)?;
                    (
                        hash.0.trim().to_owned(),
                        files.locate(file).display().to_string(),
                    )
                }
                // Refused by the configuration's own checks.
                (None, None) => (String::new(), "nowhere".to_owned()),
            };
            if let Err(e) = PasswordHash::new(&hash) {
                return Err(AuthConfigError::BadHash {
                    index,
                    user: u.name.clone(),
                    from,
                    message: e.to_string(),
                });
            }
            let prefixes = u
                .prefixes
                .iter()
                .map(|p| p.trim_end_matches('/').to_owned())
                .collect();
            let principal = Principal {
                name: u.name.clone(),
                role: u.role,
                prefixes,
                hash,
                remembered: Mutex::new(None),
            };
            users.insert(u.name.clone(), Arc::new(principal));
        }
        Ok(Principals {
            mode: cfg.mode,
            public_status: cfg.public_status,
            max_failures_per_minute: cfg.max_failures_per_minute,
            users,
            key: rand::random(),
            decoy: hash_password(&hex::encode(rand::random::<[u8; 16]>())).map_err(|message| {
                AuthConfigError::BadHash {
                    index: 0,
                    user: "(decoy)".into(),
                    from: "a random password".into(),
                    message,
                }
            })?,
        })
    }

    /// Whether requests must authenticate at all.
    pub fn enabled(&self) -> bool {
        self.mode == AuthMode::Basic
    }

    /// Whether `/health`, `/status`, `/version` and `/metrics` answer anyone.
    pub fn public_status(&self) -> bool {
        self.public_status
    }

    pub fn max_failures_per_minute(&self) -> u32 {
        self.max_failures_per_minute
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    fn digest(&self, c: &Credentials) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update(c.user.as_bytes());
        h.update([0]);
        h.update(c.password.as_bytes());
        h.finalize().into()
    }

    /// The principal, when these credentials were verified before: costs one hash.
    pub fn remembered(&self, c: &Credentials) -> Option<Arc<Principal>> {
        let p = self.users.get(&c.user)?;
        let known = *p.remembered.lock().unwrap_or_else(PoisonError::into_inner);
        let d = self.digest(c);
        let same = known.is_some_and(|k| k.iter().zip(d).fold(0, |acc, (a, b)| acc | (a ^ b)) == 0);
        same.then(|| p.clone())
    }

    /// Verifies the password with argon2 (tens of milliseconds: call it off the async runtime),
    /// and remembers it when right.
    pub fn verify(&self, c: &Credentials) -> Result<Arc<Principal>, Refusal> {
        let (hash, principal) = match self.users.get(&c.user) {
            Some(p) => (p.hash.as_str(), Some(p)),
            None => (self.decoy.as_str(), None),
        };
        let parsed = PasswordHash::new(hash).map_err(|_| Refusal::Wrong)?;
        let right = Argon2::default()
            .verify_password(c.password.as_bytes(), &parsed)
            .is_ok();
        match principal {
            Some(p) if right => {
                *p.remembered.lock().unwrap_or_else(PoisonError::into_inner) = Some(self.digest(c));
                Ok(p.clone())
            }
            _ => Err(Refusal::Wrong),
        }
    }
}

/// An argon2id hash of `password` in PHC form, with a random salt, for `[[auth.users]]`.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserConfig;

    fn user(name: &str, role: Role, password: &str, prefixes: &[&str]) -> UserConfig {
        UserConfig {
            name: name.into(),
            role,
            password_hash: Some(hash_password(password).unwrap()),
            password_hash_file: None,
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn principals(users: Vec<UserConfig>) -> Principals {
        let cfg = AuthConfig {
            mode: AuthMode::Basic,
            users,
            ..AuthConfig::default()
        };
        Principals::load(&cfg, &SecretFiles::WorkingDirectory).unwrap()
    }

    fn basic(user_password: &str) -> Credentials {
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        );
        Credentials::from_header(Some(v.as_bytes())).unwrap()
    }

    #[test]
    fn roles_and_prefixes() {
        let p = principals(vec![
            user("worker", Role::Read, "w", &[]),
            user("out", Role::Write, "o", &["/outputs/"]),
            user("admin", Role::Admin, "a", &[]),
        ]);
        let worker = p.verify(&basic("worker:w")).unwrap();
        assert!(worker.may(Action::Read, Some("/tests/1.in")).is_ok());
        assert!(worker.may(Action::Read, None).is_ok(), "lists everything");
        let e = worker.may(Action::Write, Some("/x")).unwrap_err();
        assert_eq!(e.to_string(), "user worker (role read) may not write /x");
        assert!(worker.may(Action::Delete, Some("/x")).is_err());

        let out = p.verify(&basic("out:o")).unwrap();
        assert!(out.may(Action::Write, Some("/outputs/a/b")).is_ok());
        assert!(
            out.may(Action::Read, Some("/outputs")).is_ok(),
            "its own directory"
        );
        let e = out.may(Action::Write, Some("/outputsX/a")).unwrap_err();
        assert!(e.to_string().contains("limited to /outputs/"), "{e}");
        assert!(out.may(Action::Read, None).is_err(), "not the whole store");
        assert!(out.may(Action::Read, Some("/")).is_err());
        assert!(out.may(Action::Delete, Some("/outputs/a")).is_err());
        assert!(out.may(Action::Status, None).is_ok());

        let admin = p.verify(&basic("admin:a")).unwrap();
        assert!(admin.may(Action::Delete, Some("/any")).is_ok());
    }

    #[test]
    fn wrong_and_unknown_are_the_same_refusal_and_a_success_is_remembered() {
        let p = principals(vec![user("judge", Role::Read, "secret", &[])]);
        assert_eq!(p.verify(&basic("judge:nope")).unwrap_err(), Refusal::Wrong);
        assert_eq!(
            p.verify(&basic("nobody:secret")).unwrap_err(),
            Refusal::Wrong
        );
        assert!(p.remembered(&basic("judge:secret")).is_none());
        p.verify(&basic("judge:secret")).unwrap();
        assert_eq!(
            p.remembered(&basic("judge:secret")).unwrap().name(),
            "judge"
        );
        assert!(p.remembered(&basic("judge:nope")).is_none());
        // A colon in the password is the password's.
        let p = principals(vec![user("u", Role::Read, "a:b", &[])]);
        assert!(p.verify(&basic("u:a:b")).is_ok());
    }

    #[test]
    fn malformed_headers_are_named() {
        let parse = |v: &str| Credentials::from_header(Some(v.as_bytes())).unwrap_err();
        assert_eq!(
            Credentials::from_header(None).unwrap_err(),
            Refusal::Missing
        );
        assert!(matches!(parse("Bearer abc"), Refusal::Malformed(_)));
        assert!(matches!(parse("Basic !!!"), Refusal::Malformed(_)));
        assert!(matches!(parse("Basic dXNlcg=="), Refusal::Malformed(_))); // "user"
        let c = basic("user:pw");
        assert!(!format!("{c:?}").contains("pw"), "{c:?}");
    }

    #[test]
    fn a_hash_file_is_read_like_the_other_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("judge-hash");
        std::fs::write(&file, format!("{}\n", hash_password("pw").unwrap())).unwrap();
        let mut u = user("judge", Role::Read, "unused", &[]);
        (u.password_hash, u.password_hash_file) = (None, Some(file.clone()));
        let cfg = |users| AuthConfig {
            mode: AuthMode::Basic,
            users,
            ..AuthConfig::default()
        };
        let p = Principals::load(&cfg(vec![u.clone()]), &SecretFiles::WorkingDirectory).unwrap();
        assert!(p.verify(&basic("judge:pw")).is_ok());
        std::fs::remove_file(&file).unwrap();
        let e = Principals::load(&cfg(vec![u]), &SecretFiles::WorkingDirectory).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("auth.users[0].password_hash_file") && e.contains("judge-hash"),
            "{e}"
        );
    }

    #[test]
    fn a_hash_that_is_not_argon2_is_refused_at_load() {
        let mut u = user("judge", Role::Read, "x", &[]);
        u.password_hash = Some("plaintext".into());
        let cfg = AuthConfig {
            mode: AuthMode::Basic,
            users: vec![u],
            ..AuthConfig::default()
        };
        let e = Principals::load(&cfg, &SecretFiles::WorkingDirectory).unwrap_err();
        assert!(e.to_string().contains("auth.users[0] (judge)"), "{e}");
    }
}
