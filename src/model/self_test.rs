//! The bundle's self-test: a few held-out ID items (preprocessed images and their noise
//! seeds) and the scores `dlsr fit` gave them, stored in the bundle. A daemon that loads
//! a bundle (at start, and before a hot swap lets it serve) scores them again and
//! compares: a bundle whose weights, encoder or preprocessing do not give its own
//! scores back on this device is refused, whatever its metadata says.
//!
//! The tolerance is in units of the spread of the held-out ID scores, so it means the
//! same for every score kind and bundle: [`SAME_SETUP_TOLERANCE`] of a standard
//! deviation when the device kind and encoder precision are those of the fit (only
//! floating-point order differs), [`OTHER_SETUP_TOLERANCE`] when either differs (CUDA's
//! kernels, half precision). A different model fitted on the same data misses by most
//! of a standard deviation on some item; a damaged or foreign one by many.

use serde::{Deserialize, Serialize};

use super::encoder::Precision;
use super::score::{ItemScores, ScoreKind};
use crate::calibration::Calibration;

/// Held-out items kept for the self-test.
pub const SELF_TEST_ITEMS: usize = 4;
/// The tensor of their preprocessed images, `[N, 3, S, S]` f32.
pub const IMAGES_TENSOR: &str = "selftest.images";
/// Largest difference allowed, in held-out standard deviations, on the fit's setup.
pub const SAME_SETUP_TOLERANCE: f64 = 0.05;
/// The same on another device kind or encoder precision.
pub const OTHER_SETUP_TOLERANCE: f64 = 0.5;

/// What a self-test item scored when the bundle was fitted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredScores {
    pub mse: f64,
    pub mfsim: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
}

impl StoredScores {
    pub fn of(s: &ItemScores) -> Self {
        Self { mse: s.mse, mfsim: s.mfsim, lr: s.lr }
    }

    fn get(&self, kind: ScoreKind) -> Option<f64> {
        match kind {
            ScoreKind::Mse => Some(self.mse),
            ScoreKind::Mfsim => Some(self.mfsim),
            ScoreKind::Lr => self.lr,
        }
    }
}

/// The self-test items' ids, seeds and scores (the images are the tensor
/// [`IMAGES_TENSOR`]), and the setup that scored them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTest {
    pub ids: Vec<String>,
    pub seeds: Vec<u64>,
    pub scores: Vec<StoredScores>,
    pub precision: Precision,
    /// `cpu` or `cuda`.
    pub device: String,
}

/// Why a bundle failed its self-test.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelfTestError {
    #[error("the self-test lists {listed} items but the bundle holds {images} images")]
    Shape { listed: usize, images: i64 },
    #[error("the self-test items could not be scored: {0}")]
    Scoring(String),
    #[error(
        "self-test item {id}: {kind} is {got:.6}, the bundle stored {stored:.6} (allowed difference \
         {tolerance:.2e}, {units} held-out standard deviations): the bundle does not reproduce its own scores"
    )]
    Mismatch { id: String, kind: ScoreKind, stored: f64, got: f64, tolerance: f64, units: f64 },
}

/// The largest difference in the self-test's scores that passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Passed {
    /// The largest |got - stored| over items and kinds, in held-out standard deviations.
    pub worst_units: f64,
    pub items: usize,
}

/// The spread the tolerance is measured in: the held-out scores' standard deviation, or
/// for bundles without them the inter-quartile range over 1.349.
fn spread(calibration: &Calibration, kind: ScoreKind) -> Option<f64> {
    let cal = calibration.scores.get(&kind)?;
    let sd = if cal.heldout.len() >= 2 {
        let n = cal.heldout.len() as f64;
        let mean = cal.heldout.iter().sum::<f64>() / n;
        (cal.heldout.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else if cal.quantiles.len() >= 2 {
        (cal.id_quantile(0.75) - cal.id_quantile(0.25)) / 1.349
    } else {
        return None;
    };
    (sd.is_finite() && sd > 0.0).then_some(sd)
}

impl SelfTest {
    /// Compares `got` (the items scored now on `device_kind` in `precision`) with the
    /// stored scores, for every score kind the bundle calibrated.
    pub fn check(
        &self,
        got: &[ItemScores],
        calibration: &Calibration,
        precision: Precision,
        device_kind: &str,
    ) -> Result<Passed, SelfTestError> {
        if got.len() != self.scores.len() {
            return Err(SelfTestError::Scoring(format!(
                "{} scores for {} items",
                got.len(),
                self.scores.len()
            )));
        }
        let units = if precision == self.precision && device_kind == self.device {
            SAME_SETUP_TOLERANCE
        } else {
            OTHER_SETUP_TOLERANCE
        };
        let mut worst: f64 = 0.0;
        for ((id, stored), now) in self.ids.iter().zip(&self.scores).zip(got) {
            for kind in ScoreKind::ALL {
                let (Some(stored), Some(sd)) = (stored.get(kind), spread(calibration, kind)) else {
                    continue;
                };
                let value = now.get(kind).unwrap_or(f64::NAN);
                let diff = (value - stored).abs() / sd;
                // A NaN score fails too.
                if diff.is_nan() || diff > units {
                    return Err(SelfTestError::Mismatch {
                        id: id.clone(),
                        kind,
                        stored,
                        got: value,
                        tolerance: units * sd,
                        units,
                    });
                }
                worst = worst.max(diff);
            }
        }
        Ok(Passed { worst_units: worst, items: self.scores.len() })
    }
}

/// `cpu` or `cuda`: the device kinds whose kernels differ.
pub fn device_kind(device: tch::Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::calibrate_scores;

    fn calibration() -> Calibration {
        // Held-out MFsim scores with standard deviation 1 (about): 0.0, 0.1, ..., 3.4.
        let scores: Vec<f64> = (0..35).map(|i| f64::from(i) / 10.0).collect();
        let mut c = calibrate_scores(&scores, 0.05).unwrap();
        c.heldout = scores;
        Calibration {
            target_fpr: 0.05,
            items: 35,
            source: "test".into(),
            precision: Precision::F32,
            scores: [(ScoreKind::Mfsim, c)].into(),
            layer_cos: Vec::new(),
        }
    }

    fn item(mfsim: f64) -> ItemScores {
        ItemScores { mse: 7.0, mfsim, lr: None, layers: Vec::new() }
    }

    #[test]
    fn scores_within_the_tolerance_pass_and_a_moved_one_names_item_kind_and_values() {
        let test = SelfTest {
            ids: vec!["a".into(), "b".into()],
            seeds: vec![1, 2],
            scores: vec![StoredScores::of(&item(1.0)), StoredScores::of(&item(2.0))],
            precision: Precision::F32,
            device: "cpu".into(),
        };
        let cal = calibration();
        let passed = test.check(&[item(1.0), item(2.0 + 1e-4)], &cal, Precision::F32, "cpu").unwrap();
        assert!(passed.worst_units < 1e-3, "{passed:?}");
        // 0.2 sd: fails on the fit's setup, passes on another device.
        let moved = [item(1.0), item(2.2)];
        let err = test.check(&moved, &cal, Precision::F32, "cpu").unwrap_err();
        assert!(
            matches!(&err, SelfTestError::Mismatch { id, kind: ScoreKind::Mfsim, .. } if id == "b"),
            "{err}"
        );
        assert!(err.to_string().contains("stored 2.000000"), "{err}");
        assert!(test.check(&moved, &cal, Precision::F32, "cuda").is_ok());
        assert!(test.check(&[item(1.0), item(f64::NAN)], &cal, Precision::F32, "cuda").is_err());
        assert!(test.check(&[item(1.0)], &cal, Precision::F32, "cpu").is_err());
    }
}
