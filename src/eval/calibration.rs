//! Thresholds from held-out ID scores alone (METHOD.md section 6): per score, the
//! threshold that flags at most the target fraction of ID items, and the ID score
//! quantiles so that any score can be reported as an ID percentile. When the target rate
//! cannot be resolved with the number of held-out items, the calibration says so.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::score::ScoreKind;

/// Quantiles kept per score (0, 0.1%, ..., 100%).
const QUANTILES: usize = 1001;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreCalibration {
    /// Scores strictly above this are out-of-distribution.
    pub threshold: f64,
    /// Fraction of the held-out ID items above the threshold.
    pub achieved_fpr: f64,
    /// False when the target rate needs more held-out items than there were.
    pub achievable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// ID score quantiles at 0, 0.001, ..., 1.
    pub quantiles: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub target_fpr: f64,
    pub items: usize,
    /// Where the held-out ID data came from.
    pub source: String,
    pub scores: BTreeMap<ScoreKind, ScoreCalibration>,
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
    let achieved_fpr = s.iter().filter(|&&x| x > threshold).count() as f64 / n as f64;
    let quantiles = (0..QUANTILES).map(|i| quantile_sorted(&s, i as f64 / (QUANTILES - 1) as f64)).collect();
    Ok(ScoreCalibration { threshold, achieved_fpr, achievable, note, quantiles })
}

impl ScoreCalibration {
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
    ) -> Result<Self, CalibrationError> {
        let items = per_score.values().map(Vec::len).max().unwrap_or(0);
        let scores = per_score
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| Ok((*k, calibrate_scores(v, target_fpr)?)))
            .collect::<Result<_, CalibrationError>>()?;
        Ok(Self { target_fpr, items, source: source.to_string(), scores })
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
    fn unreachable_target_is_reported() {
        let c = calibrate_scores(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.05).unwrap();
        assert!(!c.achievable);
        assert_eq!(c.threshold, 10.0);
        assert!(c.note.unwrap().contains("needs at least 20"));
        assert!(calibrate_scores(&[1.0], 0.0).is_err());
        assert!(calibrate_scores(&[f64::NAN], 0.1).is_err());
    }
}
