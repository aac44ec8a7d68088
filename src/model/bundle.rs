//! The model bundle: one self-describing safetensors file. Tensors `ema.*` (the scoring
//! LFDN) and `first.*` (first-epoch EMA, for LR); the metadata key `dlsr_bundle` holds a
//! JSON [`BundleMeta`]: encoder identity and weights checksum, preprocessing, layer
//! offsets, LFDN configuration, schedule, scoring settings, calibration and what it was
//! trained on, under a format version that loading checks. Written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Tensor};

use super::encoder::{self, EncoderIdentity, EncoderSpec, Precision};
use super::features::{FeatureExtractor, LayerOffsets};
use super::lfdn::{Lfdn, LfdnConfig};
use super::schedule::Schedule;
use super::score::{ScoreKind, ScoreSettings, Scorer};
use super::train::{new_lfdn, TrainConfig, TrainSummary};
use crate::calibration::Calibration;
use crate::data::Preprocess;
use crate::tensor_file::{self, TensorFileError};

pub const BUNDLE_FORMAT: &str = "dlsr-bundle";
pub const BUNDLE_VERSION: u32 = 1;
const META_KEY: &str = "dlsr_bundle";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingRecord {
    /// The ID data the model was fitted on, as given.
    pub data: String,
    /// Items used for training and held out for calibration.
    pub train_items: usize,
    pub holdout_items: usize,
    pub skipped_items: usize,
    /// The encoder precision of the training features (f32 in bundles that predate it).
    #[serde(default)]
    pub precision: Precision,
    pub config: TrainConfig,
    pub summary: TrainSummary,
    pub encode_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleMeta {
    pub format: String,
    pub format_version: u32,
    pub dlsr_version: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub encoder: EncoderIdentity,
    pub encoder_source: EncoderSpec,
    pub preprocess: Preprocess,
    pub offsets: LayerOffsets,
    pub lfdn: LfdnConfig,
    pub schedule: Schedule,
    pub scoring: ScoreSettings,
    /// The score that decides verdicts unless configured otherwise.
    pub default_score: ScoreKind,
    pub calibration: Calibration,
    pub training: TrainingRecord,
    pub has_first_epoch: bool,
    /// Held-out items and their scores at fit time, with the images in the tensor
    /// [`super::self_test::IMAGES_TENSOR`]: what a loading daemon checks the bundle
    /// against. Absent in bundles from before it (they load with a warning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<super::self_test::SelfTest>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    File(#[from] TensorFileError),
    #[error("{path}: not a dlsr bundle (the .safetensors file `dlsr fit` writes){}", reason_suffix(reason))]
    NotABundle { path: PathBuf, reason: String },
    #[error(
        "{path}: bundle format version {found} is not supported (this dlsr reads version {BUNDLE_VERSION})"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: bundle is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "{path}: the bundle was made with encoder {want_name} (weights sha256 {want_sha}), but the encoder \
         loaded now is {got_name} (sha256 {got_sha}); refit, or pass the original encoder"
    )]
    EncoderMismatch { path: PathBuf, want_name: String, want_sha: String, got_name: String, got_sha: String },
    #[error(transparent)]
    Model(#[from] super::ModelError),
}

/// How far another precision moved the false-positive rate where it was measured
/// (`scripts/precision-shift.sh`), for the warning when a bundle is served in a precision
/// other than the one it was calibrated in.
pub const PRECISION_SHIFT_NOTE: &str =
    "measured on the CPU, bf16 moved the share of Fashion-MNIST flagged by a 5% f32 threshold from 4.1% to 5.0%";

/// A loaded bundle, ready to score on its device.
pub struct Bundle {
    pub meta: BundleMeta,
    pub path: PathBuf,
    pub sha256: String,
    pub device: Device,
    ema: (nn::VarStore, Lfdn),
    first_epoch: Option<(nn::VarStore, Lfdn)>,
    /// The self-test's preprocessed images (on the CPU), when the bundle has a self-test.
    pub self_test_images: Option<Tensor>,
}

fn prefixed(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Writes a bundle atomically.
pub fn save(
    path: &Path,
    meta: &BundleMeta,
    ema: &nn::VarStore,
    first_epoch: Option<&nn::VarStore>,
    self_test_images: Option<&Tensor>,
) -> Result<(), BundleError> {
    let mut named = prefixed(ema, "ema");
    if let Some(first) = first_epoch {
        named.extend(prefixed(first, "first"));
    }
    if let Some(images) = self_test_images {
        named.push((super::self_test::IMAGES_TENSOR.to_string(), images.shallow_clone()));
    }
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let json = serde_json::to_string(meta).map_err(|e| BundleError::Damaged {
        path: path.into(),
        reason: format!("cannot serialise metadata: {e}"),
    })?;
    let metadata = BTreeMap::from([(META_KEY.to_string(), json)]);
    tensor_file::write(path, &refs, &metadata)?;
    Ok(())
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// Reads only the metadata (cheap; for inspection and checks).
pub fn read_meta(path: &Path) -> Result<BundleMeta, BundleError> {
    let not = |reason: &str| BundleError::NotABundle { path: path.into(), reason: reason.into() };
    // A file that is not safetensors at all is simply not a bundle; the format detail
    // (a header length from the first 8 bytes of a README) would only confuse.
    let metadata = match tensor_file::read_metadata(path) {
        Err(TensorFileError::Format { .. }) => return Err(not("")),
        other => other?,
    };
    let json = metadata.get(META_KEY).ok_or_else(|| not("no dlsr_bundle metadata"))?;
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| not(&format!("metadata is not JSON: {e}")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(BUNDLE_FORMAT) {
        return Err(not("format is not dlsr-bundle"));
    }
    let found = value.get("format_version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if found != BUNDLE_VERSION {
        return Err(BundleError::Version { path: path.into(), found });
    }
    serde_json::from_value(value)
        .map_err(|e| BundleError::Damaged { path: path.into(), reason: format!("metadata: {e}") })
}

fn load_into(
    path: &Path,
    stored: &BTreeMap<String, Tensor>,
    prefix: &str,
    config: LfdnConfig,
    device: Device,
) -> Result<(nn::VarStore, Lfdn), BundleError> {
    let (mut vs, net) = new_lfdn(config, device);
    super::efficientnet::copy_checked(&mut vs, stored, &format!("{prefix}."))
        .map_err(|reason| BundleError::Damaged { path: path.into(), reason })?;
    vs.freeze();
    Ok((vs, net))
}

impl Bundle {
    pub fn load(path: &Path, device: Device) -> Result<Self, BundleError> {
        let meta = read_meta(path)?;
        let damaged = |reason: String| BundleError::Damaged { path: path.into(), reason };
        if meta.offsets.dim() != meta.lfdn.dim {
            return Err(damaged(format!(
                "layer offsets end at {}, LFDN dimension is {}",
                meta.offsets.dim(),
                meta.lfdn.dim
            )));
        }
        let stored = tensor_file::read_tensors(path)?;
        let ema = load_into(path, &stored, "ema", meta.lfdn, device)?;
        let first_epoch = if meta.has_first_epoch {
            Some(load_into(path, &stored, "first", meta.lfdn, device)?)
        } else {
            None
        };
        let self_test_images = match &meta.self_test {
            Some(test) => {
                let images = stored.get(super::self_test::IMAGES_TENSOR).ok_or_else(|| {
                    damaged(format!(
                        "the self-test's images ({}) are missing",
                        super::self_test::IMAGES_TENSOR
                    ))
                })?;
                let size = images.size();
                let want = [test.ids.len() as i64, 3, meta.preprocess.size, meta.preprocess.size];
                if size != want || test.seeds.len() != test.ids.len() || test.scores.len() != test.ids.len() {
                    return Err(damaged(format!(
                        "the self-test lists {} items ({} seeds, {} scores) and holds images of shape {size:?};                          expected {want:?}",
                        test.ids.len(),
                        test.seeds.len(),
                        test.scores.len()
                    )));
                }
                Some(images.shallow_clone())
            }
            None => None,
        };
        let sha256 = super::sha256_file(path)?;
        Ok(Self { meta, path: path.into(), sha256, device, ema, first_epoch, self_test_images })
    }

    /// The file name without extension: how verdicts and metrics name the model.
    pub fn name(&self) -> String {
        self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
    }

    pub fn scorer<'a>(&'a self, settings: &'a ScoreSettings) -> Scorer<'a> {
        Scorer {
            final_model: &self.ema.1,
            first_epoch_model: self.first_epoch.as_ref().map(|f| &f.1),
            schedule: &self.meta.schedule,
            settings,
            offsets: &self.meta.offsets,
            device: self.device,
        }
    }

    /// Loads the encoder the bundle was made with (or `encoder_override`, which must have
    /// the same weights checksum) with the bundle's preprocessing.
    pub fn load_encoder(
        &self,
        encoder_override: Option<&str>,
        precision: Precision,
    ) -> Result<FeatureExtractor, BundleError> {
        let spec = match encoder_override {
            Some(s) => s.parse::<EncoderSpec>()?,
            None => self.meta.encoder_source.clone(),
        };
        let enc = encoder::load(&spec, None, self.device, precision)?;
        let got = enc.identity();
        if got.weights_sha256 != self.meta.encoder.weights_sha256 {
            return Err(BundleError::EncoderMismatch {
                path: self.path.clone(),
                want_name: self.meta.encoder.name.clone(),
                want_sha: self.meta.encoder.weights_sha256.clone(),
                got_name: got.name.clone(),
                got_sha: got.weights_sha256.clone(),
            });
        }
        let serving = enc.precision();
        let calibrated = self.meta.calibration.precision;
        // Said once per bundle and precision: `score --workers N` and the daemon load one
        // encoder per worker.
        static WARNED: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
        let first_time = || {
            let key = (self.path.clone(), serving.to_string());
            let mut warned = WARNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let first = !warned.contains(&key);
            if first {
                warned.push(key);
            }
            first
        };
        if serving != calibrated && first_time() {
            tracing::warn!(
                bundle = %self.path.display(),
                "scoring in {serving}, but the thresholds were calibrated on {calibrated} features: scores \
                 move, and with them the false-positive rate ({}); run `dlsr calibrate --precision \
                 {serving}` on held-out ID data to calibrate for {serving}",
                PRECISION_SHIFT_NOTE
            );
        }
        Ok(FeatureExtractor::new(enc, self.meta.preprocess))
    }

    /// Rewrites the bundle with new calibration (atomically, in place).
    pub fn save_with_calibration(&mut self, calibration: Calibration) -> Result<(), BundleError> {
        self.meta.calibration = calibration;
        save(
            &self.path,
            &self.meta,
            &self.ema.0,
            self.first_epoch.as_ref().map(|f| &f.0),
            self.self_test_images.as_ref(),
        )?;
        self.sha256 = super::sha256_file(&self.path)?;
        Ok(())
    }
}
