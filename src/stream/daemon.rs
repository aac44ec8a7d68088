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
//! the old thresholds stay).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::producer::{Producer, PurgeConfig};

use super::budget::DecodeBudget;
use super::consumer::{ConsumerCtx, ConsumerStage, Work};
use super::kafka::{consumer_config, producer_config};
use super::offsets::OffsetTracker;
use super::producer::{Output, OutputBlocks, OutputTopics, RetryScheduler};
use super::resolve::{FetchHealth, ResolveStage};
use super::scorer::{
    decode_worker, default_decoder, BundleScorer, Decoded, DecodedQueue, Decoder, InputChain, ItemScorer,
    ModelInfo, ScoringStage,
};
use super::supervise::{self, Faults};
use super::thresholds::Thresholds;
use crate::config::{Config, ConfigError};
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
    #[error("no scorer was given")]
    NoScorer,
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

/// Counts shared by the stages (the run's [`Summary`]).
#[derive(Debug, Default)]
pub struct Counters {
    pub consumed: AtomicU64,
    pub verdicts: AtomicU64,
    pub flagged: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Records the broker acknowledged.
    pub published: AtomicU64,
}

/// Loads the configured bundle and runs the daemon until `control.shutdown` is set.
pub fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    control: Control,
    metrics: Arc<Metrics>,
) -> Result<Summary, DaemonError> {
    cfg.validate()?;
    let device = cfg.model.device.resolve().map_err(super::scorer::ModelLoadError::from)?;
    let (workers, _) = crate::device::scoring_workers(cfg.pipeline.scorer_workers, device);
    let scorers = (0..workers)
        .map(|_| BundleScorer::load(&cfg.model).map(|s| Box::new(s) as Box<dyn ItemScorer>))
        .collect::<Result<Vec<_>, _>>()?;
    run_with_scorer(cfg, config_path, control, metrics, scorers)
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
    model: ModelInfo,
    /// Thresholds in force, shared with the scorer; swapped on SIGHUP.
    thresholds: Arc<RwLock<Thresholds>>,
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
}

/// Runs the daemon with any [`ItemScorer`] until `control.shutdown` is set or a fault.
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
    cfg.validate()?;
    let model = scorers.first().ok_or(DaemonError::NoScorer)?.model().clone();
    let thresholds =
        Thresholds::resolve(&cfg.thresholds, &model.calibration, model.default_score, model.has_lr)?;
    publish_model_metrics(&metrics, &cfg, &model, &thresholds);
    let health = Arc::new(Health::new(false));
    health.set(Some("starting".into()));
    let (runtime, http_stop) = start_http(&cfg, &control, &metrics, &health)?;

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
    let window = window_stage(&cfg, &model, &thresholds, &metrics, &tracker)?;
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
    let inputs =
        cfg.kafka.input_topics.iter().filter_map(|t| super::topic_watch::InputSpec::parse(t).ok()).collect();
    let watcher = super::topic_watch::spawn(
        super::kafka::connection_config(&cfg.kafka)?,
        inputs,
        vec![cfg.kafka.output_topic.clone(), cfg.kafka.dead_letter_topic.clone()],
        consumer.ctx().input_faults.clone(),
        metrics.clone(),
        watch_stop.clone(),
    )
    .map_err(DaemonError::Thread)?;

    let thresholds_text = describe_thresholds(&cfg, &thresholds, &model.calibration);
    let thresholds = Arc::new(RwLock::new(thresholds));
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
    let stages = scorers
        .into_iter()
        .map(|scorer| ScoringStage {
            scorer,
            thresholds: thresholds.clone(),
            output: output.clone(),
            metrics: metrics.clone(),
            counters: counters.clone(),
            pipeline: cfg.pipeline.clone(),
            publish: cfg.kafka.publish,
            window_feed: feed.clone(),
        })
        .collect();
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
        &cfg, &model, stages, resolve, retries, retry_rx, &output, &metrics, &faults, &decoder, &budget,
    )?;
    if let Some((stage, rx)) = window {
        let spawned = supervise::spawn("dlsr-window", &faults, move || stage.run(rx));
        pipeline.window = Some(spawned.map_err(DaemonError::Thread)?);
    }
    tracing::info!(
        topics = ?cfg.kafka.input_topics,
        brokers = %cfg.kafka.brokers,
        group = %cfg.kafka.group_id,
        model = %model.model_ref.name,
        sha256 = %model.model_ref.sha256,
        encoder = %model.encoder,
        input_px = model.preprocess.size,
        device = ?cfg.model.device,
        precision = %cfg.model.precision,
        thresholds = %thresholds_text,
        config = %config_path.as_deref().map_or_else(|| "built-in defaults and DLSR__* environment".into(), |p| p.display().to_string()),
        "dlsr serving"
    );

    let mut daemon = Daemon {
        cfg,
        config_path,
        control,
        consumer,
        pipeline,
        output,
        model,
        thresholds,
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
    };
    daemon.serve();
    let result = daemon.shutdown();
    watch_stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let _ = http_stop.send(true);
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}

impl Daemon {
    /// Serves until shutdown or a fault: polls, dispatches, keeps commits, lag,
    /// readiness and back-pressure up to date.
    fn serve(&mut self) {
        let limit = self.cfg.pipeline.in_flight_limit;
        let mut last_housekeeping = Instant::now() - Duration::from_secs(1);
        let mut last_trim = Instant::now();
        while !self.control.shutdown.load(Ordering::Relaxed) && !self.faults.any() {
            if self.control.reload.swap(false, Ordering::Relaxed) {
                let path = self.config_path.as_deref();
                reload_thresholds(path, &self.model, &self.thresholds, &self.metrics, &self.cfg);
            }
            let in_flight = self.consumer.tick(limit);
            self.metrics.in_flight.set(in_flight as i64);
            let bytes = self.consumer.payloads.held() + self.budget.used();
            self.metrics.in_flight_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            self.summary.max_in_flight = self.summary.max_in_flight.max(in_flight);
            if last_housekeeping.elapsed() >= Duration::from_millis(250) {
                last_housekeeping = Instant::now();
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
        let Daemon { cfg, mut consumer, pipeline, output, health, faults, counters, mut summary, .. } = self;
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
        match faults.first() {
            Some(f) => Err(DaemonError::Fault(f)),
            None => Ok(summary),
        }
    }
}

/// Spawns the decode workers, the scorer and the retry scheduler, all supervised.
#[allow(clippy::too_many_arguments)]
fn start_pipeline(
    cfg: &Config,
    model: &ModelInfo,
    stages: Vec<ScoringStage>,
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
    let (decoded_tx, decoded_rx) = mpsc::sync_channel::<Decoded>(p.batch_max_size * 2);
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
    let chain = InputChain {
        preprocess: model.preprocess,
        limits: p.decode_limits,
        decoder: decoder.clone(),
        budget: budget.clone(),
    };
    for i in 0..p.decode_workers {
        let (rx, tx, out, m) = (work_rx.clone(), decoded_tx.clone(), output.clone(), metrics.clone());
        let chain = chain.clone();
        let spawned = supervise::spawn(&format!("dlsr-decode-{i}"), faults, move || {
            decode_worker(rx, tx, chain, out, m)
        });
        threads.push(spawned.map_err(DaemonError::Thread)?);
    }
    drop(decoded_tx);
    // Scorers share the decoded queue; each forms its batches under its lock.
    let decoded_rx = Arc::new(Mutex::new(DecodedQueue::new(decoded_rx)));
    let (workers, threads_each) = crate::device::scoring_workers(stages.len(), tch::Device::Cpu);
    for (i, stage) in stages.into_iter().enumerate() {
        let rx = decoded_rx.clone();
        let spawned = supervise::spawn(&format!("dlsr-scorer-{i}"), faults, move || {
            if workers > 1 {
                tch::set_num_threads(threads_each);
            }
            stage.run(&rx)
        });
        threads.push(spawned.map_err(DaemonError::Thread)?);
    }
    threads.push(
        supervise::spawn("dlsr-retry", faults, move || retries.run(retry_rx)).map_err(DaemonError::Thread)?,
    );
    Ok(Pipeline { work_tx, threads, window: None })
}

/// The window auditor's stage, when `audit.enabled`: the held-out ID sample of every
/// score kind the bundle calibrated (a kind the thresholds use must have one), and the
/// summary topic's producer.
fn window_stage(
    cfg: &Config,
    model: &ModelInfo,
    thresholds: &Thresholds,
    metrics: &Arc<Metrics>,
    tracker: &Arc<Mutex<OffsetTracker>>,
) -> Result<Option<(super::window_stage::WindowStage, crate::audit::window::GroupBy)>, DaemonError> {
    use crate::audit::window::{Reference, WindowAuditor};
    let audit = &cfg.audit;
    if !audit.enabled {
        return Ok(None);
    }
    let settings = audit.settings()?;
    let group_by = audit.group_by()?;
    let in_use: Vec<crate::model::score::ScoreKind> =
        std::iter::once(thresholds.default.kind).chain(thresholds.topics.values().map(|t| t.kind)).collect();
    let mut references = Vec::new();
    for &kind in model.calibration.scores.keys() {
        match Reference::from_calibration(&model.calibration, kind, audit.allow_quantile_reference) {
            Ok((reference, warning)) => {
                if let (Some(w), true) = (warning, in_use.contains(&kind)) {
                    tracing::warn!("window audit: {w}");
                }
                references.push(reference);
            }
            Err(e) if in_use.contains(&kind) => return Err(DaemonError::Audit(e.to_string())),
            Err(_) => {}
        }
    }
    let auditor = WindowAuditor::new(settings, group_by.clone(), references, WindowAuditor::run_now())
        .map_err(|e| DaemonError::Audit(e.to_string()))?;
    let summary = match audit.summary_topic.trim() {
        "" => None,
        topic => Some((super::kafka::producer_config(&cfg.kafka)?, topic.to_string())),
    };
    let stage = super::window_stage::WindowStage::new(auditor, summary, metrics.clone(), tracker.clone())
        .map_err(|e| DaemonError::Kafka(format!("summary producer: {e}")))?;
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

/// The model's and the thresholds' gauges, and every input topic's series at 0.
fn publish_model_metrics(metrics: &Metrics, cfg: &Config, model: &ModelInfo, thresholds: &Thresholds) {
    metrics.set_model_info(
        &model.model_ref.name,
        &model.model_ref.sha256,
        &model.encoder,
        model.preprocess.size,
    );
    update_threshold_gauges(metrics, cfg, thresholds, &model.calibration);
    for topic in &cfg.kafka.input_topics {
        metrics.start_topic(topic);
    }
    // The ID score quantiles the alert rules compare the live median against.
    for (kind, cal) in &model.calibration.scores {
        for (p, label) in [(0.5, "0.5"), (0.95, "0.95"), (0.99, "0.99")] {
            metrics.set_id_quantile(*kind, label, cal.id_quantile(p));
        }
    }
}

/// Thresholds in force and the ID false-positive rate each implies; cleared first so a
/// reload that changes a topic's score kind leaves no stale series behind.
fn update_threshold_gauges(
    metrics: &Metrics,
    cfg: &Config,
    t: &Thresholds,
    calibration: &crate::eval::calibration::Calibration,
) {
    metrics.clear_thresholds();
    for topic in &cfg.kafka.input_topics {
        let thr = t.for_topic(topic);
        let fpr = calibration.scores.get(&thr.kind).map(|c| {
            let rate = c.id_exceedance(thr.value);
            (rate, crate::eval::calibration::rate_interval(rate, calibration.items))
        });
        metrics.set_threshold(topic, thr.kind, thr.value, fpr);
    }
}

/// The thresholds in force per input topic, for people: `images: mfsim > -0.9926
/// (ID rate 5.00%)`.
fn describe_thresholds(
    cfg: &Config,
    t: &Thresholds,
    calibration: &crate::eval::calibration::Calibration,
) -> String {
    cfg.kafka
        .input_topics
        .iter()
        .map(|topic| {
            let thr = t.for_topic(topic);
            let rate = calibration
                .scores
                .get(&thr.kind)
                .map_or(String::new(), |c| format!(" (ID rate {:.2}%)", c.id_exceedance(thr.value) * 100.0));
            format!("{topic}: {} > {}{rate}", thr.kind, thr.value)
        })
        .collect::<Vec<_>>()
        .join("; ")
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

fn reload_thresholds(
    path: Option<&std::path::Path>,
    model: &ModelInfo,
    thresholds: &RwLock<Thresholds>,
    metrics: &Metrics,
    running: &Config,
) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: no configuration file to reload");
        metrics.record_reload(false);
        return;
    };
    // The whole file must be valid; only its thresholds take effect without a restart.
    let result = Config::load(Some(path)).and_then(|new| {
        Thresholds::resolve(&new.thresholds, &model.calibration, model.default_score, model.has_lr)
            .map(|t| (t, new))
    });
    match result {
        Ok((t, new)) => {
            update_threshold_gauges(metrics, running, &t, &model.calibration);
            let old = match thresholds.write() {
                Ok(mut w) => std::mem::replace(&mut *w, t.clone()),
                Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), t.clone()),
            };
            metrics.record_reload(true);
            tracing::info!(
                old = %describe_thresholds(running, &old, &model.calibration),
                new = %describe_thresholds(running, &t, &model.calibration),
                "SIGHUP: thresholds reloaded"
            );
            let ignored = restart_only_changes(running, &new);
            if !ignored.is_empty() {
                tracing::warn!(
                    sections = %ignored.join(", "),
                    "SIGHUP: the reloaded file also changes settings that only a restart applies; they are \
                     not in force"
                );
            }
        }
        Err(e) => {
            metrics.record_reload(false);
            tracing::error!("SIGHUP: new configuration rejected, keeping the old one: {e}");
        }
    }
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

    #[test]
    fn thresholds_are_described_per_topic_with_their_id_rate() {
        use crate::eval::calibration::{calibrate_scores, Calibration};
        use crate::model::score::ScoreKind;
        let scores: Vec<f64> = (1..=100).map(f64::from).collect();
        let calibration = Calibration {
            target_fpr: 0.05,
            items: 100,
            source: "test".into(),
            precision: Default::default(),
            scores: [(ScoreKind::Mfsim, calibrate_scores(&scores, 0.05).unwrap())].into(),
            layer_cos: Vec::new(),
        };
        let t = Thresholds {
            default: crate::stream::thresholds::Threshold { kind: ScoreKind::Mfsim, value: 95.0 },
            topics: Default::default(),
        };
        let text = describe_thresholds(&Config::default(), &t, &calibration);
        assert!(text.starts_with("images: mfsim > 95 (ID rate 5."), "{text}");
    }
}
