//! Statistics shared by calibration (`crate::calibration`) and the audits
//! (`crate::audit`): the log-gamma function, the exact binomial upper tail (log-space pmf
//! sums) and the Clopper-Pearson interval. Below both, so neither imports the other.

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms; relative error below 1e-13).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series in its accurate range.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// P(X >= k) for X ~ Binomial(n, p), summed exactly from the pmf in log space.
pub fn binomial_upper_tail(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (nf, lp, lq) = (n as f64, p.ln(), (-p).ln_1p());
    let ln_pmf = |i: u64| {
        let i = i as f64;
        ln_gamma(nf + 1.0) - ln_gamma(i + 1.0) - ln_gamma(nf - i + 1.0) + i * lp + (nf - i) * lq
    };
    // Sum from whichever end has fewer terms: the upper tail directly, or 1 - the lower.
    let mode = ((nf + 1.0) * p).floor() as u64;
    if k > mode {
        let mut sum = 0.0;
        let ratio = p / (1.0 - p);
        let mut term = ln_pmf(k).exp();
        let mut i = k;
        while i <= n {
            sum += term;
            if term < sum * 1e-17 {
                break;
            }
            term *= (n - i) as f64 / (i + 1) as f64 * ratio;
            i += 1;
        }
        sum.min(1.0)
    } else {
        let mut lower = 0.0;
        let ratio = (1.0 - p) / p;
        let mut term = ln_pmf(k - 1).exp();
        let mut i = k - 1;
        loop {
            lower += term;
            if i == 0 || term < lower * 1e-17 {
                break;
            }
            term *= i as f64 / (n - i + 1) as f64 * ratio;
            i -= 1;
        }
        (1.0 - lower).clamp(0.0, 1.0)
    }
}

/// The exact (Clopper-Pearson) two-sided interval of a proportion k / n at `level`.
pub fn clopper_pearson(k: u64, n: u64, level: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let alpha = (1.0 - level) / 2.0;
    // P(X >= k | p) rises with p: bisect for the p where it equals alpha (lower end) and
    // where P(X <= k | p) = 1 - P(X >= k + 1 | p) falls to alpha (upper end).
    let bisect = |f: &dyn Fn(f64) -> bool| {
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if f(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let lower = if k == 0 { 0.0 } else { bisect(&|p| binomial_upper_tail(k, n, p) >= alpha) };
    let upper = if k == n { 1.0 } else { bisect(&|p| 1.0 - binomial_upper_tail(k + 1, n, p) <= alpha) };
    (lower, upper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_gamma_matches_factorials() {
        let mut fact = 1.0f64;
        for n in 1..30u32 {
            fact *= f64::from(n);
            assert!((ln_gamma(f64::from(n) + 1.0) - fact.ln()).abs() < 1e-10, "n = {n}");
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    }

    #[test]
    fn binomial_tail_matches_direct_sums() {
        // n = 10, p = 0.3: P(X >= 5) = 0.15026833.
        assert!((binomial_upper_tail(5, 10, 0.3) - 0.150_268_3).abs() < 1e-7);
        assert!((binomial_upper_tail(1, 10, 0.3) - (1.0 - 0.7f64.powi(10))).abs() < 1e-12);
        assert!((binomial_upper_tail(10, 10, 0.3) - 0.3f64.powi(10)).abs() < 1e-15);
        assert_eq!(binomial_upper_tail(0, 10, 0.3), 1.0);
        assert_eq!(binomial_upper_tail(11, 10, 0.3), 0.0);
        assert_eq!(binomial_upper_tail(3, 10, 0.0), 0.0);
        // Large n: 100 of 2000 at 5% is the mean (about one half); 160 is far out.
        let mid = binomial_upper_tail(100, 2000, 0.05);
        assert!((0.45..0.55).contains(&mid), "{mid}");
        let far = binomial_upper_tail(160, 2000, 0.05);
        assert!(far > 0.0 && far < 1e-7, "{far}");
        let big = binomial_upper_tail(5_000, 100_000, 0.05);
        assert!((0.45..0.55).contains(&big), "{big}");
    }

    #[test]
    fn clopper_pearson_covers_the_proportion() {
        let (lo, hi) = clopper_pearson(10, 100, 0.95);
        // Reference values (R: binom.test(10, 100)$conf.int): 0.04900469 0.17622260.
        assert!((lo - 0.049_004_69).abs() < 1e-6 && (hi - 0.176_222_6).abs() < 1e-6, "{lo} {hi}");
        assert_eq!(clopper_pearson(0, 50, 0.95).0, 0.0);
        assert_eq!(clopper_pearson(50, 50, 0.95).1, 1.0);
    }
}
