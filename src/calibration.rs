//! Thresholds from held-out ID scores alone (METHOD.md section 6): per score, the
//! threshold that flags at most the target fraction of ID items, and the ID score
//! quantiles so that any score can be reported as an ID percentile. The rate a threshold
//! achieves on held-out items is an estimate of the rate on new ID data, so it comes with
//! a 95% interval from the held-out count; when that interval is wide against the target
//! (or the target cannot be resolved at all), the calibration says so and how many
//! held-out items would do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::encoder::Precision;
use crate::model::score::ScoreKind;
use crate::stats::clopper_pearson;

/// Quantiles kept per score (0, 0.1%, ..., 100%).
const QUANTILES: usize = 1001;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreCalibration {
    /// Scores strictly above this are out-of-distribution.
    pub threshold: f64,
    /// Fraction of the held-out ID items above the threshold.
    pub achieved_fpr: f64,
    /// 95% interval (Clopper-Pearson) of the false-positive rate the threshold gives on
    /// new ID data, from the held-out count: the achieved rate is an estimate. Absent in
    /// bundles made before it was recorded (see [`ScoreCalibration::fpr_interval`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub achieved_fpr_ci95: Option<(f64, f64)>,
    /// False when the target rate needs more held-out items than there were.
    pub achievable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// ID score quantiles at 0, 0.001, ..., 1.
    pub quantiles: Vec<f64>,
    /// The held-out ID scores themselves, sorted: the reference sample of the window
    /// audit's two-sample tests (the quantiles are too coarse for its tails). Empty in
    /// bundles calibrated before it was kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heldout: Vec<f64>,
}

/// The held-out ID items' cosine similarity between a layer's features and their
/// reconstruction: where the window audit measures which layer moved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerStat {
    pub mean: f64,
    pub sd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub target_fpr: f64,
    pub items: usize,
    /// Where the held-out ID data came from.
    pub source: String,
    /// The encoder precision the held-out scores were computed in: serving in another
    /// moves scores, and so the false-positive rate. f32 in bundles that predate it.
    #[serde(default)]
    pub precision: Precision,
    pub scores: BTreeMap<ScoreKind, ScoreCalibration>,
    /// Per layer, over the held-out items (empty in older bundles).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_cos: Vec<LayerStat>,
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("target false-positive rate {0} must be in (0, 1)")]
    BadTarget(f64),
    #[error("no finite held-out scores to calibrate on")]
    Empty,
}

fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Calibrates one score from held-out ID scores.
pub fn calibrate_scores(scores: &[f64], target_fpr: f64) -> Result<ScoreCalibration, CalibrationError> {
    if !(target_fpr > 0.0 && target_fpr < 1.0) {
        return Err(CalibrationError::BadTarget(target_fpr));
    }
    let mut s: Vec<f64> = scores.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return Err(CalibrationError::Empty);
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    // At most k = floor(n * target) held-out items may lie above the threshold.
    let k = (n as f64 * target_fpr + 1e-9).floor() as usize;
    let (threshold, achievable, note) = if k == 0 {
        let needed = (1.0 / target_fpr).ceil() as usize;
        (
            s[n - 1],
            false,
            Some(format!(
                "a {:.2}% false-positive rate cannot be resolved with {n} held-out items (needs at least \
                 {needed}); the threshold is the largest held-out score",
                target_fpr * 100.0
            )),
        )
    } else {
        (s[n - 1 - k], true, None)
    };
    let above = s.iter().filter(|&&x| x > threshold).count();
    let achieved_fpr = above as f64 / n as f64;
    let interval = clopper_pearson(above as u64, n as u64, 0.95);
    let note = note.or_else(|| {
        let half_width = (interval.1 - interval.0) / 2.0;
        (half_width > TOLERATED_RELATIVE_HALF_WIDTH * target_fpr).then(|| {
            format!(
                "with {n} held-out items the achieved {:.2}% false-positive rate is only known to lie \
                 within {:.1}%..{:.1}% (95%); hold out about {} items for +-25% of the target",
                achieved_fpr * 100.0,
                interval.0 * 100.0,
                interval.1 * 100.0,
                items_for_relative_precision(target_fpr)
            )
        })
    });
    let quantiles = (0..QUANTILES).map(|i| quantile_sorted(&s, i as f64 / (QUANTILES - 1) as f64)).collect();
    Ok(ScoreCalibration {
        threshold,
        achieved_fpr,
        achieved_fpr_ci95: Some(interval),
        achievable,
        note,
        quantiles,
        heldout: s,
    })
}

/// Beyond this half-width of the 95% interval, relative to the target rate, calibration
/// warns: 5% calibrated on 300 items (the CI-sized fit) is 2.9%..8.1%, which an on-call
/// person would read as two different models.
const TOLERATED_RELATIVE_HALF_WIDTH: f64 = 0.25;

/// Held-out items for a 95% interval of +-25% of `rate` (normal approximation), rounded
/// up to a hundred.
pub fn items_for_relative_precision(rate: f64) -> usize {
    let z = 1.96 / TOLERATED_RELATIVE_HALF_WIDTH;
    let n = z * z * (1.0 - rate) / rate;
    (n / 100.0).ceil() as usize * 100
}

/// 95% interval of a false-positive rate measured as `rate` on `items` held-out items.
pub fn rate_interval(rate: f64, items: usize) -> (f64, f64) {
    let k = (rate * items as f64).round().max(0.0) as u64;
    clopper_pearson(k.min(items as u64), items as u64, 0.95)
}

impl ScoreCalibration {
    /// The 95% interval of the achieved rate: recorded, or from `items` for bundles that
    /// predate recording it.
    pub fn fpr_interval(&self, items: usize) -> (f64, f64) {
        self.achieved_fpr_ci95.unwrap_or_else(|| rate_interval(self.achieved_fpr, items))
    }

    /// Where `score` falls among the held-out ID scores, in percent (0..100).
    pub fn id_percentile(&self, score: f64) -> f64 {
        let q = &self.quantiles;
        if q.is_empty() || score.is_nan() {
            return f64::NAN;
        }
        if score < q[0] {
            return 0.0;
        }
        if score >= q[q.len() - 1] {
            return 100.0;
        }
        // The last quantile not above the score, then linear within its interval.
        let i = q.partition_point(|&v| v <= score).saturating_sub(1);
        let width = q[i + 1] - q[i];
        let frac = if width > 0.0 { (score - q[i]) / width } else { 0.0 };
        100.0 * (i as f64 + frac) / (q.len() - 1) as f64
    }

    /// The share of held-out ID items scoring above `threshold`: the false-positive rate
    /// to expect from a stream that is still in distribution.
    pub fn id_exceedance(&self, threshold: f64) -> f64 {
        1.0 - self.id_percentile(threshold) / 100.0
    }

    /// The ID score at quantile `p` (0..1), linear between the stored quantiles.
    pub fn id_quantile(&self, p: f64) -> f64 {
        let q = &self.quantiles;
        if q.is_empty() || !(0.0..=1.0).contains(&p) {
            return f64::NAN;
        }
        let pos = p * (q.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        q[lo] + (q[hi] - q[lo]) * (pos - lo as f64)
    }
}

impl Calibration {
    pub fn build(
        per_score: &BTreeMap<ScoreKind, Vec<f64>>,
        target_fpr: f64,
        source: &str,
        precision: Precision,
    ) -> Result<Self, CalibrationError> {
        let items = per_score.values().map(Vec::len).max().unwrap_or(0);
        let scores = per_score
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| Ok((*k, calibrate_scores(v, target_fpr)?)))
            .collect::<Result<_, CalibrationError>>()?;
        Ok(Self { target_fpr, items, source: source.to_string(), precision, scores, layer_cos: Vec::new() })
    }

    /// Adds the per-layer statistics of the held-out items' scores.
    pub fn with_layers(mut self, heldout: &[crate::model::score::ItemScores]) -> Self {
        self.layer_cos = Self::layer_stats(heldout);
        self
    }

    /// Mean and standard deviation of each layer's cosine over `heldout`.
    pub fn layer_stats(heldout: &[crate::model::score::ItemScores]) -> Vec<LayerStat> {
        let layers = heldout.iter().map(|s| s.layers.len()).min().unwrap_or(0);
        (0..layers)
            .map(|l| {
                let values: Vec<f64> =
                    heldout.iter().map(|s| s.layers[l].cos).filter(|v| v.is_finite()).collect();
                let n = values.len().max(1) as f64;
                let mean = values.iter().sum::<f64>() / n;
                let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
                LayerStat { mean, sd: var.sqrt() }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_flags_the_target_fraction() {
        let scores: Vec<f64> = (1..=100).map(f64::from).collect();
        let c = calibrate_scores(&scores, 0.05).unwrap();
        assert_eq!(c.threshold, 95.0);
        assert_eq!(c.achieved_fpr, 0.05);
        assert!(c.achievable);
        assert!((c.id_percentile(50.5) - 50.0).abs() < 0.2, "{}", c.id_percentile(50.5));
        assert_eq!(c.id_percentile(0.0), 0.0);
        assert_eq!(c.id_percentile(1000.0), 100.0);
    }

    #[test]
    fn quantile_and_exceedance_invert_each_other() {
        let scores: Vec<f64> = (0..=1000).map(|i| f64::from(i) / 10.0).collect();
        let c = calibrate_scores(&scores, 0.05).unwrap();
        assert!((c.id_quantile(0.95) - 95.0).abs() < 1e-9, "{}", c.id_quantile(0.95));
        assert!((c.id_exceedance(95.0) - 0.05).abs() < 1e-9, "{}", c.id_exceedance(95.0));
        // The threshold the calibration chose flags about the target share of ID items.
        assert!((c.id_exceedance(c.threshold) - 0.05).abs() < 2e-3);
        assert_eq!(c.id_exceedance(-1.0), 1.0);
        assert_eq!(c.id_exceedance(1e9), 0.0);
        assert!(c.id_quantile(1.5).is_nan());
    }

    #[test]
    fn the_achieved_rate_comes_with_its_interval_and_a_warning_when_wide() {
        // 300 held-out items at 5%: 15 above the threshold; R's binom.test(15, 300)
        // gives 0.02827..0.08111.
        let scores: Vec<f64> = (0..300).map(f64::from).collect();
        let c = calibrate_scores(&scores, 0.05).unwrap();
        let (lo, hi) = c.achieved_fpr_ci95.unwrap();
        assert!((lo - 0.02827).abs() < 2e-4 && (hi - 0.08111).abs() < 2e-4, "{lo} {hi}");
        let note = c.note.unwrap();
        assert!(note.contains("2.8%..8.1%") && note.contains("about 1200 items"), "{note}");
        // 6000 items: 4.5%..5.6%, narrow enough, no note.
        let many: Vec<f64> = (0..6000).map(f64::from).collect();
        let c = calibrate_scores(&many, 0.05).unwrap();
        assert!(c.note.is_none(), "{:?}", c.note);
        assert_eq!(c.fpr_interval(6000), c.achieved_fpr_ci95.unwrap());
        assert_eq!(items_for_relative_precision(0.01), 6100);
        let (lo, hi) = rate_interval(0.05, 6000);
        assert!(lo < 0.05 && hi > 0.05 && hi - lo < 0.012, "{lo} {hi}");
    }

    #[test]
    fn unreachable_target_is_reported() {
        let c = calibrate_scores(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.05).unwrap();
        assert!(!c.achievable);
        assert_eq!(c.threshold, 10.0);
        assert!(c.note.unwrap().contains("needs at least 20"));
        assert!(calibrate_scores(&[1.0], 0.0).is_err());
        assert!(calibrate_scores(&[f64::NAN], 0.1).is_err());
    }
}
