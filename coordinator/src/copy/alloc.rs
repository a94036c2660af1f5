//! glibc malloc tuning for streaming 4 MiB chunks.
//!
//! Every chunk passes through freshly allocated 4 MiB buffers (the read buffer, tonic's encode
//! buffer). With glibc's defaults such buffers are mmapped or trimmed away when freed, so each
//! new one starts as untouched pages: a page fault per 4 KiB, measured at about a quarter of
//! the coordinator's CPU during a copy. Keeping them in the heap lets freed buffers be reused
//! warm. The coordinator exits after the copy, so the retained memory does not matter.
//!
//! One arena: glibc gives threads arenas of their own, and a buffer freed into one arena is
//! reused only by its threads. The readers (blocking threads) and the streams (runtime
//! threads) then each kept their own high-water mark, and the coordinator's peak RSS was the
//! sum of them: 166 MB instead of 89 MB for 2 GiB to 4 agents, 220 MB instead of 110 MB for
//! one file to 64 (`bench copy`). A handful of large allocations a second do not contend.

/// Applies the tuning; call once before a copy.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; any value is accepted or refused.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
