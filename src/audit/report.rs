//! The audit's `report.html`: one self-contained page (thumbnails as `data:` URLs, plots
//! as inline SVG, CSS inline, no script, no font, no network; a Content-Security-Policy
//! forbids any request). Headline numbers carry `data-field`/`data-value` attributes so
//! that a browser test can check them against `summary.json`.

use std::fmt::Write as _;

use super::stats::{MAX_K, MIN_K, MIN_SILHOUETTE};
use super::{Card, SetSummary, GROUP_SAMPLE, SIGNIFICANCE};

/// What the page says about the model and the run.
pub struct ReportContext<'a> {
    pub title: &'a str,
    pub generated: &'a str,
    pub model_name: &'a str,
    pub model_sha256: &'a str,
    pub encoder: &'a str,
    pub input_size: i64,
    /// The held-out ID scores' quantiles of the score in force (0, 0.1%, ..., 100%).
    pub id_quantiles: &'a [f64],
    pub calibration_items: usize,
    pub calibration_source: &'a str,
    /// Channels of each feature layer, shallowest first.
    pub layer_channels: &'a [i64],
    /// The windows of `--window N` (empty: no window section), and their alpha.
    pub windows: &'a [super::window::WindowRecord],
    pub window_alpha: f64,
}

const SET_COLOURS: [&str; 2] = ["#1f77b4", "#ff7f0e"];

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn pct(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x != 0.0 && x.abs() < 0.001 {
        format!("{:.3}%", x * 100.0)
    } else {
        format!("{:.1}%", x * 100.0)
    }
}

fn num(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

/// A p-value as people read it (exact numbers are in summary.json).
pub fn p_value_text(p: f64) -> String {
    if p < 1e-300 {
        "< 1e-300".into()
    } else if p < 1e-3 {
        format!("{p:.2e}")
    } else {
        format!("{p:.3}")
    }
}

/// The name a layer gets in the report: shallow layers see texture, deep ones content.
fn layer_name(l: usize, layers: usize, channels: Option<i64>) -> String {
    let what = if l == 0 {
        "low-level texture"
    } else if l + 1 == layers {
        "high-level content"
    } else if 2 * l < layers {
        "edges and parts"
    } else {
        "object parts"
    };
    match channels {
        Some(c) => format!("layer {l} ({c} ch, {what})"),
        None => format!("layer {l} ({what})"),
    }
}

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}header p{margin:2px 0;color:#c9d1e0;font-size:13px}
main{padding:8px 28px 40px;max-width:1500px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;margin:16px 0;padding:14px 18px}
h2{font-size:18px;margin:4px 0 10px}h3{font-size:15px;margin:10px 0 6px}
.sets{display:grid;grid-template-columns:repeat(var(--n),minmax(0,1fr));gap:18px}
.headline .badge{display:inline-block;font-size:20px;font-weight:700;padding:6px 14px;border-radius:6px;margin-bottom:8px}
.badge.shifted{background:#fde2e1;color:#a4161a}.badge.in_distribution{background:#e0f3e5;color:#1b6b34}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:6px 0}dl.facts dt{color:#5b6475}dl.facts dd{margin:0;font-weight:600}
.set-label{font-size:13px;color:#5b6475;word-break:break-all}
.chip{display:inline-block;background:#eef0f4;border-radius:10px;padding:1px 8px;margin:1px 3px 1px 0;font-size:12px;font-weight:500}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(128px,1fr));gap:8px}
.strip{display:grid;grid-template-columns:repeat(auto-fill,minmax(96px,1fr));gap:6px}
figure.card{margin:0;border:1px solid #e1e4ea;border-radius:6px;padding:5px;background:#fff;font-size:11px}
figure.card.flagged{border-color:#e5989b}
figure.card img{width:100%;aspect-ratio:1;object-fit:contain;background:#111;border-radius:3px;image-rendering:auto}
figure.card figcaption{margin-top:3px;line-height:1.35;overflow-wrap:anywhere}
figure.card .id{color:#5b6475;word-break:break-all}
.note{color:#5b6475;font-size:13px}
table{border-collapse:collapse;font-size:13px}tr.shifted td{background:#fdecea}td,th{border-bottom:1px solid #e1e4ea;padding:3px 8px;text-align:left}
.group{border-top:1px solid #e1e4ea;padding-top:8px;margin-top:8px}
svg text{font-family:inherit}
"#;

/// The whole page.
pub fn render(ctx: &ReportContext, sets: &[&SetSummary]) -> String {
    let mut h = String::with_capacity(1 << 20);
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head><body>",
        escape(ctx.title)
    );
    let kind = sets.first().map(|s| s.score_kind.name()).unwrap_or("");
    let threshold = sets.first().map(|s| s.threshold).unwrap_or(f64::NAN);
    let _ = write!(
        h,
        "<header><h1>{}</h1><p>Model <b>{}</b> (sha256 {}…), encoder {} at {} px. Verdicts by the <b>{kind}</b> score \
         above {}. Generated {} by dlsr {}.</p></header><main>",
        escape(ctx.title),
        escape(ctx.model_name),
        escape(&ctx.model_sha256[..ctx.model_sha256.len().min(12)]),
        escape(ctx.encoder),
        ctx.input_size,
        num(threshold),
        escape(ctx.generated),
        env!("CARGO_PKG_VERSION"),
    );
    let cols = format!("<div class=\"sets\" style=\"--n:{}\">", sets.len());

    // Headline.
    h.push_str("<section><h2>Verdict</h2>");
    h.push_str(&cols);
    for (i, s) in sets.iter().enumerate() {
        headline(&mut h, i, s);
    }
    h.push_str("</div></section>");
    h.push_str(&super::window_report::section(ctx.windows, ctx.window_alpha));

    // Score distribution.
    let _ = write!(
        h,
        "<section><h2>Score distribution</h2><p class=\"note\">Distribution of the {kind} score of each set against \
         the bundle's held-out in-distribution scores ({} items from {}). Items right of the red line are flagged.</p>{}</section>",
        ctx.calibration_items,
        escape(ctx.calibration_source),
        score_distribution(ctx.id_quantiles, sets, threshold)
    );

    // Most out-of-distribution and most typical items.
    let _ = write!(h, "<section><h2>Most out-of-distribution items</h2>{cols}");
    for (i, s) in sets.iter().enumerate() {
        let reference = reference_distance(s);
        let _ = write!(
            h,
            "<div><h3 style=\"color:{}\">{}</h3><div class=\"grid\" id=\"top-{i}\" data-count=\"{}\">",
            SET_COLOURS[i % 2],
            escape(&s.label),
            s.top.len()
        );
        for (rank, c) in s.top.iter().enumerate() {
            card(&mut h, "top", Some(rank + 1), c, &reference);
        }
        h.push_str("</div><h3>Most typical items, for contrast</h3><div class=\"strip\">");
        for c in &s.typical {
            card(&mut h, "typical", None, c, &reference);
        }
        h.push_str("</div></div>");
    }
    h.push_str("</div><p class=\"note\">Under each image: its rank, score and ID percentile (the share of held-out \
        in-distribution items scoring lower), and one bar per feature layer, shallowest left: how far the layer's \
        reconstruction is from the item's features (1 − cosine), relative to the set's unflagged items (dashed line \
        = typical, bars capped at 5×).</p></section>");

    // Per layer.
    let _ = write!(
        h,
        "<section><h2>Which feature layers disagree</h2><p class=\"note\">Median reconstruction distance (1 − cosine) \
         per encoder layer for flagged and unflagged items. Shallow layers respond to texture and local statistics, \
         deep layers to content; a flagged set that differs mainly in deep layers shows different things, one that \
         differs mainly in shallow layers looks different (noise, compression, lighting).</p>{cols}"
    );
    for (i, s) in sets.iter().enumerate() {
        let _ = write!(
            h,
            "<div><h3 style=\"color:{}\">{}</h3>{}</div>",
            SET_COLOURS[i % 2],
            escape(&s.label),
            layer_chart(s, ctx.layer_channels)
        );
    }
    h.push_str("</div></section>");

    // Groups.
    let _ = write!(
        h,
        "<section><h2>What kinds of content were flagged</h2><p class=\"note\">Flagged items grouped by their feature \
         vectors (k-means on unit-length vectors). The number of groups k is chosen from {MIN_K} to {MAX_K} by the \
         highest mean silhouette; when no k reaches {MIN_SILHOUETTE}, the flagged items are shown as one group. With \
         more than {GROUP_SAMPLE} flagged items, the groups are found in a uniform sample of {GROUP_SAMPLE} and their \
         sizes are estimates.</p>{cols}"
    );
    for (i, s) in sets.iter().enumerate() {
        groups(&mut h, i, s, ctx.layer_channels);
    }
    h.push_str("</div></section>");

    // The test.
    let e = sets.first().map(|s| s.expected_rate).unwrap_or(f64::NAN);
    let m = ctx.calibration_items as u64;
    let (elo, ehi) = super::stats::clopper_pearson((e * m as f64).round() as u64, m, 0.95);
    let _ = write!(
        h,
        "<section id=\"method\"><h2>What the verdict means</h2>\
         <p>Each item is flagged when its {kind} score is above the threshold {}. On data like the held-out \
         in-distribution items the threshold flags a share <i>e</i> = {} of items (its calibrated false-positive rate). \
         The p-value is the probability of seeing at least the observed number of flagged items among <i>n</i> if the \
         set were in distribution: a one-sided exact binomial test of <i>k</i> of <i>n</i> against <i>e</i>. \
         The verdict is <b>shifted</b> when p &lt; {SIGNIFICANCE}, else <b>in distribution</b>. The interval given \
         with the flagged share is the exact (Clopper-Pearson) 95% interval.</p>\
         <p><b>What it does not say.</b> The flagged share is not the share of out-of-distribution items: about <i>e</i> \
         of in-distribution items are flagged too, and a flag is no proof about any single item. The test assumes the \
         items are independent (duplicates or bursts in a stream break that) and that <i>e</i> is exact, while it was \
         measured on {} held-out items: its own 95% interval is {}–{}, so a flagged share slightly above <i>e</i> on a \
         large set can be the threshold's error rather than a shift. A tiny shift in a large set can be significant \
         without mattering, and a large shift in a few items can go unnoticed; \"in distribution\" means no evidence of \
         a shift, not proof of its absence.</p></section>",
        num(threshold),
        pct(e),
        ctx.calibration_items,
        pct(elo),
        pct(ehi),
    );

    // Skipped items and sources.
    h.push_str("<section><h2>Skipped items and sources</h2>");
    h.push_str(&cols);
    for s in sets {
        sources_and_skipped(&mut h, s);
    }
    h.push_str("</div></section></main></body></html>\n");
    h
}

fn headline(h: &mut String, i: usize, s: &SetSummary) {
    let skipped: usize = s.skipped.values().sum();
    let verdict_text = if s.verdict == "shifted" { "Shifted" } else { "In distribution" };
    let _ = write!(
        h,
        "<div class=\"headline\" data-set=\"{i}\"><div class=\"set-label\" style=\"color:{}\">{}</div>\
         <div class=\"badge {}\" data-field=\"verdict\" data-value=\"{}\">{verdict_text}</div><dl class=\"facts\">\
         <dt>Items scored</dt><dd data-field=\"items\" data-value=\"{}\">{}</dd>\
         <dt>Flagged</dt><dd data-field=\"flagged\" data-value=\"{}\">{}</dd>\
         <dt>Flagged share</dt><dd data-field=\"flagged_rate\" data-value=\"{}\">{} <span class=\"note\">(95% CI {}–{})</span></dd>\
         <dt>Expected share</dt><dd data-field=\"expected_rate\" data-value=\"{}\">{} <span class=\"note\">(calibrated false-positive rate)</span></dd>\
         <dt>p-value</dt><dd data-field=\"p_value\" data-value=\"{}\">{}</dd>\
         <dt>Skipped</dt><dd data-field=\"skipped\" data-value=\"{skipped}\">{skipped}",
        SET_COLOURS[i % 2],
        escape(&s.label),
        s.verdict,
        s.verdict,
        s.items,
        s.items,
        s.flagged,
        s.flagged,
        s.flagged_rate,
        pct(s.flagged_rate),
        pct(s.flagged_rate_ci95.0),
        pct(s.flagged_rate_ci95.1),
        s.expected_rate,
        pct(s.expected_rate),
        s.p_value,
        p_value_text(s.p_value),
    );
    for (code, count) in &s.skipped {
        let _ = write!(
            h,
            " <span class=\"chip\" data-code=\"{}\">{}: {count}</span>",
            escape(code),
            escape(code)
        );
    }
    h.push_str("</dd></dl></div>");
}

/// Per layer, the distance an unflagged item typically has (the flagged median when
/// every item was flagged): the unit of the per-item bars.
fn reference_distance(s: &SetSummary) -> Vec<f64> {
    s.layer_median_unflagged
        .iter()
        .zip(&s.layer_median_flagged)
        .map(|(&u, &f)| if u.is_finite() && u > 0.0 { u } else { f })
        .collect()
}

fn card(h: &mut String, class: &str, rank: Option<usize>, c: &Card, reference: &[f64]) {
    let rank_text = rank.map(|r| format!("<b>#{r}</b> ")).unwrap_or_default();
    let _ = write!(
        h,
        "<figure class=\"card {class}{}\"{} data-score=\"{}\"><img alt=\"{}\" src=\"data:image/png;base64,{}\">\
         <figcaption>{rank_text}<span class=\"id\">{}</span><br>score {} · ID&nbsp;pct&nbsp;{:.1}%</figcaption>{}</figure>",
        if c.is_ood { " flagged" } else { "" },
        rank.map(|r| format!(" data-rank=\"{r}\"")).unwrap_or_default(),
        c.score,
        escape(&c.id),
        c.thumbnail,
        escape(&c.id),
        num(c.score),
        c.id_percentile,
        layer_bars(&c.layer_distance, reference),
    );
}

/// A small bar per layer: the item's distance over the typical one, capped at 5x.
fn layer_bars(distance: &[f32], reference: &[f64]) -> String {
    let (w, hgt, cap) = (110.0, 26.0, 5.0);
    let n = distance.len().max(1) as f64;
    let bw = w / n;
    let mut s = format!(
        "<svg width=\"100%\" height=\"{hgt}\" viewBox=\"0 0 {w} {hgt}\" preserveAspectRatio=\"none\" role=\"img\">"
    );
    for (l, &d) in distance.iter().enumerate() {
        let r = f64::from(d) / reference.get(l).copied().unwrap_or(f64::NAN);
        let ratio = if r.is_finite() { r.clamp(0.0, cap) } else { 0.0 };
        let bh = ratio / cap * (hgt - 2.0);
        let colour = if ratio > 2.0 { "#d62728" } else { "#8c96a8" };
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"><title>layer {l}: 1 − cos = {:.4} ({:.1}× typical)</title></rect>",
            l as f64 * bw + 1.0,
            hgt - 1.0 - bh,
            bw - 2.0,
            bh,
            d,
            r
        );
    }
    let y1 = hgt - 1.0 - (hgt - 2.0) / cap;
    let _ = write!(s, "<line x1=\"0\" x2=\"{w}\" y1=\"{y1:.1}\" y2=\"{y1:.1}\" stroke=\"#333\" stroke-dasharray=\"2,2\" stroke-width=\"0.7\"/></svg>");
    s
}

pub(crate) fn nice_ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / count.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + 1e-9 * step {
        out.push(t);
        t += step;
    }
    out
}

/// Histograms (share of items per bin) of the sets over the held-out ID scores', threshold
/// marked. The x
/// range covers the ID quantiles and the sets' 0.1%..99.9% range; items outside it are
/// counted in the caption rather than silently cut.
fn score_distribution(id_quantiles: &[f64], sets: &[&SetSummary], threshold: f64) -> String {
    let mut all: Vec<f64> =
        sets.iter().flat_map(|s| s.scores.iter().copied()).filter(|x| x.is_finite()).collect();
    all.sort_by(f64::total_cmp);
    let q = |p: f64| all.get(((all.len() as f64 - 1.0) * p).round() as usize).copied();
    let idq: Vec<f64> = id_quantiles.iter().copied().filter(|x| x.is_finite()).collect();
    let mut lo = idq.first().copied().unwrap_or(f64::INFINITY);
    let mut hi = idq.last().copied().unwrap_or(f64::NEG_INFINITY);
    if let (Some(a), Some(b)) = (q(0.001), q(0.999)) {
        lo = lo.min(a);
        hi = hi.max(b);
    }
    if threshold.is_finite() {
        lo = lo.min(threshold);
        hi = hi.max(threshold);
    }
    if !(lo.is_finite() && hi.is_finite()) {
        return "<p class=\"note\">No scores.</p>".into();
    }
    let pad = (hi - lo).max(1e-9) * 0.03;
    let (lo, hi) = (lo - pad, hi + pad);
    let bins = 70usize;
    let width = (hi - lo) / bins as f64;
    let bin_of = |x: f64| (((x - lo) / width).floor() as i64).clamp(0, bins as i64 - 1) as usize;
    // ID density: each interval between stored quantiles holds an equal share of mass.
    let mut id_density = vec![0.0; bins];
    if idq.len() >= 2 {
        let mass = 1.0 / (idq.len() - 1) as f64;
        for w in idq.windows(2) {
            let (a, b) = (w[0], w[1]);
            if b <= a {
                id_density[bin_of(a)] += mass;
                continue;
            }
            for (bin, d) in id_density.iter_mut().enumerate() {
                let (x0, x1) = (lo + bin as f64 * width, lo + (bin + 1) as f64 * width);
                let overlap = (b.min(x1) - a.max(x0)).max(0.0);
                *d += mass * overlap / (b - a);
            }
        }
    }
    let mut outside = Vec::new();
    let set_density: Vec<Vec<f64>> = sets
        .iter()
        .map(|s| {
            let mut h = vec![0.0; bins];
            let (mut below, mut above) = (0, 0);
            for &x in s.scores.iter().filter(|x| x.is_finite()) {
                if x < lo {
                    below += 1;
                } else if x >= hi {
                    above += 1;
                } else {
                    h[bin_of(x)] += 1.0;
                }
            }
            if below + above > 0 {
                outside.push(format!("{}: {below} below and {above} above the plotted range", s.label));
            }
            let n = s.scores.len().max(1) as f64;
            h.iter().map(|c| c / n).collect()
        })
        .collect();
    let ymax =
        id_density.iter().chain(set_density.iter().flatten()).copied().fold(0.0, f64::max).max(1e-12) * 1.08;
    let (w, hgt, ml, mr, mt, mb) = (960.0, 340.0, 64.0, 16.0, 16.0, 44.0);
    let (pw, ph) = (w - ml - mr, hgt - mt - mb);
    let x = |v: f64| ml + (v - lo) / (hi - lo) * pw;
    let y = |d: f64| mt + ph - d / ymax * ph;
    let mut s = format!(
        "<svg id=\"score-distribution\" viewBox=\"0 0 {w} {hgt}\" width=\"100%\" style=\"max-width:{w}px\" role=\"img\" aria-label=\"score distribution\">"
    );
    let _ = write!(
        s,
        "<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"#fbfbfd\" stroke=\"#d5d9e0\"/>"
    );
    for t in nice_ticks(lo, hi, 8) {
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1}\" y2=\"{2}\" stroke=\"#888\"/><text x=\"{0:.1}\" y=\"{3}\" font-size=\"11\" text-anchor=\"middle\">{4}</text>",
            x(t),
            mt + ph,
            mt + ph + 4.0,
            mt + ph + 16.0,
            num(t)
        );
    }
    for t in nice_ticks(0.0, ymax, 4) {
        let _ = write!(
            s,
            "<line x1=\"{ml}\" x2=\"{}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#eceef2\"/><text x=\"{2}\" y=\"{3:.1}\" font-size=\"11\" text-anchor=\"end\">{4}</text>",
            ml + pw,
            y(t),
            ml - 6.0,
            y(t) + 4.0,
            pct(t)
        );
    }
    let step_path = |d: &[f64]| -> String {
        let mut p = format!("M{:.1},{:.1}", x(lo), y(0.0));
        for (b, &v) in d.iter().enumerate() {
            let (x0, x1) = (lo + b as f64 * width, lo + (b + 1) as f64 * width);
            let _ = write!(p, " L{:.1},{:.1} L{:.1},{:.1}", x(x0), y(v), x(x1), y(v));
        }
        let _ = write!(p, " L{:.1},{:.1}", x(hi), y(0.0));
        p
    };
    let _ = write!(
        s,
        "<path d=\"{} Z\" fill=\"#c7ccd6\" fill-opacity=\"0.7\" stroke=\"#8c96a8\"/>",
        step_path(&id_density)
    );
    for (i, d) in set_density.iter().enumerate() {
        let _ = write!(
            s,
            "<path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>",
            step_path(d),
            SET_COLOURS[i % 2]
        );
    }
    if threshold.is_finite() {
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{mt}\" y2=\"{1}\" stroke=\"#d62728\" stroke-width=\"2\" stroke-dasharray=\"6,4\"/>\
             <text x=\"{2:.1}\" y=\"{3}\" font-size=\"12\" fill=\"#d62728\">threshold {4}</text>",
            x(threshold),
            mt + ph,
            x(threshold) + 5.0,
            mt + 14.0,
            num(threshold)
        );
    }
    // Legend.
    let mut ly = mt + 14.0;
    let lx = ml + pw - 260.0;
    let _ = write!(s, "<rect x=\"{lx}\" y=\"{:.1}\" width=\"14\" height=\"10\" fill=\"#c7ccd6\" stroke=\"#8c96a8\"/><text x=\"{}\" y=\"{ly}\" font-size=\"12\">held-out in-distribution</text>", ly - 9.0, lx + 20.0);
    for (i, set) in sets.iter().enumerate() {
        ly += 16.0;
        let label: String = set.label.chars().take(34).collect();
        let _ = write!(
            s,
            "<line x1=\"{lx}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{ly}\" font-size=\"12\">{}</text>",
            lx + 14.0,
            ly - 4.0,
            ly - 4.0,
            SET_COLOURS[i % 2],
            lx + 20.0,
            escape(&label)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">score (higher = more out-of-distribution)</text>\
         <text x=\"14\" y=\"{}\" font-size=\"12\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">share of items per bin</text></svg>",
        ml + pw / 2.0,
        hgt - 6.0,
        mt + ph / 2.0,
        mt + ph / 2.0
    );
    if !outside.is_empty() {
        let _ = write!(s, "<p class=\"note\">Not drawn: {}.</p>", escape(&outside.join("; ")));
    }
    s
}

/// Grouped horizontal bars: per layer, the median distance of flagged and unflagged items.
fn layer_chart(s: &SetSummary, channels: &[i64]) -> String {
    let layers = s.layer_median_flagged.len();
    if layers == 0 {
        return "<p class=\"note\">No items.</p>".into();
    }
    let max = s
        .layer_median_flagged
        .iter()
        .chain(&s.layer_median_unflagged)
        .copied()
        .filter(|x| x.is_finite())
        .fold(0.0, f64::max)
        .max(1e-12);
    let (w, row, ml) = (620.0, 34.0, 230.0);
    let hgt = layers as f64 * row + 30.0;
    let pw = w - ml - 90.0;
    let mut out = format!("<svg class=\"layers\" viewBox=\"0 0 {w} {hgt}\" width=\"100%\" style=\"max-width:{w}px\" role=\"img\">");
    for l in 0..layers {
        let y0 = 6.0 + l as f64 * row;
        let _ = write!(
            out,
            "<text x=\"{}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"end\">{}</text>",
            ml - 8.0,
            y0 + 17.0,
            escape(&layer_name(l, layers, channels.get(l).copied()))
        );
        for (j, (v, colour, what)) in [
            (s.layer_median_flagged[l], "#d62728", "flagged"),
            (s.layer_median_unflagged[l], "#8c96a8", "unflagged"),
        ]
        .into_iter()
        .enumerate()
        {
            let bw = if v.is_finite() { v / max * pw } else { 0.0 };
            let y = y0 + 3.0 + j as f64 * 13.0;
            let _ = write!(
                out,
                "<rect x=\"{ml}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"11\" fill=\"{colour}\"><title>{what}: {}</title></rect>\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{}</text>",
                num(v),
                ml + bw + 4.0,
                y + 9.0,
                num(v)
            );
        }
        let ratio = s.layer_median_flagged[l] / s.layer_median_unflagged[l];
        if ratio.is_finite() {
            let _ = write!(
                out,
                "<text x=\"{}\" y=\"{:.1}\" font-size=\"11\" fill=\"#5b6475\">{ratio:.1}×</text>",
                w - 40.0,
                y0 + 17.0
            );
        }
    }
    let _ = write!(
        out,
        "<rect x=\"{ml}\" y=\"{0:.1}\" width=\"10\" height=\"10\" fill=\"#d62728\"/><text x=\"{1}\" y=\"{2:.1}\" font-size=\"11\">flagged</text>\
         <rect x=\"{3}\" y=\"{0:.1}\" width=\"10\" height=\"10\" fill=\"#8c96a8\"/><text x=\"{4}\" y=\"{2:.1}\" font-size=\"11\">unflagged (ratio right)</text></svg>",
        hgt - 18.0,
        ml + 14.0,
        hgt - 9.0,
        ml + 90.0,
        ml + 104.0
    );
    out
}

fn groups(h: &mut String, i: usize, s: &SetSummary, channels: &[i64]) {
    let _ = write!(
        h,
        "<div data-set=\"{i}\"><h3 style=\"color:{}\">{}</h3>",
        SET_COLOURS[i % 2],
        escape(&s.label)
    );
    if s.groups.is_empty() {
        h.push_str("<p class=\"note\">No item was flagged.</p></div>");
        return;
    }
    let tried: Vec<String> = s.group_silhouettes.iter().map(|(k, v)| format!("k={k}: {v:.2}")).collect();
    let _ = write!(
        h,
        "<p class=\"note\">{} group(s) in {} flagged items{}. Mean silhouette {}.</p>",
        s.groups.len(),
        s.flagged,
        if s.group_sample < s.flagged { format!(" (a sample of {})", s.group_sample) } else { String::new() },
        if tried.is_empty() { "not computed (too few items)".into() } else { tried.join(", ") }
    );
    let layers = s.layer_median_flagged.len();
    for (g, group) in s.groups.iter().enumerate() {
        let strongest = group
            .layer_ratio
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_finite())
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(l, r)| {
                format!(
                    "; furthest from typical in {} ({r:.1}×)",
                    layer_name(l, layers, channels.get(l).copied())
                )
            })
            .unwrap_or_default();
        let _ = write!(
            h,
            "<div class=\"group\" data-size=\"{}\"><b>Group {}</b>: {}{} items, {} of flagged; mean score {}{strongest}<div class=\"strip\">",
            group.size,
            g + 1,
            if s.group_sample < s.flagged { "about " } else { "" },
            group.size,
            pct(group.share),
            num(group.mean_score)
        );
        let reference = reference_distance(s);
        for c in &group.examples {
            card(h, "example", None, c, &reference);
        }
        h.push_str("</div></div>");
    }
    h.push_str("</div>");
}

fn sources_and_skipped(h: &mut String, s: &SetSummary) {
    let _ = write!(h, "<div><h3>{}</h3>", escape(&s.label));
    if !s.partitions.is_empty() {
        h.push_str("<table><tr><th>partition</th><th>offsets read</th><th>messages</th></tr>");
        for p in &s.partitions {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}..{}</td><td>{}</td></tr>",
                p.partition, p.start, p.end, p.read
            );
        }
        h.push_str("</table>");
    }
    let skipped: usize = s.skipped.values().sum();
    if skipped == 0 {
        h.push_str("<p class=\"note\">No item was skipped.</p></div>");
        return;
    }
    let _ = write!(
        h,
        "<p class=\"note\">{skipped} item(s) skipped{}; all are listed in <code>skipped.jsonl</code>.</p>\
         <table class=\"skipped\"><tr><th>item</th><th>code</th><th>reason</th></tr>",
        if skipped > s.skipped_examples.len() {
            format!(", the first {} shown", s.skipped_examples.len())
        } else {
            String::new()
        }
    );
    for e in &s.skipped_examples {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&e.id),
            escape(&e.code),
            escape(&e.reason)
        );
    }
    h.push_str("</table></div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_control_characters() {
        assert_eq!(
            escape("<a href=\"x\">&'</a>\u{7}"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;\u{fffd}"
        );
    }

    #[test]
    fn ticks_are_round_and_inside() {
        let t = nice_ticks(0.0, 1.0, 5);
        assert_eq!(t.len(), 6);
        assert!(t.iter().zip([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]).all(|(a, b)| (a - b).abs() < 1e-12), "{t:?}");
        let t = nice_ticks(-0.93, -0.41, 6);
        assert!(t.iter().all(|v| (-0.93..=-0.41).contains(v)) && t.len() >= 4, "{t:?}");
    }
}
