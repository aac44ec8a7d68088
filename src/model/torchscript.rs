//! Any TorchScript module as an encoder: it takes a float image batch `[B, 3, S, S]` and
//! returns a list or tuple of feature maps. This is how a user brings the paper's
//! EfficientNet-B4 or a ResNet-50 (`scripts/export_torchscript.py`) without code changes.
//! The module's output is validated on the first batch and every batch after it.

use std::path::Path;

use tch::{CModule, Device, IValue, Kind, Tensor};

use super::encoder::{Encoder, EncoderIdentity, Precision, TORCHSCRIPT_DEFAULT_PREPROCESS};
use super::ModelError;

pub struct TorchScriptEncoder {
    module: CModule,
    device: Device,
    precision: Precision,
    identity: EncoderIdentity,
}

impl TorchScriptEncoder {
    pub fn load(path: &Path, device: Device, precision: Precision) -> Result<Self, ModelError> {
        let fail = |reason: String| ModelError::TorchScript { path: path.into(), reason };
        if !path.is_file() {
            return Err(fail("file not found".into()));
        }
        let mut module =
            CModule::load_on_device(path, device).map_err(|e| fail(first_line(&e.to_string())))?;
        module.set_eval();
        if precision == Precision::Bf16 {
            module.to(device, Kind::BFloat16, false);
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let identity = EncoderIdentity {
            name: format!("torchscript:{name}"),
            weights_sha256: super::sha256_file(path)?,
            layers: Vec::new(),
            native_preprocess: TORCHSCRIPT_DEFAULT_PREPROCESS,
        };
        let mut encoder = Self { module, device, precision, identity };
        // Probe once so a module that breaks the contract fails at load, not mid-stream,
        // and so the layer count is known.
        let probe = Tensor::f_zeros([1, 3, 64, 64], (Kind::Float, device))?;
        let maps = encoder.feature_maps(&probe)?;
        encoder.identity.layers = (0..maps.len()).map(|i| format!("output.{i}")).collect();
        Ok(encoder)
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

impl Encoder for TorchScriptEncoder {
    fn identity(&self) -> &EncoderIdentity {
        &self.identity
    }

    fn device(&self) -> Device {
        self.device
    }

    fn precision(&self) -> Precision {
        self.precision.effective(self.device)
    }

    fn feature_maps(&self, images: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        let encoder = self.identity.name.clone();
        let kind = if self.precision == Precision::Bf16 { Kind::BFloat16 } else { Kind::Float };
        let input = images.f_to_device(self.device)?.f_to_kind(kind)?;
        let use_autocast = self.precision == Precision::F16 && self.device.is_cuda();
        let output =
            tch::autocast(use_autocast, || tch::no_grad(|| self.module.forward_is(&[IValue::Tensor(input)])))
                .map_err(|e| ModelError::Forward {
                    encoder: encoder.clone(),
                    shape: images.size(),
                    reason: first_line(&e.to_string()),
                })?;
        let bad = |index: usize, reason: String| ModelError::BadFeatureMap {
            encoder: encoder.clone(),
            index,
            reason,
        };
        let values = match output {
            IValue::TensorList(ts) => ts.into_iter().map(IValue::Tensor).collect(),
            IValue::Tuple(vs) | IValue::GenericList(vs) => vs,
            IValue::Tensor(_) => {
                return Err(bad(
                    0,
                    "returned a single tensor; the contract is a list or tuple of feature maps".into(),
                ))
            }
            other => return Err(bad(0, format!("returned {other:?}, not a list or tuple of feature maps"))),
        };
        if values.is_empty() {
            return Err(bad(0, "returned an empty list".into()));
        }
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                IValue::Tensor(t) => Ok(t),
                _ => Err(bad(i, "is not a tensor".into())),
            })
            .collect()
    }
}
