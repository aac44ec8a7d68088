//! Process-wide allocator settings, applied first thing in `main`.
//!
//! glibc gives every thread that allocates its own malloc arena (up to 8 per core) and
//! keeps freed memory in them. The daemon allocates image buffers and tensors on decode
//! and Kafka threads and frees them on the scorer thread, so each arena settles at its
//! own high-water mark: measured with `scripts/benchmark.sh daemon` (53k messages on
//! 2 cores), resident memory rose once from 308 MB to 958 MB and then stayed there; with
//! two arenas it went from 331 MB to 425 MB and stayed there, at the same throughput.
//! So dlsr caps the arenas at 2 unless the user set MALLOC_ARENA_MAX themselves.

/// Caps glibc's malloc arenas (see the module comment). A no-op off glibc.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only adjusts allocator parameters; called before other threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
