//! The daemon: Kafka in, verdicts and dead letters out, nothing lost. This file wires
//! the stages and runs the main loop; each stage has its own module:
//!
//! ```text
//! consumer (consumer.rs: group, rebalance, pause/resume, commits, lag; main thread)
//!   --work (bounded)--> decode workers (scorer.rs: decode, preprocess, seed)
//!   --decoded (bounded)--> scorer thread (scorer.rs: batches, ItemScorer, verdicts)
//!   --> producer (producer.rs: verdicts, dead letters, deliveries, retries, blocking)
//!   --acks--> consumer: a partition's commit point moves only past messages whose
//!      output the broker acknowledged (or that had nothing to publish)
//! scorer --judged items (bounded)--> window auditor (window_stage.rs: windows per topic
//!   and group, their tests, the online detector, records to audit.summary_topic)
//! ```
//!
//! Faults end the run with an error (the process exits non-zero; nothing unacknowledged
//! is committed): a panicked pipeline thread, the producer's fatal error, an output topic
//! blocked for longer than `kafka.output_blocked_exit_ms`.
//!
//! Shutdown (SIGTERM/SIGINT or the control flag): stop fetching, let the pipeline drain
//! until `shutdown.drain_deadline_ms`, then the hard stop: nothing more is produced or
//! retried, queued and in-flight records are purged, what was acknowledged is committed,
//! and `run` returns within the deadline plus [`SHUTDOWN_MARGIN`] whatever the pipeline
//! was doing. SIGHUP: reload thresholds from the config file (a bad file is rejected,
//! the old thresholds stay) and every bundle whose file changed: loaded beside the
//! running one on a reload thread, checked and self-tested, then swapped in at each
//! scorer's next batch boundary ([`super::models`]); a rejected bundle leaves the old one
//! scoring. `model.watch` does the same when a bundle file's checksum changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::producer::{Producer, PurgeConfig};

use super::budget::DecodeBudget;
use super::consumer::{ConsumerCtx, ConsumerStage, Work};
use super::decide::Decider;
use super::models::{ModelSlot, Worker};
use super::offsets::OffsetTracker;
use super::producer::{Output, OutputBlocks, OutputTopics, RetryScheduler};
use super::resolve::{FetchHealth, ResolveStage};
use super::scorer::{
    decode_worker, default_decoder, Decoded, DecodedQueue, Decoder, InputChain, ItemScorer, Route, Routes,
    ScoringStage,
};
use super::supervise::{self, Faults};
use crate::config::{Config, ConfigError};
use crate::kafka::settings::{consumer_config, producer_config};
use crate::telemetry::http::Health;
use crate::telemetry::metrics::Metrics;

/// The most a shutdown takes beyond `shutdown.drain_deadline_ms` (flush, purge, final
/// commit, joins).
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cause follows in the error's source chain (`{:#}` prints it).
    #[error("cannot load the model")]
    Model(#[from] super::scorer::ModelLoadError),
    #[error("no scorer was given for every configured model")]
    NoScorer,
    /// A configured model's bundle failed a check at start.
    #[error("model {model}: {reason}")]
    ModelRejected {
        model: String,
        #[source]
        reason: Box<super::models::RejectReason>,
    },
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("brokers {brokers} (kafka.brokers) unreachable at start: {reason}")]
    Unreachable { brokers: String, reason: String },
    #[error("metrics listener {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("window audit ([audit]): {0}")]
    Audit(String),
    #[error("cannot start a pipeline thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The run ended on a fault; what was acknowledged was committed.
    #[error("stopped on a fault: {0}")]
    Fault(String),
}

/// How the outside world steers a running daemon (signal handlers or tests set these).
#[derive(Debug, Clone, Default)]
pub struct Control {
    pub shutdown: Arc<AtomicBool>,
    pub reload: Arc<AtomicBool>,
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
    /// Every consumed message had its output acknowledged before the stop.
    pub drained: bool,
    /// The broker confirmed the final commit (false: the last points will be re-read).
    pub final_commit_confirmed: bool,
    /// Pipeline threads still busy when the shutdown's deadline came (not waited for).
    pub threads_left_running: usize,
}

pub use super::counters::Counters;

/// One configured model's scorers, one per scorer thread.
pub struct ServedModel {
    /// `default` or a `[models.NAME]` key.
    pub name: String,
    pub scorers: Vec<Box<dyn ItemScorer>>,
}

/// Loads every configured model (checked and self-tested) and runs the daemon until
/// `control.shutdown` is set.
pub fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    control: Control,
    metrics: Arc<Metrics>,
) -> Result<Summary, DaemonError> {
    cfg.validate()?;
    let mut models = Vec::new();
    for (name, model) in cfg.all_models() {
        let device = model.device.resolve().map_err(super::scorer::ModelLoadError::from)?;
        let (workers, _) = crate::device::scoring_workers(cfg.pipeline.scorer_workers, device);
        let (scorers, _) =
            super::models::load_checked(&cfg, name, model, workers, None).map_err(|reason| {
                DaemonError::ModelRejected { model: name.to_string(), reason: Box::new(reason) }
            })?;
        models.push(ServedModel { name: name.to_string(), scorers });
    }
    run_with_models(cfg, config_path, control, metrics, models, default_decoder())
}

/// The stages' threads and channels, started by [`start_pipeline`].
struct Pipeline {
    /// Into the decode workers; dropped at shutdown so the workers and the scorer end.
    work_tx: mpsc::SyncSender<Work>,
    /// Decode workers, scorer, retry scheduler (all supervised).
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The window auditor (supervised); it ends after the scorers, when its feed closes,
    /// and then reports the open windows as cut short.
    window: Option<std::thread::JoinHandle<()>>,
}

/// A served model as the daemon keeps it: the slot its workers share, how many workers
/// a swap loads copies for, and what `model.watch` last saw of its file.
struct ModelHandle {
    slot: Arc<ModelSlot>,
    workers: usize,
    bundle: PathBuf,
    watch: bool,
    /// The file's (modified time, length) when last looked at, and the sha256 last tried.
    seen: Option<(std::time::SystemTime, u64)>,
    tried: Option<String>,
}

/// Why a reload runs: SIGHUP (the configuration file again, and every bundle), or
/// `model.watch` seeing a changed bundle file (the configuration in force).
#[derive(Debug, Clone, Copy, PartialEq)]
enum ReloadCause {
    Signal,
    Watch,
}

/// A running daemon: what the main loop and the shutdown need.
struct Daemon {
    cfg: Config,
    config_path: Option<PathBuf>,
    control: Control,
    /// The consumer stage (main thread).
    consumer: ConsumerStage,
    pipeline: Pipeline,
    /// The producer stage's handle (hard stop, the producer for flush and purge).
    output: Arc<Output>,
    /// The served models; the scorers take swaps and new thresholds from their slots.
    models: Vec<ModelHandle>,
    /// A reload under way (on its own thread: loading a bundle takes seconds, and the
    /// consumer keeps polling meanwhile); it returns the thresholds it applied.
    reloading: Option<std::thread::JoinHandle<Option<crate::config::ThresholdsConfig>>>,
    /// A reload asked for while one ran.
    reload_pending: Option<ReloadCause>,
    metrics: Arc<Metrics>,
    /// What /readyz answers.
    health: Arc<Health>,
    /// Output topics refusing records, and since when.
    blocks: Arc<OutputBlocks>,
    /// Bytes of the images being decoded (the in-flight gauge adds the payloads).
    budget: Arc<DecodeBudget>,
    fetch_health: Arc<FetchHealth>,
    /// The first fault of the run, if any.
    faults: Arc<Faults>,
    counters: Arc<Counters>,
    summary: Summary,
    /// When serving began, and when the wait for a first assignment was last logged.
    serving_since: Instant,
    wait_logged: Option<Instant>,
    /// The HTTP listener's runtime and stop signal, the topic watcher and its stop flag.
    http: (tokio::runtime::Runtime, tokio::sync::watch::Sender<bool>),
    watcher: (std::thread::JoinHandle<()>, Arc<AtomicBool>),
}

/// Runs the daemon with any [`ItemScorer`] (all serving the default model) until
/// `control.shutdown` is set or a fault.
pub fn run_with_scorer(
    cfg: Config,
    config_path: Option<PathBuf>,
    control: Control,
    metrics: Arc<Metrics>,
    scorers: Vec<Box<dyn ItemScorer>>,
) -> Result<Summary, DaemonError> {
    run_with_parts(cfg, config_path, control, metrics, scorers, default_decoder())
}

/// [`run_with_scorer`] with a given image decoder (tests put a panicking one here).
pub fn run_with_parts(
    cfg: Config,
    config_path: Option<PathBuf>,
    control: Control,
    metrics: Arc<Metrics>,
    scorers: Vec<Box<dyn ItemScorer>>,
    decoder: Decoder,
) -> Result<Summary, DaemonError> {
    let models = vec![ServedModel { name: crate::config::DEFAULT_MODEL.into(), scorers }];
    run_with_models(cfg, config_path, control, metrics, models, decoder)
}

/// Starts, serves until shutdown or a fault, shuts down.
pub fn run_with_models(
    cfg: Config,
    config_path: Option<PathBuf>,
    control: Control,
    metrics: Arc<Metrics>,
    models: Vec<ServedModel>,
    decoder: Decoder,
) -> Result<Summary, DaemonError> {
    let mut daemon = Daemon::start(cfg, config_path, control, metrics, models, decoder)?;
    daemon.serve();
    daemon.shutdown()
}

/// Every configured model's scorers, in the configuration's order (the default first),
/// and their deciders; a configured model without scorers is an error.
fn deciders_of(cfg: &Config, models: Vec<ServedModel>) -> Result<Vec<(ServedModel, Decider)>, DaemonError> {
    let mut by_name: BTreeMap<String, ServedModel> =
        models.into_iter().map(|m| (m.name.clone(), m)).collect();
    let mut out = Vec::new();
    for (name, _) in cfg.all_models() {
        let served = by_name.remove(name).filter(|m| !m.scorers.is_empty()).ok_or(DaemonError::NoScorer)?;
        let info = served.scorers[0].model().clone();
        let decider = Decider::resolve(cfg, name, info)?;
        out.push((served, decider));
    }
    Ok(out)
}

/// Score bucket edges for every model's calibration and thresholds in force.
fn score_edges(deciders: &[Arc<Decider>]) -> Vec<f64> {
    let edges: Vec<f64> = deciders
        .iter()
        .flat_map(|d| crate::telemetry::metrics::score_buckets(&d.model.calibration, &d.thresholds.values()))
        .collect();
    crate::telemetry::metrics::clean_buckets(edges)
}

impl Daemon {
    /// Wires the stages: HTTP listener, producer, consumer, topic watcher, window
    /// auditor, resolve and decode workers, one scorer set per model; logs what serves.
    fn start(
        cfg: Config,
        config_path: Option<PathBuf>,
        control: Control,
        metrics: Arc<Metrics>,
        models: Vec<ServedModel>,
        decoder: Decoder,
    ) -> Result<Self, DaemonError> {
        cfg.validate()?;
        let served = deciders_of(&cfg, models)?;
        let deciders: Vec<Arc<Decider>> = served.iter().map(|(_, d)| Arc::new(d.clone())).collect();
        metrics.set_score_buckets(score_edges(&deciders));
        for d in &deciders {
            publish_model_metrics(&metrics, d);
            metrics.start_model(&d.name);
        }
        for topic in &cfg.kafka.input_topics {
            metrics.start_topic(topic);
        }
        let health = Arc::new(Health::new(false));
        health.set(Some("starting".into()));
        let http = start_http(&cfg, &control, &metrics, &health)?;

        let faults = Arc::new(Faults::default());
        let counters = Arc::new(Counters::default());
        let blocks = Arc::new(OutputBlocks::new(metrics.clone()));
        let (ack_tx, ack_rx) = mpsc::channel();
        let topics = OutputTopics {
            verdicts: cfg.kafka.output_topic.clone(),
            dead_letters: cfg.kafka.dead_letter_topic.clone(),
            message_max_bytes: cfg.kafka.message_max_bytes,
        };
        let (output, retry_rx) = Output::create(
            producer_config(&cfg.kafka)?,
            topics,
            ack_tx,
            metrics.clone(),
            counters.clone(),
            blocks.clone(),
            faults.clone(),
        )
        .map_err(|e| DaemonError::Kafka(format!("producer: {e}")))?;
        let output = Arc::new(output);
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let window = window_stage(&cfg, &deciders, &metrics, &tracker)?;
        let ctx = ConsumerCtx::new(tracker.clone(), ack_rx, metrics.clone());
        let commit_every = Duration::from_millis(cfg.kafka.commit_interval_ms);
        let consumer = ConsumerStage::connect(
            consumer_config(&cfg.kafka)?,
            ctx,
            &cfg.kafka.input_topics,
            commit_every,
            cfg.kafka.on_unreadable,
            cfg.pipeline.in_flight_bytes / 2,
        )
        .map_err(|(reason, unreachable)| match unreachable {
            true => DaemonError::Unreachable { brokers: cfg.kafka.brokers.clone(), reason },
            false => DaemonError::Kafka(reason),
        })?;
        metrics.broker_up.set(1);
        let watch_stop = Arc::new(AtomicBool::new(false));
        let inputs = cfg
            .kafka
            .input_topics
            .iter()
            .filter_map(|t| super::topic_watch::InputSpec::parse(t).ok())
            .collect();
        let watcher = super::topic_watch::spawn(
            crate::kafka::settings::connection_config(&cfg.kafka)?,
            inputs,
            vec![cfg.kafka.output_topic.clone(), cfg.kafka.dead_letter_topic.clone()],
            consumer.ctx().input_faults.clone(),
            metrics.clone(),
            watch_stop.clone(),
        )
        .map_err(DaemonError::Thread)?;

        let retries = RetryScheduler {
            output: output.clone(),
            tracker,
            revocations: consumer.ctx().revocations.clone(),
            metrics: metrics.clone(),
        };
        let (feed, window) = match window {
            Some((stage, group_by)) => {
                let (tx, rx) = mpsc::sync_channel(super::window_stage::FEED_CAPACITY);
                (Some((tx, group_by)), Some((stage, rx)))
            }
            None => (None, None),
        };
        let mut handles = Vec::new();
        let mut per_model = Vec::new();
        for (model, decider) in served {
            let config = cfg.all_models().into_iter().find(|(n, _)| *n == model.name).map(|(_, m)| m.clone());
            let config = config.unwrap_or_default();
            let slot = Arc::new(ModelSlot::new(decider));
            handles.push(ModelHandle {
                slot: slot.clone(),
                workers: model.scorers.len(),
                bundle: config.bundle.clone(),
                watch: config.watch,
                seen: file_stamp(&config.bundle),
                tried: None,
            });
            let stages: Vec<ScoringStage> = model
                .scorers
                .into_iter()
                .map(|scorer| ScoringStage {
                    worker: Worker::new(scorer, slot.clone()),
                    output: output.clone(),
                    metrics: metrics.clone(),
                    counters: counters.clone(),
                    pipeline: cfg.pipeline.clone(),
                    window_feed: feed.clone(),
                })
                .collect();
            per_model.push(stages);
        }
        let group_pointer = feed.as_ref().map(|(_, g)| g.json_pointer().to_string()).unwrap_or_default();
        // Only the stages hold the feed now: it closes when the last scorer ends.
        drop(feed);
        let budget = DecodeBudget::new(cfg.pipeline.in_flight_bytes / 2);
        let fetch_health = Arc::new(FetchHealth::default());
        let resolve = ResolveStage {
            input: cfg.input.clone(),
            group_pointer,
            limits: cfg.pipeline.decode_limits,
            output: output.clone(),
            metrics: metrics.clone(),
            health: fetch_health.clone(),
            payloads: consumer.payloads.clone(),
        };
        let mut pipeline = start_pipeline(
            &cfg, per_model, resolve, retries, retry_rx, &output, &metrics, &faults, &decoder, &budget,
        )?;
        if let Some((stage, rx)) = window {
            let spawned = supervise::spawn("dlsr-window", &faults, move || stage.run(rx));
            pipeline.window = Some(spawned.map_err(DaemonError::Thread)?);
        }
        for d in &deciders {
            let device = cfg.all_models().into_iter().find(|(n, _)| *n == d.name).map(|(_, m)| m.device);
            tracing::info!(
                model = %d.name,
                bundle = %d.model.model_ref.name,
                sha256 = %d.model.model_ref.sha256,
                encoder = %d.model.encoder,
                input_px = d.model.preprocess.size,
                device = ?device,
                thresholds = %d.describe(),
                "model"
            );
        }
        tracing::info!(
            topics = ?cfg.kafka.input_topics,
            brokers = %cfg.kafka.brokers,
            group = %cfg.kafka.group_id,
            models = %deciders.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
            model = %deciders[0].model.model_ref.name,
            sha256 = %deciders[0].model.model_ref.sha256,
            precision = %cfg.model.precision,
            thresholds = %deciders.iter().map(|d| d.describe()).filter(|t| !t.is_empty()).collect::<Vec<_>>().join("; "),
            config = %config_path.as_deref().map_or_else(|| "built-in defaults and DLSR__* environment".into(), |p| p.display().to_string()),
            "dlsr serving"
        );
        Ok(Daemon {
            cfg,
            config_path,
            control,
            consumer,
            pipeline,
            output,
            models: handles,
            reloading: None,
            reload_pending: None,
            metrics,
            health,
            blocks,
            budget,
            fetch_health,
            faults,
            counters,
            summary: Summary::default(),
            serving_since: Instant::now(),
            wait_logged: None,
            http,
            watcher: (watcher, watch_stop),
        })
    }
}

/// A file's modified time and length (None: it cannot be read now).
fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl Daemon {
    /// Serves until shutdown or a fault: polls, dispatches, keeps commits, lag,
    /// readiness and back-pressure up to date.
    fn serve(&mut self) {
        let limit = self.cfg.pipeline.in_flight_limit;
        let mut last_housekeeping = Instant::now() - Duration::from_secs(1);
        let mut last_trim = Instant::now();
        let mut last_watch = Instant::now();
        while !self.control.shutdown.load(Ordering::Relaxed) && !self.faults.any() {
            if self.control.reload.swap(false, Ordering::Relaxed) {
                self.request_reload(ReloadCause::Signal);
            }
            let in_flight = self.consumer.tick(limit);
            self.metrics.in_flight.set(in_flight as i64);
            let bytes = self.consumer.payloads.held() + self.budget.used();
            self.metrics.in_flight_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            self.summary.max_in_flight = self.summary.max_in_flight.max(in_flight);
            if last_housekeeping.elapsed() >= Duration::from_millis(250) {
                last_housekeeping = Instant::now();
                self.finish_reload();
                if last_watch.elapsed() >= WATCH_EVERY {
                    last_watch = Instant::now();
                    self.watch_bundles();
                }
                self.check_faults();
                self.log_assignment_wait();
                self.health.set(self.not_ready_reason());
            }
            if last_trim.elapsed() >= Duration::from_secs(5) {
                last_trim = Instant::now();
                crate::memory::release_free_memory();
            }
            match self.consumer.poll_into(&self.pipeline.work_tx) {
                Some(n) => {
                    self.counters.consumed.fetch_add(n as u64, Ordering::Relaxed);
                }
                None => self.faults.record("the decode workers are gone"),
            }
        }
    }

    /// Faults that no thread reports by itself: an output blocked for too long, and the
    /// idempotent producer's fatal error (after which nothing would be acknowledged).
    fn check_faults(&self) {
        let blocked_exit = Duration::from_millis(self.cfg.kafka.output_blocked_exit_ms);
        self.blocks.log_periodically(blocked_exit);
        if let Some((topic, code, since)) = self.blocks.longest() {
            if since >= blocked_exit {
                self.faults.record(format!(
                    "output topic {topic} has refused records ({code}) for {since:.0?}, over \
                     kafka.output_blocked_exit_ms; exiting so that the orchestrator restarts and pages"
                ));
            }
        }
        if let Some((code, reason)) = self.output.producer.client().fatal_error() {
            self.faults.record(format!("the producer hit a fatal error ({code:?}): {reason}"));
        }
    }

    /// Whether the group has answered with an assignment yet.
    fn assigned(&self) -> bool {
        self.consumer.ctx().assignments.load(Ordering::Relaxed) > 0
    }

    /// Until the group first assigns partitions nothing is consumed, and after a restart
    /// under dynamic membership that can take the old member's session timeout plus a
    /// rebalance: say so at once and every 10 s (a warning after 30 s), and when it ends.
    fn log_assignment_wait(&mut self) {
        let group = &self.cfg.kafka.group_id;
        let waited = self.serving_since.elapsed().as_secs();
        if self.assigned() {
            if self.wait_logged.take().is_some() {
                tracing::info!("partition assignment received after {waited} s");
            }
            return;
        }
        if self.wait_logged.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return;
        }
        let first = self.wait_logged.is_none();
        self.wait_logged = Some(Instant::now());
        if first {
            tracing::info!("waiting for partition assignment from group {group}");
        } else if waited < 30 {
            tracing::info!("still waiting for partition assignment from group {group}: {waited} s");
        } else {
            let hint = if self.cfg.kafka.group_instance_id.trim().is_empty() {
                "; with dynamic membership a restarted daemon waits for its old session to time out \
                 (kafka.session_timeout_ms) and a rebalance, which kafka.group_instance_id avoids"
            } else {
                ""
            };
            tracing::warn!(
                "still waiting for partition assignment from group {group}: {waited} s (another member may \
                 hold the partitions, or the group coordinator does not answer{hint})"
            );
        }
    }

    /// Why the daemon is not ready, if it is not.
    fn not_ready_reason(&self) -> Option<String> {
        if !self.consumer.ctx().broker_up.load(Ordering::Relaxed) {
            let last = self.consumer.ctx().last_client_error.lock().ok().and_then(|l| l.clone());
            return Some(match last {
                Some(why) => format!("the brokers do not answer (last error: {why})"),
                None => "the brokers do not answer".into(),
            });
        }
        let input = self.consumer.ctx().input_faults.lock().ok().and_then(|f| f.describe());
        if input.is_some() {
            return input;
        }
        let (stores_down, fetch) = self.fetch_health.describe();
        self.metrics.fetch_stores_unreachable.set(stores_down as i64);
        if fetch.is_some() {
            return fetch;
        }
        if !self.assigned() {
            return Some(format!(
                "waiting for partition assignment from group {} for {} s",
                self.cfg.kafka.group_id,
                self.serving_since.elapsed().as_secs()
            ));
        }
        self.blocks.longest().map(|(topic, code, since)| {
            format!("output topic {topic} refuses records ({code}) for {since:.0?}")
        })
    }

    /// Stops fetching, drains until the deadline (not after a fault), hard-stops the
    /// output, commits what was acknowledged, and joins what finishes in time.
    fn shutdown(self) -> Result<Summary, DaemonError> {
        let Daemon {
            cfg,
            mut consumer,
            pipeline,
            output,
            health,
            faults,
            counters,
            mut summary,
            http,
            watcher,
            reloading,
            ..
        } = self;
        // A reload still loading is not waited for; what it would swap in is dropped.
        drop(reloading);
        let faulted = faults.any();
        health.set(Some("shutting down".into()));
        tracing::info!("shutting down: draining in-flight messages");
        consumer.set_paused(true);
        let Pipeline { work_tx, threads, window } = pipeline;
        drop(work_tx);
        let deadline = Instant::now() + Duration::from_millis(cfg.shutdown.drain_deadline_ms);
        // After a fault nothing more will be acknowledged: skip the drain.
        let mut draining = !faulted;
        while draining {
            consumer.ctx().drain_acks();
            let in_flight = consumer.in_flight();
            if in_flight == 0 {
                summary.drained = true;
                draining = false;
            } else if Instant::now() >= deadline {
                tracing::warn!(in_flight, "drain deadline reached; uncommitted messages will be re-read");
                draining = false;
            }
            if draining {
                // Serves callbacks; partitions are paused, so no new messages arrive.
                consumer.serve_events(Duration::from_millis(20));
            }
        }
        // The hard stop: nothing is produced or retried from here on, and nothing queued
        // or in flight is sent after the final commit.
        output.hard_stop.store(true, Ordering::SeqCst);
        let _ = output.producer.flush(Duration::from_secs(1));
        output.producer.purge(PurgeConfig::default().queue().inflight());
        let _ = output.producer.flush(Duration::from_millis(200));
        summary.final_commit_confirmed = consumer.final_commit(Duration::from_secs(2));
        summary.paused_times = consumer.paused_times;
        summary.threads_left_running =
            supervise::join_until(threads, Instant::now() + Duration::from_millis(500));
        // The auditor ends once the scorers have: it reports its open windows as cut short
        // and flushes their records (up to 1 s).
        // Not waited for while a scorer is still busy (its feed is still open).
        if let (Some(window), 0) = (window, summary.threads_left_running) {
            if supervise::join_until(vec![window], Instant::now() + Duration::from_secs(2)) > 0 {
                tracing::warn!("the window auditor did not finish in time; its last records may be missing");
            }
        }
        if summary.threads_left_running > 0 {
            tracing::warn!(
                threads = summary.threads_left_running,
                "pipeline threads still busy at the deadline; not waited for"
            );
        }
        summary.consumed = counters.consumed.load(Ordering::Relaxed);
        summary.verdicts = counters.verdicts.load(Ordering::Relaxed);
        summary.flagged = counters.flagged.load(Ordering::Relaxed);
        summary.dead_letters = counters.dead_letters.load(Ordering::Relaxed);
        summary.published = counters.published.load(Ordering::Relaxed);
        // Fields, not a Debug dump: readable in text logs, queryable in JSON ones.
        tracing::info!(
            consumed = summary.consumed,
            verdicts = summary.verdicts,
            flagged = summary.flagged,
            dead_letters = summary.dead_letters,
            published = summary.published,
            paused_times = summary.paused_times,
            max_in_flight = summary.max_in_flight,
            drained = summary.drained,
            final_commit_confirmed = summary.final_commit_confirmed,
            threads_left_running = summary.threads_left_running,
            "dlsr stopped"
        );
        let (watcher, watch_stop) = watcher;
        watch_stop.store(true, Ordering::Relaxed);
        let _ = watcher.join();
        let (runtime, http_stop) = http;
        let _ = http_stop.send(true);
        runtime.shutdown_timeout(Duration::from_millis(500));
        match faults.first() {
            Some(f) => Err(DaemonError::Fault(f)),
            None => Ok(summary),
        }
    }

    /// Starts a reload on its own thread, or queues it behind the one running.
    fn request_reload(&mut self, cause: ReloadCause) {
        if self.reloading.is_some() {
            self.reload_pending = Some(match (self.reload_pending, cause) {
                (Some(ReloadCause::Signal), _) | (_, ReloadCause::Signal) => ReloadCause::Signal,
                _ => ReloadCause::Watch,
            });
            return;
        }
        let cfg = match (cause, self.config_path.as_deref()) {
            (ReloadCause::Watch, _) => self.cfg.clone(),
            (ReloadCause::Signal, None) => {
                tracing::warn!("SIGHUP: no configuration file to reload; bundles are checked for changes");
                self.cfg.clone()
            }
            (ReloadCause::Signal, Some(path)) => match Config::load(Some(path)) {
                Ok(new) => {
                    let ignored = restart_only_changes(&self.cfg, &new);
                    if !ignored.is_empty() {
                        tracing::warn!(
                            sections = %ignored.join(", "),
                            "SIGHUP: the reloaded file also changes settings that only a restart applies; they \
                             are not in force"
                        );
                    }
                    // Only the thresholds (and routes' thresholds) of the new file apply.
                    let mut applied = self.cfg.clone();
                    applied.thresholds = new.thresholds;
                    applied
                }
                Err(e) => {
                    self.metrics.record_reload(false);
                    tracing::error!("SIGHUP: new configuration rejected, keeping the old one: {e}");
                    return;
                }
            },
        };
        let slots: Vec<(Arc<ModelSlot>, usize)> =
            self.models.iter().map(|m| (m.slot.clone(), m.workers)).collect();
        let metrics = self.metrics.clone();
        let spawned = std::thread::Builder::new()
            .name("dlsr-reload".into())
            .spawn(move || reload_models(&cfg, &slots, &metrics, cause).then_some(cfg.thresholds));
        match spawned {
            Ok(handle) => self.reloading = Some(handle),
            Err(e) => tracing::error!("cannot start the reload thread: {e}"),
        }
    }

    /// Takes a finished reload's result; starts the one queued behind it.
    fn finish_reload(&mut self) {
        if !self.reloading.as_ref().is_some_and(|h| h.is_finished()) {
            return;
        }
        let Some(handle) = self.reloading.take() else { return };
        match handle.join() {
            Ok(Some(thresholds)) => self.cfg.thresholds = thresholds,
            Ok(None) => {}
            Err(_) => tracing::error!("the reload thread panicked; the models in force are unchanged"),
        }
        for m in &mut self.models {
            // What serves now is what a watch compares the file with.
            m.tried = Some(m.slot.decider().model.model_ref.sha256.clone());
        }
        if let Some(cause) = self.reload_pending.take() {
            self.request_reload(cause);
        }
    }

    /// `model.watch`: a bundle file whose length or modified time changed, and whose
    /// sha256 is neither what serves nor what was last tried, is reloaded.
    fn watch_bundles(&mut self) {
        let mut changed = false;
        for m in self.models.iter_mut().filter(|m| m.watch) {
            let stamp = file_stamp(&m.bundle);
            if stamp == m.seen {
                continue;
            }
            m.seen = stamp;
            let Ok(sha) = super::models::file_sha256(&m.bundle) else { continue };
            let serving = m.slot.decider().model.model_ref.sha256.clone();
            if sha == serving {
                // Put back: the failing gauge clears.
                self.metrics.model_reload_failing.with_label_values(&[m.slot.name.as_str()]).set(0);
            } else if m.tried.as_deref() != Some(sha.as_str()) {
                tracing::info!(model = %m.slot.name, bundle = %m.bundle.display(), sha256 = %sha, "model.watch: the bundle file changed");
                m.tried = Some(sha);
                changed = true;
            }
        }
        if changed {
            self.request_reload(ReloadCause::Watch);
        }
    }
}

/// Between [`Daemon::watch_bundles`] looks at the bundle files.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Reloads every model under `cfg` (on the reload thread): swaps changed bundles that
/// pass every check, re-resolves the thresholds, sets the gauges and the score buckets.
/// Returns whether `cfg`'s thresholds are now in force: a threshold that does not
/// resolve against the bundle it would judge for rejects the whole configuration (the
/// old thresholds stay; bundle swaps still happen, with the old thresholds' keys).
fn reload_models(
    cfg: &Config,
    slots: &[(Arc<ModelSlot>, usize)],
    metrics: &Metrics,
    cause: ReloadCause,
) -> bool {
    use super::models::ReloadOutcome;
    let mut config_ok = true;
    for (slot, workers) in slots {
        let name = slot.name.as_str();
        match super::models::reload(cfg, slot, *workers) {
            ReloadOutcome::Thresholds => {
                metrics.model_reload_failing.with_label_values(&[name]).set(0);
            }
            ReloadOutcome::ThresholdsRejected(reason) => {
                config_ok = false;
                tracing::error!(model = %name, "reload: thresholds rejected, keeping the old ones: {reason}");
            }
            ReloadOutcome::Swapped { from, to } => {
                metrics.record_model_reload(name, true);
                let d = slot.decider();
                // Its threshold gauges are set below, with every model's.
                let m = &d.model;
                metrics.set_model_info(name, &m.model_ref.name, &m.model_ref.sha256, &m.encoder, m.preprocess.size);
                tracing::info!(
                    model = %name,
                    from = %from,
                    to = %to,
                    bundle = %d.model.model_ref.name,
                    thresholds = %d.describe(),
                    "model swapped: the new bundle passed its checks and self-test and serves from each \
                     scorer's next batch"
                );
                for warning in d.kept_value_warnings(cfg) {
                    tracing::warn!(model = %name, "{warning}");
                }
            }
            ReloadOutcome::Rejected { sha256, reason } => {
                metrics.record_model_reload(name, false);
                tracing::error!(
                    model = %name,
                    sha256 = %sha256.as_deref().unwrap_or("unreadable"),
                    "model reload rejected, the old bundle keeps scoring: {reason}"
                );
            }
        }
    }
    let deciders: Vec<Arc<Decider>> = slots.iter().map(|(s, _)| s.decider()).collect();
    for d in &deciders {
        d.set_gauges(metrics);
    }
    metrics.set_score_buckets(score_edges(&deciders));
    if cause == ReloadCause::Signal {
        metrics.record_reload(config_ok);
        if config_ok {
            let described: Vec<String> =
                deciders.iter().map(|d| d.describe()).filter(|t| !t.is_empty()).collect();
            tracing::info!(thresholds = %described.join("; "), "SIGHUP: configuration reloaded");
        }
    }
    config_ok
}

/// Spawns the decode workers, the scorer and the retry scheduler, all supervised.
#[allow(clippy::too_many_arguments)]
fn start_pipeline(
    cfg: &Config,
    per_model: Vec<Vec<ScoringStage>>,
    resolve: ResolveStage,
    retries: RetryScheduler,
    retry_rx: mpsc::Receiver<super::producer::OutputRecord>,
    output: &Arc<Output>,
    metrics: &Arc<Metrics>,
    faults: &Arc<Faults>,
    decoder: &Decoder,
    budget: &Arc<DecodeBudget>,
) -> Result<Pipeline, DaemonError> {
    let p = &cfg.pipeline;
    let (work_tx, consumed_rx) = mpsc::sync_channel::<Work>(p.in_flight_limit * 2);
    let (resolved_tx, resolved_rx) = mpsc::sync_channel::<Work>(p.in_flight_limit * 2);
    let work_rx = Arc::new(Mutex::new(resolved_rx));
    let mut threads = Vec::new();
    let resolver = supervise::spawn("dlsr-resolve", faults, {
        let faults = faults.clone();
        move || {
            if let Err(e) = resolve.run(consumed_rx, resolved_tx) {
                faults.record(e);
            }
        }
    });
    threads.push(resolver.map_err(DaemonError::Thread)?);
    // One decoded queue per model: a batch holds one model's items only.
    let mut routes = Vec::new();
    let mut queues = Vec::new();
    for stages in &per_model {
        let (tx, rx) = mpsc::sync_channel::<Decoded>(p.batch_max_size * 2);
        let preprocess =
            stages.first().map(|s| s.worker.scorer.model().preprocess).ok_or(DaemonError::NoScorer)?;
        routes.push(Route { preprocess, queue: tx });
        queues.push(Arc::new(Mutex::new(DecodedQueue::new(rx))));
    }
    let names: Vec<String> = per_model.iter().map(|s| s[0].worker.slot.name.clone()).collect();
    let by_topic = cfg
        .thresholds
        .topics
        .keys()
        .filter_map(|t| names.iter().position(|n| n == cfg.model_for_topic(t)).map(|i| (t.clone(), i)))
        .collect();
    let chain = InputChain {
        routes: Arc::new(Routes { models: routes, by_topic }),
        limits: p.decode_limits,
        decoder: decoder.clone(),
        budget: budget.clone(),
    };
    for i in 0..p.decode_workers {
        let (rx, out, m) = (work_rx.clone(), output.clone(), metrics.clone());
        let chain = chain.clone();
        let spawned =
            supervise::spawn(&format!("dlsr-decode-{i}"), faults, move || decode_worker(rx, chain, out, m));
        threads.push(spawned.map_err(DaemonError::Thread)?);
    }
    // The queues close when the decode workers (the routes' only senders) end.
    drop(chain);
    let total: usize = per_model.iter().map(Vec::len).sum();
    let (_, threads_each) = crate::device::scoring_workers(total, tch::Device::Cpu);
    let mut index = 0;
    for (stages, queue) in per_model.into_iter().zip(queues) {
        for stage in stages {
            let rx = queue.clone();
            let spawned = supervise::spawn(&format!("dlsr-scorer-{index}"), faults, move || {
                if total > 1 {
                    tch::set_num_threads(threads_each);
                }
                stage.run(&rx)
            });
            threads.push(spawned.map_err(DaemonError::Thread)?);
            index += 1;
        }
    }
    threads.push(
        supervise::spawn("dlsr-retry", faults, move || retries.run(retry_rx)).map_err(DaemonError::Thread)?,
    );
    Ok(Pipeline { work_tx, threads, window: None })
}

/// The window auditor's stage, when `audit.enabled`: one auditor per model against its
/// bundle's held-out sample (a kind the thresholds use must have one), and the summary
/// topic's producer.
fn window_stage(
    cfg: &Config,
    deciders: &[Arc<Decider>],
    metrics: &Arc<Metrics>,
    tracker: &Arc<Mutex<OffsetTracker>>,
) -> Result<Option<(super::window_stage::WindowStage, crate::audit::window::GroupBy)>, DaemonError> {
    let audit = &cfg.audit;
    if !audit.enabled {
        return Ok(None);
    }
    let factory = super::window_stage::AuditorFactory::from_config(audit)?;
    let group_by = factory.group_by.clone();
    let summary = match audit.summary_topic.trim() {
        "" => None,
        topic => Some((crate::kafka::settings::producer_config(&cfg.kafka)?, topic.to_string())),
    };
    let stage =
        super::window_stage::WindowStage::new(factory, deciders, summary, metrics.clone(), tracker.clone())
            .map_err(DaemonError::Audit)?;
    Ok(Some((stage, group_by)))
}

/// The HTTP listener for /metrics, /healthz and /readyz, on a one-thread runtime.
fn start_http(
    cfg: &Config,
    control: &Control,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
) -> Result<(tokio::runtime::Runtime, tokio::sync::watch::Sender<bool>), DaemonError> {
    let addr = cfg.metrics.listen.clone();
    let listen_error = |e: std::io::Error| DaemonError::Listen { addr: addr.clone(), reason: e.to_string() };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(listen_error)?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(&addr)).map_err(listen_error)?;
    if let (Ok(bound), Ok(mut slot)) = (listener.local_addr(), control.http_addr.lock()) {
        tracing::info!(%bound, "metrics listener");
        *slot = Some(bound);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    runtime.spawn(crate::telemetry::http::serve(listener, metrics.clone(), health.clone(), stop_rx));
    Ok((runtime, stop_tx))
}

/// A model's info, threshold and ID quantile gauges.
fn publish_model_metrics(metrics: &Metrics, d: &Decider) {
    let m = &d.model;
    metrics.set_model_info(&d.name, &m.model_ref.name, &m.model_ref.sha256, &m.encoder, m.preprocess.size);
    d.set_gauges(metrics);
}

/// The sections (`kafka.publish`, `model`, ...) in which `new` differs from the running
/// configuration, apart from the thresholds that SIGHUP applies.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (serde_json::to_value(running), serde_json::to_value(new));
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else {
        return Vec::new();
    };
    let mut changed = Vec::new();
    for (section, old) in a.iter().filter(|(k, _)| k.as_str() != "thresholds") {
        let new = b.get(section);
        match (old, new) {
            (serde_json::Value::Object(o), Some(serde_json::Value::Object(n))) => {
                for (key, value) in o {
                    if n.get(key) != Some(value) {
                        changed.push(format!("{section}.{key}"));
                    }
                }
            }
            (o, n) if Some(o) != n => changed.push(section.clone()),
            _ => {}
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Publish;

    #[test]
    fn a_reload_names_the_settings_only_a_restart_applies() {
        let running = Config::default();
        let mut new = running.clone();
        new.thresholds.default.value = Some(1.0);
        assert!(restart_only_changes(&running, &new).is_empty(), "thresholds apply on SIGHUP");
        new.kafka.publish =
            if running.kafka.publish == Publish::All { Publish::Flagged } else { Publish::All };
        new.pipeline.batch_max_size += 1;
        assert_eq!(restart_only_changes(&running, &new), ["kafka.publish", "pipeline.batch_max_size"]);
    }
}
