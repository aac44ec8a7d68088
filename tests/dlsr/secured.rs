//! A TLS broker (issue #21): a CA and a server certificate for `localhost` made here with
//! the openssl command, tansu behind a TLS-terminating proxy (`tests/fixtures/tls_proxy.py`;
//! tansu 0.6 cannot serve TLS itself: its `--cert` and `--key` exclude each other and
//! `--cert` alone leaves the listener plaintext). `publish`, `tail` and `serve` work with
//! the CA; without it, or with a host name the certificate does not name, each fails
//! fast with one line naming the cause and no retry flood.
//!
//! SASL is not tested: tansu's `--authentication` needs users that none of the clients
//! here can create.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{dlsr_bin, free_port};

struct SecuredBroker {
    tansu: Child,
    proxy: Child,
    dir: tempfile::TempDir,
    /// The TLS port (the advertised listener, as `localhost:PORT`).
    port: u16,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("the openssl command");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl SecuredBroker {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=dlsr-test-ca",
            ],
        );
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        );
        std::fs::write(d.join("ext.cnf"), "subjectAltName=DNS:localhost\n").unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "1",
                "-extfile",
                "ext.cnf",
            ],
        );
        let (plain, port) = (free_port(), free_port());
        let tansu = crate::broker::spawn_tansu(
            &format!("tcp://127.0.0.1:{plain}"),
            &format!("tcp://localhost:{port}"),
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls_proxy.py");
        let mut proxy = Command::new("python3")
            .arg(script)
            .args([port.to_string(), plain.to_string()])
            .arg(d.join("server.pem"))
            .arg(d.join("server.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(proxy.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the TLS proxy did not start");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", plain)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "tansu did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { tansu, proxy, dir, port }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn tls_args(&self, ca: bool) -> Vec<String> {
        let mut args = vec!["-X".to_string(), "security.protocol=ssl".to_string()];
        if ca {
            args.extend(["-X".to_string(), format!("ssl.ca.location={}", self.ca().display())]);
        }
        args
    }
}

impl Drop for SecuredBroker {
    fn drop(&mut self) {
        for c in [&mut self.tansu, &mut self.proxy] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs dlsr; (exit code, stderr, seconds taken).
fn dlsr(args: &[String]) -> (i32, String, f64) {
    let started = Instant::now();
    let out = Command::new(dlsr_bin()).args(args).stdin(Stdio::null()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed().as_secs_f64(),
    )
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A failure that names its cause once and does not flood.
fn assert_fails_with_the_cause(what: &str, (code, stderr, secs): (i32, String, f64)) {
    assert_eq!(code, 1, "{what}: exit code; stderr: {stderr}");
    assert!(secs < 30.0, "{what}: took {secs:.0} s");
    let causes = stderr.matches("certificate verify failed").count();
    assert!(causes >= 1, "{what}: the cause is not named: {stderr}");
    // No flood: a handful of distinct lines (librdkafka may say the cause twice in
    // different words, in either order), none repeated.
    let lines: Vec<&str> = stderr.lines().map(|l| l.split_once("Z ").map_or(l, |(_, rest)| rest)).collect();
    let distinct: std::collections::BTreeSet<&str> = lines.iter().copied().collect();
    assert!(
        lines.len() <= 6 && distinct.len() == lines.len() && causes <= 2,
        "{what}: a retry flood: {stderr}"
    );
}

#[test]
fn publish_and_tail_work_over_tls_with_the_ca_and_fail_fast_naming_the_cause_without_it() {
    let broker = SecuredBroker::start();
    let image = crate::common::asset(dlsr::assets::foolbox_dir()).join("cifar100_00_49.png");
    let brokers = format!("localhost:{}", broker.port);
    let publish = |brokers: &str, ca: bool| {
        let mut args = strings(&[
            "publish",
            "--brokers",
            brokers,
            "--topic",
            "secured",
            "--partitions",
            "1",
            "--timeout",
            "5",
        ]);
        args.extend(broker.tls_args(ca));
        args.push(image.display().to_string());
        dlsr(&args)
    };
    let (code, stderr, _) = publish(&brokers, true);
    assert_eq!(code, 0, "publish with the CA: {stderr}");

    let mut tail = strings(&["tail", "--brokers", &brokers, "--topic", "secured", "--timeout", "5"]);
    tail.extend(broker.tls_args(true));
    let (code, stderr, _) = dlsr(&tail);
    assert_eq!(code, 0, "tail with the CA: {stderr}");
    assert!(stderr.contains("1 record"), "{stderr}");

    assert_fails_with_the_cause("publish without the CA", publish(&brokers, false));
    // The certificate names localhost, not 127.0.0.1.
    assert_fails_with_the_cause(
        "publish to a host name the certificate does not name",
        publish(&format!("127.0.0.1:{}", broker.port), true),
    );
    let mut tail = strings(&["tail", "--brokers", &brokers, "--topic", "secured", "--timeout", "5"]);
    tail.extend(broker.tls_args(false));
    assert_fails_with_the_cause("tail without the CA", dlsr(&tail));
}

#[test]
fn serve_and_audit_connect_over_tls_with_the_ca_and_without_it_stop_at_once_naming_the_cause() {
    let broker = SecuredBroker::start();
    let bundle = crate::model::fitted().bundle.clone();
    let config = |ca: Option<&Path>, port: u16| {
        let path = broker.dir.path().join(format!("serve-{}.toml", ca.is_some()));
        let ca_line = ca.map_or(String::new(), |p| format!("ssl_ca_location = \"{}\"\n", p.display()));
        std::fs::write(
            &path,
            format!(
                "[kafka]\nbrokers = \"localhost:{}\"\ngroup_id = \"secured\"\n[kafka.security]\nprotocol = \"ssl\"\n{ca_line}\
                 [model]\nbundle = \"{}\"\ndevice = \"cpu\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
                broker.port,
                bundle.display()
            ),
        )
        .unwrap();
        path
    };
    let (code, stderr, secs) = dlsr(&strings(&["serve", "--config", config(None, 0).to_str().unwrap()]));
    assert_ne!(code, 0, "serve without the CA must not run: {stderr}");
    assert!(secs < 30.0, "took {secs:.0} s");
    assert!(stderr.contains("certificate verify failed"), "the cause is not named: {stderr}");
    assert!(stderr.matches("certificate verify failed").count() <= 2, "a retry flood: {stderr}");

    let image = crate::common::asset(dlsr::assets::foolbox_dir()).join("cifar100_00_49.png");
    let mut publish =
        strings(&["publish", "--brokers", &format!("localhost:{}", broker.port), "--topic", "images"]);
    publish.extend(strings(&["--partitions", "3", "--timeout", "5"]));
    publish.extend(broker.tls_args(true));
    publish.push(image.display().to_string());
    let (code, stderr, _) = dlsr(&publish);
    assert_eq!(code, 0, "{stderr}");
    // audit --from-topic reads the topic over TLS with the CA, and names the cause without it.
    let audit = |ca: bool| {
        let out = broker.dir.path().join(format!("audit-{ca}"));
        let mut args = strings(&["audit", "--model", bundle.to_str().unwrap(), "--device", "cpu", "-q"]);
        args.extend(strings(&["--from-topic", "images", "--brokers", &format!("localhost:{}", broker.port)]));
        args.extend(strings(&["--kafka-timeout", "5", "--out", out.to_str().unwrap()]));
        args.extend(["--kafka-property".to_string(), "security.protocol=ssl".to_string()]);
        if ca {
            args.extend([
                "--kafka-property".to_string(),
                format!("ssl.ca.location={}", broker.ca().display()),
            ]);
        }
        (dlsr(&args), out)
    };
    let ((code, stderr, _), out) = audit(true);
    assert_eq!(code, 0, "audit with the CA: {stderr}");
    assert!(out.join("report.html").exists());
    let ((code, stderr, secs), _) = audit(false);
    assert_ne!(code, 0, "audit without the CA: {stderr}");
    assert!(secs < 30.0 && stderr.contains("certificate verify failed"), "{secs:.0} s: {stderr}");
    assert!(stderr.matches("certificate verify failed").count() <= 2, "a retry flood: {stderr}");

    let port = free_port();
    let mut daemon = Command::new(dlsr_bin())
        .args(["serve", "--config", config(Some(&broker.ca()), port).to_str().unwrap()])
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut ready = (0, String::new());
    while started.elapsed() < Duration::from_secs(60) && ready.0 != 200 {
        std::thread::sleep(Duration::from_millis(300));
        ready = crate::common::http_get(("127.0.0.1", port), "/readyz").unwrap_or((0, String::new()));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    // Ready: the brokers answered over TLS and the group assigned the partitions.
    assert_eq!(ready.0, 200, "{ready:?}");
}
