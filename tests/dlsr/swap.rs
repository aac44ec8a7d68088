//! Models that change and models per topic, through the real binary on tansu (issue #24):
//! a bundle replaced under a running stream and SIGHUP swaps it at a batch boundary
//! (verdicts before carry sha A, after sha B, none mixed, none lost or repeated, /readyz
//! 200 throughout); `model.watch` rejects a truncated file, a bundle of another input
//! size and one whose self-test does not reproduce, keeps the old bundle scoring and
//! says why (log, metrics), then swaps in a good one; two input topics routed to two
//! models, each verdict carrying its topic's model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;

use crate::broker::{serve, terminate, Daemon, Tansu};
use crate::common::{asset, free_port, http_get, wait_until};

/// The bundle [`crate::model::fitted`] made (A) and one refitted with other settings (B),
/// both at 64 px on the same items, and one at 32 px (C); with their sha256.
struct Bundles {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    c: PathBuf,
}

fn bundles() -> &'static Bundles {
    static BUNDLES: std::sync::OnceLock<Bundles> = std::sync::OnceLock::new();
    BUNDLES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (b, c) = (dir.path().join("b.safetensors"), dir.path().join("c.safetensors"));
        crate::model::fit_variant(&b, &["--epochs", "3", "--seed", "7"]);
        crate::model::fit_variant(&c, &["--epochs", "3", "--input-size", "32", "--limit", "600"]);
        Bundles { a: crate::model::fitted().bundle.clone(), b, c, _dir: dir }
    })
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Puts `from`'s bytes at `to` as a deployment would: written aside, renamed into place.
fn replace(from: &Path, to: &Path) {
    let aside = to.with_extension("incoming");
    std::fs::copy(from, &aside).unwrap();
    std::fs::rename(&aside, to).unwrap();
}

fn write_config(dir: &Path, brokers: &str, bundle: &Path, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("dlsr.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"swap-{port}\"\npublish = \"all\"\ncommit_interval_ms = 300\n\
             session_timeout_ms = 6000\n[model]\nbundle = \"{}\"\ndevice = \"cpu\"\n[pipeline]\nbatch_max_size = 8\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n[log]\nlevel = \"info\"\n[audit]\nenabled = false\n{extra}",
            bundle.display()
        ),
    )
    .unwrap();
    path
}

/// Publishes Fashion-MNIST test items `range` to `topic` with keys `prefix-N`.
fn publish(brokers: &str, topic: &str, prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    let spec = asset(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz"));
    let set = dlsr::data::DataSet::open(spec.to_str().unwrap()).unwrap().with_limit(Some(range.end));
    let mut p = dlsr::stream::publish::Publisher::new(brokers, &[]).unwrap();
    let mut keys = Vec::new();
    for i in range {
        let item = set.get(i).unwrap();
        let key = format!("{prefix}-{i}");
        p.send(topic, &key, &dlsr::stream::publish::item_bytes(&item).unwrap()).unwrap();
        keys.push(key);
    }
    p.finish(Instant::now(), 0).unwrap();
    keys
}

/// A verdict as the tests read it back.
#[derive(Debug, Clone)]
struct Seen {
    topic: String,
    partition: i64,
    offset: i64,
    sha256: String,
    threshold: f64,
}

/// Reads the verdict topic from the start.
struct Verdicts {
    consumer: BaseConsumer,
    by_key: BTreeMap<String, Vec<Seen>>,
    dead_letters: usize,
}

impl Verdicts {
    fn new(brokers: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("swap-reader-{}", dlsr::kafka::message::now_millis()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&["dlsr-verdicts", "dlsr-dead-letters"]).unwrap();
        Self { consumer, by_key: BTreeMap::new(), dead_letters: 0 }
    }

    fn until(&mut self, keys: &[String], timeout: Duration) {
        let started = Instant::now();
        while keys.iter().any(|k| !self.by_key.contains_key(k)) && started.elapsed() < timeout {
            let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) else { continue };
            if m.topic() == "dlsr-dead-letters" {
                self.dead_letters += 1;
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            self.by_key.entry(key).or_default().push(Seen {
                topic: v["source"]["topic"].as_str().unwrap().to_string(),
                partition: v["source"]["partition"].as_i64().unwrap(),
                offset: v["source"]["offset"].as_i64().unwrap(),
                sha256: v["model"]["sha256"].as_str().unwrap().to_string(),
                threshold: v["threshold"].as_f64().unwrap(),
            });
        }
        let missing: Vec<&String> = keys.iter().filter(|k| !self.by_key.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "no verdict for {} keys, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
    }

    fn sha_of(&self, key: &str) -> &str {
        &self.by_key[key][0].sha256
    }
}

fn metric(port: u16, line_start: &str) -> Option<f64> {
    let (_, text) = http_get(("127.0.0.1", port), "/metrics").ok()?;
    text.lines().find(|l| l.starts_with(line_start))?.rsplit(' ').next()?.parse().ok()
}

/// tansu with `topics`, bundle A copied to a served path, a config (with `edit` applied
/// to its text) and the daemon on it: (tansu, folder, served bundle, metrics port, daemon).
fn start(
    topics: &[(&str, i32)],
    edit: impl Fn(String) -> String,
) -> (Tansu, tempfile::TempDir, PathBuf, u16, Daemon) {
    let tansu = Tansu::start_with(topics);
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("model.safetensors");
    std::fs::copy(&bundles().a, &served).unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &tansu.brokers, &served, port, "");
    std::fs::write(&config, edit(std::fs::read_to_string(&config).unwrap())).unwrap();
    let daemon = serve(&config);
    (tansu, dir, served, port, daemon)
}

#[test]
fn a_bundle_swapped_under_a_running_stream_changes_the_sha_at_a_batch_boundary_and_loses_nothing() {
    let bundles = bundles();
    let (sha_a, sha_b) = (sha256(&bundles.a), sha256(&bundles.b));
    let topics = [("images", 2), ("dlsr-verdicts", 1), ("dlsr-dead-letters", 1)];
    let (tansu, _dir, served, port, daemon) = start(&topics, |text| {
        text.replace("batch_max_size = 8\n", "batch_max_size = 8\nscorer_workers = 2\n")
    });
    // /readyz is polled every 50 ms from here to the end; any other answer is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            let mut ready_seen = false;
            while !stop.load(Ordering::Relaxed) {
                match http_get(("127.0.0.1", port), "/readyz") {
                    Ok((200, _)) => ready_seen = true,
                    // Before the first assignment the daemon is rightly not ready.
                    other if ready_seen => bad.push(format!("{other:?}")),
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            bad
        })
    };
    let mut verdicts = Verdicts::new(&tansu.brokers);
    let before = publish(&tansu.brokers, "images", "before", 0..150);
    verdicts.until(&before, Duration::from_secs(120));
    // Replace the file and send SIGHUP while these are being scored.
    let during = publish(&tansu.brokers, "images", "during", 150..450);
    replace(&bundles.b, &served);
    unsafe {
        libc::kill(daemon.child.id() as i32, libc::SIGHUP);
    }
    let swapped = r#"dlsr_model_reloads_total{model="default",result="swapped"}"#;
    wait_until("the swap", Duration::from_secs(60), || metric(port, swapped) == Some(1.0));
    let after = publish(&tansu.brokers, "images", "after", 450..600);
    let all: Vec<String> = before.iter().chain(&during).chain(&after).cloned().collect();
    verdicts.until(&all, Duration::from_secs(180));
    let text = http_get(("127.0.0.1", port), "/metrics").unwrap().1;
    stop.store(true, Ordering::Relaxed);
    let not_ready = prober.join().unwrap();
    let log = terminate(daemon);

    assert_eq!(verdicts.dead_letters, 0, "{log}");
    let duplicates: Vec<&String> =
        verdicts.by_key.iter().filter(|(_, v)| v.len() > 1).map(|(k, _)| k).collect();
    assert!(duplicates.is_empty(), "the swap repeated {} verdicts: {duplicates:?}", duplicates.len());
    assert!(before.iter().all(|k| verdicts.sha_of(k) == sha_a), "items scored before the SIGHUP carry sha A");
    let late: Vec<&String> = after.iter().filter(|k| verdicts.sha_of(k) != sha_b).collect();
    assert!(late.is_empty(), "items published after the swap carry sha B, not {late:?}\n{log}");
    // Never mixed: each bundle's verdicts carry that bundle's threshold (the two
    // calibrations differ), so no verdict was judged by the other's decider.
    let mut thresholds: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for seen in verdicts.by_key.values().flatten() {
        assert!(seen.sha256 == sha_a || seen.sha256 == sha_b, "a verdict of neither bundle: {seen:?}");
        thresholds.entry(seen.sha256.as_str()).or_default().push(seen.threshold);
    }
    let (ta, tb) = (&thresholds[sha_a.as_str()], &thresholds[sha_b.as_str()]);
    assert!(
        ta.iter().all(|t| *t == ta[0]) && tb.iter().all(|t| *t == tb[0]) && ta[0] != tb[0],
        "{ta:?} {tb:?}"
    );
    // Per partition in offset order, the switch is at batch boundaries: after the first
    // verdict of B, at most the batches the two scorers had under way are of A.
    let mut by_partition: BTreeMap<i64, Vec<(i64, &str)>> = BTreeMap::new();
    for seen in verdicts.by_key.values().flatten() {
        by_partition.entry(seen.partition).or_default().push((seen.offset, &seen.sha256));
    }
    for (partition, mut items) in by_partition {
        items.sort();
        let first_b = items.iter().position(|(_, s)| *s == sha_b).unwrap_or(items.len());
        let late_a = items[first_b..].iter().filter(|(_, s)| *s == sha_a).count();
        assert!(late_a <= 2 * 8, "partition {partition}: {late_a} verdicts of A after the first of B");
    }
    assert!(not_ready.is_empty(), "/readyz was not 200 during the swap: {not_ready:?}");
    assert!(
        text.contains(&format!("sha256=\"{sha_b}\"")) && !text.contains(&format!("sha256=\"{sha_a}\"")),
        "dlsr_model_info follows the swap"
    );
    assert!(log.contains("model swapped"), "{log}");
    assert!(log.contains("scorer switched bundles"), "{log}");
}

/// Rewrites `from` into `to` with one stored self-test score moved by `by`.
fn tamper_self_test(from: &Path, to: &Path, by: f64) {
    let tensors = dlsr::tensor_file::read_tensors(from).unwrap();
    let mut metadata = dlsr::tensor_file::read_metadata(from).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&metadata["dlsr_bundle"]).unwrap();
    let stored = meta["self_test"]["scores"][1]["mfsim"].as_f64().expect("the bundle has a self-test");
    meta["self_test"]["scores"][1]["mfsim"] = serde_json::json!(stored + by);
    metadata.insert("dlsr_bundle".into(), meta.to_string());
    let refs: Vec<(&str, &tch::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    dlsr::tensor_file::write(to, &refs, &metadata).unwrap();
}

#[test]
fn watched_bundles_that_fail_a_check_are_rejected_with_the_reason_and_the_old_one_keeps_scoring() {
    let bundles = bundles();
    let (sha_a, sha_b) = (sha256(&bundles.a), sha256(&bundles.b));
    let topics = [("images", 1), ("dlsr-verdicts", 1), ("dlsr-dead-letters", 1)];
    let (tansu, dir, served, port, daemon) =
        start(&topics, |text| text.replace("device = \"cpu\"\n", "device = \"cpu\"\nwatch = true\n"));
    let rejected = r#"dlsr_model_reloads_total{model="default",result="rejected"}"#;
    let failing = r#"dlsr_model_reload_failing{model="default"}"#;
    let mut verdicts = Verdicts::new(&tansu.brokers);

    // A truncated copy (a deployment that copies in place), another input size, a
    // self-test that does not reproduce: each rejected by itself, without a signal.
    let bytes = std::fs::read(&bundles.a).unwrap();
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let tampered = dir.path().join("tampered.safetensors");
    tamper_self_test(&bundles.a, &tampered, 0.5);
    let cases: [(&Path, &str); 3] = [
        (&truncated, "not a valid safetensors file"),
        (&bundles.c, "at 32 px, the running one"),
        (&tampered, "self-test failed"),
    ];
    for (n, (bundle, why)) in cases.iter().enumerate() {
        replace(bundle, &served);
        let count = (n + 1) as f64;
        wait_until(&format!("rejection {n}"), Duration::from_secs(60), || {
            metric(port, rejected) == Some(count)
        });
        assert_eq!(metric(port, failing), Some(1.0));
        let keys = publish(&tansu.brokers, "images", &format!("rejected{n}"), 0..20);
        verdicts.until(&keys, Duration::from_secs(60));
        assert!(keys.iter().all(|k| verdicts.sha_of(k) == sha_a), "after rejection {n} A keeps scoring");
        let log = daemon.log.lock().unwrap().clone();
        assert!(
            log.contains("model reload rejected") && log.contains(why),
            "rejection {n} names why ({why}):\n{log}"
        );
    }
    // A good bundle is swapped in by the watch alone, and the failing gauge clears.
    replace(&bundles.b, &served);
    let swapped = r#"dlsr_model_reloads_total{model="default",result="swapped"}"#;
    wait_until("the swap", Duration::from_secs(60), || metric(port, swapped) == Some(1.0));
    assert_eq!(metric(port, failing), Some(0.0));
    let keys = publish(&tansu.brokers, "images", "good", 0..20);
    verdicts.until(&keys, Duration::from_secs(60));
    assert!(keys.iter().all(|k| verdicts.sha_of(k) == sha_b));
    assert_eq!(verdicts.dead_letters, 0);
    terminate(daemon);
}

#[test]
fn two_input_topics_routed_to_two_models_each_carry_their_topics_model() {
    let bundles = bundles();
    let (sha_a, sha_c) = (sha256(&bundles.a), sha256(&bundles.c));
    let tansu = Tansu::start_with(&[
        ("images", 1),
        ("scans", 1),
        ("other", 1),
        ("dlsr-verdicts", 1),
        ("dlsr-dead-letters", 1),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let extra = format!(
        "[models.scans]\nbundle = \"{}\"\ndevice = \"cpu\"\n[thresholds.topics.scans]\nmodel = \"scans\"\n",
        bundles.c.display()
    );
    let config = write_config(dir.path(), &tansu.brokers, &bundles.a, port, &extra);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[kafka]\n", "[kafka]\ninput_topics = [\"images\", \"scans\", \"other\"]\n");
    std::fs::write(&config, text).unwrap();
    let daemon = serve(&config);
    let mut verdicts = Verdicts::new(&tansu.brokers);
    let images = publish(&tansu.brokers, "images", "images", 0..40);
    let scans = publish(&tansu.brokers, "scans", "scans", 0..40);
    let other = publish(&tansu.brokers, "other", "other", 0..40);
    let all: Vec<String> = images.iter().chain(&scans).chain(&other).cloned().collect();
    verdicts.until(&all, Duration::from_secs(120));
    let metrics = http_get(("127.0.0.1", port), "/metrics").unwrap().1;
    let log = terminate(daemon);
    for (keys, topic, sha) in
        [(&images, "images", &sha_a), (&scans, "scans", &sha_c), (&other, "other", &sha_a)]
    {
        for k in keys {
            let seen = &verdicts.by_key[k][0];
            assert_eq!((seen.topic.as_str(), &seen.sha256), (topic, sha), "{k}");
        }
    }
    assert!(
        metrics.contains(&format!("model=\"scans\",sha256=\"{sha_c}\"")),
        "dlsr_model_info per model:\n{metrics}"
    );
    assert!(
        metrics.contains(r#"dlsr_score_count{kind="mfsim",model="scans",topic="scans"}"#),
        "the scans topic's scores carry its model"
    );
    assert!(
        metrics.contains(r#"dlsr_score_count{kind="mfsim",model="default",topic="other"}"#),
        "an unrouted topic uses the default model"
    );
    assert!(log.contains("model=scans") || log.contains("model=\"scans\""), "{log}");
}
