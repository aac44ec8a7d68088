//! The diffusion noise schedule (METHOD.md section 4): T = 100 steps, latent diffusion's
//! "linear" schedule, beta_i = (sqrt(0.0015) + (sqrt(0.0195) - sqrt(0.0015)) i/(T-1))^2.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub steps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// alpha_bar_i = prod_{j <= i} (1 - beta_j), i = 0..steps-1.
    pub alpha_bar: Vec<f64>,
}

impl Schedule {
    pub fn linear(steps: usize, beta_start: f64, beta_end: f64) -> Self {
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let mut alpha_bar = Vec::with_capacity(steps);
        let mut prod = 1.0;
        for i in 0..steps {
            let frac = if steps > 1 { i as f64 / (steps - 1) as f64 } else { 0.0 };
            let beta = (a + (b - a) * frac).powi(2);
            prod *= 1.0 - beta;
            alpha_bar.push(prod);
        }
        Self { steps, beta_start, beta_end, alpha_bar }
    }

    /// DLSR's schedule: T = 100, betas 0.0015 .. 0.0195.
    pub fn dlsr() -> Self {
        Self::linear(100, 0.0015, 0.0195)
    }
}

impl Default for Schedule {
    fn default() -> Self {
        Self::dlsr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_check_values_of_the_method() {
        let s = Schedule::dlsr();
        for (i, want) in [(0, 0.99850), (3, 0.99353), (10, 0.97896), (99, 0.41175)] {
            assert!((s.alpha_bar[i] - want).abs() < 5e-6, "alpha_bar_{i} = {} != {want}", s.alpha_bar[i]);
        }
        // Noise std at t0 = 3 is about 0.08.
        assert!(((1.0 - s.alpha_bar[3]).sqrt() - 0.0804).abs() < 1e-3);
    }
}
