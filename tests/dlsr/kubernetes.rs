//! The Kubernetes files (issue #24): both overlays render with `kubectl kustomize`, every
//! rendered object validates against the Kubernetes schemas (kubernetes-validate,
//! strict) and the custom resources against their published schemas (kubernetes-models);
//! the ConfigMap and the PrometheusRule are the project's own config and rules file, not
//! copies that drifted; the StatefulSet keeps what the daemon relies on (static
//! membership from the pod name, probes, a grace period above the drain deadline).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deps() -> PathBuf {
    std::env::var_os("DLSR_DEPS").map(PathBuf::from).unwrap_or_else(|| root().join(".deps"))
}

/// `kubectl kustomize OVERLAY`: the rendered YAML, and its objects.
fn render(overlay: &str) -> (String, Vec<Value>) {
    let dir = root().join("docker/kubernetes/overlays").join(overlay);
    let out = match Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "kubectl is needed to render docker/kubernetes ({e}); it comes with the machine image \
             (scripts/setup-k8s-tools.sh checks for it)"
        ),
    };
    assert!(out.status.success(), "kubectl kustomize {overlay}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let objects = serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect();
    (text, objects)
}

fn object<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn env_of(container: &Value, name: &str) -> Option<Value> {
    container["env"].as_sequence()?.iter().find(|e| e["name"] == name).cloned()
}

fn write_temp(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rendered.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn tool(path: &Path, setup: &str) -> PathBuf {
    assert!(path.exists(), "{} is missing: run {setup}", path.display());
    path.to_path_buf()
}

#[test]
fn both_overlays_render_and_validate_against_the_kubernetes_and_custom_resource_schemas() {
    let validate = tool(&deps().join("k8s-venv/bin/kubernetes-validate"), "scripts/setup-k8s-tools.sh");
    let schemas = tool(&deps().join("k8s-schema/node_modules"), "scripts/setup-k8s-tools.sh");
    for overlay in ["cpu", "gpu"] {
        let (text, objects) = render(overlay);
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        for kind in [
            "ConfigMap",
            "Service",
            "StatefulSet",
            "PodDisruptionBudget",
            "ServiceMonitor",
            "PrometheusRule",
            "ScaledObject",
        ] {
            assert!(kinds.contains(&kind), "{overlay}: no {kind} in {kinds:?}");
        }
        let (_dir, file) = write_temp(&text);
        let out = Command::new(&validate).args(["--strict", "--no-warn"]).arg(&file).output().unwrap();
        let report =
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{overlay}: kubernetes-validate:\n{report}");
        for built_in in ["configmap", "service", "statefulset", "poddisruptionbudget"] {
            assert!(
                report.contains(&format!("passed for resource {built_in}/")),
                "{overlay}: {built_in}:\n{report}"
            );
        }
        // kubernetes-validate has no schemas for custom resources: their own packages do.
        let script = root().join("docker/kubernetes/schema/validate-crds.mjs");
        let copy = schemas.parent().unwrap().join("validate-crds.mjs");
        std::fs::copy(&script, &copy).unwrap();
        let out =
            Command::new("node").arg(&copy).arg(&file).output().expect("node (scripts/setup-ops-tools.sh)");
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{overlay}: custom resources:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for kind in ["ServiceMonitor", "PrometheusRule", "ScaledObject"] {
            assert!(report.contains(&format!("valid {kind}/dlsr")), "{overlay}: {report}");
        }
    }
}

/// The validators must be able to say no: a wrong type in a built-in object and in a
/// custom resource.
#[test]
fn the_validators_reject_a_wrong_field() {
    let validate = tool(&deps().join("k8s-venv/bin/kubernetes-validate"), "scripts/setup-k8s-tools.sh");
    let schemas = tool(&deps().join("k8s-schema/node_modules"), "scripts/setup-k8s-tools.sh");
    let (text, _) = render("cpu");
    let bad = text
        .replace("terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: soon")
        .replace("maxReplicaCount: 3", "maxReplicaCount: many");
    assert_ne!(bad, text);
    let (_dir, file) = write_temp(&bad);
    let out = Command::new(&validate).args(["--strict", "--no-warn"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("terminationGracePeriodSeconds"));
    let copy = schemas.parent().unwrap().join("validate-crds.mjs");
    std::fs::copy(root().join("docker/kubernetes/schema/validate-crds.mjs"), &copy).unwrap();
    let out = Command::new("node").arg(&copy).arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("INVALID ScaledObject/dlsr"));
}

#[test]
fn the_config_map_and_the_prometheus_rule_are_the_projects_own_files() {
    let check =
        Command::new("bash").arg(root().join("scripts/k8s-sources.sh")).arg("--check").output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    for overlay in ["cpu", "gpu"] {
        let (_, objects) = render(overlay);
        let config = object(&objects, "ConfigMap")["data"]["dlsr.toml"].as_str().unwrap().to_string();
        assert_eq!(config, std::fs::read_to_string(root().join("docker/dlsr.toml")).unwrap());
        let rules: Value = serde_yaml::from_str(
            &std::fs::read_to_string(root().join("dashboards/prometheus/dlsr-rules.yml")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            object(&objects, "PrometheusRule")["spec"],
            rules,
            "{overlay}: PrometheusRule vs dlsr-rules.yml"
        );
        // The StatefulSet mounts the generated ConfigMap under its hashed name.
        let name = object(&objects, "ConfigMap")["metadata"]["name"].as_str().unwrap().to_string();
        let volumes = &object(&objects, "StatefulSet")["spec"]["template"]["spec"]["volumes"];
        assert!(
            volumes.as_sequence().unwrap().iter().any(|v| v["configMap"]["name"] == name.as_str()),
            "{volumes:?}"
        );
    }
}

#[test]
fn the_stateful_set_keeps_what_the_daemon_relies_on() {
    let drain_ms = {
        let cfg = dlsr::config::Config::load(Some(&root().join("docker/dlsr.toml"))).unwrap();
        cfg.shutdown.drain_deadline_ms
    };
    for overlay in ["cpu", "gpu"] {
        let (_, objects) = render(overlay);
        let set = object(&objects, "StatefulSet");
        let pod = &set["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        // Static membership from the stable pod name.
        let pod_name = env_of(container, "POD_NAME").expect("POD_NAME");
        assert_eq!(pod_name["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
        assert_eq!(env_of(container, "DLSR__KAFKA__GROUP_INSTANCE_ID").unwrap()["value"], "$(POD_NAME)");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        let margin = dlsr::stream::daemon::SHUTDOWN_MARGIN.as_secs();
        assert!(grace * 1000 > drain_ms + margin * 1000, "{overlay}: grace {grace} s vs drain {drain_ms} ms");
        let device = env_of(container, "DLSR__MODEL__DEVICE").unwrap()["value"].as_str().unwrap().to_string();
        let gpus = &container["resources"]["limits"]["nvidia.com/gpu"];
        match overlay {
            "gpu" => {
                assert_eq!(device, "cuda");
                assert_eq!(gpus.as_u64(), Some(1));
                assert!(container["image"].as_str().unwrap().ends_with(":cuda"));
            }
            _ => {
                assert_eq!(device, "cpu");
                assert!(gpus.is_null());
            }
        }
        // The pod labels the PDB, the Service and the ServiceMonitor select.
        let labels = &set["spec"]["template"]["metadata"]["labels"];
        let service = object(&objects, "Service");
        for (selector, target) in [
            (&object(&objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels),
            (&service["spec"]["selector"], labels),
            (&set["spec"]["selector"]["matchLabels"], labels),
            (
                &object(&objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"],
                &service["metadata"]["labels"],
            ),
        ] {
            for (k, v) in selector.as_mapping().unwrap() {
                assert_eq!(&target[k], v, "{overlay}: selector {selector:?} vs labels {target:?}");
            }
        }
        // KEDA: the StatefulSet, at most the partitions, slow scale-down.
        let scaled = &object(&objects, "ScaledObject")["spec"];
        assert_eq!(scaled["scaleTargetRef"]["kind"], "StatefulSet");
        assert_eq!(
            scaled["maxReplicaCount"].as_u64(),
            Some(3),
            "docker/compose.yml's topics have 3 partitions"
        );
        let down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
            ["stabilizationWindowSeconds"]
            .as_u64()
            .unwrap();
        assert!(down >= 300, "scale-down stabilisation {down} s");
        assert_eq!(scaled["triggers"][0]["metadata"]["consumerGroup"], "dlsr");
    }
}
