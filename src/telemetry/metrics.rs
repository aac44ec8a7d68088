//! The daemon's Prometheus metrics, all under `dlsr_`, with bounded labels: topic,
//! partition, score kind, verdict, error code, layer index. Never an item id or an
//! error message. The score histogram's buckets are built from the bundle's ID
//! quantiles and include every configured threshold as an edge, so
//! `rate(dlsr_score_bucket{le="<threshold>"})` is exactly the ID-accepted rate.

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub consumed: IntCounterVec,
    pub verdicts: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub delivery_errors: IntCounterVec,
    pub score: HistogramVec,
    pub layer_cosine: HistogramVec,
    pub batch_size: Histogram,
    pub decode_seconds: Histogram,
    pub inference_seconds: Histogram,
    pub end_to_end_seconds: HistogramVec,
    pub in_flight: IntGauge,
    pub consumer_paused: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub threshold: GaugeVec,
    pub threshold_id_fpr: GaugeVec,
    pub id_score_quantile: GaugeVec,
    pub model_info: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub broker_up: IntGauge,
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
        let latency = exponential_buckets(0.0005, 2.0, 16).expect("valid buckets");
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
                "Failed deliveries of verdicts or dead letters (retried with backoff).",
                &["topic"],
            ),
            score: histogram(
                &r,
                "dlsr_score",
                "Scores by input topic and score kind; bucket edges at the ID quantiles and thresholds.",
                &["topic", "kind"],
                score_buckets,
            ),
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
                 to expect while the stream is in distribution.",
                &["topic", "kind"],
            ),
            id_score_quantile: gauge_vec(
                &r,
                "dlsr_id_score_quantile",
                "Quantiles of the bundle's held-out ID scores, per score kind.",
                &["kind", "quantile"],
            ),
            model_info: int_gauge_vec(
                &r,
                "dlsr_model_info",
                "The bundle being served (value 1).",
                &["bundle", "sha256", "encoder", "input_size"],
            ),
            build_info: int_gauge_vec(&r, "dlsr_build_info", "dlsr build (value 1).", &["version"]),
            config_reloads: counter(
                &r,
                "dlsr_config_reloads_total",
                "SIGHUP reloads, by result (ok or rejected).",
                &["result"],
            ),
            broker_up: int_gauge(&r, "dlsr_broker_up", "1 while the brokers answer."),
            registry: r,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
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
