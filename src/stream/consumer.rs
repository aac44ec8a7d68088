//! The consumer stage: group membership, rebalances, pause and resume under
//! back-pressure, commits and lag. It runs on the daemon's main thread and owns the
//! [`OffsetTracker`]'s view of what is done.
//!
//! Rebalances (cooperative-sticky, so only moved partitions are revoked): before a
//! partition is revoked, the acknowledgements received so far are applied and its commit
//! point is committed synchronously; work of that partition still in the pipeline is
//! abandoned (its late acknowledgements only leave the in-flight count) and the new owner
//! re-reads from the commit point: at-least-once, never a gap. Partitions assigned while
//! the consumer is paused are paused at once too.
//!
//! Commits: periodic and asynchronous; a point counts as committed only when the broker
//! confirmed it, so a failed commit is simply due again next time. librdkafka reports the
//! result of a manual asynchronous commit only to a queue given with the commit (or a C
//! callback rust-rdkafka does not install: its `commit_callback` never fires for manual
//! commits), so the stage commits with `rd_kafka_commit_queue` onto a queue of its own
//! and reads the results from it at every tick, without blocking.
//!
//! The consumer thread never blocks on the pipeline: a message that does not fit into
//! the full work channel waits in a small stash while the consumer pauses and keeps
//! polling (heartbeats, rebalances and commit callbacks go on). Nor does it block on the
//! brokers: lag and broker reachability come from librdkafka's statistics (every 5 s,
//! no request of its own), so hundreds of partitions cost nothing on this thread.
//!
//! Events are read through [`super::input`], which keeps the coordinates of a partition's
//! error: a partition that cannot be read past an offset is *blocked* (metric, `/readyz`,
//! a log line a minute) and handled by `kafka.on_unreadable` (block or skip).
//!
//! Transactions: a partition written by a transactional producer ends with a commit
//! marker, a record the application never sees. With nothing pending, the commit point
//! follows librdkafka's position for the partition (past the markers it read), so such a
//! partition's lag goes back to 0 and a healthy daemon does not look stuck.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use super::input::{self, FaultClass, InputFaults, PartitionError, Polled, SkipStep, Skipper};
use super::offsets::{Ack, OffsetTracker, TopicPartition};
use crate::config::OnUnreadable;
use crate::kafka::message::{Record, Source};
use crate::telemetry::metrics::Metrics;

/// Offsets skipped unread (`kafka.on_unreadable = "skip"`): the work item standing for
/// them carries no payload and becomes one dead letter naming the range.
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The last offset of the range (`source.offset` is the first).
    pub last: i64,
    /// The consumer's error code (`bad_compression`, ...).
    pub code: String,
    pub reason: String,
}

/// A consumed message on its way through the pipeline.
#[derive(Debug)]
pub struct Work {
    /// The message as consumed (dead letters carry it unchanged).
    pub record: Record,
    /// The assignment it was read under.
    pub generation: u64,
    /// Set when this item stands for offsets that could not be read (skip policy).
    pub skipped: Option<Skipped>,
    /// Its bytes in the in-flight budget, given back when the item is dropped.
    pub held: super::budget::Held,
    /// What its envelope and reference gave (set by the resolve stage).
    pub resolved: Resolved,
}

/// A message's image as the resolve stage found it: from the value's envelope and, for
/// a reference, from its store. The payload itself stays as it came (dead letters carry
/// the original message).
#[derive(Debug, Default)]
pub struct Resolved {
    /// The image's bytes when they are not the payload (base64 in JSON, a fetched object).
    pub image: Option<Vec<u8>>,
    pub uri: Option<String>,
    pub id: Option<String>,
    pub input: Option<serde_json::Map<String, serde_json::Value>>,
    /// The window audit's source from the JSON event (`audit.group_by = "json:..."`).
    pub group: Option<String>,
    /// The fetched bytes in the in-flight budget.
    pub held: super::budget::Held,
}

impl Resolved {
    /// Keeps `image` as the bytes to decode, held in the in-flight budget.
    pub fn set_image(&mut self, image: Vec<u8>, payloads: &Arc<super::budget::PayloadBytes>) {
        self.held = payloads.hold(image.len() as u64);
        self.image = Some(image);
    }
}

impl Work {
    pub fn ack(&self) -> Ack {
        Ack {
            tp: (self.record.source.topic.clone(), self.record.source.partition),
            offset: self.record.source.offset,
            generation: self.generation,
        }
    }

    pub fn id(&self) -> String {
        match &self.resolved.id {
            Some(id) => id.clone(),
            None => self.record.id(),
        }
    }

    /// The encoded image: the resolved bytes, else the payload.
    pub fn image_bytes(&self) -> &[u8] {
        self.resolved.image.as_deref().unwrap_or(&self.record.value)
    }

    fn from_raw(record: Record, generation: u64) -> Self {
        Work {
            held: super::budget::Held::none(),
            record,
            generation,
            skipped: None,
            resolved: Resolved::default(),
        }
    }

    /// Bytes this item holds (what `pipeline.in_flight_bytes` counts before decoding).
    pub fn byte_len(&self) -> usize {
        self.record.byte_len()
    }
}

/// State shared between the consumer's callbacks (which librdkafka runs on the consumer
/// thread, inside `poll`) and the stage.
pub struct ConsumerCtx {
    /// What has been dispatched, acknowledged and committed, per partition.
    pub tracker: Arc<Mutex<OffsetTracker>>,
    /// Acknowledgements from the producer stage (and releases of abandoned work).
    acks: Mutex<Receiver<Ack>>,
    /// Whether the consumer is paused by back-pressure (new assignments follow it).
    paused: AtomicBool,
    /// False after librdkafka reported that every broker is down, true after a
    /// successful metadata or watermark request.
    pub broker_up: AtomicBool,
    /// Bumped on every revoke, so the retry scheduler can drop revoked records.
    pub revocations: Arc<AtomicU64>,
    /// Assignments received from the group (an empty one counts: the group answered).
    pub assignments: AtomicU64,
    /// Inputs blocked by a fault that does not go away by itself (also written by the
    /// topic watcher for topics that do not exist).
    pub input_faults: Arc<Mutex<InputFaults>>,
    /// Partitions whose unreadable range is being stepped over (skip policy).
    skipper: Mutex<Skipper>,
    /// librdkafka's last client-wide error (a TLS handshake that fails, a refused
    /// connection): what `/readyz` adds when the brokers do not answer.
    pub last_client_error: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

impl ConsumerCtx {
    pub fn new(tracker: Arc<Mutex<OffsetTracker>>, acks: Receiver<Ack>, metrics: Arc<Metrics>) -> Self {
        Self {
            tracker,
            acks: Mutex::new(acks),
            paused: AtomicBool::new(false),
            broker_up: AtomicBool::new(true),
            revocations: Arc::new(AtomicU64::new(0)),
            assignments: AtomicU64::new(0),
            input_faults: Arc::new(Mutex::new(InputFaults::default())),
            skipper: Mutex::new(Skipper::default()),
            last_client_error: Mutex::new(None),
            metrics,
        }
    }

    /// Clears a partition's input fault (read past it, or revoked).
    fn clear_fault(&self, tp: &TopicPartition) {
        let cleared = self.input_faults.lock().ok().and_then(|mut f| f.clear(tp));
        if let Some(code) = cleared {
            self.metrics.set_input_blocked(&tp.0, Some(tp.1), &code, false);
            tracing::info!(topic = %tp.0, partition = tp.1, "input partition readable again ({code} cleared)");
        }
    }

    /// Records a blocking fault of a partition.
    fn report_fault(&self, e: &PartitionError, code: &str) {
        let tp = (e.topic.clone(), e.partition);
        let Ok(mut faults) = self.input_faults.lock() else { return };
        let (old_code, _) = faults.report(tp, code, e.offset, &e.reason);
        if let Some(old) = old_code {
            self.metrics.set_input_blocked(&e.topic, Some(e.partition), &old, false);
        }
        self.metrics.set_input_blocked(&e.topic, Some(e.partition), code, true);
    }

    /// Applies the acknowledgements received so far.
    pub fn drain_acks(&self) {
        let (Ok(rx), Ok(mut tracker)) = (self.acks.lock(), self.tracker.lock()) else { return };
        while let Ok(a) = rx.try_recv() {
            tracker.ack(&a.tp, a.offset, a.generation);
        }
    }

    fn mark_committed(&self, offsets: &TopicPartitionList) {
        let Ok(mut tracker) = self.tracker.lock() else { return };
        for e in offsets.elements() {
            if let Offset::Offset(o) = e.offset() {
                tracker.mark_committed(&(e.topic().to_string(), e.partition()), o);
            }
        }
    }
}

impl ClientContext for ConsumerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)) {
            self.broker_up.store(false, Ordering::Relaxed);
            self.metrics.broker_up.set(0);
        }
        if let Ok(mut last) = self.last_client_error.lock() {
            *last = Some(crate::kafka::client_log::problem_of(reason).to_string());
        }
        crate::kafka::client_log::error("consumer", &error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::client_log::log("consumer", level, facility, message);
    }
}

fn offsets_list(commits: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in commits {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    tpl
}

fn tps_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.drain_acks();
            let tps = tps_of(tpl);
            let commits = self.tracker.lock().map(|t| t.commits_for(&tps)).unwrap_or_default();
            tracing::info!(partitions = tps.len(), "partitions revoked; committing what is done");
            if !commits.is_empty() {
                let list = offsets_list(&commits);
                match consumer.commit(&list, CommitMode::Sync) {
                    Ok(()) => self.mark_committed(&list),
                    Err(e) => {
                        self.metrics.commit_errors.inc();
                        tracing::warn!(
                            "commit on revoke failed (the new owner re-reads from the last commit): {e}"
                        );
                    }
                }
            }
            // A revoked partition's lag and faults are now another instance's to report.
            for tp in &tps {
                self.metrics.remove_lag(&tp.0, tp.1);
                self.clear_fault(tp);
                if let Ok(mut s) = self.skipper.lock() {
                    s.forget(tp);
                }
            }
            if let Ok(mut t) = self.tracker.lock() {
                t.revoke(tps);
            }
            self.revocations.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let tps = tps_of(tpl);
            tracing::info!(partitions = ?tps, "partitions assigned");
            let held = self.tracker.lock().map(|mut t| {
                t.assign(tps);
                t.assigned().len()
            });
            if held.is_ok_and(|n| n == 0) {
                tracing::info!(
                    "the group gave this daemon no partitions (as many daemons as partitions \
                     already?); it stays ready and idle until a rebalance hands it some"
                );
            }
            self.assignments.fetch_add(1, Ordering::SeqCst);
            if self.paused.load(Ordering::SeqCst) {
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!("pausing newly assigned partitions: {e}");
                }
            }
        }
    }
}

/// A reference to a librdkafka queue of the consumer's client (the queue for the results
/// of this stage's asynchronous commits, or the consumer queue polled for events),
/// released when dropped.
struct OwnedQueue(*mut rdsys::rd_kafka_queue_t);

// SAFETY: librdkafka queues are thread-safe; the pointer is only used through its API.
unsafe impl Send for OwnedQueue {}

impl Drop for OwnedQueue {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_queue_new or _get_consumer, destroyed once, before
        // the consumer (ConsumerStage declares these fields first, so they drop first).
        unsafe { rdsys::rd_kafka_queue_destroy(self.0) };
    }
}

/// The consumer and its back-pressure state.
pub struct ConsumerStage {
    /// Results of asynchronous commits (dropped before `consumer`, which it refers to).
    commit_results: OwnedQueue,
    /// A reference to the consumer queue, polled through [`input::poll`] (dropped before
    /// `consumer` too).
    events: OwnedQueue,
    pub consumer: BaseConsumer<ConsumerCtx>,
    /// What to do with a batch that cannot be read (`kafka.on_unreadable`).
    on_unreadable: OnUnreadable,
    /// Payload bytes of the items in flight, and where the consumer pauses.
    pub payloads: Arc<super::budget::PayloadBytes>,
    payload_limit: u64,
    /// Messages read that did not fit into the full work channel yet.
    stash: VecDeque<Work>,
    commit_every: Duration,
    last_commit: Instant,
    last_fault_log: Instant,
    pub paused_times: u64,
}

/// What librdkafka's statistics say about one assigned partition.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartitionStats {
    /// The end of what a read_committed consumer can read (last stable offset; the high
    /// watermark when there are no open transactions).
    pub end: i64,
    /// The group's committed offset as librdkafka knows it (-1001: none).
    pub committed: i64,
    /// The application's position: one past the last record handed over, past any
    /// transaction markers after it (-1001: none yet).
    pub app_offset: i64,
}

/// Per-partition figures from one statistics JSON document (librdkafka STATISTICS.md):
/// `topics.T.partitions.P.{ls_offset,hi_offset,committed_offset,app_offset}`; the
/// pseudo-partition -1 is skipped. Also whether any broker is up.
pub fn parse_stats(json: &[u8]) -> Option<(BTreeMap<TopicPartition, PartitionStats>, bool)> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    let mut out = BTreeMap::new();
    for (topic, t) in v.get("topics")?.as_object()? {
        let Some(parts) = t.get("partitions").and_then(|p| p.as_object()) else { continue };
        for (p, s) in parts {
            let Ok(partition) = p.parse::<i32>() else { continue };
            if partition < 0 {
                continue;
            }
            let num = |k: &str| s.get(k).and_then(serde_json::Value::as_i64).unwrap_or(-1001);
            let hi = num("hi_offset");
            let ls = num("ls_offset");
            let end = if ls >= 0 { ls } else { hi };
            out.insert(
                (topic.clone(), partition),
                PartitionStats { end, committed: num("committed_offset"), app_offset: num("app_offset") },
            );
        }
    }
    let up = v.get("brokers").and_then(|b| b.as_object()).is_some_and(|b| {
        b.values().any(|x| {
            x.get("state").and_then(|s| s.as_str()) == Some("UP")
                && x.get("nodeid").and_then(serde_json::Value::as_i64).is_some_and(|n| n >= 0)
        })
    });
    Some((out, up))
}

impl ConsumerStage {
    /// Creates the consumer, checks that the brokers answer, subscribes.
    pub fn connect(
        config: ClientConfig,
        ctx: ConsumerCtx,
        topics: &[String],
        commit_every: Duration,
        on_unreadable: OnUnreadable,
        payload_limit: u64,
    ) -> Result<Self, (String, bool)> {
        let consumer: BaseConsumer<ConsumerCtx> =
            config.create_with_context(ctx).map_err(|e| (format!("consumer: {e}"), false))?;
        consumer.fetch_metadata(None, Duration::from_secs(10)).map_err(|e| (e.to_string(), true))?;
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| (format!("subscribe: {e}"), false))?;
        // SAFETY: a new queue of this client, destroyed by OwnedQueue before the client.
        let queue = unsafe { rdsys::rd_kafka_queue_new(consumer.client().native_ptr()) };
        if queue.is_null() {
            return Err(("cannot create the commit result queue".into(), false));
        }
        // SAFETY: a new reference to this client's consumer queue, destroyed before it.
        let events = unsafe { rdsys::rd_kafka_queue_get_consumer(consumer.client().native_ptr()) };
        if events.is_null() {
            return Err(("the consumer has no consumer queue".into(), false));
        }
        Ok(Self {
            commit_results: OwnedQueue(queue),
            events: OwnedQueue(events),
            consumer,
            on_unreadable,
            payloads: Arc::default(),
            payload_limit,
            stash: VecDeque::new(),
            commit_every,
            last_commit: Instant::now(),
            last_fault_log: Instant::now(),
            paused_times: 0,
        })
    }

    pub fn ctx(&self) -> &ConsumerCtx {
        self.consumer.context()
    }

    /// Messages between consumption and acknowledged output (or release), the stash
    /// included.
    pub fn in_flight(&self) -> usize {
        self.ctx().tracker.lock().map(|t| t.in_flight()).unwrap_or(0)
    }

    /// Housekeeping between polls: acknowledgements, due commits, lag, back-pressure.
    pub fn tick(&mut self, limit: usize) -> usize {
        self.ctx().drain_acks();
        self.serve_commit_results();
        if self.last_commit.elapsed() >= self.commit_every {
            self.commit_due();
            self.last_commit = Instant::now();
        }
        if self.last_fault_log.elapsed() >= Duration::from_secs(1) {
            self.last_fault_log = Instant::now();
            let policy = match self.on_unreadable {
                OnUnreadable::Block => "nothing past it is committed (kafka.on_unreadable = \"block\")",
                OnUnreadable::Skip => {
                    "unreadable batches are skipped and dead-lettered (kafka.on_unreadable = \"skip\")"
                }
            };
            if let Ok(mut f) = self.ctx().input_faults.lock() {
                f.log_due(policy);
            }
        }
        let in_flight = self.in_flight();
        let paused = self.ctx().paused.load(Ordering::SeqCst);
        let bytes = self.payloads.held();
        if !paused && (in_flight >= limit || bytes >= self.payload_limit || !self.stash.is_empty()) {
            self.set_paused(true);
            self.paused_times += 1;
            tracing::debug!(in_flight, "back-pressure: consumer paused");
        } else if paused
            && in_flight <= limit * 3 / 4
            && bytes <= self.payload_limit / 4 * 3
            && self.stash.is_empty()
        {
            self.set_paused(false);
        }
        in_flight
    }

    pub fn set_paused(&self, paused: bool) {
        self.ctx().paused.store(paused, Ordering::SeqCst);
        if let Ok(assignment) = self.consumer.assignment() {
            let result =
                if paused { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
            if let Err(e) = result {
                tracing::warn!("pause/resume: {e}");
            }
        }
        self.ctx().metrics.consumer_paused.set(i64::from(paused));
    }

    /// Hands stashed messages on, polls once and hands what it read to the pipeline,
    /// without ever blocking on it. Returns how many messages were newly read (0 or 1;
    /// a stashed message was counted when it was read), or None when the pipeline is gone.
    pub fn poll_into(&mut self, work: &SyncSender<Work>) -> Option<usize> {
        while let Some(w) = self.stash.pop_front() {
            match work.try_send(w) {
                Ok(()) => {}
                Err(TrySendError::Full(w)) => {
                    self.stash.push_front(w);
                    break;
                }
                Err(TrySendError::Disconnected(_)) => return None,
            }
        }
        let timeout = Duration::from_millis(if self.ctx().paused.load(Ordering::SeqCst) { 20 } else { 50 });
        let w = match self.poll_event(timeout) {
            Polled::Nothing => return Some(0),
            Polled::PartitionError(e) => match self.partition_error(e) {
                Some(w) => w,
                None => return Some(0),
            },
            Polled::Message(msg) => {
                let tp = (msg.source.topic.clone(), msg.source.partition);
                let offset = msg.source.offset;
                let skipped = self.ctx().skipper.lock().ok().and_then(|mut s| s.readable(&tp, offset));
                if let Some(range) = skipped {
                    // The skipped range goes first, so its dead letter precedes the record;
                    // it takes the fault's code and reason, so before the fault is cleared.
                    if let Some(w) = self.skipped_work(range) {
                        self.hand_on(work, w)?;
                    }
                }
                self.ctx().clear_fault(&tp);
                let generation = self.ctx().tracker.lock().ok().and_then(|mut t| t.dispatch(&tp, offset));
                let Some(generation) = generation else { return Some(0) };
                self.ctx().metrics.record_consumed(&tp.0);
                let mut w = Work::from_raw(msg, generation);
                w.held = self.payloads.hold(w.byte_len() as u64);
                w
            }
        };
        self.hand_on(work, w)?;
        Some(1)
    }

    /// Serves the consumer queue once: callbacks, statistics, and (returned) a message or
    /// a partition's error.
    fn poll_event(&mut self, timeout: Duration) -> Polled {
        self.poll_event_with(timeout, true)
    }

    /// `follow_position`: whether idle partitions' commit points may follow the position
    /// (not while draining: messages polled then are dropped undispatched).
    fn poll_event_with(&mut self, timeout: Duration, follow_position: bool) -> Polled {
        let mut stats = None;
        // SAFETY: `events` is a reference to this consumer's queue, alive as long as self.
        let polled = unsafe {
            input::poll(&self.consumer, self.events.0, timeout, &mut |json| stats = parse_stats(json))
        };
        if let Some((partitions, up)) = stats {
            self.apply_stats(partitions, up, follow_position);
        }
        polled
    }

    /// Serves callbacks for up to `timeout` without taking messages (partitions are paused
    /// during a drain; anything still prefetched is not dispatched, so it is re-read).
    pub fn serve_events(&mut self, timeout: Duration) {
        let _ = self.poll_event_with(timeout, false);
    }

    fn hand_on(&mut self, work: &SyncSender<Work>, w: Work) -> Option<()> {
        match work.try_send(w) {
            Ok(()) => Some(()),
            Err(TrySendError::Full(w)) => {
                self.stash.push_back(w);
                Some(())
            }
            Err(TrySendError::Disconnected(_)) => None,
        }
    }

    /// Applies the policy to a partition's error; returns the work item of a skipped
    /// range when one is finished.
    fn partition_error(&mut self, e: PartitionError) -> Option<Work> {
        let code = input::code_label(e.code);
        let ctx = self.ctx();
        ctx.metrics.record_input_error(&e.topic, &code);
        let class = input::classify(e.code);
        if class == FaultClass::Transient || e.partition < 0 {
            // librdkafka retries these by itself; said once per problem.
            crate::kafka::client_log::error(
                "consumer",
                &rdkafka::error::KafkaError::MessageConsumption(e.code),
                &format!("{}/{} at offset {}: {}", e.topic, e.partition, e.offset, e.reason),
            );
            return None;
        }
        ctx.report_fault(&e, &code);
        if class != FaultClass::UnreadableData || self.on_unreadable != OnUnreadable::Skip || e.offset < 0 {
            return None;
        }
        let tp = (e.topic.clone(), e.partition);
        let assigned = ctx.tracker.lock().is_ok_and(|t| t.is_assigned(&tp));
        if !assigned {
            return None;
        }
        let (SkipStep::SeekTo(next), finished) = ctx.skipper.lock().ok()?.unreadable(&tp, e.offset);
        if let Err(err) = self.consumer.seek(&tp.0, tp.1, Offset::Offset(next), Duration::ZERO) {
            tracing::warn!(topic = %tp.0, partition = tp.1, "seeking past an unreadable batch to {next}: {err}");
        }
        finished.and_then(|range| self.skipped_work_with(range, &code, &e.reason))
    }

    /// The work item for a finished skipped range (its code and reason are the fault's).
    fn skipped_work(&mut self, range: input::SkippedRange) -> Option<Work> {
        let (code, reason) = self
            .ctx()
            .input_faults
            .lock()
            .ok()
            .and_then(|f| f.fault_of(&range.tp))
            .unwrap_or_else(|| ("unreadable".to_string(), "the batch could not be read".to_string()));
        self.skipped_work_with(range, &code, &reason)
    }

    fn skipped_work_with(&mut self, range: input::SkippedRange, code: &str, reason: &str) -> Option<Work> {
        let ctx = self.ctx();
        let count = u64::try_from(range.last - range.first + 1).unwrap_or(0);
        ctx.metrics.record_skipped_offsets(&range.tp.0, code, count);
        let generation =
            ctx.tracker.lock().ok().and_then(|mut t| t.dispatch_range(&range.tp, range.first, range.last))?;
        tracing::warn!(
            topic = %range.tp.0,
            partition = range.tp.1,
            first = range.first,
            last = range.last,
            code,
            "skipped {count} unreadable offset(s) (kafka.on_unreadable = \"skip\"); a dead letter names them"
        );
        Some(Work {
            record: Record {
                source: Source {
                    topic: range.tp.0.clone(),
                    partition: range.tp.1,
                    offset: range.first,
                    timestamp: None,
                },
                key: None,
                value: Vec::new(),
                headers: Vec::new(),
            },
            generation,
            skipped: Some(Skipped { last: range.last, code: code.to_string(), reason: reason.to_string() }),
            held: super::budget::Held::none(),
            resolved: Resolved::default(),
        })
    }

    /// Lag and reachability from librdkafka's statistics; with nothing pending, the commit
    /// point follows the application position (past transaction markers).
    fn apply_stats(&mut self, partitions: BTreeMap<TopicPartition, PartitionStats>, up: bool, follow: bool) {
        let ctx = self.ctx();
        let skipping: Vec<TopicPartition> = ctx
            .skipper
            .lock()
            .map(|s| partitions.keys().filter(|tp| s.is_skipping(tp)).cloned().collect())
            .unwrap_or_default();
        ctx.broker_up.store(up, Ordering::Relaxed);
        ctx.metrics.broker_up.set(i64::from(up));
        let Ok(mut tracker) = ctx.tracker.lock() else { return };
        for (tp, s) in &partitions {
            if !tracker.is_assigned(tp) {
                continue;
            }
            // Every record before the position was dispatched (this thread dispatches what
            // it polls before it polls again), unless a skip is seeking through a range.
            if follow && s.app_offset >= 0 && !skipping.contains(tp) {
                tracker.advance_idle(tp, s.app_offset);
            }
            // Nothing read from this partition since it was assigned: the group's
            // committed offset is the reference (a stuck pipeline must show lag).
            let point = tracker.commit_point(tp).or((s.committed >= 0).then_some(s.committed));
            if let (Some(point), true) = (point, s.end >= 0) {
                ctx.metrics.set_lag(&tp.0, tp.1, (s.end - point).max(0));
            }
        }
    }

    /// Commits the points that moved, asynchronously; they are marked committed when the
    /// result arrives ([`Self::serve_commit_results`]).
    pub fn commit_due(&self) {
        let commits = self.ctx().tracker.lock().map(|t| t.due_commits()).unwrap_or_default();
        if commits.is_empty() {
            return;
        }
        let list = offsets_list(&commits);
        // SAFETY: the client, the list and the queue are alive for the call; librdkafka
        // copies the list.
        let err = unsafe {
            rdsys::rd_kafka_commit_queue(
                self.consumer.client().native_ptr(),
                list.ptr(),
                self.commit_results.0,
                None,
                std::ptr::null_mut(),
            )
        };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            self.ctx().metrics.commit_errors.inc();
            tracing::warn!(
                "commit not sent (tried again at the next interval): {}",
                KafkaError::ConsumerCommit(err.into())
            );
        }
    }

    /// Applies the results of asynchronous commits that arrived, without waiting.
    fn serve_commit_results(&self) {
        loop {
            // SAFETY: the queue is alive; a returned event is destroyed below.
            let event = unsafe { rdsys::rd_kafka_queue_poll(self.commit_results.0, 0) };
            if event.is_null() {
                return;
            }
            // SAFETY: `event` is a valid event until destroyed; the list it returns is owned
            // by the event and read before that.
            unsafe {
                if rdsys::rd_kafka_event_type(event) == rdsys::RD_KAFKA_EVENT_OFFSET_COMMIT {
                    let err = rdsys::rd_kafka_event_error(event);
                    let list = rdsys::rd_kafka_event_topic_partition_list(event);
                    self.apply_commit_result(err, list);
                }
                rdsys::rd_kafka_event_destroy(event);
            }
        }
    }

    /// # Safety
    /// `list` is null or a valid topic-partition list.
    unsafe fn apply_commit_result(
        &self,
        err: rdsys::rd_kafka_resp_err_t,
        list: *const rdsys::rd_kafka_topic_partition_list_t,
    ) {
        let ok = rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
        let metrics = &self.ctx().metrics;
        if err != ok {
            metrics.commit_errors.inc();
            tracing::warn!(
                "commit failed (tried again at the next interval): {}",
                KafkaError::ConsumerCommit(err.into())
            );
        }
        let Ok(mut tracker) = self.ctx().tracker.lock() else { return };
        let elements = input::list_elements(list);
        for e in elements {
            if e.err == ok && e.offset >= 0 && !e.topic.is_null() {
                let topic = std::ffi::CStr::from_ptr(e.topic).to_string_lossy().into_owned();
                tracker.mark_committed(&(topic, e.partition), e.offset);
            } else if e.err != ok && err == ok {
                metrics.commit_errors.inc();
            }
        }
    }

    /// The last commit of a shutdown: what is acknowledged, waiting at most `within`.
    /// Returns whether every due point was committed.
    pub fn final_commit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        self.ctx().drain_acks();
        self.commit_due();
        loop {
            let due = self.ctx().tracker.lock().map(|t| t.due_commits().len()).unwrap_or(0);
            if due == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    partitions = due,
                    "final commit not confirmed in time; those inputs will be re-read"
                );
                return false;
            }
            // Keeps the consumer served; partitions are paused, so nothing new arrives.
            let _ = self.poll_event_with(Duration::from_millis(20), false);
            self.serve_commit_results();
        }
    }
}
