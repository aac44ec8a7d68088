//! The daemon's Prometheus metrics, all under `dlsr_`, with bounded labels: topic,
//! partition, score kind, verdict, error code, layer index, configured model name.
//! Never an item id or an error message. The score histogram's buckets are built from
//! the bundles' ID quantiles and include every threshold in force as an edge, so
//! `rate(dlsr_score_bucket{le="<threshold>"})` is exactly the ID-accepted rate; the
//! daemon rebuilds them when a reload changes a threshold or a bundle.

use crate::model::score::ScoreKind;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounterVec,
    pub verdicts: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub delivery_errors: IntCounterVec,
    /// Rebuilt (new bucket edges) on reloads; see [`Metrics::set_score_buckets`].
    score: std::sync::RwLock<HistogramVec>,
    pub layer_cosine: HistogramVec,
    pub batch_size: Histogram,
    pub decode_seconds: Histogram,
    pub batch_wait_seconds: Histogram,
    pub inference_seconds: Histogram,
    pub end_to_end_seconds: HistogramVec,
    pub in_flight: IntGauge,
    pub consumer_paused: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub threshold: GaugeVec,
    pub threshold_id_fpr: GaugeVec,
    pub threshold_id_fpr_bound: GaugeVec,
    pub id_score_quantile: GaugeVec,
    pub model_info: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub model_reloads: IntCounterVec,
    pub model_reload_failing: IntGaugeVec,
    /// The `dlsr_model_info` labels in force per model (replaced on a swap).
    model_info_labels: std::sync::Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    pub broker_up: IntGauge,
    pub output_blocked: IntGaugeVec,
    pub retry_queue: IntGauge,
    pub scoring_splits: IntCounter,
    pub commit_errors: IntCounter,
    pub dead_letters_truncated: IntCounterVec,
    pub input_blocked: IntGaugeVec,
    pub skipped_offsets: IntCounterVec,
    pub input_errors: IntCounterVec,
    pub decoder_panics: IntCounter,
    pub in_flight_bytes: IntGauge,
    pub fetch_seconds: HistogramVec,
    pub fetch_bytes: IntCounterVec,
    pub fetch_errors: IntCounterVec,
    pub fetches_in_flight: IntGauge,
    pub fetch_stores_unreachable: IntGauge,
    pub window_p_value: GaugeVec,
    pub window_median_shift: GaugeVec,
    pub windows: IntCounterVec,
    pub drift_detected: IntGaugeVec,
    pub drift_alarms: IntCounterVec,
    pub window_records_failed: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric definition");
    r.register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn plain_histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric definition");
    r.register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn int_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric definition");
    r.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric definition");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

fn int_gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone())).expect("metric registered once");
    g
}

/// Sorted, deduplicated, finite bucket edges.
pub fn clean_buckets(mut edges: Vec<f64>) -> Vec<f64> {
    edges.retain(|x| x.is_finite());
    edges.sort_by(f64::total_cmp);
    edges.dedup_by(|a, b| (*a - *b).abs() <= 1e-12 * a.abs().max(1.0));
    if edges.is_empty() {
        edges.push(0.0);
    }
    edges
}

impl Metrics {
    /// `score_buckets` should come from [`score_buckets`].
    pub fn new(score_buckets: Vec<f64>) -> Self {
        let r = Registry::new();
        // Fine around the 100-500 ms where a latency objective sits (doubling buckets
        // could only say "between 256 and 512 ms"), then coarse up to a minute.
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4,
            0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
        ];
        Self {
            consumed: counter(
                &r,
                "dlsr_messages_consumed_total",
                "Messages read from the input topics.",
                &["topic"],
            ),
            verdicts: counter(
                &r,
                "dlsr_verdicts_total",
                "Messages scored, by verdict (ood or id).",
                &["topic", "verdict"],
            ),
            dead_letters: counter(
                &r,
                "dlsr_dead_letters_total",
                "Messages sent to the dead-letter topic, by error code.",
                &["topic", "code"],
            ),
            delivery_errors: counter(
                &r,
                "dlsr_delivery_errors_total",
                "Failed or refused deliveries of verdicts or dead letters, by librdkafka error code \
                 (retried: transient ones with backoff, permanent ones block the output).",
                &["topic", "code"],
            ),
            score: std::sync::RwLock::new(score_histogram(&r, score_buckets)),
            layer_cosine: histogram(
                &r,
                "dlsr_layer_cosine",
                "Per-layer cosine between an item's features and their reconstruction.",
                &["layer"],
                vec![0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0],
            ),
            batch_size: plain_histogram(
                &r,
                "dlsr_batch_size",
                "Items per scoring batch.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            decode_seconds: plain_histogram(
                &r,
                "dlsr_decode_seconds",
                "Decoding and preprocessing one image.",
                latency.clone(),
            ),
            batch_wait_seconds: plain_histogram(
                &r,
                "dlsr_batch_wait_seconds",
                "From an item being decoded to its batch starting: the time spent queueing for the scorer.",
                latency.clone(),
            ),
            inference_seconds: plain_histogram(
                &r,
                "dlsr_inference_seconds",
                "Encoder + LFDN time of one batch.",
                latency.clone(),
            ),
            end_to_end_seconds: histogram(
                &r,
                "dlsr_end_to_end_seconds",
                "From the message's timestamp to its verdict being handed to the producer.",
                &["topic"],
                latency,
            ),
            in_flight: int_gauge(
                &r,
                "dlsr_in_flight",
                "Messages consumed whose output is not yet acknowledged.",
            ),
            consumer_paused: int_gauge(
                &r,
                "dlsr_consumer_paused",
                "1 while the consumer is paused by back-pressure.",
            ),
            consumer_lag: int_gauge_vec(
                &r,
                "dlsr_consumer_lag",
                "High watermark minus the committed point, per assigned partition.",
                &["topic", "partition"],
            ),
            threshold: gauge_vec(
                &r,
                "dlsr_threshold",
                "Threshold in force per input topic.",
                &["topic", "kind"],
            ),
            threshold_id_fpr: gauge_vec(
                &r,
                "dlsr_threshold_id_fpr",
                "Share of the bundle's held-out ID items above the threshold in force: the OOD rate \
                 to expect while the stream is in distribution. An estimate from the held-out items \
                 (5% from 500 items is 3.2%..7.3% at 95%): dlsr_threshold_id_fpr_bound holds its \
                 95% interval, for alerts that should not fire on calibration noise.",
                &["topic", "kind"],
            ),
            threshold_id_fpr_bound: gauge_vec(
                &r,
                "dlsr_threshold_id_fpr_bound",
                "Lower and upper end of the 95% interval (Clopper-Pearson, from the number of \
                 held-out items) of dlsr_threshold_id_fpr.",
                &["topic", "kind", "bound"],
            ),
            id_score_quantile: gauge_vec(
                &r,
                "dlsr_id_score_quantile",
                "Quantiles of the bundle's held-out ID scores, per model and score kind.",
                &["model", "kind", "quantile"],
            ),
            model_info: int_gauge_vec(
                &r,
                "dlsr_model_info",
                "The bundle each configured model serves (value 1); the series changes with a swap.",
                &["model", "bundle", "sha256", "encoder", "input_size"],
            ),
            build_info: int_gauge_vec(&r, "dlsr_build_info", "dlsr build (value 1).", &["version"]),
            config_reloads: counter(
                &r,
                "dlsr_config_reloads_total",
                "SIGHUP reloads, by result (ok or rejected).",
                &["result"],
            ),
            model_reloads: counter(
                &r,
                "dlsr_model_reloads_total",
                "Bundle reloads (SIGHUP or model.watch) per model, by result: swapped, or rejected \
                 (the file failed a check; the old bundle keeps scoring).",
                &["model", "result"],
            ),
            model_reload_failing: int_gauge_vec(
                &r,
                "dlsr_model_reload_failing",
                "1 while the newest reload of a model's bundle was rejected (the file on disk is not \
                 what scores); 0 once a reload succeeds.",
                &["model"],
            ),
            model_info_labels: Default::default(),
            broker_up: int_gauge(&r, "dlsr_broker_up", "1 while the brokers answer."),
            output_blocked: int_gauge_vec(
                &r,
                "dlsr_output_blocked",
                "1 while an output topic refuses records with a permanent error (code): the \
                 daemon is not ready, keeps the inputs uncommitted and exits after \
                 kafka.output_blocked_exit_ms.",
                &["topic", "code"],
            ),
            retry_queue: int_gauge(
                &r,
                "dlsr_retry_queue",
                "Output records waiting for their next delivery attempt.",
            ),
            scoring_splits: int_counter(
                &r,
                "dlsr_scoring_splits_total",
                "Scoring batches that failed and were split in halves to isolate the failing item.",
            ),
            commit_errors: int_counter(
                &r,
                "dlsr_commit_errors_total",
                "Offset commits that failed (retried at the next commit interval).",
            ),
            dead_letters_truncated: counter(
                &r,
                "dlsr_dead_letters_truncated_total",
                "Dead letters whose original value did not fit kafka.message_max_bytes and was cut.",
                &["topic"],
            ),
            input_blocked: int_gauge_vec(
                &r,
                "dlsr_input_blocked",
                "1 while an input partition cannot be read past an offset for a reason that will \
                 not go away by itself (code: a batch that cannot be decompressed or is corrupt, \
                 an unsupported codec, no authorisation, a topic that does not exist); with \
                 kafka.on_unreadable = \"block\" nothing past it is committed. partition is \"-\" \
                 for a topic-wide fault.",
                &["topic", "partition", "code"],
            ),
            skipped_offsets: counter(
                &r,
                "dlsr_skipped_offsets_total",
                "Input offsets skipped unread under kafka.on_unreadable = \"skip\" (each range has a \
                 dead letter naming it).",
                &["topic", "code"],
            ),
            input_errors: counter(
                &r,
                "dlsr_input_errors_total",
                "Errors the consumer reported for an input partition, by librdkafka error code.",
                &["topic", "code"],
            ),
            decoder_panics: int_counter(
                &r,
                "dlsr_decoder_panics_total",
                "Messages whose decoding or preprocessing panicked (a decoder bug); each is \
                 dead-lettered with code decoder_panic.",
            ),
            in_flight_bytes: int_gauge(
                &r,
                "dlsr_in_flight_bytes",
                "Bytes the pipeline holds for messages in flight (payloads and decoded images), \
                 bounded by pipeline.in_flight_bytes.",
            ),
            fetch_seconds: histogram(
                &r,
                "dlsr_fetch_seconds",
                "Time to fetch a referenced image, retries included, by URI scheme.",
                &["scheme"],
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            ),
            fetch_bytes: counter(
                &r,
                "dlsr_fetch_bytes_total",
                "Bytes of referenced images fetched.",
                &["scheme"],
            ),
            fetch_errors: counter(
                &r,
                "dlsr_fetch_errors_total",
                "Failed fetch attempts, by scheme and code: transient (timeout, server_error, unreachable; \
                 retried) or permanent (a dead-letter code such as fetch_not_found).",
                &["scheme", "code"],
            ),
            fetches_in_flight: int_gauge(&r, "dlsr_fetches_in_flight", "Reference fetches in progress."),
            fetch_stores_unreachable: int_gauge(
                &r,
                "dlsr_fetch_stores_unreachable",
                "Object stores that referenced images are waiting on because they cannot be reached.",
            ),
            window_p_value: gauge_vec(
                &r,
                "dlsr_window_p_value",
                "The last closed window's p-value per test (binomial: Fisher's exact test of the flagged \
                 count; ks; cvm) against the bundle's held-out ID scores, after the Bonferroni correction \
                 over the tests and the topic's groups (a window is shifted when one is under audit.alpha).",
                &["topic", "group", "test"],
            ),
            window_median_shift: gauge_vec(
                &r,
                "dlsr_window_median_shift",
                "The last closed window's median score minus the held-out ID median, in robust ID \
                 standard deviations (1.4826 x MAD).",
                &["topic", "group"],
            ),
            windows: counter(
                &r,
                "dlsr_windows_total",
                "Closed audit windows by verdict (in_distribution, shifted, too_small).",
                &["topic", "verdict"],
            ),
            drift_detected: int_gauge_vec(
                &r,
                "dlsr_drift_detected",
                "1 while the group's online detector (a CUSUM on the items' ID percentiles) is in \
                 alarm: from an alarm until audit.window_items further items pass without one.",
                &["topic", "group"],
            ),
            drift_alarms: counter(
                &r,
                "dlsr_drift_alarms_total",
                "Alarms of the online detector (each restarts it).",
                &["topic", "group"],
            ),
            window_records_failed: int_counter(
                &r,
                "dlsr_window_records_failed_total",
                "Window records that could not be handed to the summary topic's producer.",
            ),
            registry: r,
        }
    }

    /// A closed window: its verdict, corrected p-values, median shift and alarms.
    pub fn record_window(&self, w: &crate::audit::window::WindowRecord) {
        self.windows.with_label_values(&[w.topic.as_str(), w.verdict.as_str()]).inc();
        if w.verdict == "too_small" {
            return;
        }
        for (test, p) in &w.p_adjusted {
            self.window_p_value
                .with_label_values(&[w.topic.as_str(), w.group.as_str(), test.as_str()])
                .set(*p);
        }
        if w.median_shift.is_finite() {
            self.window_median_shift
                .with_label_values(&[w.topic.as_str(), w.group.as_str()])
                .set(w.median_shift);
        }
        if w.tests.cusum.alarms > 0 {
            self.drift_alarms
                .with_label_values(&[w.topic.as_str(), w.group.as_str()])
                .inc_by(w.tests.cusum.alarms);
        }
    }

    pub fn set_drift_detected(&self, topic: &str, group: &str, alarm: bool) {
        self.drift_detected.with_label_values(&[topic, group]).set(i64::from(alarm));
    }

    /// A group dropped by the auditor (idle): its series go, so labels stay bounded.
    pub fn remove_window_group(&self, topic: &str, group: &str) {
        let _ = self.drift_detected.remove_label_values(&[topic, group]);
        let _ = self.window_median_shift.remove_label_values(&[topic, group]);
        let _ = self.drift_alarms.remove_label_values(&[topic, group]);
        for test in crate::audit::window::TESTS {
            let _ = self.window_p_value.remove_label_values(&[topic, group, test]);
        }
    }

    // Typed recording methods: the label order and the label values of every series the
    // pipeline writes are defined here once.

    /// A message read from an input topic.
    pub fn record_consumed(&self, topic: &str) {
        self.consumed.with_label_values(&[topic]).inc();
    }

    /// Series at 0 from the start, so rate() counts the first messages too and an OOD rate
    /// exists (0) for a topic that never had an OOD verdict.
    pub fn start_topic(&self, topic: &str) {
        self.consumed.with_label_values(&[topic]);
        for verdict in ["id", "ood"] {
            self.verdicts.with_label_values(&[topic, verdict]);
        }
    }

    pub fn record_verdict(&self, topic: &str, is_ood: bool) {
        self.verdicts.with_label_values(&[topic, if is_ood { "ood" } else { "id" }]).inc();
    }

    /// `code` comes from a bounded set (decode error codes, `scoring_failed`, ...).
    pub fn record_dead_letter(&self, topic: &str, code: &str) {
        self.dead_letters.with_label_values(&[topic, code]).inc();
    }

    pub fn record_dead_letter_truncated(&self, topic: &str) {
        self.dead_letters_truncated.with_label_values(&[topic]).inc();
    }

    /// `code` is a librdkafka error code name (a bounded set).
    pub fn record_delivery_error(&self, topic: &str, code: &str) {
        self.delivery_errors.with_label_values(&[topic, code]).inc();
    }

    pub fn set_output_blocked(&self, topic: &str, code: &str, blocked: bool) {
        if blocked {
            self.output_blocked.with_label_values(&[topic, code]).set(1);
        } else {
            let _ = self.output_blocked.remove_label_values(&[topic, code]);
        }
    }

    /// `partition` is None for a topic-wide fault (a topic that does not exist).
    pub fn set_input_blocked(&self, topic: &str, partition: Option<i32>, code: &str, blocked: bool) {
        let partition = partition.map_or_else(|| "-".to_string(), |p| p.to_string());
        let labels = [topic, partition.as_str(), code];
        if blocked {
            self.input_blocked.with_label_values(&labels).set(1);
        } else {
            let _ = self.input_blocked.remove_label_values(&labels);
        }
    }

    pub fn record_input_error(&self, topic: &str, code: &str) {
        self.input_errors.with_label_values(&[topic, code]).inc();
    }

    pub fn record_skipped_offsets(&self, topic: &str, code: &str, count: u64) {
        self.skipped_offsets.with_label_values(&[topic, code]).inc_by(count);
    }

    pub fn record_score(&self, topic: &str, model: &str, kind: ScoreKind, value: f64) {
        let score = self.score.read().unwrap_or_else(|p| p.into_inner());
        score.with_label_values(&[topic, kind.name(), model]).observe(value);
    }

    /// New score bucket edges (thresholds or bundles changed): the histogram is replaced,
    /// its counts start again (Prometheus reads the drop as a counter reset), and
    /// `rate(dlsr_score_bucket{le="<threshold>"})` holds again for the new thresholds.
    pub fn set_score_buckets(&self, edges: Vec<f64>) {
        let mut score = self.score.write().unwrap_or_else(|p| p.into_inner());
        let _ = self.registry.unregister(Box::new(score.clone()));
        *score = score_histogram(&self.registry, edges);
    }

    pub fn record_layer_cosine(&self, layer: usize, cosine: f64) {
        self.layer_cosine.with_label_values(&[layer.to_string().as_str()]).observe(cosine);
    }

    pub fn record_end_to_end(&self, topic: &str, seconds: f64) {
        self.end_to_end_seconds.with_label_values(&[topic]).observe(seconds);
    }

    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.consumer_lag.with_label_values(&[topic, partition.to_string().as_str()]).set(lag);
    }

    pub fn remove_lag(&self, topic: &str, partition: i32) {
        let _ = self.consumer_lag.remove_label_values(&[topic, partition.to_string().as_str()]);
    }

    /// `id_fpr`: the expected ID false-positive rate and its 95% interval. The topic's
    /// series of other score kinds are removed (a reload may change its kind).
    pub fn set_threshold(&self, topic: &str, kind: ScoreKind, value: f64, id_fpr: Option<(f64, (f64, f64))>) {
        for other in ScoreKind::ALL {
            let _ = self.threshold.remove_label_values(&[topic, other.name()]);
            let _ = self.threshold_id_fpr.remove_label_values(&[topic, other.name()]);
            for bound in ["lower", "upper"] {
                let _ = self.threshold_id_fpr_bound.remove_label_values(&[topic, other.name(), bound]);
            }
        }
        self.threshold.with_label_values(&[topic, kind.name()]).set(value);
        if let Some((fpr, (lower, upper))) = id_fpr {
            self.threshold_id_fpr.with_label_values(&[topic, kind.name()]).set(fpr);
            self.threshold_id_fpr_bound.with_label_values(&[topic, kind.name(), "lower"]).set(lower);
            self.threshold_id_fpr_bound.with_label_values(&[topic, kind.name(), "upper"]).set(upper);
        }
    }

    pub fn set_id_quantile(&self, model: &str, kind: ScoreKind, quantile: &str, value: f64) {
        self.id_score_quantile.with_label_values(&[model, kind.name(), quantile]).set(value);
    }

    /// Removes a model's ID quantile series (before a swapped bundle sets its own).
    pub fn clear_id_quantiles(&self, model: &str) {
        for kind in ScoreKind::ALL {
            for q in ["0.5", "0.95", "0.99"] {
                let _ = self.id_score_quantile.remove_label_values(&[model, kind.name(), q]);
            }
        }
    }

    /// The bundle `model` serves now; its previous series (another sha256) goes.
    pub fn set_model_info(&self, model: &str, bundle: &str, sha256: &str, encoder: &str, input_size: i64) {
        self.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let labels: Vec<String> =
            [model, bundle, sha256, encoder, input_size.to_string().as_str()].map(String::from).to_vec();
        let mut held = self.model_info_labels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = held.insert(model.to_string(), labels.clone()) {
            let old: Vec<&str> = old.iter().map(String::as_str).collect();
            let _ = self.model_info.remove_label_values(&old);
        }
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.model_info.with_label_values(&labels).set(1);
    }

    /// A served model's reload series at 0, so that dashboards and `increase()` see them
    /// before the first reload.
    pub fn start_model(&self, model: &str) {
        for result in ["swapped", "rejected"] {
            self.model_reloads.with_label_values(&[model, result]).inc_by(0);
        }
        self.model_reload_failing.with_label_values(&[model]).set(0);
    }

    /// A bundle reload of `model`: swapped (`ok`) or rejected.
    pub fn record_model_reload(&self, model: &str, ok: bool) {
        let result = if ok { "swapped" } else { "rejected" };
        self.model_reloads.with_label_values(&[model, result]).inc();
        self.model_reload_failing.with_label_values(&[model]).set(i64::from(!ok));
    }

    /// `ok` or `rejected`.
    pub fn record_reload(&self, ok: bool) {
        self.config_reloads.with_label_values(&[if ok { "ok" } else { "rejected" }]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn score_histogram(r: &Registry, buckets: Vec<f64>) -> HistogramVec {
    histogram(
        r,
        "dlsr_score",
        "Scores by input topic, score kind and model; bucket edges at the ID quantiles and thresholds.",
        &["topic", "kind", "model"],
        buckets,
    )
}

/// Bucket edges for the score histogram: per score kind, ID quantiles from 1% to the
/// maximum, a few steps beyond, and the given thresholds.
pub fn score_buckets(calibration: &crate::eval::calibration::Calibration, thresholds: &[f64]) -> Vec<f64> {
    let mut edges = thresholds.to_vec();
    for c in calibration.scores.values() {
        if c.quantiles.len() < 2 {
            continue;
        }
        // The same quantiles the daemon exports as dlsr_id_score_quantile.
        let at = |p: f64| c.id_quantile(p);
        for p in [0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0] {
            edges.push(at(p));
        }
        let spread = (at(0.99) - at(0.5)).abs().max(1e-9);
        for k in [1.0, 2.0, 4.0, 8.0, 16.0, 32.0] {
            edges.push(at(1.0) + k * spread);
        }
        edges.push(c.threshold);
    }
    clean_buckets(edges)
}
