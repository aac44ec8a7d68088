//! OOD detection metrics, higher score = more OOD. AUROC and AUPR take OOD as the
//! positive class: AUROC is exact with ties (Mann-Whitney with mid-ranks), AUPR is
//! average precision (step-wise, ties grouped). FPR95 follows the OOD literature's usual
//! convention, with ID as the positive class: the false-positive rate (OOD accepted as
//! ID) at the threshold where the true-positive rate (ID accepted) is 95%.

fn finite_sorted(v: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    s
}

/// Area under the ROC curve; `None` when either set is empty.
pub fn auroc(id: &[f64], ood: &[f64]) -> Option<f64> {
    if id.is_empty() || ood.is_empty() {
        return None;
    }
    let mut all: Vec<(f64, bool)> =
        id.iter().map(|&s| (s, false)).chain(ood.iter().map(|&s| (s, true))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their mean.
        let mid = (i + j + 2) as f64 / 2.0;
        rank_sum_pos += all[i..=j].iter().filter(|x| x.1).count() as f64 * mid;
        i = j + 1;
    }
    let (np, nn) = (ood.len() as f64, id.len() as f64);
    Some((rank_sum_pos - np * (np + 1.0) / 2.0) / (np * nn))
}

/// The score below or at which `fraction` of the ID scores lie (the smallest ID score
/// with at least that fraction at or below it).
pub fn id_acceptance_threshold(id: &[f64], fraction: f64) -> Option<f64> {
    let s = finite_sorted(id);
    if s.is_empty() {
        return None;
    }
    let k = ((fraction * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[k - 1])
}

/// FPR at 95% TPR with ID as the positive class (the OOD literature's "FPR95"): the
/// fraction of OOD scores at or below the threshold that accepts 95% of ID scores, i.e.
/// OOD wrongly accepted as ID. (With OOD as positive this would be the false-negative
/// rate at 95% true-negative rate: the same number, another name.)
pub fn fpr_at_95_tpr(id: &[f64], ood: &[f64]) -> Option<f64> {
    let threshold = id_acceptance_threshold(id, 0.95)?;
    if ood.is_empty() {
        return None;
    }
    Some(ood.iter().filter(|&&s| s <= threshold).count() as f64 / ood.len() as f64)
}

/// Scores sorted high to low and grouped by equal value: per group, how many OOD and
/// how many ID items it holds. Ties are one group, so every metric treats them alike.
fn tie_groups_descending(id: &[f64], ood: &[f64]) -> Vec<(f64, f64)> {
    let mut all: Vec<(f64, bool)> =
        id.iter().map(|&s| (s, false)).chain(ood.iter().map(|&s| (s, true))).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut groups: Vec<(f64, f64)> = Vec::new();
    let mut previous: Option<f64> = None;
    for (score, is_ood) in all {
        if previous != Some(score) {
            groups.push((0.0, 0.0));
            previous = Some(score);
        }
        if let Some(g) = groups.last_mut() {
            if is_ood {
                g.0 += 1.0
            } else {
                g.1 += 1.0
            }
        }
    }
    groups
}

/// Average precision with OOD positive.
pub fn aupr(id: &[f64], ood: &[f64]) -> Option<f64> {
    if id.is_empty() || ood.is_empty() {
        return None;
    }
    let total_pos = ood.len() as f64;
    let (mut tp, mut fp, mut ap, mut prev_recall) = (0.0, 0.0, 0.0, 0.0);
    for (pos, neg) in tie_groups_descending(id, ood) {
        tp += pos;
        fp += neg;
        let recall = tp / total_pos;
        ap += (recall - prev_recall) * tp / (tp + fp);
        prev_recall = recall;
    }
    Some(ap)
}

/// ROC curve points (fpr, tpr), from (0, 0) to (1, 1), one per distinct threshold.
pub fn roc_curve(id: &[f64], ood: &[f64]) -> Vec<(f64, f64)> {
    let (np, nn) = (ood.len().max(1) as f64, id.len().max(1) as f64);
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0.0, 0.0);
    for (pos, neg) in tie_groups_descending(id, ood) {
        tp += pos;
        fp += neg;
        points.push((fp / nn, tp / np));
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_by_hand() {
        // Perfect separation, reversed, and a hand-counted mix.
        assert_eq!(auroc(&[1.0, 2.0], &[3.0, 4.0]), Some(1.0));
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), Some(0.0));
        // Pairs (ood > id): 2 vs {1,3}: 1 win; 4 vs {1,3}: 2 wins -> 3/4.
        assert_eq!(auroc(&[1.0, 3.0], &[2.0, 4.0]), Some(0.75));
    }

    #[test]
    fn auroc_counts_ties_as_half() {
        // Every pair tied -> 0.5; one tie among four pairs -> (3 + 0.5)/4.
        assert_eq!(auroc(&[1.0, 1.0], &[1.0, 1.0]), Some(0.5));
        assert_eq!(auroc(&[1.0, 2.0], &[2.0, 3.0]), Some(0.875));
        assert_eq!(auroc(&[], &[1.0]), None);
    }

    #[test]
    fn fpr95_by_hand() {
        // 20 ID scores 1..=20: 95% accepted at threshold 19. OOD 5, 19, 19.5, 30: two of
        // four are at or below 19 -> 0.5.
        let id: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(id_acceptance_threshold(&id, 0.95), Some(19.0));
        assert_eq!(fpr_at_95_tpr(&id, &[5.0, 19.0, 19.5, 30.0]), Some(0.5));
        assert_eq!(fpr_at_95_tpr(&id, &[25.0]), Some(0.0));
    }

    #[test]
    fn aupr_by_hand() {
        // Descending: 4 (ood) 3 (id) 2 (ood) 1 (id): AP = 0.5 * 1 + 0.5 * 2/3.
        let ap = aupr(&[1.0, 3.0], &[2.0, 4.0]).unwrap();
        assert!((ap - (0.5 + 1.0 / 3.0)).abs() < 1e-12, "{ap}");
        // A tie of one ID and one OOD at the top: precision 1/2 at recall 1 -> 0.5.
        assert_eq!(aupr(&[5.0], &[5.0]), Some(0.5));
        assert_eq!(aupr(&[1.0], &[2.0]), Some(1.0));
    }

    #[test]
    fn roc_curve_runs_corner_to_corner() {
        let pts = roc_curve(&[1.0, 3.0], &[2.0, 4.0]);
        assert_eq!(pts, vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]);
    }
}
