//! The binary as a user runs it: doctor, device errors, features on real data sets with
//! bad files skipped and counted, and the commands of later issues saying so.

use std::process::Command;

use crate::common::{asset, dlsr_bin};

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(dlsr_bin()).args(args).env_remove("LD_LIBRARY_PATH").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn doctor_reports_libtorch_2_11_and_cpu() {
    let (ok, stdout, stderr) = run(&["doctor", "--device", "cpu"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("libtorch: 2.11.0"), "{stdout}");
    assert!(stdout.contains("devices: cpu"), "{stdout}");
    assert!(stdout.contains("device check: cpu ok"), "{stdout}");
}

#[test]
fn asking_for_cuda_without_it_is_a_clear_error() {
    // Skip only where a CUDA libtorch really is loadable (the GPU machine).
    if dlsr::device::cuda_unavailable_reason().is_none() {
        return;
    }
    for args in [&["doctor", "--device", "cuda"][..], &["features", "--data", "x", "--device", "cuda:0"]] {
        let (ok, _, stderr) = run(args);
        assert!(!ok, "{args:?} must fail");
        assert!(stderr.contains("CUDA is not available"), "{stderr}");
    }
    let (ok, _, stderr) = run(&["doctor", "--device", "tpu"]);
    assert!(!ok);
    assert!(stderr.contains("expected auto, cpu, cuda or cuda:N"), "{stderr}");
}

#[test]
fn features_on_fashion_mnist_idx_and_mnist_csv() {
    let fm = asset(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz"));
    let (ok, stdout, stderr) =
        run(&["features", "--data", fm.to_str().unwrap(), "--limit", "40", "--input-size", "64", "-q"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("items: 40 encoded, 0 skipped"), "{stdout}");
    assert!(stdout.contains("layer offsets [0, 16, 40, 80, 192, 512]"), "{stdout}");

    let mnist = asset(dlsr::assets::mnist_5k());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f.safetensors");
    let (ok, stdout, stderr) = run(&[
        "features",
        "--data",
        mnist.to_str().unwrap(),
        "--limit",
        "10",
        "--input-size",
        "64",
        "-q",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("items: 10 encoded"), "{stdout}");
    let meta = dlsr::tensor_file::read_metadata(&out).unwrap();
    let ids: Vec<String> = serde_json::from_str(&meta["ids"]).unwrap();
    assert_eq!(ids[3], "mnist_5k.csv.gz#3");
    let tensors = dlsr::tensor_file::read_tensors(&out).unwrap();
    assert_eq!(tensors["features"].size(), [10, 512]);
}

#[test]
fn features_skip_bad_files_and_count_them() {
    let dir = tempfile::tempdir().unwrap();
    let photos = crate::common::imagenet_photos();
    std::fs::copy(&photos[0].0, dir.path().join("a.jpg")).unwrap();
    std::fs::copy(&photos[1].0, dir.path().join("b.jpg")).unwrap();
    std::fs::write(dir.path().join("empty.png"), b"").unwrap();
    std::fs::write(dir.path().join("text.jpg"), b"not an image").unwrap();
    std::fs::write(dir.path().join("README.txt"), b"ignored").unwrap();
    let (ok, stdout, stderr) =
        run(&["features", "--data", dir.path().to_str().unwrap(), "--input-size", "64", "-q"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("items: 2 encoded, 2 skipped {\"empty\": 1, \"unsupported_format\": 1}"),
        "{stdout}"
    );
    assert!(stdout.contains("ignored: 1 non-image files"), "{stdout}");
    assert!(stderr.contains("text.jpg"), "the skipped file must be named: {stderr}");
}

#[test]
fn a_set_with_no_usable_item_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.png"), b"").unwrap();
    let (ok, _, stderr) = run(&["features", "--data", dir.path().to_str().unwrap(), "-q"]);
    assert!(!ok);
    assert!(stderr.contains("no item"), "{stderr}");
}

#[test]
fn audit_arguments_are_checked_before_any_work() {
    let (ok, _, stderr) = run(&["audit", "--model", "m.safetensors", "--out", "o"]);
    assert!(!ok);
    assert!(stderr.contains("give either image SPECs or --from-topic"), "{stderr}");
    let (ok, _, stderr) = run(&["audit", "--model", "m.safetensors", "--out", "o", "x", "--since", "1h"]);
    assert!(!ok);
    assert!(stderr.contains("--from-topic"), "{stderr}");
    let (ok, _, stderr) = run(&[
        "audit",
        "--model",
        "m",
        "--out",
        "o",
        "--from-topic",
        "t",
        "--brokers",
        "b",
        "--since",
        "yesterday",
    ]);
    assert!(!ok);
    assert!(stderr.contains("--since") && stderr.contains("RFC 3339"), "{stderr}");
    let (ok, _, stderr) = run(&["tail", "--brokers", "b", "--from", "last week"]);
    assert!(!ok);
    assert!(stderr.contains("--from") && stderr.contains("beginning or end"), "{stderr}");
    let (ok, _, stderr) = run(&["tail", "--brokers", "b", "--verdicts", "--dead-letters"]);
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
    let (_, help, _) = run(&["--help"]);
    for cmd in ["fit", "calibrate", "score", "eval", "audit", "serve", "tail", "publish", "demo", "doctor"] {
        assert!(help.contains(cmd), "--help lacks {cmd}: {help}");
    }
}
