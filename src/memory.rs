//! Process-wide memory settings, applied first thing in `main`.
//!
//! The first cause of the daemon's memory growth was oneDNN's primitive cache: every
//! new batch shape compiles and keeps new convolution primitives (up to 1024), and the
//! daemon's batches came in every size from 1 to the maximum (302 -> 531 MB over 33k
//! messages). Turning the cache off kept memory flat but recompiled every batch's
//! primitives. Since issue #10 the daemon's batches come in a few sizes only (powers
//! of two up to 64: adaptive batches are cut down to one, others padded up by
//! `stream::scorer::pad_to_bucket`), so the cache holds at most 7 shapes per layer
//! and stays on, at its default capacity.
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
