//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// An installed asset; panics with the fix when it is missing.
pub fn asset(path: PathBuf) -> PathBuf {
    assert!(path.exists(), "{} is missing: run scripts/fetch-assets.sh (or set DLSR_ASSETS)", path.display());
    path
}

/// The 20 labelled ImageNet photos from foolbox: (path, class index from the file name).
pub fn imagenet_photos() -> Vec<(PathBuf, i64)> {
    let dir = asset(dlsr::assets::foolbox_dir());
    let mut photos: Vec<(PathBuf, i64)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("imagenet_"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let label = stem.rsplit('_').next().unwrap().parse().unwrap();
            (p, label)
        })
        .collect();
    photos.sort();
    assert_eq!(photos.len(), 20);
    photos
}

pub fn dlsr_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dlsr"))
}
