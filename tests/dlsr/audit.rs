//! `dlsr audit` end to end: a mixed Fashion-MNIST + MNIST folder ranked with the digits on
//! top and called shifted, a plain Fashion-MNIST set called in distribution (with
//! `--compare`), the report rendered in headless Chromium and checked from its DOM (grid
//! size, headline numbers against summary.json, no network request), a topic range read
//! from the mock cluster by assignment, and an interrupted audit that leaves no report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use dlsr::data::DataSet;
use dlsr::stream::publish::item_bytes;
use serde_json::Value;

use crate::common::{asset, dlsr_bin};
use crate::model::fitted;

fn dlsr(args: &[&str], cache: &Path) -> (bool, String, String) {
    let out = Command::new(dlsr_bin()).args(args).env("DLSR_CACHE", cache).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spec(p: PathBuf) -> String {
    asset(p).to_string_lossy().into_owned()
}

/// Writes `count` items of `set` (from `skip`) as PNG files named `{prefix}-{i}.png`.
fn write_pngs(set: &str, skip: usize, count: usize, dir: &Path, prefix: &str) {
    let data = DataSet::open(set).unwrap();
    for i in skip..skip + count {
        let item = data.get(i).unwrap();
        std::fs::write(dir.join(format!("{prefix}-{i:05}.png")), item_bytes(&item).unwrap()).unwrap();
    }
}

/// 1800 Fashion-MNIST test images, 200 MNIST digits and one broken file.
fn mixed_folder(root: &Path) -> PathBuf {
    let dir = root.join("mixed");
    std::fs::create_dir_all(&dir).unwrap();
    write_pngs(&spec(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz")), 0, 1800, &dir, "fmnist");
    write_pngs(&spec(dlsr::assets::mnist_5k()), 0, 200, &dir, "mnist");
    std::fs::write(dir.join("broken.png"), b"\x89PNG\r\n\x1a\nnot a png").unwrap();
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

fn items(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn chromium() -> PathBuf {
    let path =
        std::env::var_os("DLSR_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup-ops-tools.sh (installs Debian's chromium)",
        path.display()
    );
    path
}

/// Renders `page` headless: (DOM after load, network log), and a screenshot to `shot`.
fn render(page: &Path, work: &Path, shot: &Path) -> (String, String) {
    let netlog = work.join("netlog.json");
    let base = |profile: &str| {
        let mut c = Command::new(chromium());
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", work.join(profile).display()));
        c
    };
    let url = format!("file://{}", page.display());
    let dom = base("dom")
        .arg(format!("--log-net-log={}", netlog.display()))
        .arg("--net-log-capture-mode=Everything")
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    assert!(dom.status.success(), "chromium failed: {}", String::from_utf8_lossy(&dom.stderr));
    let shot_run = base("shot")
        .arg("--window-size=1400,2600")
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        shot_run.status.success() && shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&shot_run.stderr)
    );
    (String::from_utf8_lossy(&dom.stdout).into_owned(), std::fs::read_to_string(&netlog).unwrap_or_default())
}

/// The http(s) URLs a `file://` page requested, from Chromium's network log.
fn page_requests(netlog: &str) -> Vec<String> {
    let log: Value = serde_json::from_str(netlog).unwrap_or_else(|e| panic!("unreadable network log: {e}"));
    log["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let p = &e["params"];
            let url = p["url"].as_str()?;
            let key = p["network_isolation_key"].as_str()?;
            (url.starts_with("http") && key.starts_with("file://")).then(|| url.to_string())
        })
        .collect()
}

/// The `data-value` of the headline element `field` of set `set` in a DOM dump.
fn headline_value(dom: &str, set: usize, field: &str) -> String {
    let start = dom.find(&format!("data-set=\"{set}\"")).expect("headline of the set");
    let rest = &dom[start..];
    let marker = format!("data-field=\"{field}\" data-value=\"");
    let at = rest.find(&marker).unwrap_or_else(|| panic!("no headline field {field}")) + marker.len();
    rest[at..at + rest[at..].find('"').unwrap()].to_string()
}

/// Where test artefacts are kept (the screenshot of the report).
fn artefacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artefacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn mixed_set_puts_the_digits_on_top_and_the_report_renders_its_numbers() {
    let f = fitted();
    let work = tempfile::tempdir().unwrap();
    let folder = mixed_folder(work.path());
    let out = work.path().join("report");
    // MSE: on this CI-sized fit (300 held-out items) the default MFsim over all five layers
    // puts exactly 90 digits in the top 100, too close to the bound to test on; issue #12
    // chooses the default layers.
    let (ok, stdout, stderr) = dlsr(
        &[
            "-q",
            "audit",
            "--model",
            f.bundle.to_str().unwrap(),
            folder.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--score-kind",
            "mse",
            "--title",
            "mixed <test> set",
        ],
        &work.path().join("cache"),
    );
    assert!(ok, "audit failed: {stderr}");
    assert!(stdout.contains("shifted") && stdout.contains("1 skipped undecodable=1"), "{stdout}");
    // The skipped file is logged as a warning, without colour codes off a terminal.
    assert!(stderr.contains("broken.png") && !stderr.contains('\u{1b}'), "{stderr:?}");

    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["items"], 2000);
    assert_eq!(summary["skipped"], serde_json::json!({"undecodable": 1}));
    assert_eq!(summary["verdict"], "shifted");
    assert_eq!(summary["score_kind"], "mse");
    let (n, k) = (summary["items"].as_f64().unwrap(), summary["flagged"].as_f64().unwrap());
    assert!((summary["flagged_rate"].as_f64().unwrap() - k / n).abs() < 1e-12);
    assert!(summary["p_value"].as_f64().unwrap() < 1e-6);
    assert!(summary["expected_rate"].as_f64().unwrap() > 0.0);
    assert!(!summary["groups"].as_array().unwrap().is_empty());

    let ranked = items(&out.join("items.jsonl"));
    assert_eq!(ranked.len(), 2000);
    for (i, item) in ranked.iter().enumerate() {
        assert_eq!(item["rank"], i + 1);
        if i > 0 {
            assert!(
                item["score"].as_f64() <= ranked[i - 1]["score"].as_f64(),
                "not sorted at rank {}",
                i + 1
            );
        }
        assert_eq!(item["score"], item["scores"]["mse"]);
    }
    let digits = ranked[..100].iter().filter(|v| v["id"].as_str().unwrap().starts_with("mnist-")).count();
    assert!(digits >= 90, "{digits} digits in the top 100");
    let skipped = std::fs::read_to_string(out.join("skipped.jsonl")).unwrap();
    assert!(skipped.contains("broken.png") && skipped.contains("\"code\":\"undecodable\""), "{skipped}");
    // Nothing staged is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The page itself, as a browser renders it.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("mixed &lt;test&gt; set"), "the title must be escaped");
    let shot = artefacts().join("audit-report.png");
    let (dom, netlog) = render(&out.join("report.html"), work.path(), &shot);
    let top_grid = &dom[dom.find("id=\"top-0\"").expect("top grid")..];
    let top_grid = &top_grid[..top_grid.find("</div><h3>").unwrap()];
    assert_eq!(top_grid.matches("data-rank=").count(), 48, "the grid holds the default top 48");
    assert_eq!(top_grid.matches("src=\"data:image/png;base64,").count(), 48);
    assert!(dom.contains("id=\"score-distribution\""), "score plot missing");
    assert!(dom.contains("class=\"layers\""), "per-layer plot missing");
    for field in ["items", "flagged", "skipped"] {
        let want = match field {
            "skipped" => summary["skipped"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum(),
            f => summary[f].as_u64().unwrap(),
        };
        assert_eq!(headline_value(&dom, 0, field), want.to_string(), "{field}");
    }
    for field in ["flagged_rate", "expected_rate", "p_value"] {
        let shown: f64 = headline_value(&dom, 0, field).parse().unwrap();
        let want = summary[field].as_f64().unwrap();
        assert!((shown - want).abs() <= 1e-12 * want.abs().max(1e-300), "{field}: {shown} vs {want}");
    }
    assert_eq!(headline_value(&dom, 0, "verdict"), "shifted");
    // No request left the page. Chromium's own background requests are in the log too;
    // the page's are those whose network isolation key is the file:// page.
    assert!(page_requests(&netlog).is_empty(), "the report made requests: {:?}", page_requests(&netlog));
    // The check itself can fail: a page with an external image is caught.
    let control = work.path().join("control.html");
    std::fs::write(&control, "<html><body><img src=\"http://127.0.0.1:9/probe.png\"></body></html>").unwrap();
    let (_, control_log) = render(&control, work.path(), &work.path().join("control.png"));
    assert!(
        page_requests(&control_log).iter().any(|u| u.contains("probe.png")),
        "the network check missed a known request"
    );
    assert!(!html.contains("http://") && !html.contains("https://"), "external reference in the page");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.len() > 20_000, "screenshot nearly empty");
}

#[test]
fn plain_fashion_mnist_is_in_distribution_beside_a_shifted_compare_set() {
    let f = fitted();
    let work = tempfile::tempdir().unwrap();
    let folder = mixed_folder(work.path());
    let out = work.path().join("report");
    let plain = spec(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz"));
    let (ok, stdout, stderr) = dlsr(
        &[
            "-q",
            "audit",
            "--model",
            f.bundle.to_str().unwrap(),
            &plain,
            "--limit",
            "2000",
            "--top",
            "20",
            "--compare",
            folder.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &work.path().join("cache"),
    );
    assert!(ok, "audit failed: {stderr}");
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["items"], 2000);
    assert_eq!(summary["score_kind"], "mfsim");
    assert_eq!(summary["verdict"], "in_distribution", "{stdout}");
    assert!(summary["p_value"].as_f64().unwrap() >= dlsr::audit::SIGNIFICANCE);
    let compare = &summary["compare"];
    // --limit counts the items read: the folder's first 2000 files hold the broken one.
    assert_eq!(compare["items"], 1999);
    assert_eq!(compare["verdict"], "shifted", "{stdout}");
    assert!(compare["flagged"].as_u64() > summary["flagged"].as_u64());
    assert_eq!(items(&out.join("compare-items.jsonl")).len(), 1999);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("id=\"top-0\" data-count=\"20\"") && html.contains("id=\"top-1\" data-count=\"20\"")
    );
}

#[test]
fn a_topic_range_is_read_by_assignment_with_the_daemons_error_codes() {
    let f = fitted();
    let (_cluster, brokers) = crate::stream::cluster();
    // 24 Fashion-MNIST images, 6 digits and the four corrupt messages, over 3 partitions.
    let keys = crate::stream::publish(&brokers, 24, 0, 6, true);
    assert_eq!(keys.len(), 34);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("topic");
    let run = |extra: &[&str]| {
        let mut args =
            vec!["-q", "audit", "--model", f.bundle.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend_from_slice(&["--from-topic", "images", "--brokers", &brokers]);
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = dlsr(&args, &work.path().join("cache"));
        assert!(ok, "audit failed: {stderr}");
        (read_json(&out.join("summary.json")), stdout)
    };
    let (summary, _) = run(&[]);
    assert_eq!(summary["items"], 30);
    let skipped: BTreeMap<String, u64> = serde_json::from_value(summary["skipped"].clone()).unwrap();
    assert_eq!(
        skipped,
        BTreeMap::from([
            ("empty".to_string(), 1),
            ("too_large".to_string(), 1),
            ("undecodable".to_string(), 1),
            ("unsupported_format".to_string(), 1)
        ])
    );
    let partitions = summary["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3);
    let read: u64 = partitions.iter().map(|p| p["read"].as_u64().unwrap()).sum();
    assert_eq!(read, 34);
    let ranked = items(&out.join("items.jsonl"));
    assert_eq!(ranked.len(), 30);
    assert!(ranked.iter().all(|v| v["source"]["topic"] == "images" && v["source"]["offset"].is_i64()));
    let mut ids: Vec<&str> = ranked.iter().map(|v| v["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut want: Vec<&str> =
        keys.iter().map(String::as_str).filter(|k| !k.starts_with("corrupt/")).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    let dead = std::fs::read_to_string(out.join("skipped.jsonl")).unwrap();
    assert!(dead.contains("corrupt/bomb.png") && dead.contains("\"partition\""), "{dead}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("topic images") && html.contains("<th>partition</th>"));

    // From offset 2 in every partition: two messages fewer per partition.
    let (later, _) = run(&["--from-offset", "2"]);
    let read_later: u64 =
        later["partitions"].as_array().unwrap().iter().map(|p| p["read"].as_u64().unwrap()).sum();
    assert_eq!(read_later, 34 - 6);
    assert!(later["partitions"].as_array().unwrap().iter().all(|p| p["start"].as_i64().unwrap() == 2));
    // Nothing was committed under the audit's group id.
    let committed = crate::common::committed(&brokers, "dlsr-audit");
    assert!(committed.values().all(Option::is_none), "{committed:?}");
}

#[test]
fn an_unknown_topic_and_an_interrupted_audit_leave_no_report() {
    let f = fitted();
    let work = tempfile::tempdir().unwrap();
    let (_cluster, brokers) = crate::stream::cluster();
    let out = work.path().join("none");
    let (ok, _, stderr) = dlsr(
        &[
            "-q",
            "audit",
            "--model",
            f.bundle.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--from-topic",
            "no-such-topic",
            "--brokers",
            &brokers,
            "--kafka-timeout",
            "5",
        ],
        &work.path().join("cache"),
    );
    assert!(!ok);
    assert!(stderr.contains("no-such-topic"), "{stderr}");
    assert!(!out.join("report.html").exists());

    // SIGINT while scoring 10k images: a clear error, no report, no staged files.
    let child = Command::new(dlsr_bin())
        .args(["-q", "audit", "--model", f.bundle.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .arg(spec(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz")))
        .env("DLSR_CACHE", work.path().join("cache"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(stderr.contains("interrupted; no report was written"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
