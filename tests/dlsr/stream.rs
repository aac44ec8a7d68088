//! The daemon with the real model against librdkafka's mock cluster (an in-process
//! Kafka): exactly one verdict or dead letter per input and commits at the end offsets;
//! threshold reload; readiness during a broker outage; bad configuration at start. The
//! pipeline's own guarantees are tested with a stub scorer in `pipeline.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dlsr::cli::demo::corrupt_messages;
use dlsr::config::{Config, Publish};
use dlsr::data::DataSet;
use dlsr::stream::daemon::{self, Control, Summary};
use dlsr::stream::publish::{item_bytes, Publisher};
use dlsr::telemetry::metrics::{score_buckets, Metrics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::common::{asset, committed, output_reader, wait_until};

struct Output {
    topic: String,
    key: String,
    headers: BTreeMap<String, String>,
    value: Vec<u8>,
}

pub(crate) use crate::common::mock_cluster as cluster;

pub(crate) fn config(brokers: &str, group: &str) -> Config {
    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers.to_string();
    cfg.kafka.group_id = group.to_string();
    cfg.kafka.publish = Publish::All;
    cfg.kafka.commit_interval_ms = 200;
    cfg.model.bundle = crate::model::fitted().bundle.clone();
    cfg.model.device = dlsr::device::DeviceSpec::Cpu;
    cfg.metrics.listen = "127.0.0.1:0".into();
    cfg.pipeline.batch_max_size = 16;
    cfg.pipeline.in_flight_limit = 64;
    cfg
}

pub(crate) fn start(
    cfg: Config,
    control: Control,
    path: Option<std::path::PathBuf>,
) -> (std::thread::JoinHandle<Summary>, Arc<Metrics>) {
    let meta = dlsr::model::bundle::read_meta(&cfg.model.bundle).unwrap();
    let metrics = Arc::new(Metrics::new(score_buckets(&meta.calibration, &[])));
    let m = metrics.clone();
    (std::thread::spawn(move || daemon::run(cfg, path, control, m).expect("daemon failed")), metrics)
}

/// Publishes `fmnist` ID images (from `offset`), `mnist` OOD digits and the corrupt set.
pub(crate) fn publish(brokers: &str, fmnist: usize, skip: usize, mnist: usize, corrupt: bool) -> Vec<String> {
    let mut p = Publisher::new(brokers, &[]).unwrap();
    let mut keys = Vec::new();
    let fm = DataSet::open(asset(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz")).to_str().unwrap())
        .unwrap();
    for i in skip..skip + fmnist {
        let item = fm.get(i).unwrap();
        p.send("images", &item.id, &item_bytes(&item).unwrap()).unwrap();
        keys.push(item.id);
    }
    let mn =
        DataSet::open(asset(dlsr::assets::mnist_5k()).to_str().unwrap()).unwrap().with_limit(Some(mnist));
    for item in mn.iter() {
        let item = item.unwrap();
        p.send("images", &item.id, &item_bytes(&item).unwrap()).unwrap();
        keys.push(item.id);
    }
    if corrupt {
        for (id, bytes) in corrupt_messages() {
            p.send("images", id, &bytes).unwrap();
            keys.push(id.to_string());
        }
    }
    let report = p.finish(Instant::now(), 0).unwrap();
    assert_eq!(report.delivered as usize, keys.len());
    keys
}

fn collect(c: &BaseConsumer, n: usize, timeout: Duration) -> Vec<Output> {
    let started = Instant::now();
    let mut out = Vec::new();
    while out.len() < n && started.elapsed() < timeout {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_string(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Output {
                topic: m.topic().to_string(),
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                headers,
                value: m.payload().unwrap_or_default().to_vec(),
            });
        }
    }
    out
}

#[test]
fn every_input_gets_exactly_one_verdict_or_dead_letter_and_offsets_reach_the_end() {
    let (_cluster, brokers) = cluster();
    let keys = publish(&brokers, 40, 0, 20, true);
    let control = Control::default();
    let (handle, metrics) = start(config(&brokers, "g-exact"), control.clone(), None);
    let outputs = collect(&output_reader(&brokers, "r-exact"), keys.len(), Duration::from_secs(120));
    control.shutdown.store(true, Ordering::Relaxed);
    let summary = handle.join().unwrap();
    // After the daemon stopped, a full re-read must find no surplus (duplicate) output.
    let again = collect(&output_reader(&brokers, "r-exact-2"), keys.len() + 1, Duration::from_secs(10));
    assert_eq!(again.len(), keys.len(), "outputs after shutdown: duplicates or losses");

    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &outputs {
        *seen.entry(o.key.as_str()).or_default() += 1;
    }
    for k in &keys {
        assert_eq!(seen.get(k.as_str()), Some(&1), "{k} must have exactly one output");
    }
    let dead: BTreeMap<&str, &str> = outputs
        .iter()
        .filter(|o| o.topic == "dlsr-dead-letters")
        .map(|o| (o.key.as_str(), o.headers["dlsr-error-code"].as_str()))
        .collect();
    assert_eq!(dead["corrupt/empty"], "empty");
    assert_eq!(dead["corrupt/bomb.png"], "too_large");
    assert_eq!(dead["corrupt/text.jpg"], "unsupported_format");
    assert_eq!(dead["corrupt/truncated.png"], "undecodable");
    let empty = outputs.iter().find(|o| o.key == "corrupt/empty").unwrap();
    assert!(empty.value.is_empty() && empty.headers.contains_key("dlsr-source-offset"));
    let truncated = outputs.iter().find(|o| o.key == "corrupt/truncated.png").unwrap();
    assert!(!truncated.value.is_empty(), "the original bytes travel with the dead letter");

    // The published JSON Schema must describe exactly the fields a verdict has.
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/verdict.schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // `input` is there only for JSON events with passthrough fields (tests/dlsr/references.rs).
    let documented: std::collections::BTreeSet<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "input")
        .collect();
    let first = outputs.iter().find(|o| o.topic == "dlsr-verdicts").unwrap();
    let v: serde_json::Value = serde_json::from_slice(&first.value).unwrap();
    let actual: std::collections::BTreeSet<&str> =
        v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(documented, actual, "docs/verdict.schema.json and the verdict record differ");

    let mut flagged = BTreeMap::from([("fmnist", 0), ("mnist", 0)]);
    for o in outputs.iter().filter(|o| o.topic == "dlsr-verdicts") {
        let v: serde_json::Value = serde_json::from_slice(&o.value).unwrap();
        assert_eq!(v["id"], o.key.as_str());
        assert_eq!(v["source"]["topic"], "images");
        assert!(v["source"]["offset"].is_i64() && v["source"]["timestamp"].is_i64());
        assert!(v["model"]["sha256"].as_str().unwrap().len() == 64);
        assert!(v["scored_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(o.headers["dlsr-verdict"], if v["is_ood"] == true { "ood" } else { "id" });
        if v["is_ood"] == true {
            *flagged.entry(if o.key.starts_with("mnist") { "mnist" } else { "fmnist" }).or_default() += 1;
        }
    }
    assert!(flagged["mnist"] >= 18, "MNIST digits must be flagged: {flagged:?}");
    assert!(flagged["fmnist"] <= 8, "Fashion-MNIST must mostly pass: {flagged:?}");
    assert_eq!(summary.consumed as usize, keys.len());
    assert!(summary.drained);

    // Committed offsets of the daemon's group equal the end offsets of every partition.
    let probe: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &brokers).set("group.id", "g-exact").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition("images", p);
    }
    let committed = probe.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let mut total = 0;
    for e in committed.elements() {
        let (_, high) = probe.fetch_watermarks("images", e.partition(), Duration::from_secs(5)).unwrap();
        assert_eq!(
            e.offset(),
            Offset::Offset(high),
            "partition {} committed {:?}, end {high}",
            e.partition(),
            e.offset()
        );
        total += high;
    }
    assert_eq!(total as usize, keys.len());
    let text = metrics.render();
    assert!(text.contains("dlsr_dead_letters_total{code=\"empty\",topic=\"images\"} 1"), "{text}");
    assert!(text.contains("dlsr_score_bucket{kind=\"mfsim\""), "score histogram missing");

    // `dlsr tail` shows the same outputs, one line each, with the verdict or the reason.
    let tail = |extra: &[&str]| {
        let out = std::process::Command::new(crate::common::dlsr_bin())
            .args(["tail", "--brokers", &brokers])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (lines, stderr) = tail(&[]);
    assert_eq!(lines.lines().count(), keys.len(), "{lines}");
    for k in &keys {
        assert_eq!(lines.lines().filter(|l| l.contains(&format!(" {k}  "))).count(), 1, "{k}: {lines}");
    }
    for (key, code) in &dead {
        assert!(lines.contains(&format!("DEAD {key}  {code}: ")), "{key}: {lines}");
    }
    let ood = flagged["mnist"] + flagged["fmnist"];
    let verdicts = keys.len() - dead.len();
    assert!(
        stderr.contains(&format!(
            "{} records: {verdicts} verdicts ({ood} OOD, {} ID), {} dead letters (",
            keys.len(),
            verdicts - ood,
            dead.len()
        )),
        "{stderr}"
    );
    let ood_lines = lines.lines().filter(|l| l.contains(" OOD  ")).collect::<Vec<_>>();
    assert_eq!(ood_lines.len(), ood);
    assert!(ood_lines
        .iter()
        .all(|l| l.contains(" mfsim ") && l.contains(" > ") && l.contains("from images/")));
    let (json, _) = tail(&["--dead-letters", "--json"]);
    let records: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), dead.len());
    for r in &records {
        assert_eq!(r["kind"], "dead_letter");
        assert_eq!(r["topic"], "dlsr-dead-letters");
        assert_eq!(r["error_code"].as_str(), dead.get(r["key"].as_str().unwrap()).copied(), "{r}");
    }
}

/// A raw record for `dlsr tail` to read: (topic, key, headers, value).
type RawRecord<'a> = (&'a str, Option<&'a [u8]>, Vec<dlsr::kafka::headers::Header>, &'a [u8]);

fn produce_raw(brokers: &str, records: &[RawRecord<'_>]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for (topic, key, headers, value) in records {
        let mut r = BaseRecord::<[u8], [u8]>::to(topic)
            .payload(*value)
            .headers(dlsr::kafka::headers::to_owned(headers));
        if let Some(k) = key {
            r = r.key(*k);
        }
        p.send(r).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

#[test]
fn tail_follows_new_records_starts_at_a_time_and_shows_any_bytes_as_one_line() {
    use dlsr::kafka::headers::text;
    use std::io::BufRead;
    let (_cluster, brokers) = cluster();
    let verdict = |id: &str, ood: bool| {
        serde_json::json!({"id": id, "source": {"topic": "images", "partition": 0, "offset": 3, "timestamp": null},
            "score": -0.98, "score_kind": "mfsim", "threshold": -0.99, "is_ood": ood, "id_percentile": 99.9})
        .to_string()
    };
    let old = verdict("old.png", true);
    produce_raw(
        &brokers,
        &[("dlsr-verdicts", Some(b"old.png"), vec![text("dlsr-verdict", "ood")], old.as_bytes())],
    );

    let mut child = std::process::Command::new(crate::common::dlsr_bin())
        .args(["tail", "--brokers", &brokers, "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    std::thread::sleep(Duration::from_secs(3)); // assigned and at the end
                                                // A dead letter whose key and header key are not clean text, a new verdict, and a
                                                // record dlsr did not write.
    let mut odd_headers = vec![(vec![0xff, 0xfe, b'k'], Some(b"v".to_vec()))];
    odd_headers.extend([
        text("dlsr-error-code", "undecodable"),
        text("dlsr-error", "bad\nbytes"),
        text("dlsr-source-topic", "images"),
        text("dlsr-source-partition", "1"),
        text("dlsr-source-offset", "9"),
    ]);
    let new = verdict("new.png", false);
    produce_raw(
        &brokers,
        &[
            ("dlsr-dead-letters", Some(b"cam\x1b[2J\n7"), odd_headers, b"\x89PNG"),
            ("dlsr-verdicts", Some(b"new.png"), vec![text("dlsr-verdict", "id")], new.as_bytes()),
            ("dlsr-verdicts", None, vec![], b"\x00\x01 not json"),
        ],
    );
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(rx.recv_timeout(Duration::from_secs(30)).expect("tail --follow printed too little"));
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(rx.recv_timeout(Duration::from_secs(1)).is_err(), "old records or a surplus line");
    let all = got.join("\n");
    assert!(!all.contains("old.png"), "--follow starts at the end: {all}");
    assert!(all.contains("DEAD cam\\u{1b}[2J\\n7  undecodable: bad\\nbytes  from images/1@9"), "{all}");
    assert!(all.contains("ID   new.png  mfsim -0.9800 <= -0.9900"), "{all}");
    assert!(all.contains("?    dlsr-verdicts/0/"), "{all}");
    assert!(
        stderr.contains(
            "3 records: 1 verdict (0 OOD, 1 ID), 1 dead letter (undecodable 1), 1 not written by dlsr"
        ),
        "{stderr}"
    );

    // From the beginning (the default without --follow): the old verdict too. (Times are
    // tested against tansu in broker.rs: the mock cluster cannot look offsets up by time.)
    let out = std::process::Command::new(crate::common::dlsr_bin())
        .args(["tail", "--brokers", &brokers, "--json"])
        .output()
        .unwrap();
    let mut kinds: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| v["verdict"]["id"].as_str().unwrap_or(v["kind"].as_str().unwrap()).to_string())
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["dead_letter", "new.png", "old.png", "other"]);

    // A topic that is not there is a clear error, not a wait.
    let out = std::process::Command::new(crate::common::dlsr_bin())
        .args(["tail", "--brokers", &brokers, "--topic", "no-such-topic", "--timeout", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such topic on the brokers: no-such-topic"));
    // One missing of two (no dead letter yet, a common start): the other is read.
    let out = std::process::Command::new(crate::common::dlsr_bin())
        .args(["tail", "--brokers", &brokers, "--topic", "dlsr-verdicts", "--topic", "no-such-topic"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("topic no-such-topic does not exist yet"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3, "old, new and the foreign record");
}

/// `dlsr score`'s JSON lines as id -> score.
fn offline_scores(spec: &std::path::Path, limit: usize) -> BTreeMap<String, f64> {
    let out = std::process::Command::new(crate::common::dlsr_bin())
        .args(["-q", "score", "--model"])
        .arg(&crate::model::fitted().bundle)
        .arg(spec)
        .args(["--limit", &limit.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v["score"].as_f64().unwrap())
        })
        .collect()
}

/// The scoring noise is seeded from the decoded pixels, so an image read from an IDX
/// record (or a CSV row), from a PNG file and from a Kafka message scores the same. (With
/// a seed from the container's bytes the three differ by the noise: about 1e-3.)
#[test]
fn an_image_scores_the_same_from_an_idx_record_a_png_file_and_a_kafka_message() {
    let (_cluster, brokers) = cluster();
    let keys = publish(&brokers, 8, 0, 4, false);
    let control = Control::default();
    let (handle, _metrics) = start(config(&brokers, "g-same"), control.clone(), None);
    let outputs = collect(&output_reader(&brokers, "r-same"), keys.len(), Duration::from_secs(120));
    control.shutdown.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    let from_kafka: BTreeMap<String, f64> = outputs
        .iter()
        .map(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.value).unwrap();
            (o.key.clone(), v["score"].as_f64().unwrap())
        })
        .collect();
    assert_eq!(from_kafka.len(), keys.len());

    let idx = asset(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz"));
    let csv = asset(dlsr::assets::mnist_5k());
    let mut from_records = offline_scores(&idx, 8);
    from_records.extend(offline_scores(&csv, 4));
    // The same records as PNG files, named after their keys.
    let dir = tempfile::tempdir().unwrap();
    let mut file_keys = BTreeMap::new();
    for (spec, n) in [(&idx, 8), (&csv, 4)] {
        for item in DataSet::open(spec.to_str().unwrap()).unwrap().with_limit(Some(n)).iter() {
            let item = item.unwrap();
            let name = format!("{}.png", item.id.replace(['#', '.'], "_"));
            std::fs::write(dir.path().join(&name), item_bytes(&item).unwrap()).unwrap();
            file_keys.insert(name, item.id);
        }
    }
    let from_files: BTreeMap<String, f64> = offline_scores(dir.path(), 100)
        .into_iter()
        .map(|(name, score)| (file_keys[&name].clone(), score))
        .collect();

    for key in &keys {
        let (k, r, f) = (from_kafka[key], from_records[key], from_files[key]);
        // Only float reassociation inside batched kernels may differ (see model.rs).
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * a.abs().max(b.abs()).max(1e-3);
        assert!(close(k, r) && close(r, f), "{key}: kafka {k}, record {r}, file {f}");
    }
}

#[test]
fn sighup_reload_changes_the_verdicts_of_later_messages() {
    let (_cluster, brokers) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dlsr.toml");
    let cfg = config(&brokers, "g-reload");
    let write = |value: &str| {
        let text = format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"g-reload\"\npublish = \"all\"\n\
             [model]\nbundle = \"{}\"\ndevice = \"cpu\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [thresholds.default]\nscore_kind = \"mfsim\"\n{value}\n",
            cfg.model.bundle.display()
        );
        std::fs::write(&path, text).unwrap();
    };
    write("value = -2.0"); // MFsim >= -1 always: everything is flagged
    let cfg = Config::load(Some(&path)).unwrap();
    let control = Control::default();
    let (handle, metrics) = start(cfg, control.clone(), Some(path.clone()));
    let r = output_reader(&brokers, "r-reload");
    publish(&brokers, 10, 200, 0, false);
    let first = collect(&r, 10, Duration::from_secs(60));

    std::fs::write(&path, "[kafka]\nnot_a_key = 1\n").unwrap();
    control.reload.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    write("value = 10.0"); // nothing is flagged
    control.reload.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    publish(&brokers, 10, 300, 0, false);
    let second = collect(&r, 10, Duration::from_secs(60));
    control.shutdown.store(true, Ordering::Relaxed);
    handle.join().unwrap();

    let ood = |o: &Output| serde_json::from_slice::<serde_json::Value>(&o.value).unwrap()["is_ood"] == true;
    assert_eq!(first.len(), 10);
    assert_eq!(second.len(), 10);
    assert!(first.iter().all(ood), "threshold -2 flags everything");
    assert!(!second.iter().any(ood), "after the reload, threshold 10 flags nothing");
    let text = metrics.render();
    assert!(text.contains("dlsr_config_reloads_total{result=\"rejected\"} 1"), "{text}");
    assert!(text.contains("dlsr_config_reloads_total{result=\"ok\"} 1"), "{text}");
    assert!(text.contains("dlsr_threshold{kind=\"mfsim\",topic=\"images\"} 10"), "{text}");
    // The drift alarm's reference follows the reload: no ID item scores above 10.
    assert!(text.contains("dlsr_threshold_id_fpr{kind=\"mfsim\",topic=\"images\"} 0\n"), "{text}");
    // ... with its 95% interval from the held-out count: 0 of 300 is 0..1.2%.
    assert!(
        text.contains("dlsr_threshold_id_fpr_bound{bound=\"lower\",kind=\"mfsim\",topic=\"images\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("dlsr_threshold_id_fpr_bound{bound=\"upper\",kind=\"mfsim\",topic=\"images\"} 0.012"),
        "{text}"
    );
}

/// kill -9 while outputs are produced but not yet acknowledged: the broker answers every
/// produce request with a retriable error for a while (librdkafka keeps retrying), so
/// the daemon has scored everything and handed it to the producer, yet nothing is
/// acknowledged. A daemon that committed on produce would have committed offsets whose
/// outputs do not exist; this one must not have. After a restart everything arrives.
#[test]
fn kill_9_inside_the_produce_to_acknowledge_window_commits_nothing_unacknowledged() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (cluster, brokers) = cluster();
    let keys = publish(&brokers, 24, 800, 0, false);
    cluster.request_errors(Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 60]);
    use RDKafkaApiKey::Produce;
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let path = dir.path().join("kill.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"g-kill\"\npublish = \"all\"\ncommit_interval_ms = 100\n\
             [model]\nbundle = \"{}\"\ndevice = \"cpu\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            crate::model::fitted().bundle.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(crate::common::dlsr_bin())
        .args(["serve", "--config", path.to_str().unwrap()])
        .env("OMP_NUM_THREADS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let scored = || {
        crate::common::http_get(("127.0.0.1", port), "/metrics")
            .map(|(_, body)| {
                body.lines()
                    .filter(|l| l.starts_with("dlsr_verdicts_total"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>()
            })
            .unwrap_or(0.0)
    };
    wait_until("every input scored and handed to the producer", Duration::from_secs(120), || {
        scored() >= keys.len() as f64
    });
    std::thread::sleep(Duration::from_millis(800)); // several commit intervals
    child.kill().unwrap(); // SIGKILL: no drain, no final commit
    child.wait().unwrap();
    let commits = committed(&brokers, "g-kill");
    cluster.clear_request_errors(Produce);
    let written = collect(&output_reader(&brokers, "r-kill"), keys.len(), Duration::from_secs(8)).len();
    let total: i64 = commits.values().map(|c| c.unwrap_or(0)).sum();
    assert!(
        total as usize <= written,
        "{total} inputs committed but only {written} outputs exist: committed before acknowledgement"
    );

    // A restart re-reads the uncommitted inputs: every input gets its output.
    let control = Control::default();
    let (handle, _m) = start(config(&brokers, "g-kill"), control.clone(), None);
    let outputs = collect(&output_reader(&brokers, "r-kill-2"), keys.len(), Duration::from_secs(120));
    control.shutdown.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    let got: std::collections::BTreeSet<&str> = outputs.iter().map(|o| o.key.as_str()).collect();
    assert!(keys.iter().all(|k| got.contains(k.as_str())), "inputs lost after kill -9");
}

#[test]
fn readyz_says_why_while_the_group_has_not_assigned_partitions() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (cluster, brokers) = cluster();
    // The group coordinator cannot be found: metadata works, no assignment comes.
    cluster.request_errors(
        RDKafkaApiKey::FindCoordinator,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 10_000],
    );
    let control = Control::default();
    let (handle, _metrics) = start(config(&brokers, "g-wait"), control.clone(), None);
    let addr = || control.http_addr.lock().ok().and_then(|a| *a);
    wait_until("the listener", Duration::from_secs(60), || addr().is_some());
    let readyz = || crate::common::http_get(addr().unwrap(), "/readyz").unwrap_or((0, String::new()));
    wait_until("/readyz 503 waiting for the group", Duration::from_secs(60), || {
        let (status, body) = readyz();
        status == 503 && body.contains("waiting for partition assignment from group g-wait for ")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(readyz().0, 503, "still no assignment: still not ready");
    cluster.clear_request_errors(RDKafkaApiKey::FindCoordinator);
    wait_until("/readyz 200 once assigned", Duration::from_secs(60), || readyz().0 == 200);
    control.shutdown.store(true, Ordering::Relaxed);
    assert!(handle.join().unwrap().drained);
}

#[test]
fn readyz_goes_false_while_the_broker_is_down_and_recovers() {
    let (cluster, brokers) = cluster();
    let control = Control::default();
    let (handle, metrics) = start(config(&brokers, "g-outage"), control.clone(), None);
    let addr = || control.http_addr.lock().ok().and_then(|a| *a);
    wait_until("the listener", Duration::from_secs(60), || addr().is_some());
    let ready = || crate::common::http_get(addr().unwrap(), "/readyz").map(|(s, _)| s).unwrap_or(0);
    wait_until("/readyz 200 at start", Duration::from_secs(60), || ready() == 200);
    publish(&brokers, 5, 600, 0, false);

    cluster.broker_down(1).unwrap();
    wait_until("/readyz 503 with the broker down", Duration::from_secs(60), || ready() == 503);
    assert!(metrics.render().contains("dlsr_broker_up 0"));
    let (_, why) = crate::common::http_get(addr().unwrap(), "/readyz").unwrap();
    assert!(why.starts_with("not ready: the brokers do not answer"), "{why}");
    assert_eq!(crate::common::http_get(addr().unwrap(), "/healthz").unwrap().0, 200, "alive all along");

    cluster.broker_up(1).unwrap();
    wait_until("/readyz 200 after the broker is back", Duration::from_secs(60), || ready() == 200);
    assert!(metrics.render().contains("dlsr_broker_up 1"));
    // And it still works: the next messages get their verdicts.
    let keys = publish(&brokers, 5, 700, 0, false);
    let outputs = collect(&output_reader(&brokers, "r-outage"), 10, Duration::from_secs(60));
    control.shutdown.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    let got: std::collections::BTreeSet<&str> = outputs.iter().map(|o| o.key.as_str()).collect();
    assert!(keys.iter().all(|k| got.contains(k.as_str())), "messages after the outage were lost");
}

#[test]
fn bad_configuration_fails_at_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = crate::model::fitted().bundle.clone();
    let cases = [
        ("[kafka]\nbrokerz = \"x\"\n".to_string(), "brokerz"),
        (format!("[model]\nbundle = \"{}\"\n[thresholds.default]\ntarget_fpr = 2.0\n", bundle.display()), "target_fpr"),
        ("[model]\nbundle = \"/nonexistent/model.safetensors\"\n".to_string(), "nonexistent"),
        (
            format!("[kafka]\nbrokers = \"127.0.0.1:1\"\n[model]\nbundle = \"{}\"\ndevice = \"cpu\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n", bundle.display()),
            "unreachable",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(crate::common::dlsr_bin())
            .args(["serve", "--config", path.to_str().unwrap()])
            .env("DLSR__KAFKA__SESSION_TIMEOUT_MS", "6000")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} must fail");
        assert!(stderr.contains(needle), "case {i}: {stderr}");
        if *needle == "unreachable" {
            // librdkafka retries several times a second; each problem is said once.
            assert!(stderr.lines().count() <= 8, "{} lines:\n{stderr}", stderr.lines().count());
            assert!(stderr.matches("Connection refused").count() <= 1, "{stderr}");
        }
    }
    // An environment override is validated like the file.
    let out = std::process::Command::new(crate::common::dlsr_bin())
        .args(["serve"])
        .env("DLSR__PIPELINE__BATCH_MAX_SIZE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pipeline.batch_max_size"));
    // Without --config it says what it runs on.
    let out = std::process::Command::new(crate::common::dlsr_bin())
        .args(["serve"])
        .env("DLSR__MODEL__BUNDLE", "/nonexistent/m.safetensors")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no --config: serving with the built-in defaults and DLSR__* environment"),
        "{stderr}"
    );
    assert!(stderr.contains("/nonexistent/m.safetensors"), "{stderr}");
    // An unknown key from the environment names the variable it came from.
    let out = std::process::Command::new(crate::common::dlsr_bin())
        .args(["serve"])
        .env("DLSR__KAFKA__BROKER", "localhost:9092")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `broker`") && stderr.contains("DLSR__KAFKA__BROKER"), "{stderr}");
}

#[test]
fn publish_to_a_wrong_address_fails_within_its_timeout_and_says_so_once() {
    let port = crate::common::free_port(); // nothing listens there
    let data = asset(dlsr::assets::mnist_5k());
    let started = Instant::now();
    let out = std::process::Command::new(crate::common::dlsr_bin())
        .args(["publish", "--brokers", &format!("127.0.0.1:{port}"), "--topic", "images"])
        .args([data.to_str().unwrap(), "--limit", "5", "--timeout", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // It must give up at the end of its timeout, not retry each message for minutes
    // (a generous bound: the machine may be busy).
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    assert!(stderr.contains(&format!("cannot reach the brokers 127.0.0.1:{port} within 2 s")), "{stderr}");
    assert!(stderr.contains("check --brokers"), "{stderr}");
    assert!(stderr.lines().count() <= 4, "{} lines:\n{stderr}", stderr.lines().count());
    assert!(stderr.matches("Connection refused").count() <= 1, "{stderr}");
    assert!(out.stdout.is_empty(), "nothing was published");
}

#[test]
fn demo_runs_the_whole_stream_and_stops_by_itself() {
    let bundle = crate::model::fitted().bundle.clone();
    let out = std::process::Command::new(crate::common::dlsr_bin())
        .args(["-q", "demo", "--bundle", bundle.to_str().unwrap(), "--id-images", "40", "--ood-images", "20"])
        .args(["--metrics-listen", "127.0.0.1:0", "--device", "cpu", "--timeout", "120"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("published 64 messages (40 Fashion-MNIST, 20 MNIST, 4 corrupt)"), "{stdout}");
    assert!(stdout.contains("every message accounted for"), "{stdout}");
    // 60 images: no window of 100 fills; the open one is reported cut short at the stop.
    assert!(stdout.contains("window audit"), "{stdout}");
    assert!(stdout.contains("images/all #0 n=60") && stdout.contains("cut short (shutdown)"), "{stdout}");
    for code in ["empty", "too_large", "unsupported_format", "undecodable"] {
        assert!(
            stdout.contains(&format!("dlsr_dead_letters_total{{code=\"{code}\"")),
            "{code} missing:\n{stdout}"
        );
    }
}
