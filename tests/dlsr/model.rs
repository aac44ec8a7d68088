//! The DLSR model end to end on real data: a CI-sized fit + eval on Fashion-MNIST vs
//! MNIST that a broken model would fail, batch-independent scores, the score command's
//! JSON lines, calibration, determinism, and damaged or mismatched bundles.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::common::{asset, dlsr_bin};

fn run(args: &[&str], cache: &Path) -> (bool, String, String) {
    let out = Command::new(dlsr_bin()).args(args).env("DLSR_CACHE", cache).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fmnist(file: &str) -> String {
    asset(dlsr::assets::fashion_mnist(file)).to_string_lossy().into_owned()
}

fn mnist() -> String {
    asset(dlsr::assets::mnist_5k()).to_string_lossy().into_owned()
}

/// One small bundle shared by the tests of this module (fitting costs tens of seconds).
pub struct Fitted {
    dir: tempfile::TempDir,
    pub bundle: PathBuf,
    fit_stdout: String,
}

pub fn fitted() -> &'static Fitted {
    static FITTED: OnceLock<Fitted> = OnceLock::new();
    FITTED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("fmnist.safetensors");
        let (ok, stdout, stderr) = run(
            &[
                "-q",
                "fit",
                "--data",
                &fmnist("train-images-idx3-ubyte.gz"),
                "--limit",
                "3000",
                "--input-size",
                "64",
                "--epochs",
                "30",
                "--out",
                bundle.to_str().unwrap(),
            ],
            &dir.path().join("cache"),
        );
        assert!(ok, "fit failed: {stderr}");
        Fitted { dir, bundle, fit_stdout: stdout }
    })
}

/// Another bundle fitted on the same Fashion-MNIST items as [`fitted`] (its features come
/// from the same cache), with `extra` arguments (e.g. `--epochs 3 --seed 7`, or another
/// `--input-size` and `--limit`), written to `out`.
pub fn fit_variant(out: &Path, extra: &[&str]) {
    let f = fitted();
    let data = fmnist("train-images-idx3-ubyte.gz");
    let mut args = vec!["-q", "fit", "--data", &data, "--out", out.to_str().unwrap()];
    if !extra.contains(&"--limit") {
        args.extend_from_slice(&["--limit", "3000"]);
    }
    if !extra.contains(&"--input-size") {
        args.extend_from_slice(&["--input-size", "64"]);
    }
    args.extend_from_slice(extra);
    let (ok, _, stderr) = run(&args, &f.dir.path().join("cache"));
    assert!(ok, "fit {extra:?} failed: {stderr}");
}

/// The near-OOD rows (issue #25) through SPEC options, and `eval --compare`: the scoring
/// candidates on the same encoded sets.
#[test]
fn eval_reads_class_and_transform_rows_and_compares_the_scoring_candidates() {
    let f = fitted();
    let out = f.dir.path().join("near");
    let test = fmnist("t10k-images-idx3-ubyte.gz");
    let (id, turned, far) = (
        format!("{test}?classes=0,1,3"),
        format!("rot90={test}?classes=0,1,3&rotate=90"),
        format!("mnist={}", mnist()),
    );
    let args =
        ["-q", "eval", "--model", f.bundle.to_str().unwrap(), "--id", &id, "--ood", &turned, "--ood", &far];
    let mut args = args.to_vec();
    args.extend_from_slice(&["--limit", "300", "--compare", "--out", out.to_str().unwrap()]);
    let (ok, stdout, stderr) = run(&args, &f.dir.path().join("cache"));
    assert!(ok, "{stderr}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["id"]["n"], 300, "300 items of classes 0, 1 and 3");
    // Turned a quarter, clothes are far less familiar than upright ones.
    assert!(metrics["sets"][0]["auroc"]["mfsim"].as_f64().unwrap() > 0.8, "{stdout}");
    let table = std::fs::read_to_string(out.join("compare.md")).unwrap();
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| draws")).collect();
    assert_eq!(rows.len(), 5 * 2, "five candidates x two OOD sets:\n{table}");
    for row in rows.iter().filter(|r| r.contains("| mnist |")) {
        let auroc: f64 = row.split('|').nth(4).unwrap().trim().parse().unwrap();
        assert!(auroc > 0.97, "every candidate separates the digits: {row}");
    }
    assert!(rows[0].starts_with("| draws 1 |") && rows[0].ends_with("| 1.00x |"), "{table}");
}

#[test]
fn small_fit_and_eval_separate_fashion_mnist_from_mnist() {
    let f = fitted();
    assert!(f.fit_stdout.contains("items: 2700 train, 300 held out"), "{}", f.fit_stdout);
    // 1000 Fashion-MNIST test images against 1000 digits, into DIR: (metrics.json, stdout).
    let eval = |dir: &str, extra: &[&str]| -> (serde_json::Value, String) {
        let out = f.dir.path().join(dir);
        let (id, ood) = (fmnist("t10k-images-idx3-ubyte.gz"), format!("mnist={}", mnist()));
        let mut args = vec!["-q", "eval", "--model", f.bundle.to_str().unwrap(), "--id", &id, "--ood", &ood];
        args.extend_from_slice(&["--limit", "1000", "--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = run(&args, &f.dir.path().join("cache"));
        assert!(ok, "eval {extra:?} failed: {stderr}");
        (serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap(), stdout)
    };
    let (metrics, stdout) = eval("eval", &[]);
    let out = f.dir.path().join("eval");
    assert_eq!(metrics["id"]["n"], 1000);
    let set = &metrics["sets"][0];
    assert_eq!(set["name"], "mnist");
    for kind in ["mse", "mfsim"] {
        let auroc = set["auroc"][kind].as_f64().unwrap();
        // A broken model (untrained, wrong features, wrong scores) lands near 0.5. This
        // CI-sized fit reached MSE 0.9954 and MFsim (layers 2-4, the default) 0.9979
        // with FPR95 0.10%; the floors leave a margin for thread-count noise.
        assert!(auroc >= 0.99, "AUROC {kind} = {auroc}\n{stdout}");
        assert!(set["fpr95"][kind].as_f64().unwrap() < 0.02, "FPR95 {kind}\n{stdout}");
    }
    assert!(set["auroc"]["lr"].as_f64().is_some(), "LR must be reported");
    for file in ["report.md", "hist_mfsim.svg", "roc_mfsim.svg", "roc_log_mfsim.svg", "hist_mse.svg"] {
        let text = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(text.len() > 200, "{file} is nearly empty");
    }
    assert!(stdout.contains("| mnist | 1000 |"), "{stdout}");

    // The evidence: each layer alone, and MFsim over every run of deepest layers.
    let layers = set["per_layer"].as_array().unwrap();
    assert_eq!(layers.len(), 5);
    for l in layers {
        let (cos, mse) = (l["auroc_cos"].as_f64().unwrap(), l["auroc_mse"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&cos) && (0.0..=1.0).contains(&mse), "{l}");
    }
    // The deep layers separate digits from clothes; the first (texture) layer does not.
    assert!(layers[3]["auroc_cos"].as_f64().unwrap() > 0.95, "{layers:?}");
    assert!(layers[0]["auroc_cos"].as_f64().unwrap() < 0.8, "{layers:?}");
    let sets_of_layers: Vec<serde_json::Value> = set["mfsim_layer_sets"].as_array().unwrap().clone();
    let over = |layers: &[u64]| -> f64 {
        let wanted: Vec<serde_json::Value> = layers.iter().map(|&l| l.into()).collect();
        sets_of_layers.iter().find(|s| s["layers"].as_array().unwrap() == &wanted).unwrap()["auroc"]
            .as_f64()
            .unwrap()
    };
    // The default leaves out the two shallowest layers; the report's MFsim is over those.
    assert_eq!(metrics["mfsim_layers"], serde_json::json!([2, 3, 4]));
    assert_eq!(over(&[2, 3, 4]), set["auroc"]["mfsim"].as_f64().unwrap(), "in-use set = the headline MFsim");
    assert!(over(&[2, 3, 4]) > over(&[0, 1, 2, 3, 4]), "the default layers must beat all five here");
    assert!(stdout.contains("Each layer alone") && stdout.contains("| 2-4 (in use) |"), "{stdout}");
    // The threshold in use: what it flags of ID and of each OOD set.
    let threshold = &metrics["threshold"];
    assert_eq!(threshold["source"], "calibrated");
    let id_flagged = threshold["id_flagged"].as_f64().unwrap();
    assert!(id_flagged > 0.0 && id_flagged < 0.2, "{threshold}");
    assert!(set["flagged"].as_f64().unwrap() > 0.8, "{set}");
    assert!(stdout.contains("of the ID test set flagged"), "{stdout}");

    // MFsim over other layers at eval time: only the averaging changes, so its AUROC is
    // the one measured for that set above; the calibrated threshold no longer applies.
    let (metrics_14, stdout) = eval("eval-1-4", &["--mfsim-layers", "1,2,3,4"]);
    assert_eq!(metrics_14["sets"][0]["auroc"]["mfsim"].as_f64().unwrap(), over(&[1, 2, 3, 4]));
    assert_eq!(metrics_14["mfsim_layers"], serde_json::json!([1, 2, 3, 4]));
    assert!(metrics_14["threshold"].is_null());
    assert!(stdout.contains("calibrated MFsim threshold is for layers 2-4, not 1-4"), "{stdout}");
}

#[test]
fn score_prints_json_lines_and_error_lines() {
    let f = fitted();
    let dir = tempfile::tempdir().unwrap();
    let photos = crate::common::imagenet_photos();
    std::fs::copy(&photos[0].0, dir.path().join("photo.jpg")).unwrap();
    std::fs::write(dir.path().join("broken.png"), b"").unwrap();
    let (ok, stdout, stderr) = run(
        &[
            "score",
            "--model",
            f.bundle.to_str().unwrap(),
            dir.path().to_str().unwrap(),
            &mnist(),
            "--limit",
            "2",
        ],
        &f.dir.path().join("cache"),
    );
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    // The summary at the end, on stderr: counts, flagged, skipped by code.
    let flagged = lines.iter().filter(|l| l["is_ood"] == true).count();
    assert!(stderr.contains("score: 3 items scored, 1 failed"), "{stderr}");
    assert!(stderr.contains(&format!("; {flagged} flagged; 1 skipped (empty 1)")), "{stderr}");
    // Several SPECs: every id is the item's path as given, so ids stay unique.
    let given = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let broken =
        lines.iter().find(|l| l["id"] == given("broken.png").as_str()).expect("an error line for broken.png");
    assert_eq!(broken["code"], "empty");
    assert!(broken["error"].as_str().unwrap().contains("empty"));
    let first_digit = format!("{}#0", mnist());
    let digit =
        lines.iter().find(|l| l["id"] == first_digit.as_str()).expect("a verdict for the first digit");
    for key in ["score", "threshold", "id_percentile"] {
        assert!(digit[key].is_number(), "{key} in {digit}");
    }
    assert_eq!(digit["score_kind"], "mfsim");
    assert!(digit["is_ood"].is_boolean());
    assert!(digit["scores"]["mse"].is_number() && digit["scores"]["lr"].is_number());
    assert_eq!(digit["layers"].as_array().unwrap().len(), 5);
    assert!(digit["layers"][0]["cos"].is_number());
    // A real photo is far from Fashion-MNIST: flagged, at the top of the ID percentiles.
    let photo = lines.iter().find(|l| l["id"] == given("photo.jpg").as_str()).unwrap();
    assert_eq!(photo["is_ood"], true, "{photo}");
    assert!(photo["id_percentile"].as_f64().unwrap() > 99.0);
}

/// `score` with several workers (each its own model, batches taken in any order) writes
/// exactly what one worker writes, in data-set order, error lines included.
#[test]
fn score_workers_keep_the_order_and_the_scores() {
    let f = fitted();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.png"), b"not an image").unwrap();
    let outputs: Vec<String> = ["1", "3"]
        .into_iter()
        .map(|workers| {
            let (ok, stdout, stderr) = run(
                &[
                    "-q",
                    "score",
                    "--model",
                    f.bundle.to_str().unwrap(),
                    "--workers",
                    workers,
                    "--batch-size",
                    "7",
                    &mnist(),
                    dir.path().to_str().unwrap(),
                    "--limit",
                    "60",
                ],
                &f.dir.path().join("cache"),
            );
            assert!(ok, "{stderr}");
            stdout
        })
        .collect();
    assert_eq!(outputs[0].lines().count(), 61, "{}", outputs[0]);
    let ids: Vec<String> = outputs[0]
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..60)
        .map(|i| format!("{}#{i}", mnist()))
        .chain([dir.path().join("broken.png").to_string_lossy().into_owned()])
        .collect();
    assert_eq!(ids, expected);
    // Same lines in the same order; numbers equal up to float summation order (one
    // libtorch thread per worker sums in another order than two).
    for (a, b) in outputs[0].lines().zip(outputs[1].lines()) {
        let (a, b): (serde_json::Value, serde_json::Value) =
            (serde_json::from_str(a).unwrap(), serde_json::from_str(b).unwrap());
        assert_eq!(a["id"], b["id"]);
        assert_eq!(a["is_ood"], b["is_ood"], "{a} / {b}");
        assert_eq!(a["code"], b["code"]);
        for key in ["mse", "mfsim", "lr"] {
            let (x, y) = (a["scores"][key].as_f64(), b["scores"][key].as_f64());
            assert_eq!(x.is_some(), y.is_some(), "{key}: {a} / {b}");
            if let (Some(x), Some(y)) = (x, y) {
                assert!((x - y).abs() < 1e-5, "{key} of {}: {x} with 1 worker, {y} with 3", a["id"]);
            }
        }
    }
}

/// Scoring in another precision than the bundle was calibrated in warns once per run,
/// however many workers load the encoder.
#[test]
fn a_precision_other_than_calibrated_warns_once() {
    let f = fitted();
    let (ok, _, stderr) = run(
        &["-q", "score", "--model", f.bundle.to_str().unwrap(), "--precision", "bf16", "--workers", "3"]
            .into_iter()
            .chain([mnist().as_str(), "--limit", "12"])
            .collect::<Vec<_>>(),
        &f.dir.path().join("cache"),
    );
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("thresholds were calibrated on f32").count(), 1, "{stderr}");
}

#[test]
fn an_image_scores_the_same_alone_and_inside_a_batch() {
    let f = fitted();
    let cache = f.dir.path().join("cache");
    let digits = mnist();
    // The same 40 digits scored in one batch of 40 and one at a time.
    let score_with_batch = |batch: &str| -> String {
        let model = f.bundle.to_str().unwrap();
        let args = ["-q", "score", "--model", model, &digits, "--limit", "40", "--batch-size", batch];
        let (ok, stdout, stderr) = run(&args, &cache);
        assert!(ok, "{stderr}");
        stdout
    };
    let (batched, single) = (score_with_batch("40"), score_with_batch("1"));
    let parse = |s: &str| -> Vec<(String, f64, f64)> {
        s.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["id"].as_str().unwrap().to_string(),
                    v["scores"]["mse"].as_f64().unwrap(),
                    v["score"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (a, b) = (parse(&batched), parse(&single));
    assert_eq!(a.len(), 40);
    let mut max_rel = 0f64;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        max_rel = max_rel.max(((x.1 - y.1) / x.1).abs()).max(((x.2 - y.2) / x.2).abs());
    }
    // The noise is seeded per item, so only float reassociation inside batched kernels
    // can differ (seen: 0 to ~1e-7 relative); a batch-dependent seed would differ by ~1.
    assert!(max_rel < 1e-5, "batch changed a score by {max_rel} (relative)");
}

#[test]
fn calibrate_rewrites_thresholds_and_reports_unreachable_targets() {
    let f = fitted();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("b.safetensors");
    std::fs::copy(&f.bundle, &copy).unwrap();
    let cache = f.dir.path().join("cache");
    let test = fmnist("t10k-images-idx3-ubyte.gz");
    let calibrate = |limit: &str, target_fpr: &str| {
        let args = ["-q", "calibrate", "--model", copy.to_str().unwrap(), "--data", &test];
        let args: Vec<&str> =
            args.into_iter().chain(["--limit", limit, "--target-fpr", target_fpr]).collect();
        run(&args, &cache)
    };
    let (ok, stdout, stderr) = calibrate("400", "0.1");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("calibration at target FPR 10.00% on 400 held-out items"), "{stdout}");
    let meta = dlsr::model::bundle::read_meta(&copy).unwrap();
    assert_eq!(meta.calibration.target_fpr, 0.1);
    let mfsim = &meta.calibration.scores[&dlsr::model::score::ScoreKind::Mfsim];
    assert!((mfsim.achieved_fpr - 0.1).abs() < 0.01, "{}", mfsim.achieved_fpr);

    let (ok, stdout, _) = calibrate("10", "0.05");
    assert!(ok);
    assert!(stdout.contains("NOT ACHIEVABLE") && stdout.contains("needs at least 20"), "{stdout}");
}

#[test]
fn damaged_and_foreign_bundles_are_clear_errors() {
    let f = fitted();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let digits = mnist();
    let truncated = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(&f.bundle).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, stderr) =
        run(&["score", "--model", truncated.to_str().unwrap(), &digits, "--limit", "1"], &cache);
    assert!(!ok);
    assert!(stderr.contains("truncated.safetensors"), "{stderr}");

    let features = dir.path().join("features.safetensors");
    let (ok, _, stderr) = run(
        &[
            "-q",
            "features",
            "--data",
            &digits,
            "--limit",
            "2",
            "--input-size",
            "32",
            "--out",
            features.to_str().unwrap(),
        ],
        &cache,
    );
    assert!(ok, "{stderr}");
    let (ok, _, stderr) =
        run(&["score", "--model", features.to_str().unwrap(), &digits, "--limit", "1"], &cache);
    assert!(!ok);
    assert!(stderr.contains("not a dlsr bundle"), "{stderr}");
    // Not safetensors at all: said once, with the path once, and no header arithmetic.
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let (ok, _, stderr) =
        run(&["score", "--model", readme.to_str().unwrap(), &digits, "--limit", "1"], &cache);
    assert!(!ok);
    assert_eq!(stderr.matches("not a dlsr bundle").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("README.md").count(), 1, "{stderr}");
    assert!(!stderr.contains("header length"), "{stderr}");
    // A missing file: the OS error once.
    let missing = dir.path().join("missing.safetensors");
    let (ok, _, stderr) =
        run(&["score", "--model", missing.to_str().unwrap(), &digits, "--limit", "1"], &cache);
    assert!(!ok);
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");

    // A bundle fitted with Lite0 must not silently score with Lite2 features.
    let (ok, _, stderr) = run(
        &["score", "--model", f.bundle.to_str().unwrap(), "--encoder", "lite2", &digits, "--limit", "1"],
        &cache,
    );
    assert!(!ok);
    assert!(stderr.contains("the bundle was made with encoder efficientnet-lite0"), "{stderr}");
}

#[test]
fn same_seed_and_data_give_the_same_bundle_and_the_cache_skips_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = fmnist("t10k-images-idx3-ubyte.gz");
    let fit = |name: &str, seed: &str| -> (PathBuf, String) {
        let out = dir.path().join(name);
        let (ok, stdout, stderr) = run(
            &[
                "-q",
                "fit",
                "--data",
                &data,
                "--limit",
                "300",
                "--input-size",
                "32",
                "--epochs",
                "2",
                "--width",
                "64",
                "--depth",
                "1",
                "--seed",
                seed,
                "--out",
                out.to_str().unwrap(),
            ],
            &cache,
        );
        assert!(ok, "{stderr}");
        (out, stdout)
    };
    let (a, first_run) = fit("a.safetensors", "5");
    let (b, second_run) = fit("b.safetensors", "5");
    let (c, _) = fit("c.safetensors", "6");
    assert!(!first_run.contains("from cache"), "{first_run}");
    assert!(second_run.contains("from cache"), "the second fit must reuse the features: {second_run}");
    let load = |p: &Path| dlsr::tensor_file::read_tensors(p).unwrap();
    let (ta, tb, tc) = (load(&a), load(&b), load(&c));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (name, t) in &ta {
        assert!(t.equal(&tb[name]), "{name} differs between two fits with the same seed");
    }
    assert!(ta.iter().any(|(n, t)| !t.equal(&tc[n])), "another seed must give other weights");
}
