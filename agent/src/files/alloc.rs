//! glibc malloc tuning for streaming 4 MiB chunks.
//!
//! Every chunk passes through freshly allocated multi-MiB buffers (tonic's decode buffer, the
//! HTTP/2 read buffer). With glibc's defaults such buffers are mmapped or trimmed away when
//! freed, so each new one starts as untouched pages: a page fault per 4 KiB, measured at about
//! a quarter of the copy's CPU. Keeping them in the heap lets freed buffers be reused warm;
//! `trim_idle` hands the memory back once no transfer is running, so an idle agent stays small.

/// Applies the tuning; called once when `Files` is created.
pub(super) fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; any value is accepted or refused.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// Returns free heap memory to the system. Blocking (may take a few milliseconds).
pub(super) fn trim_idle() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim releases free heap memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
