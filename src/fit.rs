//! `fit` as a library function: encode the ID set (through the feature cache), hold out a
//! calibration part, train the LFDN, calibrate thresholds on the held-out scores, and
//! write the bundle. Everything the CLI prints comes back in [`FitReport`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use tch::{Device, Tensor};

use crate::data::DataSet;
use crate::encode::{encode_set_cached, EncodeOptions};
use crate::eval::calibration::{Calibration, CalibrationError};
use crate::model::bundle::{self, BundleError, BundleMeta, TrainingRecord, BUNDLE_FORMAT, BUNDLE_VERSION};
use crate::model::encoder::EncoderSpec;
use crate::model::features::FeatureExtractor;
use crate::model::lfdn::LfdnConfig;
use crate::model::schedule::Schedule;
use crate::model::score::{default_mfsim_layers, score_all, ScoreError, ScoreKind, ScoreSettings};
use crate::model::train::{train, TrainConfig, TrainError};
use crate::model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{0}")]
    Invalid(String),
    #[error("tensor operation failed: {0}")]
    Tch(#[from] tch::TchError),
}

pub struct FitOptions {
    pub data: String,
    pub limit: Option<usize>,
    pub out: PathBuf,
    pub encoder_source: EncoderSpec,
    /// LFDN width (None: twice the feature size, the paper's choice) and depth; the
    /// dimension is filled in from the features.
    pub width: Option<i64>,
    pub depth: usize,
    pub train: TrainConfig,
    pub holdout_fraction: f64,
    /// Normalise MFsim per layer by the held-out items' statistics (`ScoreSettings::layer_norm`).
    pub layer_norm: bool,
    pub target_fpr: f64,
    pub scoring: ScoreSettings,
    pub default_score: ScoreKind,
    pub encode: EncodeOptions,
    pub cache: Option<PathBuf>,
    pub device: Device,
}

pub struct FitReport {
    pub meta: BundleMeta,
    pub encode_seconds: f64,
    pub features_cached: bool,
    pub skipped: BTreeMap<&'static str, usize>,
    pub calibrate_seconds: f64,
}

/// A seeded shuffle of 0..n (Fisher-Yates over splitmix64), independent of libtorch.
pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed ^ 0x5DEE_CE66_D1CE_5EED;
    let mut next = || crate::model::score::splitmix64(&mut state);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn select(values: &Tensor, idx: &[usize]) -> Result<Tensor, tch::TchError> {
    let idx: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
    values.f_index_select(0, &Tensor::f_from_slice(&idx)?)
}

pub fn fit(
    extractor: &FeatureExtractor,
    opts: &FitOptions,
    interrupted: &AtomicBool,
) -> Result<FitReport, FitError> {
    if !(0.0..1.0).contains(&opts.holdout_fraction) || opts.holdout_fraction == 0.0 {
        return Err(FitError::Invalid(format!(
            "holdout fraction {} must be in (0, 1)",
            opts.holdout_fraction
        )));
    }
    if opts.default_score == ScoreKind::Lr && !opts.train.keep_first_epoch {
        return Err(FitError::Invalid("the LR score needs the first-epoch weights".into()));
    }
    let set = DataSet::open(&opts.data)?.with_limit(opts.limit);
    let encoded = encode_set_cached(extractor, &set, &opts.encode, opts.cache.as_deref())?;
    let n = encoded.ids.len();
    if n < 2 {
        return Err(FitError::Invalid(format!(
            "{}: {n} usable item(s); fitting needs at least 2",
            opts.data
        )));
    }
    let holdout = ((n as f64 * opts.holdout_fraction).round() as usize).clamp(1, n - 1);
    let order = shuffled_indices(n, opts.train.seed as u64);
    let (hold_idx, train_idx) = order.split_at(holdout);
    let train_values = select(&encoded.values, train_idx)?;
    let hold_values = select(&encoded.values, hold_idx)?;
    let hold_seeds: Vec<u64> = hold_idx.iter().map(|&i| encoded.seeds[i]).collect();

    let dim = encoded.offsets.dim();
    let config = LfdnConfig { dim, width: opts.width.unwrap_or(2 * dim), depth: opts.depth };
    if config.width < 2 || config.depth == 0 {
        return Err(FitError::Invalid(format!(
            "LFDN width {} and depth {} must be >= 2 and >= 1",
            config.width, config.depth
        )));
    }
    let schedule = Schedule::dlsr();
    let mut scoring = opts.scoring.clone();
    if scoring.mfsim_layers.is_none() {
        scoring.mfsim_layers = Some(default_mfsim_layers(encoded.offsets.layers()));
    }
    scoring.check(schedule.steps, encoded.offsets.layers())?;
    let trained =
        train(&train_values, config, &schedule, &opts.train, opts.device, opts.encode.quiet, interrupted)?;

    let started = std::time::Instant::now();
    let scorer_with = |settings| crate::model::score::Scorer {
        final_model: &trained.ema.1,
        first_epoch_model: trained.first_epoch.as_ref().map(|f| &f.1),
        schedule: &schedule,
        settings,
        offsets: &encoded.offsets,
        device: opts.device,
    };
    let plain_settings = scoring.clone();
    let plain = scorer_with(&plain_settings);
    plain.validate()?;
    let mut hold_scores = score_all(&plain, &hold_values, &hold_seeds, 256)?;
    if opts.layer_norm {
        // The statistics come from the held-out items' own cosines (scoring with them
        // would be circular); MFsim of every held-out item is then recomputed from its
        // per-layer cosines, which the normalisation does not change.
        let stats = Calibration::layer_stats(&hold_scores);
        let chosen = scoring.layers_in_use(encoded.offsets.layers());
        for s in &mut hold_scores {
            s.mfsim = crate::model::score::mfsim_with(&s.layers, &chosen, Some(&stats));
        }
        scoring.layer_norm = Some(stats);
    }
    let scorer = scorer_with(&scoring);
    scorer.validate()?;
    let per_score = by_kind(&hold_scores);
    let calibration = Calibration::build(
        &per_score,
        opts.target_fpr,
        &format!("{} (held-out {holdout})", opts.data),
        extractor.encoder.precision(),
    )?
    .with_layers(&hold_scores);
    // The scores share the held-out count, so their notes usually say the same: once each.
    let notes: std::collections::BTreeSet<&str> =
        calibration.scores.values().filter_map(|c| c.note.as_deref()).collect();
    for note in notes {
        tracing::warn!("calibration: {note}");
    }
    let self_test = self_test_items(
        &set,
        extractor,
        &opts.encode.limits,
        (&encoded.ids, &encoded.seeds, encoded.skipped.len()),
        hold_idx,
        &scorer,
        opts.device,
    )?;
    let calibrate_seconds = started.elapsed().as_secs_f64();

    let meta = BundleMeta {
        format: BUNDLE_FORMAT.into(),
        format_version: BUNDLE_VERSION,
        dlsr_version: env!("CARGO_PKG_VERSION").into(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        encoder: extractor.encoder.identity().clone(),
        encoder_source: opts.encoder_source.clone(),
        preprocess: extractor.preprocess,
        offsets: encoded.offsets.clone(),
        lfdn: config,
        schedule,
        scoring,
        default_score: opts.default_score,
        calibration,
        training: TrainingRecord {
            data: opts.data.clone(),
            train_items: n - holdout,
            holdout_items: holdout,
            skipped_items: encoded.skipped.len(),
            precision: extractor.encoder.precision(),
            config: opts.train.clone(),
            summary: trained.summary,
            encode_seconds: encoded.seconds,
        },
        has_first_epoch: trained.first_epoch.is_some(),
        self_test: self_test.as_ref().map(|(t, _)| t.clone()),
    };
    if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(TrainError::Interrupted.into());
    }
    bundle::save(
        &opts.out,
        &meta,
        &trained.ema.0,
        trained.first_epoch.as_ref().map(|f| &f.0),
        self_test.as_ref().map(|(_, images)| images),
    )?;
    Ok(FitReport {
        meta,
        encode_seconds: encoded.seconds,
        features_cached: encoded.cached,
        skipped: encoded.skipped_by_code(),
        calibrate_seconds,
    })
}

/// The bundle's self-test (see [`crate::model::self_test`]): the first held-out items,
/// read and preprocessed again from the data set, encoded and scored as a daemon will
/// score them. `encoded` is the encoded set's ids, seeds and number of skipped items (an
/// encoded item's index in the set is its position plus at most that many). None when
/// no item could be read again (a data set that changed since it was cached).
fn self_test_items(
    set: &DataSet,
    extractor: &FeatureExtractor,
    limits: &crate::data::DecodeLimits,
    encoded: (&[String], &[u64], usize),
    hold_idx: &[usize],
    scorer: &crate::model::score::Scorer,
    device: Device,
) -> Result<Option<(crate::model::self_test::SelfTest, Tensor)>, FitError> {
    use crate::model::self_test::{device_kind, SelfTest, StoredScores, SELF_TEST_ITEMS};
    let (ids, seeds, skipped) = encoded;
    let (mut images, mut chosen) = (Vec::new(), Vec::new());
    for &i in hold_idx.iter().take(SELF_TEST_ITEMS) {
        let last = (i + skipped).min(set.len().saturating_sub(1));
        let Some(item) = (i..=last).find_map(|j| set.get(j).ok().filter(|item| item.id == ids[i])) else {
            continue;
        };
        let Ok(image) = crate::data::source::decode_item(&item, limits) else { continue };
        let Ok((tensor, seed)) = crate::data::chain::to_tensor(&image, &extractor.preprocess) else {
            continue;
        };
        if seed == seeds[i] {
            images.push(tensor);
            chosen.push((ids[i].clone(), seed));
        }
    }
    if images.is_empty() {
        tracing::warn!(
            "no held-out item could be read again for the bundle's self-test; the bundle has none"
        );
        return Ok(None);
    }
    let images = Tensor::f_stack(&images, 0)?.f_to_device(Device::Cpu)?;
    let features = extractor.extract(&images)?;
    let item_seeds: Vec<u64> = chosen.iter().map(|(_, s)| *s).collect();
    let scores = scorer.score(&features.values, &item_seeds)?;
    let test = SelfTest {
        ids: chosen.into_iter().map(|(id, _)| id).collect(),
        seeds: item_seeds,
        scores: scores.iter().map(StoredScores::of).collect(),
        precision: extractor.encoder.precision(),
        device: device_kind(device).to_string(),
    };
    Ok(Some((test, images)))
}

/// Per-score lists of the scores of all items.
pub fn by_kind(scores: &[crate::model::score::ItemScores]) -> BTreeMap<ScoreKind, Vec<f64>> {
    let mut out: BTreeMap<ScoreKind, Vec<f64>> = BTreeMap::new();
    for s in scores {
        for kind in ScoreKind::ALL {
            if let Some(v) = s.get(kind) {
                out.entry(kind).or_default().push(v);
            }
        }
    }
    out
}

/// Checks that a path's parent directory exists (for clear errors before long work).
pub fn check_output_path(path: &Path) -> Result<(), FitError> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(FitError::Invalid(format!(
            "{}: directory {} does not exist",
            path.display(),
            parent.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let a = shuffled_indices(100, 7);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shuffled_indices(100, 7));
        assert_ne!(a, shuffled_indices(100, 8));
    }
}
