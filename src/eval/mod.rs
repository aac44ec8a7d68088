//! Judging scores: threshold calibration on held-out ID data ([`calibration`]), the
//! benchmark metrics AUROC / FPR95 / AUPR ([`metrics`]), and plots ([`plots`]).

pub mod calibration;
pub mod metrics;
pub mod plots;
