//! The streaming side: the daemon ([`daemon`]), its offset bookkeeping ([`offsets`]),
//! thresholds ([`thresholds`]), output records ([`message`]), librdkafka settings
//! ([`kafka`]) and the publisher used for demos, load tests and backfills ([`publish`]).

pub mod daemon;
pub mod demo;
pub mod kafka;
pub mod message;
pub mod offsets;
pub mod publish;
pub mod thresholds;
