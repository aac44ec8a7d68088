//! The model: the frozen encoders, DLSR's multi-layer feature vector, the diffusion
//! model over it, its training and scoring, and the bundle that holds it all.
//!
//! - [`encoder`]: the [`encoder::Encoder`] contract (images in, a list of feature maps
//!   out), its identity (name, weights checksum, preprocessing) and loading by name.
//! - [`efficientnet`]: EfficientNet-Lite0/Lite2 written with tch, loading the ImageNet
//!   checkpoints converted by `scripts/fetch-assets.sh`.
//! - [`torchscript`]: any TorchScript module that returns a list/tuple of feature maps.
//! - [`features`]: pooling, per-layer z-scoring, concatenation, batched extraction.
//! - [`schedule`]: the latent diffusion noise schedule (METHOD.md section 4).
//! - [`lfdn`]: the latent feature diffusion network, an MLP denoiser predicting the clean
//!   vector; [`train`]: its training with the EMA of the weights.
//! - [`score`]: distortion at t0 with noise seeded from the item, DDIM reconstruction, and
//!   the MSE, MFsim and LR scores with their per-layer parts.
//! - [`bundle`]: the self-describing model file (safetensors weights and JSON metadata:
//!   encoder identity, preprocessing, layer offsets, LFDN, scoring settings,
//!   calibration), checked when loaded.

pub mod bundle;
pub mod efficientnet;
pub mod encoder;
pub mod features;
pub mod lfdn;
pub mod schedule;
pub mod score;
pub mod self_test;
pub mod torchscript;
pub mod train;

/// Errors of the model layer, each with the context needed to act on it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: cannot read weights: {reason}")]
    Weights { path: std::path::PathBuf, reason: String },
    #[error("{path}: weights do not fit {model}: {reason}")]
    WeightsMismatch { path: std::path::PathBuf, model: String, reason: String },
    #[error("{path}: not a usable TorchScript encoder: {reason}")]
    TorchScript { path: std::path::PathBuf, reason: String },
    #[error("unknown encoder {0:?}: expected lite0, lite2 or a path to a TorchScript .pt file")]
    UnknownEncoder(String),
    #[error("encoder {encoder} failed on a batch of shape {shape:?}: {reason}")]
    Forward { encoder: String, shape: Vec<i64>, reason: String },
    #[error("encoder {encoder} returned an unusable feature map {index}: {reason}")]
    BadFeatureMap { encoder: String, index: usize, reason: String },
    #[error("tensor operation failed: {0}")]
    Tch(#[from] tch::TchError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
}

/// sha256 of a file, hex; part of every encoder's identity.
pub fn sha256_file(path: &std::path::Path) -> Result<String, ModelError> {
    use sha2::Digest;
    let mut file =
        std::fs::File::open(path).map_err(|source| ModelError::Io { path: path.into(), source })?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|source| ModelError::Io { path: path.into(), source })?;
    Ok(hex::encode(hasher.finalize()))
}
