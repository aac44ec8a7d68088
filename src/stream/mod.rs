//! The streaming side, one module per stage of the daemon's data flow:
//! - [`consumer`]: group membership, rebalances, pause/resume, commits, lag; what it
//!   reads, event by event, and the input-side faults ([`input`], [`topic_watch`]);
//! - [`scorer`]: decode workers, batcher, the [`scorer::ItemScorer`] seam, verdicts;
//! - [`producer`]: output records, deliveries, retries, dead letters, blocked outputs;
//! - [`window_stage`]: the window audit of the judged items (windows per topic and
//!   group, their tests, the online detector, the summary topic);
//! - [`daemon`]: wires the stages, the main loop, faults and shutdown.
//!
//! Around them: offset bookkeeping ([`offsets`]), byte-exact headers ([`headers`]),
//! supervised threads ([`supervise`]), thresholds ([`thresholds`]), output record formats
//! ([`message`]), librdkafka settings ([`kafka`]), librdkafka's
//! logs said once per problem ([`client_log`]), the publisher used for demos, load tests
//! and backfills ([`publish`]) what the brokers say about a topic ([`topics`]) and
//! reading the outputs back for people ([`tail`]).

pub mod budget;
pub mod client_log;
pub mod consumer;
pub mod counters;
pub mod daemon;
pub mod decide;
pub mod headers;
pub mod input;
pub mod kafka;
pub mod message;
pub mod models;
pub mod offsets;
pub mod producer;
pub mod publish;
pub mod resolve;
pub mod scorer;
pub mod supervise;
pub mod tail;
pub mod topic_watch;
pub mod topics;
pub mod window_stage;
