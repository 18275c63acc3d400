//! `memory::release_free_memory`, in a process of its own: the allocator is per process, and
//! another test allocating meanwhile would move the resident set this one measures.

use s3dedup_common::memory::{release_free_memory, resident_kib};

/// 2 MiB buffers, each followed by a smaller allocation that outlives it: once the buffers are
/// freed, their space is free memory in the middle of an arena, which glibc keeps by itself.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn memory_freed_in_the_middle_of_an_arena_leaves_the_process() {
    let resident = |n: usize| std::hint::black_box(vec![1u8; n]);
    // Once this block is freed, glibc serves every block below 16 MiB from its arenas.
    drop(resident(16 << 20));
    let mut buffers = Vec::new();
    let mut kept = Vec::new();
    for _ in 0..32 {
        buffers.push(resident(2 << 20));
        kept.push(resident(100 << 10));
    }
    let full = resident_kib().expect("VmRSS in /proc/self/status");
    drop(buffers);
    release_free_memory();
    let after = resident_kib().expect("VmRSS in /proc/self/status");
    assert!(
        after + (48 << 10) < full,
        "64 MiB of buffers freed, yet the resident set went only from {full} to {after} KiB"
    );
    drop(kept);
}
