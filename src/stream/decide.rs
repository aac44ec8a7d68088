//! The decision: which score and which threshold judge an item, and what becomes of it.
//!
//! [`resolve_threshold`] is the one place a threshold is chosen from what a user gave (a
//! score kind, an absolute value or a target false-positive rate, or nothing) and what
//! the bundle holds (its calibration, its default score, whether it can give LR). The
//! daemon, `dlsr score`, `dlsr audit` and `dlsr eval` all call it, so they refuse and
//! fall back in the same way.
//!
//! A [`Decider`] is that resolution made once per model, at start and again on every
//! reload (a SIGHUP's thresholds, a swapped bundle): the thresholds of the topics routed
//! to the model, their gauges and description, and [`Decider::decide`], which turns an
//! item's scores into an [`Outcome`]. The scorer scores and routes the outcome; it holds
//! the decider that belongs to the model it scores with, so a verdict is never judged
//! by another model's thresholds.

use std::collections::BTreeMap;

use super::scorer::ModelInfo;
use crate::calibration::{rate_interval, Calibration};
use crate::config::{Config, ConfigError, Publish, ThresholdSpec, ThresholdsConfig};
use crate::model::score::{ItemScores, ScoreKind};
use crate::telemetry::metrics::Metrics;
use crate::verdict::{judge, Verdict};

/// A score kind and the value above which an item is out of distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    pub kind: ScoreKind,
    pub value: f64,
}

/// Why no threshold could be chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThresholdError {
    #[error("score_kind lr needs a bundle with first-epoch weights")]
    LrUnavailable,
    #[error("the bundle has no calibration for {0}")]
    NoCalibration(ScoreKind),
    #[error("the bundle's {0} calibration has no quantiles")]
    NoQuantiles(ScoreKind),
    #[error("the bundle has no calibrated {0} threshold: run `dlsr calibrate` or give a value")]
    NoThreshold(ScoreKind),
    #[error("threshold {0} is not a finite number")]
    NotFinite(f64),
}

/// The threshold `spec` asks for against a bundle's `calibration`: its value as given, the
/// ID quantile of its target rate, or the bundle's calibrated threshold of its score kind
/// (the bundle's default score when the spec names none).
pub fn resolve_threshold(
    spec: &ThresholdSpec,
    calibration: &Calibration,
    default_kind: ScoreKind,
    has_lr: bool,
) -> Result<Threshold, ThresholdError> {
    let kind = spec.score_kind.unwrap_or(default_kind);
    if kind == ScoreKind::Lr && !has_lr {
        return Err(ThresholdError::LrUnavailable);
    }
    let cal = calibration.scores.get(&kind);
    let value = match (spec.value, spec.target_fpr) {
        (Some(v), _) if !v.is_finite() => return Err(ThresholdError::NotFinite(v)),
        (Some(v), _) => v,
        (None, Some(fpr)) => {
            let cal = cal.ok_or(ThresholdError::NoCalibration(kind))?;
            if cal.quantiles.len() < 2 {
                return Err(ThresholdError::NoQuantiles(kind));
            }
            cal.id_quantile(1.0 - fpr)
        }
        (None, None) => cal.map(|c| c.threshold).ok_or(ThresholdError::NoThreshold(kind))?,
    };
    Ok(Threshold { kind, value })
}

/// Thresholds in force: the default and per input topic.
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

    /// Every threshold of `cfg` against one bundle; an error names the key.
    pub fn resolve(
        cfg: &ThresholdsConfig,
        calibration: &Calibration,
        default_kind: ScoreKind,
        has_lr: bool,
    ) -> Result<Self, ConfigError> {
        Self::resolve_topics(cfg, cfg.topics.keys().map(String::as_str), calibration, default_kind, has_lr)
    }

    /// The default and the named topics' thresholds against one bundle.
    fn resolve_topics<'a>(
        cfg: &ThresholdsConfig,
        topics: impl Iterator<Item = &'a str>,
        calibration: &Calibration,
        default_kind: ScoreKind,
        has_lr: bool,
    ) -> Result<Self, ConfigError> {
        let one = |key: String, spec: &ThresholdSpec, fallback: ScoreKind| {
            resolve_threshold(spec, calibration, fallback, has_lr)
                .map_err(|e| ConfigError::Invalid { key, reason: e.to_string() })
        };
        let default = one("thresholds.default".into(), &cfg.default, default_kind)?;
        let mut resolved = BTreeMap::new();
        for topic in topics {
            if let Some(spec) = cfg.topics.get(topic) {
                let t = one(format!("thresholds.topics.{topic}"), spec, default.kind)?;
                resolved.insert(topic.to_string(), t);
            }
        }
        Ok(Self { default, topics: resolved })
    }
}

/// What becomes of a scored item.
#[derive(Debug)]
pub enum Outcome {
    /// Judged; `publish` says whether the verdict goes to the output topic (flagged
    /// items always; the rest when `kafka.publish = "all"`).
    Judged { verdict: Verdict, publish: bool },
    /// Not judgeable: dead-lettered with this code.
    DeadLetter { code: &'static str, reason: String },
}

/// One model's decision: its name, what it is, the thresholds of the topics it scores.
#[derive(Debug, Clone)]
pub struct Decider {
    /// The configured name (`default`, or a `[models.NAME]` key): the `model` label.
    pub name: String,
    /// The loaded bundle this decider judges for (its sha256 is in every verdict).
    pub model: ModelInfo,
    /// The default threshold and those of the topics routed to this model.
    pub thresholds: Thresholds,
    /// The named input topics routed to this model (gauges, descriptions).
    pub topics: Vec<String>,
    pub publish: Publish,
}

impl Decider {
    /// The thresholds of `cfg` for the model `name` against its bundle `model`.
    pub fn resolve(cfg: &Config, name: &str, model: ModelInfo) -> Result<Self, ConfigError> {
        let topics: Vec<String> = cfg
            .kafka
            .input_topics
            .iter()
            .filter(|t| !t.starts_with('^') && cfg.model_for_topic(t) == name)
            .cloned()
            .collect();
        // Every routed topic's threshold, also those only a pattern subscription names.
        let routed =
            cfg.thresholds.topics.keys().map(String::as_str).filter(|t| cfg.model_for_topic(t) == name);
        let thresholds = Thresholds::resolve_topics(
            &cfg.thresholds,
            routed,
            &model.calibration,
            model.default_score,
            model.has_lr,
        )?;
        Ok(Self { name: name.to_string(), model, thresholds, topics, publish: cfg.kafka.publish })
    }

    /// Judges `scores` of item `id` from `topic`.
    pub fn decide(&self, topic: &str, id: &str, scores: &ItemScores) -> Outcome {
        let finite = [Some(scores.mse), Some(scores.mfsim), scores.lr]
            .into_iter()
            .flatten()
            .chain(scores.layers.iter().flat_map(|l| [l.mse, l.cos]))
            .all(f64::is_finite);
        if !finite {
            let reason = format!(
                "scores are not finite (mse {}, mfsim {}, lr {:?})",
                scores.mse, scores.mfsim, scores.lr
            );
            return Outcome::DeadLetter { code: "non_finite_score", reason };
        }
        let thr = self.thresholds.for_topic(topic);
        match judge(id, scores, thr.kind, &self.model.calibration, Some(thr.value)) {
            Ok(verdict) => {
                let publish = verdict.is_ood || self.publish == Publish::All;
                Outcome::Judged { verdict, publish }
            }
            Err(e) => Outcome::DeadLetter { code: "scoring_failed", reason: e.to_string() },
        }
    }

    /// The share of this bundle's held-out ID items above `thr` (None: not calibrated).
    fn id_rate(&self, thr: Threshold) -> Option<f64> {
        self.model.calibration.scores.get(&thr.kind).map(|c| c.id_exceedance(thr.value))
    }

    /// Sets the threshold gauges of this model's topics and its ID quantiles.
    pub fn set_gauges(&self, metrics: &Metrics) {
        for topic in &self.topics {
            let thr = self.thresholds.for_topic(topic);
            let fpr = self.id_rate(thr).map(|rate| (rate, rate_interval(rate, self.model.calibration.items)));
            metrics.set_threshold(topic, thr.kind, thr.value, fpr);
        }
        metrics.clear_id_quantiles(&self.name);
        for (kind, cal) in &self.model.calibration.scores {
            for (p, label) in [(0.5, "0.5"), (0.95, "0.95"), (0.99, "0.99")] {
                metrics.set_id_quantile(&self.name, *kind, label, cal.id_quantile(p));
            }
        }
    }

    /// The thresholds in force per topic, for people: `images: mfsim > -0.9926 (ID rate
    /// 5.00%)`.
    pub fn describe(&self) -> String {
        self.topics
            .iter()
            .map(|topic| {
                let thr = self.thresholds.for_topic(topic);
                let rate =
                    self.id_rate(thr).map_or(String::new(), |r| format!(" (ID rate {:.2}%)", r * 100.0));
                format!("{topic}: {} > {}{rate}", thr.kind, thr.value)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// After a swap: the thresholds given as an absolute `value` are kept as they were,
    /// which may suit the new bundle badly; one line per such topic with the new ID rate.
    pub fn kept_value_warnings(&self, cfg: &Config) -> Vec<String> {
        let given_value = |topic: &str| {
            cfg.thresholds.topics.get(topic).map_or(cfg.thresholds.default.value, |s| s.value).is_some()
        };
        self.topics
            .iter()
            .filter(|t| given_value(t))
            .map(|topic| {
                let thr = self.thresholds.for_topic(topic);
                let rate = self.id_rate(thr).map_or("unknown".to_string(), |r| format!("{:.2}%", r * 100.0));
                format!(
                    "{topic}: the threshold {} > {} was given as a value and is kept; the new bundle's ID rate \
                     at it is {rate} (target_fpr would follow the new calibration)",
                    thr.kind, thr.value
                )
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::calibration::calibrate_scores;

    pub(crate) fn calibration() -> Calibration {
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
        let spec = ThresholdSpec { score_kind: Some(ScoreKind::Mse), ..Default::default() };
        assert_eq!(
            resolve_threshold(&spec, &calibration(), ScoreKind::Mfsim, true),
            Err(ThresholdError::NoThreshold(ScoreKind::Mse))
        );
        let spec = ThresholdSpec { value: Some(f64::NAN), ..Default::default() };
        assert!(matches!(
            resolve_threshold(&spec, &calibration(), ScoreKind::Mfsim, true),
            Err(ThresholdError::NotFinite(_))
        ));
    }

    /// A model for tests: bundle sha256 `sha` repeated, 64 px, this calibration.
    pub(crate) fn model_with(sha: char, calibration: Calibration) -> ModelInfo {
        ModelInfo {
            model_ref: crate::kafka::message::ModelRef {
                name: "m".into(),
                sha256: sha.to_string().repeat(64),
            },
            encoder: "e".into(),
            preprocess: crate::data::Preprocess {
                size: 64,
                resize: Default::default(),
                normalisation: crate::data::Normalisation::LITE,
                antialias: true,
            },
            calibration,
            default_score: ScoreKind::Mfsim,
            has_lr: false,
        }
    }

    fn model(calibration: Calibration) -> ModelInfo {
        model_with('a', calibration)
    }

    fn scores(mfsim: f64) -> ItemScores {
        ItemScores { mse: 1.0, mfsim, lr: None, layers: Vec::new() }
    }

    #[test]
    fn a_decider_judges_its_topics_and_dead_letters_what_cannot_be_judged() {
        let mut cfg = Config::default();
        cfg.kafka.input_topics = vec!["a".into(), "b".into()];
        cfg.kafka.publish = Publish::Flagged;
        cfg.models.insert("other".into(), Default::default());
        cfg.thresholds.topics.insert(
            "b".into(),
            ThresholdSpec { model: Some("other".into()), value: Some(10.0), ..Default::default() },
        );
        let default = Decider::resolve(&cfg, "default", model(calibration())).unwrap();
        let other = Decider::resolve(&cfg, "other", model(calibration())).unwrap();
        assert_eq!(default.topics, ["a"]);
        assert_eq!(other.topics, ["b"]);
        assert_eq!(other.thresholds.for_topic("b").value, 10.0);
        match default.decide("a", "x", &scores(999.0)) {
            Outcome::Judged { verdict, publish } => assert!(verdict.is_ood && publish),
            o => panic!("{o:?}"),
        }
        match default.decide("a", "x", &scores(3.0)) {
            Outcome::Judged { verdict, publish } => assert!(!verdict.is_ood && !publish),
            o => panic!("{o:?}"),
        }
        match default.decide("a", "x", &scores(f64::NAN)) {
            Outcome::DeadLetter { code, .. } => assert_eq!(code, "non_finite_score"),
            o => panic!("{o:?}"),
        }
        assert!(other.describe().starts_with("b: mfsim > 10 (ID rate 99."), "{}", other.describe());
        let warnings = other.kept_value_warnings(&cfg);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(default.kept_value_warnings(&cfg).is_empty());
    }
}
