//! Where a verified upload waits until it is committed: in memory while it is small, in a spool
//! file once it outgrows a bound. Most uploads to a judging system are small (submissions,
//! small test inputs); keeping them in memory spares each one a file created, written and
//! deleted, and a filesystem that allocates inodes slowly (ext4 without a journal skips every
//! recently deleted inode) or serialises creates in one directory no longer sets the pace.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tempfile::NamedTempFile;

/// Default bound on an upload kept in memory (stored, i.e. gzip, bytes). With the API's default
/// 256 concurrent requests that is at most 16 MiB of bodies held at once.
pub const DEFAULT_MEMORY_LIMIT: usize = 64 * 1024;

/// The stored (gzip) bytes of a verified upload.
#[derive(Debug)]
pub enum SpoolBody {
    /// Small enough to have stayed in memory.
    Memory(Bytes),
    /// In a spool file, deleted when dropped unless moved into place.
    File(NamedTempFile),
}

impl SpoolBody {
    /// The stored bytes, read from the start. Blocking.
    pub fn read_back(&self) -> io::Result<Box<dyn io::Read + '_>> {
        Ok(match self {
            SpoolBody::Memory(b) => Box::new(&b[..]),
            SpoolBody::File(f) => Box::new(io::BufReader::new(f.reopen()?)),
        })
    }

    /// A second handle on the bytes, kept while the body is stored, so that they can be stored
    /// again if the first store is undone (the cleaner, let in by a lost lock, deleted the
    /// object before its row was written). A file stays readable through it after the body
    /// is moved into place or deleted.
    pub fn retain(&self) -> io::Result<Retained> {
        Ok(match self {
            SpoolBody::Memory(b) => Retained::Memory(b.clone()),
            SpoolBody::File(f) => Retained::File(f.reopen()?),
        })
    }
}

/// See [`SpoolBody::retain`].
#[derive(Debug)]
pub enum Retained {
    Memory(Bytes),
    File(std::fs::File),
}

impl Retained {
    /// The bytes as a body again: a file is copied into a new spool file in `dir`. Blocking.
    pub fn restore(&self, dir: &Path) -> io::Result<SpoolBody> {
        match self {
            Retained::Memory(b) => Ok(SpoolBody::Memory(b.clone())),
            Retained::File(f) => {
                use std::io::Seek;
                let mut f = f.try_clone()?;
                let mut copy = new_spool_file(dir)?;
                f.seek(io::SeekFrom::Start(0))?;
                io::copy(&mut f, copy.as_file_mut())?;
                Ok(SpoolBody::File(copy))
            }
        }
    }
}

/// Sees a spool as it is written: a store sending the upload on while it still arrives. It
/// must not block (the writer is verifying the upload), and is dropped with the writer, which
/// tells it the upload ended.
pub trait SpoolFeed: Send {
    /// Asks the writer to flush its file and call [`SpoolFeed::flushed`] each time another this
    /// many bytes are written.
    fn flush_every(&self) -> Option<u64> {
        None
    }

    /// The next bytes written.
    fn wrote(&mut self, data: &[u8]) {
        let _ = data;
    }

    /// The spool file at `path` now holds the first `len` bytes on disk.
    fn flushed(&mut self, path: &Path, len: u64) {
        let _ = (path, len);
    }
}

/// A feed, and the next length at which it wants a flush.
struct Fed {
    feed: Box<dyn SpoolFeed>,
    next_flush: Option<u64>,
}

/// A writer that keeps up to `limit` bytes in memory and moves everything to a new file in
/// `dir` when more arrive. Errors name the spool directory and keep the OS error's kind.
pub struct SpoolWriter {
    dir: PathBuf,
    limit: usize,
    memory: Vec<u8>,
    file: Option<BufWriter<NamedTempFile>>,
    written: u64,
    fed: Option<Fed>,
}

impl SpoolWriter {
    /// A writer spilling to a new `upload-*` file in `dir` past `limit` bytes (0: always a file,
    /// created at the first write).
    pub fn new(dir: &Path, limit: usize) -> Self {
        SpoolWriter {
            dir: dir.to_owned(),
            limit,
            memory: Vec::new(),
            file: None,
            written: 0,
            fed: None,
        }
    }

    /// Also tells `feed` what is written, and flushes for it as it asks.
    pub fn feeding(mut self, feed: Box<dyn SpoolFeed>) -> Self {
        let next_flush = feed.flush_every().map(|step| step.max(1));
        self.fed = Some(Fed { feed, next_flush });
        self
    }

    /// Flushes and tells the feed, once the writer has passed the length it asked for.
    fn feed_flushed(&mut self) -> io::Result<()> {
        let (Some(fed), Some(w)) = (&mut self.fed, &mut self.file) else {
            return Ok(());
        };
        let Some(next) = fed.next_flush.filter(|n| self.written >= *n) else {
            return Ok(());
        };
        w.flush()?;
        let step = fed.feed.flush_every().unwrap_or(next).max(1);
        fed.next_flush = Some((self.written / step + 1) * step);
        fed.feed.flushed(w.get_ref().path(), self.written);
        Ok(())
    }

    fn context(&self, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            format!("spool file in {}: {e}", self.dir.display()),
        )
    }

    /// Creates the spool file and moves what memory holds into it.
    fn spill(&mut self) -> io::Result<&mut BufWriter<NamedTempFile>> {
        let file = new_spool_file(&self.dir).map_err(|e| self.context(e))?;
        let mut w = BufWriter::with_capacity(256 * 1024, file);
        w.write_all(&self.memory).map_err(|e| self.context(e))?;
        self.memory = Vec::new();
        Ok(self.file.insert(w))
    }

    /// The finished body: flushed to its file, or the bytes held in memory.
    pub fn finish(mut self) -> io::Result<SpoolBody> {
        if self.file.is_none() && self.limit == 0 {
            self.spill()?;
        }
        match self.file.take() {
            Some(w) => w
                .into_inner()
                .map(SpoolBody::File)
                .map_err(|e| self.context(e.into_error())),
            None => Ok(SpoolBody::Memory(std::mem::take(&mut self.memory).into())),
        }
    }
}

impl Write for SpoolWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.file.is_none() && self.memory.len() + buf.len() > self.limit {
            self.spill()?;
        }
        let n = match &mut self.file {
            Some(w) => {
                let r = w.write(buf);
                r.map_err(|e| self.context(e))?
            }
            None => {
                self.memory.extend_from_slice(buf);
                buf.len()
            }
        };
        self.written += n as u64;
        if let Some(fed) = &mut self.fed {
            fed.feed.wrote(&buf[..n]);
        }
        self.feed_flushed().map_err(|e| self.context(e))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(w) => {
                let r = w.flush();
                r.map_err(|e| self.context(e))
            }
            None => Ok(()),
        }
    }
}

/// A fresh, empty `upload-<pid>-*` spool file in `dir`, deleted when dropped unless persisted.
/// The process id in the name lets the next program that starts remove what a killed one left.
pub fn new_spool_file(dir: &Path) -> io::Result<NamedTempFile> {
    let prefix = format!("{SPOOL_PREFIX}{}-", std::process::id());
    tempfile::Builder::new().prefix(&prefix).tempfile_in(dir)
}

/// How every spool file's name starts.
pub const SPOOL_PREFIX: &str = "upload-";

/// The process id a spool file's name carries (files of older versions carry none).
fn owner_of(name: &str) -> Option<u32> {
    let (pid, _) = name.strip_prefix(SPOOL_PREFIX)?.split_once('-')?;
    pid.parse().ok()
}

/// Whether a spool file of this name is this process's.
pub fn made_by_this_process(name: &str) -> bool {
    owner_of(name) == Some(std::process::id())
}

/// Whether a spool file of this name is a leftover of a process that is gone: its name carries
/// a process id and no process has that id now. A process of another user counts as alive.
pub fn left_by_dead_process(name: &str) -> bool {
    let Some(pid) = owner_of(name).filter(|pid| *pid != std::process::id()) else {
        return false;
    };
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, None) == Err(nix::errno::Errno::ESRCH)
}

/// True when an I/O error means a disk or quota is full.
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_are_known_by_a_process_that_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        assert!(left_by_dead_process(&format!("upload-{dead}-x1y2")));
        let me = std::process::id();
        assert!(!left_by_dead_process(&format!("upload-{me}-x1y2")));
        assert!(!left_by_dead_process("upload-1-x1y2"), "init is alive");
        assert!(
            !left_by_dead_process("upload-x1y2"),
            "no process id: by age only"
        );
    }

    fn files_in(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    fn written(dir: &Path, limit: usize, chunks: &[&[u8]]) -> SpoolBody {
        let mut w = SpoolWriter::new(dir, limit);
        for c in chunks {
            w.write_all(c).unwrap();
        }
        w.flush().unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn small_bodies_stay_in_memory_and_create_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let body = written(dir.path(), 8, &[b"abc", b"defgh"]);
        assert!(matches!(&body, SpoolBody::Memory(b) if &b[..] == b"abcdefgh"));
        assert_eq!(files_in(dir.path()), 0);
    }

    #[test]
    fn a_body_past_the_limit_moves_whole_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let body = written(dir.path(), 8, &[b"abcde", b"fghij", b"k"]);
        let SpoolBody::File(f) = body else {
            panic!("expected a spool file")
        };
        assert_eq!(std::fs::read(f.path()).unwrap(), b"abcdefghijk");
        assert!(
            f.path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("upload-")
        );
        drop(f);
        assert_eq!(files_in(dir.path()), 0, "the file goes with the body");
    }

    #[test]
    fn a_retained_body_outlives_the_one_stored_and_is_restored_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let body = written(dir.path(), 4, &[b"abcdef", b"ghij"]);
        let retained = body.retain().unwrap();
        drop(body); // stored and gone, as after an upload
        assert_eq!(files_in(dir.path()), 0);
        let SpoolBody::File(again) = retained.restore(dir.path()).unwrap() else {
            panic!("a file body stays a file")
        };
        assert_eq!(std::fs::read(again.path()).unwrap(), b"abcdefghij");
        let small = written(dir.path(), 64, &[b"xyz"]).retain().unwrap();
        assert!(
            matches!(small.restore(dir.path()).unwrap(), SpoolBody::Memory(b) if &b[..] == b"xyz")
        );
    }

    #[test]
    fn limit_zero_always_uses_a_file_even_for_empty_bodies() {
        let dir = tempfile::tempdir().unwrap();
        let SpoolBody::File(f) = written(dir.path(), 0, &[]) else {
            panic!("expected a spool file")
        };
        assert_eq!(std::fs::read(f.path()).unwrap(), b"");
    }

    /// What a feed saw: the bytes, and at each flush the file's length and what was on disk.
    #[derive(Default)]
    struct Saw {
        bytes: Vec<u8>,
        flushes: Vec<(u64, Vec<u8>)>,
    }

    #[derive(Clone, Default)]
    struct Seen(std::sync::Arc<std::sync::Mutex<Saw>>);

    struct Recording(Seen, Option<u64>);

    impl SpoolFeed for Recording {
        fn flush_every(&self) -> Option<u64> {
            self.1
        }
        fn wrote(&mut self, data: &[u8]) {
            self.0.0.lock().unwrap().bytes.extend_from_slice(data);
        }
        fn flushed(&mut self, path: &Path, len: u64) {
            let on_disk = std::fs::read(path).unwrap();
            self.0.0.lock().unwrap().flushes.push((len, on_disk));
        }
    }

    #[test]
    fn a_feed_sees_every_byte_and_the_file_flushed_at_each_step() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Seen::default();
        let mut w =
            SpoolWriter::new(dir.path(), 4).feeding(Box::new(Recording(seen.clone(), Some(10))));
        w.write_all(b"0123456").unwrap();
        assert!(
            seen.0.lock().unwrap().flushes.is_empty(),
            "no mark passed yet"
        );
        w.write_all(b"789abcdefghijklmnopq").unwrap();
        {
            let seen = seen.0.lock().unwrap();
            assert_eq!(seen.flushes.len(), 1, "past two marks at once: one flush");
            assert_eq!(seen.flushes[0].0, 27);
            assert_eq!(
                seen.flushes[0].1, b"0123456789abcdefghijklmnopq",
                "all of it on disk"
            );
        }
        w.write_all(b"rs").unwrap();
        assert_eq!(
            seen.0.lock().unwrap().flushes.len(),
            1,
            "the next mark is 30"
        );
        w.write_all(b"t").unwrap();
        assert_eq!(seen.0.lock().unwrap().flushes.last().unwrap().0, 30);
        let _body = w.finish().unwrap();
        assert_eq!(
            seen.0.lock().unwrap().bytes,
            b"0123456789abcdefghijklmnopqrst"
        );
        // A feed that only wants the bytes gets no flushes, in memory or not.
        let bytes = Seen::default();
        let mut w =
            SpoolWriter::new(dir.path(), 4).feeding(Box::new(Recording(bytes.clone(), None)));
        w.write_all(b"abcdefgh").unwrap();
        assert_eq!(bytes.0.lock().unwrap().bytes, b"abcdefgh");
        assert!(bytes.0.lock().unwrap().flushes.is_empty());
    }

    #[test]
    fn a_spool_directory_that_cannot_take_files_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let mut w = SpoolWriter::new(&missing, 4);
        w.write_all(b"abc").unwrap();
        let e = w.write_all(b"de").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
    }
}
