//! The daemon's pipeline with a stub scorer (no bundle, no downloaded assets) against
//! librdkafka's mock cluster: poison pills (non-UTF-8 header keys, payloads larger than a
//! record), outputs that keep refusing, panics, scoring errors, non-finite scores,
//! back-pressure, rebalances with work in flight, retries, and bounded shutdown. Each
//! test states the guarantee it checks; each would fail on the daemon before issue #9.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlsr::config::{Config, Publish};
use dlsr::data::{Normalisation, Preprocess, ResizeMode};
use dlsr::eval::calibration::{calibrate_scores, Calibration};
use dlsr::kafka::headers;
use dlsr::kafka::message::ModelRef;
use dlsr::model::score::{pixel_seed, ItemScores, LayerScore, ScoreKind};
use dlsr::stream::daemon::{self, Control, DaemonError, Summary};
use dlsr::stream::scorer::{ItemScorer, ModelInfo, ScoringError};
use dlsr::telemetry::metrics::{score_buckets, Metrics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedHeaders, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::common::{committed, http_get, mock_cluster as cluster, output_reader, wait_until};

/// What the stub does besides scoring.
#[derive(Default, Clone)]
pub(crate) struct Behaviour {
    /// Time per batch (a slow device).
    delay: Duration,
    /// A batch holding one of these seeds fails, like a CUDA error on one item.
    failing: HashSet<u64>,
    /// Items with these seeds score NaN.
    nan: HashSet<u64>,
    /// Panic on the n-th batch.
    panic_on_batch: Option<usize>,
}

/// Scores an image by its mean pixel (after the Lite normalisation: black -1, white +1).
struct Stub {
    info: ModelInfo,
    behaviour: Behaviour,
    batches: Arc<AtomicUsize>,
    /// The size of every batch scored, in order.
    sizes: Arc<std::sync::Mutex<Vec<usize>>>,
}

pub(crate) fn stub_info() -> ModelInfo {
    let reference: Vec<f64> = (0..=200).map(|i| f64::from(i) / 100.0 - 1.0).collect();
    let cal = calibrate_scores(&reference, 0.05).unwrap();
    ModelInfo {
        model_ref: ModelRef { name: "stub".into(), sha256: "0".repeat(64) },
        encoder: "stub".into(),
        preprocess: Preprocess {
            size: 8,
            resize: ResizeMode::Stretch,
            normalisation: Normalisation::LITE,
            antialias: true,
        },
        calibration: Calibration {
            target_fpr: 0.05,
            items: reference.len(),
            source: "stub".into(),
            precision: Default::default(),
            scores: [(ScoreKind::Mfsim, cal.clone()), (ScoreKind::Mse, cal)].into(),
            layer_cos: Vec::new(),
        },
        default_score: ScoreKind::Mfsim,
        has_lr: false,
    }
}

impl ItemScorer for Stub {
    fn model(&self) -> &ModelInfo {
        &self.info
    }

    fn score(&mut self, images: &tch::Tensor, seeds: &[u64]) -> Result<Vec<ItemScores>, ScoringError> {
        let n = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        self.sizes.lock().unwrap().push(seeds.len());
        std::thread::sleep(self.behaviour.delay);
        if self.behaviour.panic_on_batch == Some(n) {
            panic!("stub scorer: simulated bug on batch {n}");
        }
        if seeds.iter().any(|s| self.behaviour.failing.contains(s)) {
            return Err(ScoringError::Backend("CUDA out of memory (simulated)".into()));
        }
        let means = images.mean_dim([1i64, 2, 3].as_slice(), false, tch::Kind::Double);
        Ok(seeds
            .iter()
            .enumerate()
            .map(|(i, seed)| {
                let mut v = means.double_value(&[i as i64]);
                if self.behaviour.nan.contains(seed) {
                    v = f64::NAN;
                }
                ItemScores { mse: v, mfsim: v, lr: None, layers: vec![LayerScore { mse: v, cos: 1.0 }] }
            })
            .collect())
    }
}

pub(crate) fn config(brokers: &str, group: &str) -> Config {
    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers.to_string();
    cfg.kafka.group_id = group.to_string();
    cfg.kafka.publish = Publish::All;
    cfg.kafka.commit_interval_ms = 200;
    cfg.kafka.session_timeout_ms = 6000;
    cfg.metrics.listen = "127.0.0.1:0".into();
    cfg.pipeline.batch_max_size = 8;
    cfg.pipeline.in_flight_limit = 32;
    cfg.shutdown.drain_deadline_ms = 5000;
    cfg
}

pub(crate) struct Running {
    pub(crate) handle: std::thread::JoinHandle<Result<Summary, DaemonError>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) control: Control,
    batches: Arc<AtomicUsize>,
    sizes: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl Running {
    pub(crate) fn stop(self) -> Result<Summary, DaemonError> {
        self.control.shutdown.store(true, Ordering::Relaxed);
        self.handle.join().expect("the daemon thread itself must not panic")
    }

    pub(crate) fn metric(&self, prefix: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub(crate) fn readyz(&self) -> (u16, String) {
        let addr = self.control.http_addr.lock().ok().and_then(|a| *a);
        addr.and_then(|a| http_get(a, "/readyz").ok()).unwrap_or((0, String::new()))
    }
}

pub(crate) fn start(cfg: Config, behaviour: Behaviour) -> Running {
    start_scorers(cfg, behaviour, 1)
}

/// The daemon with `scorers` stub scorers side by side (sharing the batch counters).
pub(crate) fn start_scorers(cfg: Config, behaviour: Behaviour, scorers: usize) -> Running {
    start_with_decoder(cfg, behaviour, scorers, dlsr::stream::scorer::default_decoder())
}

/// [`start_scorers`] with a given image decoder.
pub(crate) fn start_with_decoder(
    cfg: Config,
    behaviour: Behaviour,
    scorers: usize,
    decoder: dlsr::stream::scorer::Decoder,
) -> Running {
    let info = stub_info();
    let metrics = Arc::new(Metrics::new(score_buckets(&info.calibration, &[])));
    let batches = Arc::new(AtomicUsize::new(0));
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stubs: Vec<Box<dyn ItemScorer>> = (0..scorers)
        .map(|_| {
            let stub = Stub {
                info: info.clone(),
                behaviour: behaviour.clone(),
                batches: batches.clone(),
                sizes: sizes.clone(),
            };
            Box::new(stub) as Box<dyn ItemScorer>
        })
        .collect();
    let control = Control::default();
    let (c, m) = (control.clone(), metrics.clone());
    let handle = std::thread::spawn(move || daemon::run_with_parts(cfg, None, c, m, stubs, decoder));
    Running { handle, metrics, control, batches, sizes }
}

/// A tiny PNG of one grey level (0 black .. 255 white).
/// The noise seed the daemon gives a message: from its decoded pixels.
pub(crate) fn seed_of(message: &[u8]) -> u64 {
    let image = dlsr::data::decode::decode(message, &Default::default()).unwrap();
    pixel_seed(image.width, image.height, &image.rgb)
}

pub(crate) fn png(level: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(6, 6, image::Rgb([level; 3]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Headers built through librdkafka's C API, so keys can be any bytes (rdkafka's own
/// `OwnedHeaders::insert` only takes `&str` keys).
fn raw_headers(list: &[(&[u8], &[u8])]) -> OwnedHeaders {
    use rdkafka::bindings as rdsys;
    unsafe {
        let native = rdsys::rd_kafka_headers_new(list.len());
        for (k, v) in list {
            let err = rdsys::rd_kafka_header_add(
                native,
                k.as_ptr().cast(),
                k.len() as isize,
                v.as_ptr().cast(),
                v.len() as isize,
            );
            assert_eq!(err, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        }
        let owned = (*native.cast::<BorrowedHeaders>()).detach();
        rdsys::rd_kafka_headers_destroy(native);
        owned
    }
}

/// Sends (key, value, headers) to `images`, round-robin over its partitions.
fn produce(brokers: &str, messages: Vec<(String, Vec<u8>, Option<OwnedHeaders>)>) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "4000000")
        .create()
        .unwrap();
    for (i, (key, value, headers)) in messages.iter().enumerate() {
        let mut r = BaseRecord::to("images").key(key).payload(value).partition((i % 3) as i32);
        if let Some(h) = headers {
            r = r.headers(h.clone());
        }
        p.send(r).map_err(|(e, _)| e).unwrap();
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(20)).unwrap();
}

pub(crate) fn grey(prefix: &str, n: usize) -> Vec<(String, Vec<u8>, Option<OwnedHeaders>)> {
    (0..n).map(|i| (format!("{prefix}-{i}"), png((i * 37 % 200) as u8), None)).collect()
}

/// One output as read back, headers byte for byte.
#[derive(Debug, Clone)]
struct Output {
    topic: String,
    key: String,
    value: Vec<u8>,
    headers: Vec<headers::Header>,
    /// The input's (partition, offset) it answers.
    source: (i32, i64),
}

struct Reader(BaseConsumer);

impl Reader {
    fn new(brokers: &str, group: &str) -> Self {
        Self(output_reader(brokers, group))
    }

    /// Both output topics (one partition each) from the start, by assignment: no group
    /// to join, so it can read up to a given point at once.
    fn assigned(brokers: &str) -> Self {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "assigned-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for topic in ["dlsr-verdicts", "dlsr-dead-letters"] {
            tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
        }
        c.assign(&tpl).unwrap();
        Self(c)
    }

    /// Reads until `outputs` holds every record the output topics hold now.
    fn read_to_end(&self, outputs: &mut Vec<Output>) {
        let ends: Vec<(&str, i64)> = ["dlsr-verdicts", "dlsr-dead-letters"]
            .into_iter()
            .map(|t| (t, self.0.fetch_watermarks(t, 0, Duration::from_secs(5)).unwrap().1))
            .collect();
        let behind = |outputs: &[Output]| {
            ends.iter().any(|(t, end)| (outputs.iter().filter(|o| o.topic == *t).count() as i64) < *end)
        };
        let started = Instant::now();
        while behind(outputs) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the output topics could not be read to {ends:?}"
            );
            if let Some(o) = self.next(Duration::from_millis(100)) {
                outputs.push(o);
            }
        }
    }

    /// Reads until `n` outputs or the timeout.
    fn read(&self, n: usize, timeout: Duration) -> Vec<Output> {
        let started = Instant::now();
        let mut out = Vec::new();
        while out.len() < n && started.elapsed() < timeout {
            if let Some(o) = self.next(Duration::from_millis(100)) {
                out.push(o);
            }
        }
        out
    }

    fn next(&self, wait: Duration) -> Option<Output> {
        let m = self.0.poll(wait)?.ok()?;
        let hs = headers::read(&m);
        let value = m.payload().unwrap_or_default().to_vec();
        let source = if m.topic() == "dlsr-dead-letters" {
            let num = |k: &str| {
                headers::find(&hs, k).and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok()).unwrap()
            };
            (num("dlsr-source-partition") as i32, num("dlsr-source-offset"))
        } else {
            let v: serde_json::Value = serde_json::from_slice(&value).unwrap();
            (v["source"]["partition"].as_i64().unwrap() as i32, v["source"]["offset"].as_i64().unwrap())
        };
        Some(Output {
            topic: m.topic().to_string(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            value,
            headers: hs,
            source,
        })
    }
}

fn end_offsets(brokers: &str) -> BTreeMap<i32, i64> {
    let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    (0..3).map(|p| (p, probe.fetch_watermarks("images", p, Duration::from_secs(5)).unwrap().1)).collect()
}

/// At-least-once, checked from outside: no committed offset passes an input that has no
/// acknowledged output. `outputs` must have been read after `commits` was sampled.
fn assert_commits_covered(commits: &BTreeMap<i32, Option<i64>>, outputs: &[Output]) {
    let answered: BTreeSet<(i32, i64)> = outputs.iter().map(|o| o.source).collect();
    for (p, c) in commits {
        for offset in 0..c.unwrap_or(0) {
            assert!(
                answered.contains(&(*p, offset)),
                "partition {p} committed {c:?} past {offset}, which has no output"
            );
        }
    }
}

#[test]
fn a_header_key_that_is_not_utf8_is_kept_byte_for_byte_on_verdicts_and_dead_letters() {
    let (_cluster, brokers) = cluster();
    let poison: &[(&[u8], &[u8])] = &[(&[0xff, 0xfe], &[0x00, 0x01, 0xff]), (b"trace", b"abc")];
    let mut messages = grey("ok", 6);
    messages.push(("binary-key".into(), png(250), Some(raw_headers(poison))));
    messages.push(("binary-key-corrupt".into(), b"not an image".to_vec(), Some(raw_headers(poison))));
    produce(&brokers, messages);
    let daemon = start(config(&brokers, "g-utf8"), Behaviour::default());
    let outputs = Reader::new(&brokers, "r-utf8").read(8, Duration::from_secs(60));
    let summary = daemon.stop().expect("one odd header must not stop the daemon");
    assert!(summary.drained && summary.final_commit_confirmed, "{summary:?}");
    assert_eq!(outputs.len(), 8, "every input has its output: {outputs:?}");
    let want: Vec<headers::Header> = poison.iter().map(|(k, v)| (k.to_vec(), Some(v.to_vec()))).collect();
    for key in ["binary-key", "binary-key-corrupt"] {
        let o = outputs.iter().find(|o| o.key == key).unwrap();
        assert_eq!(&o.headers[..2], &want[..], "{key}: input headers must be copied unchanged");
    }
    let dead = outputs.iter().find(|o| o.key == "binary-key-corrupt").unwrap();
    assert_eq!(dead.topic, "dlsr-dead-letters");
    assert_eq!(summary.consumed, 8);
    let ends = end_offsets(&brokers);
    let commits = committed(&brokers, "g-utf8");
    for (p, end) in ends {
        assert_eq!(commits[&p], Some(end), "partition {p} must be committed to its end");
    }
}

#[test]
fn an_undecodable_payload_larger_than_a_record_is_dead_lettered_cut_and_committed_past() {
    use sha2::Digest;
    let (_cluster, brokers) = cluster();
    let mut state = 0x1234_5678_u64;
    let big: Vec<u8> = (0..1_500_000)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect();
    let sha = hex::encode(sha2::Sha256::digest(&big));
    let mut messages = vec![("big".to_string(), big, None)];
    messages.extend(grey("after", 5));
    produce(&brokers, messages);
    let daemon = start(config(&brokers, "g-big"), Behaviour::default());
    let outputs = Reader::new(&brokers, "r-big").read(6, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(600)); // one more commit interval
    let commits = committed(&brokers, "g-big");
    let summary = daemon.stop().unwrap();
    let dead = outputs.iter().find(|o| o.key == "big").expect("the big message must be dead-lettered");
    assert_eq!(headers::find(&dead.headers, "dlsr-error-code"), Some(&b"unsupported_format"[..]));
    assert!(dead.value.len() < 1_000_000 && dead.value.len() > 900_000, "cut to fit: {}", dead.value.len());
    assert_eq!(headers::find(&dead.headers, "dlsr-original-length"), Some(&b"1500000"[..]));
    assert_eq!(headers::find(&dead.headers, "dlsr-original-sha256"), Some(sha.as_bytes()));
    assert_eq!(headers::find(&dead.headers, "dlsr-value-truncated"), Some(&b"true"[..]));
    assert_eq!(outputs.len(), 6, "the partition moved on past it");
    assert!(summary.drained);
    assert_eq!(commits[&0], Some(end_offsets(&brokers)[&0]), "committed past the big message");
}

#[test]
fn a_dead_letter_topic_that_keeps_refusing_blocks_the_output_commits_nothing_past_it_and_exits_non_zero() {
    let (cluster, brokers) = cluster();
    produce(&brokers, (0..3).map(|i| (format!("corrupt-{i}"), b"garbage".to_vec(), None)).collect());
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 400],
    );
    let mut cfg = config(&brokers, "g-blocked");
    cfg.kafka.output_blocked_exit_ms = 6000;
    let daemon = start(cfg, Behaviour::default());
    wait_until("dlsr_output_blocked", Duration::from_secs(30), || {
        daemon.metric("dlsr_output_blocked{code=\"topic_authorization_failed\",topic=\"dlsr-dead-letters\"}")
            == 1.0
    });
    // Readiness is re-evaluated on the daemon's tick, so an earlier 503 (the wait for the
    // assignment) can still be the answer for a moment after the metric moved: wait for
    // the reason, not for any 503.
    wait_until("/readyz 503 naming the refusing topic", Duration::from_secs(10), || {
        let (status, body) = daemon.readyz();
        status == 503 && body.contains("dlsr-dead-letters")
    });
    assert!(daemon.metric("dlsr_delivery_errors_total") >= 1.0);
    let during = committed(&brokers, "g-blocked");
    assert!(during.values().all(|c| c.unwrap_or(0) == 0), "committed past refused outputs: {during:?}");
    let started = Instant::now();
    let result = daemon.handle.join().unwrap();
    match result {
        Err(DaemonError::Fault(why)) => assert!(why.contains("dlsr-dead-letters"), "{why}"),
        other => panic!("a blocked output must end the run with a fault: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(20), "it exits after output_blocked_exit_ms");
    let after = committed(&brokers, "g-blocked");
    assert!(after.values().all(|c| c.unwrap_or(0) == 0), "committed past refused outputs: {after:?}");
}

#[test]
fn a_panicking_scorer_ends_the_run_with_an_error_within_seconds() {
    let (_cluster, brokers) = cluster();
    produce(&brokers, grey("p", 20));
    let mut cfg = config(&brokers, "g-panic");
    cfg.pipeline.batch_max_size = 2;
    let daemon = start(cfg, Behaviour { panic_on_batch: Some(3), ..Default::default() });
    let started = Instant::now();
    wait_until("the panic", Duration::from_secs(60), || daemon.batches.load(Ordering::SeqCst) >= 3);
    let panicked_at = Instant::now();
    let result = daemon.handle.join().unwrap();
    match result {
        Err(DaemonError::Fault(why)) => assert!(why.contains("dlsr-scorer"), "{why}"),
        other => panic!("a scorer panic must end the run with an error: {other:?}"),
    }
    assert!(
        panicked_at.elapsed() < Duration::from_secs(8),
        "ended {:?} after the panic",
        panicked_at.elapsed()
    );
    // Whatever the panic left without output is not committed.
    let commits = committed(&brokers, "g-panic");
    let outputs = Reader::new(&brokers, "r-panic").read(20, Duration::from_secs(12));
    assert!(outputs.len() < 20, "the panic left some messages without output");
    assert_commits_covered(&commits, &outputs);
    assert!(started.elapsed() < Duration::from_secs(70));
}

#[test]
fn sigterm_with_a_stuck_retry_queue_returns_within_the_drain_deadline() {
    let (cluster, brokers) = cluster();
    produce(&brokers, grey("stuck", 12));
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 1000],
    );
    let mut cfg = config(&brokers, "g-stuck");
    cfg.shutdown.drain_deadline_ms = 1500;
    let daemon = start(cfg, Behaviour::default());
    wait_until("records waiting for a retry", Duration::from_secs(60), || {
        daemon.metric("dlsr_retry_queue") >= 1.0
    });
    let started = Instant::now();
    let summary = daemon.stop().expect("a stop is not a fault");
    let took = started.elapsed();
    assert!(
        took <= Duration::from_millis(1500) + daemon::SHUTDOWN_MARGIN,
        "shutdown took {took:?}, over the deadline plus the margin"
    );
    assert!(!summary.drained);
    let after = committed(&brokers, "g-stuck");
    assert!(after.values().all(|c| c.unwrap_or(0) == 0), "committed unacknowledged work: {after:?}");
}

#[test]
fn a_scoring_error_on_one_item_of_a_batch_dead_letters_only_that_item() {
    let (_cluster, brokers) = cluster();
    let messages = grey("batch", 16);
    let bad = messages[5].1.clone();
    produce(&brokers, messages);
    let mut cfg = config(&brokers, "g-split");
    cfg.pipeline.batch_max_wait_ms = 300;
    let daemon = start(cfg, Behaviour { failing: [seed_of(&bad)].into(), ..Default::default() });
    let outputs = Reader::new(&brokers, "r-split").read(16, Duration::from_secs(60));
    let splits = daemon.metric("dlsr_scoring_splits_total");
    daemon.stop().unwrap();
    let dead: Vec<&Output> = outputs.iter().filter(|o| o.topic == "dlsr-dead-letters").collect();
    assert_eq!(dead.len(), 1, "only the failing item: {dead:?}");
    assert_eq!(dead[0].key, "batch-5");
    assert_eq!(headers::find(&dead[0].headers, "dlsr-error-code"), Some(&b"scoring_failed"[..]));
    assert_eq!(outputs.len(), 16);
    assert!(splits >= 1.0, "the failing batch was split");
}

#[test]
fn a_non_finite_score_is_dead_lettered_and_never_judged() {
    let (_cluster, brokers) = cluster();
    let messages = grey("nan", 6);
    let bad = messages[2].1.clone();
    produce(&brokers, messages);
    let daemon =
        start(config(&brokers, "g-nan"), Behaviour { nan: [seed_of(&bad)].into(), ..Default::default() });
    let outputs = Reader::new(&brokers, "r-nan").read(6, Duration::from_secs(60));
    daemon.stop().unwrap();
    let o = outputs.iter().find(|o| o.key == "nan-2").unwrap();
    assert_eq!(o.topic, "dlsr-dead-letters");
    assert_eq!(headers::find(&o.headers, "dlsr-error-code"), Some(&b"non_finite_score"[..]));
    for v in outputs.iter().filter(|o| o.topic == "dlsr-verdicts") {
        assert!(!String::from_utf8_lossy(&v.value).contains("null"), "a verdict with null fields");
    }
}

/// Adaptive batching with two scorers sharing the queue: a batch is what is queued, cut
/// down to a power of two (so the encoder sees a few shapes; the cut-off items go first
/// next, whichever scorer takes them, so none is left behind when the stream stops),
/// and batches grow when the scorers fall behind; every item's time queued for its
/// batch is in dlsr_batch_wait_seconds.
#[test]
fn batches_follow_the_queue_in_power_of_two_sizes_and_their_wait_is_measured() {
    let (_cluster, brokers) = cluster();
    produce(&brokers, grey("adaptive", 45));
    let mut cfg = config(&brokers, "g-adaptive");
    cfg.pipeline.batch_max_size = 16;
    cfg.pipeline.in_flight_limit = 64;
    let daemon = start_scorers(cfg, Behaviour { delay: Duration::from_millis(60), ..Default::default() }, 2);
    let outputs = Reader::new(&brokers, "r-adaptive").read(45, Duration::from_secs(60));
    assert_eq!(outputs.len(), 45);
    let sizes = daemon.sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 45, "{sizes:?}");
    assert!(sizes.iter().all(|s| s.is_power_of_two() && *s <= 16), "sizes {sizes:?}");
    assert!(sizes.iter().any(|s| *s >= 4), "a slow scorer must let batches grow: {sizes:?}");
    assert_eq!(daemon.metric("dlsr_batch_wait_seconds_count"), 45.0);
    assert!(daemon.metric("dlsr_batch_wait_seconds_sum") > 0.0);
    daemon.stop().unwrap();
}

#[test]
fn a_slow_scorer_pauses_the_consumer_and_bounds_what_is_in_flight() {
    let (_cluster, brokers) = cluster();
    produce(&brokers, grey("slow", 60));
    let mut cfg = config(&brokers, "g-slow");
    cfg.pipeline.batch_max_size = 4;
    cfg.pipeline.in_flight_limit = 8;
    let daemon = start(cfg, Behaviour { delay: Duration::from_millis(100), ..Default::default() });
    let outputs = Reader::new(&brokers, "r-slow").read(60, Duration::from_secs(120));
    let summary = daemon.stop().unwrap();
    assert_eq!(outputs.len(), 60, "nothing lost under back-pressure");
    assert!(summary.paused_times >= 1, "the consumer must have paused: {summary:?}");
    assert!(summary.max_in_flight <= 8, "in flight exceeded the limit: {summary:?}");
}

#[test]
fn failed_deliveries_are_retried_and_commits_never_pass_an_unacknowledged_output() {
    let (cluster, brokers) = cluster();
    produce(&brokers, grey("retry", 24));
    // The daemon's first produce requests are refused (backoff 1 s, 2 s, 4 s); offsets may not move past an
    // undelivered output at any moment, and in the end everything is delivered.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3],
    );
    let daemon = start(config(&brokers, "g-retry"), Behaviour::default());
    let reader = Reader::assigned(&brokers);
    let mut outputs = Vec::new();
    let started = Instant::now();
    let mut samples = 0;
    while outputs.len() < 24 && started.elapsed() < Duration::from_secs(90) {
        // Commits first, then every output that exists by then: a commit past an input
        // means its output had been acknowledged, so it must be among them.
        let commits = committed(&brokers, "g-retry");
        reader.read_to_end(&mut outputs);
        assert_commits_covered(&commits, &outputs);
        samples += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let summary = daemon.stop().unwrap();
    assert_eq!(outputs.len(), 24, "{summary:?}");
    assert!(samples >= 3);
    assert!(summary.published >= 24, "{summary:?}");
    assert_commits_covered(&committed(&brokers, "g-retry"), &outputs);
}

#[test]
fn two_daemons_in_one_group_both_own_partitions_and_a_rebalance_with_work_in_flight_loses_nothing() {
    let (_cluster, brokers) = cluster();
    let slow = Behaviour { delay: Duration::from_millis(100), ..Default::default() };
    let mut cfg = config(&brokers, "g-pair");
    cfg.pipeline.batch_max_size = 4;
    let a = start(cfg.clone(), slow.clone());
    produce(&brokers, grey("pair-0", 30));
    let reader = Reader::new(&brokers, "r-pair");
    let mut outputs = reader.read(5, Duration::from_secs(60));
    // B joins while A has work in flight; the stream goes on until partitions have moved
    // to B and B has consumed from them.
    let b = start(cfg, slow);
    let mut sent = 30;
    let started = Instant::now();
    while b.metric("dlsr_messages_consumed_total") < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(60), "B never got a partition");
        produce(&brokers, grey(&format!("pair-{sent}"), 3));
        sent += 3;
        while let Some(o) = reader.next(Duration::from_millis(100)) {
            outputs.push(o);
        }
    }
    let mut keys: BTreeSet<String> = outputs.iter().map(|o| o.key.clone()).collect();
    let started = Instant::now();
    while keys.len() < sent && started.elapsed() < Duration::from_secs(120) {
        if let Some(o) = reader.next(Duration::from_millis(100)) {
            keys.insert(o.key.clone());
            outputs.push(o);
        }
    }
    let (sa, sb) = (a.stop().unwrap(), b.stop().unwrap());
    assert_eq!(keys.len(), sent, "nothing may be lost in a rebalance");
    assert!(sa.consumed > 0 && sb.consumed > 0, "both own partitions: A {sa:?}, B {sb:?}");
    assert_commits_covered(&committed(&brokers, "g-pair"), &outputs);
}

#[test]
fn a_failed_commit_is_tried_again_until_the_broker_confirms_it() {
    let (cluster, brokers) = cluster();
    produce(&brokers, grey("commit", 9));
    // The first offset commits are refused; points counted as committed on sending (not
    // on confirmation) would never be committed again once the stream is idle.
    cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE; 3],
    );
    let daemon = start(config(&brokers, "g-commit"), Behaviour::default());
    let outputs = Reader::new(&brokers, "r-commit").read(9, Duration::from_secs(60));
    assert_eq!(outputs.len(), 9);
    let ends = end_offsets(&brokers);
    wait_until("the commits to reach the end offsets", Duration::from_secs(30), || {
        let c = committed(&brokers, "g-commit");
        ends.iter().all(|(p, end)| c[p] == Some(*end))
    });
    let errors = daemon.metric("dlsr_commit_errors_total");
    let summary = daemon.stop().unwrap();
    assert!(errors >= 1.0, "the refused commits were counted");
    assert!(summary.final_commit_confirmed, "{summary:?}");
}

/// A decoder that panics on one message (a bug in a decoding library) dead-letters that
/// message with `decoder_panic` and goes on: before issue #21 the panic killed the
/// process, and the restarted daemon read the same message and died again.
#[test]
fn a_panicking_decoder_dead_letters_its_message_and_the_daemon_goes_on() {
    let (_cluster, brokers) = cluster();
    let poison = png(13);
    let decoder: dlsr::stream::scorer::Decoder = {
        let poison = poison.clone();
        Arc::new(move |bytes: &[u8], limits: &dlsr::data::DecodeLimits| {
            if bytes == poison.as_slice() {
                panic!("simulated decoder bug");
            }
            dlsr::data::decode::decode(bytes, limits)
        })
    };
    let mut messages = grey("ok", 6);
    messages.insert(3, ("poison".into(), poison, None));
    produce(&brokers, messages);
    let daemon = start_with_decoder(config(&brokers, "decoder-panic"), Behaviour::default(), 1, decoder);
    let outputs = Reader::new(&brokers, "decoder-panic-reader").read(7, Duration::from_secs(30));
    assert_eq!(outputs.len(), 7, "every message has an output");
    let dead: Vec<&Output> = outputs.iter().filter(|o| o.topic == "dlsr-dead-letters").collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].key, "poison");
    assert_eq!(headers::find(&dead[0].headers, "dlsr-error-code"), Some(&b"decoder_panic"[..]));
    let reason = String::from_utf8_lossy(headers::find(&dead[0].headers, "dlsr-error").unwrap()).into_owned();
    assert!(reason.contains("simulated decoder bug"), "{reason}");
    assert_eq!(daemon.metric("dlsr_decoder_panics_total"), 1.0);
    daemon.stop().expect("the run ends normally: a decoder panic is not a fault");
}
