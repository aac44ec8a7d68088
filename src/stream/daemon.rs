//! The daemon: Kafka in, verdicts and dead letters out, nothing lost.
//!
//! ```text
//! consumer thread (BaseConsumer, group, cooperative-sticky; owns the offset tracker)
//!   --work (bounded)--> decode workers (N threads: decode, preprocess, seed)
//!   --decoded (bounded)--> scorer thread (owns the bundle and the device; batches by
//!      size or wait, encodes, reconstructs, judges against the thresholds in force)
//!   --> producer (idempotent; verdicts to the output topic, dead letters to theirs)
//!   --acks--> consumer thread: a partition's commit point moves only past messages
//!      whose output the broker acknowledged (or that had nothing to publish)
//! ```
//!
//! Rebalances (cooperative-sticky, so only moved partitions are revoked): before a
//! partition is revoked, the acknowledgements received so far are applied and its commit
//! point is committed synchronously; its later acknowledgements are ignored (the new
//! owner re-reads from the commit point: at-least-once, never a gap).
//!
//! Back-pressure: when the messages in flight reach `pipeline.in_flight_limit` the
//! consumer pauses its partitions and resumes at three quarters of it; every channel is
//! bounded. Delivery failures are retried with exponential backoff; a message whose
//! output was never acknowledged is never committed.
//!
//! Shutdown (SIGTERM/SIGINT or the control flag): stop fetching, let the pipeline
//! drain, wait for acknowledgements until `shutdown.drain_deadline_ms`, commit
//! synchronously, exit. SIGHUP: reload thresholds from the config file (a bad file is
//! rejected, the old thresholds stay).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tch::Tensor;

use super::kafka::{consumer_config, producer_config};
use super::message::{item_id, ModelRef, Source, VerdictRecord};
use super::offsets::{OffsetTracker, TopicPartition};
use super::thresholds::Thresholds;
use crate::config::{Config, ConfigError, Publish};
use crate::data::{decode, Preprocess};
use crate::eval::calibration::Calibration;
use crate::model::bundle::Bundle;
use crate::model::features::FeatureExtractor;
use crate::model::score::{content_seed, ScoreKind, ScoreSettings};
use crate::telemetry::http::Health;
use crate::telemetry::metrics::Metrics;
use crate::verdict::judge;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot load the model: {0}")]
    Model(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("brokers {brokers} unreachable at start: {reason}")]
    Unreachable { brokers: String, reason: String },
    #[error("metrics listener {addr}: {reason}")]
    Listen { addr: String, reason: String },
}

/// How the outside world steers a running daemon (signal handlers or tests set these).
#[derive(Debug, Clone, Default)]
pub struct Control {
    pub shutdown: Arc<AtomicBool>,
    pub reload: Arc<AtomicBool>,
    /// Test hook: extra time the scorer spends per batch (simulates a slow device).
    pub slow_scorer: Option<Duration>,
    /// Where the HTTP listener was bound (useful with port 0).
    pub http_addr: Arc<Mutex<Option<std::net::SocketAddr>>>,
}

/// Counts of a daemon run, returned when it stops.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub consumed: u64,
    pub verdicts: u64,
    pub flagged: u64,
    pub dead_letters: u64,
    pub published: u64,
    pub paused_times: u64,
    pub max_in_flight: usize,
    pub drained: bool,
}

#[derive(Default)]
struct Counters {
    consumed: AtomicU64,
    verdicts: AtomicU64,
    flagged: AtomicU64,
    dead_letters: AtomicU64,
    published: AtomicU64,
}

#[derive(Debug, Clone)]
struct Ack {
    tp: TopicPartition,
    offset: i64,
    generation: u64,
}

/// A consumed message on its way through the pipeline.
struct Work {
    source: Source,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    generation: u64,
}

impl Work {
    fn ack(&self) -> Ack {
        Ack {
            tp: (self.source.topic.clone(), self.source.partition),
            offset: self.source.offset,
            generation: self.generation,
        }
    }
    fn id(&self) -> String {
        item_id(self.key.as_deref(), &self.source)
    }
}

struct Decoded {
    work: Work,
    image: Tensor,
    seed: u64,
}

/// What a delivery report needs to acknowledge or retry.
struct Delivery {
    ack: Ack,
    topic: String,
    attempt: u32,
}

struct Retry {
    delivery: Delivery,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

struct ProducerCtx {
    acks: Mutex<Sender<Ack>>,
    retries: Mutex<Sender<Retry>>,
    metrics: Arc<Metrics>,
    counters: Arc<Counters>,
}

impl ClientContext for ProducerCtx {}

fn owned_headers(h: Option<&rdkafka::message::BorrowedHeaders>) -> Vec<(String, Option<Vec<u8>>)> {
    h.map(|h| h.iter().map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec))).collect())
        .unwrap_or_default()
}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = Box<Delivery>;
    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<Delivery>) {
        match result {
            Ok(_) => {
                self.counters.published.fetch_add(1, Ordering::Relaxed);
                if let Ok(tx) = self.acks.lock() {
                    let _ = tx.send(delivery.ack.clone());
                }
            }
            Err((err, msg)) => self.retry_later(
                Retry {
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: owned_headers(msg.headers()),
                    delivery: *delivery,
                },
                err,
            ),
        }
    }
}

impl ProducerCtx {
    /// Counts a failed or refused record and hands it to the retry loop (backoff by
    /// attempt). It stays unacknowledged, so its offset is not committed meanwhile.
    fn retry_later(&self, mut retry: Retry, err: &KafkaError) {
        let topic = retry.delivery.topic.as_str();
        self.metrics.delivery_errors.with_label_values(&[topic]).inc();
        tracing::warn!(%topic, attempt = retry.delivery.attempt, "delivery failed, will retry: {err}");
        retry.delivery.attempt += 1;
        if let Ok(tx) = self.retries.lock() {
            let _ = tx.send(retry);
        }
    }
}

type KafkaProducer = ThreadedProducer<ProducerCtx>;

/// Hands a record to the producer, waiting while its queue is full.
fn produce(producer: &KafkaProducer, r: Retry, shutdown_hard: &AtomicBool) {
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
    for (k, v) in &r.headers {
        headers = headers.insert(Header { key: k, value: v.as_deref() });
    }
    let topic = r.delivery.topic.clone();
    let mut record =
        BaseRecord::with_opaque_to(&topic, Box::new(r.delivery)).payload(&r.payload).headers(headers);
    if let Some(k) = &r.key {
        record = record.key(k);
    }
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                if shutdown_hard.load(Ordering::Relaxed) {
                    return; // not acknowledged, so not committed: re-read after restart
                }
                record = back;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((e, back)) => {
                // librdkafka refuses at once what it knows will fail (e.g. a topic error
                // cached from an earlier delivery): retried like a failed delivery.
                let delivery = *back.delivery_opaque;
                let retry = Retry { key: r.key, payload: r.payload, headers: r.headers, delivery };
                producer.context().retry_later(retry, &e);
                return;
            }
        }
    }
}

/// Applies delivered acknowledgements to the tracker; shared by the consumer loop and
/// the rebalance callback (both run on the consumer thread).
#[derive(Clone)]
struct AckDrain {
    tracker: Arc<Mutex<OffsetTracker>>,
    acks: Arc<Mutex<Receiver<Ack>>>,
}

impl AckDrain {
    fn drain(&self) {
        let (Ok(rx), Ok(mut tracker)) = (self.acks.lock(), self.tracker.lock()) else { return };
        while let Ok(a) = rx.try_recv() {
            tracker.ack(&a.tp, a.offset, a.generation);
        }
    }
}

struct ConsumerCtx {
    drain: AckDrain,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl ClientContext for ConsumerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)) {
            self.health.ready.store(false, Ordering::Relaxed);
            self.metrics.broker_up.set(0);
        }
        tracing::warn!("kafka client error: {error} ({reason})");
    }
}

fn tps_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

fn commit(consumer: &BaseConsumer<ConsumerCtx>, commits: &[(TopicPartition, i64)], mode: CommitMode) {
    if commits.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in commits {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!("commit failed (will be retried): {e}");
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.drain.drain();
            let tps = tps_of(tpl);
            let commits = self.drain.tracker.lock().map(|t| t.commits_for(&tps)).unwrap_or_default();
            tracing::info!(partitions = tps.len(), "partitions revoked; committing what is done");
            commit(consumer, &commits, CommitMode::Sync);
            // A revoked partition's lag is now another instance's to report.
            for (topic, partition) in &tps {
                let _ = self.metrics.consumer_lag.remove_label_values(&[topic, &partition.to_string()]);
            }
            if let Ok(mut t) = self.drain.tracker.lock() {
                t.revoke(tps);
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let tps = tps_of(tpl);
            tracing::info!(partitions = ?tps, "partitions assigned");
            if let Ok(mut t) = self.drain.tracker.lock() {
                t.assign(tps);
            }
        }
    }
}

/// Everything the scorer thread owns or shares.
struct ScorerState {
    bundle: Bundle,
    extractor: FeatureExtractor,
    settings: ScoreSettings,
    thresholds: Arc<RwLock<Thresholds>>,
    model_ref: ModelRef,
}

struct Shared {
    cfg: Config,
    metrics: Arc<Metrics>,
    counters: Arc<Counters>,
    producer: Arc<KafkaProducer>,
    acks: Sender<Ack>,
    hard_stop: Arc<AtomicBool>,
}

impl Shared {
    fn dead_letter(&self, work: Work, code: &str, error: &str) {
        self.metrics.dead_letters.with_label_values(&[work.source.topic.as_str(), code]).inc();
        self.counters.dead_letters.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(topic = %work.source.topic, partition = work.source.partition, offset = work.source.offset, code, "dead letter: {error}");
        let mut headers = work.headers.clone();
        for (k, v) in [
            ("dlsr-error-code", code.to_string()),
            ("dlsr-error", error.to_string()),
            ("dlsr-source-topic", work.source.topic.clone()),
            ("dlsr-source-partition", work.source.partition.to_string()),
            ("dlsr-source-offset", work.source.offset.to_string()),
        ] {
            headers.push((k.to_string(), Some(v.into_bytes())));
        }
        let ack = work.ack();
        produce(
            &self.producer,
            Retry {
                delivery: Delivery { ack, topic: self.cfg.kafka.dead_letter_topic.clone(), attempt: 0 },
                key: work.key,
                payload: work.payload,
                headers,
            },
            &self.hard_stop,
        );
    }
}

fn decode_worker(
    rx: Arc<Mutex<Receiver<Work>>>,
    tx: SyncSender<Decoded>,
    pre: Preprocess,
    shared: Arc<Shared>,
) {
    let limits = shared.cfg.pipeline.decode_limits;
    loop {
        let work = match rx.lock() {
            Ok(r) => match r.recv() {
                Ok(w) => w,
                Err(_) => return,
            },
            Err(_) => return,
        };
        let started = Instant::now();
        let result = decode::decode(&work.payload, &limits)
            .map_err(|e| (e.code(), e.to_string()))
            .and_then(|img| pre.apply(&img).map_err(|e| ("preprocess", e.to_string())));
        shared.metrics.decode_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(image) => {
                let seed = content_seed(&work.payload);
                if tx.send(Decoded { work, image, seed }).is_err() {
                    return;
                }
            }
            Err((code, msg)) => shared.dead_letter(work, code, &msg),
        }
    }
}

fn scorer_loop(rx: Receiver<Decoded>, state: ScorerState, shared: Arc<Shared>, slow: Option<Duration>) {
    let p = &shared.cfg.pipeline;
    let wait = Duration::from_millis(p.batch_max_wait_ms);
    loop {
        let Ok(first) = rx.recv() else { return };
        let mut batch = vec![first];
        let deadline = Instant::now() + wait;
        while batch.len() < p.batch_max_size {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(d) => batch.push(d),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Some(d) = slow {
            std::thread::sleep(d);
        }
        score_batch(batch, &state, &shared);
    }
}

fn score_batch(batch: Vec<Decoded>, state: &ScorerState, shared: &Shared) {
    let m = &shared.metrics;
    m.batch_size.observe(batch.len() as f64);
    let started = Instant::now();
    let images: Vec<&Tensor> = batch.iter().map(|d| &d.image).collect();
    let seeds: Vec<u64> = batch.iter().map(|d| d.seed).collect();
    let scored = Tensor::f_stack(&images, 0)
        .map_err(|e| e.to_string())
        .and_then(|x| state.extractor.extract(&x).map_err(|e| e.to_string()))
        .and_then(|f| {
            state.bundle.scorer(&state.settings).score(&f.values, &seeds).map_err(|e| e.to_string())
        });
    m.inference_seconds.observe(started.elapsed().as_secs_f64());
    let scores = match scored {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("scoring a batch of {} failed: {e}", batch.len());
            for d in batch {
                shared.dead_letter(d.work, "scoring_failed", &e);
            }
            return;
        }
    };
    let thresholds = state.thresholds.read().map(|t| t.clone());
    let Ok(thresholds) = thresholds else { return };
    let calibration = &state.bundle.meta.calibration;
    for (d, s) in batch.into_iter().zip(scores) {
        let work = d.work;
        let topic = work.source.topic.clone();
        let thr = thresholds.for_topic(&topic);
        let id = work.id();
        let verdict = match judge(&id, &s, thr.kind, calibration, Some(thr.value)) {
            Ok(v) => v,
            Err(e) => {
                shared.dead_letter(work, "scoring_failed", &e.to_string());
                continue;
            }
        };
        for kind in ScoreKind::ALL {
            if let Some(v) = s.get(kind) {
                m.score.with_label_values(&[topic.as_str(), kind.name()]).observe(v);
            }
        }
        for (l, layer) in s.layers.iter().enumerate() {
            m.layer_cosine.with_label_values(&[l.to_string().as_str()]).observe(layer.cos);
        }
        let label = if verdict.is_ood { "ood" } else { "id" };
        m.verdicts.with_label_values(&[topic.as_str(), label]).inc();
        shared.counters.verdicts.fetch_add(1, Ordering::Relaxed);
        if verdict.is_ood {
            shared.counters.flagged.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ts) = work.source.timestamp {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64;
            m.end_to_end_seconds
                .with_label_values(&[topic.as_str()])
                .observe(((now - ts).max(0) as f64) / 1000.0);
        }
        if !(verdict.is_ood || shared.cfg.kafka.publish == Publish::All) {
            let _ = shared.acks.send(work.ack());
            continue;
        }
        let value = match serde_json::to_vec(&VerdictRecord::new(&verdict, &work.source, &state.model_ref)) {
            Ok(v) => v,
            Err(e) => {
                shared.dead_letter(work, "scoring_failed", &e.to_string());
                continue;
            }
        };
        let mut headers = work.headers.clone();
        headers.push(("dlsr-verdict".into(), Some(label.as_bytes().to_vec())));
        produce(
            &shared.producer,
            Retry {
                delivery: Delivery {
                    ack: work.ack(),
                    topic: shared.cfg.kafka.output_topic.clone(),
                    attempt: 0,
                },
                key: work.key,
                payload: value,
                headers,
            },
            &shared.hard_stop,
        );
    }
}

fn retry_loop(rx: Receiver<Retry>, producer: Arc<KafkaProducer>, hard_stop: Arc<AtomicBool>) {
    // This thread holds the producer, whose context holds the sender: it cannot wait for
    // the channel to close, so it also stops at the hard stop.
    loop {
        let r = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) if hard_stop.load(Ordering::Relaxed) => return,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let backoff = Duration::from_millis((100u64 << r.delivery.attempt.min(7)).min(10_000));
        std::thread::sleep(backoff);
        if hard_stop.load(Ordering::Relaxed) {
            continue; // not acknowledged, so not committed: re-read after restart
        }
        produce(&producer, r, &hard_stop);
    }
}

/// Thresholds in force and the ID false-positive rate each implies; reset first so a
/// reload that changes a topic's score kind leaves no stale series behind.
fn update_threshold_gauges(metrics: &Metrics, cfg: &Config, t: &Thresholds, calibration: &Calibration) {
    metrics.threshold.reset();
    metrics.threshold_id_fpr.reset();
    for topic in &cfg.kafka.input_topics {
        let thr = t.for_topic(topic);
        let labels = [topic.as_str(), thr.kind.name()];
        metrics.threshold.with_label_values(&labels).set(thr.value);
        if let Some(cal) = calibration.scores.get(&thr.kind) {
            metrics.threshold_id_fpr.with_label_values(&labels).set(cal.id_exceedance(thr.value));
        }
    }
}

/// The ID score quantiles the alert rules compare the live median against.
fn set_id_quantile_gauges(metrics: &Metrics, calibration: &Calibration) {
    for (kind, cal) in &calibration.scores {
        for (p, label) in [(0.5, "0.5"), (0.95, "0.95"), (0.99, "0.99")] {
            metrics.id_score_quantile.with_label_values(&[kind.name(), label]).set(cal.id_quantile(p));
        }
    }
}

/// Loads the bundle and resolves the thresholds (on the calling thread, before any
/// Kafka client exists, so a bad model or threshold fails fast).
fn load_model(cfg: &Config) -> Result<(ScorerState, Thresholds), DaemonError> {
    let device = cfg
        .model
        .device
        .parse::<crate::device::DeviceSpec>()
        .map_err(|e| DaemonError::Model(e.to_string()))?;
    let device = device.resolve().map_err(|e| DaemonError::Model(e.to_string()))?;
    let precision = cfg.model.precision.parse().map_err(DaemonError::Model)?;
    let bundle = Bundle::load(&cfg.model.bundle, device).map_err(|e| DaemonError::Model(e.to_string()))?;
    let encoder = (!cfg.model.encoder.is_empty()).then_some(cfg.model.encoder.as_str());
    let extractor = bundle.load_encoder(encoder, precision).map_err(|e| DaemonError::Model(e.to_string()))?;
    let thresholds = Thresholds::resolve(
        &cfg.thresholds,
        &bundle.meta.calibration,
        bundle.meta.default_score,
        bundle.meta.has_first_epoch,
    )?;
    let model_ref = ModelRef { name: bundle.name(), sha256: bundle.sha256.clone() };
    let settings = bundle.meta.scoring.clone();
    Ok((
        ScorerState {
            bundle,
            extractor,
            settings,
            thresholds: Arc::new(RwLock::new(thresholds.clone())),
            model_ref,
        },
        thresholds,
    ))
}

/// Runs the daemon until `control.shutdown` is set; returns what it did.
pub fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    control: Control,
    metrics: Arc<Metrics>,
) -> Result<Summary, DaemonError> {
    cfg.validate()?;
    let (state, thresholds) = load_model(&cfg)?;
    let health = Arc::new(Health { ready: AtomicBool::new(false) });
    metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    metrics
        .model_info
        .with_label_values(&[
            state.model_ref.name.as_str(),
            state.model_ref.sha256.as_str(),
            state.bundle.meta.encoder.name.as_str(),
            state.bundle.meta.preprocess.size.to_string().as_str(),
        ])
        .set(1);
    update_threshold_gauges(&metrics, &cfg, &thresholds, &state.bundle.meta.calibration);
    // Series at 0 from the start: rate() then counts the first messages too, and an OOD
    // rate exists (0) for a topic that never had an OOD verdict.
    for topic in &cfg.kafka.input_topics {
        metrics.consumed.with_label_values(&[topic.as_str()]);
        for verdict in ["id", "ood"] {
            metrics.verdicts.with_label_values(&[topic.as_str(), verdict]);
        }
    }
    set_id_quantile_gauges(&metrics, &state.bundle.meta.calibration);

    // HTTP first, so /healthz answers while the rest starts.
    let addr = cfg.metrics.listen.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Listen { addr: addr.clone(), reason: e.to_string() })?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .map_err(|e| DaemonError::Listen { addr: addr.clone(), reason: e.to_string() })?;
    if let (Ok(bound), Ok(mut slot)) = (listener.local_addr(), control.http_addr.lock()) {
        tracing::info!(%bound, "metrics listener");
        *slot = Some(bound);
    }
    let (http_stop_tx, http_stop_rx) = tokio::sync::watch::channel(false);
    runtime.spawn(crate::telemetry::http::serve(listener, metrics.clone(), health.clone(), http_stop_rx));

    let (ack_tx, ack_rx) = mpsc::channel::<Ack>();
    let (retry_tx, retry_rx) = mpsc::channel::<Retry>();
    let counters = Arc::new(Counters::default());
    let producer: KafkaProducer = producer_config(&cfg.kafka)?
        .create_with_context(ProducerCtx {
            acks: Mutex::new(ack_tx.clone()),
            retries: Mutex::new(retry_tx),
            metrics: metrics.clone(),
            counters: counters.clone(),
        })
        .map_err(|e| DaemonError::Kafka(format!("producer: {e}")))?;
    let producer = Arc::new(producer);
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let ack_drain = AckDrain { tracker: tracker.clone(), acks: Arc::new(Mutex::new(ack_rx)) };
    let ctx = ConsumerCtx { drain: ack_drain.clone(), health: health.clone(), metrics: metrics.clone() };
    let consumer: BaseConsumer<ConsumerCtx> = consumer_config(&cfg.kafka)?
        .create_with_context(ctx)
        .map_err(|e| DaemonError::Kafka(format!("consumer: {e}")))?;
    consumer.fetch_metadata(None, Duration::from_secs(10)).map_err(|e| DaemonError::Unreachable {
        brokers: cfg.kafka.brokers.clone(),
        reason: e.to_string(),
    })?;
    let topics: Vec<&str> = cfg.kafka.input_topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| DaemonError::Kafka(format!("subscribe: {e}")))?;
    health.ready.store(true, Ordering::Relaxed);
    metrics.broker_up.set(1);

    let hard_stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        counters: counters.clone(),
        producer: producer.clone(),
        acks: ack_tx,
        hard_stop: hard_stop.clone(),
    });
    let limit = cfg.pipeline.in_flight_limit;
    let (work_tx, work_rx) = mpsc::sync_channel::<Work>(limit * 2);
    let (decoded_tx, decoded_rx) = mpsc::sync_channel::<Decoded>(cfg.pipeline.batch_max_size * 2);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let pre = state.extractor.preprocess;
    let mut workers = Vec::new();
    for i in 0..cfg.pipeline.decode_workers {
        let (rx, tx, sh) = (work_rx.clone(), decoded_tx.clone(), shared.clone());
        workers.push(
            std::thread::Builder::new()
                .name(format!("dlsr-decode-{i}"))
                .spawn(move || decode_worker(rx, tx, pre, sh))
                .map_err(|e| DaemonError::Kafka(e.to_string()))?,
        );
    }
    drop(decoded_tx);
    let thresholds_shared = state.thresholds.clone();
    let resolver = Resolver {
        calibration: state.bundle.meta.calibration.clone(),
        default_kind: state.bundle.meta.default_score,
        has_lr: state.bundle.meta.has_first_epoch,
    };
    let scorer = {
        let sh = shared.clone();
        let slow = control.slow_scorer;
        std::thread::Builder::new()
            .name("dlsr-scorer".into())
            .spawn(move || scorer_loop(decoded_rx, state, sh, slow))
            .map_err(|e| DaemonError::Kafka(e.to_string()))?
    };
    let retrier = {
        let (p, h) = (producer.clone(), hard_stop.clone());
        std::thread::Builder::new()
            .name("dlsr-retry".into())
            .spawn(move || retry_loop(retry_rx, p, h))
            .map_err(|e| DaemonError::Kafka(e.to_string()))?
    };

    let mut summary = Summary::default();
    let commit_every = Duration::from_millis(cfg.kafka.commit_interval_ms);
    let mut last_commit = Instant::now();
    let mut last_lag = Instant::now();
    let mut paused = false;
    tracing::info!(topics = ?topics, brokers = %cfg.kafka.brokers, "dlsr serving");

    while !control.shutdown.load(Ordering::Relaxed) {
        if control.reload.swap(false, Ordering::Relaxed) {
            reload_thresholds(config_path.as_deref(), &resolver, &thresholds_shared, &metrics, &cfg);
        }
        ack_drain.drain();
        let in_flight = tracker.lock().map(|t| t.in_flight()).unwrap_or(0);
        metrics.in_flight.set(in_flight as i64);
        summary.max_in_flight = summary.max_in_flight.max(in_flight);
        if last_commit.elapsed() >= commit_every {
            let commits = tracker.lock().map(|mut t| t.take_commits()).unwrap_or_default();
            commit(&consumer, &commits, CommitMode::Async);
            last_commit = Instant::now();
        }
        if last_lag.elapsed() >= Duration::from_secs(5) {
            update_lag(&consumer, &tracker, &metrics, &health);
            crate::memory::release_free_memory();
            last_lag = Instant::now();
        }
        if !paused && in_flight >= limit {
            if let Ok(assignment) = consumer.assignment() {
                let _ = consumer.pause(&assignment);
            }
            paused = true;
            summary.paused_times += 1;
            metrics.consumer_paused.set(1);
            tracing::debug!(in_flight, "back-pressure: consumer paused");
        } else if paused && in_flight <= limit * 3 / 4 {
            if let Ok(assignment) = consumer.assignment() {
                let _ = consumer.resume(&assignment);
            }
            paused = false;
            metrics.consumer_paused.set(0);
        }
        let Some(polled) = consumer.poll(Duration::from_millis(if paused { 20 } else { 50 })) else {
            continue;
        };
        let msg: BorrowedMessage = match polled {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("consume error: {e}");
                continue;
            }
        };
        let tp = (msg.topic().to_string(), msg.partition());
        let Some(generation) = tracker.lock().ok().and_then(|mut t| t.dispatch(&tp, msg.offset())) else {
            continue;
        };
        metrics.consumed.with_label_values(&[msg.topic()]).inc();
        counters.consumed.fetch_add(1, Ordering::Relaxed);
        let work = Work {
            source: Source {
                topic: tp.0.clone(),
                partition: tp.1,
                offset: msg.offset(),
                timestamp: msg.timestamp().to_millis(),
            },
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: owned_headers(msg.headers()),
            generation,
        };
        drop(msg);
        if work_tx.send(work).is_err() {
            break;
        }
    }

    // Drain: stop fetching, let the pipeline finish, deliver, commit.
    tracing::info!("shutting down: draining in-flight messages");
    if let Ok(assignment) = consumer.assignment() {
        let _ = consumer.pause(&assignment);
    }
    drop(work_tx);
    let deadline = Instant::now() + Duration::from_millis(cfg.shutdown.drain_deadline_ms);
    loop {
        ack_drain.drain();
        let in_flight = tracker.lock().map(|t| t.in_flight()).unwrap_or(0);
        if in_flight == 0 {
            summary.drained = true;
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(in_flight, "drain deadline reached; uncommitted messages will be re-read");
            break;
        }
        // Serves callbacks; partitions are paused, so no new messages arrive.
        let _ = consumer.poll(Duration::from_millis(20));
    }
    hard_stop.store(true, Ordering::Relaxed);
    let _ = producer.flush(Duration::from_secs(5));
    ack_drain.drain();
    let commits = tracker.lock().map(|t| t.commits_for(&t.assigned())).unwrap_or_default();
    commit(&consumer, &commits, CommitMode::Sync);
    for w in workers {
        let _ = w.join();
    }
    let _ = scorer.join();
    drop(shared);
    let _ = http_stop_tx.send(true);
    runtime.shutdown_timeout(Duration::from_secs(1));
    drop(producer);
    drop(consumer);
    let _ = retrier.join();
    summary.consumed = counters.consumed.load(Ordering::Relaxed);
    summary.verdicts = counters.verdicts.load(Ordering::Relaxed);
    summary.flagged = counters.flagged.load(Ordering::Relaxed);
    summary.dead_letters = counters.dead_letters.load(Ordering::Relaxed);
    summary.published = counters.published.load(Ordering::Relaxed);
    tracing::info!(?summary, "dlsr stopped");
    Ok(summary)
}

fn update_lag(
    consumer: &BaseConsumer<ConsumerCtx>,
    tracker: &Mutex<OffsetTracker>,
    metrics: &Metrics,
    health: &Health,
) {
    let assigned = tracker.lock().map(|t| t.assigned()).unwrap_or_default();
    let mut reachable = assigned.is_empty();
    for tp in &assigned {
        match consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_millis(500)) {
            Ok((_, high)) => {
                reachable = true;
                // Nothing read from this partition since it was assigned: the group's
                // committed offset is the reference (a stuck pipeline must show lag).
                let point = tracker
                    .lock()
                    .ok()
                    .and_then(|t| t.commit_point(tp))
                    .or_else(|| group_committed(consumer, tp));
                if let Some(point) = point {
                    metrics
                        .consumer_lag
                        .with_label_values(&[tp.0.as_str(), tp.1.to_string().as_str()])
                        .set((high - point).max(0));
                }
            }
            Err(e) => tracing::debug!("watermarks of {}/{}: {e}", tp.0, tp.1),
        }
    }
    if assigned.is_empty() {
        reachable = consumer.fetch_metadata(None, Duration::from_millis(500)).is_ok();
    }
    health.ready.store(reachable, Ordering::Relaxed);
    metrics.broker_up.set(i64::from(reachable));
}

/// The group's committed offset of one partition, if it has one.
fn group_committed(consumer: &BaseConsumer<ConsumerCtx>, tp: &TopicPartition) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    let committed = consumer.committed_offsets(tpl, Duration::from_millis(500)).ok()?;
    match committed.find_partition(&tp.0, tp.1)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// What resolving thresholds needs from the bundle, kept for SIGHUP.
struct Resolver {
    calibration: Calibration,
    default_kind: ScoreKind,
    has_lr: bool,
}

fn reload_thresholds(
    path: Option<&std::path::Path>,
    resolver: &Resolver,
    thresholds: &RwLock<Thresholds>,
    metrics: &Metrics,
    running: &Config,
) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: no configuration file to reload");
        metrics.config_reloads.with_label_values(&["rejected"]).inc();
        return;
    };
    // The whole file must be valid; only its thresholds take effect without a restart.
    let result = Config::load(Some(path)).and_then(|new| {
        Thresholds::resolve(&new.thresholds, &resolver.calibration, resolver.default_kind, resolver.has_lr)
    });
    match result {
        Ok(t) => {
            update_threshold_gauges(metrics, running, &t, &resolver.calibration);
            if let Ok(mut w) = thresholds.write() {
                *w = t;
            }
            metrics.config_reloads.with_label_values(&["ok"]).inc();
            tracing::info!("SIGHUP: thresholds reloaded");
        }
        Err(e) => {
            metrics.config_reloads.with_label_values(&["rejected"]).inc();
            tracing::error!("SIGHUP: new configuration rejected, keeping the old one: {e}");
        }
    }
}
