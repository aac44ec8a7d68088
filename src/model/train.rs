//! Training the LFDN on cached ID features (METHOD.md section 4): t uniform over the
//! schedule, z_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps, MSE against z0, AdamW, and an EMA
//! of the weights (warm-up min(decay, (1+n)/(10+n))) which is what scores. A copy of the
//! EMA after the first epoch is kept for the LR score.
//!
//! Determinism: everything random comes from libtorch's generator seeded once, so the
//! same seed, data and machine (thread count) give the same weights.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use super::lfdn::{Lfdn, LfdnConfig};
use super::schedule::Schedule;
use crate::progress::Progress;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub ema_decay: f64,
    pub seed: i64,
    /// Keep the first-epoch EMA for the LR score.
    pub keep_first_epoch: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            batch_size: 128,
            lr: 1e-3,
            weight_decay: 1e-4,
            ema_decay: 0.9999,
            seed: 0,
            keep_first_epoch: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub items: usize,
    pub epochs: usize,
    pub steps: usize,
    /// Mean training loss of each epoch.
    pub epoch_loss: Vec<f64>,
    pub seconds: f64,
    pub device: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("no training items")]
    Empty,
    #[error("invalid training setting: {0}")]
    Config(String),
    #[error("interrupted")]
    Interrupted,
    #[error("tensor operation failed while training: {0}")]
    Tch(#[from] tch::TchError),
    #[error("training diverged at epoch {epoch}: loss {loss}")]
    Diverged { epoch: usize, loss: f64 },
}

/// A trained LFDN: the EMA weights and, optionally, the first-epoch EMA.
pub struct Trained {
    pub ema: (nn::VarStore, Lfdn),
    pub first_epoch: Option<(nn::VarStore, Lfdn)>,
    pub summary: TrainSummary,
}

/// An LFDN with its own variables on `device`.
pub fn new_lfdn(config: LfdnConfig, device: Device) -> (nn::VarStore, Lfdn) {
    let vs = nn::VarStore::new(device);
    let net = Lfdn::new(&vs.root(), config);
    (vs, net)
}

fn named_pairs(a: &nn::VarStore, b: &nn::VarStore) -> Vec<(Tensor, Tensor)> {
    let vb = b.variables();
    let mut names: Vec<(String, Tensor)> = a.variables().into_iter().collect();
    names.sort_by(|x, y| x.0.cmp(&y.0));
    names.into_iter().filter_map(|(n, t)| vb.get(&n).map(|u| (t, u.shallow_clone()))).collect()
}

pub fn train(
    features: &Tensor,
    config: LfdnConfig,
    schedule: &Schedule,
    tc: &TrainConfig,
    device: Device,
    quiet: bool,
    interrupted: &AtomicBool,
) -> Result<Trained, TrainError> {
    let n = features.size()[0];
    if n == 0 {
        return Err(TrainError::Empty);
    }
    if tc.epochs == 0 || tc.batch_size == 0 || tc.lr <= 0.0 || !(0.0..1.0).contains(&tc.ema_decay) {
        return Err(TrainError::Config(format!(
            "epochs {} and batch size {} must be >= 1, lr {} > 0, EMA decay {} in [0, 1)",
            tc.epochs, tc.batch_size, tc.lr, tc.ema_decay
        )));
    }
    tch::manual_seed(tc.seed);
    let (vs, net) = new_lfdn(config, device);
    let (mut ema_vs, ema_net) = new_lfdn(config, device);
    ema_vs.copy(&vs)?;
    ema_vs.freeze();
    let ema_pairs = named_pairs(&ema_vs, &vs);
    let mut opt = nn::AdamW { beta1: 0.9, beta2: 0.999, wd: tc.weight_decay, eps: 1e-8, amsgrad: false }
        .build(&vs, tc.lr)?;

    let data = features.f_to_device(device)?.f_to_kind(Kind::Float)?;
    let ab = Tensor::f_from_slice(&schedule.alpha_bar)?.f_to_kind(Kind::Float)?.f_to_device(device)?;
    let steps_t = schedule.steps as i64;
    let batch = tc.batch_size as i64;
    let mut progress = Progress::new("train", (tc.epochs as u64) * n as u64, quiet);
    let mut first_epoch = None;
    let mut epoch_loss = Vec::with_capacity(tc.epochs);
    let mut step = 0usize;

    for epoch in 0..tc.epochs {
        let perm = Tensor::f_randperm(n, (Kind::Int64, device))?;
        let mut loss_sum = Tensor::f_zeros([], (Kind::Float, device))?;
        let mut batches = 0;
        let mut start = 0;
        while start < n {
            if interrupted.load(Ordering::Relaxed) {
                return Err(TrainError::Interrupted);
            }
            let len = batch.min(n - start);
            let idx = perm.f_narrow(0, start, len)?;
            let z0 = data.f_index_select(0, &idx)?;
            let t = Tensor::f_randint(steps_t, [len], (Kind::Int64, device))?;
            let eps = z0.f_randn_like()?;
            let ab_t = ab.f_index_select(0, &t)?.f_unsqueeze(1)?;
            let zt =
                z0.f_mul(&ab_t.f_sqrt()?)?.f_add(&eps.f_mul(&ab_t.f_neg()?.f_add_scalar(1.0)?.f_sqrt()?)?)?;
            let pred = net.forward(&zt, &t)?;
            let loss = pred.f_mse_loss(&z0, tch::Reduction::Mean)?;
            opt.zero_grad();
            loss.backward();
            opt.step();
            step += 1;
            let decay = tc.ema_decay.min((1.0 + step as f64) / (10.0 + step as f64));
            tch::no_grad(|| -> Result<(), tch::TchError> {
                for (e, p) in &ema_pairs {
                    // ema = decay * ema + (1 - decay) * param
                    let _ = e.shallow_clone().f_lerp_(p, 1.0 - decay)?;
                }
                loss_sum = loss_sum.f_add(&loss.detach())?;
                Ok(())
            })?;
            batches += 1;
            start += len;
            progress.inc(len as u64, None);
        }
        let mean = loss_sum.f_double_value(&[])? / batches as f64;
        if !mean.is_finite() {
            return Err(TrainError::Diverged { epoch: epoch + 1, loss: mean });
        }
        epoch_loss.push(mean);
        progress.inc(0, Some(&format!("epoch {}/{} loss {mean:.5}", epoch + 1, tc.epochs)));
        tracing::info!(epoch = epoch + 1, loss = mean, "epoch done");
        if epoch == 0 && tc.keep_first_epoch {
            let (mut first_vs, first_net) = new_lfdn(config, device);
            first_vs.copy(&ema_vs)?;
            first_vs.freeze();
            first_epoch = Some((first_vs, first_net));
        }
    }
    let seconds = progress.finish().as_secs_f64();
    Ok(Trained {
        ema: (ema_vs, ema_net),
        first_epoch,
        summary: TrainSummary {
            items: n as usize,
            epochs: tc.epochs,
            steps: step,
            epoch_loss,
            seconds,
            device: crate::device::describe(device),
        },
    })
}
