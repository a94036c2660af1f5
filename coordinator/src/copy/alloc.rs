//! glibc malloc tuning for streaming 4 MiB chunks.
//!
//! Every chunk passes through freshly allocated 4 MiB buffers (the read buffer, tonic's encode
//! buffer). With glibc's defaults such buffers are mmapped or trimmed away when freed, so each
//! new one starts as untouched pages: a page fault per 4 KiB, measured at about a quarter of
//! the coordinator's CPU during a copy. Keeping them in the heap lets freed buffers be reused
//! warm. The coordinator exits after the copy, so the retained memory does not matter.

/// Applies the tuning; call once before a copy.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        // From glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        // SAFETY: mallopt only changes allocator parameters; any value is accepted or refused.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 64 << 20);
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}
