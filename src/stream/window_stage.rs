//! The window auditor's stage in the daemon: the scorers hand it every judged item
//! ([`WindowFeedItem`], over a bounded channel), and this thread feeds them to the
//! [`WindowAuditor`] (the same code `dlsr audit --window` runs offline), closes windows
//! by time and on rebalances, sets the window metrics and publishes one JSON record per
//! closed window and group to `audit.summary_topic`.
//!
//! Window records are a report, not part of the at-least-once chain: the input offsets do
//! not wait for them (a slow summary topic must not stall the verdicts). A record the
//! broker refuses is counted (`dlsr_window_records_failed_total`) and logged.
//!
//! Models: each model has its own auditor, against its bundle's held-out sample. A hot
//! swap gives the topics it scores a new reference: their open windows close as cut
//! short (`closed_by: "model"`) and new ones start against the new bundle.
//!
//! Restarts and rebalances: windows live in memory. A partition taken away by a rebalance
//! cuts short every open window holding its items (`closed_by: "revoked"`), a shutdown
//! cuts short all of them (`"shutdown"`): such windows are judged on what they hold and
//! say so (`cut_short`), and the new owner of the items after the last commit starts
//! fresh windows, so no full window is reported twice.

use std::collections::BTreeSet;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

use super::decide::Decider;
use super::offsets::OffsetTracker;
use crate::audit::window::{GroupBy, Item, Reference, WindowAuditor, WindowRecord, WindowSettings};
use crate::kafka::headers::Header;
use crate::model::score::ScoreKind;
use crate::telemetry::metrics::Metrics;

/// Items buffered between the scorers and the auditor (it takes microseconds an item).
pub const FEED_CAPACITY: usize = 4096;
/// How often windows are closed by time and the detector gauges refreshed.
const TICK: Duration = Duration::from_millis(500);

/// One judged item, owned, as the scorer hands it over.
#[derive(Debug, Clone)]
pub struct WindowFeedItem {
    pub topic: String,
    /// The grouping field's raw value ([`group_value`]).
    pub group: Option<Vec<u8>>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub id: String,
    pub kind: ScoreKind,
    pub score: f64,
    pub threshold: f64,
    pub flagged: bool,
    /// Per-layer cosine between the features and their reconstruction.
    pub layer_cos: Vec<f64>,
    /// The model that judged it (its name, bundle and held-out sample).
    pub decider: Arc<Decider>,
}

impl WindowFeedItem {
    pub fn as_item(&self) -> Item<'_> {
        Item {
            topic: &self.topic,
            group: self.group.as_deref(),
            partition: self.partition,
            offset: self.offset,
            timestamp: self.timestamp,
            id: &self.id,
            kind: self.kind,
            score: self.score,
            threshold: self.threshold,
            flagged: self.flagged,
            layer_cos: &self.layer_cos,
        }
    }
}

/// The grouping field of a message: a header's value, or the JSON event's field that the
/// envelope read (`json_group`, from `EnvelopeSpec::group_pointer`).
pub fn group_value(group_by: &GroupBy, headers: &[Header], json_group: Option<&str>) -> Option<Vec<u8>> {
    match group_by {
        GroupBy::None | GroupBy::Folder => None,
        GroupBy::Header(name) => crate::kafka::headers::find(headers, name).map(<[u8]>::to_vec),
        GroupBy::Json(_) => json_group.map(|g| g.as_bytes().to_vec()),
    }
}

/// The summary producer's callbacks: librdkafka's logs through the daemon's gate, and
/// a record the broker did not take (a summary topic that does not exist, no
/// authorisation) counted and logged, never dropped silently.
pub struct SummaryCtx {
    metrics: Arc<Metrics>,
    logged: Mutex<Option<Instant>>,
}

impl ClientContext for SummaryCtx {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::client_log::error("window records", &error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        crate::kafka::client_log::log("window records", level, facility, message);
    }
}

impl ProducerContext for SummaryCtx {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let Err((e, m)) = result else { return };
        self.metrics.window_records_failed.inc();
        let Ok(mut logged) = self.logged.lock() else { return };
        if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *logged = Some(Instant::now());
            use rdkafka::Message;
            tracing::warn!(
                "a window record was not delivered to {}: {e} (does the topic exist? \
                 dlsr_window_records_failed_total counts them)",
                m.topic()
            );
        }
    }
}

/// Builds a model's auditor from `[audit]` and the model's bundle.
#[derive(Debug, Clone)]
pub struct AuditorFactory {
    pub settings: WindowSettings,
    pub group_by: GroupBy,
    pub allow_quantile_reference: bool,
}

impl AuditorFactory {
    pub fn from_config(audit: &crate::config::AuditConfig) -> Result<Self, crate::config::ConfigError> {
        Ok(Self {
            settings: audit.settings()?,
            group_by: audit.group_by()?,
            allow_quantile_reference: audit.allow_quantile_reference,
        })
    }

    /// An auditor against the held-out sample of every score kind the bundle calibrated;
    /// a kind the model's thresholds use must have one (the error says why not). Warnings
    /// (a reference from quantiles only) are logged.
    pub fn build(&self, decider: &Decider) -> Result<WindowAuditor, String> {
        let t = &decider.thresholds;
        let in_use: Vec<ScoreKind> =
            std::iter::once(t.default.kind).chain(t.topics.values().map(|t| t.kind)).collect();
        let calibration = &decider.model.calibration;
        let mut references = Vec::new();
        for &kind in calibration.scores.keys() {
            match Reference::from_calibration(calibration, kind, self.allow_quantile_reference) {
                Ok((reference, warning)) => {
                    if let (Some(w), true) = (warning, in_use.contains(&kind)) {
                        tracing::warn!(model = %decider.name, "window audit: {w}");
                    }
                    references.push(reference);
                }
                Err(e) if in_use.contains(&kind) => return Err(e.to_string()),
                Err(_) => {}
            }
        }
        WindowAuditor::new(self.settings.clone(), self.group_by.clone(), references, WindowAuditor::run_now())
            .map_err(|e| e.to_string())
    }
}

/// One model's auditor and the bundle its reference came from.
struct ModelAuditor {
    model: String,
    sha256: String,
    auditor: WindowAuditor,
}

/// The auditor thread's state.
pub struct WindowStage {
    factory: AuditorFactory,
    /// One per model that has judged items (made from the first item's decider).
    auditors: Vec<ModelAuditor>,
    /// The summary topic's producer and name (None: `audit.summary_topic = ""`).
    pub summary: Option<(BaseProducer<SummaryCtx>, String)>,
    pub metrics: Arc<Metrics>,
    /// The consumer's assignment: windows holding a partition no longer in it are cut.
    pub tracker: Arc<Mutex<OffsetTracker>>,
    /// (topic, group) pairs whose detector gauge is exported.
    exported: BTreeSet<(String, String)>,
    failed_logged: Option<Instant>,
}

impl WindowStage {
    /// `deciders`: the models at start, whose auditors are built now so that a bundle
    /// the audit cannot use stops the start.
    pub fn new(
        factory: AuditorFactory,
        deciders: &[Arc<Decider>],
        summary: Option<(ClientConfig, String)>,
        metrics: Arc<Metrics>,
        tracker: Arc<Mutex<OffsetTracker>>,
    ) -> Result<Self, String> {
        let mut auditors = Vec::new();
        for d in deciders {
            let auditor = factory.build(d).map_err(|e| format!("model {}: {e}", d.name))?;
            auditors.push(ModelAuditor {
                model: d.name.clone(),
                sha256: d.model.model_ref.sha256.clone(),
                auditor,
            });
        }
        let summary = match summary {
            Some((config, topic)) => {
                let ctx = SummaryCtx { metrics: metrics.clone(), logged: Mutex::new(None) };
                let producer = config
                    .create_with_context::<_, BaseProducer<SummaryCtx>>(ctx)
                    .map_err(|e| format!("summary producer: {e}"))?;
                Some((producer, topic))
            }
            None => None,
        };
        Ok(Self {
            factory,
            auditors,
            summary,
            metrics,
            tracker,
            exported: BTreeSet::new(),
            failed_logged: None,
        })
    }

    /// The auditor of the item's model; after a swap its windows close (cut short,
    /// `model`) and a new auditor starts against the new bundle.
    fn observe(&mut self, item: &WindowFeedItem) {
        let d = &item.decider;
        let sha = &d.model.model_ref.sha256;
        let at = match self.auditors.iter().position(|a| a.model == d.name) {
            Some(i) if &self.auditors[i].sha256 == sha => i,
            found => {
                let auditor = match self.factory.build(d) {
                    Ok(a) => a,
                    Err(e) => {
                        // Checked before a swap serves, so only a bug gets here: say it once.
                        tracing::error!(model = %d.name, "window audit: no auditor for the new bundle: {e}");
                        return;
                    }
                };
                let fresh = ModelAuditor { model: d.name.clone(), sha256: sha.clone(), auditor };
                match found {
                    Some(i) => {
                        let mut old = std::mem::replace(&mut self.auditors[i], fresh);
                        let closed = old.auditor.close_all("model");
                        self.emit(closed);
                        i
                    }
                    None => {
                        self.auditors.push(fresh);
                        self.auditors.len() - 1
                    }
                }
            }
        };
        let closed = self.auditors[at].auditor.observe(&item.as_item());
        self.emit(closed);
    }

    /// Audits until the feed closes (the scorers are done), then cuts the open windows
    /// short and flushes their records.
    pub fn run(mut self, feed: Receiver<WindowFeedItem>) {
        let mut last_tick = Instant::now();
        loop {
            match feed.recv_timeout(TICK) {
                Ok(item) => self.observe(&item),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick();
            }
        }
        let closed: Vec<WindowRecord> =
            self.auditors.iter_mut().flat_map(|a| a.auditor.close_all("shutdown")).collect();
        self.emit(closed);
        if let Some((producer, _)) = &self.summary {
            if let Err(e) = producer.flush(Duration::from_secs(1)) {
                tracing::warn!("window records not all delivered at shutdown: {e}");
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let closed: Vec<WindowRecord> =
            self.auditors.iter_mut().flat_map(|a| a.auditor.close_due(now)).collect();
        self.emit(closed);
        let assigned: BTreeSet<(String, i32)> =
            self.tracker.lock().map(|t| t.assigned().into_iter().collect()).unwrap_or_default();
        let closed: Vec<WindowRecord> = self
            .auditors
            .iter_mut()
            .flat_map(|a| a.auditor.cut_partitions(|topic, p| assigned.contains(&(topic.to_string(), p))))
            .collect();
        self.emit(closed);
        // The detector's alarm state per group; groups dropped as idle leave the metrics.
        let mut tracked: BTreeSet<(String, String)> = BTreeSet::new();
        for a in &self.auditors {
            for (topic, group) in a.auditor.tracked() {
                self.metrics.set_drift_detected(&topic, &group, a.auditor.in_alarm(&topic, &group));
                tracked.insert((topic, group));
            }
        }
        for (topic, group) in self.exported.difference(&tracked) {
            self.metrics.remove_window_group(topic, group);
        }
        self.exported = tracked;
        if let Some((producer, _)) = &self.summary {
            producer.poll(Duration::ZERO);
        }
    }

    fn emit(&mut self, closed: Vec<WindowRecord>) {
        for record in closed {
            self.metrics.record_window(&record);
            if record.tests.cusum.alarms > 0 {
                self.metrics.set_drift_detected(&record.topic, &record.group, true);
            }
            if record.shifted() {
                tracing::warn!(window = %record.line(), "window shifted");
            } else {
                tracing::debug!(window = %record.line(), "window closed");
            }
            self.publish(&record);
        }
    }

    fn publish(&mut self, record: &WindowRecord) {
        let Some((producer, topic)) = &self.summary else { return };
        let value = match serde_json::to_vec(record) {
            Ok(v) => v,
            Err(e) => return self.failed(&format!("encoding a window record: {e}")),
        };
        let key = format!("{}/{}", record.topic, record.group);
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header { key: "dlsr-record", value: Some("window") });
        let sent = producer.send(BaseRecord::to(topic).key(&key).payload(&value).headers(headers));
        if let Err((e, _)) = sent {
            let why = format!("publishing a window record to {topic}: {e}");
            self.failed(&why);
        }
    }

    fn failed(&mut self, why: &str) {
        self.metrics.window_records_failed.inc();
        if self.failed_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            self.failed_logged = Some(Instant::now());
            tracing::warn!("{why} (dlsr_window_records_failed_total counts them)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_comes_from_a_header_or_a_json_field() {
        let headers: Vec<Header> = vec![(b"camera_id".to_vec(), Some(b"cam-7".to_vec()))];
        let by_header = GroupBy::parse("header:camera_id").unwrap();
        assert_eq!(group_value(&by_header, &headers, None), Some(b"cam-7".to_vec()));
        assert_eq!(group_value(&GroupBy::parse("header:site").unwrap(), &headers, None), None);
        // A JSON field is read by the envelope while it parses the event.
        let by_field = GroupBy::parse("json:/meta/camera").unwrap();
        let spec = crate::data::envelope::EnvelopeSpec {
            group_pointer: by_field.json_pointer().to_string(),
            ..Default::default()
        };
        let event = br#"{"uri": "s3://b/k", "meta": {"camera": 12}}"#;
        let group = crate::data::chain::unpack(event, &spec).unwrap().group;
        assert_eq!(group_value(&by_field, &[], group.as_deref()), Some(b"12".to_vec()));
        let named = crate::data::chain::unpack(br#"{"uri": "s3://b/k", "meta": {"camera": "north"}}"#, &spec);
        assert_eq!(named.unwrap().group.as_deref(), Some("north"));
        assert_eq!(crate::data::chain::unpack(b"\x89PNG", &spec).unwrap().group, None);
        assert_eq!(
            crate::data::chain::unpack(br#"{"uri": "s3://b/k", "meta": {"camera": null}}"#, &spec)
                .unwrap()
                .group,
            None
        );
        assert_eq!(group_value(&GroupBy::None, &headers, Some("x")), None);
    }

    #[test]
    fn a_swapped_bundle_closes_its_topics_windows_as_cut_short_and_starts_new_ones() {
        use crate::stream::decide::tests::{calibration, model_with};
        let factory = AuditorFactory {
            settings: WindowSettings {
                window_items: 100,
                window_max: None,
                min_items: 10,
                alpha: 0.001,
                max_groups: 10,
                group_idle: Duration::from_secs(600),
                expected_run_time_items: 1000,
                detector_shift: 0.5,
            },
            group_by: GroupBy::None,
            allow_quantile_reference: false,
        };
        let cfg = crate::config::Config::default();
        let decider =
            |sha| Arc::new(Decider::resolve(&cfg, "default", model_with(sha, calibration())).unwrap());
        let (a, b) = (decider('a'), decider('b'));
        let metrics = Arc::new(Metrics::new(vec![0.0]));
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let mut stage = WindowStage::new(factory, &[a.clone()], None, metrics.clone(), tracker).unwrap();
        let item = |n: i64, d: &Arc<Decider>| WindowFeedItem {
            topic: "images".into(),
            group: None,
            partition: 0,
            offset: n,
            timestamp: None,
            id: format!("k{n}"),
            kind: ScoreKind::Mfsim,
            score: 500.0,
            threshold: 950.0,
            flagged: false,
            layer_cos: Vec::new(),
            decider: d.clone(),
        };
        for n in 0..30 {
            stage.observe(&item(n, &a));
        }
        assert!(!metrics.render().contains("dlsr_windows_total{"), "no window closed yet");
        stage.observe(&item(30, &b));
        let text = metrics.render();
        assert!(
            text.contains("dlsr_windows_total{topic=\"images\""),
            "the old bundle's window closed:\n{text}"
        );
        assert_eq!(stage.auditors.len(), 1);
        assert_eq!(stage.auditors[0].sha256, b.model.model_ref.sha256, "a new auditor for the new bundle");
        let open: usize = stage.auditors[0].auditor.tracked().len();
        assert_eq!(open, 1, "the item of the new bundle opened a window");
    }
}
