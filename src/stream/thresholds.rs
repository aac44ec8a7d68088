//! Thresholds in force per input topic, resolved from the configuration against the
//! bundle's calibration: an absolute value, or a target false-positive rate turned into
//! the matching ID quantile. Swapped atomically on SIGHUP.

use std::collections::BTreeMap;

use crate::config::{ConfigError, ThresholdSpec, ThresholdsConfig};
use crate::eval::calibration::Calibration;
use crate::model::score::ScoreKind;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub kind: ScoreKind,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    pub default: Threshold,
    pub topics: BTreeMap<String, Threshold>,
}

impl Thresholds {
    pub fn for_topic(&self, topic: &str) -> Threshold {
        self.topics.get(topic).copied().unwrap_or(self.default)
    }

    /// Every value in force (for histogram bucket edges).
    pub fn values(&self) -> Vec<f64> {
        std::iter::once(self.default.value).chain(self.topics.values().map(|t| t.value)).collect()
    }

    pub fn resolve(
        cfg: &ThresholdsConfig,
        calibration: &Calibration,
        default_kind: ScoreKind,
        has_lr: bool,
    ) -> Result<Self, ConfigError> {
        let one = |key: &str, spec: &ThresholdSpec, fallback: ScoreKind| -> Result<Threshold, ConfigError> {
            let kind = spec.score_kind.unwrap_or(fallback);
            let bad = |reason: String| ConfigError::Invalid { key: key.to_string(), reason };
            if kind == ScoreKind::Lr && !has_lr {
                return Err(bad("score_kind lr needs a bundle with first-epoch weights".into()));
            }
            let cal = calibration.scores.get(&kind);
            let value = match (spec.value, spec.target_fpr) {
                (Some(v), _) => v,
                (None, Some(fpr)) => {
                    let cal = cal.ok_or_else(|| bad(format!("the bundle has no calibration for {kind}")))?;
                    if cal.quantiles.len() < 2 {
                        return Err(bad(format!("the bundle's {kind} calibration has no quantiles")));
                    }
                    cal.id_quantile(1.0 - fpr)
                }
                (None, None) => cal
                    .map(|c| c.threshold)
                    .ok_or_else(|| bad(format!("the bundle has no threshold for {kind}")))?,
            };
            Ok(Threshold { kind, value })
        };
        let default = one("thresholds.default", &cfg.default, default_kind)?;
        let topics = cfg
            .topics
            .iter()
            .map(|(t, s)| Ok((t.clone(), one(&format!("thresholds.topics.{t}"), s, default.kind)?)))
            .collect::<Result<_, ConfigError>>()?;
        Ok(Self { default, topics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::calibration::calibrate_scores;

    fn calibration() -> Calibration {
        let scores: Vec<f64> = (1..=1000).map(f64::from).collect();
        Calibration {
            target_fpr: 0.05,
            items: 1000,
            source: "test".into(),
            precision: Default::default(),
            scores: [(ScoreKind::Mfsim, calibrate_scores(&scores, 0.05).unwrap())].into(),
            layer_cos: Vec::new(),
        }
    }

    #[test]
    fn resolves_values_rates_and_bundle_defaults() {
        let cfg = ThresholdsConfig {
            default: ThresholdSpec::default(),
            topics: [
                ("fixed".to_string(), ThresholdSpec { value: Some(3.5), ..Default::default() }),
                ("strict".to_string(), ThresholdSpec { target_fpr: Some(0.01), ..Default::default() }),
            ]
            .into(),
        };
        let t = Thresholds::resolve(&cfg, &calibration(), ScoreKind::Mfsim, false).unwrap();
        assert_eq!(t.default.value, 950.0);
        assert_eq!(t.for_topic("fixed").value, 3.5);
        assert!((t.for_topic("strict").value - 990.0).abs() < 1.5, "{:?}", t.for_topic("strict"));
        assert_eq!(t.for_topic("other"), t.default);
    }

    #[test]
    fn lr_without_first_epoch_weights_names_the_key() {
        let cfg = ThresholdsConfig {
            default: ThresholdSpec { score_kind: Some(ScoreKind::Lr), ..Default::default() },
            ..Default::default()
        };
        let err = Thresholds::resolve(&cfg, &calibration(), ScoreKind::Mfsim, false).unwrap_err();
        assert!(err.to_string().contains("thresholds.default"), "{err}");
    }
}
