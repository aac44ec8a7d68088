//! Memory in flight, budgeted in bytes (`pipeline.in_flight_bytes`): message counts alone
//! do not bound memory when one 130 kB PNG decodes to 108 MB of pixels (issue #21).
//!
//! Two halves of the budget:
//! - **payloads** held between consumption and output ([`Held`], counted by the consumer,
//!   which pauses its partitions past half the budget, as it does at `in_flight_limit`);
//! - **decoding**: a decode worker reserves the bytes an image will take at its peak
//!   (from the header's dimensions, before any pixel is decoded) and waits while the
//!   other workers' images fill the other half. An image larger than that half alone
//!   still decodes, alone: the decode limits, not the budget, say which images are
//!   accepted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Bytes held by the items in flight; each [`Held`] gives its bytes back when dropped,
/// wherever in the pipeline its item ends.
#[derive(Debug, Default)]
pub struct PayloadBytes(AtomicU64);

impl PayloadBytes {
    pub fn hold(self: &Arc<Self>, bytes: u64) -> Held {
        self.0.fetch_add(bytes, Ordering::Relaxed);
        Held { counter: Some(self.clone()), bytes }
    }

    pub fn held(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// An item's share of [`PayloadBytes`].
#[derive(Debug, Default)]
pub struct Held {
    counter: Option<Arc<PayloadBytes>>,
    bytes: u64,
}

impl Held {
    /// Holds nothing (items made outside the consumer, tests).
    pub fn none() -> Self {
        Self::default()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(c) = &self.counter {
            c.0.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// The decoding half: reservations that wait while the budget is taken.
#[derive(Debug)]
pub struct DecodeBudget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl DecodeBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self { limit, used: Mutex::new(0), freed: Condvar::new() })
    }

    /// Waits until `bytes` fit beside what others reserved (or nothing else is reserved),
    /// then reserves them until the returned guard is dropped.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Reservation {
        let mut used = self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *used > 0 && *used + bytes > self.limit {
            used = self.freed.wait(used).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *used += bytes;
        Reservation { budget: self.clone(), bytes }
    }

    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A decode's reservation; dropped when the image's pixels are gone.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<DecodeBudget>,
    bytes: u64,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *used = used.saturating_sub(self.bytes);
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_decode_waits_while_others_fill_the_budget_and_a_huge_one_runs_alone() {
        let budget = DecodeBudget::new(100);
        let a = budget.reserve(60);
        let waiting = {
            let budget = budget.clone();
            std::thread::spawn(move || {
                let _b = budget.reserve(60);
                budget.used()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiting.is_finished(), "60 + 60 is over the budget: the second waits");
        drop(a);
        assert_eq!(waiting.join().unwrap(), 60);
        assert_eq!(budget.used(), 0);
        let huge = budget.reserve(500);
        assert_eq!(budget.used(), 500, "alone, an image over the budget still decodes");
        drop(huge);
    }

    #[test]
    fn held_bytes_come_back_when_the_item_is_dropped() {
        let payloads = Arc::new(PayloadBytes::default());
        let a = payloads.hold(1000);
        let b = payloads.hold(24);
        assert_eq!(payloads.held(), 1024);
        drop(a);
        assert_eq!(payloads.held(), 24);
        drop(b);
        assert_eq!(payloads.held(), 0);
        drop(Held::none());
    }
}
