//! Two-sample tests of a window of scores against the bundle's held-out ID scores, with
//! p-values that stay accurate in the far tail (the window audit compares them with
//! `alpha / (tests x groups)`, often below 1e-5):
//!
//! - **Kolmogorov-Smirnov** (two-sided): the largest gap between the two empirical CDFs;
//!   p-value from Kolmogorov's limit with Stephens' small-sample correction of the
//!   effective size (accurate to about 1% of p for effective sizes from 10 up).
//! - **Cramér-von Mises** (two-sided, Anderson 1962): the integrated squared gap; the
//!   statistic is standardised by its exact finite-sample mean and variance and the
//!   p-value taken from the limiting distribution (the series of Csörgő and Faraway,
//!   with the Bessel function computed by quadrature), as scipy's
//!   `cramervonmises_2samp` does for large samples.
//! - **Fisher's exact test** (one-sided: more flagged in the window than in the held-out
//!   set): the flagged count compared with the held-out items above the same threshold,
//!   so the threshold's own estimation error is part of the null, not reported as drift.
//!
//! Anderson-Darling is not used: its two-sample p-values (Scholz and Stephens) are
//! interpolated from a table that ends at 0.001, too coarse for a Bonferroni level over
//! many groups; the flagged-count test already weighs the upper tail.

use super::stats::ln_gamma;

/// A test's result.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TestResult {
    pub statistic: f64,
    pub p_value: f64,
}

/// Kolmogorov's limiting tail `P(K > lambda)`.
pub fn kolmogorov_tail(lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 1.0;
    }
    if lambda < 1.18 {
        // The series in exp(-(2k-1)^2 pi^2 / (8 lambda^2)) converges fast here.
        let pi = std::f64::consts::PI;
        let a = -pi * pi / (8.0 * lambda * lambda);
        let cdf: f64 = (1..=8).map(|k| (a * f64::from(2 * k - 1).powi(2)).exp()).sum::<f64>()
            * (2.0 * pi).sqrt()
            / lambda;
        return (1.0 - cdf).clamp(0.0, 1.0);
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let term = (-2.0 * f64::from(k * k) * lambda * lambda).exp();
        sum += if k % 2 == 1 { term } else { -term };
        if term < 1e-300 || term < sum.abs() * 1e-17 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

/// Two-sided two-sample Kolmogorov-Smirnov test; `reference` must be sorted.
pub fn ks_two_sample(window: &[f64], reference: &[f64]) -> TestResult {
    let (n, m) = (window.len(), reference.len());
    if n == 0 || m == 0 {
        return TestResult { statistic: 0.0, p_value: 1.0 };
    }
    let mut a = window.to_vec();
    a.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0usize, 0usize, 0.0f64);
    while i < n && j < m {
        // Step past every copy of the smaller value in both samples, so ties count once.
        let v = if a[i] <= reference[j] { a[i] } else { reference[j] };
        while i < n && a[i] <= v {
            i += 1;
        }
        while j < m && reference[j] <= v {
            j += 1;
        }
        d = d.max((i as f64 / n as f64 - j as f64 / m as f64).abs());
    }
    let en = ((n * m) as f64 / (n + m) as f64).sqrt();
    let lambda = (en + 0.12 + 0.11 / en) * d;
    TestResult { statistic: d, p_value: kolmogorov_tail(lambda) }
}

/// `exp(z) K_nu(z)` for z > 0, by the trapezoid rule on `K_nu(z) = int_0^inf
/// exp(-z cosh t) cosh(nu t) dt` (its integrand decays doubly exponentially, so the rule
/// converges geometrically in the step).
fn scaled_bessel_k(nu: f64, z: f64) -> f64 {
    let h = 0.01f64;
    let mut sum = 0.5;
    let mut t = h;
    loop {
        let term = (-z * (t.cosh() - 1.0)).exp() * (nu * t).cosh();
        sum += term;
        if term < 1e-18 * sum {
            break;
        }
        t += h;
    }
    sum * h
}

/// The limiting Cramér-von Mises distribution's CDF at `x` (Csörgő and Faraway 1996,
/// eq. 1.3; all terms positive).
fn cvm_limit_cdf(x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    let pi = std::f64::consts::PI;
    let mut total = 0.0;
    for k in 0..500 {
        let kf = f64::from(k);
        let u = (ln_gamma(kf + 0.5) - ln_gamma(kf + 1.0)).exp() / (pi.powf(1.5) * x.sqrt());
        let y = 4.0 * kf + 1.0;
        let q = y * y / (16.0 * x);
        let term = u * y.sqrt() * (-2.0 * q).exp() * scaled_bessel_k(0.25, q);
        total += term;
        if term < 1e-17 * total {
            break;
        }
    }
    total.min(1.0)
}

/// The limiting distribution's upper tail `P(W^2 > x)`.
pub fn cvm_limit_tail(x: f64) -> f64 {
    (1.0 - cvm_limit_cdf(x)).clamp(0.0, 1.0)
}

/// Two-sample Cramér-von Mises test (Anderson 1962); `reference` must be sorted. The
/// statistic reported is T, the p-value is from T standardised by its exact mean and
/// variance.
pub fn cvm_two_sample(window: &[f64], reference: &[f64]) -> TestResult {
    let (nx, ny) = (window.len(), reference.len());
    if nx == 0 || ny == 0 {
        return TestResult { statistic: 0.0, p_value: 1.0 };
    }
    let mut x = window.to_vec();
    x.sort_by(f64::total_cmp);
    // Average ranks in the pooled sample, walking both sorted samples together.
    let (mut i, mut j, mut rank) = (0usize, 0usize, 0usize);
    let (mut ux, mut uy) = (0.0f64, 0.0f64);
    while i < nx || j < ny {
        let v = match (x.get(i), reference.get(j)) {
            (Some(&a), Some(&b)) => a.min(b),
            (Some(&a), None) => a,
            (None, Some(&b)) => b,
            (None, None) => break,
        };
        let (i0, j0) = (i, j);
        while i < nx && x[i] <= v {
            i += 1;
        }
        while j < ny && reference[j] <= v {
            j += 1;
        }
        let tied = (i - i0) + (j - j0);
        let avg = rank as f64 + (tied as f64 + 1.0) / 2.0;
        rank += tied;
        for k in i0..i {
            ux += (avg - (k + 1) as f64).powi(2);
        }
        for k in j0..j {
            uy += (avg - (k + 1) as f64).powi(2);
        }
    }
    let (nxf, nyf) = (nx as f64, ny as f64);
    let k = nxf * nyf;
    let n = nxf + nyf;
    let u = nxf * ux + nyf * uy;
    let t = u / (k * n) - (4.0 * k - 1.0) / (6.0 * n);
    let mean = (1.0 + 1.0 / n) / 6.0;
    let var = (n + 1.0) * (4.0 * k * n - 3.0 * (nxf * nxf + nyf * nyf) - 2.0 * k) / (45.0 * n * n * 4.0 * k);
    let standardised = 1.0 / 6.0 + (t - mean) / (45.0 * var).sqrt();
    TestResult { statistic: t, p_value: cvm_limit_tail(standardised) }
}

/// ln C(n, k).
fn ln_choose(n: u64, k: u64) -> f64 {
    ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
}

/// One-sided Fisher's exact test: `P(X >= flagged)` where X is the flagged count of a
/// window of `n` items drawn, without replacement, from the pooled window and held-out
/// items (`reference_flagged` of `reference_n`). Small when the window has more flagged
/// items than the held-out share explains.
pub fn fisher_greater(flagged: u64, n: u64, reference_flagged: u64, reference_n: u64) -> TestResult {
    let statistic = if n > 0 { flagged as f64 / n as f64 } else { 0.0 };
    if n == 0 || flagged == 0 {
        return TestResult { statistic, p_value: 1.0 };
    }
    let total = n + reference_n;
    let successes = flagged + reference_flagged;
    let top = n.min(successes);
    let ln_norm = ln_choose(total, n);
    let mut p = 0.0;
    for x in flagged..=top {
        let term = (ln_choose(successes, x) + ln_choose(total - successes, n - x) - ln_norm).exp();
        p += term;
        if term < p * 1e-17 {
            break;
        }
    }
    TestResult { statistic, p_value: p.clamp(0.0, 1.0) }
}

/// The standard normal quantile (Acklam's rational approximation, relative error below
/// 1.2e-9), for `p` in (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let low = 0.02425;
    if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::score::splitmix64;

    fn uniform(state: &mut u64) -> f64 {
        (splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64
    }

    #[test]
    fn kolmogorov_tail_matches_the_published_critical_values() {
        // Smirnov's table: P(K > 1.3581) = 0.05, 1.6276 -> 0.01, 1.9495 -> 0.001.
        // Below 1.18 the other series: P(K > 1.0727) = 0.2, P(K > 0.8276) = 0.5.
        for (lambda, p) in
            [(1.3581, 0.05), (1.6276, 0.01), (1.9495, 0.001), (1.2238, 0.10), (1.0727, 0.2), (0.8276, 0.5)]
        {
            let got = kolmogorov_tail(lambda);
            assert!((got - p).abs() < p * 0.01, "P(K > {lambda}) = {got}, want {p}");
        }
        assert_eq!(kolmogorov_tail(0.0), 1.0);
    }

    #[test]
    fn cvm_limit_matches_the_published_critical_values() {
        // Anderson and Darling (1952) / Csörgő and Faraway table 1 for the limit.
        for (x, p) in [(0.34730, 0.10), (0.46136, 0.05), (0.58061, 0.025), (0.74346, 0.01), (1.16786, 0.001)]
        {
            let got = cvm_limit_tail(x);
            assert!((got - p).abs() < p * 0.01, "P(W2 > {x}) = {got}, want {p}");
        }
        // Far in the tail it keeps falling smoothly (Bonferroni levels need it).
        let (a, b) = (cvm_limit_tail(2.0), cvm_limit_tail(2.5));
        assert!(a > b && b > 0.0 && a < 1e-4, "{a} {b}");
    }

    #[test]
    fn the_normal_quantile_inverts_known_points() {
        for (p, z) in [(0.5, 0.0), (0.975, 1.959_963_985), (0.001, -3.090_232_306), (1e-6, -4.753_424_309)] {
            assert!((normal_quantile(p) - z).abs() < 1e-6, "{p}: {}", normal_quantile(p));
        }
    }

    #[test]
    fn fisher_matches_a_hand_computed_table() {
        // Window 3 of 5 flagged, reference 1 of 5: P(X >= 3) from the hypergeometric with
        // N = 10, K = 4, n = 5: (C(4,3) C(6,2) + C(4,4) C(6,1)) / C(10,5) = (60 + 6) / 252.
        let r = fisher_greater(3, 5, 1, 5);
        assert!((r.p_value - 66.0 / 252.0).abs() < 1e-12, "{}", r.p_value);
        assert_eq!(fisher_greater(0, 100, 5, 100).p_value, 1.0);
        // 10% flagged in a window of 1000 against 5% of 600 held out: clearly more.
        assert!(fisher_greater(100, 1000, 30, 600).p_value < 1e-3);
    }

    /// Under the null the p-values of both distribution tests are uniform: at the sizes
    /// the window audit uses, the share under 0.05 and 0.01 is nominal within three
    /// standard errors over 2000 repetitions (fixed seed).
    #[test]
    fn distribution_tests_hold_their_level_at_window_sizes() {
        let mut state = 42u64;
        for (n, m) in [(100usize, 600usize), (1000, 2000)] {
            let reps = 2000;
            let (mut ks5, mut ks1, mut cvm5, mut cvm1) = (0, 0, 0, 0);
            for _ in 0..reps {
                let mut reference: Vec<f64> = (0..m).map(|_| uniform(&mut state)).collect();
                reference.sort_by(f64::total_cmp);
                let window: Vec<f64> = (0..n).map(|_| uniform(&mut state)).collect();
                let ks = ks_two_sample(&window, &reference).p_value;
                let cvm = cvm_two_sample(&window, &reference).p_value;
                ks5 += usize::from(ks < 0.05);
                ks1 += usize::from(ks < 0.01);
                cvm5 += usize::from(cvm < 0.05);
                cvm1 += usize::from(cvm < 0.01);
            }
            for (name, count, level) in
                [("ks", ks5, 0.05), ("ks", ks1, 0.01), ("cvm", cvm5, 0.05), ("cvm", cvm1, 0.01)]
            {
                let rate = count as f64 / reps as f64;
                let se = (level * (1.0 - level) / reps as f64).sqrt();
                assert!(
                    (rate - level).abs() < 3.0 * se + 0.002,
                    "{name} n={n} m={m}: rejects {rate} at level {level}"
                );
            }
        }
    }

    #[test]
    fn a_shifted_window_is_rejected_by_both() {
        let mut state = 7u64;
        let mut reference: Vec<f64> = (0..2000).map(|_| uniform(&mut state)).collect();
        reference.sort_by(f64::total_cmp);
        let window: Vec<f64> = (0..500).map(|_| uniform(&mut state) + 0.1).collect();
        assert!(ks_two_sample(&window, &reference).p_value < 1e-4);
        assert!(cvm_two_sample(&window, &reference).p_value < 1e-4);
        // Unshifted windows against the same reference: rejected about as often as the level.
        let rejected = (0..40)
            .filter(|_| {
                let fresh: Vec<f64> = (0..500).map(|_| uniform(&mut state)).collect();
                ks_two_sample(&fresh, &reference).p_value < 0.05
            })
            .count();
        assert!(rejected <= 6, "{rejected} of 40 unshifted windows rejected at 0.05");
    }
}
