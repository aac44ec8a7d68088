//! The daemon's configuration: one TOML file plus environment overrides
//! `DLSR__SECTION__KEY` (e.g. `DLSR__KAFKA__BROKERS`), read with the `config` crate into
//! typed structs whose doc comments are the user documentation. Unknown keys are errors;
//! [`Config::validate`] names the bad key and why. Secrets (SASL password, TLS key
//! password) are read from an environment variable or a file named in the config, never
//! from the config itself, and never logged (`Debug` redacts them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::envelope::{EnvelopeOverride, EnvelopeSpec, Format};
use crate::data::reference::{FetchPolicy, ObjectStoreOptions, Persistence};
use crate::data::DecodeLimits;
use crate::device::DeviceSpec;
use crate::model::encoder::Precision;
use crate::model::score::ScoreKind;

/// (De)serialises a choice through its `FromStr` and `Display`, so the file spells it
/// as a string and the rest of the program only sees the parsed value.
mod as_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    Earliest,
    Latest,
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Earliest => "earliest",
            Self::Latest => "latest",
        }
    }
}

/// librdkafka's `security.protocol` (Unset: librdkafka's default, plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecurityProtocol {
    #[default]
    Unset,
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn is_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

impl std::str::FromStr for SecurityProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" => Ok(Self::Unset),
            "plaintext" => Ok(Self::Plaintext),
            "ssl" => Ok(Self::Ssl),
            "sasl_plaintext" => Ok(Self::SaslPlaintext),
            "sasl_ssl" => Ok(Self::SaslSsl),
            other => Err(format!("{other:?}: must be plaintext, ssl, sasl_plaintext or sasl_ssl")),
        }
    }
}

impl std::fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unset => "",
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        })
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration key {key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("configuration key {key}: cannot read secret: {reason}")]
    Secret { key: String, reason: String },
}

/// The values each configuration enum accepts, for errors in the user's words.
const ENUM_VALUES: [(&str, &str); 6] = [
    ("Publish", "flagged, all"),
    ("OffsetReset", "earliest, latest"),
    ("LogFormat", "text, json"),
    ("Precision", "f32, f16, bf16"),
    ("ScoreKind", "mse, mfsim, lr"),
    ("DeviceSpec", "auto, cpu, cuda, cuda:N"),
];

/// Rewrites the config crate's errors: an unknown enum value lists the allowed ones, and
/// an unknown key that came from a `DLSR__...` environment variable names the variable.
fn explain_load_error(message: &str) -> String {
    let key = message.rsplit_once(" for key `").map(|(_, k)| k.trim_end_matches('`'));
    if let Some(rest) = message.strip_prefix("enum ") {
        if let Some((name, value)) = rest.split_once(" does not have variant constructor ") {
            let value = value.split(" for key ").next().unwrap_or(value);
            if let Some((_, allowed)) = ENUM_VALUES.iter().find(|(n, _)| *n == name) {
                return format!("{}: {value:?} is not one of: {allowed}", key.unwrap_or("a key"));
            }
        }
    }
    if let (Some(field), Some(section)) =
        (message.strip_prefix("unknown field `").and_then(|r| r.split('`').next()), key)
    {
        let variable = format!("DLSR__{}__{}", section.replace('.', "__"), field).to_ascii_uppercase();
        if std::env::vars().any(|(name, _)| name.to_ascii_uppercase() == variable) {
            return format!("{message} (from the environment variable {variable})");
        }
    }
    message.to_string()
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

/// Pass-through properties whose values are secrets: accepted (dlsr has no setting of
/// its own for some of them) but never shown in logs, errors or `Debug` output.
pub const SECRET_PROPERTIES: [&str; 6] = [
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "ssl.key.pem",
];

/// Whether a pass-through property holds a secret.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.trim().to_ascii_lowercase();
    SECRET_PROPERTIES.contains(&k.as_str()) || k.contains("password") || k.contains("secret")
}

/// Pass-through properties that dlsr sets itself, or that would break at-least-once
/// delivery (a verdict lost, or an input committed before its output was acknowledged).
/// Keys are compared without case and surrounding space, and librdkafka's aliases count
/// (`auto.commit.enable` is `enable.auto.commit`), so no spelling gets past.
fn refuse_property(key: &str, value: &str) -> Result<(), ConfigError> {
    let name = format!("kafka.properties.{key}");
    let k = key.trim().to_ascii_lowercase();
    let v = value.trim().to_ascii_lowercase();
    let own = |what: &str| Err(invalid(&name, format!("is set by dlsr itself; use {what}")));
    match k.as_str() {
        "bootstrap.servers" | "metadata.broker.list" => own("kafka.brokers"),
        "group.id" => own("kafka.group_id"),
        "group.instance.id" => own("kafka.group_instance_id"),
        "sasl.password" => Err(invalid(&name, "secrets never go in the file; use kafka.security.sasl_password_env")),
        "message.max.bytes" => own("kafka.message_max_bytes"),
        "statistics.interval.ms" => Err(invalid(
            &name,
            "is set by dlsr itself: consumer lag and broker reachability come from librdkafka's statistics",
        )),
        k if k.starts_with("enable.auto.") || k.starts_with("auto.commit.") => Err(invalid(
            &name,
            "dlsr commits an offset only after the input's output was acknowledged; automatic \
             commits or offset stores would commit unfinished work (at-least-once would break)",
        )),
        "enable.idempotence" if v != "true" => Err(invalid(
            &name,
            "must stay true: without idempotence a retried delivery can duplicate or reorder outputs",
        )),
        "acks" | "request.required.acks" if !["all", "-1"].contains(&v.as_str()) => Err(invalid(
            &name,
            format!("{value:?} would let a broker failure lose acknowledged outputs; only all (-1) keeps at-least-once"),
        )),
        "transactional.id" => Err(invalid(
            &name,
            "dlsr's producer is idempotent, not transactional: a transactional producer's records stay \
             invisible to read_committed readers until a commit dlsr never makes",
        )),
        "enable.partition.eof" => Err(invalid(
            &name,
            "is set by dlsr itself (false): end-of-partition events are not messages and would be taken for input",
        )),
        "isolation.level" if v != "read_committed" => Err(invalid(
            &name,
            format!("{value:?} would judge records of aborted transactions, which were never part of the stream; dlsr reads read_committed"),
        )),
        "group.protocol" => Err(invalid(
            &name,
            "dlsr's rebalance handling (cooperative-sticky, a commit before every revoke) is written for \
             the classic group protocol",
        )),
        "partition.assignment.strategy" => Err(invalid(
            &name,
            "is set by dlsr itself (cooperative-sticky: only moved partitions are revoked)",
        )),
        _ => Ok(()),
    }
}

/// `[kafka.properties]`: a map whose `Debug` output hides secret values.
#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Properties(pub BTreeMap<String, String>);

impl std::ops::Deref for Properties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Properties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, if is_secret_property(k) { "<redacted>" } else { v.as_str() })),
            )
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub input: InputConfig,
    /// The default model: scores every input topic that no `thresholds.topics.T.model`
    /// routes elsewhere. Named `default` in metrics and logs.
    pub model: ModelConfig,
    /// Further models by name (`[models.NAME]`), each routed to by
    /// `thresholds.topics.T.model = "NAME"`. Each has its own scorer workers and batches.
    pub models: BTreeMap<String, ModelConfig>,
    pub pipeline: PipelineConfig,
    pub thresholds: ThresholdsConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub audit: AuditConfig,
}

/// What the daemon does with a batch of an input partition that cannot be read (it
/// cannot be decompressed, is corrupt, or uses a codec this build lacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnUnreadable {
    /// Stop at it: the partition is blocked (`dlsr_input_blocked`, not ready, an alert),
    /// nothing past it is committed and nothing is lost; it resumes once the partition
    /// is readable (a fixed broker, or an operator moving the group's offset).
    #[default]
    Block,
    /// Step over it: one dead letter per skipped offset range (empty value, headers
    /// `dlsr-skipped-first-offset`, `dlsr-skipped-last-offset` and the error), counted in
    /// `dlsr_skipped_offsets_total`, so the audit trail shows what was not judged.
    Skip,
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
    pub auto_offset_reset: OffsetReset,
    /// How often stored offsets are committed, in milliseconds.
    pub commit_interval_ms: u64,
    /// Consumer group session timeout, in milliseconds.
    pub session_timeout_ms: u64,
    /// Static group membership (librdkafka's `group.instance.id`): a stable name per
    /// daemon (e.g. the pod name of a StatefulSet). A daemon restarted under the same name
    /// within `session_timeout_ms` gets its partitions back at once, with no rebalance;
    /// a stopped one keeps them unread until the timeout passes. Empty: dynamic
    /// membership, where a restarted daemon waits for the group to rebalance.
    pub group_instance_id: String,
    /// How long the producer keeps retrying a message before giving up (its input is then
    /// not committed and is re-read after a restart), in milliseconds.
    pub delivery_timeout_ms: u64,
    /// Largest record the producer sends, in bytes (librdkafka's `message.max.bytes`; keep
    /// it at or below the brokers' and the topics' limits). A dead letter whose original
    /// value would not fit carries the value cut to fit, plus `dlsr-original-length`,
    /// `dlsr-original-sha256` and `dlsr-value-truncated` headers; the original stays in
    /// the input topic at `dlsr-source-topic/partition/offset`.
    pub message_max_bytes: usize,
    /// How long an output topic may refuse records with a permanent error (authorization,
    /// unknown topic, record too large, ...) before the daemon exits non-zero so that the
    /// orchestrator restarts it and pages, in milliseconds. Meanwhile it is not ready,
    /// exports `dlsr_output_blocked{topic,code}`, logs the reason once a minute, retries
    /// the refused records and commits nothing past them.
    pub output_blocked_exit_ms: u64,
    /// `block` (default) or `skip`: what happens at a batch of an input partition that
    /// cannot be read (see [`OnUnreadable`]).
    pub on_unreadable: OnUnreadable,
    pub security: SecurityConfig,
    /// Other librdkafka properties, passed through to consumer and producer as given.
    /// Values of secret properties (`*password*`, `*secret*`, `sasl.oauthbearer.config`)
    /// are never logged or shown.
    pub properties: Properties,
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
            auto_offset_reset: OffsetReset::Earliest,
            commit_interval_ms: 2000,
            session_timeout_ms: 10_000,
            group_instance_id: String::new(),
            delivery_timeout_ms: 120_000,
            message_max_bytes: 1_000_000,
            output_blocked_exit_ms: 300_000,
            on_unreadable: OnUnreadable::Block,
            security: SecurityConfig::default(),
            properties: Properties::default(),
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl` (empty: plaintext).
    #[serde(with = "as_string")]
    pub protocol: SecurityProtocol,
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
    #[serde(with = "as_string")]
    pub device: DeviceSpec,
    /// `f32`, or on CUDA `f16` / `bf16`.
    #[serde(with = "as_string")]
    pub precision: Precision,
    /// Encoder override (must have the bundle's weights checksum); empty: the bundle's.
    pub encoder: String,
    /// Watch the bundle file: a changed checksum (checked every 5 s) loads, validates and
    /// swaps in the new bundle, as SIGHUP does. Off: only SIGHUP swaps.
    pub watch: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            bundle: PathBuf::from("model.safetensors"),
            device: DeviceSpec::Auto,
            precision: Precision::F32,
            encoder: String::new(),
            watch: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Largest batch the scorer runs.
    pub batch_max_size: usize,
    /// Longest a partial batch waits for more items, in milliseconds. 0 (the default):
    /// adaptive batching, a batch is whatever is queued when the scorer is free (up to
    /// `batch_max_size`), so batches are small when the queue is short and large when it
    /// is long, and no item waits for a timer.
    pub batch_max_wait_ms: u64,
    /// Most messages between consumption and acknowledged output; the consumer pauses
    /// its partitions at this limit instead of buffering more.
    pub in_flight_limit: usize,
    /// Most bytes the pipeline holds in flight, in two halves: message payloads between
    /// consumption and output (the consumer pauses past half) and images being decoded
    /// (a decode waits while the others' images fill the other half; an image larger
    /// than the half still decodes, alone). The default, 512 MiB, is sized for a 2 GB
    /// container: with the CPU Lite0 model (about 300 MB) and librdkafka's queues, a
    /// stream of 36-megapixel PNGs peaks under 1 GB.
    pub in_flight_bytes: u64,
    /// Threads decoding and preprocessing images.
    pub decode_workers: usize,
    /// Scorer threads, each with its own model and, when more than one, a share of the
    /// libtorch threads (0: one per libtorch thread, at most 4, on the CPU; one on CUDA).
    /// On a CPU, small scorers side by side score more than one scorer of as many threads.
    pub scorer_workers: usize,
    /// Image decoding limits (bytes, width, height, pixels).
    pub decode_limits: DecodeLimits,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_max_size: 64,
            batch_max_wait_ms: 0,
            in_flight_limit: 512,
            in_flight_bytes: 512 << 20,
            decode_workers: 2,
            scorer_workers: 0,
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
    /// Per topic only: the model (`[models.NAME]`) that scores this topic; empty: the
    /// default model (`[model]`).
    pub model: Option<String>,
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

/// How message values are read: the default format for every input topic, overrides
/// per topic, and the fetch policy for references.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// `raw`, `json` or `auto` (see [`Format`]).
    pub format: Format,
    /// JSON Pointer to a base64 image in an event.
    pub image_pointer: String,
    /// JSON Pointer to a reference in an event.
    pub uri_pointer: String,
    /// JSON Pointer to the item id in an event (overrides the key).
    pub id_pointer: String,
    /// Event fields copied into the verdict under `input`.
    pub passthrough_pointers: Vec<String>,
    /// Per input topic (by exact name), fields that replace the defaults above.
    pub topics: BTreeMap<String, EnvelopeOverride>,
    /// `file://` references are refused unless set; then only files under this folder.
    pub file_root: String,
    /// Hosts `http(s)://` references may name (`host`, `host:port`, `*.domain`).
    pub allowed_hosts: Vec<String>,
    /// Buckets/containers cloud references may name; empty: any the credentials reach.
    pub allowed_buckets: Vec<String>,
    /// Per fetch attempt, in milliseconds.
    pub fetch_timeout_ms: u64,
    /// Retries of a timed-out, throttled or 5xx fetch before the item is dead-lettered.
    pub fetch_retries: u32,
    /// Fetches in flight at once.
    pub fetch_concurrency: usize,
    pub object_store: ObjectStoreOptions,
}

impl KafkaConfig {
    /// Whether `topic` is one of `input_topics`, by name or by a `^pattern`.
    pub fn names_input_topic(&self, topic: &str) -> bool {
        self.input_topics.iter().any(|t| {
            t == topic
                || (t.starts_with('^')
                    && crate::stream::topic_watch::InputSpec::parse(t).is_ok_and(|s| s.matches(topic)))
        })
    }
}

impl Default for InputConfig {
    fn default() -> Self {
        let envelope = EnvelopeSpec::default();
        Self {
            format: envelope.format,
            image_pointer: envelope.image_pointer,
            uri_pointer: envelope.uri_pointer,
            id_pointer: envelope.id_pointer,
            passthrough_pointers: envelope.passthrough_pointers,
            topics: BTreeMap::new(),
            file_root: String::new(),
            allowed_hosts: Vec::new(),
            allowed_buckets: Vec::new(),
            fetch_timeout_ms: 10_000,
            fetch_retries: 4,
            fetch_concurrency: 16,
            object_store: ObjectStoreOptions::default(),
        }
    }
}

impl InputConfig {
    /// The default envelope (the `[input]` table's format fields).
    pub fn envelope(&self) -> EnvelopeSpec {
        EnvelopeSpec {
            format: self.format,
            image_pointer: self.image_pointer.clone(),
            uri_pointer: self.uri_pointer.clone(),
            id_pointer: self.id_pointer.clone(),
            passthrough_pointers: self.passthrough_pointers.clone(),
            group_pointer: String::new(),
        }
    }

    /// The envelope of `topic`: its override applied to the defaults.
    pub fn envelope_for(&self, topic: &str) -> EnvelopeSpec {
        match self.topics.get(topic) {
            Some(o) => o.apply(&self.envelope()),
            None => self.envelope(),
        }
    }

    /// The fetch policy, with `max_bytes` from the decode limits.
    pub fn fetch_policy(&self, limits: &DecodeLimits, persistence: Persistence) -> FetchPolicy {
        FetchPolicy {
            file_root: (!self.file_root.trim().is_empty()).then(|| PathBuf::from(self.file_root.trim())),
            allowed_hosts: self.allowed_hosts.clone(),
            allowed_buckets: self.allowed_buckets.clone(),
            max_bytes: limits.max_bytes,
            timeout: std::time::Duration::from_millis(self.fetch_timeout_ms),
            retries: self.fetch_retries,
            persistence,
            store: self.object_store.clone(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let check = |key: &str, spec: &EnvelopeSpec| -> Result<(), ConfigError> {
            let pointers = [
                ("image_pointer", &spec.image_pointer),
                ("uri_pointer", &spec.uri_pointer),
                ("id_pointer", &spec.id_pointer),
            ];
            for (name, p) in pointers
                .into_iter()
                .chain(spec.passthrough_pointers.iter().map(|p| ("passthrough_pointers", p)))
            {
                if !p.is_empty() && !p.starts_with('/') {
                    return Err(invalid(
                        &format!("{key}.{name}"),
                        format!("{p:?} is not a JSON Pointer (they start with /, e.g. \"/image\")"),
                    ));
                }
            }
            if spec.format == Format::Json && spec.image_pointer.is_empty() && spec.uri_pointer.is_empty() {
                return Err(invalid(&format!("{key}.format"), "json needs image_pointer or uri_pointer"));
            }
            Ok(())
        };
        check("input", &self.envelope())?;
        for (topic, o) in &self.topics {
            check(&format!("input.topics.{topic}"), &o.apply(&self.envelope()))?;
        }
        if !self.file_root.trim().is_empty() && !Path::new(self.file_root.trim()).is_dir() {
            return Err(invalid("input.file_root", format!("{:?} is not a folder", self.file_root)));
        }
        if !(100..=600_000).contains(&self.fetch_timeout_ms) {
            return Err(invalid("input.fetch_timeout_ms", "must be in 100..=600000"));
        }
        if self.fetch_retries > 20 {
            return Err(invalid("input.fetch_retries", "must be in 0..=20"));
        }
        if !(1..=1024).contains(&self.fetch_concurrency) {
            return Err(invalid("input.fetch_concurrency", "must be in 1..=1024"));
        }
        if let Some(h) = self.allowed_hosts.iter().find(|h| h.contains('/') || h.trim().is_empty()) {
            return Err(invalid(
                "input.allowed_hosts",
                format!("{h:?} is not a host (host, host:port or *.domain)"),
            ));
        }
        Ok(())
    }
}

/// The window audit (`[audit]`): the stream judged as a dataset, window by window, per
/// input topic and per source. See `crate::audit::window` and docs/operations.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Whether the daemon audits windows (false: per-item verdicts only).
    pub enabled: bool,
    /// What a source is: "" (the whole topic), "header:NAME" (a message header's value)
    /// or "json:/pointer" (a field of the JSON event).
    pub group_by: String,
    /// Items per window (tumbling, per topic and group).
    pub window_items: usize,
    /// A window open this long is closed and judged on what it holds (seconds).
    pub window_max_seconds: u64,
    /// A window with fewer items is reported as `too_small`, not judged.
    pub min_items: usize,
    /// A window is `shifted` when a test's p-value, corrected for the tests and the
    /// topic's groups (Bonferroni), is under this.
    pub alpha: f64,
    /// Groups per topic; items of further groups are pooled as "other".
    pub max_groups: usize,
    /// A group that has had no item for this long is dropped (seconds).
    pub group_idle_seconds: u64,
    /// The online detector's mean number of in-distribution items between false alarms
    /// (per group); its threshold is calibrated to it at start.
    pub expected_run_time_items: u64,
    /// The shift the online detector is tuned to, in ID standard deviations of the
    /// items' normal scores.
    pub detector_shift_sd: f64,
    /// Where each closed window's record goes (JSON, docs/window.schema.json); "": none.
    pub summary_topic: String,
    /// Bundles calibrated before dlsr kept the held-out scores: test against their 1001
    /// stored quantiles (with a warning) instead of refusing to start.
    pub allow_quantile_reference: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            group_by: String::new(),
            window_items: 1000,
            window_max_seconds: 600,
            min_items: 100,
            alpha: 0.001,
            max_groups: 100,
            group_idle_seconds: 3600,
            expected_run_time_items: 100_000,
            detector_shift_sd: 0.5,
            summary_topic: "dlsr-windows".into(),
            allow_quantile_reference: true,
        }
    }
}

impl AuditConfig {
    /// The auditor's settings, checked.
    pub fn settings(&self) -> Result<crate::audit::window::WindowSettings, ConfigError> {
        let settings = crate::audit::window::WindowSettings {
            window_items: self.window_items,
            window_max: Some(std::time::Duration::from_secs(self.window_max_seconds.max(1))),
            min_items: self.min_items,
            alpha: self.alpha,
            max_groups: self.max_groups,
            group_idle: std::time::Duration::from_secs(self.group_idle_seconds.max(1)),
            expected_run_time_items: self.expected_run_time_items,
            detector_shift: self.detector_shift_sd,
        };
        settings.check().map_err(|e| invalid("audit", e.to_string()))?;
        Ok(settings)
    }

    pub fn group_by(&self) -> Result<crate::audit::window::GroupBy, ConfigError> {
        crate::audit::window::GroupBy::parse(&self.group_by)
            .map_err(|e| invalid("audit.group_by", e.to_string()))
    }

    fn validate(&self, kafka: &KafkaConfig) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        self.settings()?;
        if self.group_by()? == crate::audit::window::GroupBy::Folder {
            return Err(invalid(
                "audit.group_by",
                "\"folder\" is for offline audits; use header:NAME or json:/pointer",
            ));
        }
        for (key, seconds) in [
            ("audit.window_max_seconds", self.window_max_seconds),
            ("audit.group_idle_seconds", self.group_idle_seconds),
        ] {
            if seconds == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        let topic = &self.summary_topic;
        if !topic.is_empty() {
            if kafka.names_input_topic(topic) {
                return Err(invalid(
                    "audit.summary_topic",
                    format!(
                        "{topic:?} is also an input topic (the daemon would read its own window records)"
                    ),
                ));
            }
            if topic == &kafka.output_topic || topic == &kafka.dead_letter_topic {
                return Err(invalid("audit.summary_topic", format!("{topic:?} is also an output topic")));
            }
        }
        Ok(())
    }
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
    pub format: LogFormat,
    /// A tracing filter: `info`, `dlsr=debug,rdkafka=warn`, ...
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into() }
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

/// The name of the model configured under `[model]`.
pub const DEFAULT_MODEL: &str = "default";

impl Config {
    /// The model that scores `topic`: its `thresholds.topics.T.model`, else the default.
    pub fn model_for_topic(&self, topic: &str) -> &str {
        self.thresholds.topics.get(topic).and_then(|t| t.model.as_deref()).unwrap_or(DEFAULT_MODEL)
    }

    /// Every configured model by name, the default first.
    pub fn all_models(&self) -> Vec<(&str, &ModelConfig)> {
        std::iter::once((DEFAULT_MODEL, &self.model))
            .chain(self.models.iter().map(|(n, m)| (n.as_str(), m)))
            .collect()
    }

    /// Model names are label values and log fields: short and plain. A route must name a
    /// configured model; the default threshold cannot route (every topic would go there).
    fn validate_models(&self) -> Result<(), ConfigError> {
        for (name, m) in &self.models {
            let key = format!("models.{name}");
            let plain = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if name.is_empty() || name.len() > 64 || !plain {
                return Err(invalid(&key, "a model name is 1 to 64 letters, digits, - or _"));
            }
            if name == DEFAULT_MODEL {
                return Err(invalid(&key, "\"default\" is the [model] section's name; pick another"));
            }
            if m.bundle.as_os_str().is_empty() {
                return Err(invalid(&format!("{key}.bundle"), "is empty"));
            }
        }
        if self.thresholds.default.model.is_some() {
            return Err(invalid(
                "thresholds.default.model",
                "routes are per topic (thresholds.topics.T.model); unrouted topics use [model]",
            ));
        }
        for (topic, spec) in &self.thresholds.topics {
            if let Some(name) = &spec.model {
                if name != DEFAULT_MODEL && !self.models.contains_key(name) {
                    let known: Vec<&str> = self.all_models().into_iter().map(|(n, _)| n).collect();
                    return Err(invalid(
                        &format!("thresholds.topics.{topic}.model"),
                        format!("{name:?} is not a configured model (known: {})", known.join(", ")),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads `path` (TOML) with `DLSR__SECTION__KEY` environment overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// [`Config::load`] with the given environment instead of the process's.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut builder = config::Config::builder();
        if let Some(p) = path {
            if !p.is_file() {
                return Err(ConfigError::Load(format!("{}: file not found", p.display())));
            }
            builder = builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
        }
        // No `try_parsing`: it turned every value that looks like a number into one, so
        // DLSR__KAFKA__GROUP_ID=007 joined group "7" (issue #21). Values stay strings;
        // the typed fields parse them (numbers and booleans from strings work as is).
        // Lists are split here (the crate's list parsing needs try_parsing).
        const LISTS: [(&str, &str); 4] = [
            ("DLSR__KAFKA__INPUT_TOPICS", "kafka.input_topics"),
            ("DLSR__INPUT__ALLOWED_HOSTS", "input.allowed_hosts"),
            ("DLSR__INPUT__ALLOWED_BUCKETS", "input.allowed_buckets"),
            ("DLSR__INPUT__PASSTHROUGH_POINTERS", "input.passthrough_pointers"),
        ];
        let list_key =
            |name: &str| LISTS.iter().find(|(var, _)| name.eq_ignore_ascii_case(var)).map(|(_, k)| *k);
        builder = builder.add_source(
            config::Environment::with_prefix("DLSR")
                .prefix_separator("__")
                .separator("__")
                .source(Some(env.iter().filter(|(name, _)| list_key(name).is_none()).cloned().collect())),
        );
        for (name, value) in &env {
            if let Some(key) = list_key(name) {
                let list: Vec<String> =
                    value.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
                builder = builder
                    .set_override(key, list)
                    .map_err(|e| ConfigError::Load(explain_load_error(&e.to_string())))?;
            }
        }
        let raw = builder.build().map_err(|e| ConfigError::Load(explain_load_error(&e.to_string())))?;
        let mut cfg: Config =
            raw.try_deserialize().map_err(|e| ConfigError::Load(explain_load_error(&e.to_string())))?;
        cfg.environment_thresholds_win(env.iter().map(|(name, _)| name.clone()));
        cfg.environment_topic_names_as_written(env.iter().map(|(name, _)| name.as_str()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config crate lowercases environment keys, so `DLSR__THRESHOLDS__TOPICS__CAMS__VALUE`
    /// arrives as topic `cams` even for an input topic named `CAMS` or `Cams`: a
    /// threshold that would silently never apply. An environment-set topic key that names
    /// no input topic but matches exactly one input topic apart from case is moved to
    /// that topic's name as written in `kafka.input_topics`; two such candidates are an
    /// error naming the variable.
    fn environment_topic_names_as_written<'a>(
        &mut self,
        env_names: impl Iterator<Item = &'a str>,
    ) -> Result<(), ConfigError> {
        let mut from_env: Vec<String> = Vec::new();
        for name in env_names {
            let upper = name.to_ascii_uppercase();
            if let Some(rest) = upper.strip_prefix("DLSR__THRESHOLDS__TOPICS__") {
                if let Some((topic, _)) = rest.rsplit_once("__") {
                    from_env.push(topic.to_ascii_lowercase());
                }
            }
        }
        from_env.sort();
        from_env.dedup();
        for key in from_env {
            if self.kafka.input_topics.contains(&key) {
                continue;
            }
            let candidates: Vec<&String> =
                self.kafka.input_topics.iter().filter(|t| t.to_ascii_lowercase() == key).collect();
            match candidates.as_slice() {
                [one] => {
                    let one = (*one).clone();
                    if let Some(spec) = self.thresholds.topics.remove(&key) {
                        self.thresholds.topics.insert(one, spec);
                    }
                }
                [] => {}
                many => {
                    return Err(invalid(
                        &format!("thresholds.topics.{key}"),
                        format!(
                            "set from the environment (DLSR__THRESHOLDS__TOPICS__{}__*), whose names have no case; \
                             it could mean any of the input topics {many:?}: set it in the file instead",
                            key.to_ascii_uppercase()
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    /// A threshold set in the environment replaces the file's way of setting it: an
    /// operator who exports `DLSR__THRESHOLDS__DEFAULT__VALUE` over a file that says
    /// `target_fpr` means "this value now", not "both". (Both in the environment is
    /// still refused by validation.)
    fn environment_thresholds_win(&mut self, env_names: impl Iterator<Item = String>) {
        let mut from_env: Vec<(Option<String>, bool)> = Vec::new(); // (topic, is value)
        for name in env_names {
            let upper = name.to_ascii_uppercase();
            let Some(rest) = upper.strip_prefix("DLSR__THRESHOLDS__") else { continue };
            let parts: Vec<&str> = rest.split("__").collect();
            let (topic, field) = match parts.as_slice() {
                ["DEFAULT", field] => (None, *field),
                ["TOPICS", topic, field] => (Some(topic.to_ascii_lowercase()), *field),
                _ => continue,
            };
            match field {
                "VALUE" => from_env.push((topic, true)),
                "TARGET_FPR" => from_env.push((topic, false)),
                _ => {}
            }
        }
        for (topic, is_value) in &from_env {
            let both = from_env.iter().any(|(t, v)| t == topic && v != is_value);
            let spec = match topic {
                None => Some(&mut self.thresholds.default),
                Some(t) => self.thresholds.topics.get_mut(t),
            };
            if let (Some(spec), false) = (spec, both) {
                if *is_value {
                    spec.target_fpr = None;
                } else {
                    spec.value = None;
                }
            }
        }
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
        // A pattern (librdkafka: a leading ^) is checked too: `^img.*` with outputs named
        // `img-verdicts` and `img-dlq` made the daemon dead-letter its own dead letters,
        // 35,164 of them from 102 inputs in 30 s (issue #21).
        for pattern in k.input_topics.iter().filter(|t| t.starts_with('^')) {
            let spec = crate::stream::topic_watch::InputSpec::parse(pattern).map_err(|e| {
                invalid("kafka.input_topics", format!("{pattern:?} is not a valid topic pattern: {e}"))
            })?;
            for (key, topic) in
                [("kafka.output_topic", &k.output_topic), ("kafka.dead_letter_topic", &k.dead_letter_topic)]
            {
                if spec.matches(topic) {
                    return Err(invalid(
                        "kafka.input_topics",
                        format!(
                            "the pattern {pattern:?} also matches {key} = {topic:?}: the daemon would read its own \
                             output; narrow the pattern or rename the output topic"
                        ),
                    ));
                }
            }
        }
        for topic in self.thresholds.topics.keys() {
            if !k.names_input_topic(topic) {
                return Err(invalid(
                    &format!("thresholds.topics.{topic}"),
                    format!(
                        "names no input topic (kafka.input_topics = {:?}); a threshold for it would never apply",
                        k.input_topics
                    ),
                ));
            }
        }
        self.validate_models()?;
        if k.commit_interval_ms == 0 {
            return Err(invalid("kafka.commit_interval_ms", "must be positive"));
        }
        let s = &k.security;
        if s.protocol.is_sasl() {
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
        if !(4096..=1_000_000_000).contains(&k.message_max_bytes) {
            return Err(invalid("kafka.message_max_bytes", "must be in 4096..=1000000000"));
        }
        if k.output_blocked_exit_ms < 1000 {
            return Err(invalid("kafka.output_blocked_exit_ms", "must be at least 1000"));
        }
        for (key, value) in k.properties.iter() {
            refuse_property(key, value)?;
        }
        let p = &self.pipeline;
        if p.batch_max_size == 0 || p.batch_max_size > 4096 {
            return Err(invalid("pipeline.batch_max_size", "must be in 1..=4096"));
        }
        if p.in_flight_limit < p.batch_max_size {
            return Err(invalid("pipeline.in_flight_limit", "must be at least pipeline.batch_max_size"));
        }
        if p.in_flight_bytes < 16 << 20 {
            return Err(invalid("pipeline.in_flight_bytes", "must be at least 16777216 (16 MiB)"));
        }
        if !(p.decode_limits.max_aspect_ratio >= 1.0) {
            return Err(invalid("pipeline.decode_limits.max_aspect_ratio", "must be at least 1"));
        }
        if p.decode_workers == 0 || p.decode_workers > 64 {
            return Err(invalid("pipeline.decode_workers", "must be in 1..=64"));
        }
        if p.scorer_workers > 64 {
            return Err(invalid("pipeline.scorer_workers", "must be in 0..=64 (0: automatic)"));
        }
        self.input.validate()?;
        for topic in self.input.topics.keys() {
            if !k.names_input_topic(topic) {
                return Err(invalid(
                    &format!("input.topics.{topic}"),
                    format!("names no input topic (kafka.input_topics = {:?})", k.input_topics),
                ));
            }
        }
        self.validate_thresholds()?;
        self.audit.validate(k)?;
        self.metrics.listen.parse::<std::net::SocketAddr>().map_err(|e| {
            invalid("metrics.listen", format!("{:?} is not host:port ({e})", self.metrics.listen))
        })?;
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
        for (text, key) in [
            ("[model]\ndevice = \"tpu\"\n", "model.device"),
            ("[model]\nprecision = \"f8\"\n", "model.precision"),
            ("[kafka]\nauto_offset_reset = \"middle\"\n", "kafka.auto_offset_reset"),
            ("[kafka.security]\nprotocol = \"carrier_pigeon\"\n", "kafka.security.protocol"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
        ] {
            let err = with(text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let cfg = with("[kafka.security]\nprotocol = \"SASL_SSL\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"\nsasl_password_env = \"X\"\n").unwrap();
        assert_eq!(cfg.kafka.security.protocol, SecurityProtocol::SaslSsl, "parsed once, case-insensitively");
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
    fn enum_errors_list_the_allowed_values() {
        let err = with("[kafka]\npublish = \"everything\"\n").unwrap_err().to_string();
        assert!(err.contains("kafka.publish: \"everything\" is not one of: flagged, all"), "{err}");
        let err = with("[kafka]\nauto_offset_reset = \"middle\"\n").unwrap_err().to_string();
        assert!(err.contains("earliest, latest"), "{err}");
        // Messages it does not recognise pass through unchanged.
        assert_eq!(explain_load_error("something else"), "something else");
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn input_formats_per_topic_and_fetch_settings_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlsr.toml");
        let write = |extra: &str| {
            std::fs::write(&path, format!("[kafka]\ninput_topics = [\"raw-cams\", \"events\"]\n{extra}"))
                .unwrap();
            Config::load_with_env(
                Some(&path),
                env(&[("DLSR__INPUT__ALLOWED_HOSTS", "a.example, b.example:8443")]),
            )
        };
        let cfg = write(
            "[input]\nformat = \"raw\"\n[input.topics.events]\nformat = \"json\"\nuri_pointer = \"/ref\"\n\
             passthrough_pointers = [\"/camera\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.input.allowed_hosts, ["a.example", "b.example:8443"]);
        assert_eq!(cfg.input.envelope_for("raw-cams").format, Format::Raw);
        let events = cfg.input.envelope_for("events");
        assert_eq!(
            (events.format, events.uri_pointer.as_str(), events.image_pointer.as_str()),
            (Format::Json, "/ref", "/image")
        );
        for (extra, key) in [
            ("[input.topics.nope]\nformat = \"json\"\n", "input.topics.nope"),
            ("[input]\nuri_pointer = \"uri\"\n", "input.uri_pointer"),
            ("[input]\nformat = \"json\"\nimage_pointer = \"\"\nuri_pointer = \"\"\n", "input.format"),
            ("[input]\nfile_root = \"/no/such/folder\"\n", "input.file_root"),
            ("[input]\nfetch_concurrency = 0\n", "input.fetch_concurrency"),
            ("[input]\nformat = \"xml\"\n", "format"),
        ] {
            let err = write(extra).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn environment_values_are_kept_as_written_and_typed_fields_still_parse() {
        let cfg = Config::load_with_env(
            None,
            env(&[
                ("DLSR__KAFKA__GROUP_ID", "007"),
                ("DLSR__KAFKA__COMMIT_INTERVAL_MS", "250"),
                ("DLSR__KAFKA__INPUT_TOPICS", "cams,0042"),
                ("DLSR__PIPELINE__DECODE_LIMITS__MAX_BYTES", "1000000"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.kafka.group_id, "007", "not the number 7");
        assert_eq!(cfg.kafka.commit_interval_ms, 250);
        assert_eq!(cfg.kafka.input_topics, ["cams", "0042"]);
        assert_eq!(cfg.pipeline.decode_limits.max_bytes, 1_000_000);
    }

    #[test]
    fn a_threshold_for_a_topic_with_capitals_can_be_set_from_the_environment() {
        let cfg = Config::load_with_env(
            None,
            env(&[
                ("DLSR__KAFKA__INPUT_TOPICS", "Cams,images"),
                ("DLSR__THRESHOLDS__TOPICS__CAMS__VALUE", "0.5"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.thresholds.topics["Cams"].value, Some(0.5));
        let err = Config::load_with_env(
            None,
            env(&[
                ("DLSR__KAFKA__INPUT_TOPICS", "Cams,CAMS"),
                ("DLSR__THRESHOLDS__TOPICS__CAMS__VALUE", "0.5"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("thresholds.topics.cams") && err.contains("\"Cams\", \"CAMS\""), "{err}");
    }

    #[test]
    fn a_threshold_for_no_input_topic_and_a_pattern_matching_an_output_are_refused() {
        let err = with("[thresholds.topics.imagse]\nvalue = 1.0\n").unwrap_err().to_string();
        assert!(err.contains("thresholds.topics.imagse") && err.contains("names no input topic"), "{err}");
        let err = with("[kafka]\ninput_topics = [\"^img.*\"]\noutput_topic = \"img-verdicts\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.input_topics") && err.contains("img-verdicts"), "{err}");
        with("[kafka]\ninput_topics = [\"^img-in-.*\"]\noutput_topic = \"img-verdicts\"\n[thresholds.topics.img-in-7]\nvalue = 1.0\n")
            .unwrap();
        let err = with("[kafka]\ninput_topics = [\"^img(\"]\n").unwrap_err().to_string();
        assert!(err.contains("not a valid topic pattern"), "{err}");
    }

    #[test]
    fn a_threshold_from_the_environment_replaces_the_files_way_of_setting_it() {
        let mut cfg =
            with("[thresholds.default]\ntarget_fpr = 0.01\n[thresholds.topics.images]\nvalue = 2.0\n")
                .unwrap();
        // What the config crate makes of DLSR__THRESHOLDS__DEFAULT__VALUE=0.5 and
        // DLSR__THRESHOLDS__TOPICS__IMAGES__TARGET_FPR=0.02 on top of that file.
        cfg.thresholds.default.value = Some(0.5);
        cfg.thresholds.topics.get_mut("images").unwrap().target_fpr = Some(0.02);
        assert!(cfg.validate_thresholds().is_err(), "both set, before precedence");
        cfg.environment_thresholds_win(
            ["DLSR__THRESHOLDS__DEFAULT__VALUE", "DLSR__THRESHOLDS__TOPICS__IMAGES__TARGET_FPR", "HOME"]
                .into_iter()
                .map(String::from),
        );
        assert_eq!((cfg.thresholds.default.value, cfg.thresholds.default.target_fpr), (Some(0.5), None));
        let images = &cfg.thresholds.topics["images"];
        assert_eq!((images.value, images.target_fpr), (None, Some(0.02)));
        cfg.validate_thresholds().unwrap();
        // Both from the environment: nothing to prefer, still refused.
        let mut both = Config::default();
        both.thresholds.default.value = Some(0.5);
        both.thresholds.default.target_fpr = Some(0.02);
        both.environment_thresholds_win(
            ["DLSR__THRESHOLDS__DEFAULT__VALUE", "DLSR__THRESHOLDS__DEFAULT__TARGET_FPR"]
                .into_iter()
                .map(String::from),
        );
        assert!(both.validate_thresholds().is_err());
    }

    #[test]
    fn properties_that_break_at_least_once_are_refused_with_the_reason() {
        for (key, value, needle) in [
            ("enable.idempotence", "false", "idempotence"),
            ("acks", "1", "at-least-once"),
            ("request.required.acks", "0", "at-least-once"),
            ("enable.auto.commit", "true", "acknowledged"),
            ("enable.auto.offset.store", "true", "acknowledged"),
            ("message.max.bytes", "5000000", "kafka.message_max_bytes"),
            ("transactional.id", "dlsr-1", "transactional"),
            ("enable.partition.eof", "true", "end-of-partition"),
            ("isolation.level", "read_uncommitted", "aborted transactions"),
            ("group.protocol", "consumer", "classic"),
            ("Enable.Auto.Commit", "true", "acknowledged"),
            (" auto.commit.enable", "true", "acknowledged"),
            ("enable.auto.commit.interval.ms", "100", "acknowledged"),
            ("statistics.interval.ms", "0", "statistics"),
        ] {
            let err = with(&format!("[kafka.properties]\n\"{key}\" = \"{value}\"\n")).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(&format!("kafka.properties.{key}")) && text.contains(needle), "{text}");
        }
        // What keeps the guarantees is accepted.
        with("[kafka.properties]\nacks = \"all\"\n\"enable.idempotence\" = \"true\"\n").unwrap();
        with("[kafka.properties]\n\"isolation.level\" = \"read_committed\"\n").unwrap();
        // Secrets that are accepted never show.
        let cfg = with(
            "[kafka.properties]\n\"ssl.key.password\" = \"hunter2\"\n\"sasl.oauthbearer.client.secret\" = \"s3cr3t\"\n\"client.rack\" = \"r1\"\n",
        )
        .unwrap();
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cr3t") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(shown.contains("\"r1\""), "other properties are shown: {shown}");
        let err = with("[kafka]\nmessage_max_bytes = 10\n").unwrap_err();
        assert!(err.to_string().contains("kafka.message_max_bytes"), "{err}");
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

    #[test]
    fn routes_name_configured_models_and_unrouted_topics_use_the_default() {
        let mut cfg = Config::default();
        cfg.kafka.input_topics = vec!["images".into(), "scans".into()];
        cfg.models
            .insert("scans".into(), ModelConfig { bundle: "scans.safetensors".into(), ..Default::default() });
        let route = |model: &str| ThresholdSpec { model: Some(model.into()), ..Default::default() };
        cfg.thresholds.topics.insert("scans".into(), route("scans"));
        cfg.validate().unwrap();
        assert_eq!((cfg.model_for_topic("scans"), cfg.model_for_topic("images")), ("scans", DEFAULT_MODEL));
        assert_eq!(cfg.all_models().iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["default", "scans"]);

        let mut unknown = cfg.clone();
        unknown.thresholds.topics.insert("scans".into(), route("docs"));
        let err = unknown.validate().unwrap_err().to_string();
        assert!(
            err.contains("thresholds.topics.scans.model") && err.contains("known: default, scans"),
            "{err}"
        );
        let mut named_default = cfg.clone();
        named_default.models.insert(DEFAULT_MODEL.into(), ModelConfig::default());
        assert!(named_default.validate().unwrap_err().to_string().contains("models.default"));
        let mut odd = cfg.clone();
        odd.models.insert("a b".into(), ModelConfig::default());
        assert!(odd.validate().unwrap_err().to_string().contains("models.a b"));
        let mut default_route = cfg;
        default_route.thresholds.default.model = Some("scans".into());
        assert!(default_route.validate().unwrap_err().to_string().contains("thresholds.default.model"));
    }
}
