//! `eval` as a library function: score an ID set and OOD sets with a bundle, compute
//! AUROC / FPR95 / AUPR per score and per OOD set, and write `metrics.json`,
//! `report.md` and SVG plots into a directory.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::data::DataSet;
use crate::encode::{encode_set_cached, EncodeOptions};
use crate::eval::metrics::{aupr, auroc, fpr_at_95_tnr};
use crate::eval::plots;
use crate::fit::{by_kind, FitError};
use crate::model::bundle::Bundle;
use crate::model::features::FeatureExtractor;
use crate::model::score::{score_all, ScoreKind, ScoreSettings};

#[derive(Debug, Clone, Serialize)]
pub struct SetInfo {
    pub name: String,
    pub n: usize,
    pub skipped: usize,
    pub encode_seconds: f64,
    pub score_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OodResult {
    pub name: String,
    pub n: usize,
    pub auroc: BTreeMap<ScoreKind, f64>,
    pub fpr95: BTreeMap<ScoreKind, f64>,
    pub aupr: BTreeMap<ScoreKind, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub id: SetInfo,
    pub sets: Vec<OodResult>,
    pub ood_sets: Vec<SetInfo>,
    pub model: String,
}

struct Scored {
    info: SetInfo,
    scores: BTreeMap<ScoreKind, Vec<f64>>,
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
    let scores = score_all(&cx.bundle.scorer(cx.settings), &encoded.values, &encoded.seeds, 256)?;
    Ok(Scored {
        info: SetInfo {
            name: name.to_string(),
            n: encoded.ids.len(),
            skipped: encoded.skipped.len(),
            encode_seconds: encoded.seconds,
            score_seconds: started.elapsed().as_secs_f64(),
        },
        scores: by_kind(&scores),
    })
}

#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    bundle: &Bundle,
    extractor: &FeatureExtractor,
    settings: &ScoreSettings,
    id_spec: &str,
    oods: &[(String, String)],
    limit: Option<usize>,
    opts: &EncodeOptions,
    cache: Option<&Path>,
    out_dir: &Path,
) -> Result<EvalReport, FitError> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| FitError::Invalid(format!("cannot create {}: {e}", out_dir.display())))?;
    let cx = Context { bundle, extractor, settings, limit, opts, cache };
    let id = score_set(&cx, "id", id_spec)?;
    let mut scored_oods = Vec::new();
    for (name, spec) in oods {
        scored_oods.push(score_set(&cx, name, spec)?);
    }
    let mut sets = Vec::new();
    for ood in &scored_oods {
        let mut r = OodResult {
            name: ood.info.name.clone(),
            n: ood.info.n,
            auroc: BTreeMap::new(),
            fpr95: BTreeMap::new(),
            aupr: BTreeMap::new(),
        };
        for (kind, id_scores) in &id.scores {
            let Some(o) = ood.scores.get(kind) else { continue };
            if let Some(v) = auroc(id_scores, o) {
                r.auroc.insert(*kind, v);
            }
            if let Some(v) = fpr_at_95_tnr(id_scores, o) {
                r.fpr95.insert(*kind, v);
            }
            if let Some(v) = aupr(id_scores, o) {
                r.aupr.insert(*kind, v);
            }
        }
        sets.push(r);
    }
    let report = EvalReport {
        id: SetInfo { name: id_spec.to_string(), ..id.info.clone() },
        sets,
        ood_sets: scored_oods.iter().map(|o| o.info.clone()).collect(),
        model: bundle.path.display().to_string(),
    };
    write_outputs(bundle, &report, &id, &scored_oods, out_dir)?;
    Ok(report)
}

/// The Markdown table of a report.
pub fn table(report: &EvalReport) -> String {
    let kinds: Vec<ScoreKind> =
        ScoreKind::ALL.into_iter().filter(|k| report.sets.iter().any(|s| s.auroc.contains_key(k))).collect();
    let mut out = String::from("| OOD set | n |");
    for metric in ["AUROC", "FPR95", "AUPR"] {
        for k in &kinds {
            out.push_str(&format!(" {metric} {} |", k.name()));
        }
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(kinds.len() * 3));
    out.push('\n');
    for s in &report.sets {
        out.push_str(&format!("| {} | {} |", s.name, s.n));
        for map in [&s.auroc, &s.fpr95, &s.aupr] {
            for k in &kinds {
                match map.get(k) {
                    Some(v) => out.push_str(&format!(" {v:.4} |")),
                    None => out.push_str(" - |"),
                }
            }
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
        "sets": report.sets.iter().map(|s| serde_json::json!({
            "name": s.name, "n": s.n, "auroc": s.auroc, "fpr95": s.fpr95, "aupr": s.aupr,
        })).collect::<Vec<_>>(),
        "model": report.model,
        "timing": {"id": report.id, "ood": report.ood_sets},
    });
    std::fs::write(dir.join("metrics.json"), serde_json::to_string_pretty(&metrics).unwrap_or_default())
        .map_err(io)?;

    let mut md = format!(
        "# dlsr evaluation\n\nModel: `{}` (encoder {}, {} px, LFDN W={} N={}, t0={})\n\nID: `{}` ({} items)\n\n",
        report.model,
        bundle.meta.encoder.name,
        bundle.meta.preprocess.size,
        bundle.meta.lfdn.width,
        bundle.meta.lfdn.depth,
        bundle.meta.scoring.t0,
        report.id.name,
        report.id.n
    );
    md.push_str(&table(report));
    md.push_str("\nAUROC and AUPR treat OOD as positive; FPR95 is the fraction of OOD accepted at the threshold that accepts 95% of ID.\n\nPlots: ");
    let mut plot_names = Vec::new();
    for (kind, id_scores) in &id.scores {
        let ood_lists: Vec<(&str, &[f64])> = oods
            .iter()
            .filter_map(|o| o.scores.get(kind).map(|v| (o.info.name.as_str(), v.as_slice())))
            .collect();
        if ood_lists.is_empty() {
            continue;
        }
        let threshold = bundle.meta.calibration.scores.get(kind).map(|c| c.threshold);
        let hist = format!("hist_{}.svg", kind.name());
        plots::score_histogram(
            &dir.join(&hist),
            &format!("{} scores: ID vs OOD", kind.name()),
            id_scores,
            &ood_lists,
            threshold,
        )
        .map_err(|e| FitError::Invalid(e.to_string()))?;
        let roc = format!("roc_{}.svg", kind.name());
        let curves: Vec<(String, &[f64], &[f64])> =
            ood_lists.iter().map(|(n, v)| (n.to_string(), id_scores.as_slice(), *v)).collect();
        plots::roc_curves(&dir.join(&roc), &format!("ROC, {} score", kind.name()), &curves)
            .map_err(|e| FitError::Invalid(e.to_string()))?;
        plot_names.push(format!("[{hist}]({hist}), [{roc}]({roc})"));
    }
    md.push_str(&plot_names.join("; "));
    md.push('\n');
    std::fs::write(dir.join("report.md"), md).map_err(io)?;
    Ok(())
}
