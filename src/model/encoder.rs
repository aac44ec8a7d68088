//! The encoder contract: a float image batch `[B, 3, S, S]` in, a list of feature maps
//! `[B, C_l, H_l, W_l]` out (one per tapped layer). Native EfficientNet-Lite and any
//! TorchScript module fulfil it; the rest of dlsr never needs to know which.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::efficientnet::{EfficientNetLite, LiteVariant};
use super::torchscript::TorchScriptEncoder;
use super::ModelError;
use crate::data::{Normalisation, Preprocess, ResizeMode};

/// What an encoder is, precisely enough that features from two runs are comparable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderIdentity {
    /// `efficientnet-lite0`, `efficientnet-lite2` or `torchscript:<file name>`.
    pub name: String,
    /// sha256 of the weights (safetensors) or the TorchScript file.
    pub weights_sha256: String,
    /// Names of the tapped layers, in output order.
    pub layers: Vec<String>,
    /// The preprocessing the encoder's weights expect, at its native input size.
    pub native_preprocess: Preprocess,
}

/// Numeric precision of the encoder's forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// CUDA autocast to float16 (ignored on CPU, where autocast is not applied).
    F16,
    /// bfloat16 weights and activations.
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "f16" | "fp16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision {other:?}: expected f32, f16 or bf16")),
        }
    }
}

impl Precision {
    /// The precision a forward pass on `device` actually runs in: f16 is CUDA autocast,
    /// which does not apply on the CPU, so f16 there is f32.
    pub fn effective(self, device: Device) -> Self {
        match self {
            Self::F16 if !device.is_cuda() => Self::F32,
            other => other,
        }
    }
}

pub trait Encoder: Send {
    fn identity(&self) -> &EncoderIdentity;
    fn device(&self) -> Device;
    /// The precision features come out in (see [`Precision::effective`]): part of what
    /// features are, for the cache and for a bundle's thresholds.
    fn precision(&self) -> Precision;
    /// Runs the encoder on a normalised batch already on [`Encoder::device`].
    fn feature_maps(&self, images: &Tensor) -> Result<Vec<Tensor>, ModelError>;
}

/// Which encoder to load: `lite0`, `lite2`, or a path to a TorchScript `.pt` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncoderSpec {
    Lite(LiteVariant),
    TorchScript(PathBuf),
}

impl std::str::FromStr for EncoderSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "lite0" | "efficientnet-lite0" => Ok(Self::Lite(LiteVariant::Lite0)),
            "lite2" | "efficientnet-lite2" => Ok(Self::Lite(LiteVariant::Lite2)),
            _ if s.ends_with(".pt") || s.ends_with(".pth") || Path::new(s).is_file() => {
                Ok(Self::TorchScript(PathBuf::from(s)))
            }
            _ => Err(ModelError::UnknownEncoder(s.to_string())),
        }
    }
}

/// Loads an encoder. `weights` overrides the installed checkpoint of a native encoder.
pub fn load(
    spec: &EncoderSpec,
    weights: Option<&Path>,
    device: Device,
    precision: Precision,
) -> Result<Box<dyn Encoder>, ModelError> {
    Ok(match spec {
        EncoderSpec::Lite(variant) => {
            let path = weights.map(Path::to_path_buf).unwrap_or_else(|| variant.default_weights());
            Box::new(EfficientNetLite::load(*variant, &path, device, precision)?)
        }
        EncoderSpec::TorchScript(path) => Box::new(TorchScriptEncoder::load(path, device, precision)?),
    })
}

/// Default preprocessing for a TorchScript encoder: ImageNet statistics at 224 px.
pub const TORCHSCRIPT_DEFAULT_PREPROCESS: Preprocess = Preprocess {
    size: 224,
    resize: ResizeMode::Stretch,
    normalisation: Normalisation::IMAGENET,
    antialias: true,
};
