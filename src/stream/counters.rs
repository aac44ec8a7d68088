//! The run's counts, shared by the stages and read by the daemon at the end of a run
//! (its `Summary`). Below the stages so that none of them imports the daemon that wires
//! them; Prometheus has the same events by topic and code, these are the run's totals.

use std::sync::atomic::AtomicU64;

/// Counts shared by the stages.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages read from the input topics.
    pub consumed: AtomicU64,
    /// Items judged.
    pub verdicts: AtomicU64,
    /// Items judged out of distribution.
    pub flagged: AtomicU64,
    /// Dead letters handed to the producer.
    pub dead_letters: AtomicU64,
    /// Records the broker acknowledged.
    pub published: AtomicU64,
}
