//! Interruption of long batch work (Ctrl-C during `fit`): a flag set from the SIGINT /
//! SIGTERM handler and polled by loops, so they stop between steps and nothing is left
//! half-written. The daemon's graceful shutdown (drain, deliver, commit) is in
//! `crate::stream::daemon`, steered by its own `Control` flags that
//! [`forward_signals`] sets.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe. A second Ctrl-C kills as usual.
    INTERRUPTED.store(true, Ordering::SeqCst);
    // SAFETY: restoring the default disposition is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

/// Installs the handler (idempotent) and returns the flag.
pub fn interrupt_flag() -> &'static AtomicBool {
    // SAFETY: the handler only touches an atomic and resets the disposition.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    &INTERRUPTED
}

static HANGUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hangup(_: libc::c_int) {
    HANGUP.store(true, Ordering::SeqCst);
}

/// For the daemon: SIGINT/SIGTERM set `shutdown`, SIGHUP sets `reload`. A small thread
/// copies the signal flags into the daemon's control flags.
pub fn forward_signals(shutdown: std::sync::Arc<AtomicBool>, reload: std::sync::Arc<AtomicBool>) {
    let interrupted = interrupt_flag();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGHUP, on_hangup as *const () as libc::sighandler_t);
    }
    std::thread::spawn(move || loop {
        if interrupted.load(Ordering::SeqCst) {
            shutdown.store(true, Ordering::SeqCst);
        }
        if HANGUP.swap(false, Ordering::SeqCst) {
            reload.store(true, Ordering::SeqCst);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
}
