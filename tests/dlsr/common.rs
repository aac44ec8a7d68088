//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// An installed asset; panics with the fix when it is missing.
pub fn asset(path: PathBuf) -> PathBuf {
    assert!(path.exists(), "{} is missing: run scripts/fetch-assets.sh (or set DLSR_ASSETS)", path.display());
    path
}

/// The 20 labelled ImageNet photos from foolbox: (path, class index from the file name).
pub fn imagenet_photos() -> Vec<(PathBuf, i64)> {
    asset(dlsr::assets::foolbox_dir());
    let photos = dlsr::assets::imagenet_photos().unwrap();
    assert_eq!(photos.len(), 20);
    photos
}

pub fn dlsr_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dlsr"))
}

/// A plain HTTP/1.0 GET: (status code, body). HTTP/1.0 so the server closes the
/// connection and never chunks the body.
pub fn http_get(addr: impl std::net::ToSocketAddrs, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Polls `ok` until it holds; fails the test after `timeout`, naming what it waited for.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut ok: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !ok() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// librdkafka's in-process mock cluster with the daemon's default topics (`images` with
/// three partitions, the verdict and dead-letter topics): (cluster, bootstrap servers).
pub fn mock_cluster(
) -> (rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>, String) {
    let c = rdkafka::mocking::MockCluster::new(1).unwrap();
    c.create_topic("images", 3, 1).unwrap();
    c.create_topic("dlsr-verdicts", 1, 1).unwrap();
    c.create_topic("dlsr-dead-letters", 1, 1).unwrap();
    let b = c.bootstrap_servers();
    (c, b)
}

/// A consumer of the daemon's outputs (verdicts and dead letters) from the beginning.
pub fn output_reader(brokers: &str, group: &str) -> rdkafka::consumer::BaseConsumer {
    use rdkafka::consumer::Consumer;
    let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&["dlsr-verdicts", "dlsr-dead-letters"]).unwrap();
    c
}

/// The group's committed offset of each `images` partition (None: nothing committed).
pub fn committed(brokers: &str, group: &str) -> std::collections::BTreeMap<i32, Option<i64>> {
    use rdkafka::consumer::Consumer;
    let probe: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition("images", p);
    }
    let got = probe.committed_offsets(tpl, std::time::Duration::from_secs(10)).unwrap();
    got.elements()
        .iter()
        .map(|e| (e.partition(), if let rdkafka::Offset::Offset(o) = e.offset() { Some(o) } else { None }))
        .collect()
}

/// The daemon's outputs read from the beginning into a map by key, `entry` making each
/// value, until `n` keys are there or `timeout` passes.
pub fn read_outputs_by_key<T>(
    brokers: &str,
    group: &str,
    n: usize,
    timeout: std::time::Duration,
    mut entry: impl FnMut(&rdkafka::message::BorrowedMessage<'_>, &dyn Fn(&str) -> Option<String>) -> (String, T),
) -> std::collections::BTreeMap<String, T> {
    use rdkafka::consumer::Consumer;
    let reader = output_reader(brokers, group);
    let mut out = std::collections::BTreeMap::new();
    let started = std::time::Instant::now();
    while out.len() < n && started.elapsed() < timeout {
        let Some(Ok(m)) = reader.poll(std::time::Duration::from_millis(200)) else { continue };
        let hs = dlsr::kafka::headers::read(&m);
        let text =
            |k: &str| dlsr::kafka::headers::find(&hs, k).map(|c| String::from_utf8_lossy(c).into_owned());
        let (key, value) = entry(&m, &text);
        out.insert(key, value);
    }
    let _ = reader.unsubscribe();
    out
}
