//! What the consumer reads, event by event, and the input-side faults it reports.
//!
//! rust-rdkafka's `BaseConsumer::poll` turns a consumer error into a bare error code:
//! the topic, partition and offset librdkafka attaches to it are dropped. Issue #21 found
//! what that costs: a zstd batch this build could not decompress stalled its partition
//! with a `consume error` line 6 times a second that named no partition, while `/readyz`
//! said 200. So the consumer queue is polled here, through librdkafka's event API, and
//! every event is handled by what it is: a message, a partition's error (with its
//! coordinates), a client-wide error, a rebalance (handed to the context exactly as
//! rust-rdkafka does), librdkafka's statistics (where lag comes from) and its log lines.
//!
//! Partition errors are classified ([`classify`]):
//! - **unreadable data** (a batch that cannot be decompressed, a corrupt batch, a codec
//!   this build lacks): refetching returns the same bytes, so it never goes away;
//! - **access** (the topic does not exist, no authorisation to read it): goes away only
//!   when someone fixes it (the consumer keeps trying and resumes by itself);
//! - **transient** (everything else: leader changes, timeouts): librdkafka retries.
//!
//! The first two make the partition *blocked* ([`InputFaults`]): `dlsr_input_blocked` is
//! 1, `/readyz` names the topic, partition, offset and error, and the log says so once a
//! minute with the number of repeats held back. Unreadable data is handled by the policy
//! `kafka.on_unreadable`: `block` (nothing past it is committed, nothing is lost) or
//! `skip` ([`Skipper`]).

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::time::{Duration, Instant};

use rdkafka::bindings as rdsys;
use rdkafka::types::RDKafkaErrorCode;

use super::offsets::TopicPartition;
use crate::kafka::headers;
use crate::kafka::message::{Record, Source};

/// A partition-level error as librdkafka reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionError {
    pub topic: String,
    /// -1 when librdkafka tied the error to a topic rather than a partition.
    pub partition: i32,
    /// Where the fault is (for a batch that cannot be read: its first offset); -1 if unknown.
    pub offset: i64,
    pub code: RDKafkaErrorCode,
    pub reason: String,
}

/// What one poll of the consumer queue gave.
#[derive(Debug)]
pub enum Polled {
    Message(Record),
    PartitionError(PartitionError),
    /// Nothing for the pipeline (a timeout, or an event handled in place).
    Nothing,
}

/// How a partition error is treated (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// Refetching returns the same unreadable bytes.
    UnreadableData,
    /// The topic is missing or not readable: someone has to fix it.
    Access,
    Transient,
}

pub fn classify(code: RDKafkaErrorCode) -> FaultClass {
    use RDKafkaErrorCode as C;
    match code {
        C::BadCompression
        | C::NotImplemented
        | C::BadMessage
        | C::InvalidMessage
        | C::InvalidRecord
        | C::UnsupportedForMessageFormat
        | C::UnsupportedCompressionType => FaultClass::UnreadableData,
        C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed => FaultClass::Access,
        _ => FaultClass::Transient,
    }
}

/// A bounded label value for an error code: librdkafka's code name in snake case.
pub fn code_label(code: RDKafkaErrorCode) -> String {
    super::producer::snake_case(&format!("{code:?}"))
}

/// The consumer queue of a client, polled event by event.
///
/// # Safety
/// `queue` must be the consumer queue (or a reference to it) of `consumer`'s client and
/// outlive this call.
pub unsafe fn poll<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    queue: *mut rdsys::rd_kafka_queue_t,
    timeout: Duration,
    on_stats: &mut dyn FnMut(&[u8]),
) -> Polled {
    use rdkafka::consumer::Consumer;
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let event = rdsys::rd_kafka_queue_poll(queue, ms);
    if event.is_null() {
        return Polled::Nothing;
    }
    let ctx = consumer.context();
    let polled = match rdsys::rd_kafka_event_type(event) {
        rdsys::RD_KAFKA_EVENT_FETCH => {
            let msg = rdsys::rd_kafka_event_message_next(event);
            if msg.is_null() {
                Polled::Nothing
            } else if (*msg).err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                Polled::PartitionError(message_error(msg))
            } else {
                Polled::Message(raw_message(msg))
            }
        }
        rdsys::RD_KAFKA_EVENT_ERROR => {
            let err = rdsys::rd_kafka_event_error(event);
            let reason = cstr(rdsys::rd_kafka_event_error_string(event));
            let tp = rdsys::rd_kafka_event_topic_partition(event);
            if tp.is_null() {
                // Client-wide (all brokers down, authentication, ...): the context's handler.
                rdkafka::ClientContext::error(
                    ctx.as_ref(),
                    rdkafka::error::KafkaError::Global(err.into()),
                    reason.trim(),
                );
                Polled::Nothing
            } else {
                let e = PartitionError {
                    topic: cstr((*tp).topic),
                    partition: (*tp).partition,
                    offset: (*tp).offset,
                    code: err.into(),
                    reason: reason.trim().to_string(),
                };
                rdsys::rd_kafka_topic_partition_destroy(tp);
                Polled::PartitionError(e)
            }
        }
        rdsys::RD_KAFKA_EVENT_REBALANCE => {
            // A copy of the event's list (the event owns its own): what rust-rdkafka's
            // poll does, through the context's public rebalance hook.
            let native = rdsys::rd_kafka_event_topic_partition_list(event);
            let mut tpl = rdkafka::TopicPartitionList::new();
            for e in list_elements(native) {
                tpl.add_partition(&cstr(e.topic), e.partition);
            }
            ctx.rebalance(consumer, rdsys::rd_kafka_event_error(event), &mut tpl);
            Polled::Nothing
        }
        rdsys::RD_KAFKA_EVENT_STATS => {
            let json = rdsys::rd_kafka_event_stats(event);
            if !json.is_null() {
                on_stats(CStr::from_ptr(json).to_bytes());
            }
            Polled::Nothing
        }
        rdsys::RD_KAFKA_EVENT_LOG => {
            let (mut fac, mut text, mut level) = (std::ptr::null(), std::ptr::null(), 0i32);
            if rdsys::rd_kafka_event_log(event, &mut fac, &mut text, &mut level) == 0 {
                rdkafka::ClientContext::log(ctx.as_ref(), log_level(level), &cstr(fac), &cstr(text));
            }
            Polled::Nothing
        }
        // Offset commit results of this consumer go to the stage's own queue; token
        // refreshes are not used (no OAUTHBEARER support in dlsr's settings).
        _ => Polled::Nothing,
    };
    rdsys::rd_kafka_event_destroy(event);
    polled
}

/// The elements of a native topic-partition list (none for a null or empty one, whose
/// element pointer may be null).
///
/// # Safety
/// `list` is null or a valid list that outlives the returned slice.
pub unsafe fn list_elements<'a>(
    list: *const rdsys::rd_kafka_topic_partition_list_t,
) -> &'a [rdsys::rd_kafka_topic_partition_t] {
    if list.is_null() || (*list).elems.is_null() || (*list).cnt <= 0 {
        return &[];
    }
    std::slice::from_raw_parts((*list).elems, usize::try_from((*list).cnt).unwrap_or(0))
}

unsafe fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

fn log_level(level: i32) -> rdkafka::config::RDKafkaLogLevel {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        i32::MIN..=0 => L::Emerg,
        1 => L::Alert,
        2 => L::Critical,
        3 => L::Error,
        4 => L::Warning,
        5 => L::Notice,
        6 => L::Info,
        _ => L::Debug,
    }
}

unsafe fn topic_of(msg: *const rdsys::rd_kafka_message_t) -> String {
    if (*msg).rkt.is_null() {
        String::new()
    } else {
        cstr(rdsys::rd_kafka_topic_name((*msg).rkt))
    }
}

unsafe fn message_error(msg: *const rdsys::rd_kafka_message_t) -> PartitionError {
    let m = &*msg;
    // An error message carries its text as the payload.
    let reason = if m.payload.is_null() {
        String::new()
    } else {
        String::from_utf8_lossy(std::slice::from_raw_parts(m.payload.cast::<u8>(), m.len)).into_owned()
    };
    PartitionError {
        topic: topic_of(msg),
        partition: m.partition,
        offset: m.offset,
        code: m.err.into(),
        reason: reason.trim().to_string(),
    }
}

unsafe fn raw_message(msg: *const rdsys::rd_kafka_message_t) -> Record {
    let m = &*msg;
    let bytes = |p: *mut std::ffi::c_void, len: usize| {
        (!p.is_null()).then(|| std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec())
    };
    let mut ts_type = rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
    let ts = rdsys::rd_kafka_message_timestamp(msg, &mut ts_type);
    let timestamp = (ts_type != rdsys::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE
        && ts >= 0)
        .then_some(ts);
    Record {
        source: Source { topic: topic_of(msg), partition: m.partition, offset: m.offset, timestamp },
        key: bytes(m.key, m.key_len),
        value: bytes(m.payload, m.len).unwrap_or_default(),
        headers: headers::read_raw(msg.cast_mut()),
    }
}

/// A blocked input: what `/readyz`, the metric and the log say about it.
#[derive(Debug, Clone)]
struct Fault {
    code: String,
    offset: i64,
    reason: String,
    since: Instant,
    last_log: Option<Instant>,
    /// Reports of the fault since it was last logged.
    held_back: u64,
}

/// Input partitions (or topics) blocked by a fault that will not go away by itself.
#[derive(Debug, Default)]
pub struct InputFaults {
    /// Keyed by (topic, partition); partition -1 for a topic-wide fault.
    faults: BTreeMap<TopicPartition, Fault>,
}

/// How often a persisting fault is logged again.
pub const FAULT_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl InputFaults {
    /// Records a report; returns the (code, partition) whose metric series must be cleared
    /// when the fault of that partition changed its code, and whether it is new.
    pub fn report(
        &mut self,
        tp: TopicPartition,
        code: &str,
        offset: i64,
        reason: &str,
    ) -> (Option<String>, bool) {
        match self.faults.get_mut(&tp) {
            Some(f) => {
                f.held_back += 1;
                f.offset = offset;
                f.reason = reason.to_string();
                if f.code != code {
                    let old = std::mem::replace(&mut f.code, code.to_string());
                    return (Some(old), false);
                }
                (None, false)
            }
            None => {
                let fault = Fault {
                    code: code.to_string(),
                    offset,
                    reason: reason.to_string(),
                    since: Instant::now(),
                    last_log: None,
                    held_back: 0,
                };
                self.faults.insert(tp, fault);
                (None, true)
            }
        }
    }

    /// Clears a partition's fault (it was read past, or revoked); returns its code.
    pub fn clear(&mut self, tp: &TopicPartition) -> Option<String> {
        self.faults.remove(tp).map(|f| f.code)
    }

    /// Clears the topic-wide fault of `topic`, if any.
    pub fn clear_topic(&mut self, topic: &str) -> Option<String> {
        self.clear(&(topic.to_string(), -1))
    }

    /// The code and reason of a partition's fault.
    pub fn fault_of(&self, tp: &TopicPartition) -> Option<(String, String)> {
        self.faults.get(tp).map(|f| (f.code.clone(), f.reason.clone()))
    }

    pub fn is_blocked(&self, tp: &TopicPartition) -> bool {
        self.faults.contains_key(tp)
    }

    pub fn is_empty(&self) -> bool {
        self.faults.is_empty()
    }

    /// Blocked inputs for people: `images/2 at offset 17: bad_compression (Decompression
    /// ... failed)`, the longest-blocked first, at most three named.
    pub fn describe(&self) -> Option<String> {
        if self.faults.is_empty() {
            return None;
        }
        let mut all: Vec<_> = self.faults.iter().collect();
        all.sort_by_key(|(_, f)| f.since);
        let mut parts: Vec<String> = all.iter().take(3).map(|(tp, f)| describe_one(tp, f)).collect();
        if all.len() > 3 {
            parts.push(format!("and {} more", all.len() - 3));
        }
        Some(format!("input blocked: {}", parts.join("; ")))
    }

    /// Logs each fault at once and then at most once a minute, with the repeats held back.
    pub fn log_due(&mut self, policy: &str) {
        for (tp, f) in self.faults.iter_mut() {
            if f.last_log.is_some_and(|t| t.elapsed() < FAULT_LOG_INTERVAL) {
                continue;
            }
            let held = std::mem::take(&mut f.held_back);
            let repeats = if f.last_log.is_some() && held > 0 {
                format!(" ({held} repeats in the last {} s)", FAULT_LOG_INTERVAL.as_secs())
            } else {
                String::new()
            };
            f.last_log = Some(Instant::now());
            tracing::error!(
                topic = %tp.0,
                partition = tp.1,
                offset = f.offset,
                code = %f.code,
                "{} for {:.0?}{repeats}; {policy}",
                describe_one(tp, f),
                f.since.elapsed(),
            );
        }
    }
}

fn describe_one(tp: &TopicPartition, f: &Fault) -> String {
    let place = if tp.1 < 0 { tp.0.clone() } else { format!("{}/{}", tp.0, tp.1) };
    let at = if f.offset >= 0 { format!(" at offset {}", f.offset) } else { String::new() };
    format!("{place}{at}: {} ({})", f.code, f.reason)
}

/// `kafka.on_unreadable = "skip"`: steps over a batch that cannot be read.
///
/// librdkafka reports an unreadable batch by its *first* offset only; its last offset is
/// not exposed. Seeking one offset at a time is the only way past it that never skips a
/// readable record: fetching from inside the batch returns the same error (same first
/// offset), fetching from past its end returns the next readable record. (Jumping ahead
/// could overshoot into the next batch and skip good records.) Each step is one fetch,
/// so a batch of N records costs N fetches: fine for images, a few per batch.
#[derive(Debug, Default)]
pub struct Skipper {
    /// Per partition: (first offset of the unreadable range, next offset to try).
    active: BTreeMap<TopicPartition, (i64, i64)>,
}

/// What the consumer does after an unreadable-data error under `skip`.
#[derive(Debug, PartialEq)]
pub enum SkipStep {
    /// Seek the partition to this offset and fetch again.
    SeekTo(i64),
}

/// A finished skip: offsets `first..=last` were not judged.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedRange {
    pub tp: TopicPartition,
    pub first: i64,
    pub last: i64,
}

impl Skipper {
    /// An unreadable batch starting at `offset` was reported: where to fetch next, and a
    /// range that is now known to be finished (a new unreadable batch right after the
    /// previous one).
    pub fn unreadable(&mut self, tp: &TopicPartition, offset: i64) -> (SkipStep, Option<SkippedRange>) {
        match self.active.get_mut(tp) {
            // The same batch again: one further.
            Some((first, next)) if offset <= *first => {
                *next += 1;
                (SkipStep::SeekTo(*next), None)
            }
            // Another unreadable batch after the one being skipped: that one ended before it.
            Some((first, _)) => {
                let done = SkippedRange { tp: tp.clone(), first: *first, last: offset - 1 };
                self.active.insert(tp.clone(), (offset, offset + 1));
                (SkipStep::SeekTo(offset + 1), Some(done))
            }
            None => {
                self.active.insert(tp.clone(), (offset, offset + 1));
                (SkipStep::SeekTo(offset + 1), None)
            }
        }
    }

    /// A readable message arrived: the range being skipped on its partition, if any,
    /// ends just before it.
    pub fn readable(&mut self, tp: &TopicPartition, offset: i64) -> Option<SkippedRange> {
        let (first, _) = self.active.remove(tp)?;
        (offset > first).then(|| SkippedRange { tp: tp.clone(), first, last: offset - 1 })
    }

    /// Where a partition being skipped should be read from again (after a reassignment
    /// the consumer re-reads from the commit point; the skip starts over then).
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.active.remove(tp);
    }

    pub fn is_skipping(&self, tp: &TopicPartition) -> bool {
        self.active.contains_key(tp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        ("images".into(), p)
    }

    #[test]
    fn unreadable_and_access_errors_block_others_are_transient() {
        use RDKafkaErrorCode as C;
        assert_eq!(classify(C::BadCompression), FaultClass::UnreadableData);
        assert_eq!(classify(C::NotImplemented), FaultClass::UnreadableData);
        assert_eq!(classify(C::UnknownTopicOrPartition), FaultClass::Access);
        assert_eq!(classify(C::TopicAuthorizationFailed), FaultClass::Access);
        assert_eq!(classify(C::NotLeaderForPartition), FaultClass::Transient);
        assert_eq!(classify(C::BrokerTransportFailure), FaultClass::Transient);
        assert_eq!(code_label(C::BadCompression), "bad_compression");
    }

    #[test]
    fn a_skip_steps_one_offset_at_a_time_and_ends_at_the_next_readable_record() {
        let mut s = Skipper::default();
        assert_eq!(s.unreadable(&tp(0), 10), (SkipStep::SeekTo(11), None));
        assert_eq!(s.unreadable(&tp(0), 10), (SkipStep::SeekTo(12), None), "still inside the batch");
        assert!(s.is_skipping(&tp(0)));
        assert_eq!(s.readable(&tp(0), 14), Some(SkippedRange { tp: tp(0), first: 10, last: 13 }));
        assert!(!s.is_skipping(&tp(0)));
        assert_eq!(s.readable(&tp(0), 15), None, "nothing was being skipped");
        // Two unreadable batches in a row: the first ends where the second begins.
        s.unreadable(&tp(1), 0);
        let (step, done) = s.unreadable(&tp(1), 5);
        assert_eq!(step, SkipStep::SeekTo(6));
        assert_eq!(done, Some(SkippedRange { tp: tp(1), first: 0, last: 4 }));
    }

    #[test]
    fn a_fault_is_described_with_its_place_and_logged_with_the_repeats_held_back() {
        let mut f = InputFaults::default();
        assert_eq!(f.describe(), None);
        assert_eq!(f.report(tp(2), "bad_compression", 17, "Decompression failed"), (None, true));
        assert_eq!(f.report(tp(2), "bad_compression", 17, "Decompression failed"), (None, false));
        f.report(("typo".into(), -1), "unknown_topic_or_partition", -1, "Subscribed topic not available");
        let text = f.describe().unwrap();
        assert!(text.contains("images/2 at offset 17: bad_compression (Decompression failed)"), "{text}");
        assert!(text.contains("typo: unknown_topic_or_partition"), "{text}");
        assert_eq!(f.report(tp(2), "not_implemented", 17, "codec"), (Some("bad_compression".into()), false));
        f.log_due("nothing past it is committed");
        assert_eq!(f.clear(&tp(2)).as_deref(), Some("not_implemented"));
        assert!(f.clear_topic("typo").is_some());
        assert!(f.is_empty());
    }
}
