//! Judging scores: threshold calibration on held-out ID data ([`calibration`]), the
//! benchmark metrics AUROC / FPR95 / AUPR ([`metrics`]), and plots ([`plots`]).

/// Calibration lives below `model` and `eval` (the bundle stores it); re-exported here.
pub use crate::calibration;
pub mod metrics;
pub mod plots;
