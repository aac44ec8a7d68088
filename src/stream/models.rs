//! The served models and their hot swap.
//!
//! Each configured model (`[model]` is `default`, `[models.NAME]` the others) has a
//! [`ModelSlot`] shared by the daemon and the model's scorer threads. The slot holds the
//! current [`Generation`]: the [`Decider`] in force and, right after a bundle swap, the
//! new bundle's scorers waiting for the workers. A worker looks at the slot between
//! batches ([`Worker::refresh`]): it takes a waiting scorer if its own is of another
//! bundle, and takes the decider only when the decider belongs to the bundle it scores
//! with. So every verdict is wholly from one model (scores, thresholds, sha256), a batch
//! under way finishes on the model it started with, nothing in flight is redone, and
//! the old bundle's memory goes as each worker lets go of it: two bundles are in memory
//! only between the swap and each worker's next batch boundary (at most
//! [`IDLE_CHECK`] on an idle stream).
//!
//! [`load_checked`] is how a bundle becomes servable, at start and on reload: the
//! format, encoder, precision and scoring checks of [`BundleScorer::load`], the
//! bundle's self-test on this device ([`crate::model::self_test`]), and on a swap the
//! same encoder and input size as the bundle it replaces (items already preprocessed
//! for the old one are queued), and thresholds that resolve against its calibration.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::decide::Decider;
use super::scorer::{BundleScorer, ItemScorer, ModelInfo, ModelLoadError};
use crate::config::{Config, ModelConfig};

/// How often an idle worker looks for a swap (so an idle stream frees the old bundle).
pub const IDLE_CHECK: Duration = Duration::from_millis(500);

/// One decider and, after a swap, the new bundle's scorers not yet taken by a worker.
pub struct Generation {
    pub number: u64,
    pub decider: Arc<Decider>,
    waiting: Mutex<Vec<Box<dyn ItemScorer>>>,
}

impl Generation {
    fn take_scorer(&self) -> Option<Box<dyn ItemScorer>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }
}

/// A configured model as its workers and the daemon share it.
pub struct ModelSlot {
    pub name: String,
    current: RwLock<Arc<Generation>>,
}

impl ModelSlot {
    pub fn new(decider: Decider) -> Self {
        let name = decider.name.clone();
        let first = Generation { number: 0, decider: Arc::new(decider), waiting: Mutex::new(Vec::new()) };
        Self { name, current: RwLock::new(Arc::new(first)) }
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The decider in force (the newest; after a swap, the new bundle's).
    pub fn decider(&self) -> Arc<Decider> {
        self.current().decider.clone()
    }

    /// New thresholds for the bundle being served; a swap's scorers still waiting stay.
    pub fn set_decider(&self, decider: Decider) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let waiting = std::mem::take(&mut *current.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        *current = Arc::new(Generation {
            number: current.number + 1,
            decider: Arc::new(decider),
            waiting: Mutex::new(waiting),
        });
    }

    /// A new bundle: one scorer per worker, and its decider. Scorers of an earlier swap
    /// that no worker took yet are dropped.
    pub fn swap(&self, scorers: Vec<Box<dyn ItemScorer>>, decider: Decider) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(Generation {
            number: current.number + 1,
            decider: Arc::new(decider),
            waiting: Mutex::new(scorers),
        });
    }
}

/// A scorer thread's model: its scorer, the decider that goes with it, and the slot.
pub struct Worker {
    pub scorer: Box<dyn ItemScorer>,
    pub decider: Arc<Decider>,
    generation: u64,
    pub slot: Arc<ModelSlot>,
}

impl Worker {
    pub fn new(scorer: Box<dyn ItemScorer>, slot: Arc<ModelSlot>) -> Self {
        let current = slot.current();
        Self { scorer, decider: current.decider.clone(), generation: current.number, slot }
    }

    /// Between batches: takes up a swap or new thresholds (see the module docs). Returns
    /// the sha256 of the bundle this worker let go of, if it swapped.
    pub fn refresh(&mut self) -> Option<String> {
        let current = self.slot.current();
        if current.number == self.generation {
            return None;
        }
        let want = &current.decider.model.model_ref.sha256;
        let mut swapped = None;
        if &self.scorer.model().model_ref.sha256 != want {
            if let Some(scorer) = current.take_scorer() {
                let old = std::mem::replace(&mut self.scorer, scorer);
                swapped = Some(old.model().model_ref.sha256.clone());
            }
        }
        if &self.scorer.model().model_ref.sha256 == want {
            self.decider = current.decider.clone();
            self.generation = current.number;
        }
        swapped
    }
}

/// Why a bundle was not put in service.
#[derive(Debug, thiserror::Error)]
pub enum RejectReason {
    #[error(transparent)]
    Load(#[from] ModelLoadError),
    #[error(
        "the new bundle needs encoder {new_encoder} at {new_px} px, the running one {old_encoder} at {old_px} px: \
         items already preprocessed for the running bundle are queued, so a swap keeps both (restart to change)"
    )]
    Incompatible { new_encoder: String, new_px: i64, old_encoder: String, old_px: i64 },
    #[error("its thresholds do not resolve: {0}")]
    Thresholds(#[from] crate::config::ConfigError),
    #[error("loading it panicked: {0}")]
    Panicked(String),
}

/// `workers` scorers of the bundle `model` names, each checked (see [`BundleScorer::load`])
/// and the first self-tested, and the decider of `cfg` for model `name` against it;
/// `running` is the bundle it would replace (a swap keeps encoder and input size).
pub fn load_checked(
    cfg: &Config,
    name: &str,
    model: &ModelConfig,
    workers: usize,
    running: Option<&ModelInfo>,
) -> Result<(Vec<Box<dyn ItemScorer>>, Decider), RejectReason> {
    let first = BundleScorer::load(model)?;
    let info = first.model().clone();
    if let Some(old) = running {
        if old.encoder != info.encoder || old.preprocess != info.preprocess {
            return Err(RejectReason::Incompatible {
                new_encoder: info.encoder.clone(),
                new_px: info.preprocess.size,
                old_encoder: old.encoder.clone(),
                old_px: old.preprocess.size,
            });
        }
    }
    let decider = Decider::resolve(cfg, name, info)?;
    let mut scorers: Vec<Box<dyn ItemScorer>> = vec![Box::new(first)];
    for _ in 1..workers.max(1) {
        let next = BundleScorer::load_unchecked(model)?;
        // The file could change between two reads: every worker serves the same bytes.
        if next.model().model_ref.sha256 != decider.model.model_ref.sha256 {
            return Err(ModelLoadError::Changed { path: model.bundle.clone() }.into());
        }
        scorers.push(Box::new(next));
    }
    Ok((scorers, decider))
}

/// The bundle file's sha256, or why it cannot be read (a reload then reports it).
pub fn file_sha256(path: &Path) -> Result<String, String> {
    crate::model::sha256_file(path).map_err(|e| e.to_string())
}

/// What a reload did to one model.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The same bundle: new thresholds only.
    Thresholds,
    /// The same bundle, and the new thresholds do not resolve against it.
    ThresholdsRejected(String),
    /// A new bundle now serves (old sha256, new sha256).
    Swapped { from: String, to: String },
    /// A new bundle failed a check; the old one keeps scoring.
    Rejected { sha256: Option<String>, reason: String },
}

/// Reloads model `name` in `slot` under `cfg`: if its bundle file changed, loads,
/// checks and swaps it in; otherwise resolves `cfg`'s thresholds again. Panics while
/// loading are caught and reported as a rejection.
pub fn reload(cfg: &Config, slot: &ModelSlot, workers: usize) -> ReloadOutcome {
    let Some((name, model)) = cfg.all_models().into_iter().find(|(n, _)| *n == slot.name) else {
        return ReloadOutcome::Rejected {
            sha256: None,
            reason: format!("model {} is not configured", slot.name),
        };
    };
    let running = slot.decider();
    let on_disk = match file_sha256(&model.bundle) {
        Ok(sha) => sha,
        Err(reason) => return ReloadOutcome::Rejected { sha256: None, reason },
    };
    if on_disk == running.model.model_ref.sha256 {
        return match Decider::resolve(cfg, name, running.model.clone()) {
            Ok(decider) => {
                slot.set_decider(decider);
                ReloadOutcome::Thresholds
            }
            Err(e) => ReloadOutcome::ThresholdsRejected(e.to_string()),
        };
    }
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        load_checked(cfg, name, model, workers, Some(&running.model))
    }))
    .unwrap_or_else(|panic| Err(RejectReason::Panicked(crate::data::chain::panic_message(&panic))));
    match loaded {
        Ok((scorers, decider)) => {
            let to = decider.model.model_ref.sha256.clone();
            slot.swap(scorers, decider);
            ReloadOutcome::Swapped { from: running.model.model_ref.sha256.clone(), to }
        }
        Err(e) => ReloadOutcome::Rejected { sha256: Some(on_disk), reason: format!("{e:#}") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::score::ItemScores;
    use crate::stream::scorer::ScoringError;

    struct Stub(ModelInfo);

    impl ItemScorer for Stub {
        fn model(&self) -> &ModelInfo {
            &self.0
        }
        fn score(&mut self, _: &tch::Tensor, _: &[u64]) -> Result<Vec<ItemScores>, ScoringError> {
            Ok(Vec::new())
        }
    }

    fn info(sha: char) -> ModelInfo {
        use crate::stream::decide::tests::{calibration, model_with};
        model_with(sha, calibration())
    }

    fn decider(sha: char, value: f64) -> Decider {
        let mut cfg = Config::default();
        cfg.thresholds.default.value = Some(value);
        Decider::resolve(&cfg, "default", info(sha)).unwrap()
    }

    fn sha(w: &Worker) -> char {
        w.scorer.model().model_ref.sha256.chars().next().unwrap()
    }

    #[test]
    fn workers_take_a_swap_at_their_next_batch_and_never_judge_with_another_bundles_thresholds() {
        let slot = Arc::new(ModelSlot::new(decider('a', 1.0)));
        let mut w1 = Worker::new(Box::new(Stub(info('a'))), slot.clone());
        let mut w2 = Worker::new(Box::new(Stub(info('a'))), slot.clone());
        assert_eq!(w1.refresh(), None);
        slot.swap(vec![Box::new(Stub(info('b'))), Box::new(Stub(info('b')))], decider('b', 2.0));
        // New thresholds for B before w2 took its scorer: w2's B scorer still waits.
        slot.set_decider(decider('b', 3.0));
        assert_eq!(w1.refresh().as_deref().map(|s| &s[..1]), Some("a"));
        assert_eq!((sha(&w1), w1.decider.thresholds.default.value), ('b', 3.0));
        assert_eq!(w1.refresh(), None, "nothing more to take");
        assert!(w2.refresh().is_some());
        assert_eq!((sha(&w2), w2.decider.thresholds.default.value), ('b', 3.0));
        // A third worker with nothing left to take keeps its bundle and its own decider.
        let mut w3 = Worker::new(Box::new(Stub(info('a'))), slot.clone());
        w3.decider = Arc::new(decider('a', 1.0));
        w3.generation = 0;
        assert_eq!(w3.refresh(), None);
        assert_eq!((sha(&w3), w3.decider.thresholds.default.value), ('a', 1.0));
    }
}
