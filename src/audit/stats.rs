//! The statistics of an audit: the k-means grouping of flagged items by their feature
//! vectors (k chosen by silhouette). The binomial test of a flagged count and its
//! Clopper-Pearson interval live in [`crate::stats`] (shared with calibration) and are
//! re-exported here.

use crate::model::score::splitmix64;
pub use crate::stats::{binomial_upper_tail, clopper_pearson, ln_gamma};

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
