//! The scoring stage: decode workers (decode under limits, preprocess, seed), the batcher
//! (size or wait), scoring through an [`ItemScorer`], and verdicts judged against the
//! thresholds in force.
//!
//! Each configured model has its own decoded queue and scorer threads, so a batch holds
//! one model's items only; the decode workers preprocess an item for the model its topic
//! is routed to ([`Routes`]). Between batches a scorer takes up a hot swap or new
//! thresholds ([`super::models::Worker::refresh`]); the [`super::decide::Decider`] that
//! goes with its bundle turns scores into verdicts.
//!
//! [`ItemScorer`] is the seam between the pipeline and the model: preprocessed images and
//! seeds in, item scores out. [`BundleScorer`] is the real one (encoder + LFDN on the
//! configured device); the pipeline's tests use a stub, so offsets, retries, rebalances,
//! back-pressure and shutdown are tested in seconds without a fitted bundle.
//!
//! A batch whose scoring fails (a libtorch error such as CUDA running out of memory) is
//! split in halves and scored again, down to single items; only an item that fails alone
//! is dead-lettered (`scoring_failed`). An item whose scores are not finite is
//! dead-lettered (`non_finite_score`): it is never judged in-distribution and no verdict
//! with null fields is published.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tch::Tensor;

use super::consumer::Work;
use super::counters::Counters;
use super::decide::Outcome;
use super::models::{Worker, IDLE_CHECK};
use super::producer::Output;
use super::window_stage::{group_value, WindowFeedItem};
use crate::audit::window::GroupBy;
use crate::config::{ModelConfig, PipelineConfig};
use crate::data::{decode, Preprocess};
use crate::eval::calibration::Calibration;
use crate::kafka::message::{ModelRef, VerdictRecord};
use crate::model::bundle::Bundle;
use crate::model::features::FeatureExtractor;
use crate::model::score::{ItemScores, ScoreKind, ScoreSettings};
use crate::telemetry::metrics::Metrics;

/// What the pipeline needs to know of the model, fixed for a run.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The bundle's name and sha256, carried by every verdict.
    pub model_ref: ModelRef,
    /// The encoder's name (`efficientnet-lite0`, a TorchScript file's).
    pub encoder: String,
    /// How the decode workers turn images into the encoder's input.
    pub preprocess: Preprocess,
    /// Thresholds, ID quantiles and held-out scores (the window audit's reference).
    pub calibration: Calibration,
    /// The score that decides verdicts unless the thresholds name another.
    pub default_score: ScoreKind,
    /// Whether the bundle has the first-epoch weights the LR score needs.
    pub has_lr: bool,
}

/// Why the configured model could not be loaded (the daemon does not start).
#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Bundle(#[from] crate::model::bundle::BundleError),
    #[error("{path}: the bundle's scoring settings are unusable: {source}")]
    Settings {
        path: std::path::PathBuf,
        #[source]
        source: crate::model::score::ScoreError,
    },
    #[error("{path}: self-test failed: {source}")]
    SelfTest {
        path: std::path::PathBuf,
        #[source]
        source: crate::model::self_test::SelfTestError,
    },
    #[error("{path}: the file changed while its copies were loading; try again once it is written")]
    Changed { path: std::path::PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum ScoringError {
    #[error("assembling the batch (stack, pad or slice): {0}")]
    Stack(#[source] tch::TchError),
    #[error("encoder: {0}")]
    Encoder(#[source] crate::model::ModelError),
    #[error(transparent)]
    Score(#[from] crate::model::score::ScoreError),
    #[error("the scorer returned {got} scores for {want} items")]
    Count { got: usize, want: usize },
    /// Any other backend failure (stubs, future backends).
    #[error("{0}")]
    Backend(String),
}

/// Preprocessed images and seeds in, item scores out.
pub trait ItemScorer: Send {
    fn model(&self) -> &ModelInfo;
    /// `images` is `[B, 3, S, S]` on the CPU; `seeds[i]` seeds item i's noise.
    fn score(&mut self, images: &Tensor, seeds: &[u64]) -> Result<Vec<ItemScores>, ScoringError>;
}

/// The bundle's encoder and LFDN on the configured device.
pub struct BundleScorer {
    bundle: Bundle,
    extractor: FeatureExtractor,
    settings: ScoreSettings,
    info: ModelInfo,
}

impl BundleScorer {
    /// Loads the bundle and its encoder, checks its scoring settings and runs its
    /// self-test, so a bad bundle fails at start (or is refused by a swap) instead of
    /// dead-lettering the stream or judging it wrongly.
    pub fn load(cfg: &ModelConfig) -> Result<Self, ModelLoadError> {
        let mut scorer = Self::load_unchecked(cfg)?;
        scorer.self_test(cfg)?;
        Ok(scorer)
    }

    /// Scores the bundle's self-test items and compares them with its stored scores
    /// ([`crate::model::self_test`]); a bundle without a self-test passes with a warning.
    pub fn self_test(&mut self, cfg: &ModelConfig) -> Result<(), ModelLoadError> {
        let path = cfg.bundle.clone();
        let (Some(test), Some(images)) =
            (self.bundle.meta.self_test.clone(), self.bundle.self_test_images.as_ref())
        else {
            tracing::warn!(
                bundle = %path.display(),
                "the bundle has no self-test (fitted before dlsr kept one): it is served unchecked; refit to add one"
            );
            return Ok(());
        };
        let images = images.shallow_clone();
        let fail = |source| ModelLoadError::SelfTest { path: path.clone(), source };
        let scores = self
            .score(&images, &test.seeds)
            .map_err(|e| fail(crate::model::self_test::SelfTestError::Scoring(e.to_string())))?;
        let device = crate::model::self_test::device_kind(self.bundle.device);
        let passed = test
            .check(&scores, &self.info.calibration, self.extractor.encoder.precision(), device)
            .map_err(fail)?;
        tracing::debug!(bundle = %path.display(), worst = passed.worst_units, "self-test passed");
        Ok(())
    }

    /// [`Self::load`] without the self-test (the second and later worker copies).
    pub fn load_unchecked(cfg: &ModelConfig) -> Result<Self, ModelLoadError> {
        let device = cfg.device.resolve()?;
        let precision = cfg.precision;
        let bundle = Bundle::load(&cfg.bundle, device)?;
        let encoder = (!cfg.encoder.is_empty()).then_some(cfg.encoder.as_str());
        let extractor = bundle.load_encoder(encoder, precision)?;
        let settings = bundle.meta.scoring.clone();
        bundle
            .scorer(&settings)
            .validate()
            .map_err(|source| ModelLoadError::Settings { path: cfg.bundle.clone(), source })?;
        let info = ModelInfo {
            model_ref: ModelRef { name: bundle.name(), sha256: bundle.sha256.clone() },
            encoder: bundle.meta.encoder.name.clone(),
            preprocess: extractor.preprocess,
            calibration: bundle.meta.calibration.clone(),
            default_score: bundle.meta.default_score,
            has_lr: bundle.meta.has_first_epoch,
        };
        Ok(Self { bundle, extractor, settings, info })
    }
}

impl ItemScorer for BundleScorer {
    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn score(&mut self, images: &Tensor, seeds: &[u64]) -> Result<Vec<ItemScores>, ScoringError> {
        let real = images.size().first().copied().unwrap_or(0);
        let padded = pad_to_bucket(images).map_err(ScoringError::Stack)?;
        let features = self.extractor.extract(&padded).map_err(ScoringError::Encoder)?;
        // The LFDN runs on the real items only (its matrix products keep no per-shape state).
        let values = features.values.f_narrow(0, 0, real).map_err(ScoringError::Stack)?;
        Ok(self.bundle.scorer(&self.settings).score(&values, seeds)?)
    }
}

/// Seconds from a message's timestamp to `now_ms`; None for a timestamp in the future
/// (a producer's skewed clock: a 0 would pull the latency histogram down) or one so far
/// in the past that the difference overflows (a producer that wrote garbage).
pub fn end_to_end_seconds(now_ms: i64, timestamp_ms: Option<i64>) -> Option<f64> {
    let elapsed = now_ms.checked_sub(timestamp_ms?)?;
    (elapsed >= 0).then(|| elapsed as f64 / 1000.0)
}

/// The largest encoder batch size ([`batch_bucket`]) not above `items`.
pub fn batch_bucket_floor(items: i64) -> i64 {
    if items <= 64 {
        1i64 << (63 - (items.max(1) as u64).leading_zeros())
    } else {
        items / 64 * 64
    }
}

/// The encoder's batch sizes: powers of two, then multiples of 64.
pub fn batch_bucket(items: i64) -> i64 {
    if items <= 64 {
        (items.max(1) as u64).next_power_of_two() as i64
    } else {
        (items + 63) / 64 * 64
    }
}

/// Pads `[B, ...]` with zero images up to [`batch_bucket`]`(B)`. oneDNN compiles and
/// caches convolution primitives per input shape; the daemon's batches come in every
/// size from 1 to the maximum, so without padding its primitive cache would hold up to
/// 64 shapes per layer (memory grew by hundreds of MB), and with the cache off every
/// batch recompiled its primitives. With buckets there are at most 7 shapes up to 64,
/// so the cache stays on and memory stays bounded. An item's features do not depend
/// on the rest of its batch, so the padding changes no score.
pub fn pad_to_bucket(images: &Tensor) -> Result<Tensor, tch::TchError> {
    let size = images.size();
    let Some(&batch) = size.first() else { return Ok(images.shallow_clone()) };
    let target = batch_bucket(batch);
    if target == batch {
        return Ok(images.shallow_clone());
    }
    let mut pad_shape = size.clone();
    pad_shape[0] = target - batch;
    let zeros = Tensor::f_zeros(pad_shape.as_slice(), (images.kind(), images.device()))?;
    Tensor::f_cat(&[images.shallow_clone(), zeros], 0)
}

/// A decoded message waiting for its batch.
pub struct Decoded {
    pub work: Work,
    pub image: Tensor,
    pub seed: u64,
    /// When decoding finished: the start of the item's wait for a batch.
    pub decoded_at: Instant,
}

pub use crate::data::chain::{default_decoder, Decoder, DECODER_PANIC};

/// Decodes at least this large trim the allocator's free memory when they are done.
const LARGE_DECODE_BYTES: u64 = 64 << 20;

/// Where a decoded item goes: the model its topic is routed to, with that model's
/// preprocessing and decoded queue. Index 0 is the default model.
pub struct Routes {
    pub models: Vec<Route>,
    /// Topics routed to a model other than the default (`thresholds.topics.T.model`).
    pub by_topic: std::collections::BTreeMap<String, usize>,
}

pub struct Route {
    pub preprocess: Preprocess,
    pub queue: SyncSender<Decoded>,
}

impl Routes {
    pub fn for_topic(&self, topic: &str) -> &Route {
        &self.models[self.by_topic.get(topic).copied().unwrap_or(0)]
    }
}

/// What a decode worker turns bytes into tensors with.
#[derive(Clone)]
pub struct InputChain {
    pub routes: Arc<Routes>,
    pub limits: crate::data::DecodeLimits,
    pub decoder: Decoder,
    /// Shared by the decode workers: bytes of images being decoded.
    pub budget: Arc<super::budget::DecodeBudget>,
}

/// Decodes and preprocesses until the work channel closes; undecodable messages are
/// dead-lettered with their error code.
pub fn decode_worker(
    rx: Arc<Mutex<Receiver<Work>>>,
    chain: InputChain,
    output: Arc<Output>,
    metrics: Arc<Metrics>,
) {
    let InputChain { routes, limits, decoder, budget } = chain;
    loop {
        let work = match rx.lock() {
            Ok(r) => match r.recv() {
                Ok(w) => w,
                Err(_) => return,
            },
            Err(_) => return,
        };
        if work.skipped.is_some() {
            output.skipped_range(work);
            continue;
        }
        let started = Instant::now();
        // Reserve the image's peak bytes before decoding it (dimensions from its header);
        // a header the limits refuse is dead-lettered by the decode below.
        let bytes = work.image_bytes();
        let header = std::panic::catch_unwind(|| decode::dimensions(bytes, &limits));
        let reservation =
            header.ok().and_then(Result::ok).map(|(w, h)| budget.reserve(decode::decode_bytes(w, h)));
        let route = routes.for_topic(&work.record.source.topic);
        let result = crate::data::chain::decode_to_tensor(&decoder, bytes, &limits, &route.preprocess);
        // After a large image, hand its freed pages back at once rather than at the next
        // 5-second trim, so the next large one does not stack on top of them.
        if reservation.as_ref().is_some_and(|r| r.bytes() >= LARGE_DECODE_BYTES) {
            crate::memory::release_free_memory();
        }
        drop(reservation);
        metrics.decode_seconds.observe(started.elapsed().as_secs_f64());
        if matches!(result, Err(crate::data::chain::InputError::DecoderPanic(_))) {
            metrics.decoder_panics.inc();
        }
        match result {
            Ok((image, seed)) => {
                if route.queue.send(Decoded { work, image, seed, decoded_at: Instant::now() }).is_err() {
                    return;
                }
            }
            Err(e) => output.dead_letter(work, e.code(), &e.to_string()),
        }
    }
}

/// The decoded items waiting for a scorer: the channel from the decode workers and the
/// items a batch was cut short of (they go first). Shared by the scorers under a lock.
pub struct DecodedQueue {
    rx: Receiver<Decoded>,
    carried: std::collections::VecDeque<Decoded>,
}

impl DecodedQueue {
    pub fn new(rx: Receiver<Decoded>) -> Self {
        Self { rx, carried: std::collections::VecDeque::new() }
    }
}

/// Everything a scorer thread owns or shares.
pub struct ScoringStage {
    /// The model: this thread's own copy of the bundle (libtorch state is not shared
    /// between scorers), the decider that goes with it, and the slot a swap comes through.
    pub worker: Worker,
    /// Where verdicts and dead letters go.
    pub output: Arc<Output>,
    /// Score histograms, verdict counts, batch sizes and timings.
    pub metrics: Arc<Metrics>,
    /// The run's counts (verdicts, flagged).
    pub counters: Arc<Counters>,
    /// Batch size and wait.
    pub pipeline: PipelineConfig,
    /// The window auditor's feed (None: `audit.enabled = false`), and what its groups are.
    pub window_feed: Option<(SyncSender<WindowFeedItem>, GroupBy)>,
}

impl ScoringStage {
    /// Batches and scores until the decoded channel closes. Adaptive (wait 0): a batch is
    /// what is queued when the scorer is free, up to the maximum, cut down to a bucket
    /// size ([`batch_bucket_floor`]; the rest starts the next batch). Under load the
    /// queue grows while a batch runs, so the next one is larger. Cutting down instead of
    /// padding up keeps the encoder's shapes few without computing padding: a batch of
    /// 33 padded to 64 would cost almost twice as long and let the queue grow further.
    /// With a wait, a partial batch waits up to that long for more.
    /// Several scorers share `queue`; each takes its batch under the lock.
    pub fn run(mut self, queue: &Mutex<DecodedQueue>) {
        loop {
            let batch = match queue.lock() {
                Ok(mut q) => match self.next_batch(&mut q) {
                    Some(batch) => batch,
                    None => return,
                },
                Err(_) => return,
            };
            // After the wait for items, before scoring them: a swap published while this
            // scorer waited applies to the batch it got.
            self.take_up_swap();
            if batch.is_empty() {
                continue;
            }
            self.metrics.batch_size.observe(batch.len() as f64);
            let started = Instant::now();
            for d in &batch {
                self.metrics
                    .batch_wait_seconds
                    .observe(started.saturating_duration_since(d.decoded_at).as_secs_f64());
            }
            let scores = self.score_splitting(&batch);
            self.metrics.inference_seconds.observe(started.elapsed().as_secs_f64());
            for (d, s) in batch.into_iter().zip(scores) {
                match s {
                    Ok(s) => self.judge_and_publish(d.work, &s),
                    Err(e) => self.output.dead_letter(d.work, "scoring_failed", &e),
                }
            }
        }
    }

    /// Between batches: a swapped bundle or new thresholds take effect here.
    fn take_up_swap(&mut self) {
        if let Some(old) = self.worker.refresh() {
            let now = &self.worker.scorer.model().model_ref.sha256;
            tracing::info!(model = %self.worker.slot.name, from = %old, to = %now, "scorer switched bundles");
        }
    }

    /// The next batch (see [`Self::run`]); None when the channel closed and nothing is
    /// carried, empty when nothing came within [`IDLE_CHECK`] (the loop then looks for a
    /// swap, so an idle scorer lets go of a replaced bundle). Blocks on the channel only
    /// when nothing is carried, so a carried item never waits for a new message.
    fn next_batch(&self, queue: &mut DecodedQueue) -> Option<Vec<Decoded>> {
        let DecodedQueue { rx, carried } = queue;
        let wait = Duration::from_millis(self.pipeline.batch_max_wait_ms);
        let first = match carried.pop_front() {
            Some(d) => d,
            None => match rx.recv_timeout(IDLE_CHECK) {
                Ok(d) => d,
                Err(RecvTimeoutError::Timeout) => return Some(Vec::new()),
                Err(RecvTimeoutError::Disconnected) => return None,
            },
        };
        let mut batch = vec![first];
        let deadline = Instant::now() + wait;
        while batch.len() < self.pipeline.batch_max_size {
            if let Some(d) = carried.pop_front() {
                batch.push(d);
                continue;
            }
            let next = match rx.try_recv() {
                Ok(d) => Ok(d),
                Err(_) if wait.is_zero() => break,
                Err(_) => rx.recv_timeout(deadline.saturating_duration_since(Instant::now())),
            };
            match next {
                Ok(d) => batch.push(d),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if wait.is_zero() {
            let keep = batch_bucket_floor(batch.len() as i64) as usize;
            for d in batch.drain(keep.max(1)..).rev() {
                carried.push_front(d);
            }
        }
        Some(batch)
    }

    /// Scores `items`; a failing batch is split in halves down to single items, so one
    /// bad item (or a batch too large for the device) costs only that item.
    fn score_splitting(&mut self, items: &[Decoded]) -> Vec<Result<ItemScores, String>> {
        let images: Vec<&Tensor> = items.iter().map(|d| &d.image).collect();
        let seeds: Vec<u64> = items.iter().map(|d| d.seed).collect();
        let result = Tensor::f_stack(&images, 0)
            .map_err(ScoringError::Stack)
            .and_then(|x| self.worker.scorer.score(&x, &seeds))
            .and_then(|s| {
                if s.len() == items.len() {
                    Ok(s)
                } else {
                    Err(ScoringError::Count { got: s.len(), want: items.len() })
                }
            });
        match result {
            Ok(scores) => scores.into_iter().map(Ok).collect(),
            Err(e) if items.len() == 1 => vec![Err(e.to_string())],
            Err(e) => {
                self.metrics.scoring_splits.inc();
                tracing::warn!(items = items.len(), "scoring a batch failed, scoring its halves: {e}");
                let (a, b) = items.split_at(items.len() / 2);
                let mut out = self.score_splitting(a);
                out.extend(self.score_splitting(b));
                out
            }
        }
    }

    fn judge_and_publish(&self, work: Work, s: &ItemScores) {
        let m = &self.metrics;
        let topic = work.record.source.topic.clone();
        let decider = &self.worker.decider;
        let id = work.id();
        let (verdict, publish) = match decider.decide(&topic, &id, s) {
            Outcome::Judged { verdict, publish } => (verdict, publish),
            Outcome::DeadLetter { code, reason } => return self.output.dead_letter(work, code, &reason),
        };
        for kind in ScoreKind::ALL {
            if let Some(v) = s.get(kind) {
                m.record_score(&topic, &decider.name, kind, v);
            }
        }
        for (l, layer) in s.layers.iter().enumerate() {
            m.record_layer_cosine(l, layer.cos);
        }
        m.record_verdict(&topic, verdict.is_ood);
        self.counters.verdicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if verdict.is_ood {
            self.counters.flagged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(seconds) =
            end_to_end_seconds(crate::kafka::message::now_millis(), work.record.source.timestamp)
        {
            m.record_end_to_end(&topic, seconds);
        }
        if let Some((feed, group_by)) = &self.window_feed {
            let record = &work.record;
            let item = WindowFeedItem {
                topic: topic.clone(),
                group: group_value(group_by, &record.headers, work.resolved.group.as_deref()),
                partition: record.source.partition,
                offset: record.source.offset,
                timestamp: record.source.timestamp,
                id: verdict.id.clone(),
                kind: verdict.score_kind,
                score: verdict.score,
                threshold: verdict.threshold,
                flagged: verdict.is_ood,
                layer_cos: s.layers.iter().map(|l| l.cos).collect(),
                decider: decider.clone(),
            };
            // Bounded: an auditor that falls behind slows the scorer rather than growing
            // memory. A gone auditor (it panicked) is a fault its supervisor reports.
            let _ = feed.send(item);
        }
        if !publish {
            return self.output.done(work.ack());
        }
        let label = if verdict.is_ood { "ood" } else { "id" };
        let record = VerdictRecord::new(&verdict, &work.record.source, &decider.model.model_ref)
            .with_input(work.resolved.uri.as_deref(), work.resolved.input.as_ref());
        match serde_json::to_vec(&record) {
            Ok(value) => self.output.verdict(work, value, label),
            Err(e) => self.output.dead_letter(work, "scoring_failed", &e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #21: a timestamp in the future, or i64::MIN, from a producer; the
    /// subtraction overflowed on the latter.
    #[test]
    fn message_timestamps_from_the_future_or_garbage_give_no_latency() {
        assert_eq!(end_to_end_seconds(10_000, Some(7_500)), Some(2.5));
        assert_eq!(end_to_end_seconds(10_000, Some(20_000)), None);
        assert_eq!(end_to_end_seconds(10_000, Some(i64::MIN)), None);
        assert_eq!(end_to_end_seconds(10_000, None), None);
    }

    #[test]
    fn batches_are_padded_to_a_few_shapes() {
        let buckets: std::collections::BTreeSet<i64> = (1..=64).map(batch_bucket).collect();
        assert_eq!(buckets.into_iter().collect::<Vec<_>>(), [1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(batch_bucket(65), 128);
        let floors: Vec<i64> =
            [1, 2, 3, 7, 8, 9, 33, 64, 100, 130].into_iter().map(batch_bucket_floor).collect();
        assert_eq!(floors, [1, 2, 2, 4, 8, 8, 32, 64, 64, 128]);
        assert!((1..=300).all(|n| batch_bucket(batch_bucket_floor(n)) == batch_bucket_floor(n)));
        assert_eq!(batch_bucket(200), 256);
        let images = Tensor::ones([5, 3, 4, 4], (tch::Kind::Float, tch::Device::Cpu));
        let padded = pad_to_bucket(&images).unwrap();
        assert_eq!(padded.size(), [8, 3, 4, 4]);
        assert_eq!(padded.narrow(0, 0, 5).sum(tch::Kind::Float).double_value(&[]), 5.0 * 48.0);
        assert_eq!(padded.narrow(0, 5, 3).abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
    }
}
