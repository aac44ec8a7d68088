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
//! polling (heartbeats, rebalances and commit callbacks go on).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use super::headers::{self, Header};
use super::message::{item_id, Source};
use super::offsets::{Ack, OffsetTracker, TopicPartition};
use crate::telemetry::metrics::Metrics;

/// A consumed message on its way through the pipeline.
#[derive(Debug)]
pub struct Work {
    pub source: Source,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Every header, byte for byte ([`headers`]).
    pub headers: Vec<Header>,
    /// The assignment it was read under.
    pub generation: u64,
}

impl Work {
    pub fn ack(&self) -> Ack {
        Ack {
            tp: (self.source.topic.clone(), self.source.partition),
            offset: self.source.offset,
            generation: self.generation,
        }
    }

    pub fn id(&self) -> String {
        item_id(self.key.as_deref(), &self.source)
    }

    fn from_message(msg: &BorrowedMessage<'_>, generation: u64) -> Self {
        Work {
            source: Source {
                topic: msg.topic().to_string(),
                partition: msg.partition(),
                offset: msg.offset(),
                timestamp: msg.timestamp().to_millis(),
            },
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: headers::read(msg),
            generation,
        }
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
            metrics,
        }
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
        super::client_log::error("consumer", &error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        super::client_log::log("consumer", level, facility, message);
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
            // A revoked partition's lag is now another instance's to report.
            for (topic, partition) in &tps {
                self.metrics.remove_lag(topic, *partition);
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

/// A librdkafka queue that receives the results of this stage's asynchronous commits.
struct CommitResults(*mut rdsys::rd_kafka_queue_t);

// SAFETY: librdkafka queues are thread-safe; the pointer is only used through its API.
unsafe impl Send for CommitResults {}

impl Drop for CommitResults {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_queue_new, destroyed once, before the consumer
        // (ConsumerStage declares this field first, so it is dropped first).
        unsafe { rdsys::rd_kafka_queue_destroy(self.0) };
    }
}

/// The consumer and its back-pressure state.
pub struct ConsumerStage {
    /// Results of asynchronous commits (dropped before `consumer`, which it refers to).
    commit_results: CommitResults,
    pub consumer: BaseConsumer<ConsumerCtx>,
    /// Messages read that did not fit into the full work channel yet.
    stash: VecDeque<Work>,
    commit_every: Duration,
    last_commit: Instant,
    last_lag: Instant,
    pub paused_times: u64,
}

impl ConsumerStage {
    /// Creates the consumer, checks that the brokers answer, subscribes.
    pub fn connect(
        config: ClientConfig,
        ctx: ConsumerCtx,
        topics: &[String],
        commit_every: Duration,
    ) -> Result<Self, (String, bool)> {
        let consumer: BaseConsumer<ConsumerCtx> =
            config.create_with_context(ctx).map_err(|e| (format!("consumer: {e}"), false))?;
        consumer.fetch_metadata(None, Duration::from_secs(10)).map_err(|e| (e.to_string(), true))?;
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|e| (format!("subscribe: {e}"), false))?;
        // SAFETY: a new queue of this client, destroyed by CommitResults before the client.
        let queue = unsafe { rdsys::rd_kafka_queue_new(consumer.client().native_ptr()) };
        if queue.is_null() {
            return Err(("cannot create the commit result queue".into(), false));
        }
        Ok(Self {
            commit_results: CommitResults(queue),
            consumer,
            stash: VecDeque::new(),
            commit_every,
            last_commit: Instant::now(),
            last_lag: Instant::now(),
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
        if self.last_lag.elapsed() >= Duration::from_secs(5) {
            self.update_lag();
            self.last_lag = Instant::now();
        }
        let in_flight = self.in_flight();
        let paused = self.ctx().paused.load(Ordering::SeqCst);
        if !paused && (in_flight >= limit || !self.stash.is_empty()) {
            self.set_paused(true);
            self.paused_times += 1;
            tracing::debug!(in_flight, "back-pressure: consumer paused");
        } else if paused && in_flight <= limit * 3 / 4 && self.stash.is_empty() {
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
        let Some(polled) = self.consumer.poll(timeout) else { return Some(0) };
        let msg = match polled {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("consume error: {e}");
                return Some(0);
            }
        };
        let tp = (msg.topic().to_string(), msg.partition());
        let generation = self.ctx().tracker.lock().ok().and_then(|mut t| t.dispatch(&tp, msg.offset()));
        let Some(generation) = generation else { return Some(0) };
        self.ctx().metrics.record_consumed(msg.topic());
        let w = Work::from_message(&msg, generation);
        drop(msg);
        match work.try_send(w) {
            Ok(()) => Some(1),
            Err(TrySendError::Full(w)) => {
                self.stash.push_back(w);
                Some(1)
            }
            Err(TrySendError::Disconnected(_)) => None,
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
        if list.is_null() {
            return;
        }
        let Ok(mut tracker) = self.ctx().tracker.lock() else { return };
        let elements = std::slice::from_raw_parts((*list).elems, usize::try_from((*list).cnt).unwrap_or(0));
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
    pub fn final_commit(&self, within: Duration) -> bool {
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
            let _ = self.consumer.poll(Duration::from_millis(20));
            self.serve_commit_results();
        }
    }

    fn update_lag(&self) {
        let ctx = self.ctx();
        let assigned = ctx.tracker.lock().map(|t| t.assigned()).unwrap_or_default();
        let mut reachable = assigned.is_empty();
        for tp in &assigned {
            match self.consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_millis(500)) {
                Ok((_, high)) => {
                    reachable = true;
                    // Nothing read from this partition since it was assigned: the group's
                    // committed offset is the reference (a stuck pipeline must show lag).
                    let point = ctx
                        .tracker
                        .lock()
                        .ok()
                        .and_then(|t| t.commit_point(tp))
                        .or_else(|| self.group_committed(tp));
                    if let Some(point) = point {
                        ctx.metrics.set_lag(&tp.0, tp.1, (high - point).max(0));
                    }
                }
                Err(e) => tracing::debug!("watermarks of {}/{}: {e}", tp.0, tp.1),
            }
        }
        if assigned.is_empty() {
            reachable = self.consumer.fetch_metadata(None, Duration::from_millis(500)).is_ok();
        }
        ctx.broker_up.store(reachable, Ordering::Relaxed);
        ctx.metrics.broker_up.set(i64::from(reachable));
    }

    /// The group's committed offset of one partition, if it has one.
    fn group_committed(&self, tp: &TopicPartition) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        let committed = self.consumer.committed_offsets(tpl, Duration::from_millis(500)).ok()?;
        match committed.find_partition(&tp.0, tp.1)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }
}
