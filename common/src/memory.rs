//! Giving memory back to the system that the allocator keeps but no longer uses.
//!
//! glibc serves blocks below its mmap threshold from per-thread arenas, raises that threshold
//! to the largest block freed so far (up to 32 MiB), and returns an arena's free memory only
//! from its top. After a burst of large transfers the API on S3 held 92 MiB at rest, where a
//! `malloc_trim` brought a similar state from 112 to 72 MiB. Fixing the threshold low instead
//! gave ~20 MiB less at the peak but halved warm-cache GETs (every 512 KiB read chunk became a
//! fresh mapping, faulted in page by page), so the memory is given back when idle instead, and
//! the threshold is fixed at 4 MiB: S3 parts (16 MiB, several in flight) get mappings of their
//! own, returned when freed, instead of staying in whichever arena their thread used, while
//! read chunks stay on the heap.

/// The resident set of this process in KiB, if `/proc` tells it.
pub fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Blocks of at least this many bytes get a mapping of their own (see the module's comment).
const OWN_MAPPING_FROM: i32 = 4 << 20;

/// Fixes glibc's mmap threshold at [`OWN_MAPPING_FROM`] (it would otherwise rise to the largest
/// block freed, up to 32 MiB). Call once, at start.
pub fn map_large_blocks_apart() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter, under the allocator's lock.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, OWN_MAPPING_FROM);
    }
}

/// Returns every free page the allocator holds to the system. Blocking: it walks every arena,
/// each under its lock.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reorganises the allocator's own free lists, under its locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
