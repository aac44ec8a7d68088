//! The producer stage: output records (verdicts and dead letters), their deliveries,
//! retries and the failure policy. Nothing a message produces is dropped: a record is
//! acknowledged to the offset tracker only once the broker confirmed it, so its input is
//! never committed before.
//!
//! Failure policy, by class of delivery error ([`classify`]):
//! - **transient** (broker down, timeouts, leader changes, throttling): librdkafka retries
//!   on its own until `kafka.delivery_timeout_ms`, then the record comes back here and is
//!   sent again after an exponential backoff (100 ms doubling to 10 s);
//! - **permanent** (authorization, unknown topic, record too large, invalid record): the
//!   output topic is *blocked*: `dlsr_output_blocked{topic,code}` = 1, the daemon turns
//!   not ready, the reason is logged once a minute, the record is retried every 1 s
//!   doubling to 30 s (so a fixed ACL or a created topic recovers by itself) and its
//!   input stays uncommitted; after `kafka.output_blocked_exit_ms` the daemon exits
//!   non-zero so that the orchestrator restarts it and pages;
//! - **fatal** (the idempotent producer's fatal error): the producer cannot go on; the
//!   daemon records a fault and exits non-zero.
//!
//! Records that cannot fit are never produced: a dead letter's original value is cut to
//! fit `kafka.message_max_bytes` (headers say so, with the original's length and
//! sha256; the original stays in the input topic), and a verdict that would not fit (an
//! input with huge headers or key) becomes a dead letter with code `output_too_large`.
//!
//! Retries are scheduled by deadline on one thread (records ordered by due time; no per-record
//! sleep) and are dropped, with their work released, when their partition was revoked
//! (the new owner re-reads from the commit point) or at the hard stop of a shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::consumer::Work;
use super::counters::Counters;
use super::offsets::{Ack, OffsetTracker};
use super::supervise::Faults;
use crate::kafka::headers::{self, Header};
use crate::telemetry::metrics::Metrics;

/// Room left in every record for Kafka's own framing (record batch header, lengths).
pub const RECORD_OVERHEAD_BYTES: usize = 1024;
/// Longest `dlsr-error` text carried by a dead letter.
const ERROR_TEXT_MAX: usize = 1000;

/// One record for an output topic and the acknowledgement its delivery releases.
#[derive(Debug, Clone)]
pub struct OutputRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<Header>,
    pub ack: Ack,
    /// Delivery attempts that failed so far.
    pub attempt: u32,
    /// Whether the last failure was permanent (sets the backoff).
    pub permanent: bool,
}

impl OutputRecord {
    /// Bytes the record occupies, without Kafka's framing.
    pub fn byte_len(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.len() + headers::payload_len(&self.headers)
    }
}

/// How the daemon treats a delivery error (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Permanent,
    Fatal,
}

pub fn classify(code: Option<RDKafkaErrorCode>) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match code {
        Some(C::Fatal) => ErrorClass::Fatal,
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::UnknownTopicOrPartition
            | C::UnknownTopic
            | C::InvalidTopic
            | C::InvalidRecord
            | C::InvalidMessage
            | C::InvalidRequiredAcks
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat,
        ) => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

/// A bounded label value for an error: librdkafka's code name in snake case.
pub fn code_name(err: &KafkaError) -> String {
    match err.rdkafka_error_code() {
        Some(code) => snake_case(&format!("{code:?}")),
        None => "other".into(),
    }
}

pub fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The delay before a failed record's next attempt.
pub fn backoff(attempt: u32, permanent: bool) -> Duration {
    if permanent {
        Duration::from_millis((1000u64 << attempt.min(5)).min(30_000))
    } else {
        Duration::from_millis((100u64 << attempt.min(7)).min(10_000))
    }
}

/// One refused record: the error it was refused with and since when.
struct Refusal {
    code: String,
    reason: String,
    since: Instant,
}

/// A refused record: its output topic and the input it answers (one input has at most
/// one output record in flight).
type RefusedKey = (String, super::offsets::TopicPartition, i64, u64);

fn refused_key(topic: &str, ack: &Ack) -> RefusedKey {
    (topic.to_string(), ack.tp.clone(), ack.offset, ack.generation)
}

/// Records refused with a permanent error, each until its own delivery or release. A
/// topic is blocked while any of its records is refused, since the oldest one was: one
/// record refused for good while others to the same topic go through keeps the topic
/// blocked (its input's partition cannot commit), so the exit timer and the alert fire.
/// (Before issue #21 the state was per topic and any delivery cleared it: that record
/// was retried for ever, silently.)
pub struct OutputBlocks {
    refused: Mutex<BTreeMap<RefusedKey, Refusal>>,
    /// When each blocked topic was last logged.
    logged: Mutex<BTreeMap<String, Instant>>,
    metrics: Arc<Metrics>,
}

impl OutputBlocks {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { refused: Mutex::new(BTreeMap::new()), logged: Mutex::new(BTreeMap::new()), metrics }
    }

    fn refused(&self, topic: &str, ack: &Ack, code: &str, reason: &str) {
        let Ok(mut refused) = self.refused.lock() else { return };
        let key = refused_key(topic, ack);
        let since = refused.get(&key).map_or_else(Instant::now, |r| r.since);
        let old = refused.insert(key, Refusal { code: code.to_string(), reason: reason.to_string(), since });
        if let Some(old) = old.filter(|o| o.code != code) {
            self.clear_code_if_unused(&refused, topic, &old.code);
        }
        self.metrics.set_output_blocked(topic, code, true);
    }

    fn clear_code_if_unused(&self, refused: &BTreeMap<RefusedKey, Refusal>, topic: &str, code: &str) {
        if !refused.iter().any(|(k, r)| k.0 == topic && r.code == code) {
            self.metrics.set_output_blocked(topic, code, false);
        }
    }

    /// A record was delivered, or released without delivery (its partition was revoked):
    /// it no longer holds its topic blocked.
    fn settled(&self, topic: &str, ack: &Ack) {
        let Ok(mut refused) = self.refused.lock() else { return };
        let Some(r) = refused.remove(&refused_key(topic, ack)) else { return };
        self.clear_code_if_unused(&refused, topic, &r.code);
        let unblocked = !refused.keys().any(|k| k.0 == topic);
        // One lock at a time: `log_periodically` takes `logged` and then `refused`.
        drop(refused);
        if unblocked {
            tracing::info!(%topic, "output topic accepts records again after {:.0?}", r.since.elapsed());
            if let Ok(mut l) = self.logged.lock() {
                l.remove(topic);
            }
        }
    }

    /// Refused records now (all topics).
    pub fn refused_records(&self) -> usize {
        self.refused.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Per blocked topic: (code, reason, refused records, age of the oldest).
    fn topics(&self) -> BTreeMap<String, (String, String, usize, Duration)> {
        let mut out: BTreeMap<String, (String, String, usize, Duration)> = BTreeMap::new();
        let Ok(refused) = self.refused.lock() else { return out };
        for (k, r) in refused.iter() {
            let age = r.since.elapsed();
            let e = out.entry(k.0.clone()).or_insert_with(|| (r.code.clone(), r.reason.clone(), 0, age));
            e.2 += 1;
            if age > e.3 {
                (e.0, e.1, e.3) = (r.code.clone(), r.reason.clone(), age);
            }
        }
        out
    }

    /// The topic blocked longest: (topic, code, how long its oldest refused record has been
    /// refused).
    pub fn longest(&self) -> Option<(String, String, Duration)> {
        self.topics()
            .into_iter()
            .max_by_key(|(_, t)| t.3)
            .map(|(topic, (code, _, _, age))| (topic, code, age))
    }

    /// Logs each blocked topic's reason, at most once a minute.
    pub fn log_periodically(&self, exit_after: Duration) {
        // The refusals first, then `logged`: never both locks at once (the delivery
        // callback's `settled` takes them in the other order; issue #21's fresh-clone
        // run caught the deadlock).
        let topics = self.topics();
        let Ok(mut logged) = self.logged.lock() else { return };
        for (topic, (code, reason, records, age)) in topics {
            if logged.get(&topic).is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
                continue;
            }
            logged.insert(topic.clone(), Instant::now());
            tracing::error!(
                %topic,
                %code,
                records,
                "output blocked for {age:.0?}: the topic refuses {records} record(s) ({reason}); their inputs \
                 stay uncommitted; the daemon exits after {exit_after:.0?} blocked (kafka.output_blocked_exit_ms)",
            );
        }
    }
}

/// librdkafka's producer callbacks: acknowledgements on success, the failure policy
/// otherwise.
pub struct ProducerCtx {
    /// To the consumer: a delivered record's input may be committed past.
    acks: Sender<Ack>,
    /// To the retry scheduler: a record whose delivery failed transiently.
    retries: Sender<OutputRecord>,
    /// Delivery errors by code, dead letters by code.
    metrics: Arc<Metrics>,
    /// The run's counts (records the broker acknowledged).
    counters: Arc<Counters>,
    /// Output topics refusing records for good, and since when (not ready, exit later).
    blocks: Arc<OutputBlocks>,
    /// Where a fatal producer error is recorded, ending the run.
    faults: Arc<Faults>,
}

impl ClientContext for ProducerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.faults.record(format!("the producer hit a fatal error and cannot go on: {reason}"));
        } else {
            crate::kafka::client_log::error("producer", &error, reason);
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::client_log::log("producer", level, facility, message);
    }
}

/// What a delivery report carries back: the record's acknowledgement and attempt count
/// (its key, value and headers are read back from the report).
pub struct DeliveryTag {
    ack: Ack,
    attempt: u32,
}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Box<DeliveryTag>;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: Box<DeliveryTag>) {
        match result {
            Ok(msg) => {
                self.counters.published.fetch_add(1, Ordering::Relaxed);
                self.blocks.settled(msg.topic(), &tag.ack);
                let _ = self.acks.send(tag.ack);
            }
            Err((err, msg)) => {
                let record = OutputRecord {
                    topic: msg.topic().to_string(),
                    key: msg.key().map(<[u8]>::to_vec),
                    value: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: headers::read(msg),
                    ack: tag.ack,
                    attempt: tag.attempt,
                    permanent: false,
                };
                self.failed(record, err);
            }
        }
    }
}

impl ProducerCtx {
    /// Applies the failure policy to a record that failed or was refused, then hands it
    /// to the retry scheduler. It stays unacknowledged, so its input is not committed.
    fn failed(&self, mut record: OutputRecord, err: &KafkaError) {
        let code = code_name(err);
        self.metrics.record_delivery_error(&record.topic, &code);
        let class = classify(err.rdkafka_error_code());
        match class {
            ErrorClass::Fatal => {
                self.faults.record(format!("delivery to {} failed fatally: {err}", record.topic))
            }
            ErrorClass::Permanent => {
                self.blocks.refused(&record.topic, &record.ack, &code, &err.to_string());
                tracing::debug!(topic = %record.topic, attempt = record.attempt, "refused: {err}");
            }
            ErrorClass::Transient => {
                tracing::warn!(topic = %record.topic, attempt = record.attempt, "delivery failed, will retry: {err}")
            }
        }
        record.permanent = class != ErrorClass::Transient;
        record.attempt += 1;
        let _ = self.retries.send(record);
    }
}

pub type KafkaProducer = ThreadedProducer<ProducerCtx>;

/// Where the output topics' settings live for the stage.
#[derive(Debug, Clone)]
pub struct OutputTopics {
    pub verdicts: String,
    pub dead_letters: String,
    pub message_max_bytes: usize,
}

/// The stage's handle: what the decode workers, the scorer and the retry scheduler call.
pub struct Output {
    /// The idempotent producer of verdicts and dead letters (flushed and purged at the
    /// hard stop).
    pub producer: Arc<KafkaProducer>,
    /// The verdict and dead-letter topics, and the largest record they take.
    pub topics: OutputTopics,
    /// Set at the end of a shutdown's drain: nothing more is produced or retried.
    pub hard_stop: Arc<AtomicBool>,
    /// To the consumer: an input with nothing to publish may be committed past.
    acks: Sender<Ack>,
    /// Verdicts, dead letters and truncations by topic and code.
    metrics: Arc<Metrics>,
    /// The run's counts (dead letters).
    counters: Arc<Counters>,
    /// Records refused for good, tracked one by one until delivered or released.
    blocks: Arc<OutputBlocks>,
}

impl Output {
    /// Creates the idempotent producer and the retry channel it reports failures to.
    pub fn create(
        config: rdkafka::ClientConfig,
        topics: OutputTopics,
        acks: Sender<Ack>,
        metrics: Arc<Metrics>,
        counters: Arc<Counters>,
        blocks: Arc<OutputBlocks>,
        faults: Arc<Faults>,
    ) -> Result<(Self, Receiver<OutputRecord>), KafkaError> {
        let (retry_tx, retry_rx) = std::sync::mpsc::channel();
        let ctx = ProducerCtx {
            acks: acks.clone(),
            retries: retry_tx,
            metrics: metrics.clone(),
            counters: counters.clone(),
            blocks: blocks.clone(),
            faults,
        };
        let producer: KafkaProducer = config.create_with_context(ctx)?;
        let output = Self {
            producer: Arc::new(producer),
            topics,
            hard_stop: Arc::new(AtomicBool::new(false)),
            acks,
            metrics,
            counters,
            blocks,
        };
        Ok((output, retry_rx))
    }

    /// A message with nothing to publish (an in-distribution verdict with `publish =
    /// "flagged"`) is done.
    pub fn done(&self, ack: Ack) {
        let _ = self.acks.send(ack);
    }

    /// A record given up without delivery (its partition was revoked): released, and no
    /// longer holding its topic blocked.
    pub fn release(&self, record: OutputRecord) {
        self.blocks.settled(&record.topic, &record.ack);
        self.done(record.ack);
    }

    /// Publishes a verdict, or dead-letters its input when the verdict would not fit.
    pub fn verdict(&self, work: Work, value: Vec<u8>, label: &str) {
        let mut headers = work.record.headers.clone();
        headers.push(headers::text("dlsr-verdict", label));
        let record = OutputRecord {
            topic: self.topics.verdicts.clone(),
            key: work.record.key.clone(),
            value,
            headers,
            ack: work.ack(),
            attempt: 0,
            permanent: false,
        };
        if record.byte_len() + RECORD_OVERHEAD_BYTES > self.topics.message_max_bytes {
            let why = format!(
                "the verdict with the input's key and headers takes {} bytes, over kafka.message_max_bytes = {}",
                record.byte_len(),
                self.topics.message_max_bytes
            );
            return self.dead_letter(work, "output_too_large", &why);
        }
        self.send(record);
    }

    /// Sends a message to the dead-letter topic with the reason, cut to fit.
    pub fn dead_letter(&self, work: Work, code: &str, error: &str) {
        let topic = work.record.source.topic.clone();
        self.metrics.record_dead_letter(&topic, code);
        self.counters.dead_letters.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%topic, partition = work.record.source.partition, offset = work.record.source.offset, code, "dead letter: {error}");
        let (record, truncated) = dead_letter_record(work, &self.topics, code, error);
        if truncated {
            self.metrics.record_dead_letter_truncated(&topic);
        }
        self.send(record);
    }

    /// The dead letter of offsets skipped unread (`kafka.on_unreadable = "skip"`): an
    /// empty value, the range and the consumer's error in headers.
    pub fn skipped_range(&self, work: Work) {
        let Some(skipped) = work.skipped.clone() else { return };
        let topic = work.record.source.topic.clone();
        self.metrics.record_dead_letter(&topic, "unreadable");
        self.counters.dead_letters.fetch_add(1, Ordering::Relaxed);
        let first = work.record.source.offset;
        let error = format!(
            "offsets {first}..={} of {topic}/{} could not be read and were skipped ({}): {}",
            skipped.last, work.record.source.partition, skipped.code, skipped.reason
        );
        let (mut record, _) = dead_letter_record(work, &self.topics, "unreadable", &error);
        record.headers.push(headers::text("dlsr-skipped-first-offset", first.to_string()));
        record.headers.push(headers::text("dlsr-skipped-last-offset", skipped.last.to_string()));
        record.headers.push(headers::text("dlsr-consumer-error-code", skipped.code));
        self.send(record);
    }

    /// Hands a record to librdkafka, waiting while its queue is full (never after the
    /// hard stop: the record is then simply not acknowledged, so its input is re-read).
    pub fn send(&self, record: OutputRecord) {
        let owned_headers = headers::to_owned(&record.headers);
        let tag = Box::new(DeliveryTag { ack: record.ack.clone(), attempt: record.attempt });
        let mut base =
            BaseRecord::with_opaque_to(&record.topic, tag).payload(&record.value).headers(owned_headers);
        if let Some(k) = &record.key {
            base = base.key(k);
        }
        loop {
            if self.hard_stop.load(Ordering::Relaxed) {
                return;
            }
            match self.producer.send(base) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    base = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((err, back)) => {
                    // Refused at once (e.g. a topic error librdkafka cached from an
                    // earlier delivery): the same policy as a failed delivery.
                    drop(back);
                    self.producer.context().failed(record, &err);
                    return;
                }
            }
        }
    }
}

/// The dead letter of `work`: original key, value and headers plus the reason and the
/// source coordinates, cut to fit the topic's record size (module docs).
pub fn dead_letter_record(
    work: Work,
    topics: &OutputTopics,
    code: &str,
    error: &str,
) -> (OutputRecord, bool) {
    let ack = work.ack();
    let source = work.record.source;
    let error: String = error.chars().take(ERROR_TEXT_MAX).collect();
    let ours = vec![
        headers::text("dlsr-error-code", code),
        headers::text("dlsr-error", error),
        headers::text("dlsr-source-topic", source.topic.clone()),
        headers::text("dlsr-source-partition", source.partition.to_string()),
        headers::text("dlsr-source-offset", source.offset.to_string()),
    ];
    let ours = match &work.resolved.uri {
        Some(uri) => ours.into_iter().chain([headers::text("dlsr-source-uri", uri.clone())]).collect(),
        None => ours,
    };
    let limit = topics.message_max_bytes.saturating_sub(RECORD_OVERHEAD_BYTES);
    let mut key = work.record.key;
    let mut extra = Vec::new();
    if key.as_ref().is_some_and(|k| k.len() > limit / 4) {
        extra.push(headers::text("dlsr-original-key-length", key.as_ref().map_or(0, Vec::len).to_string()));
        key = None;
    }
    let mut original_headers = work.record.headers;
    let mut value = work.record.value;
    let fixed = |h: &[Header], extra: &[Header], original: &[Header], key: &Option<Vec<u8>>| {
        key.as_ref().map_or(0, Vec::len)
            + headers::payload_len(h)
            + headers::payload_len(extra)
            + headers::payload_len(original)
    };
    let mut truncated = false;
    if fixed(&ours, &extra, &original_headers, &key) + value.len() > limit {
        use sha2::Digest;
        truncated = true;
        extra.push(headers::text("dlsr-value-truncated", "true"));
        extra.push(headers::text("dlsr-original-length", value.len().to_string()));
        extra.push(headers::text("dlsr-original-sha256", hex::encode(sha2::Sha256::digest(&value))));
        if fixed(&ours, &extra, &original_headers, &key) > limit {
            extra.push(headers::text("dlsr-headers-dropped", original_headers.len().to_string()));
            original_headers.clear();
        }
        let room = limit.saturating_sub(fixed(&ours, &extra, &original_headers, &key));
        value.truncate(room);
    }
    let mut all = original_headers;
    all.extend(ours);
    all.extend(extra);
    let record = OutputRecord {
        topic: topics.dead_letters.clone(),
        key,
        value,
        headers: all,
        ack,
        attempt: 0,
        permanent: false,
    };
    (record, truncated)
}

/// The retry scheduler's inputs.
pub struct RetryScheduler {
    pub output: Arc<Output>,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    /// Bumped on every revoke: the scheduler then drops the records of revoked partitions.
    pub revocations: Arc<AtomicU64>,
    pub metrics: Arc<Metrics>,
}

impl RetryScheduler {
    /// Runs until the hard stop. Each record waits for its own due time; whatever is due
    /// is sent at once, whatever belongs to a revoked partition is released.
    pub fn run(self, rx: Receiver<OutputRecord>) {
        // Keyed by (due time, arrival number): the first entry is the next one due.
        let mut waiting: BTreeMap<(Instant, u64), OutputRecord> = BTreeMap::new();
        let mut arrivals = 0u64;
        let mut seen_revocations = self.revocations.load(Ordering::SeqCst);
        let mut schedule = |waiting: &mut BTreeMap<(Instant, u64), OutputRecord>, record: OutputRecord| {
            arrivals += 1;
            let due = Instant::now() + backoff(record.attempt.saturating_sub(1), record.permanent);
            waiting.insert((due, arrivals), record);
        };
        loop {
            if self.output.hard_stop.load(Ordering::Relaxed) {
                // Not acknowledged, so not committed: re-read after the restart.
                self.metrics.retry_queue.set(0);
                return;
            }
            let wait = waiting
                .first_key_value()
                .map_or(Duration::from_millis(100), |((due, _), _)| {
                    due.saturating_duration_since(Instant::now())
                })
                .min(Duration::from_millis(100));
            match rx.recv_timeout(wait) {
                Ok(record) => {
                    schedule(&mut waiting, record);
                    // Take everything already queued before sending anything.
                    while let Ok(record) = rx.try_recv() {
                        schedule(&mut waiting, record);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let revocations = self.revocations.load(Ordering::SeqCst);
            if revocations != seen_revocations {
                seen_revocations = revocations;
                self.release_revoked(&mut waiting);
            }
            let now = Instant::now();
            while waiting.first_key_value().is_some_and(|((due, _), _)| *due <= now) {
                if self.output.hard_stop.load(Ordering::Relaxed) {
                    break;
                }
                let Some((_, record)) = waiting.pop_first() else { break };
                let current = self
                    .tracker
                    .lock()
                    .map(|t| t.is_current(&record.ack.tp, record.ack.generation))
                    .unwrap_or(false);
                if current {
                    self.output.send(record);
                } else {
                    self.output.release(record);
                }
            }
            self.metrics.retry_queue.set(waiting.len() as i64);
        }
    }

    /// Drops (and releases) the records whose partition is no longer assigned.
    fn release_revoked(&self, waiting: &mut BTreeMap<(Instant, u64), OutputRecord>) {
        let Ok(tracker) = self.tracker.lock() else { return };
        let mut released = Vec::new();
        let mut kept = BTreeMap::new();
        for (k, r) in std::mem::take(waiting) {
            if tracker.is_current(&r.ack.tp, r.ack.generation) {
                kept.insert(k, r);
            } else {
                released.push(r);
            }
        }
        *waiting = kept;
        drop(tracker);
        for record in released {
            self.output.release(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::message::Source;

    fn work(value_len: usize, header_len: usize) -> Work {
        Work {
            record: crate::kafka::message::Record {
                source: Source { topic: "images".into(), partition: 1, offset: 42, timestamp: None },
                key: Some(b"cat.png".to_vec()),
                value: (0..value_len).map(|i| (i % 251) as u8).collect(),
                headers: vec![(vec![0xff, 0xfe], Some(vec![7u8; header_len]))],
            },
            generation: 3,
            skipped: None,
            held: crate::stream::budget::Held::none(),
            resolved: Default::default(),
        }
    }

    fn topics() -> OutputTopics {
        OutputTopics { verdicts: "v".into(), dead_letters: "dl".into(), message_max_bytes: 100_000 }
    }

    #[test]
    fn a_dead_letter_that_fits_carries_everything_unchanged() {
        let (r, truncated) = dead_letter_record(work(5000, 10), &topics(), "undecodable", "bad");
        assert!(!truncated);
        assert_eq!(r.value.len(), 5000);
        assert_eq!(
            r.headers[0],
            (vec![0xff, 0xfe], Some(vec![7u8; 10])),
            "original headers first, unchanged"
        );
        assert_eq!(headers::find(&r.headers, "dlsr-source-offset"), Some(&b"42"[..]));
        assert_eq!(headers::find(&r.headers, "dlsr-value-truncated"), None);
    }

    #[test]
    fn an_oversized_dead_letter_is_cut_to_fit_and_says_so() {
        use sha2::Digest;
        let w = work(1_500_000, 10);
        let sha = hex::encode(sha2::Sha256::digest(&w.record.value));
        let (r, truncated) = dead_letter_record(w, &topics(), "undecodable", "bad");
        assert!(truncated);
        assert!(r.byte_len() + RECORD_OVERHEAD_BYTES <= 100_000, "{} bytes", r.byte_len());
        assert!(r.value.len() > 90_000, "as much of the value as fits: {}", r.value.len());
        assert_eq!(headers::find(&r.headers, "dlsr-original-length"), Some(&b"1500000"[..]));
        assert_eq!(headers::find(&r.headers, "dlsr-original-sha256"), Some(sha.as_bytes()));
        assert_eq!(headers::find(&r.headers, "dlsr-value-truncated"), Some(&b"true"[..]));
        // Headers too large to fit are dropped and counted, never sent over the limit.
        let (r, _) = dead_letter_record(work(10, 200_000), &topics(), "undecodable", "bad");
        assert!(r.byte_len() + RECORD_OVERHEAD_BYTES <= 100_000);
        assert_eq!(headers::find(&r.headers, "dlsr-headers-dropped"), Some(&b"1"[..]));
    }

    /// Issue #21: one record refused for good while others to the same topic are
    /// delivered kept the topic blocked only until the next delivery, so the exit timer
    /// and `DlsrOutputBlocked` never fired and that record was retried for ever.
    #[test]
    fn one_record_refused_for_good_keeps_its_topic_blocked_while_others_are_delivered() {
        let metrics = Arc::new(Metrics::new(vec![0.0]));
        let blocks = OutputBlocks::new(metrics.clone());
        let ack = |offset| Ack { tp: ("images".into(), 0), offset, generation: 1 };
        blocks.refused("dl", &ack(5), "message_size_too_large", "too large");
        std::thread::sleep(Duration::from_millis(20));
        blocks.refused("dl", &ack(5), "message_size_too_large", "too large");
        blocks.settled("dl", &ack(6));
        blocks.settled("dl", &ack(7));
        let (topic, code, age) = blocks.longest().expect("still blocked by the refused record");
        assert_eq!((topic.as_str(), code.as_str()), ("dl", "message_size_too_large"));
        assert!(age >= Duration::from_millis(20), "the oldest refusal's age, not the last one's: {age:?}");
        assert!(metrics
            .render()
            .contains("dlsr_output_blocked{code=\"message_size_too_large\",topic=\"dl\"} 1"));
        blocks.settled("dl", &ack(5));
        assert!(blocks.longest().is_none());
        assert_eq!(blocks.refused_records(), 0);
        assert!(!metrics.render().contains("dlsr_output_blocked{"), "the series goes with the last refusal");
    }

    /// The delivery callback (`refused`, `settled`) and the main loop's
    /// `log_periodically` run at once; they took the two locks in opposite orders and
    /// deadlocked the main loop (caught by a fresh-clone run). Both sides hammer here;
    /// with the old order this test hangs.
    #[test]
    fn deliveries_and_the_periodic_log_never_deadlock() {
        let blocks = Arc::new(OutputBlocks::new(Arc::new(Metrics::new(vec![0.0]))));
        let start = Arc::new(std::sync::Barrier::new(2));
        let deliveries = {
            let (blocks, start) = (blocks.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..200_000 {
                    let ack = Ack { tp: ("images".into(), 0), offset: i % 7, generation: 1 };
                    blocks.refused("dl", &ack, "topic_authorization_failed", "denied");
                    blocks.settled("dl", &ack);
                }
            })
        };
        start.wait();
        for _ in 0..200_000 {
            blocks.log_periodically(Duration::from_secs(300));
        }
        deliveries.join().unwrap();
        assert!(blocks.longest().is_none());
    }

    #[test]
    fn errors_are_classified_and_backoff_is_bounded() {
        use RDKafkaErrorCode as C;
        assert_eq!(classify(Some(C::MessageSizeTooLarge)), ErrorClass::Permanent);
        assert_eq!(classify(Some(C::TopicAuthorizationFailed)), ErrorClass::Permanent);
        assert_eq!(classify(Some(C::UnknownTopicOrPartition)), ErrorClass::Permanent);
        assert_eq!(classify(Some(C::Fatal)), ErrorClass::Fatal);
        assert_eq!(classify(Some(C::MessageTimedOut)), ErrorClass::Transient);
        assert_eq!(classify(Some(C::NotLeaderForPartition)), ErrorClass::Transient);
        assert_eq!(snake_case("TopicAuthorizationFailed"), "topic_authorization_failed");
        assert_eq!(backoff(0, false), Duration::from_millis(100));
        assert_eq!(backoff(40, false), Duration::from_secs(10));
        assert_eq!(backoff(40, true), Duration::from_secs(30));
    }
}
