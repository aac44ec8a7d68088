//! The daemon's configuration: one TOML file plus environment overrides
//! `DLSR__SECTION__KEY` (e.g. `DLSR__KAFKA__BROKERS`), read with the `config` crate into
//! typed structs whose doc comments are the user documentation. Unknown keys are errors;
//! [`Config::validate`] names the bad key and why. Secrets (SASL password, TLS key
//! password) are read from an environment variable or a file named in the config, never
//! from the config itself, and never logged (`Debug` redacts them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::DecodeLimits;
use crate::device::DeviceSpec;
use crate::model::score::ScoreKind;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration key {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("configuration key {key}: cannot read secret: {reason}")]
    Secret { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub model: ModelConfig,
    pub pipeline: PipelineConfig,
    pub thresholds: ThresholdsConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
}

/// Which verdicts go to the output topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Publish {
    /// Only items judged out-of-distribution.
    Flagged,
    /// Every verdict.
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated host:port.
    pub brokers: String,
    /// Consumer group; daemons sharing it share the partitions.
    pub group_id: String,
    /// Topics whose messages are images to audit.
    pub input_topics: Vec<String>,
    /// Topic the verdicts (JSON) are published to.
    pub output_topic: String,
    /// Topic unreadable messages go to, with the reason in headers.
    pub dead_letter_topic: String,
    /// `flagged` (only OOD verdicts) or `all`.
    pub publish: Publish,
    /// Where a new group starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// How often stored offsets are committed, in milliseconds.
    pub commit_interval_ms: u64,
    /// Consumer group session timeout, in milliseconds.
    pub session_timeout_ms: u64,
    /// How long the producer keeps retrying a message before giving up (its input is then
    /// not committed and is re-read after a restart), in milliseconds.
    pub delivery_timeout_ms: u64,
    pub security: SecurityConfig,
    /// Other librdkafka properties, passed through to consumer and producer as given.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "dlsr".into(),
            input_topics: vec!["images".into()],
            output_topic: "dlsr-verdicts".into(),
            dead_letter_topic: "dlsr-dead-letters".into(),
            publish: Publish::Flagged,
            auto_offset_reset: "earliest".into(),
            commit_interval_ms: 2000,
            session_timeout_ms: 10_000,
            delivery_timeout_ms: 120_000,
            security: SecurityConfig::default(),
            properties: BTreeMap::new(),
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (SASL protocols only).
    pub sasl_mechanism: String,
    pub sasl_username: String,
    /// Name of the environment variable holding the SASL password.
    pub sasl_password_env: String,
    /// File holding the SASL password (used when `sasl_password_env` is empty).
    pub sasl_password_file: String,
    /// CA bundle (PEM) to verify the brokers.
    pub ssl_ca_location: String,
    /// Client certificate (PEM) for mutual TLS.
    pub ssl_certificate_location: String,
    /// Client key (PEM) for mutual TLS.
    pub ssl_key_location: String,
    /// Name of the environment variable holding the client key's password.
    pub ssl_key_password_env: String,
}

impl std::fmt::Debug for SecurityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only names of where secrets live; no secret is ever held here.
        f.debug_struct("SecurityConfig")
            .field("protocol", &self.protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password_env", &self.sasl_password_env)
            .field("sasl_password_file", &self.sasl_password_file)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The bundle written by `dlsr fit`.
    pub bundle: PathBuf,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `f32`, or on CUDA `f16` / `bf16`.
    pub precision: String,
    /// Encoder override (must have the bundle's weights checksum); empty: the bundle's.
    pub encoder: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            bundle: PathBuf::from("model.safetensors"),
            device: "auto".into(),
            precision: "f32".into(),
            encoder: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Largest batch the scorer runs.
    pub batch_max_size: usize,
    /// Longest a partial batch waits for more items, in milliseconds.
    pub batch_max_wait_ms: u64,
    /// Most messages between consumption and acknowledged output; the consumer pauses
    /// its partitions at this limit instead of buffering more.
    pub in_flight_limit: usize,
    /// Threads decoding and preprocessing images.
    pub decode_workers: usize,
    /// Image decoding limits (bytes, width, height, pixels).
    pub decode_limits: DecodeLimits,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_max_size: 64,
            batch_max_wait_ms: 20,
            in_flight_limit: 512,
            decode_workers: 2,
            decode_limits: DecodeLimits::default(),
        }
    }
}

/// A threshold: an absolute score, or a target false-positive rate resolved through the
/// bundle's calibration (its ID quantiles). Exactly one of the two.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ThresholdSpec {
    /// The score that decides: `mse`, `mfsim` or `lr` (empty: the bundle's default).
    pub score_kind: Option<ScoreKind>,
    /// Absolute threshold: scores above it are OOD.
    pub value: Option<f64>,
    /// Target false-positive rate on ID data, in (0, 1).
    pub target_fpr: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ThresholdsConfig {
    /// Applies to every topic without its own entry. Empty: the bundle's calibrated
    /// threshold for its default score.
    pub default: ThresholdSpec,
    /// Per input topic overrides.
    pub topics: BTreeMap<String, ThresholdSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP listener for /metrics, /healthz and /readyz.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9464".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter: `info`, `dlsr=debug,rdkafka=warn`, ...
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: "text".into(), level: "info".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT: how long to finish in-flight work, deliver and commit before
    /// exiting anyway, in milliseconds.
    pub drain_deadline_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { drain_deadline_ms: 30_000 }
    }
}

impl Config {
    /// Reads `path` (TOML) with `DLSR__SECTION__KEY` environment overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(p) = path {
            if !p.is_file() {
                return Err(ConfigError::Load(format!("{}: file not found", p.display())));
            }
            builder = builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("DLSR")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("kafka.input_topics")
                .try_parsing(true),
        );
        let raw = builder.build().map_err(|e| ConfigError::Load(e.to_string()))?;
        let cfg: Config = raw.try_deserialize().map_err(|e| ConfigError::Load(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "is empty"));
        }
        if k.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "is empty"));
        }
        if k.input_topics.is_empty() || k.input_topics.iter().any(|t| t.trim().is_empty()) {
            return Err(invalid("kafka.input_topics", "needs at least one non-empty topic"));
        }
        for (key, topic) in
            [("kafka.output_topic", &k.output_topic), ("kafka.dead_letter_topic", &k.dead_letter_topic)]
        {
            if topic.trim().is_empty() {
                return Err(invalid(key, "is empty"));
            }
            if k.input_topics.contains(topic) {
                return Err(invalid(
                    key,
                    format!("{topic:?} is also an input topic (the daemon would read its own output)"),
                ));
            }
        }
        if !["earliest", "latest"].contains(&k.auto_offset_reset.as_str()) {
            return Err(invalid("kafka.auto_offset_reset", "must be earliest or latest"));
        }
        if k.commit_interval_ms == 0 {
            return Err(invalid("kafka.commit_interval_ms", "must be positive"));
        }
        let s = &k.security;
        let proto = s.protocol.to_ascii_lowercase();
        if !["", "plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&proto.as_str()) {
            return Err(invalid(
                "kafka.security.protocol",
                "must be plaintext, ssl, sasl_plaintext or sasl_ssl",
            ));
        }
        if proto.starts_with("sasl") {
            if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&s.sasl_mechanism.as_str()) {
                return Err(invalid(
                    "kafka.security.sasl_mechanism",
                    "must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                ));
            }
            if s.sasl_username.is_empty() {
                return Err(invalid("kafka.security.sasl_username", "is required with SASL"));
            }
            if s.sasl_password_env.is_empty() && s.sasl_password_file.is_empty() {
                return Err(invalid(
                    "kafka.security.sasl_password_env",
                    "set it or sasl_password_file (SASL needs a password)",
                ));
            }
        }
        for key in k.properties.keys() {
            let managed = [
                "bootstrap.servers",
                "group.id",
                "enable.auto.commit",
                "enable.auto.offset.store",
                "sasl.password",
            ];
            if managed.contains(&key.as_str()) {
                return Err(invalid(
                    &format!("kafka.properties.{key}"),
                    "is set by dlsr itself; use the dedicated key",
                ));
            }
        }
        self.model.device.parse::<DeviceSpec>().map_err(|e| invalid("model.device", e.to_string()))?;
        self.model
            .precision
            .parse::<crate::model::encoder::Precision>()
            .map_err(|e| invalid("model.precision", e))?;
        let p = &self.pipeline;
        if p.batch_max_size == 0 || p.batch_max_size > 4096 {
            return Err(invalid("pipeline.batch_max_size", "must be in 1..=4096"));
        }
        if p.in_flight_limit < p.batch_max_size {
            return Err(invalid("pipeline.in_flight_limit", "must be at least pipeline.batch_max_size"));
        }
        if p.decode_workers == 0 || p.decode_workers > 64 {
            return Err(invalid("pipeline.decode_workers", "must be in 1..=64"));
        }
        self.validate_thresholds()?;
        self.metrics.listen.parse::<std::net::SocketAddr>().map_err(|e| {
            invalid("metrics.listen", format!("{:?} is not host:port ({e})", self.metrics.listen))
        })?;
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return Err(invalid("log.format", "must be text or json"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(())
    }

    /// Thresholds alone (what SIGHUP reloads).
    pub fn validate_thresholds(&self) -> Result<(), ConfigError> {
        let specs = std::iter::once(("thresholds.default".to_string(), &self.thresholds.default))
            .chain(self.thresholds.topics.iter().map(|(t, s)| (format!("thresholds.topics.{t}"), s)));
        for (key, spec) in specs {
            if spec.value.is_some() && spec.target_fpr.is_some() {
                return Err(invalid(&key, "set value or target_fpr, not both"));
            }
            if let Some(f) = spec.target_fpr {
                if !(f > 0.0 && f < 1.0) {
                    return Err(invalid(&format!("{key}.target_fpr"), format!("{f} is outside (0, 1)")));
                }
            }
            if let Some(v) = spec.value {
                if !v.is_finite() {
                    return Err(invalid(&format!("{key}.value"), "must be a finite number"));
                }
            }
        }
        Ok(())
    }

    /// Reads a secret from the environment variable or file the config names.
    pub fn secret(key: &str, env_name: &str, file: &str) -> Result<Option<String>, ConfigError> {
        if !env_name.is_empty() {
            return std::env::var(env_name).map(Some).map_err(|_| ConfigError::Secret {
                key: key.into(),
                reason: format!("environment variable {env_name} is not set"),
            });
        }
        if !file.is_empty() {
            return std::fs::read_to_string(file)
                .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| ConfigError::Secret { key: key.into(), reason: format!("{file}: {e}") });
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dlsr.toml")
    }

    #[test]
    fn shipped_example_equals_the_defaults() {
        let text = std::fs::read_to_string(shipped()).unwrap();
        let parsed: Config = toml_from_str(&text);
        assert_eq!(parsed, Config::default(), "config/dlsr.toml has drifted from the defaults in config.rs");
    }

    fn toml_from_str(text: &str) -> Config {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    fn with(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path))
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = with("[kafka]\nbrokerz = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
        let err = with("[thresholds.topics.images]\ntarget_fpr = 1.5\n").unwrap_err();
        assert!(err.to_string().contains("thresholds.topics.images.target_fpr"), "{err}");
        let err = with("[thresholds.default]\nvalue = 1.0\ntarget_fpr = 0.1\n").unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = with("[kafka]\noutput_topic = \"images\"\n").unwrap_err();
        assert!(err.to_string().contains("kafka.output_topic"), "{err}");
        let err = with("[pipeline]\nbatch_max_size = 0\n").unwrap_err();
        assert!(err.to_string().contains("pipeline.batch_max_size"), "{err}");
        let err = with(
            "[kafka.security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("sasl_password"), "{err}");
        assert!(Config::load(Some(Path::new("/nonexistent.toml"))).is_err());
    }

    #[test]
    fn secrets_come_from_env_or_file_and_are_not_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(Config::secret("k", "", file.to_str().unwrap()).unwrap().as_deref(), Some("s3cret"));
        assert!(Config::secret("k", "DLSR_TEST_UNSET_VARIABLE_X", "").is_err());
        let mut cfg = Config::default();
        cfg.kafka.security.sasl_password_file = file.to_string_lossy().into_owned();
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }
}
