//! A program run by hand as root becomes the owner of the data directory before it opens the
//! store: objects, spool files and the SQLite database it would create as root are ones the
//! daemon (running as that owner, `s3dedup`) could not read or change.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};

/// Who a program runs as after [`become_owner_of`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Not root, or the directory is root's (or does not exist yet): nothing changed.
    Unchanged,
    /// Was root; now the directory's owner.
    Became { user: String, uid: u32, gid: u32 },
}

/// Giving root up failed; the program stops rather than write as root.
#[derive(Debug, thiserror::Error)]
#[error("running as root: cannot become {user} (uid {uid}), the owner of {dir}: {source}")]
pub struct PrivilegeError {
    pub user: String,
    pub uid: u32,
    pub dir: PathBuf,
    pub source: nix::Error,
}

/// When running as root and `dir` belongs to another user, becomes that user (their primary
/// group and supplementary groups; the directory's group when they have no passwd entry).
/// Must run before any thread is started.
pub fn become_owner_of(dir: &Path) -> Result<Identity, PrivilegeError> {
    if !Uid::effective().is_root() {
        return Ok(Identity::Unchanged);
    }
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(Identity::Unchanged);
    };
    if meta.uid() == 0 {
        return Ok(Identity::Unchanged);
    }
    let uid = Uid::from_raw(meta.uid());
    let entry = User::from_uid(uid).ok().flatten();
    let gid = entry.as_ref().map_or(Gid::from_raw(meta.gid()), |u| u.gid);
    let user = entry
        .as_ref()
        .map_or_else(|| uid.to_string(), |u| u.name.clone());
    let fail = |source| PrivilegeError {
        user: user.clone(),
        uid: uid.as_raw(),
        dir: dir.to_owned(),
        source,
    };
    // Groups first: once the uid is not root, they cannot be changed.
    match entry.and_then(|u| std::ffi::CString::new(u.name).ok()) {
        Some(name) => nix::unistd::initgroups(&name, gid).map_err(fail)?,
        None => nix::unistd::setgroups(&[gid]).map_err(fail)?,
    }
    nix::unistd::setgid(gid).map_err(fail)?;
    nix::unistd::setuid(uid).map_err(fail)?;
    Ok(Identity::Became {
        user,
        uid: uid.as_raw(),
        gid: gid.as_raw(),
    })
}
