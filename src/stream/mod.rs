//! The daemon's stages, one module per stage of its data flow:
//! - [`consumer`]: group membership, rebalances, pause/resume, commits, lag; what it
//!   reads, event by event, and the input-side faults ([`input`], [`topic_watch`]);
//! - [`resolve`]: envelopes unpacked and references fetched, off the consumer thread;
//! - [`scorer`]: decode workers, one batcher per model, the [`scorer::ItemScorer`] seam;
//! - [`decide`]: a model's thresholds and the outcome of a scored item (verdict,
//!   nothing to publish, dead letter), the one threshold resolution of the CLI too;
//! - [`models`]: the served models, their checks and self-test, hot swaps;
//! - [`producer`]: output records, deliveries, retries, dead letters, blocked outputs;
//! - [`window_stage`]: the window audit of the judged items (windows per topic and
//!   group, their tests, the online detector, the summary topic);
//! - [`daemon`]: wires the stages, the main loop, reloads, faults and shutdown.
//!
//! Around them: offset bookkeeping ([`offsets`]), the run's counts ([`counters`]),
//! memory in flight ([`budget`]), supervised threads ([`supervise`]), the publisher used
//! for demos, load tests and backfills ([`publish`]) and reading the outputs back for
//! people ([`tail`]). The Kafka client helpers these share with the CLI are in
//! [`crate::kafka`].

pub mod budget;
pub mod consumer;
pub mod counters;
pub mod daemon;
pub mod decide;
pub mod input;
pub mod models;
pub mod offsets;
pub mod producer;
pub mod publish;
pub mod resolve;
pub mod scorer;
pub mod supervise;
pub mod tail;
pub mod topic_watch;
pub mod window_stage;
