//! The daemon as a process against a real Kafka-compatible broker (tansu 0.6.0, started
//! and stopped here on 127.0.0.1): kill -9 and restart loses nothing (duplicates are
//! counted and reported), SIGTERM and restart repeats nothing, two daemons in one group
//! share the partitions and survive one of them dying; `dlsr audit` reads a time range
//! (the mock cluster cannot look offsets up by time).

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;

use crate::common::{asset, dlsr_bin, free_port};

pub(crate) struct Tansu {
    child: Child,
    pub(crate) brokers: String,
}

/// A tansu broker process with in-memory storage, listening and advertising as given.
pub(crate) fn spawn_tansu(listen: &str, advertised: &str) -> Child {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/bin/tansu");
    assert!(bin.exists(), "{} missing: run scripts/fetch-assets.sh", bin.display());
    Command::new(bin)
        .args(["broker", "--listener-url", listen, "--advertised-listener-url", advertised])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

impl Tansu {
    fn start() -> Tansu {
        Self::start_with(&[("images", 3), ("dlsr-verdicts", 1), ("dlsr-dead-letters", 1)])
    }

    /// tansu with these topics (name, partitions).
    pub(crate) fn start_with(topics: &[(&str, i32)]) -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = spawn_tansu(&url, &url);
        let brokers = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while TcpStream::connect(&brokers).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "tansu did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let tansu = Tansu { child, brokers };
        tansu.create_topics(topics);
        tansu
    }

    pub(crate) fn create_topics(&self, topics: &[(&str, i32)]) {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create().unwrap();
        let topics: Vec<NewTopic> =
            topics.iter().map(|(name, n)| NewTopic::new(name, *n, TopicReplication::Fixed(1))).collect();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        for r in rt.block_on(admin.create_topics(&topics, &AdminOptions::new())).unwrap() {
            r.unwrap();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, brokers: &str, group: &str) -> PathBuf {
    let path = dir.join(format!("{group}.toml"));
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\npublish = \"all\"\ncommit_interval_ms = 300\n\
             session_timeout_ms = 6000\n[model]\nbundle = \"{}\"\ndevice = \"cpu\"\n[pipeline]\nbatch_max_size = 8\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n[log]\nlevel = \"info\"\n[shutdown]\ndrain_deadline_ms = 20000\n",
            crate::model::fitted().bundle.display()
        ),
    )
    .unwrap();
    path
}

/// A `dlsr serve` process whose log is collected; started once it logs "dlsr serving".
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) log: std::sync::Arc<std::sync::Mutex<String>>,
}

/// A daemon left running by a failed test is killed, not leaked to later tests.
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn serve(config: &Path) -> Daemon {
    use std::io::BufRead;
    let mut child = Command::new(dlsr_bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("dlsr serving") {
                let _ = tx.send(());
            }
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the daemon did not start serving");
    Daemon { child, log }
}

pub(crate) fn terminate(mut d: Daemon) -> String {
    unsafe {
        libc::kill(d.child.id() as i32, libc::SIGTERM);
    }
    let status = d.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let log = d.log.lock().unwrap().clone();
    assert!(status.success(), "SIGTERM must end the daemon cleanly: {status:?}\n{log}");
    log
}

fn publish(brokers: &str, n: usize) -> Vec<String> {
    let fm = dlsr::data::DataSet::open(
        asset(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz")).to_str().unwrap(),
    )
    .unwrap()
    .with_limit(Some(n));
    let mut p = dlsr::stream::publish::Publisher::new(brokers, &[]).unwrap();
    let mut keys = Vec::new();
    for item in fm.iter() {
        let item = item.unwrap();
        p.send("images", &item.id, &dlsr::stream::publish::item_bytes(&item).unwrap()).unwrap();
        keys.push(item.id);
    }
    assert_eq!(p.finish(Instant::now(), 0).unwrap().delivered as usize, n);
    keys
}

struct Outputs {
    consumer: BaseConsumer,
    counts: BTreeMap<String, usize>,
}

impl Outputs {
    fn new(brokers: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("reader-{}", std::process::id()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&["dlsr-verdicts", "dlsr-dead-letters"]).unwrap();
        Self { consumer, counts: BTreeMap::new() }
    }

    /// Reads until `done(self)` or the timeout.
    fn until(&mut self, timeout: Duration, done: impl Fn(&Self) -> bool) {
        let started = Instant::now();
        while !done(self) && started.elapsed() < timeout {
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                *self.counts.entry(key).or_default() += 1;
            }
        }
    }

    fn total(&self) -> usize {
        self.counts.values().sum()
    }

    fn missing(&self, keys: &[String]) -> usize {
        keys.iter().filter(|k| !self.counts.contains_key(*k)).count()
    }

    fn duplicates(&self) -> usize {
        self.counts.values().map(|c| c - 1).sum()
    }
}

#[test]
fn kill_9_then_restart_loses_nothing_and_sigterm_then_restart_repeats_nothing() {
    let broker = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.brokers, "g-crash");
    let keys = publish(&broker.brokers, 600);
    let mut out = Outputs::new(&broker.brokers);

    let first = serve(&config);
    out.until(Duration::from_secs(120), |o| o.total() >= 100);
    let mut first = first;
    first.child.kill().unwrap(); // SIGKILL: no drain, no final commit
    first.child.wait().unwrap();
    let second = serve(&config);
    out.until(Duration::from_secs(180), |o| o.missing(&keys) == 0);
    let log = terminate(second);
    assert_eq!(out.missing(&keys), 0, "every input needs at least one output after a crash");
    // The wait for the group is said at once (the first daemon may have published
    // everything already, so this one can be stopped before its assignment comes).
    assert!(log.contains("waiting for partition assignment from group g-crash"), "{log}");
    eprintln!(
        "kill -9 and restart: {} inputs, {} duplicate outputs (at-least-once)",
        keys.len(),
        out.duplicates()
    );

    // Graceful stop mid-stream, then restart: exactly once each.
    let config = write_config(dir.path(), &broker.brokers, "g-term");
    let before: BTreeMap<String, usize> = out.counts.clone();
    let third = serve(&config);
    out.until(Duration::from_secs(120), |o| o.total() >= before.values().sum::<usize>() + 100);
    terminate(third);
    let fourth = serve(&config);
    out.until(Duration::from_secs(180), |o| keys.iter().all(|k| o.counts[k] > before[k]));
    // Let any duplicate arrive before judging.
    out.until(Duration::from_secs(3), |_| false);
    let log = terminate(fourth);
    // This one had work, so it was assigned partitions, and said after how long.
    assert!(log.contains("partition assignment received after"), "{log}");
    for k in &keys {
        assert_eq!(
            out.counts[k] - before[k],
            1,
            "{k}: SIGTERM and restart must not repeat or lose an output"
        );
    }
}

#[test]
fn two_daemons_share_the_partitions_and_survive_one_dying() {
    let broker = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.brokers, "g-pair");
    let a = serve(&config);
    let b = serve(&config);
    std::thread::sleep(Duration::from_secs(3));
    let keys = publish(&broker.brokers, 150);
    let mut out = Outputs::new(&broker.brokers);
    out.until(Duration::from_secs(120), |o| o.total() >= 60);
    let mut b = b;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    out.until(Duration::from_secs(180), |o| o.missing(&keys) == 0);
    let summary = terminate(a);
    assert_eq!(out.missing(&keys), 0, "nothing may be lost when one of two daemons dies");
    let last_json = summary.lines().rfind(|l| l.starts_with('{')).unwrap_or("{}");
    let consumed: serde_json::Value = serde_json::from_str(last_json).unwrap_or_default();
    let by_a = consumed["consumed"].as_u64().unwrap_or(0) as usize;
    assert!(by_a > 0, "the surviving daemon consumed nothing");
    eprintln!("two daemons: {} outputs for {} inputs, survivor consumed {by_a}", out.total(), keys.len());
}

#[test]
fn audit_reads_the_time_range_it_is_given() {
    let broker = Tansu::start();
    let bundle = crate::model::fitted().bundle.clone();
    publish(&broker.brokers, 12);
    std::thread::sleep(Duration::from_millis(1500));
    let cut = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    std::thread::sleep(Duration::from_millis(500));
    publish(&broker.brokers, 8);
    let dir = tempfile::tempdir().unwrap();
    let audit = |flag: &str, time: String| -> serde_json::Value {
        let out = dir.path().join(flag.trim_start_matches('-'));
        let result = Command::new(dlsr_bin())
            .args(["-q", "audit", "--model", bundle.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(["--from-topic", "images", "--brokers", &broker.brokers, flag, &time])
            .env("DLSR_CACHE", dir.path().join("cache"))
            .output()
            .unwrap();
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
    };
    // Both forms of time: RFC 3339 and milliseconds since the epoch.
    let after = audit("--since", dlsr::kafka::message::rfc3339(cut));
    assert_eq!(after["items"], 8, "{after}");
    let before = audit("--until", cut.to_string());
    assert_eq!(before["items"], 12, "{before}");

    // `dlsr tail` from the same time shows the same 8 (as records dlsr did not write:
    // images are neither verdicts nor dead letters), and from the end none.
    let tail = |from: &str| {
        let out = Command::new(dlsr_bin())
            .args(["tail", "--brokers", &broker.brokers, "--topic", "images", "--from", from, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let records: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(records.iter().all(|r| r["kind"] == "other" && r["topic"] == "images"), "{records:?}");
        records.len()
    };
    assert_eq!(tail(&dlsr::kafka::message::rfc3339(cut)), 8);
    assert_eq!(tail("end"), 0);
    assert_eq!(tail("beginning"), 20);
}
