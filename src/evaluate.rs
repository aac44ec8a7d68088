//! `eval` as a library function: score an ID set and OOD sets with a bundle, and measure
//! how well each score separates them: AUROC / FPR95 / AUPR per score and per OOD set,
//! the same per encoder layer (cosine and MSE alone), MFsim over several layer sets
//! (only the averaging changes, no refit), the mean over OOD sets, and what the
//! threshold in use flags. Writes `metrics.json`, `report.md` and SVG plots.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::data::DataSet;
use crate::encode::{encode_set_cached, EncodeOptions};
use crate::eval::metrics::{aupr, auroc, fpr_at_95_tpr};
use crate::eval::plots;
use crate::fit::{by_kind, FitError};
use crate::model::bundle::Bundle;
use crate::model::features::FeatureExtractor;
use crate::model::score::{mfsim_of, score_all, ItemScores, ScoreKind, ScoreSettings};

#[derive(Debug, Clone, Serialize)]
pub struct SetInfo {
    pub name: String,
    pub n: usize,
    pub skipped: usize,
    pub encode_seconds: f64,
    pub score_seconds: f64,
}

/// How well one encoder layer alone separates ID from an OOD set.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LayerSeparation {
    pub layer: usize,
    /// AUROC of 1 - cosine between the layer's features and their reconstruction.
    pub auroc_cos: f64,
    /// AUROC of the layer's reconstruction MSE.
    pub auroc_mse: f64,
}

/// MFsim averaged over one set of layers.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSetSeparation {
    pub layers: Vec<usize>,
    pub auroc: f64,
    pub fpr95: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OodResult {
    pub name: String,
    pub n: usize,
    pub auroc: BTreeMap<ScoreKind, f64>,
    pub fpr95: BTreeMap<ScoreKind, f64>,
    pub aupr: BTreeMap<ScoreKind, f64>,
    pub per_layer: Vec<LayerSeparation>,
    pub mfsim_layer_sets: Vec<LayerSetSeparation>,
    /// Share of this set flagged at the threshold in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flagged: Option<f64>,
}

/// The verdict rule the evaluation was measured at.
#[derive(Debug, Clone, Serialize)]
pub struct ThresholdInUse {
    pub score: ScoreKind,
    pub threshold: f64,
    /// "calibrated" (the bundle's) or "given" (`--threshold`).
    pub source: &'static str,
    /// Share of the ID test set flagged: the false-positive rate actually reached.
    pub id_flagged: f64,
    /// The rate the calibration aimed at (for a calibrated threshold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_fpr: Option<f64>,
}

/// Means over the OOD sets, so that choices are not made on one pair.
#[derive(Debug, Clone, Serialize, Default)]
pub struct MeanOverOod {
    pub auroc: BTreeMap<ScoreKind, f64>,
    pub fpr95: BTreeMap<ScoreKind, f64>,
    pub per_layer: Vec<LayerSeparation>,
    pub mfsim_layer_sets: Vec<LayerSetSeparation>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub id: SetInfo,
    pub sets: Vec<OodResult>,
    pub ood_sets: Vec<SetInfo>,
    pub model: String,
    /// The layers the reported MFsim averages.
    pub mfsim_layers: Vec<usize>,
    pub mean: MeanOverOod,
    /// None when no threshold applies (e.g. MFsim over other layers than calibrated).
    pub threshold: Option<ThresholdInUse>,
    /// Why `threshold` is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold_note: Option<String>,
}

/// How the verdict threshold for the evaluation is chosen.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThresholdChoice {
    /// The score that decides verdicts (None: the bundle's default).
    pub score: Option<ScoreKind>,
    /// An absolute threshold (None: the bundle's calibrated one).
    pub value: Option<f64>,
}

struct Scored {
    info: SetInfo,
    items: Vec<ItemScores>,
    scores: BTreeMap<ScoreKind, Vec<f64>>,
}

impl Scored {
    fn layer_values(&self, layer: usize, cos: bool) -> Vec<f64> {
        self.items.iter().map(|s| if cos { 1.0 - s.layers[layer].cos } else { s.layers[layer].mse }).collect()
    }

    fn mfsim_over(&self, layers: &[usize]) -> Vec<f64> {
        self.items.iter().map(|s| mfsim_of(&s.layers, layers)).collect()
    }
}

/// What every set of an evaluation is scored with.
struct Context<'a> {
    bundle: &'a Bundle,
    extractor: &'a FeatureExtractor,
    settings: &'a ScoreSettings,
    limit: Option<usize>,
    opts: &'a EncodeOptions,
    cache: Option<&'a Path>,
}

fn score_set(cx: &Context, name: &str, spec: &str) -> Result<Scored, FitError> {
    let set = DataSet::open(spec)?.with_limit(cx.limit);
    let encoded = encode_set_cached(cx.extractor, &set, cx.opts, cx.cache)?;
    let started = std::time::Instant::now();
    let items = score_all(&cx.bundle.scorer(cx.settings), &encoded.values, &encoded.seeds, 256)?;
    Ok(Scored {
        info: SetInfo {
            name: name.to_string(),
            n: encoded.ids.len(),
            skipped: encoded.skipped.len(),
            encode_seconds: encoded.seconds,
            score_seconds: started.elapsed().as_secs_f64(),
        },
        scores: by_kind(&items),
        items,
    })
}

/// The layer sets MFsim is measured over: every run of deepest layers (all, all but the
/// first, ...), which is where the evidence points (shallow layers carry texture, not
/// content), plus the set in use when it is not one of them.
fn candidate_layer_sets(layers: usize, in_use: &[usize]) -> Vec<Vec<usize>> {
    let mut sets: Vec<Vec<usize>> = (0..layers).map(|first| (first..layers).collect()).collect();
    if !sets.iter().any(|s| s.as_slice() == in_use) {
        sets.push(in_use.to_vec());
    }
    sets
}

/// `1-4` for a run of layers, `0,2,4` otherwise.
pub fn layer_set_name(layers: &[usize]) -> String {
    let is_run = layers.windows(2).all(|w| w[1] == w[0] + 1);
    match (layers.first(), layers.last()) {
        (Some(a), Some(b)) if is_run && layers.len() > 1 => format!("{a}-{b}"),
        _ => layers.iter().map(usize::to_string).collect::<Vec<_>>().join(","),
    }
}

fn share_above(scores: &[f64], threshold: f64) -> f64 {
    scores.iter().filter(|&&s| s > threshold).count() as f64 / scores.len().max(1) as f64
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

fn compare(id: &Scored, ood: &Scored, layer_sets: &[Vec<usize>]) -> OodResult {
    let mut r = OodResult {
        name: ood.info.name.clone(),
        n: ood.info.n,
        auroc: BTreeMap::new(),
        fpr95: BTreeMap::new(),
        aupr: BTreeMap::new(),
        per_layer: Vec::new(),
        mfsim_layer_sets: Vec::new(),
        flagged: None,
    };
    for (kind, id_scores) in &id.scores {
        let Some(o) = ood.scores.get(kind) else { continue };
        if let Some(v) = auroc(id_scores, o) {
            r.auroc.insert(*kind, v);
        }
        if let Some(v) = fpr_at_95_tpr(id_scores, o) {
            r.fpr95.insert(*kind, v);
        }
        if let Some(v) = aupr(id_scores, o) {
            r.aupr.insert(*kind, v);
        }
    }
    let layers = id.items.first().map_or(0, |s| s.layers.len());
    if id.items.is_empty() || ood.items.is_empty() {
        return r;
    }
    for layer in 0..layers {
        let separation = |cos: bool| {
            auroc(&id.layer_values(layer, cos), &ood.layer_values(layer, cos)).unwrap_or(f64::NAN)
        };
        r.per_layer.push(LayerSeparation {
            layer,
            auroc_cos: separation(true),
            auroc_mse: separation(false),
        });
    }
    for set in layer_sets {
        let (a, b) = (id.mfsim_over(set), ood.mfsim_over(set));
        r.mfsim_layer_sets.push(LayerSetSeparation {
            layers: set.clone(),
            auroc: auroc(&a, &b).unwrap_or(f64::NAN),
            fpr95: fpr_at_95_tpr(&a, &b).unwrap_or(f64::NAN),
        });
    }
    r
}

fn mean_over(sets: &[OodResult]) -> MeanOverOod {
    let Some(first) = sets.first() else { return MeanOverOod::default() };
    let over_kinds = |pick: &dyn Fn(&OodResult) -> &BTreeMap<ScoreKind, f64>| {
        pick(first)
            .keys()
            .map(|k| (*k, mean(sets.iter().filter_map(|s| pick(s).get(k).copied()))))
            .collect::<BTreeMap<_, _>>()
    };
    MeanOverOod {
        auroc: over_kinds(&|s| &s.auroc),
        fpr95: over_kinds(&|s| &s.fpr95),
        per_layer: (0..first.per_layer.len())
            .map(|l| LayerSeparation {
                layer: l,
                auroc_cos: mean(sets.iter().map(|s| s.per_layer[l].auroc_cos)),
                auroc_mse: mean(sets.iter().map(|s| s.per_layer[l].auroc_mse)),
            })
            .collect(),
        mfsim_layer_sets: (0..first.mfsim_layer_sets.len())
            .map(|i| LayerSetSeparation {
                layers: first.mfsim_layer_sets[i].layers.clone(),
                auroc: mean(sets.iter().map(|s| s.mfsim_layer_sets[i].auroc)),
                fpr95: mean(sets.iter().map(|s| s.mfsim_layer_sets[i].fpr95)),
            })
            .collect(),
    }
}

/// The threshold verdicts would use, or why there is none.
fn threshold_in_use(
    bundle: &Bundle,
    settings: &ScoreSettings,
    choice: ThresholdChoice,
    id: &Scored,
) -> Result<ThresholdInUse, String> {
    let meta = &bundle.meta;
    let spec =
        crate::config::ThresholdSpec { score_kind: choice.score, value: choice.value, ..Default::default() };
    let score = choice.score.unwrap_or(meta.default_score);
    // The calibrated thresholds hold for the settings they were calibrated with only.
    if choice.value.is_none()
        && (settings.draws != meta.scoring.draws || settings.layer_norm != meta.scoring.layer_norm)
    {
        return Err("the calibrated thresholds are for the bundle's draws and layer normalisation; pass \
                    --threshold or refit with these settings"
            .into());
    }
    // The calibrated MFsim threshold holds for the layers it was calibrated on only.
    if choice.value.is_none()
        && score == ScoreKind::Mfsim
        && settings.mfsim_layers != meta.scoring.mfsim_layers
    {
        return Err(format!(
            "the calibrated MFsim threshold is for layers {}, not {}; pass --threshold or recalibrate",
            layer_set_name(&meta.scoring.layers_in_use(meta.offsets.layers())),
            layer_set_name(&settings.layers_in_use(meta.offsets.layers()))
        ));
    }
    let resolved = crate::stream::decide::resolve_threshold(
        &spec,
        &meta.calibration,
        meta.default_score,
        meta.has_first_epoch,
    )
    .map_err(|e| e.to_string())?;
    let Some(id_scores) = id.scores.get(&score) else {
        return Err(format!("the bundle has no {score} score"));
    };
    let threshold = resolved.value;
    let (source, target_fpr) = match choice.value {
        Some(_) => ("given", None),
        None => ("calibrated", Some(meta.calibration.target_fpr)),
    };
    Ok(ThresholdInUse { score, threshold, source, id_flagged: share_above(id_scores, threshold), target_fpr })
}

#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    bundle: &Bundle,
    extractor: &FeatureExtractor,
    settings: &ScoreSettings,
    choice: ThresholdChoice,
    id_spec: &str,
    oods: &[(String, String)],
    limit: Option<usize>,
    opts: &EncodeOptions,
    cache: Option<&Path>,
    out_dir: &Path,
) -> Result<EvalReport, FitError> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| FitError::Invalid(format!("cannot create {}: {e}", out_dir.display())))?;
    bundle.scorer(settings).validate()?;
    let cx = Context { bundle, extractor, settings, limit, opts, cache };
    let id = score_set(&cx, "id", id_spec)?;
    let mut scored_oods = Vec::new();
    for (name, spec) in oods {
        scored_oods.push(score_set(&cx, name, spec)?);
    }
    let in_use = settings.layers_in_use(bundle.meta.offsets.layers());
    let layer_sets = candidate_layer_sets(bundle.meta.offsets.layers(), &in_use);
    let (threshold, threshold_note) = match threshold_in_use(bundle, settings, choice, &id) {
        Ok(t) => (Some(t), None),
        Err(note) => (None, Some(note)),
    };
    let mut sets: Vec<OodResult> = scored_oods.iter().map(|o| compare(&id, o, &layer_sets)).collect();
    if let Some(t) = &threshold {
        for (r, o) in sets.iter_mut().zip(&scored_oods) {
            r.flagged = o.scores.get(&t.score).map(|s| share_above(s, t.threshold));
        }
    }
    let report = EvalReport {
        id: SetInfo { name: id_spec.to_string(), ..id.info.clone() },
        mean: mean_over(&sets),
        sets,
        ood_sets: scored_oods.iter().map(|o| o.info.clone()).collect(),
        model: bundle.path.display().to_string(),
        mfsim_layers: in_use,
        threshold,
        threshold_note,
    };
    write_outputs(bundle, &report, &id, &scored_oods, out_dir)?;
    Ok(report)
}

fn percent(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{:.2}%", v * 100.0)
    }
}

/// The Markdown tables of a report: the scores per OOD set (with their mean when there
/// are several), each layer alone, MFsim over layer sets, and the threshold in use.
pub fn table(report: &EvalReport) -> String {
    let kinds: Vec<ScoreKind> =
        ScoreKind::ALL.into_iter().filter(|k| report.sets.iter().any(|s| s.auroc.contains_key(k))).collect();
    let flagged_column =
        report.threshold.as_ref().map(|t| format!(" flagged ({} > {:.4}) |", t.score, t.threshold));
    let mut out = String::from("| OOD set | n |");
    for metric in ["AUROC", "FPR95", "AUPR"] {
        for k in &kinds {
            out.push_str(&format!(" {metric} {} |", k.name()));
        }
    }
    out.push_str(flagged_column.as_deref().unwrap_or(""));
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(kinds.len() * 3 + usize::from(flagged_column.is_some())));
    out.push('\n');
    for s in &report.sets {
        out.push_str(&format!("| {} | {} |", s.name, s.n));
        for (map, is_rate) in [(&s.auroc, false), (&s.fpr95, true), (&s.aupr, false)] {
            for k in &kinds {
                match map.get(k) {
                    Some(v) if is_rate => out.push_str(&format!(" {} |", percent(*v))),
                    Some(v) => out.push_str(&format!(" {v:.4} |")),
                    None => out.push_str(" - |"),
                }
            }
        }
        if flagged_column.is_some() {
            out.push_str(&format!(" {} |", s.flagged.map_or("-".into(), percent)));
        }
        out.push('\n');
    }
    if report.sets.len() > 1 {
        out.push_str(&format!("| mean of {} sets | |", report.sets.len()));
        for k in &kinds {
            out.push_str(&format!(
                " {} |",
                report.mean.auroc.get(k).map_or("-".into(), |v| format!("{v:.4}"))
            ));
        }
        for k in &kinds {
            out.push_str(&format!(" {} |", report.mean.fpr95.get(k).map_or("-".into(), |v| percent(*v))));
        }
        out.push_str(&" |".repeat(kinds.len() + usize::from(flagged_column.is_some())));
        out.push('\n');
    }
    if let Some(t) = &report.threshold {
        let how = match t.target_fpr {
            Some(f) => format!("calibrated for a {} false-positive rate", percent(f)),
            None => "given".into(),
        };
        out.push_str(&format!(
            "\nVerdicts: {} > {:.6} ({how}): {} of the ID test set flagged.\n",
            t.score,
            t.threshold,
            percent(t.id_flagged)
        ));
    } else if let Some(note) = &report.threshold_note {
        out.push_str(&format!("\nNo flagged shares: {note}.\n"));
    }
    let Some(first) = report.sets.first() else { return out };
    let several = report.sets.len() > 1;
    // Each layer alone: which layers carry the separation.
    out.push_str("\nEach layer alone, AUROC of 1 - cos / of MSE:\n\n| layer |");
    for s in &report.sets {
        out.push_str(&format!(" {} |", s.name));
    }
    out.push_str(if several { " mean |\n|---|" } else { "\n|---|" });
    out.push_str(&"---|".repeat(report.sets.len() + usize::from(several)));
    out.push('\n');
    for l in 0..first.per_layer.len() {
        out.push_str(&format!("| {l} |"));
        let cell = |p: &LayerSeparation| format!(" {:.4} / {:.4} |", p.auroc_cos, p.auroc_mse);
        for s in &report.sets {
            out.push_str(&cell(&s.per_layer[l]));
        }
        if several {
            out.push_str(&cell(&report.mean.per_layer[l]));
        }
        out.push('\n');
    }
    out.push_str("\nMFsim over layer sets, AUROC / FPR95:\n\n| layers |");
    for s in &report.sets {
        out.push_str(&format!(" {} |", s.name));
    }
    out.push_str(if several { " mean |\n|---|" } else { "\n|---|" });
    out.push_str(&"---|".repeat(report.sets.len() + usize::from(several)));
    out.push('\n');
    for (i, set) in first.mfsim_layer_sets.iter().enumerate() {
        let mark = if set.layers == report.mfsim_layers { " (in use)" } else { "" };
        out.push_str(&format!("| {}{mark} |", layer_set_name(&set.layers)));
        let cell = |p: &LayerSetSeparation| format!(" {:.4} / {} |", p.auroc, percent(p.fpr95));
        for s in &report.sets {
            out.push_str(&cell(&s.mfsim_layer_sets[i]));
        }
        if several {
            out.push_str(&cell(&report.mean.mfsim_layer_sets[i]));
        }
        out.push('\n');
    }
    out
}

fn write_outputs(
    bundle: &Bundle,
    report: &EvalReport,
    id: &Scored,
    oods: &[Scored],
    dir: &Path,
) -> Result<(), FitError> {
    let io = |e: std::io::Error| FitError::Invalid(format!("writing to {}: {e}", dir.display()));
    let metrics = serde_json::json!({
        "id": {"name": report.id.name, "n": report.id.n},
        "sets": report.sets,
        "mean": report.mean,
        "mfsim_layers": report.mfsim_layers,
        "threshold": report.threshold,
        "threshold_note": report.threshold_note,
        "model": report.model,
        "timing": {"id": report.id, "ood": report.ood_sets},
    });
    std::fs::write(dir.join("metrics.json"), serde_json::to_string_pretty(&metrics).unwrap_or_default())
        .map_err(io)?;

    let mut md = format!(
        "# dlsr evaluation\n\nModel: `{}` (encoder {}, {} px, LFDN W={} N={}, t0={}, MFsim over layers {})\n\n\
         ID: `{}` ({} items)\n\n",
        report.model,
        bundle.meta.encoder.name,
        bundle.meta.preprocess.size,
        bundle.meta.lfdn.width,
        bundle.meta.lfdn.depth,
        bundle.meta.scoring.t0,
        layer_set_name(&report.mfsim_layers),
        report.id.name,
        report.id.n
    );
    md.push_str(&table(report));
    md.push_str(
        "\nAUROC and AUPR treat OOD as positive. FPR95 is the false-positive rate at 95% true-positive \
         rate with ID as the positive class: the share of OOD items accepted by the threshold that \
         accepts 95% of ID items. Per-layer rows score each layer alone (1 - cosine, or MSE, between \
         the layer's features and their reconstruction).\n\nPlots: ",
    );
    let mut plot_names = Vec::new();
    for (kind, id_scores) in &id.scores {
        let ood_lists: Vec<(&str, &[f64])> = oods
            .iter()
            .filter_map(|o| o.scores.get(kind).map(|v| (o.info.name.as_str(), v.as_slice())))
            .collect();
        if ood_lists.is_empty() {
            continue;
        }
        let threshold =
            report.threshold.as_ref().filter(|t| t.score == *kind).map(|t| t.threshold).or_else(|| {
                match (kind, report.threshold_note.is_some()) {
                    (ScoreKind::Mfsim, true) => None,
                    _ => bundle.meta.calibration.scores.get(kind).map(|c| c.threshold),
                }
            });
        let plot_err = |e: plots::PlotError| FitError::Invalid(e.to_string());
        let hist = format!("hist_{}.svg", kind.name());
        plots::score_histogram(
            &dir.join(&hist),
            &format!("{} scores: ID vs OOD", kind.name()),
            id_scores,
            &ood_lists,
            threshold,
        )
        .map_err(plot_err)?;
        let curves: Vec<(String, &[f64], &[f64])> =
            ood_lists.iter().map(|(n, v)| (n.to_string(), id_scores.as_slice(), *v)).collect();
        let roc = format!("roc_{}.svg", kind.name());
        plots::roc_curves(&dir.join(&roc), &format!("ROC, {} score", kind.name()), &curves)
            .map_err(plot_err)?;
        let roc_log = format!("roc_log_{}.svg", kind.name());
        plots::roc_curves_log_fpr(
            &dir.join(&roc_log),
            &format!("ROC, {} score, low false-positive rates", kind.name()),
            &curves,
        )
        .map_err(plot_err)?;
        plot_names.push(format!("[{hist}]({hist}), [{roc}]({roc}), [{roc_log}]({roc_log})"));
    }
    let summary = &bundle.meta.training.summary;
    if plots::loss_curve(
        &dir.join("loss.svg"),
        &format!(
            "Training loss: LFDN W={} N={}, lr {}",
            bundle.meta.lfdn.width, bundle.meta.lfdn.depth, bundle.meta.training.config.lr
        ),
        &summary.epoch_loss,
    )
    .is_ok()
    {
        plot_names.push("training loss: [loss.svg](loss.svg)".into());
    }
    md.push_str(&plot_names.join("; "));
    md.push('\n');
    std::fs::write(dir.join("report.md"), md).map_err(io)?;
    Ok(())
}
/// The scoring candidates side by side on the same encoded sets: per candidate and OOD
/// set, AUROC and FPR95 of MSE and MFsim, and the cost per image relative to the first
/// row (encoding, measured once, plus each candidate's scoring).
pub fn comparison_table(rows: &[(String, EvalReport)]) -> String {
    let Some((_, first)) = rows.first() else { return String::new() };
    let items = |r: &EvalReport| (r.id.n + r.ood_sets.iter().map(|s| s.n).sum::<usize>()).max(1) as f64;
    let encode =
        |r: &EvalReport| r.id.encode_seconds + r.ood_sets.iter().map(|s| s.encode_seconds).sum::<f64>();
    let score = |r: &EvalReport| r.id.score_seconds + r.ood_sets.iter().map(|s| s.score_seconds).sum::<f64>();
    // Later rows read the features from the cache: every row is charged the first
    // row's encoding.
    let encode_per_item = encode(first) / items(first);
    let cost = |r: &EvalReport| encode_per_item + score(r) / items(r);
    let base = cost(first).max(1e-12);
    let mut out = String::from(
        "\n| scoring | OOD set | AUROC mse | AUROC mfsim | FPR95 mse | FPR95 mfsim | ms per image | cost |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (name, r) in rows {
        for s in &r.sets {
            let get = |m: &BTreeMap<ScoreKind, f64>, k| m.get(&k).copied().unwrap_or(f64::NAN);
            out.push_str(&format!(
                "| {name} | {} | {:.4} | {:.4} | {:.2}% | {:.2}% | {:.2} | {:.2}x |\n",
                s.name,
                get(&s.auroc, ScoreKind::Mse),
                get(&s.auroc, ScoreKind::Mfsim),
                get(&s.fpr95, ScoreKind::Mse) * 100.0,
                get(&s.fpr95, ScoreKind::Mfsim) * 100.0,
                cost(r) * 1000.0,
                cost(r) / base
            ));
        }
    }
    out
}
