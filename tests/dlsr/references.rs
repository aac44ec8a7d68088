//! Images by reference and in envelopes (issue #22), against real servers the tests
//! start: moto's S3-compatible server (installed by scripts/setup-moto.sh), an HTTP
//! server written here on std's TCP (200, 404, 403, a 500 then 200, a stall, a redirect
//! to a host not allowed, a Content-Length over the limit, and a stop of 15 s), the real
//! daemon on tansu and on the mock cluster with a stub scorer, and the real model for
//! "one image, one score, whichever way it came".

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use dlsr::data::reference::{FetchPolicy, Fetcher, Persistence, Unobserved};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use crate::common::{committed, dlsr_bin, free_port, read_outputs_by_key, wait_until};
use crate::pipeline::{config, png, start, Behaviour};

// ---------------------------------------------------------------- the HTTP server

/// One request per connection (`Connection: close`), so a stop ends every connection.
struct TestHttp {
    port: u16,
    objects: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    running: Arc<AtomicBool>,
    /// Requests seen per path.
    hits: Arc<Mutex<HashMap<String, usize>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl TestHttp {
    fn start() -> TestHttp {
        let mut server = TestHttp {
            port: free_port(),
            objects: Arc::default(),
            running: Arc::new(AtomicBool::new(false)),
            hits: Arc::default(),
            acceptor: None,
        };
        server.resume();
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn put(&self, name: &str, bytes: Vec<u8>) {
        self.objects.lock().unwrap().insert(name.to_string(), bytes);
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// Closes the port: connections are refused until [`Self::resume`].
    fn stop(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            t.join().unwrap();
        }
    }

    fn resume(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        self.running.store(true, Ordering::SeqCst);
        let (running, objects, hits, port) =
            (self.running.clone(), self.objects.clone(), self.hits.clone(), self.port);
        self.acceptor = Some(std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (objects, hits, running) = (objects.clone(), hits.clone(), running.clone());
                        std::thread::spawn(move || serve(conn, &objects, &hits, &running, port));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
}

impl Drop for TestHttp {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    mut conn: TcpStream,
    objects: &Mutex<HashMap<String, Vec<u8>>>,
    hits: &Mutex<HashMap<String, usize>>,
    running: &AtomicBool,
    port: u16,
) {
    conn.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").to_string());
    let seen = {
        let mut h = hits.lock().unwrap();
        let n = h.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let respond = |conn: &mut TcpStream, status: &str, headers: &str, body: &[u8]| {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
            body.len()
        );
        let _ = conn.write_all(head.as_bytes());
        if method != "HEAD" {
            let _ = conn.write_all(body);
        }
    };
    let object = |name: &str| objects.lock().unwrap().get(name).cloned();
    match path.as_str() {
        "/missing.png" => respond(&mut conn, "404 Not Found", "", b"no such object"),
        "/denied.png" => respond(&mut conn, "403 Forbidden", "", b"denied"),
        "/stall.png" => {
            while running.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        "/redirect.png" => {
            let location = format!("Location: http://127.0.0.2:{port}/img/a.png\r\n");
            respond(&mut conn, "302 Found", &location, b"");
        }
        "/big.png" => {
            // Announces 500 MB and sends none of it: a client that waits for the body hangs.
            let _ =
                conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 500000000\r\nConnection: close\r\n\r\n");
            while running.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        p if p.starts_with("/flaky/") && seen == 1 => {
            respond(&mut conn, "500 Internal Server Error", "", b"x")
        }
        p => {
            let name = p.trim_start_matches("/img/").trim_start_matches("/flaky/");
            match object(name) {
                Some(bytes) => respond(&mut conn, "200 OK", "Content-Type: image/png\r\n", &bytes),
                None => respond(&mut conn, "404 Not Found", "", b""),
            }
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let _ = reader.read(&mut [0u8; 1]);
}

fn http_policy(server: &TestHttp) -> FetchPolicy {
    FetchPolicy {
        allowed_hosts: vec![format!("127.0.0.1:{}", server.port)],
        timeout: Duration::from_millis(800),
        retries: 2,
        persistence: Persistence::Retries,
        max_bytes: 1_000_000,
        ..FetchPolicy::default()
    }
}

#[test]
fn http_references_give_each_outcome_its_code() {
    let server = TestHttp::start();
    server.put("a.png", png(10));
    let fetcher = Fetcher::new(http_policy(&server));
    let rt = dlsr::data::chain::io_runtime().unwrap();
    let fetch = |path: &str| {
        let reference = fetcher.policy().parse(&server.url(path))?;
        rt.block_on(fetcher.fetch(&reference, &Unobserved))
    };
    let ok = fetch("/img/a.png").unwrap();
    assert_eq!((ok.bytes, ok.attempts), (png(10), 1));
    let flaky = fetch("/flaky/a.png").unwrap();
    assert_eq!((flaky.bytes.len(), flaky.attempts), (png(10).len(), 2), "a 500 is retried, then scored");
    let code = |path: &str| fetch(path).map(|_| "ok").unwrap_or_else(|e| e.code());
    assert_eq!(code("/missing.png"), "fetch_not_found");
    assert_eq!(code("/denied.png"), "fetch_denied");
    assert_eq!(code("/big.png"), "fetch_too_large", "refused from Content-Length, before the body");
    assert_eq!(server.hits("/big.png"), 1, "a refusal by size is not retried");
    assert_eq!(code("/redirect.png"), "bad_reference");
    let stalled = fetch("/stall.png").unwrap_err();
    assert_eq!(stalled.code(), "fetch_timeout", "{stalled}");
    assert_eq!(server.hits("/stall.png"), 3, "one attempt and two retries");
    // Hosts that are not listed, and the metadata address, are refused before any request.
    let refused = |uri: &str| fetcher.policy().parse(uri).unwrap_err().code();
    assert_eq!(refused(&format!("http://localhost:{}/img/a.png", server.port)), "bad_reference");
    assert_eq!(refused("http://169.254.169.254/latest/meta-data/iam/"), "bad_reference");
}

// ---------------------------------------------------------------- moto's S3 server

struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    fn start() -> Moto {
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/moto-venv/bin/moto_server");
        assert!(bin.exists(), "{} missing: run scripts/setup-moto.sh", bin.display());
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_until("moto answers", Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Moto { child, endpoint }
    }

    fn env(&self) -> [(&'static str, String); 5] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    fn store(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_region("us-east-1")
            .with_bucket_name(bucket)
            .build()
            .unwrap()
    }

    /// Creates `bucket` (object_store does not create buckets; moto takes an unsigned PUT).
    fn create_bucket(&self, bucket: &str) {
        let addr = self.endpoint.trim_start_matches("http://");
        let mut conn = TcpStream::connect(addr).unwrap();
        let request = format!(
            "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {answer}");
    }

    fn upload(&self, bucket: &str, objects: &[(String, Vec<u8>)]) {
        use object_store::ObjectStoreExt;
        let store = self.store(bucket);
        let rt = dlsr::data::chain::io_runtime().unwrap();
        for (key, bytes) in objects {
            rt.block_on(store.put(&object_store::path::Path::from(key.as_str()), bytes.clone().into()))
                .unwrap();
        }
    }
}

/// The S3 credentials the daemon's fetcher reads from the environment. Every test in this
/// binary shares the process, so only values no other test depends on are set.
fn set_s3_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: set once, before the daemon threads of this test read them; no other
        // test reads or writes these variables.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "test");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
            std::env::set_var("AWS_REGION", "us-east-1");
        }
    });
}

/// A grey image with noise, `side` pixels square (noise keeps PNGs from compressing away).
fn noisy_png(side: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        let v = (x.wrapping_mul(2_654_435_761).wrapping_add(y.wrapping_mul(40_503)).wrapping_add(seed) >> 7)
            as u8;
        image::Rgb([v, v / 2, 255 - v])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn send(brokers: &str, topic: &str, records: &[(String, Vec<u8>)]) {
    let p: BaseProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for (key, value) in records {
        p.send(BaseRecord::to(topic).key(key).payload(value).partition(0)).map_err(|(e, _)| e).unwrap();
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(20)).unwrap();
}

/// One output read back.
#[derive(Debug)]
struct Out {
    topic: String,
    code: String,
    value: Vec<u8>,
    uri_header: Option<String>,
}

fn read_outputs(brokers: &str, group: &str, n: usize, timeout: Duration) -> BTreeMap<String, Out> {
    read_outputs_by_key(brokers, group, n, timeout, |m, text| {
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let out = Out {
            topic: m.topic().to_string(),
            code: text("dlsr-error-code").unwrap_or_default(),
            value: m.payload().unwrap_or_default().to_vec(),
            uri_header: text("dlsr-source-uri"),
        };
        (key, out)
    })
}

fn json_value(out: &Out) -> serde_json::Value {
    serde_json::from_slice(&out.value).unwrap()
}

#[test]
fn a_stream_mixing_raw_base64_and_s3_references_gets_a_verdict_or_the_right_dead_letter_for_each() {
    set_s3_credentials();
    let moto = Moto::start();
    moto.create_bucket("images");
    moto.create_bucket("other");
    let image = png(77);
    let big = noisy_png(200, 1);
    assert!(big.len() > 60_000, "{}", big.len());
    moto.upload("images", &[("cam/a.png".into(), image.clone()), ("cam/big.png".into(), big)]);
    moto.upload("other", &[("x.png".into(), image.clone())]);
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("a.png"), &image).unwrap();

    let tansu =
        crate::broker::Tansu::start_with(&[("images", 1), ("dlsr-verdicts", 1), ("dlsr-dead-letters", 1)]);
    let b = &tansu.brokers;
    let mut cfg = config(b, "refs");
    cfg.kafka.input_topics = vec!["images".into()];
    cfg.pipeline.decode_limits.max_bytes = 50_000;
    cfg.input.object_store.endpoint = moto.endpoint.clone();
    cfg.input.object_store.allow_http = true;
    cfg.input.allowed_buckets = vec!["s3://images".into()];
    cfg.input.file_root = files.path().to_string_lossy().into_owned();
    cfg.input.id_pointer = "/id".into();
    cfg.input.passthrough_pointers = vec!["/camera".into()];
    let daemon = start(cfg, Behaviour::default());

    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let file_uri = url::Url::from_file_path(files.path().join("a.png")).unwrap().to_string();
    let records: Vec<(String, Vec<u8>)> = [
        ("raw", image.clone()),
        ("base64", format!(r#"{{"image": "data:image/png;base64,{b64}", "camera": "c1"}}"#).into_bytes()),
        (
            "reference",
            br#"{"id": "event-7", "uri": "s3://images/cam/a.png", "camera": "c2", "ts": 1}"#.to_vec(),
        ),
        ("bare", b"s3://images/cam/a.png".to_vec()),
        ("file", format!(r#"{{"uri": "{file_uri}"}}"#).into_bytes()),
        ("missing", br#"{"uri": "s3://images/cam/none.png"}"#.to_vec()),
        ("big", br#"{"uri": "s3://images/cam/big.png"}"#.to_vec()),
        ("other-bucket", br#"{"uri": "s3://other/x.png"}"#.to_vec()),
        ("no-field", br#"{"camera": "c3"}"#.to_vec()),
        ("bad-base64", br#"{"image": "!!not base64!!"}"#.to_vec()),
        ("http-not-listed", br#"{"uri": "https://example.com/a.png"}"#.to_vec()),
        ("file-outside", br#"{"uri": "file:///etc/hostname"}"#.to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    send(b, "images", &records);
    let outputs = read_outputs(b, "refs-reader", records.len(), Duration::from_secs(60));
    let codes: BTreeMap<&str, (&str, &str)> =
        outputs.iter().map(|(k, o)| (k.as_str(), (o.topic.as_str(), o.code.as_str()))).collect();
    let want: BTreeMap<&str, (&str, &str)> = [
        ("raw", ("dlsr-verdicts", "")),
        ("base64", ("dlsr-verdicts", "")),
        ("reference", ("dlsr-verdicts", "")),
        ("bare", ("dlsr-verdicts", "")),
        ("file", ("dlsr-verdicts", "")),
        ("missing", ("dlsr-dead-letters", "fetch_not_found")),
        ("big", ("dlsr-dead-letters", "fetch_too_large")),
        ("other-bucket", ("dlsr-dead-letters", "bad_reference")),
        ("no-field", ("dlsr-dead-letters", "bad_envelope")),
        ("bad-base64", ("dlsr-dead-letters", "bad_envelope")),
        ("http-not-listed", ("dlsr-dead-letters", "bad_reference")),
        ("file-outside", ("dlsr-dead-letters", "bad_reference")),
    ]
    .into();
    assert_eq!(codes, want);
    // One image, one score, by every path; the reference's verdict names it and its fields.
    let scores: Vec<f64> = ["raw", "base64", "reference", "bare", "file"]
        .iter()
        .map(|k| json_value(&outputs[*k])["score"].as_f64().unwrap())
        .collect();
    assert!(scores.iter().all(|s| *s == scores[0]), "{scores:?}");
    let reference = json_value(&outputs["reference"]);
    assert_eq!(reference["id"], "event-7");
    assert_eq!(reference["source"]["uri"], "s3://images/cam/a.png");
    assert_eq!(reference["source"]["topic"], "images");
    assert_eq!(reference["input"], serde_json::json!({"camera": "c2"}));
    assert!(json_value(&outputs["raw"]).get("input").is_none());
    // A dead letter carries the original value and the reference.
    assert_eq!(outputs["missing"].value, records[5].1);
    assert_eq!(outputs["missing"].uri_header.as_deref(), Some("s3://images/cam/none.png"));
    let mut last = None;
    wait_until("commits reach the end", Duration::from_secs(20), || {
        last = committed(b, "refs").get(&0).copied().flatten();
        last == Some(records.len() as i64)
    });
    assert!(daemon.metric("dlsr_fetch_bytes_total{scheme=\"s3\"}") == (2 * image.len()) as f64);
    assert_eq!(daemon.metric("dlsr_fetch_errors_total{code=\"fetch_not_found\",scheme=\"s3\"}"), 1.0);
    daemon.stop().unwrap();
}

#[test]
fn an_http_store_that_stops_for_15_s_loses_nothing_and_says_why_meanwhile() {
    let mut server = TestHttp::start();
    for i in 0..24 {
        server.put(&format!("{i}.png"), png(i * 9));
    }
    let (_cluster, b) = crate::common::mock_cluster();
    let mut cfg = config(&b, "outage");
    cfg.kafka.input_topics = vec!["images".into()];
    cfg.input.allowed_hosts = vec![format!("127.0.0.1:{}", server.port)];
    cfg.input.fetch_timeout_ms = 1000;
    let daemon = start(cfg, Behaviour::default());
    let base = server.url("/img");
    let reference = |i: u8| (format!("r{i}"), format!(r#"{{"uri": "{base}/{i}.png"}}"#).into_bytes());
    send(&b, "images", &(0..8).map(reference).collect::<Vec<_>>());
    let first = read_outputs(&b, "outage-reader-1", 8, Duration::from_secs(30));
    assert_eq!(first.len(), 8, "{first:?}");

    server.stop();
    let stopped = Instant::now();
    send(&b, "images", &(8..24).map(reference).collect::<Vec<_>>());
    let mut reason = String::new();
    wait_until("/readyz says the store cannot be reached", Duration::from_secs(14), || {
        let (code, body) = daemon.readyz();
        reason = body;
        code == 503 && reason.contains("cannot be reached")
    });
    assert!(reason.contains(&format!("http://127.0.0.1:{}", server.port)), "{reason}");
    std::thread::sleep(Duration::from_secs(15).saturating_sub(stopped.elapsed()));
    assert!(daemon.metric("dlsr_fetch_errors_total{code=\"unreachable\"") > 0.0);
    assert_eq!(daemon.metric("dlsr_fetch_stores_unreachable"), 1.0);
    server.resume();

    let all = read_outputs(&b, "outage-reader-2", 24, Duration::from_secs(60));
    let dead: Vec<_> = all.iter().filter(|(_, o)| o.topic != "dlsr-verdicts").collect();
    assert!(dead.is_empty(), "nothing is dead-lettered for an outage: {dead:?}");
    assert_eq!(all.len(), 24);
    wait_until("ready again", Duration::from_secs(40), || daemon.readyz().0 == 200);
    wait_until("commits reach the end", Duration::from_secs(20), || {
        committed(&b, "outage").get(&0).copied().flatten() == Some(24)
    });
    daemon.stop().unwrap();
}

// ---------------------------------------------------------------- offline, real model

fn run_dlsr(args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let mut cmd = Command::new(dlsr_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scores_by_id(stdout: &str) -> BTreeMap<String, f64> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["id"].as_str()?.to_string(), v["score"].as_f64()?)))
        .collect()
}

#[test]
fn score_reads_an_s3_prefix_and_gives_the_folder_s_scores() {
    let fitted = crate::model::fitted();
    let moto = Moto::start();
    moto.create_bucket("sets");
    let dir = tempfile::tempdir().unwrap();
    let folder: PathBuf = dir.path().join("pics");
    std::fs::create_dir_all(&folder).unwrap();
    let mut objects = Vec::new();
    for i in 0..6u32 {
        let bytes = noisy_png(40 + i * 3, i);
        std::fs::write(folder.join(format!("{i}.png")), &bytes).unwrap();
        objects.push((format!("batch-1/{i}.png"), bytes));
    }
    objects.push(("batch-1/notes.txt".into(), b"not an image".to_vec()));
    objects.push(("batch-2/0.png".into(), noisy_png(50, 9)));
    moto.upload("sets", &objects);
    let env = moto.env();
    let bundle = fitted.bundle.to_str().unwrap();
    let (ok, local, stderr) = run_dlsr(&["-q", "score", "--model", bundle, folder.to_str().unwrap()], &[]);
    assert!(ok, "{stderr}");
    let (ok, remote, stderr) = run_dlsr(&["-q", "score", "--model", bundle, "s3://sets/batch-1/"], &env);
    assert!(ok, "{stderr}");
    let (local, remote) = (scores_by_id(&local), scores_by_id(&remote));
    assert_eq!(local.len(), 6, "{local:?}");
    assert_eq!(local, remote, "one image, one score: from a folder and from the store");
    // A prefix with nothing under it, and a bucket that does not exist, are clear errors.
    // (The error is the SPEC's JSON line on stdout.)
    let (ok, stdout, _) = run_dlsr(&["-q", "score", "--model", bundle, "s3://sets/nothing/"], &env);
    assert!(!ok && stdout.contains("s3://sets/nothing/: contains no images"), "{stdout}");
    let (ok, stdout, _) = run_dlsr(&["-q", "score", "--model", bundle, "s3://no-such-bucket/x/"], &env);
    assert!(!ok && stdout.contains("no-such-bucket") && stdout.contains("unreadable"), "{stdout}");
}

#[test]
fn publish_as_reference_sends_json_events_the_daemon_resolves() {
    set_s3_credentials();
    let moto = Moto::start();
    moto.create_bucket("demo");
    let objects: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("day/{i}.png"), png(i * 40))).collect();
    moto.upload("demo", &objects);
    let tansu =
        crate::broker::Tansu::start_with(&[("images", 1), ("dlsr-verdicts", 1), ("dlsr-dead-letters", 1)]);
    let b = tansu.brokers.clone();
    let (ok, stdout, stderr) = run_dlsr(
        &["publish", "--brokers", &b, "--topic", "images", "--as-reference", "s3://demo/day/"],
        &moto.env(),
    );
    assert!(ok && stdout.contains("published 5 of 5"), "{stdout}{stderr}");
    let mut cfg = config(&b, "published-refs");
    cfg.kafka.input_topics = vec!["images".into()];
    cfg.input.object_store.endpoint = moto.endpoint.clone();
    cfg.input.object_store.allow_http = true;
    let daemon = start(cfg, Behaviour::default());
    let outputs = read_outputs(&b, "published-refs-reader", 5, Duration::from_secs(60));
    let ids: Vec<&str> = outputs.keys().map(String::as_str).collect();
    assert_eq!(ids, ["0.png", "1.png", "2.png", "3.png", "4.png"]);
    for (key, out) in &outputs {
        assert_eq!(out.topic, "dlsr-verdicts", "{key}: {out:?}");
        assert_eq!(json_value(out)["source"]["uri"], format!("s3://demo/day/{key}"));
    }
    daemon.stop().unwrap();
}
