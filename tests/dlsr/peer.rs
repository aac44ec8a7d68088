//! The PyTorch peer (benches/peer/peer.py) computes exactly dlsr's scores: same encoder
//! weights and preprocessing, the bundle's LFDN, the same seeded noise. The benchmark's
//! speed ratios mean something only if this holds, so it is checked item by item, to
//! 1e-4, on a shared set: Fashion-MNIST and MNIST digits as PNG files and three colour
//! photos (as PNG) that are shrunk to the input size. The peer's venv comes from
//! `scripts/setup-peer.sh` (the test command runs it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use dlsr::data::{DataSet, ItemContent};

use crate::common::{asset, dlsr_bin, imagenet_photos};
use crate::model::fitted;

fn peer_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("DLSR_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".deps"))
        .join("peer-venv/bin/python");
    assert!(python.is_file(), "{} missing: run scripts/setup-peer.sh", python.display());
    python
}

/// Writes `count` grey records of an IDX/CSV set as PNG files named `<prefix>-NNN.png`.
fn write_pngs(spec: &Path, prefix: &str, count: usize, dir: &Path) {
    let set = DataSet::open(spec.to_str().unwrap()).unwrap();
    for i in 0..count {
        let ItemContent::Grey { width, height, pixels } = set.get(i).unwrap().content else {
            panic!("{}: expected grey records", spec.display());
        };
        image::GrayImage::from_raw(width, height, pixels)
            .unwrap()
            .save(dir.join(format!("{prefix}-{i:03}.png")))
            .unwrap();
    }
}

type Scores = BTreeMap<String, serde_json::Value>;

/// id -> the `scores` object with `layers` folded in, from JSON lines.
fn parse(lines: &str, nested: bool) -> Scores {
    lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            let mut scores = v["scores"].clone();
            if !nested {
                scores["layers"] = v["layers"].clone();
            }
            (id, scores)
        })
        .collect()
}

fn max_difference(a: &serde_json::Value, b: &serde_json::Value, path: &str, worst: &mut (f64, String)) {
    match (a, b) {
        (serde_json::Value::Number(x), serde_json::Value::Number(y)) => {
            let d = (x.as_f64().unwrap() - y.as_f64().unwrap()).abs();
            if d > worst.0 {
                *worst = (d, path.to_string());
            }
        }
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "fields at {path}");
            for (k, v) in x {
                max_difference(v, &y[k], &format!("{path}.{k}"), worst);
            }
        }
        (serde_json::Value::Array(x), serde_json::Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "length at {path}");
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                max_difference(v, w, &format!("{path}[{i}]"), worst);
            }
        }
        _ => panic!("{path}: {a} against {b}"),
    }
}

#[test]
fn the_pytorch_peer_agrees_with_dlsr_score_to_1e_4() {
    let python = peer_python();
    let bundle = &fitted().bundle;
    let dir = tempfile::tempdir().unwrap();
    write_pngs(&asset(dlsr::assets::fashion_mnist("t10k-images-idx3-ubyte.gz")), "fashion", 24, dir.path());
    write_pngs(&asset(dlsr::assets::mnist_5k()), "mnist", 24, dir.path());
    // The photos are JPEG; JPEG decoders differ by a few grey levels (the image crate
    // against Pillow's libjpeg-turbo), so they are shared as the PNG of dlsr's decode.
    for (photo, _) in imagenet_photos().iter().take(3) {
        let bytes = std::fs::read(photo).unwrap();
        let image = dlsr::data::decode::decode(&bytes, &dlsr::data::DecodeLimits::default()).unwrap();
        let name = photo.with_extension("png").file_name().unwrap().to_owned();
        image::RgbImage::from_raw(image.width, image.height, image.rgb)
            .unwrap()
            .save(dir.path().join(name))
            .unwrap();
    }

    // Batch 16 here, 7 in the peer: scores must not depend on the batch either.
    let out = Command::new(dlsr_bin())
        .args(["-q", "score", "--model", bundle.to_str().unwrap(), "--batch-size", "16"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "dlsr score: {}", String::from_utf8_lossy(&out.stderr));
    let ours = parse(&String::from_utf8_lossy(&out.stdout), false);
    assert_eq!(ours.len(), 51);

    for tuned in [false, true] {
        let mut cmd = Command::new(&python);
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peer/peer.py")).args([
            "score",
            "--bundle",
            bundle.to_str().unwrap(),
            "--batch-size",
            "7",
            "--threads",
            "2",
        ]);
        if tuned {
            cmd.arg("--tuned");
        }
        let out = cmd.arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "peer: {}", String::from_utf8_lossy(&out.stderr));
        let theirs = parse(&String::from_utf8_lossy(&out.stdout), true);
        assert_eq!(theirs.keys().collect::<Vec<_>>(), ours.keys().collect::<Vec<_>>());
        let mut worst = (0.0, String::new());
        for (id, scores) in &ours {
            max_difference(scores, &theirs[id], id, &mut worst);
        }
        eprintln!("peer (tuned: {tuned}): largest difference {:.2e} at {}", worst.0, worst.1);
        assert!(worst.0 < 1e-4, "peer (tuned: {tuned}) differs by {} at {}", worst.0, worst.1);
    }
}
