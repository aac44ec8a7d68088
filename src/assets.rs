//! Where the files installed by `scripts/fetch-assets.sh` live, and which are present.
//!
//! The root is `$DLSR_ASSETS` when set, else `.deps/assets` in the source tree the binary
//! was built from (so `cargo run` and `cargo test` work with no configuration).

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    std::env::var_os("DLSR_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps").join("assets"))
}

pub fn weights(name: &str) -> PathBuf {
    root().join("weights").join(format!("{name}.safetensors"))
}

pub fn fashion_mnist(file: &str) -> PathBuf {
    root().join("fashion-mnist").join(file)
}

pub fn mnist_5k() -> PathBuf {
    root().join("mnist").join("mnist_5k.csv.gz")
}

pub fn foolbox_dir() -> PathBuf {
    root().join("foolbox")
}

/// The foolbox ImageNet photos (`imagenet_NN_<label>.jpg`) with their labels, sorted.
pub fn imagenet_photos() -> std::io::Result<Vec<(PathBuf, i64)>> {
    let mut photos: Vec<(PathBuf, i64)> = std::fs::read_dir(foolbox_dir())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let stem = p.file_stem()?.to_str()?.to_string();
            let label = stem.strip_prefix("imagenet_")?.rsplit('_').next()?.parse().ok()?;
            Some((p, label))
        })
        .collect();
    photos.sort();
    Ok(photos)
}

/// Every asset the project knows, for `dlsr doctor`.
pub fn inventory() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("EfficientNet-Lite0 weights", weights("efficientnet-lite0")),
        ("EfficientNet-Lite2 weights", weights("efficientnet-lite2")),
        ("Fashion-MNIST train", fashion_mnist("train-images-idx3-ubyte.gz")),
        ("Fashion-MNIST test", fashion_mnist("t10k-images-idx3-ubyte.gz")),
        ("MNIST 5k", mnist_5k()),
        ("foolbox samples", foolbox_dir().join("imagenet_00_243.jpg")),
    ]
}
