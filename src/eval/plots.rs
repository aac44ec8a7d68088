//! Plots for an evaluation, as SVG (no fonts or system libraries needed): per score, the
//! ID score histogram against each OOD set's, with the calibrated threshold; and the ROC
//! curves of every OOD set, on a linear and on a logarithmic false-positive axis (at AUROC
//! 0.99 everything that matters happens below 5% FPR).

use std::path::Path;

use plotters::prelude::*;

use super::metrics::roc_curve;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {reason}")]
pub struct PlotError {
    path: String,
    reason: String,
}

fn err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |reason| PlotError { path: path.display().to_string(), reason }
}

/// Draws the series' legend at `position` and writes the file.
fn legend_and_present<'a, X: Ranged, Y: Ranged>(
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    position: SeriesLabelPosition,
    e: &dyn Fn(String) -> PlotError,
) -> Result<(), PlotError> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}

/// Density histograms of ID and OOD scores, 60 bins. The whole range is shown unless a
/// few extreme values would squash the picture (full range over 3x the 0.5%..99.5%
/// range); then the plot spans 0.5%..99.5% and each series' legend says how many of its
/// items lie outside, counted in the edge bins.
pub fn score_histogram(
    path: &Path,
    title: &str,
    id: &[f64],
    oods: &[(&str, &[f64])],
    threshold: Option<f64>,
) -> Result<(), PlotError> {
    let e = err(path);
    let mut all: Vec<f64> =
        id.iter().chain(oods.iter().flat_map(|o| o.1.iter())).copied().filter(|x| x.is_finite()).collect();
    if all.is_empty() {
        return Err(e("no scores".into()));
    }
    all.sort_by(f64::total_cmp);
    let (min, max) = (all[0], all[all.len() - 1]);
    let q_lo = all[(all.len() as f64 * 0.005) as usize];
    let q_hi = all[((all.len() as f64 * 0.995) as usize).min(all.len() - 1)];
    let cut = max - min > 3.0 * (q_hi - q_lo) && q_hi > q_lo;
    let (lo, hi) = if cut { (q_lo, q_hi) } else { (min, max) };
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 1.0, lo + 1.0) };
    let bins = 60;
    let width = (hi - lo) / bins as f64;
    let density = |v: &[f64]| -> Vec<f64> {
        let mut h = vec![0.0; bins];
        for &x in v.iter().filter(|x| x.is_finite()) {
            let b = (((x - lo) / width).floor() as i64).clamp(0, bins as i64 - 1) as usize;
            h[b] += 1.0;
        }
        let n = v.len().max(1) as f64;
        h.iter().map(|c| c / n / width).collect()
    };
    let label = |name: String, v: &[f64]| -> String {
        let below = v.iter().filter(|&&x| x < lo).count();
        let above = v.iter().filter(|&&x| x > hi).count();
        match (below, above) {
            (0, 0) => name,
            (0, a) => format!("{name} ({a} above {hi:.4} in the last bin)"),
            (b, 0) => format!("{name} ({b} below {lo:.4} in the first bin)"),
            (b, a) => format!("{name} ({b} below, {a} above the range, in the edge bins)"),
        }
    };
    let mut series = vec![(label("ID".to_string(), id), density(id))];
    series.extend(oods.iter().map(|(name, v)| (label(format!("OOD: {name}"), v), density(v))));
    let ymax = series.iter().flat_map(|s| s.1.iter()).copied().fold(0.0, f64::max) * 1.1;

    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo..hi, 0.0..ymax.max(1e-12))
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("score (higher = more out-of-distribution)")
        .y_desc("density")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (i, (name, h)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = h
            .iter()
            .enumerate()
            .flat_map(|(b, &y)| [(lo + b as f64 * width, y), (lo + (b + 1) as f64 * width, y)])
            .collect();
        chart
            .draw_series(
                AreaSeries::new(pts.clone(), 0.0, color.mix(0.25)).border_style(color.stroke_width(2)),
            )
            .map_err(|x| e(x.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    if let Some(t) = threshold.filter(|t| (lo..=hi).contains(t)) {
        chart
            .draw_series(LineSeries::new(vec![(t, 0.0), (t, ymax)], BLACK.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label("threshold")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK.stroke_width(2)));
    }
    legend_and_present(chart, &root, SeriesLabelPosition::UpperRight, &e)
}

/// ROC curves of several (label, id scores, ood scores) triples.
pub fn roc_curves(path: &Path, title: &str, curves: &[(String, &[f64], &[f64])]) -> Result<(), PlotError> {
    let e = err(path);
    let root = SVGBackend::new(path, (620, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..1.0, 0.0..1.0)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("false-positive rate (ID flagged)")
        .y_desc("true-positive rate (OOD flagged)")
        .draw()
        .map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))
        .map_err(|x| e(x.to_string()))?;
    for (i, (label, id, ood)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let auc = super::metrics::auroc(id, ood).unwrap_or(f64::NAN);
        chart
            .draw_series(LineSeries::new(roc_curve(id, ood), color.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(format!("{label} (AUROC {auc:.4})"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2)));
    }
    legend_and_present(chart, &root, SeriesLabelPosition::LowerRight, &e)
}

/// ROC curves with a logarithmic false-positive axis, from half of one ID item's share to
/// 1 (a point at FPR 0 is drawn at the axis' left end), with the usual 5% and 1%
/// operating points marked.
pub fn roc_curves_log_fpr(
    path: &Path,
    title: &str,
    curves: &[(String, &[f64], &[f64])],
) -> Result<(), PlotError> {
    let e = err(path);
    let most_id = curves.iter().map(|c| c.1.len()).max().unwrap_or(1).max(1);
    let floor = 0.5 / most_id as f64;
    let root = SVGBackend::new(path, (720, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((floor..1.0).log_scale(), 0.0..1.0)
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("false-positive rate (ID flagged), log scale")
        .y_desc("true-positive rate (OOD flagged)")
        .x_label_formatter(&|v| {
            if *v >= 0.01 {
                format!("{:.0}%", v * 100.0)
            } else {
                format!("{:.2}%", v * 100.0)
            }
        })
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for rate in [0.01, 0.05] {
        chart
            .draw_series(LineSeries::new(vec![(rate, 0.0), (rate, 1.0)], BLACK.mix(0.25)))
            .map_err(|x| e(x.to_string()))?;
    }
    for (i, (label, id, ood)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> =
            roc_curve(id, ood).into_iter().map(|(f, t)| (f.max(floor), t)).collect();
        let tpr_at = |rate: f64| points.iter().filter(|p| p.0 <= rate).map(|p| p.1).fold(0.0, f64::max);
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(format!(
                "{label} (TPR {:.1}% at 1% FPR, {:.1}% at 5%)",
                tpr_at(0.01) * 100.0,
                tpr_at(0.05) * 100.0
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2)));
    }
    legend_and_present(chart, &root, SeriesLabelPosition::LowerRight, &e)
}

/// The training loss per epoch (log scale: diffusion losses fall fast, then slowly), with
/// the first-epoch point the LR score compares against marked by the curve's start.
pub fn loss_curve(path: &Path, title: &str, epoch_loss: &[f64]) -> Result<(), PlotError> {
    let e = err(path);
    let finite: Vec<f64> = epoch_loss.iter().copied().filter(|x| x.is_finite() && *x > 0.0).collect();
    if finite.is_empty() {
        return Err(e("no positive finite loss values".into()));
    }
    let (lo, hi) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let (lo, hi) = if hi > lo { (lo * 0.9, hi * 1.1) } else { (lo * 0.5, lo * 2.0) };
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(1f64..(epoch_loss.len().max(2) as f64), (lo..hi).log_scale())
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("mean training loss (log scale)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.3}"))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    let points: Vec<(f64, f64)> = epoch_loss
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite() && **l > 0.0)
        .map(|(i, &l)| (i as f64 + 1.0, l))
        .collect();
    chart
        .draw_series(LineSeries::new(points.clone(), COLORS[0].stroke_width(2)))
        .map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 2, COLORS[0].filled())))
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))
}
