//! The statistics of an audit: the exact binomial test of a flagged count against the
//! threshold's calibrated false-positive rate, its Clopper-Pearson interval, and the
//! k-means grouping of flagged items by their feature vectors (k chosen by silhouette).

use crate::model::score::splitmix64;

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

/// A grouping of points: each point's group and each group's centroid.
#[derive(Debug, Clone)]
pub struct Grouping {
    pub k: usize,
    pub assignment: Vec<usize>,
    pub centroids: Vec<Vec<f32>>,
    /// Mean silhouette of the chosen k on the evaluated sample (None for k = 1).
    pub silhouette: Option<f64>,
    /// The mean silhouette of every k tried, for the report.
    pub tried: Vec<(usize, f64)>,
}

/// Smallest group count tried, largest, and the silhouette below which the flagged items
/// are reported as one group (no structure worth naming).
pub const MIN_K: usize = 2;
pub const MAX_K: usize = 6;
pub const MIN_SILHOUETTE: f64 = 0.1;
/// Fewer points than this per group tried and that k is skipped.
const MIN_POINTS_PER_GROUP: usize = 5;
/// Points the silhouette is computed on (it is quadratic in their number).
const SILHOUETTE_SAMPLE: usize = 600;

fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum()
}

fn nearest(point: &[f32], centroids: &[Vec<f32>]) -> (usize, f64) {
    centroids.iter().enumerate().map(|(i, c)| (i, dist2(point, c))).fold((0, f64::INFINITY), |best, cur| {
        if cur.1 < best.1 {
            cur
        } else {
            best
        }
    })
}

/// Unit-length copies: the groups follow the direction of a feature vector (what kind of
/// content), not its size.
pub fn normalise_rows(points: &[Vec<f32>]) -> Vec<Vec<f32>> {
    points
        .iter()
        .map(|p| {
            let norm = p.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            p.iter().map(|x| x / norm).collect()
        })
        .collect()
}

/// k-means with k-means++ seeding from `seed`; (assignment, centroids).
pub fn kmeans(points: &[Vec<f32>], k: usize, seed: u64) -> (Vec<usize>, Vec<Vec<f32>>) {
    let n = points.len();
    let k = k.clamp(1, n.max(1));
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let mut state = seed;
    let mut uniform = move || (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
    let mut centroids = vec![points[(uniform() * n as f64) as usize % n].clone()];
    let mut d2: Vec<f64> = points.iter().map(|p| dist2(p, &centroids[0])).collect();
    while centroids.len() < k {
        let total: f64 = d2.iter().sum();
        let mut target = uniform() * total;
        let mut pick = n - 1;
        for (i, &d) in d2.iter().enumerate() {
            if target < d {
                pick = i;
                break;
            }
            target -= d;
        }
        centroids.push(points[pick].clone());
        for (i, p) in points.iter().enumerate() {
            d2[i] = d2[i].min(dist2(p, &centroids[centroids.len() - 1]));
        }
    }
    let dim = points[0].len();
    let mut assignment = vec![usize::MAX; n];
    for _ in 0..100 {
        let mut changed = false;
        for (i, p) in points.iter().enumerate() {
            let (c, _) = nearest(p, &centroids);
            if assignment[i] != c {
                assignment[i] = c;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        let mut sums = vec![vec![0f64; dim]; k];
        let mut counts = vec![0usize; k];
        for (p, &c) in points.iter().zip(&assignment) {
            counts[c] += 1;
            for (s, &x) in sums[c].iter_mut().zip(p) {
                *s += f64::from(x);
            }
        }
        for c in 0..k {
            // An emptied group keeps its old centroid.
            if counts[c] > 0 {
                centroids[c] = sums[c].iter().map(|s| (s / counts[c] as f64) as f32).collect();
            }
        }
    }
    (assignment, centroids)
}

/// Mean silhouette of an assignment (Euclidean), over at most [`SILHOUETTE_SAMPLE`]
/// evenly spaced points.
pub fn mean_silhouette(points: &[Vec<f32>], assignment: &[usize], k: usize) -> f64 {
    let n = points.len();
    let step = n.div_ceil(SILHOUETTE_SAMPLE).max(1);
    let sample: Vec<usize> = (0..n).step_by(step).collect();
    let mut total = 0.0;
    let mut counted = 0usize;
    for &i in &sample {
        let mut sum = vec![0.0f64; k];
        let mut count = vec![0usize; k];
        for &j in &sample {
            if i != j {
                sum[assignment[j]] += dist2(&points[i], &points[j]).sqrt();
                count[assignment[j]] += 1;
            }
        }
        let own = assignment[i];
        if count[own] == 0 {
            continue; // a singleton's silhouette is 0 by convention; leave it out
        }
        let a = sum[own] / count[own] as f64;
        let b = (0..k)
            .filter(|&c| c != own && count[c] > 0)
            .map(|c| sum[c] / count[c] as f64)
            .fold(f64::INFINITY, f64::min);
        if b.is_finite() {
            total += (b - a) / a.max(b).max(1e-12);
            counted += 1;
        }
    }
    if counted == 0 {
        0.0
    } else {
        total / counted as f64
    }
}

/// Groups `points` (already normalised): k in [`MIN_K`]..=[`MAX_K`] with the highest mean
/// silhouette, each k tried only with at least [`MIN_POINTS_PER_GROUP`] points per group;
/// one group when no k reaches [`MIN_SILHOUETTE`].
pub fn group(points: &[Vec<f32>], seed: u64) -> Grouping {
    let n = points.len();
    let mut tried = Vec::new();
    // (silhouette, k, assignment, centroids) of the best k so far.
    type Candidate = (f64, usize, Vec<usize>, Vec<Vec<f32>>);
    let mut best: Option<Candidate> = None;
    for k in MIN_K..=MAX_K {
        if n < k * MIN_POINTS_PER_GROUP {
            break;
        }
        let (assignment, centroids) = kmeans(points, k, seed ^ k as u64);
        let s = mean_silhouette(points, &assignment, k);
        tried.push((k, s));
        if best.as_ref().is_none_or(|b| s > b.0) {
            best = Some((s, k, assignment, centroids));
        }
    }
    match best {
        Some((s, k, assignment, centroids)) if s >= MIN_SILHOUETTE => {
            Grouping { k, assignment, centroids, silhouette: Some(s), tried }
        }
        _ => {
            let (assignment, centroids) = kmeans(points, 1, seed);
            Grouping { k: centroids.len(), assignment, centroids, silhouette: None, tried }
        }
    }
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

    #[test]
    fn kmeans_finds_separated_groups_and_the_rule_picks_their_number() {
        let mut state = 9u64;
        let mut noise = || ((splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 0.1;
        let centres = [[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let points: Vec<Vec<f32>> =
            (0..90).map(|i| centres[i % 3].iter().map(|c| c + noise()).collect()).collect();
        let g = group(&normalise_rows(&points), 1);
        assert_eq!(g.k, 3, "tried {:?}", g.tried);
        for i in 0..90 {
            assert_eq!(g.assignment[i], g.assignment[i % 3], "point {i}");
        }
        // One Gaussian blob has no structure worth naming.
        let blob: Vec<Vec<f32>> = (0..200).map(|i| crate::model::score::item_noise(i, 0, 32)).collect();
        let one = group(&blob, 1);
        assert_eq!(one.k, 1, "tried {:?}", one.tried);
        assert!(group(&blob[..3], 1).k == 1);
    }
}
