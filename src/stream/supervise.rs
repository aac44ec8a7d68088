//! Supervised threads: a panic in any pipeline thread (decode worker, scorer, retry
//! scheduler) is recorded as a fault that the daemon's main loop sees at once; it then
//! stops, commits only what was acknowledged and returns an error, so the process exits
//! non-zero within seconds instead of running on with a frozen partition.
//!
//! Why a drop guard and not `catch_unwind`: the panic may come from inside libtorch
//! calls whose state after unwinding is unknown; the thread is left to die and nothing
//! it owned is reused. The default panic hook still prints the panic's message and place.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The first fault of a run (a panicked thread, a fatal producer error, an output blocked
/// for too long); later ones are logged only.
#[derive(Debug, Default)]
pub struct Faults {
    any: AtomicBool,
    first: Mutex<Option<String>>,
}

impl Faults {
    pub fn record(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::error!("fault: {what}");
        if let Ok(mut first) = self.first.lock() {
            first.get_or_insert(what);
        }
        self.any.store(true, Ordering::SeqCst);
    }

    pub fn any(&self) -> bool {
        self.any.load(Ordering::SeqCst)
    }

    pub fn first(&self) -> Option<String> {
        self.first.lock().ok().and_then(|f| f.clone())
    }
}

struct PanicGuard {
    name: String,
    faults: Arc<Faults>,
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.faults.record(format!("thread {} panicked", self.name));
        }
    }
}

/// Spawns a named thread whose panic is recorded in `faults`.
pub fn spawn(
    name: &str,
    faults: &Arc<Faults>,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let guard = PanicGuard { name: name.to_string(), faults: faults.clone() };
    std::thread::Builder::new().name(name.to_string()).spawn(move || {
        let _guard = guard;
        body();
    })
}

/// Joins the threads that finish before `deadline`; returns how many were left running
/// (a scorer in the middle of a long batch is not waited for past the deadline).
pub fn join_until(handles: Vec<JoinHandle<()>>, deadline: Instant) -> usize {
    let mut left = 0;
    for handle in handles {
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            let _ = handle.join(); // a panic was recorded by its guard already
        } else {
            left += 1;
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_thread_is_recorded_and_a_stuck_one_is_not_waited_for() {
        let faults = Arc::new(Faults::default());
        let ok = spawn("fine", &faults, || {}).unwrap();
        let bad = spawn("bad", &faults, || panic!("boom")).unwrap();
        assert_eq!(join_until(vec![ok, bad], Instant::now() + Duration::from_secs(5)), 0);
        assert!(faults.any());
        assert_eq!(faults.first().as_deref(), Some("thread bad panicked"));
        let stuck = spawn("stuck", &faults, || std::thread::sleep(Duration::from_secs(3))).unwrap();
        let started = Instant::now();
        assert_eq!(join_until(vec![stuck], Instant::now() + Duration::from_millis(100)), 1);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
