//! The audit report's window section (`dlsr audit --window N`): the smallest corrected
//! p-value of each window over time, one line per group, the `alpha` line marked, and a
//! table of the windows. A person sees when a shift started and in which group faster in
//! the plot than in `windows.jsonl`.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::report::{escape, nice_ticks};
use super::window::WindowRecord;

/// -log10(p) is drawn up to this (smaller p-values sit on the top edge, marked).
const Y_CAP: f64 = 12.0;
/// Groups drawn with their own colour; the rest share grey.
const PALETTE: [&str; 8] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];
/// Table rows shown (all windows are in windows.jsonl).
const TABLE_ROWS: usize = 200;

fn minus_log10(p: f64) -> f64 {
    if p > 0.0 {
        (-p.log10()).clamp(0.0, Y_CAP)
    } else {
        Y_CAP
    }
}

/// The section's HTML (an empty string without windows).
pub fn section(windows: &[WindowRecord], alpha: f64) -> String {
    if windows.is_empty() {
        return String::new();
    }
    let shifted = windows.iter().filter(|w| w.shifted()).count();
    let too_small = windows.iter().filter(|w| w.verdict == "too_small").count();
    let groups: BTreeMap<&str, usize> = windows.iter().fold(BTreeMap::new(), |mut m, w| {
        *m.entry(w.group.as_str()).or_default() += 1;
        m
    });
    let mut h = String::new();
    let _ = write!(
        h,
        "<section id=\"windows\"><h2>Window by window</h2><p class=\"note\">{} windows of up to {} items in {} group{}: \
         <b>{shifted} shifted</b>, {too_small} too small to judge. Each window is tested against the bundle's held-out \
         in-distribution scores with Fisher's exact test of its flagged count and two-sample Kolmogorov-Smirnov and \
         Cramér-von Mises tests of its scores; the plot shows the smallest p-value after the Bonferroni correction \
         (over the {} tests and the groups) as −log10 p: above the dashed line (α = {}) a window is shifted.</p>",
        windows.len(),
        windows.iter().map(|w| w.n).max().unwrap_or(0),
        groups.len(),
        if groups.len() == 1 { "" } else { "s" },
        super::window::TESTS.len(),
        alpha
    );
    h.push_str(&chart(windows, alpha, &groups));
    table(&mut h, windows);
    h.push_str("</section>");
    h
}

fn chart(windows: &[WindowRecord], alpha: f64, groups: &BTreeMap<&str, usize>) -> String {
    let (w, hgt, ml, mr, mt, mb) = (960.0, 300.0, 56.0, 180.0, 16.0, 44.0);
    let (pw, ph) = (w - ml - mr, hgt - mt - mb);
    let last = (windows.len().max(2) - 1) as f64;
    let x = |i: usize| ml + i as f64 / last * pw;
    let ymax = windows.iter().map(|r| minus_log10(r.smallest().1)).fold(minus_log10(alpha), f64::max) * 1.1;
    let y = |v: f64| mt + ph - v / ymax * ph;
    let mut s = format!(
        "<svg id=\"window-p-values\" viewBox=\"0 0 {w} {hgt}\" width=\"100%\" style=\"max-width:{w}px\" role=\"img\" \
         aria-label=\"p-value per window\"><rect x=\"{ml}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"#fbfbfd\" stroke=\"#d5d9e0\"/>"
    );
    for t in nice_ticks(0.0, ymax, 5) {
        let _ = write!(
            s,
            "<line x1=\"{ml}\" x2=\"{}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#eceef2\"/><text x=\"{2}\" y=\"{3:.1}\" \
             font-size=\"11\" text-anchor=\"end\">{4}</text>",
            ml + pw,
            y(t),
            ml - 6.0,
            y(t) + 4.0,
            t
        );
    }
    for t in nice_ticks(0.0, last, 8) {
        let i = t.round() as usize;
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            x(i),
            mt + ph + 16.0,
            i + 1
        );
    }
    let colour = |g: &str| match groups.keys().position(|k| *k == g) {
        Some(i) if i < PALETTE.len() => PALETTE[i],
        _ => "#999",
    };
    for group in groups.keys() {
        let points: Vec<(usize, &WindowRecord)> = windows
            .iter()
            .enumerate()
            .filter(|(_, w)| w.group == *group && w.verdict != "too_small")
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(i, r)| format!("{:.1},{:.1}", x(*i), y(minus_log10(r.smallest().1))))
            .collect();
        if path.len() > 1 {
            let _ = write!(
                s,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>",
                path.join(" "),
                colour(group)
            );
        }
        for (i, r) in points {
            let fill = if r.shifted() { "#d62728" } else { colour(group) };
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{fill}\"><title>{} #{}: n={}, min p {:.2e}, {}</title></circle>",
                x(i),
                y(minus_log10(r.smallest().1)),
                escape(&r.group),
                r.window,
                r.n,
                r.smallest().1,
                escape(&r.verdict)
            );
        }
    }
    let _ = write!(
        s,
        "<line x1=\"{ml}\" x2=\"{}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#d62728\" stroke-width=\"1.5\" stroke-dasharray=\"6,4\"/>\
         <text x=\"{2}\" y=\"{3:.1}\" font-size=\"12\" fill=\"#d62728\">α = {alpha}</text>",
        ml + pw,
        y(minus_log10(alpha)),
        ml + 6.0,
        y(minus_log10(alpha)) - 5.0
    );
    let mut ly = mt + 12.0;
    for (k, group) in groups.keys().enumerate() {
        if k == PALETTE.len() {
            let _ = write!(
                s,
                "<text x=\"{}\" y=\"{ly}\" font-size=\"12\">… {} more (grey)</text>",
                ml + pw + 12.0,
                groups.len() - k
            );
            break;
        }
        let label: String = group.chars().take(20).collect();
        let _ = write!(
            s,
            "<circle cx=\"{}\" cy=\"{:.1}\" r=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{ly}\" font-size=\"12\">{}</text>",
            ml + pw + 16.0,
            ly - 4.0,
            colour(group),
            ml + pw + 26.0,
            escape(&label)
        );
        ly += 16.0;
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">window (in order of closing; red: shifted)</text>\
         <text x=\"14\" y=\"{}\" font-size=\"12\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">−log10 corrected p</text></svg>",
        ml + pw / 2.0,
        hgt - 6.0,
        mt + ph / 2.0,
        mt + ph / 2.0
    );
    s
}

fn table(h: &mut String, windows: &[WindowRecord]) {
    h.push_str(
        "<table id=\"window-table\"><thead><tr><th>#</th><th>group</th><th>items</th><th>flagged (expected)</th>\
         <th>median shift (ID sd)</th><th>binomial p</th><th>KS p</th><th>CvM p</th><th>detector alarms</th>\
         <th>verdict</th></tr></thead><tbody>",
    );
    let p = |w: &WindowRecord, test: &str| {
        w.p_adjusted.get(test).map_or("–".to_string(), |p| format!("{p:.2e}"))
    };
    for w in windows.iter().take(TABLE_ROWS) {
        let verdict = if w.cut_short {
            format!("{} (cut short: {})", w.verdict, w.closed_by)
        } else {
            w.verdict.clone()
        };
        let _ = write!(
            h,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{} ({:.1})</td><td>{:+.2}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&w.verdict),
            w.window,
            escape(&w.group),
            w.n,
            w.flagged,
            w.expected_flagged,
            w.median_shift,
            p(w, "binomial"),
            p(w, "ks"),
            p(w, "cvm"),
            w.tests.cusum.alarms,
            escape(&verdict)
        );
    }
    h.push_str("</tbody></table>");
    if windows.len() > TABLE_ROWS {
        let _ = write!(
            h,
            "<p class=\"note\">The first {TABLE_ROWS} of {} windows; all are in windows.jsonl.</p>",
            windows.len()
        );
    }
}
