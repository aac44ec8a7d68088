//! From feature maps to DLSR's feature vector (METHOD.md section 2): per layer, global
//! average pool, then z-score within the sample and the layer, (x - mean) / (std + 1e-5)
//! with the unbiased std; concatenate layers in order and carry the layer offsets.
//! No data-set statistics are involved, so a vector depends on its image alone.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::encoder::Encoder;
use super::ModelError;
use crate::data::Preprocess;

pub const ZSCORE_EPS: f64 = 1e-5;

/// Where each layer's slice starts and ends: `offsets[l]..offsets[l+1]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerOffsets(pub Vec<i64>);

impl LayerOffsets {
    pub fn dim(&self) -> i64 {
        self.0.last().copied().unwrap_or(0)
    }
    pub fn layers(&self) -> usize {
        self.0.len().saturating_sub(1)
    }
    pub fn range(&self, layer: usize) -> (i64, i64) {
        (self.0[layer], self.0[layer + 1])
    }
}

/// Pools and standardises maps `[B, C_l, H, W]` (or already pooled `[B, C_l]`) into
/// `[B, sum C_l]` float32 on the maps' device.
pub fn pool_and_standardise(encoder: &str, maps: &[Tensor]) -> Result<(Tensor, LayerOffsets), ModelError> {
    let bad =
        |index: usize, reason: String| ModelError::BadFeatureMap { encoder: encoder.into(), index, reason };
    if maps.is_empty() {
        return Err(bad(0, "no feature maps".into()));
    }
    let batch = maps[0].size().first().copied().unwrap_or(0);
    let mut offsets = vec![0i64];
    let mut parts = Vec::with_capacity(maps.len());
    for (i, map) in maps.iter().enumerate() {
        let size = map.size();
        let pooled = match size.len() {
            4 => map.f_to_kind(Kind::Float)?.f_mean_dim([2i64, 3].as_slice(), false, None)?,
            2 => map.f_to_kind(Kind::Float)?,
            n => return Err(bad(i, format!("rank {n} (shape {size:?}); expected [B, C, H, W] or [B, C]"))),
        };
        if size[0] != batch {
            return Err(bad(i, format!("batch size {} differs from {batch}", size[0])));
        }
        let channels = size[1];
        if channels < 2 {
            return Err(bad(i, format!("{channels} channel(s): a z-score needs at least 2")));
        }
        let mean = pooled.f_mean_dim([1i64].as_slice(), true, None)?;
        let std = pooled.f_std_dim([1i64].as_slice(), true, true)?;
        parts.push(pooled.f_sub(&mean)?.f_div(&(std + ZSCORE_EPS))?);
        offsets.push(offsets[i] + channels);
    }
    Ok((Tensor::f_cat(&parts, 1)?, LayerOffsets(offsets)))
}

/// A batch of feature vectors `[B, D]` (CPU, float32) and their layer offsets.
#[derive(Debug)]
pub struct Features {
    pub values: Tensor,
    pub offsets: LayerOffsets,
}

/// An encoder plus the preprocessing its input gets.
pub struct FeatureExtractor {
    pub encoder: Box<dyn Encoder>,
    pub preprocess: Preprocess,
}

impl FeatureExtractor {
    pub fn new(encoder: Box<dyn Encoder>, preprocess: Preprocess) -> Self {
        Self { encoder, preprocess }
    }

    /// Encodes a batch of preprocessed images `[B, 3, S, S]` (any device).
    pub fn extract(&self, images: &Tensor) -> Result<Features, ModelError> {
        let maps = self.encoder.feature_maps(images)?;
        let (values, offsets) = pool_and_standardise(&self.encoder.identity().name, &maps)?;
        Ok(Features { values: values.f_to_device(tch::Device::Cpu)?, offsets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn each_layer_slice_is_standardised() {
        tch::manual_seed(7);
        // Spread out enough that the 1e-5 in the denominator moves the std by < 1e-4.
        let a = Tensor::randn([3, 4, 5, 5], (Kind::Float, Device::Cpu)) * 50;
        let b = Tensor::randn([3, 6], (Kind::Float, Device::Cpu)) * 10 + 3;
        let (v, off) = pool_and_standardise("test", &[a, b]).unwrap();
        assert_eq!(off.0, vec![0, 4, 10]);
        assert_eq!(v.size(), [3, 10]);
        for l in 0..off.layers() {
            let (s, e) = off.range(l);
            let slice = v.narrow(1, s, e - s);
            let max_mean = slice.mean_dim([1i64].as_slice(), false, None).abs().max().double_value(&[]);
            let std = slice.std_dim([1i64].as_slice(), true, false);
            assert!(max_mean < 1e-5, "layer {l} mean {max_mean}");
            assert!((std - 1.0).abs().max().double_value(&[]) < 1e-4);
        }
    }

    #[test]
    fn rejects_bad_maps() {
        let ok = Tensor::zeros([2, 4, 3, 3], (Kind::Float, Device::Cpu));
        let rank3 = Tensor::zeros([2, 4, 3], (Kind::Float, Device::Cpu));
        let other_batch = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        assert!(pool_and_standardise("t", &[]).is_err());
        assert!(pool_and_standardise("t", &[ok.shallow_clone(), rank3]).is_err());
        assert!(pool_and_standardise("t", &[ok, other_batch]).is_err());
    }
}
