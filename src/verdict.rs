//! A verdict: an item's scores judged against the bundle's calibrated threshold. The
//! same structure is printed by `dlsr score` and published by the daemon.

use serde::Serialize;

use crate::eval::calibration::Calibration;
use crate::model::score::{ItemScores, LayerScore, ScoreKind};

#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub mse: f64,
    pub mfsim: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub id: String,
    pub score: f64,
    pub score_kind: ScoreKind,
    pub threshold: f64,
    pub is_ood: bool,
    pub id_percentile: f64,
    pub scores: Scores,
    pub layers: Vec<LayerScore>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    #[error("the bundle has no {0} score (LR needs the first-epoch weights)")]
    MissingScore(ScoreKind),
    #[error("the bundle's calibration has no threshold for {0}; run `dlsr calibrate`")]
    NotCalibrated(ScoreKind),
}

/// Judges `scores` by `kind`; `threshold` overrides the calibrated one.
pub fn judge(
    id: &str,
    scores: &ItemScores,
    kind: ScoreKind,
    calibration: &Calibration,
    threshold: Option<f64>,
) -> Result<Verdict, VerdictError> {
    let score = scores.get(kind).ok_or(VerdictError::MissingScore(kind))?;
    let cal = calibration.scores.get(&kind);
    let threshold = match (threshold, cal) {
        (Some(t), _) => t,
        (None, Some(c)) => c.threshold,
        (None, None) => return Err(VerdictError::NotCalibrated(kind)),
    };
    Ok(Verdict {
        id: id.to_string(),
        score,
        score_kind: kind,
        threshold,
        is_ood: score > threshold,
        id_percentile: cal.map(|c| c.id_percentile(score)).unwrap_or(f64::NAN),
        scores: Scores { mse: scores.mse, mfsim: scores.mfsim, lr: scores.lr },
        layers: scores.layers.clone(),
    })
}
