//! Walking a source directory in one fixed order (names sorted bytewise, depth first), so a run
//! that was interrupted can start again right after the last position it finished.
//!
//! A position is the path relative to the walk's root, each name percent-encoded ('%', '/' and
//! non-ASCII bytes), joined by '/'; comparing names one by one gives the walk's order.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, percent_encode};

const NAME: &AsciiSet = &CONTROLS.add(b'%').add(b'/');

/// One entry found, or a directory that could not be read.
pub(super) struct Found {
    /// Where the walk is: what the checkpoint records once this entry is done.
    pub position: String,
    pub entry: Result<(PathBuf, std::fs::Metadata), (String, String)>,
}

/// A position as the names it is made of.
pub(super) fn parse_position(position: &str) -> Vec<Vec<u8>> {
    position
        .split('/')
        .map(|n| percent_decode_str(n).collect())
        .collect()
}

fn position_of(names: &[Vec<u8>]) -> String {
    let parts: Vec<String> = names
        .iter()
        .map(|n| percent_encode(n, NAME).to_string())
        .collect();
    parts.join("/")
}

/// Calls `out` for every non-directory under `root` in walk order, skipping what lies at or
/// before `resume`. Stops early when `out` returns false.
pub(super) fn walk(root: &Path, resume: Option<&[Vec<u8>]>, out: &mut dyn FnMut(Found) -> bool) {
    walk_dir(root, &mut Vec::new(), resume, out);
}

fn walk_dir(
    dir: &Path, names: &mut Vec<Vec<u8>>, resume: Option<&[Vec<u8>]>,
    out: &mut dyn FnMut(Found) -> bool,
) -> bool {
    let mut entries: Vec<OsString> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
        Err(e) => {
            return out(Found {
                position: position_of(names),
                entry: Err((dir.display().to_string(), e.to_string())),
            });
        }
    };
    entries.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in entries {
        let bytes = name.as_bytes();
        // Below the resume point: skip what is done, descend along its path.
        let mut below = None;
        if let Some(r) = resume.filter(|r| !r.is_empty()) {
            match bytes.cmp(&r[0]) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal if r.len() == 1 => continue,
                std::cmp::Ordering::Equal => below = Some(&r[1..]),
                std::cmp::Ordering::Greater => {}
            }
        }
        let path = dir.join(&name);
        names.push(bytes.to_vec());
        let go = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => walk_dir(&path, names, below, out),
            Ok(meta) => out(Found {
                position: position_of(names),
                entry: Ok((path, meta)),
            }),
            Err(e) => out(Found {
                position: position_of(names),
                entry: Err((path.display().to_string(), e.to_string())),
            }),
        };
        names.pop();
        if !go {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walked(root: &Path, resume: Option<&str>) -> Vec<String> {
        let resume = resume.map(parse_position);
        let mut seen = vec![];
        walk(root, resume.as_deref(), &mut |f| {
            seen.push(f.position);
            true
        });
        seen
    }

    #[test]
    fn the_order_is_fixed_and_resuming_skips_exactly_what_was_done() {
        let dir = tempfile::tempdir().unwrap();
        let files = ["a.txt", "a/b", "a/c/d", "a/c/e", "b", "ż/%x", "zz/y"];
        for f in files {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, f).unwrap();
        }
        let all = walked(dir.path(), None);
        // Names compare one by one: the directory "a" comes before "a.txt".
        assert_eq!(
            all,
            ["a/b", "a/c/d", "a/c/e", "a.txt", "b", "zz/y", "%C5%BC/%25x"]
        );
        for (i, p) in all.iter().enumerate() {
            assert_eq!(walked(dir.path(), Some(p)), all[i + 1..], "after {p}");
        }
        // A checkpoint whose entry has gone since: the walk goes on from where it would be.
        assert_eq!(walked(dir.path(), Some("a/c/da")), all[2..]);
        assert_eq!(walked(dir.path(), Some("a")), all[3..]);
    }
}
