//! The window audit through the real daemon (issue #23): one record per closed window and
//! group on the summary topic, per source by a header, `dlsr tail --audit`, a restart
//! mid-window that gives one cut-short record and no duplicate full one (stub scorer,
//! tansu); and the offline replay of the same messages (`dlsr audit --from-topic
//! --window`) giving the daemon's p-values (real model, mock cluster).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use dlsr::audit::window::WindowRecord;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use crate::broker::Tansu;
use crate::common::{dlsr_bin, wait_until};

const SUMMARY: &str = "dlsr-windows";

/// Sends (key, value, camera) to `topic` partition 0, with the camera as a header.
fn produce(brokers: &str, topic: &str, messages: &[(String, Vec<u8>, &str)]) {
    let p: BaseProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for (key, value, camera) in messages {
        let headers = OwnedHeaders::new().insert(Header { key: "camera_id", value: Some(*camera) });
        let r = BaseRecord::to(topic).key(key).payload(value).headers(headers).partition(0);
        p.send(r).map_err(|(e, _)| e).unwrap();
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(20)).unwrap();
}

/// The window records on the summary topic, read from the beginning until `n` are there
/// and two more seconds pass without another (so extra records would be seen).
fn read_windows(brokers: &str, n: usize, timeout: Duration) -> Vec<WindowRecord> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("windows-reader-{}", dlsr::kafka::message::now_millis()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[SUMMARY]).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    let mut last = Instant::now();
    while started.elapsed() < timeout && (out.len() < n || last.elapsed() < Duration::from_secs(2)) {
        let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else { continue };
        let hs = dlsr::kafka::headers::read(&m);
        assert_eq!(dlsr::kafka::headers::find(&hs, "dlsr-record"), Some(&b"window"[..]));
        let record: WindowRecord = serde_json::from_slice(m.payload().unwrap()).unwrap();
        assert_eq!(m.key(), Some(format!("{}/{}", record.topic, record.group).as_bytes()));
        out.push(record);
        last = Instant::now();
    }
    out
}

/// Two cameras on one partition: cam-a's grey levels spread like the stub's held-out
/// scores, cam-b's all bright (every score in the upper half, few above the threshold).
fn cameras(from: usize, a: usize, b: usize) -> Vec<(String, Vec<u8>, &'static str)> {
    let mut out = Vec::new();
    for i in from..from + a.max(b) {
        if i < from + a {
            out.push((format!("a-{i}"), crate::pipeline::png((i * 37 % 256) as u8), "cam-a"));
        }
        if i < from + b {
            out.push((format!("b-{i}"), crate::pipeline::png(150 + (i * 13 % 90) as u8), "cam-b"));
        }
    }
    out
}

#[test]
fn window_records_per_camera_reach_the_summary_topic_and_a_restart_cuts_the_open_window_short() {
    let tansu =
        Tansu::start_with(&[("images", 1), ("dlsr-verdicts", 1), ("dlsr-dead-letters", 1), (SUMMARY, 1)]);
    let b = &tansu.brokers;
    let config = || {
        let mut cfg = crate::pipeline::config(b, "windows");
        cfg.audit.summary_topic = SUMMARY.into();
        cfg.audit.group_by = "header:camera_id".into();
        cfg.audit.window_items = 50;
        cfg.audit.min_items = 20;
        cfg.audit.expected_run_time_items = 10_000;
        cfg
    };
    let daemon = crate::pipeline::start(config(), Default::default());
    produce(b, "images", &cameras(0, 100, 100));
    wait_until("four full windows", Duration::from_secs(60), || daemon.metric("dlsr_windows_total") >= 4.0);
    // 30 more of cam-a: its third window stays open until the daemon stops.
    produce(b, "images", &cameras(100, 30, 0));
    wait_until("230 verdicts", Duration::from_secs(60), || daemon.metric("dlsr_verdicts_total") >= 230.0);
    let rendered = daemon.metrics.render();
    assert!(
        rendered.lines().any(|l| l.starts_with("dlsr_window_p_value{") && l.contains("group=\"cam-b\"")),
        "{rendered}"
    );
    assert!(daemon.metric("dlsr_windows_total{topic=\"images\",verdict=\"shifted\"}") >= 2.0);
    let summary = daemon.stop().unwrap();
    assert!(summary.drained && summary.final_commit_confirmed, "{summary:?}");
    // A restart reads nothing new: no window, and no full window again.
    let again = crate::pipeline::start(config(), Default::default());
    wait_until("the restarted daemon to be ready", Duration::from_secs(60), || again.readyz().0 == 200);
    std::thread::sleep(Duration::from_secs(2));
    again.stop().unwrap();

    let records = read_windows(b, 5, Duration::from_secs(30));
    let brief: Vec<(String, u64, usize, String, bool, String)> = records
        .iter()
        .map(|r| (r.group.clone(), r.window, r.n, r.verdict.clone(), r.cut_short, r.closed_by.clone()))
        .collect();
    assert_eq!(records.len(), 5, "{brief:?}");
    let of = |group: &str| records.iter().filter(|r| r.group == group).collect::<Vec<_>>();
    let (a, cam_b) = (of("cam-a"), of("cam-b"));
    assert_eq!(a.len(), 3, "{brief:?}");
    assert!(a[..2].iter().all(|r| r.n == 50 && !r.cut_short && r.verdict == "in_distribution"), "{brief:?}");
    assert_eq!((a[2].n, a[2].cut_short, a[2].closed_by.as_str()), (30, true, "shutdown"), "{brief:?}");
    assert_eq!(cam_b.len(), 2);
    assert!(cam_b.iter().all(|r| r.n == 50 && r.shifted() && r.median_shift > 0.5), "{brief:?}");
    // The flagged count alone does not see cam-b's shift; the distribution tests do.
    assert!(
        cam_b.iter().all(|r| r.p_adjusted["ks"] < 1e-6 && r.p_adjusted["binomial"] > 1e-3),
        "{:?}",
        cam_b.iter().map(|r| r.line()).collect::<Vec<_>>()
    );
    assert!(records.iter().all(|r| r.correction.groups == 2 && r.bounds.len() == 1));
    assert_eq!(a[0].bounds[0].first_offset, 0);
    assert_eq!(a[2].bounds[0].last_offset, 229);
    // One record per (run, group, window): none repeated.
    let mut keys: Vec<(String, String, u64)> =
        records.iter().map(|r| (r.run.clone(), r.group.clone(), r.window)).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 5);

    let out = Command::new(dlsr_bin()).args(["tail", "--audit", "--brokers", b]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert_eq!(lines.iter().filter(|l| l.contains("WIN  SHIFTED images/cam-b")).count(), 2, "{stdout}");
    assert!(
        lines.iter().any(|l| l.contains("images/cam-a #2 n=30") && l.contains("cut short (shutdown)")),
        "{stdout}"
    );
    assert!(stderr.contains("tail: 5 records: 5 windows (in_distribution 3, shifted 2)"), "{stderr}");
}

/// The same messages through the daemon and through `dlsr audit --from-topic --window`:
/// the same windows with the same p-values (one scorer and one decoder, so the daemon
/// judges the messages in offset order, as the replay does).
#[test]
fn the_offline_replay_of_a_topic_gives_the_daemons_windows_and_p_values() {
    let f = crate::model::fitted();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    for topic in ["cams", "dlsr-verdicts", "dlsr-dead-letters", SUMMARY] {
        cluster.create_topic(topic, 1, 1).unwrap();
    }
    let b = cluster.bootstrap_servers();
    let fm = dlsr::data::DataSet::open(
        crate::common::asset(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz")).to_str().unwrap(),
    )
    .unwrap();
    let mn =
        dlsr::data::DataSet::open(crate::common::asset(dlsr::assets::mnist_5k()).to_str().unwrap()).unwrap();
    let bytes = |set: &dlsr::data::DataSet, i: usize| {
        let item = set.get(i).unwrap();
        (item.id.clone(), dlsr::stream::publish::item_bytes(&item).unwrap())
    };
    // cam-a: Fashion-MNIST; cam-b: Fashion-MNIST with digits mixed in from its 20th item.
    let mut messages = Vec::new();
    for i in 0..80 {
        let (id, v) = bytes(&fm, i);
        messages.push((id, v, "cam-a"));
        let (id, v) = if i >= 20 && i % 2 == 0 { bytes(&mn, i) } else { bytes(&fm, 100 + i) };
        messages.push((format!("b/{id}"), v, "cam-b"));
    }
    produce(&b, "cams", &messages);

    let mut cfg = crate::stream::config(&b, "replay");
    cfg.kafka.input_topics = vec!["cams".into()];
    cfg.pipeline.decode_workers = 1;
    cfg.pipeline.scorer_workers = 1;
    cfg.audit.summary_topic = SUMMARY.into();
    cfg.audit.group_by = "header:camera_id".into();
    cfg.audit.window_items = 40;
    cfg.audit.min_items = 20;
    let control = dlsr::stream::daemon::Control::default();
    let (handle, metrics) = crate::stream::start(cfg, control.clone(), None);
    let verdicts = || -> f64 {
        metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("dlsr_verdicts_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    wait_until("160 verdicts", Duration::from_secs(120), || verdicts() >= 160.0);
    control.shutdown.store(true, std::sync::atomic::Ordering::Relaxed);
    handle.join().unwrap();
    let daemon = read_windows(&b, 4, Duration::from_secs(30));
    assert_eq!(daemon.len(), 4, "two full windows per camera and nothing left open: {daemon:?}");

    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("replay");
    #[rustfmt::skip]
    let args = [
        "-q", "audit", "--model", f.bundle.to_str().unwrap(), "--out", out.to_str().unwrap(),
        "--from-topic", "cams", "--brokers", &b, "--window", "40", "--group-by", "header:camera_id",
        "--window-min-items", "20",
    ];
    let run =
        Command::new(dlsr_bin()).args(args).env("DLSR_CACHE", work.path().join("cache")).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("windows: 4 of up to 40 items"), "{stdout}");
    let offline: Vec<WindowRecord> = std::fs::read_to_string(out.join("windows.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_key = |rs: &[WindowRecord]| -> BTreeMap<(String, u64), WindowRecord> {
        rs.iter().map(|r| ((r.group.clone(), r.window), r.clone())).collect()
    };
    let (daemon, offline) = (by_key(&daemon), by_key(&offline));
    assert_eq!(daemon.keys().collect::<Vec<_>>(), offline.keys().collect::<Vec<_>>());
    for (key, d) in &daemon {
        let o = &offline[key];
        assert_eq!(
            (d.n, d.flagged, &d.verdict, &d.bounds[0].first_offset),
            (o.n, o.flagged, &o.verdict, &o.bounds[0].first_offset),
            "{key:?}"
        );
        // The tests work on ranks among the held-out scores, so they agree exactly; the
        // scores themselves agree to about 1e-5 (the daemon's batches are not the
        // replay's, and libtorch's sums depend on the batch), so the median does too.
        for (test, p) in &d.p_adjusted {
            let q = o.p_adjusted[test];
            assert!((p - q).abs() <= 1e-9 * p.max(q) + 1e-300, "{key:?} {test}: daemon {p}, replay {q}");
        }
        assert!(
            (d.median_shift - o.median_shift).abs() < 1e-3,
            "{key:?}: {} vs {}",
            d.median_shift,
            o.median_shift
        );
        assert!((d.tests.cusum.statistic - o.tests.cusum.statistic).abs() < 1e-9, "{key:?}");
    }
    // cam-b's second window, half digits, is shifted; cam-a's are not.
    assert!(daemon[&("cam-b".to_string(), 1)].shifted(), "{:?}", daemon[&("cam-b".to_string(), 1)]);
    assert!(!daemon[&("cam-a".to_string(), 0)].shifted());
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("id=\"window-p-values\"") && html.contains("id=\"window-table\""));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["windows"]["windows"], 4);
}

/// `dlsr score` of a SPEC: the score of each item, in order.
fn scores_of(spec: &str, limit: usize, cache: &std::path::Path) -> Vec<f64> {
    let f = crate::model::fitted();
    let out = Command::new(dlsr_bin())
        .args(["-q", "score", "--model", f.bundle.to_str().unwrap(), spec, "--limit", &limit.to_string()])
        .env("DLSR_CACHE", cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["score"].as_f64().unwrap())
        .collect()
}

/// Windows of `scores` (in order) against `heldout`, thresholded at its 95th percentile.
fn windows_of(heldout: &[f64], scores: &[f64], window: usize) -> Vec<WindowRecord> {
    use dlsr::audit::window::{GroupBy, Item, Reference, WindowAuditor, WindowSettings};
    use dlsr::model::score::ScoreKind;
    let reference = Reference::new(ScoreKind::Mfsim, heldout.to_vec(), true, Vec::new());
    let threshold = reference.sorted[(0.95 * reference.len() as f64) as usize - 1];
    let settings = WindowSettings {
        window_items: window,
        window_max: None,
        min_items: 100,
        alpha: 0.001,
        max_groups: 100,
        group_idle: Duration::from_secs(3600),
        expected_run_time_items: 100_000,
        detector_shift: 0.5,
    };
    let mut a = WindowAuditor::new(settings, GroupBy::None, vec![reference], "t".into()).unwrap();
    let mut out = Vec::new();
    for (i, &score) in scores.iter().enumerate() {
        let id = i.to_string();
        out.extend(a.observe(&Item {
            topic: "t",
            group: None,
            partition: 0,
            offset: i as i64,
            timestamp: None,
            id: &id,
            kind: ScoreKind::Mfsim,
            score,
            threshold,
            flagged: score > threshold,
            layer_cos: &[],
        }));
    }
    out
}

/// Every `every`-th item from `ood`, the rest from `id`, `n` in all.
fn mix(id: &[f64], ood: &[f64], every: usize, n: usize) -> Vec<f64> {
    let (mut i, mut o) = (0, 0);
    (0..n)
        .map(|k| {
            if (k + 1) % every == 0 {
                o += 1;
                ood[o - 1]
            } else {
                i += 1;
                id[i - 1]
            }
        })
        .collect()
}

/// Fashion-MNIST test images `range`, each grey level raised by `brightness`, as PNG
/// files in `dir` (a camera's exposure drifting).
fn brightened(range: std::ops::Range<usize>, brightness: u8, dir: &std::path::Path) {
    let fm = dlsr::data::DataSet::open(
        crate::common::asset(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz")).to_str().unwrap(),
    )
    .unwrap();
    for i in range {
        let bytes = dlsr::stream::publish::item_bytes(&fm.get(i).unwrap()).unwrap();
        let mut img = image::load_from_memory(&bytes).unwrap().to_luma8();
        for p in img.pixels_mut() {
            p.0[0] = p.0[0].saturating_add(brightness);
        }
        img.save(dir.join(format!("{i:05}.png"))).unwrap();
    }
}

/// Real scores of the CI-sized model. MNIST digits mixed into Fashion-MNIST: 5% are
/// seen within two windows of 1000 against 3000 held-out items, 10% in every window of
/// 1000 against only 600 held-out items, and windows without digits stay in
/// distribution. A brightness change of 4 grey levels in 255 (few items cross the
/// threshold): the distribution tests and the online detector see it, the flagged
/// count does not: why both kinds of test exist.
#[test]
fn real_shifts_are_caught_window_by_window_digits_by_every_test_a_brightness_change_by_the_distribution() {
    let cache = tempfile::tempdir().unwrap();
    let fm = scores_of(
        crate::common::asset(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz")).to_str().unwrap(),
        6000,
        cache.path(),
    );
    let mn = scores_of(crate::common::asset(dlsr::assets::mnist_5k()).to_str().unwrap(), 300, cache.path());
    assert_eq!((fm.len(), mn.len()), (6000, 300));
    let lines = |w: &[WindowRecord]| w.iter().map(|w| w.line()).collect::<Vec<_>>();

    let five = windows_of(&fm[..3000], &mix(&fm[3000..], &mn, 20, 2000), 1000);
    assert_eq!(five.len(), 2);
    assert!(five.iter().any(|w| w.shifted()), "{:?}", lines(&five));

    let ten = windows_of(&fm[..600], &mix(&fm[600..], &mn, 10, 3000), 1000);
    assert_eq!(ten.len(), 3);
    assert!(ten.iter().all(|w| w.shifted()), "{:?}", lines(&ten));

    let clean = windows_of(&fm[..3000], &fm[3000..6000], 1000);
    assert!(clean.iter().all(|w| !w.shifted()), "{:?}", lines(&clean));

    let dir = tempfile::tempdir().unwrap();
    brightened(6000..8000, BRIGHTNESS, dir.path());
    let bright = scores_of(dir.path().to_str().unwrap(), 2000, cache.path());
    let shifted = windows_of(&fm[..3000], &bright, 1000);
    assert_eq!(shifted.len(), 2);
    for w in &shifted {
        let p = &w.p_adjusted;
        assert!(w.shifted() && p["ks"].min(p["cvm"]) < w.alpha, "{}", w.line());
        assert!(p["binomial"] > w.alpha, "the flagged count alone sees it: {}", w.line());
        assert!(w.median_shift > 0.1 && w.median_shift < 1.5, "{}", w.line());
    }
    assert!(shifted.iter().any(|w| w.tests.cusum.alarms > 0), "the detector: {:?}", lines(&shifted));
}

/// Grey levels added in the brightness test.
const BRIGHTNESS: u8 = 4;
