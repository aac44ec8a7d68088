//! Process-wide memory settings, applied first thing in `main`.
//!
//! The main cause of the daemon's memory growth was oneDNN's primitive cache, not the
//! allocator: every new batch shape (the daemon's batches close on size or on a timer,
//! so any size from 1 to the maximum occurs) compiles and keeps new convolution
//! primitives, up to 1024 of them. With the cache off (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0)
//! `scripts/benchmark.sh daemon` held 213-285 MB from 5k to 33k messages, at the same
//! throughput within the noise of the shared machine, where it had grown from 302 to
//! 531 MB with the cache on. So long-running commands (`serve`, `demo`) turn it off
//! unless the user set the variable.
//!
//! glibc gives every thread that allocates its own malloc arena (up to 8 per core) and
//! keeps freed memory in them. The daemon allocates image buffers and tensors on decode
//! and Kafka threads and frees them on the scorer thread, so each arena settles at its
//! own high-water mark: measured with `scripts/benchmark.sh daemon` (53k messages on
//! 2 cores), resident memory rose once from 308 MB to 958 MB and then stayed there; with
//! two arenas it went from 331 MB to 425 MB and stayed there, at the same throughput.
//! So dlsr caps the arenas at 2 unless the user set MALLOC_ARENA_MAX themselves.
//!
//! Two arenas still keep their free chunks (a later run of the same benchmark: 316 MB
//! after 10k, 742 MB after 104k), so the daemon also hands free memory back to the
//! kernel every few seconds with `malloc_trim`. Forcing tensors into mmap instead
//! (MALLOC_MMAP_THRESHOLD_=256k) kept memory at 216-252 MB but cut throughput by more
//! than half (page faults on every fresh buffer), so that was not taken.

/// Turns oneDNN's primitive cache off for a long-running daemon (see the module
/// comment), unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is already set. Must run before
/// libtorch runs its first convolution.
pub fn bound_onednn_primitive_cache() {
    if std::env::var_os("ONEDNN_PRIMITIVE_CACHE_CAPACITY").is_none() {
        // SAFETY (edition 2024 marks set_var unsafe): called from `main` before any other
        // thread exists, so nothing reads the environment concurrently.
        #[allow(unused_unsafe)]
        unsafe {
            std::env::set_var("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0");
        }
    }
}

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

/// Returns free heap memory of every arena to the kernel (glibc `malloc_trim`). Cheap
/// enough to call every few seconds; a no-op off glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
