//! Scoring (METHOD.md section 5): distort a feature vector at t0 with noise seeded from
//! the item, reconstruct it with DDIM through the LFDN, and measure what came back:
//! MSE, MFsim (minus the mean per-layer cosine), LR (first-epoch MSE minus final MSE),
//! and per-layer MSE and cosine. Higher is more out-of-distribution for every score.
//!
//! The noise comes from a counter-based generator keyed by (item seed, step), computed on
//! the CPU in Rust, so an item's noise is the same whatever batch it is in and whatever
//! device scores it.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::features::LayerOffsets;
use super::lfdn::Lfdn;
use super::schedule::Schedule;

/// Which score decides a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreKind {
    Mse,
    Mfsim,
    Lr,
}

impl ScoreKind {
    pub const ALL: [ScoreKind; 3] = [Self::Mse, Self::Mfsim, Self::Lr];
    pub fn name(self) -> &'static str {
        match self {
            Self::Mse => "mse",
            Self::Mfsim => "mfsim",
            Self::Lr => "lr",
        }
    }
}

impl std::str::FromStr for ScoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mse" => Ok(Self::Mse),
            "mfsim" => Ok(Self::Mfsim),
            "lr" => Ok(Self::Lr),
            other => Err(format!("unknown score {other:?}: expected mse, mfsim or lr")),
        }
    }
}

impl std::fmt::Display for ScoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSettings {
    /// Distortion step (paper: 3..10 best; official code 3).
    pub t0: usize,
    /// DDIM stride (1: t0 network calls).
    pub stride: usize,
    /// DDIM eta (0: deterministic given the initial noise; the official code used 1).
    pub eta: f64,
    /// Layers averaged by MFsim (None: all; the official code skips the first).
    pub mfsim_layers: Option<Vec<usize>>,
    /// Noise draws averaged per item (1 in bundles from before it): each draw distorts
    /// and reconstructs the item with other noise, and the scores are the means, so the
    /// score's own noise shrinks by sqrt(draws). Draw 0 is the single draw's noise.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub draws: usize,
    /// Per-layer normalisation of MFsim (None in bundles from before it, and when off):
    /// each layer's cosine in units of its held-out ID spread, `(mean - cos) / sd`,
    /// averaged over the MFsim layers, so that no layer dominates by its scale. The
    /// statistics are the held-out items' (`dlsr fit` sets them from its calibration
    /// split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_norm: Option<Vec<crate::calibration::LayerStat>>,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl Default for ScoreSettings {
    fn default() -> Self {
        Self { t0: 3, stride: 1, eta: 0.0, mfsim_layers: None, draws: 1, layer_norm: None }
    }
}

impl ScoreSettings {
    /// The layers MFsim averages, for features of `layers` layers.
    pub fn layers_in_use(&self, layers: usize) -> Vec<usize> {
        match &self.mfsim_layers {
            Some(ls) if !ls.is_empty() => ls.clone(),
            _ => (0..layers).collect(),
        }
    }
}

impl ScoreSettings {
    /// Checks the settings against a schedule of `steps` steps and features of `layers`
    /// layers (before training, so that a bad setting does not cost a fit).
    pub fn check(&self, steps: usize, layers: usize) -> Result<(), ScoreError> {
        // t0 = 0 would distort nothing and never call the network: every score noise.
        if self.t0 == 0 || self.t0 >= steps {
            return Err(ScoreError::BadT0 { t0: self.t0, steps });
        }
        if self.stride == 0 {
            return Err(ScoreError::BadStride);
        }
        if !(1..=64).contains(&self.draws) {
            return Err(ScoreError::BadDraws(self.draws));
        }
        if let Some(norm) = &self.layer_norm {
            if norm.len() != layers
                || norm.iter().any(|s| !(s.sd > 0.0 && s.sd.is_finite() && s.mean.is_finite()))
            {
                return Err(ScoreError::BadLayerNorm { got: norm.len(), layers });
            }
        }
        for &layer in self.mfsim_layers.iter().flatten() {
            if layer >= layers {
                return Err(ScoreError::BadLayer { layer, layers });
            }
        }
        Ok(())
    }
}

/// The layers MFsim averages in a new bundle whose features have `layers` layers: all
/// but the two shallowest, keeping at least two (Lite0's five: 2, 3, 4). The shallow
/// layers of an ImageNet CNN describe colour, edges and texture rather than content:
/// alone, Lite0's first layer separated Fashion-MNIST from MNIST below chance (AUROC
/// 0.42) and its second worst of the five on every pair measured. Averaged over the
/// three pairs that are not trivially separable, MFsim over layers 2-4 beat all five
/// layers, 1-4 and 3-4, and MSE (README, "Choosing the defaults"). Bundles made before
/// this default carry `None`: all layers.
pub fn default_mfsim_layers(layers: usize) -> Vec<usize> {
    let skipped = 2.min(layers.saturating_sub(2));
    (skipped..layers).collect()
}

/// MFsim over `chosen` layers: minus the mean cosine between each layer's features and
/// their reconstruction.
pub fn mfsim_of(per_layer: &[LayerScore], chosen: &[usize]) -> f64 {
    -chosen.iter().map(|&l| per_layer[l].cos).sum::<f64>() / chosen.len().max(1) as f64
}

/// MFsim as `settings` define it: plain ([`mfsim_of`]) or with each layer's cosine in
/// units of its held-out spread (`settings.layer_norm`).
pub fn mfsim_with(
    per_layer: &[LayerScore],
    chosen: &[usize],
    norm: Option<&[crate::calibration::LayerStat]>,
) -> f64 {
    match norm {
        None => mfsim_of(per_layer, chosen),
        Some(stats) => {
            chosen.iter().map(|&l| (stats[l].mean - per_layer[l].cos) / stats[l].sd).sum::<f64>()
                / chosen.len().max(1) as f64
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerScore {
    pub mse: f64,
    pub cos: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemScores {
    pub mse: f64,
    pub mfsim: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    pub layers: Vec<LayerScore>,
}

impl ItemScores {
    pub fn get(&self, kind: ScoreKind) -> Option<f64> {
        match kind {
            ScoreKind::Mse => Some(self.mse),
            ScoreKind::Mfsim => Some(self.mfsim),
            ScoreKind::Lr => self.lr,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error("t0 = {t0} is outside the schedule's 1..{steps}")]
    BadT0 { t0: usize, steps: usize },
    #[error("stride must be at least 1")]
    BadStride,
    #[error("MFsim layer {layer} does not exist (the features have {layers} layers)")]
    BadLayer { layer: usize, layers: usize },
    #[error("features have dimension {got}, the model expects {want}")]
    BadDim { got: i64, want: i64 },
    #[error("{0} seeds for {1} items")]
    SeedCount(usize, usize),
    #[error("draws = {0}: must be in 1..=64")]
    BadDraws(usize),
    #[error("layer normalisation has {got} layer statistics (with positive spreads) for features of {layers} layers")]
    BadLayerNorm { got: usize, layers: usize },
    #[error("tensor operation failed while scoring: {0}")]
    Tch(#[from] tch::TchError),
}

/// A 64-bit seed for an item's noise from its decoded pixels (8-bit RGB, row-major) and
/// size, not from the container: the same image read from an IDX record, a PNG file or a
/// Kafka message gets the same seed, hence the same score. (A lossy re-encoding changes
/// the pixels, so it is another image.) The hash is a multiply-xorshift over 8-byte
/// words, fast enough for photos (a 12-megapixel image in about 10 ms); it only has to
/// spread seeds, not resist an adversary.
pub fn pixel_seed(width: u32, height: u32, rgb: &[u8]) -> u64 {
    let mut state = (u64::from(width) << 32) | u64::from(height);
    let mut h = splitmix64(&mut state) ^ rgb.len() as u64;
    let mut words = rgb.chunks_exact(8);
    for word in &mut words {
        let w = u64::from_le_bytes([word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7]]);
        h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 29;
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    splitmix64(&mut h)
}

/// One step of splitmix64: the project's seeded generator (noise, shuffles).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Standard normal noise for (seed, step): Box-Muller over splitmix64.
pub fn item_noise(seed: u64, step: u64, dim: usize) -> Vec<f32> {
    let mut state = seed ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut out = Vec::with_capacity(dim + 1);
    while out.len() < dim {
        // 53-bit uniforms in (0, 1].
        let u1 = ((splitmix64(&mut state) >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(dim);
    out
}

fn noise_batch(seeds: &[u64], step: u64, dim: i64, device: Device) -> Result<Tensor, tch::TchError> {
    let flat: Vec<f32> = seeds.iter().flat_map(|&s| item_noise(s, step, dim as usize)).collect();
    Tensor::f_from_slice(&flat)?.f_view([seeds.len() as i64, dim])?.f_to_device(device)
}

/// The models and settings that turn feature vectors into scores.
pub struct Scorer<'a> {
    pub final_model: &'a Lfdn,
    pub first_epoch_model: Option<&'a Lfdn>,
    pub schedule: &'a Schedule,
    pub settings: &'a ScoreSettings,
    pub offsets: &'a LayerOffsets,
    pub device: Device,
}

impl Scorer<'_> {
    pub fn validate(&self) -> Result<(), ScoreError> {
        self.settings.check(self.schedule.steps, self.offsets.layers())?;
        if self.offsets.dim() != self.final_model.config.dim {
            return Err(ScoreError::BadDim { got: self.offsets.dim(), want: self.final_model.config.dim });
        }
        Ok(())
    }

    /// DDIM from t0 down to 0 (LDM convention: the last step lands on alpha_bar_0).
    fn reconstruct(&self, model: &Lfdn, z0: &Tensor, seeds: &[u64]) -> Result<Tensor, ScoreError> {
        let s = self.settings;
        let ab = &self.schedule.alpha_bar;
        let dim = z0.size()[1];
        let eps = noise_batch(seeds, 0, dim, self.device)?;
        let mut z = z0.f_mul_scalar(ab[s.t0].sqrt())?.f_add(&eps.f_mul_scalar((1.0 - ab[s.t0]).sqrt())?)?;
        let mut t = s.t0;
        let mut step = 1u64;
        while t > 0 {
            let prev = t.saturating_sub(s.stride);
            let (ab_t, ab_prev) = (ab[t], ab[prev]);
            let x0_hat = model.forward_at(&z, t)?;
            let eps_hat = z.f_sub(&x0_hat.f_mul_scalar(ab_t.sqrt())?)?.f_div_scalar((1.0 - ab_t).sqrt())?;
            let sigma = s.eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)).max(0.0).sqrt();
            let dir = (1.0 - ab_prev - sigma * sigma).max(0.0).sqrt();
            z = x0_hat.f_mul_scalar(ab_prev.sqrt())?.f_add(&eps_hat.f_mul_scalar(dir)?)?;
            if sigma > 0.0 {
                z = z.f_add(&noise_batch(seeds, step, dim, self.device)?.f_mul_scalar(sigma)?)?;
            }
            t = prev;
            step += 1;
        }
        Ok(z)
    }

    /// Per item: mean squared error, and per layer (mse, cosine), all `[B]`/`[B, L]`.
    fn compare(&self, z0: &Tensor, rec: &Tensor) -> Result<(Tensor, Tensor, Tensor), ScoreError> {
        let mse = z0.f_sub(rec)?.f_square()?.f_mean_dim([1i64].as_slice(), false, None)?;
        let mut layer_mse = Vec::new();
        let mut layer_cos = Vec::new();
        for l in 0..self.offsets.layers() {
            let (a, b) = self.offsets.range(l);
            let x = z0.f_narrow(1, a, b - a)?;
            let y = rec.f_narrow(1, a, b - a)?;
            layer_mse.push(x.f_sub(&y)?.f_square()?.f_mean_dim([1i64].as_slice(), false, None)?);
            layer_cos.push(Tensor::f_cosine_similarity(&x, &y, 1, 1e-8)?);
        }
        Ok((mse, Tensor::f_stack(&layer_mse, 1)?, Tensor::f_stack(&layer_cos, 1)?))
    }

    /// Scores a batch of feature vectors `[B, D]`; `seeds[i]` seeds item i's noise.
    pub fn score(&self, features: &Tensor, seeds: &[u64]) -> Result<Vec<ItemScores>, ScoreError> {
        self.validate()?;
        let batch = features.size()[0] as usize;
        if seeds.len() != batch {
            return Err(ScoreError::SeedCount(seeds.len(), batch));
        }
        if batch == 0 {
            return Ok(Vec::new());
        }
        if features.size()[1] != self.final_model.config.dim {
            return Err(ScoreError::BadDim { got: features.size()[1], want: self.final_model.config.dim });
        }
        tch::no_grad(|| {
            let z0 = features.f_to_device(self.device)?.f_to_kind(Kind::Float)?;
            // Each draw's noise comes from the item's seed mixed with the draw's number;
            // draw 0 is the item's own seed (a one-draw score is the single draw's).
            let draws = self.settings.draws.max(1);
            let mut sums: Option<(Tensor, Tensor, Tensor, Option<Tensor>)> = None;
            for draw in 0..draws {
                let draw_seeds: Vec<u64> = match draw {
                    0 => seeds.to_vec(),
                    d => {
                        let mut key = d as u64;
                        let mix = splitmix64(&mut key);
                        seeds.iter().map(|s| s ^ mix).collect()
                    }
                };
                let rec = self.reconstruct(self.final_model, &z0, &draw_seeds)?;
                let (mse, layer_mse, layer_cos) = self.compare(&z0, &rec)?;
                let lr = match self.first_epoch_model {
                    Some(first) => {
                        let rec_first = self.reconstruct(first, &z0, &draw_seeds)?;
                        let (mse_first, _, _) = self.compare(&z0, &rec_first)?;
                        Some(mse_first.f_sub(&mse)?)
                    }
                    None => None,
                };
                sums = Some(match sums {
                    None => (mse, layer_mse, layer_cos, lr),
                    Some((a, b, c, d)) => (
                        a.f_add(&mse)?,
                        b.f_add(&layer_mse)?,
                        c.f_add(&layer_cos)?,
                        match (d, lr) {
                            (Some(d), Some(lr)) => Some(d.f_add(&lr)?),
                            _ => None,
                        },
                    ),
                });
            }
            let Some((mse, layer_mse, layer_cos, lr)) = sums else { return Ok(Vec::new()) };
            let n = draws as f64;
            let (mse, layer_mse, layer_cos) =
                (mse.f_div_scalar(n)?, layer_mse.f_div_scalar(n)?, layer_cos.f_div_scalar(n)?);
            let lr = match lr {
                Some(lr) => Some(to_vec(&lr.f_div_scalar(n)?)?),
                None => None,
            };
            let mse = to_vec(&mse)?;
            let layers = self.offsets.layers();
            let lm = to_vec(&layer_mse.f_reshape([-1])?)?;
            let lc = to_vec(&layer_cos.f_reshape([-1])?)?;
            let chosen = self.settings.layers_in_use(layers);
            Ok((0..batch)
                .map(|i| {
                    let per_layer: Vec<LayerScore> = (0..layers)
                        .map(|l| LayerScore { mse: lm[i * layers + l], cos: lc[i * layers + l] })
                        .collect();
                    let mfsim = mfsim_with(&per_layer, &chosen, self.settings.layer_norm.as_deref());
                    ItemScores { mse: mse[i], mfsim, lr: lr.as_ref().map(|v| v[i]), layers: per_layer }
                })
                .collect())
        })
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>, tch::TchError> {
    Vec::<f64>::try_from(t.f_to_kind(Kind::Double)?.f_to_device(Device::Cpu)?)
}

/// Scores `[N, D]` features in batches of `batch` (CPU in, any device inside).
pub fn score_all(
    scorer: &Scorer,
    values: &Tensor,
    seeds: &[u64],
    batch: usize,
) -> Result<Vec<ItemScores>, ScoreError> {
    let n = values.size()[0] as usize;
    if seeds.len() != n {
        return Err(ScoreError::SeedCount(seeds.len(), n));
    }
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(batch.max(1)) {
        let len = batch.max(1).min(n - start);
        out.extend(scorer.score(&values.f_narrow(0, start as i64, len as i64)?, &seeds[start..start + len])?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_noise_is_standard_normal_and_reproducible() {
        let a = item_noise(42, 0, 10_000);
        assert_eq!(a, item_noise(42, 0, 10_000));
        assert_ne!(a[..8], item_noise(43, 0, 8)[..]);
        assert_ne!(a[..8], item_noise(42, 1, 8)[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }

    #[test]
    fn mfsim_leaves_out_the_two_shallowest_layers_keeping_two() {
        assert_eq!(default_mfsim_layers(5), [2, 3, 4]);
        assert_eq!(default_mfsim_layers(4), [2, 3]);
        assert_eq!(default_mfsim_layers(3), [1, 2]);
        assert_eq!(default_mfsim_layers(2), [0, 1]);
        assert_eq!(default_mfsim_layers(1), [0]);
    }

    #[test]
    fn settings_reject_t0_zero_and_unknown_layers() {
        let ok = ScoreSettings::default();
        assert!(ok.check(1000, 5).is_ok());
        let t0_zero = ScoreSettings { t0: 0, ..ok.clone() };
        assert!(matches!(t0_zero.check(1000, 5), Err(ScoreError::BadT0 { t0: 0, .. })));
        assert!(ScoreSettings { t0: 1000, ..ok.clone() }.check(1000, 5).is_err());
        assert!(ScoreSettings { mfsim_layers: Some(vec![1, 5]), ..ok.clone() }.check(1000, 5).is_err());
        assert_eq!(ScoreSettings { mfsim_layers: Some(vec![2, 3]), ..ok.clone() }.layers_in_use(5), [2, 3]);
        assert_eq!(ok.layers_in_use(3), [0, 1, 2]);
    }

    #[test]
    fn pixel_seed_depends_on_every_pixel_and_the_size() {
        let pixels: Vec<u8> = (0..=254).collect();
        let seed = pixel_seed(17, 5, &pixels);
        assert_eq!(seed, pixel_seed(17, 5, &pixels));
        assert_ne!(seed, pixel_seed(5, 17, &pixels), "same bytes, other shape");
        for i in [0, 7, 8, 250, 254] {
            let mut changed = pixels.clone();
            changed[i] ^= 1;
            assert_ne!(seed, pixel_seed(17, 5, &changed), "byte {i}");
        }
        assert_ne!(pixel_seed(1, 1, &[0, 0, 0]), pixel_seed(1, 1, &[0, 0, 0, 0]));
        // Pinned (the PyTorch peer's pixel_seeds gives the same): changing the hash
        // changes every score, so it must be a decision, not an accident.
        assert_eq!(seed, 9_930_423_513_133_469_352);
        assert_eq!(pixel_seed(1, 1, &[0, 0, 0]), 13_024_704_099_803_365_447);
    }

    /// An untrained LFDN and 64 feature vectors, made once per test: libtorch's random
    /// generator is shared by the tests running beside this one, so the same network
    /// scores every setting compared.
    struct Fixture {
        _vs: tch::nn::VarStore,
        net: Lfdn,
        features: Tensor,
    }

    impl Fixture {
        fn new() -> Self {
            let (_vs, net) = crate::model::train::new_lfdn(
                super::super::lfdn::LfdnConfig { dim: 24, width: 32, depth: 1 },
                Device::Cpu,
            );
            let values: Vec<f32> = item_noise(7, 0, 64 * 24);
            let features = Tensor::from_slice(&values).view([64, 24]);
            Self { _vs, net, features }
        }

        fn scores_with(&self, settings: &ScoreSettings) -> Vec<ItemScores> {
            let offsets = LayerOffsets(vec![0, 8, 16, 24]);
            let schedule = Schedule::dlsr();
            let scorer = Scorer {
                final_model: &self.net,
                first_epoch_model: None,
                schedule: &schedule,
                settings,
                offsets: &offsets,
                device: Device::Cpu,
            };
            let seeds: Vec<u64> = (0..64).collect();
            scorer.score(&self.features, &seeds).unwrap()
        }
    }

    #[test]
    fn more_draws_average_the_noise_and_one_draw_is_the_old_score() {
        let fixture = Fixture::new();
        let one = fixture.scores_with(&ScoreSettings::default());
        let also_one = fixture.scores_with(&ScoreSettings { draws: 1, ..Default::default() });
        assert_eq!(one, also_one);
        let four = fixture.scores_with(&ScoreSettings { draws: 4, ..Default::default() });
        // Four draws differ from one, by less than the spread of single draws.
        let diff: f64 = one.iter().zip(&four).map(|(a, b)| (a.mse - b.mse).abs()).sum::<f64>() / 64.0;
        assert!(diff > 0.0, "four draws gave the single draw's scores");
        assert!(ScoreSettings { draws: 0, ..Default::default() }.check(1000, 3).is_err());
        // A bundle written before draws existed reads as one draw, and one draw is not written.
        let old: ScoreSettings =
            serde_json::from_str(r#"{"t0":3,"stride":1,"eta":0.0,"mfsim_layers":null}"#).unwrap();
        assert_eq!(old, ScoreSettings::default());
        assert!(!serde_json::to_string(&old).unwrap().contains("draws"));
    }

    #[test]
    fn layer_normalisation_puts_each_layer_in_units_of_its_spread() {
        use crate::calibration::LayerStat;
        let layers = [LayerScore { mse: 0.0, cos: 0.9 }, LayerScore { mse: 0.0, cos: 0.5 }];
        let stats = [LayerStat { mean: 0.95, sd: 0.05 }, LayerStat { mean: 0.6, sd: 0.2 }];
        // (0.95 - 0.9) / 0.05 = 1 and (0.6 - 0.5) / 0.2 = 0.5: mean 0.75.
        assert!((mfsim_with(&layers, &[0, 1], Some(&stats)) - 0.75).abs() < 1e-12);
        assert!((mfsim_with(&layers, &[0, 1], None) + 0.7).abs() < 1e-12);
        let bad = ScoreSettings {
            layer_norm: Some(vec![LayerStat { mean: 0.9, sd: 0.0 }; 3]),
            ..Default::default()
        };
        assert!(bad.check(1000, 3).is_err(), "a zero spread is refused");
        let short = ScoreSettings {
            layer_norm: Some(vec![LayerStat { mean: 0.9, sd: 0.1 }; 2]),
            ..Default::default()
        };
        assert!(short.check(1000, 3).is_err(), "one statistic per layer");
        let fixture = Fixture::new();
        let normed = fixture.scores_with(&ScoreSettings {
            layer_norm: Some(vec![LayerStat { mean: 0.5, sd: 0.1 }; 3]),
            ..Default::default()
        });
        let plain = fixture.scores_with(&ScoreSettings::default());
        for (n, p) in normed.iter().zip(&plain) {
            assert_eq!(n.layers, p.layers, "only MFsim changes");
            assert!(
                (n.mfsim - mfsim_with(&p.layers, &[0, 1, 2], Some(&[LayerStat { mean: 0.5, sd: 0.1 }; 3])))
                    .abs()
                    < 1e-9
            );
        }
    }
}
