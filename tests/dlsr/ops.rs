//! The operations kit: the alert rules under promtool (check and unit tests, and a
//! changed parameter must break them), the Grafana dashboard's structure, a live
//! Prometheus scraping the real daemon through an OOD burst, and the Docker files as far
//! as they can be checked without a Docker engine.

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use dlsr::stream::daemon::Control;
use serde_json::Value;

use crate::common::{free_port, http_get, wait_until};
use crate::stream::{cluster, config, publish, start};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool scripts/setup-ops-tools.sh installs, by its path under `.deps` (or $DLSR_DEPS).
fn ops_tool(rel: &str) -> PathBuf {
    let deps = std::env::var_os("DLSR_DEPS").map(PathBuf::from).unwrap_or_else(|| root().join(".deps"));
    let path = deps.join(rel);
    assert!(path.exists(), "{} is missing: run scripts/setup-ops-tools.sh", path.display());
    path
}

fn prometheus_tool(name: &str) -> PathBuf {
    ops_tool(&format!("prometheus/bin/{name}"))
}

fn rules_dir() -> PathBuf {
    root().join("dashboards/prometheus")
}

/// Runs `promtool test rules` on the shipped tests against `rules` (a rule file's text).
fn promtool_test_rules(rules: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dlsr-rules.yml"), rules).unwrap();
    std::fs::copy(rules_dir().join("dlsr-rules.test.yml"), dir.path().join("dlsr-rules.test.yml")).unwrap();
    let out = Command::new(prometheus_tool("promtool"))
        .args(["test", "rules", "dlsr-rules.test.yml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn alert_names(rules: &str) -> BTreeSet<String> {
    rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(|s| s.trim().to_string()).collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_every_alert_has_fire_and_no_fire_cases() {
    let check = Command::new(prometheus_tool("promtool"))
        .arg("check")
        .arg("config")
        .arg(rules_dir().join("prometheus.yml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "promtool check: {}", String::from_utf8_lossy(&check.stdout));

    let rules = std::fs::read_to_string(rules_dir().join("dlsr-rules.yml")).unwrap();
    let (ok, out) = promtool_test_rules(&rules);
    assert!(ok && out.contains("SUCCESS"), "promtool test rules failed:\n{out}");

    // Every alert appears in the tests both with expected alerts and with none.
    let tests: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(rules_dir().join("dlsr-rules.test.yml")).unwrap())
            .unwrap();
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in tests["tests"].as_sequence().unwrap() {
        for case in t["alert_rule_test"].as_sequence().unwrap() {
            let name = case["alertname"].as_str().unwrap().to_string();
            if case["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()) {
                fires.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    let alerts = alert_names(&rules);
    assert!(alerts.len() >= 7, "{alerts:?}");
    for a in &alerts {
        assert!(fires.contains(a), "{a} has no firing case");
        assert!(silent.contains(a), "{a} has no silent case");
        let anchor = format!("## {a}");
        let runbook = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
        assert!(runbook.contains(&anchor), "docs/operations.md has no section {anchor:?}");
    }
}

#[test]
fn the_rule_tests_catch_a_changed_parameter() {
    let rules = std::fs::read_to_string(rules_dir().join("dlsr-rules.yml")).unwrap();
    for (from, to) in [
        (
            "record: dlsr:alert_param:ood_rate_factor\n        expr: vector(3)",
            "record: dlsr:alert_param:ood_rate_factor\n        expr: vector(30)",
        ),
        (
            "record: dlsr:alert_param:dead_letter_ratio\n        expr: vector(0.01)",
            "record: dlsr:alert_param:dead_letter_ratio\n        expr: vector(0.5)",
        ),
    ] {
        assert!(rules.contains(from), "rule file changed shape: {from:?} not found");
        let (ok, out) = promtool_test_rules(&rules.replace(from, to));
        assert!(!ok, "rule tests still pass with {to:?}:\n{out}");
    }
}

/// Every panel of the dashboard with its PromQL expressions.
fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("dashboards/dlsr.json")).unwrap()).unwrap()
}

fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

fn expressions(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or_default().to_string()))
        })
        .collect()
}

#[test]
fn dashboard_is_provisioning_ready() {
    let d = dashboard();
    assert_eq!(d["uid"], "dlsr-ood-stream");
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no ${name}"));
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert!(var("topic")["query"]["query"].as_str().unwrap().contains("topic"));
    assert_eq!(var("topic")["datasource"]["uid"], "${datasource}");

    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let rules = std::fs::read_to_string(rules_dir().join("dlsr-rules.yml")).unwrap();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id at {title}");
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{title} is wider than the grid");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel at ({cx}, {cy})");
            }
        }
        if p["type"] == "row" {
            continue;
        }
        let what = p["description"].as_str().unwrap_or_default();
        assert!(what.len() >= 60, "{title}: the description must say what to read from it");
        if p["type"] != "alertlist" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
            assert!(!p["targets"].as_array().unwrap().is_empty(), "{title} has no query");
        }
    }
    for (title, expr) in expressions(&d) {
        assert!(!expr.is_empty(), "{title}: empty expression");
        // Recording rules the dashboard uses must exist in the rule file.
        for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
            if word.starts_with("dlsr:") {
                assert!(
                    rules.contains(&format!("record: {word}")),
                    "{title}: {word} is not a recording rule"
                );
            }
        }
    }
}

/// Type-checks a dashboard's JSON against Grafana's published `Dashboard` type
/// (@grafana/schema) with tsc. JSON cannot name a TypeScript enum member, so each string
/// enum is widened to the union of its literal values; everything else is checked as is.
fn tsc_check_dashboard(json: &str, name: &str) -> (bool, String) {
    let schema = ops_tool("grafana-schema");
    let tsc = ops_tool("grafana-schema/node_modules/typescript/bin/tsc");
    ops_tool("grafana-schema/node_modules/@grafana/schema/package.json");
    // Beside node_modules, so '@grafana/schema' resolves; a name per run and process.
    let file = schema.join(format!("check-{name}-{}.ts", std::process::id()));
    std::fs::write(
        &file,
        format!(
            "import type {{ Dashboard }} from '@grafana/schema';\n\
             type Json<T> = T extends string ? `${{T}}` : T extends (infer U)[] ? Json<U>[] : \
             T extends object ? {{ [K in keyof T]: Json<T[K]> }} : T;\n\
             export const dashboard: Json<Dashboard> = {json};\n"
        ),
    )
    .unwrap();
    let out = Command::new("node")
        .arg(tsc)
        .args(["--noEmit", "--strict", "--skipLibCheck", "--target", "es2022"])
        .args(["--module", "nodenext", "--moduleResolution", "nodenext"])
        .arg(&file)
        .output()
        .expect("node must be installed (scripts/setup-ops-tools.sh)");
    let _ = std::fs::remove_file(&file);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn dashboard_type_checks_against_grafanas_published_schema() {
    let text = std::fs::read_to_string(root().join("dashboards/dlsr.json")).unwrap();
    let (ok, out) = tsc_check_dashboard(&text, "dlsr");
    assert!(ok, "dashboards/dlsr.json does not fit Grafana's Dashboard type:\n{out}");
    // The check can fail: a width that is not a number, a variable without its value.
    let mut broken: Value = serde_json::from_str(&text).unwrap();
    broken["panels"][1]["gridPos"]["w"] = Value::from("twelve");
    let (ok, out) = tsc_check_dashboard(&broken.to_string(), "bad-width");
    assert!(!ok && out.contains("TS2322"), "a string width must be refused:\n{out}");
    let mut broken: Value = serde_json::from_str(&text).unwrap();
    broken["templating"]["list"][0]["current"] = serde_json::json!({});
    let (ok, out) = tsc_check_dashboard(&broken.to_string(), "bad-current");
    assert!(!ok && out.contains("text, value"), "an empty current must be refused:\n{out}");
}

// --- live Prometheus -----------------------------------------------------------------

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET against Prometheus' HTTP API; the JSON body whatever the status code.
fn api(port: u16, path: &str) -> Value {
    let (status, body) = http_get(("127.0.0.1", port), path).unwrap();
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}), HTTP {status}: {body}"))
}

fn query(port: u16, expr: &str) -> Value {
    api(port, &format!("/api/v1/query?query={}", percent_encode(expr)))
}

fn scalar_of(v: &Value) -> Option<f64> {
    v["data"]["result"].as_array()?.first()?["value"][1].as_str()?.parse().ok()
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The project's scrape configuration, pointed at `target`, with 1 s scrape and rule
/// intervals so the test runs in seconds; everything else as shipped.
fn test_prometheus_config(target: &str, rules: &Path) -> String {
    let shipped = std::fs::read_to_string(rules_dir().join("prometheus.yml")).unwrap();
    let mut cfg = shipped.clone();
    for (from, to) in [
        ("\"dlsr:9464\"".to_string(), format!("\"{target}\"")),
        ("scrape_interval: 15s".to_string(), "scrape_interval: 1s".to_string()),
        ("evaluation_interval: 15s".to_string(), "evaluation_interval: 1s".to_string()),
        ("- dlsr-rules.yml".to_string(), format!("- {}", rules.display())),
    ] {
        assert!(cfg.contains(&from), "prometheus.yml changed shape: {from:?} not found");
        cfg = cfg.replace(&from, &to);
    }
    cfg
}

fn alert_states(port: u16, name: &str) -> Vec<String> {
    api(port, "/api/v1/alerts")["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["labels"]["alertname"] == name)
        .map(|a| a["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn live_prometheus_scrapes_the_daemon_raises_the_drift_alert_and_evaluates_every_dashboard_query() {
    let (_cluster, brokers) = cluster();
    let control = Control::default();
    // Windows of 100 items, so that the window audit's panels have data from this stream.
    let mut cfg = config(&brokers, "g-ops");
    cfg.audit.window_items = 100;
    cfg.audit.min_items = 50;
    let (handle, _metrics) = start(cfg, control.clone(), None);
    wait_until("the metrics listener", Duration::from_secs(60), || {
        control.http_addr.lock().map(|a| a.is_some()).unwrap_or(false)
    });
    let target = control.http_addr.lock().unwrap().unwrap().to_string();

    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("prometheus.yml");
    std::fs::write(&cfg_path, test_prometheus_config(&target, &rules_dir().join("dlsr-rules.yml"))).unwrap();
    let port = free_port();
    let _prometheus = KillOnDrop(
        Command::new(prometheus_tool("prometheus"))
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    // Prometheus accepts connections before it is ready (503 while its storage opens).
    wait_until("Prometheus to be ready", Duration::from_secs(60), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
            && http_get(("127.0.0.1", port), "/-/ready").map(|(s, _)| s == 200).unwrap_or(false)
    });
    wait_until("Prometheus to scrape the daemon", Duration::from_secs(60), || {
        scalar_of(&query(port, r#"up{job="dlsr"}"#)) == Some(1.0)
    });

    // In-distribution traffic (and a few corrupt messages): no drift alarm.
    let id_items = publish(&brokers, 150, 300, 0, true).len();
    wait_until("the ID phase to be scraped", Duration::from_secs(120), || {
        let consumed = scalar_of(&query(port, "sum(dlsr_messages_consumed_total)"));
        consumed == Some(id_items as f64) && scalar_of(&query(port, "dlsr:ood_ratio:rate10m")).is_some()
    });
    std::thread::sleep(Duration::from_secs(3)); // a few rule evaluations on the final counts
    let id_ratio = scalar_of(&query(port, "dlsr:ood_ratio:rate10m")).unwrap();
    let alert_line = scalar_of(&query(
        port,
        "max(dlsr_threshold_id_fpr) * scalar(dlsr:alert_param:ood_rate_factor) + scalar(dlsr:alert_param:ood_rate_margin)",
    ))
    .unwrap();
    assert!(id_ratio < alert_line, "ID traffic alone is over the alert line: {id_ratio} >= {alert_line}");
    assert!(alert_states(port, "DlsrOodRateHigh").is_empty(), "drift alarm on in-distribution traffic");

    // An OOD burst: the drift alert goes pending (its `for:` is 10 minutes).
    let ood_items = publish(&brokers, 0, 0, 300, false).len();
    wait_until("DlsrOodRateHigh to go pending or firing", Duration::from_secs(180), || {
        alert_states(port, "DlsrOodRateHigh").iter().any(|s| s == "pending" || s == "firing")
    });
    wait_until("every message to be scraped", Duration::from_secs(60), || {
        scalar_of(&query(port, "sum(dlsr_messages_consumed_total)")) == Some((id_items + ood_items) as f64)
    });
    std::thread::sleep(Duration::from_secs(6)); // the lag gauge updates every 5 s

    // Every dashboard query evaluates, and returns data unless its metric only exists
    // after an event this stream does not cause.
    let kinds = query(port, "group by (kind) (dlsr_threshold)");
    let kind = kinds["data"]["result"][0]["metric"]["kind"].as_str().expect("no score kind").to_string();
    let event_only = ["dlsr_delivery_errors_total", "dlsr_config_reloads_total", "dlsr_fetch_seconds"];
    let d = dashboard();
    let mut checked = 0;
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(def) = v["query"]["query"].as_str() {
            let (metric, label) = def
                .trim_start_matches("label_values(")
                .trim_end_matches(')')
                .split_once(", ")
                .expect("label_values(metric, label)");
            let r = query(port, &format!("group by ({label}) ({metric})"));
            assert!(!r["data"]["result"].as_array().unwrap().is_empty(), "variable {def} has no values");
        }
    }
    for (title, expr) in expressions(&d) {
        let concrete = expr.replace("$__rate_interval", "1m").replace("$topic", ".*").replace("$kind", &kind);
        assert!(!concrete.contains('$'), "{title}: unknown variable in {expr}");
        let r = query(port, &concrete);
        assert_eq!(r["status"], "success", "{title}: {expr} -> {r}");
        if !event_only.iter().any(|m| expr.contains(m)) {
            let n = r["data"]["result"].as_array().map_or(0, |a| a.len());
            assert!(n > 0, "{title}: {concrete} returned no data");
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} expressions");
    let grafana: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("docker/grafana/provisioning/alerting/dlsr.yml")).unwrap(),
    )
    .unwrap();
    let expr = grafana["groups"][0]["rules"][0]["data"][0]["model"]["expr"].as_str().unwrap();
    assert_eq!(query(port, expr)["status"], "success", "Grafana alert rule: {expr}");

    control.shutdown.store(true, Ordering::Relaxed);
    handle.join().unwrap();
}

// --- Docker (no engine here: lint and structure) ---------------------------------------

fn docker_file(rel: &str) -> String {
    std::fs::read_to_string(root().join("docker").join(rel)).unwrap_or_else(|e| panic!("docker/{rel}: {e}"))
}

fn yaml(rel: &str) -> serde_yaml::Value {
    serde_yaml::from_str(&docker_file(rel)).unwrap_or_else(|e| panic!("docker/{rel}: {e}"))
}

/// The Dockerfile's stages: name -> its instruction lines (continuations joined).
fn dockerfile_stages() -> Vec<(String, Vec<String>)> {
    let text = docker_file("Dockerfile").replace("\\\n", " ");
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(from) = line.strip_prefix("FROM ") {
            let name = from.split(" AS ").nth(1).expect("every stage is named").trim().to_string();
            stages.push((name, Vec::new()));
        } else if let Some((_, lines)) = stages.last_mut() {
            lines.push(line.to_string());
        }
    }
    stages
}

#[test]
fn dockerfile_passes_hadolint_and_its_runtime_is_non_root_with_a_health_check() {
    let lint = Command::new(ops_tool("bin/hadolint")).arg(root().join("docker/Dockerfile")).output().unwrap();
    assert!(lint.status.success(), "hadolint:\n{}", String::from_utf8_lossy(&lint.stdout));

    let stages = dockerfile_stages();
    let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["build", "cpu-base", "cuda-base", "runtime"]);
    for (name, lines) in &stages {
        for l in lines.iter().filter(|l| l.starts_with("COPY --from=")) {
            let from = l["COPY --from=".len()..].split_whitespace().next().unwrap();
            assert!(names.contains(&from) && from != name, "{name}: COPY from unknown stage {from}");
        }
    }
    let runtime = &stages[3].1;
    let user = runtime.iter().find_map(|l| l.strip_prefix("USER ")).expect("runtime: no USER");
    assert!(!["root", "0"].contains(&user.trim()), "the runtime runs as root");
    assert!(
        runtime.iter().any(|l| l.starts_with("HEALTHCHECK") && l.contains("/healthz")),
        "no health check"
    );
    assert!(runtime.iter().any(|l| l == "ENTRYPOINT [\"dlsr\"]"), "entrypoint");
    // The runtime starts from `<RUNTIME>-base`; both bases exist.
    let from = docker_file("Dockerfile").lines().find(|l| l.ends_with(" AS runtime")).unwrap().to_string();
    assert_eq!(from, "FROM ${RUNTIME}-base AS runtime");
    // The CUDA base installs exactly the torch wheel setup-libtorch.sh pins by sha256.
    let setup = std::fs::read_to_string(root().join("scripts/setup-libtorch.sh")).unwrap();
    let wheel = "torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl";
    assert!(setup.contains(wheel));
    assert!(stages[2].1.iter().any(|l| l.contains("pip install") && l.contains(wheel)));
}

#[test]
fn compose_file_wires_kafka_dlsr_prometheus_and_grafana_together() {
    let compose = yaml("compose.yml");
    let services = compose["services"].as_mapping().unwrap();
    for s in ["kafka", "dlsr", "dlsr-gpu", "prometheus", "grafana"] {
        assert!(services.contains_key(s), "no service {s}");
    }
    assert!(!serde_yaml::to_string(&compose["services"]).unwrap().to_lowercase().contains("zookeeper"));
    let kafka = &compose["services"]["kafka"];
    assert!(
        kafka["environment"]["KAFKA_PROCESS_ROLES"].as_str().unwrap().contains("controller"),
        "not KRaft"
    );
    assert!(kafka["healthcheck"]["test"].is_sequence());

    // Every bind mount's host side exists in the repository.
    let mut mounts = Vec::new();
    for (name, svc) in services {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let v = v.as_str().unwrap();
            let host = v.split(':').next().unwrap();
            if host.starts_with('.') {
                let path = root().join("docker").join(host);
                assert!(path.exists(), "{name:?}: mount source {host} does not exist");
                mounts.push((
                    name.as_str().unwrap().to_string(),
                    host.to_string(),
                    v.split(':').nth(1).unwrap().to_string(),
                ));
            }
        }
    }
    let mount = |svc: &str, host: &str| {
        mounts
            .iter()
            .find(|(s, h, _)| s == svc && h == host)
            .map(|(_, _, c)| c.clone())
            .unwrap_or_else(|| panic!("{svc} does not mount {host}"))
    };
    assert_eq!(mount("prometheus", "../dashboards/prometheus"), "/etc/prometheus");
    let dash_dir = mount("grafana", "../dashboards");
    assert_eq!(mount("grafana", "./grafana/provisioning"), "/etc/grafana/provisioning");
    assert_eq!(mount("dlsr", "./dlsr.toml"), "/etc/dlsr/dlsr.toml");
    let stages: Vec<String> = dockerfile_stages().into_iter().map(|(n, _)| n).collect();
    for (s, runtime) in [("dlsr", "cpu"), ("dlsr-gpu", "cuda")] {
        assert_eq!(compose["services"][s]["build"]["args"]["RUNTIME"], runtime, "{s}");
        assert!(stages.contains(&format!("{runtime}-base")), "{s}: no stage {runtime}-base");
    }

    // The daemon's compose config is valid, reaches the kafka service and listens where
    // Prometheus scrapes.
    let cfg = dlsr::config::Config::load(Some(&root().join("docker/dlsr.toml"))).expect("docker/dlsr.toml");
    cfg.validate().expect("docker/dlsr.toml validates");
    assert!(cfg.kafka.brokers.split(',').all(|b| b.starts_with("kafka:")), "{}", cfg.kafka.brokers);
    assert!(cfg.model.bundle.starts_with(mount("dlsr", "./models")));
    let port = cfg.metrics.listen.rsplit(':').next().unwrap().to_string();
    let prom = std::fs::read_to_string(rules_dir().join("prometheus.yml")).unwrap();
    assert!(prom.contains(&format!("\"dlsr:{port}\"")), "Prometheus does not scrape dlsr:{port}");

    // Grafana: the dashboards provider reads where the dashboards are mounted, and the
    // alert rule queries the provisioned datasource.
    let provider = yaml("grafana/provisioning/dashboards/dlsr.yml");
    assert_eq!(provider["providers"][0]["options"]["path"].as_str().unwrap(), dash_dir);
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let uid = ds["datasources"][0]["uid"].as_str().unwrap().to_string();
    assert_eq!(ds["datasources"][0]["url"], "http://prometheus:9090");
    let alerting = yaml("grafana/provisioning/alerting/dlsr.yml");
    let rule = &alerting["groups"][0]["rules"][0];
    assert_eq!(rule["data"][0]["datasourceUid"].as_str().unwrap(), uid);
    assert_eq!(alerting["policies"][0]["receiver"], alerting["contactPoints"][0]["name"]);
}

/// The capacity plan in docs/operations.md is computed from the benchmark's JSON: the
/// script's arithmetic (instances at the headroom, partitions, catch-up time) on the
/// committed figures.
#[test]
fn the_capacity_plan_follows_from_the_measured_rates() {
    let figures = root().join("docs/capacity/cpu-64.json");
    let rate = serde_json::from_str::<Value>(&std::fs::read_to_string(&figures).unwrap()).unwrap()
        ["daemon_msgs_per_s"]
        .as_f64()
        .unwrap();
    let out = Command::new("python3")
        .arg(root().join("scripts/capacity_plan.py"))
        .args(["--stream", "10000", "--headroom", "1.5", "--gpu", ""])
        .arg(format!("cpu-64={}", figures.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text.lines().find(|l| l.starts_with("| cpu-64 |")).unwrap_or_else(|| panic!("{text}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let instances = (15_000.0 / rate).ceil();
    assert_eq!(cells[4].replace(',', "").parse::<f64>().unwrap(), instances, "{row}");
    assert_eq!(cells[5].replace(',', "").parse::<f64>().unwrap(), 2.0 * instances, "{row}");
    // An hour's backlog over the spare capacity.
    let catch_up = 10_000.0 / (instances * rate - 10_000.0);
    let shown: f64 = cells[9].trim_end_matches(" h").parse().unwrap();
    assert!((shown - catch_up).abs() < 0.006, "{row}: {catch_up}");
    assert!(!text.contains("gpu-"), "{text}");
}
