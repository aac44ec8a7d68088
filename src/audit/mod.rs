//! `dlsr audit`: a set of images (files, folders, data sets, or a range of a Kafka topic)
//! judged as a whole against the bundle's in-distribution data. Each set is scored item by
//! item into a [`SetAudit`], which keeps only what the report needs: a few numbers per
//! item (score, flag, per-layer distances, where its JSON line is), thumbnails of the
//! top-N and most typical items, and a bounded sample of flagged items' feature vectors
//! for grouping. Memory therefore grows by a few dozen bytes per item, not per image.
//!
//! The outputs (`report.html`, `items.jsonl`, `summary.json`, `skipped.jsonl`) are written
//! under temporary names in the output folder and renamed only when all are complete, so
//! an interrupted audit leaves the previous report (or nothing), never half of one.

pub mod report;
pub mod stats;
pub mod topic;
pub mod twosample;
pub mod window;
pub mod window_report;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::data::Normalisation;
use crate::eval::calibration::Calibration;
use crate::kafka::message::Source;
use crate::model::score::{splitmix64, ScoreKind};
use crate::verdict::Verdict;

/// The significance level below which a set is called "shifted". 0.001 rather than 0.05:
/// an audit runs every day on every stream, and the test assumes the threshold's false-
/// positive rate is known exactly while it was estimated from a few hundred held-out items.
pub const SIGNIFICANCE: f64 = 0.001;

/// Flagged items whose feature vectors are kept for grouping (a uniform sample beyond).
pub const GROUP_SAMPLE: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("tensor operation failed: {0}")]
    Tch(#[from] tch::TchError),
    #[error("thumbnail: {0}")]
    Thumbnail(String),
    #[error("interrupted; no report was written")]
    Interrupted,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io { path: path.to_path_buf(), source }
}

/// An item shown in the report with its picture.
#[derive(Debug, Clone, Serialize)]
pub struct Card {
    pub id: String,
    pub score: f64,
    pub id_percentile: f64,
    pub is_ood: bool,
    /// Per layer, 1 - cosine between the features and their reconstruction.
    pub layer_distance: Vec<f32>,
    /// PNG thumbnail, base64.
    #[serde(skip)]
    pub thumbnail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// The items of one batch after scoring: verdicts in item order with their feature rows
/// and preprocessed images (for thumbnails), plus the items that could not be read.
pub struct ScoredBatch {
    pub verdicts: Vec<Verdict>,
    pub sources: Vec<Option<Source>>,
    /// `[B, D]` on the CPU.
    pub features: Option<Tensor>,
    /// `[B, 3, S, S]` preprocessed, on the CPU.
    pub images: Option<Tensor>,
    pub errors: Vec<Skipped>,
}

/// An item that could not be scored.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub id: String,
    pub code: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// Turns preprocessed `[3, S, S]` tensors back into small PNG thumbnails.
#[derive(Debug, Clone, Copy)]
pub struct Thumbnailer {
    pub normalisation: Normalisation,
}

impl Thumbnailer {
    /// The image the encoder saw, as a base64 PNG.
    pub fn thumbnail(&self, image: &Tensor) -> Result<String, AuditError> {
        let size = image.size();
        let (h, w) = (size[1] as u32, size[2] as u32);
        let n = &self.normalisation;
        let mean = Tensor::f_from_slice(&n.mean.map(|m| m as f32))?.f_view([3, 1, 1])?;
        let std = Tensor::f_from_slice(&n.std.map(|s| s as f32))?.f_view([3, 1, 1])?;
        let pixels = image
            .f_to_kind(Kind::Float)?
            .f_mul(&std)?
            .f_add(&mean)?
            .f_clamp(0.0, 255.0)?
            .f_round()?
            .f_to_kind(Kind::Uint8)?
            .f_permute([1, 2, 0])?
            .f_contiguous()?;
        let rgb = Vec::<u8>::try_from(pixels.f_view([-1])?)?;
        let img =
            image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| AuditError::Thumbnail("bad size".into()))?;
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| AuditError::Thumbnail(e.to_string()))?;
        Ok(base64(&png))
    }
}

/// Standard base64 with padding (for `data:` URLs).
pub fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The best (or worst) `keep` items seen so far, with thumbnails made only for items that
/// can still enter.
struct Ranked {
    keep: usize,
    /// true: highest scores first (most out-of-distribution); false: lowest first.
    highest: bool,
    cards: Vec<Card>,
    /// The score an item must beat to enter once `cards` is full.
    floor: Option<f64>,
}

impl Ranked {
    fn new(keep: usize, highest: bool) -> Self {
        Self { keep, highest, cards: Vec::new(), floor: None }
    }

    fn better(&self, a: f64, b: f64) -> bool {
        if self.highest {
            a > b
        } else {
            a < b
        }
    }

    fn wants(&self, score: f64) -> bool {
        self.keep > 0 && self.floor.is_none_or(|f| self.better(score, f))
    }

    fn push(&mut self, card: Card) {
        self.cards.push(card);
        // Trim in amortised steps: sorting every push would cost N log N per item.
        if self.cards.len() >= 2 * self.keep {
            self.trim();
        }
    }

    fn trim(&mut self) {
        let highest = self.highest;
        self.cards.sort_by(|a, b| {
            let o = a.score.total_cmp(&b.score);
            if highest {
                o.reverse()
            } else {
                o
            }
        });
        self.cards.truncate(self.keep);
        if self.cards.len() == self.keep {
            self.floor = self.cards.last().map(|c| c.score);
        }
    }

    fn finish(mut self) -> Vec<Card> {
        self.trim();
        self.cards
    }
}

/// What the report says about one group of flagged items.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// Estimated number of flagged items in the group (exact when every flagged item was
    /// in the sample).
    pub size: usize,
    pub share: f64,
    pub mean_score: f64,
    /// The items nearest the group's centre.
    pub examples: Vec<Card>,
    /// Per layer, the group's median distance over the typical items' median.
    pub layer_ratio: Vec<f64>,
}

/// One audited set, finished.
#[derive(Debug, Serialize)]
pub struct SetSummary {
    pub label: String,
    pub items: usize,
    pub skipped: BTreeMap<String, usize>,
    pub flagged: usize,
    pub flagged_rate: f64,
    /// 95% Clopper-Pearson interval of the flagged rate.
    pub flagged_rate_ci95: (f64, f64),
    pub expected_rate: f64,
    pub p_value: f64,
    pub verdict: &'static str,
    pub score_kind: ScoreKind,
    pub threshold: f64,
    pub significance_level: f64,
    /// Per layer: the median 1 - cosine of flagged and of unflagged items.
    pub layer_median_flagged: Vec<f64>,
    pub layer_median_unflagged: Vec<f64>,
    pub groups: Vec<Group>,
    /// How the number of groups was chosen: (k, mean silhouette) for each k tried.
    pub group_silhouettes: Vec<(usize, f64)>,
    pub group_sample: usize,
    #[serde(skip)]
    pub top: Vec<Card>,
    #[serde(skip)]
    pub typical: Vec<Card>,
    #[serde(skip)]
    pub scores: Vec<f64>,
    /// The first skipped items (all are in `skipped.jsonl`).
    #[serde(skip)]
    pub skipped_examples: Vec<Skipped>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<topic::PartitionRange>,
}

/// Settings of an audit shared by its sets.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub top: usize,
    pub typical: usize,
    pub kind: ScoreKind,
    pub threshold: f64,
    pub expected_rate: f64,
    pub layers: usize,
}

/// The accumulator of one set: see the module comment for what it keeps.
pub struct SetAudit {
    label: String,
    settings: AuditSettings,
    thumbnailer: Thumbnailer,
    scores: Vec<f64>,
    flagged: Vec<bool>,
    /// `layers` f32 per item.
    layer_distance: Vec<f32>,
    /// Unsorted item lines and where each one is.
    lines_path: PathBuf,
    lines: BufWriter<File>,
    line_spans: Vec<(u64, u32)>,
    written: u64,
    skipped_path: PathBuf,
    skipped_file: BufWriter<File>,
    skipped: BTreeMap<String, usize>,
    skipped_examples: Vec<Skipped>,
    top: Ranked,
    typical: Ranked,
    /// Uniform sample of flagged items: (feature row, card).
    sample: Vec<(Vec<f32>, Card)>,
    flagged_seen: u64,
    rng: u64,
}

#[derive(Serialize)]
struct ItemLine<'a> {
    #[serde(flatten)]
    verdict: &'a Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a Source>,
}

/// How many skipped items the report lists.
const SKIPPED_LISTED: usize = 50;

impl SetAudit {
    /// `scratch` is where its unsorted lines go (inside the output folder).
    pub fn new(
        label: &str,
        settings: AuditSettings,
        thumbnailer: Thumbnailer,
        scratch: &Path,
        tag: &str,
    ) -> Result<Self, AuditError> {
        let lines_path = scratch.join(format!(".{tag}-lines.tmp"));
        let skipped_path = scratch.join(format!(".{tag}-skipped.tmp"));
        let lines = BufWriter::new(File::create(&lines_path).map_err(io(&lines_path))?);
        let skipped_file = BufWriter::new(File::create(&skipped_path).map_err(io(&skipped_path))?);
        Ok(Self {
            label: label.to_string(),
            top: Ranked::new(settings.top, true),
            typical: Ranked::new(settings.typical, false),
            settings,
            thumbnailer,
            scores: Vec::new(),
            flagged: Vec::new(),
            layer_distance: Vec::new(),
            lines_path,
            lines,
            line_spans: Vec::new(),
            written: 0,
            skipped_path,
            skipped_file,
            skipped: BTreeMap::new(),
            skipped_examples: Vec::new(),
            sample: Vec::new(),
            flagged_seen: 0,
            rng: 0x5EED_A0D1,
        })
    }

    pub fn items(&self) -> usize {
        self.scores.len()
    }

    pub fn skip(&mut self, s: Skipped) -> Result<(), AuditError> {
        *self.skipped.entry(s.code.clone()).or_default() += 1;
        let line = serde_json::to_string(&s).unwrap_or_default();
        writeln!(self.skipped_file, "{line}").map_err(io(&self.skipped_path))?;
        if self.skipped_examples.len() < SKIPPED_LISTED {
            self.skipped_examples.push(s);
        }
        Ok(())
    }

    /// Takes in one scored batch.
    pub fn add(&mut self, batch: ScoredBatch) -> Result<(), AuditError> {
        for s in batch.errors {
            self.skip(s)?;
        }
        let dim = batch.features.as_ref().map(|f| f.size()[1]).unwrap_or(0);
        for (i, v) in batch.verdicts.iter().enumerate() {
            let source = batch.sources.get(i).and_then(Option::as_ref);
            let line = serde_json::to_string(&ItemLine { verdict: v, source }).unwrap_or_default();
            writeln!(self.lines, "{line}").map_err(io(&self.lines_path))?;
            self.line_spans.push((self.written, line.len() as u32));
            self.written += line.len() as u64 + 1;
            self.scores.push(v.score);
            self.flagged.push(v.is_ood);
            let distances: Vec<f32> = v.layers.iter().map(|l| (1.0 - l.cos) as f32).collect();
            self.layer_distance
                .extend((0..self.settings.layers).map(|l| distances.get(l).copied().unwrap_or(f32::NAN)));

            // A card (with its thumbnail) only for items that can be shown.
            let take_top = self.top.wants(v.score);
            let take_typical = self.typical.wants(v.score);
            let mut sample_slot = None;
            if v.is_ood {
                self.flagged_seen += 1;
                if self.sample.len() < GROUP_SAMPLE {
                    sample_slot = Some(self.sample.len());
                } else {
                    let j = splitmix64(&mut self.rng) % self.flagged_seen;
                    if (j as usize) < GROUP_SAMPLE {
                        sample_slot = Some(j as usize);
                    }
                }
            }
            if !(take_top || take_typical || sample_slot.is_some()) {
                continue;
            }
            let thumbnail = match &batch.images {
                Some(images) => self.thumbnailer.thumbnail(&images.f_get(i as i64)?)?,
                None => String::new(),
            };
            let card = Card {
                id: v.id.clone(),
                score: v.score,
                id_percentile: v.id_percentile,
                is_ood: v.is_ood,
                layer_distance: distances,
                thumbnail,
                source: source.cloned(),
            };
            if let (Some(slot), Some(features)) = (sample_slot, &batch.features) {
                let row = Vec::<f32>::try_from(features.f_get(i as i64)?.f_to_kind(Kind::Float)?)?;
                debug_assert_eq!(row.len() as i64, dim);
                let entry = (row, card.clone());
                if slot == self.sample.len() {
                    self.sample.push(entry);
                } else {
                    self.sample[slot] = entry;
                }
            }
            if take_top {
                self.top.push(card.clone());
            }
            if take_typical {
                self.typical.push(card);
            }
        }
        Ok(())
    }

    /// Sorts the items (most out-of-distribution first) into `items_path` with their
    /// ranks, moves the skipped list to `skipped_path`, and computes the set's summary.
    pub fn finish(
        mut self,
        items_path: &Path,
        skipped_path: &Path,
        partitions: Vec<topic::PartitionRange>,
    ) -> Result<SetSummary, AuditError> {
        self.lines.flush().map_err(io(&self.lines_path))?;
        self.skipped_file.flush().map_err(io(&self.skipped_path))?;
        let s = &self.settings;
        let n = self.scores.len();
        let k = self.flagged.iter().filter(|&&f| f).count();
        let rate = if n > 0 { k as f64 / n as f64 } else { 0.0 };
        let p_value = stats::binomial_upper_tail(k as u64, n as u64, s.expected_rate);
        let layers = s.layers;
        let median_of = |want: bool| -> Vec<f64> {
            (0..layers)
                .map(|l| {
                    let mut v: Vec<f64> = (0..n)
                        .filter(|&i| self.flagged[i] == want)
                        .map(|i| f64::from(self.layer_distance[i * layers + l]))
                        .filter(|x| x.is_finite())
                        .collect();
                    median(&mut v)
                })
                .collect()
        };
        let layer_median_flagged = median_of(true);
        let layer_median_unflagged = median_of(false);
        let (groups, tried) = self.group(k, &layer_median_unflagged);
        let (kind, threshold, expected) = (s.kind, s.threshold, s.expected_rate);
        drop(self.lines);
        drop(self.skipped_file);
        write_ranked(&self.lines_path, &self.line_spans, &self.scores, items_path)?;
        std::fs::remove_file(&self.lines_path).map_err(io(&self.lines_path))?;
        std::fs::rename(&self.skipped_path, skipped_path).map_err(io(skipped_path))?;
        Ok(SetSummary {
            label: self.label,
            items: n,
            skipped: self.skipped,
            flagged: k,
            flagged_rate: rate,
            flagged_rate_ci95: stats::clopper_pearson(k as u64, n as u64, 0.95),
            expected_rate: expected,
            p_value,
            verdict: if n > 0 && p_value < SIGNIFICANCE { "shifted" } else { "in_distribution" },
            score_kind: kind,
            threshold,
            significance_level: SIGNIFICANCE,
            layer_median_flagged,
            layer_median_unflagged,
            groups,
            group_silhouettes: tried,
            group_sample: self.sample.len(),
            top: self.top.finish(),
            typical: self.typical.finish(),
            scores: self.scores,
            skipped_examples: self.skipped_examples,
            partitions,
        })
    }

    /// Groups the sampled flagged items (see [`stats::group`] for the rule).
    fn group(&self, flagged: usize, typical_median: &[f64]) -> (Vec<Group>, Vec<(usize, f64)>) {
        if self.sample.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let points = stats::normalise_rows(&self.sample.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>());
        let grouping = stats::group(&points, 7);
        let mut groups: Vec<Group> = (0..grouping.k)
            .filter_map(|g| {
                let members: Vec<usize> =
                    (0..points.len()).filter(|&i| grouping.assignment[i] == g).collect();
                if members.is_empty() {
                    return None;
                }
                let share = members.len() as f64 / points.len() as f64;
                let mean_score =
                    members.iter().map(|&i| self.sample[i].1.score).sum::<f64>() / members.len() as f64;
                let mut by_distance: Vec<(f64, usize)> = members
                    .iter()
                    .map(|&i| {
                        let d: f64 = points[i]
                            .iter()
                            .zip(&grouping.centroids[g])
                            .map(|(a, b)| f64::from(a - b).powi(2))
                            .sum();
                        (d, i)
                    })
                    .collect();
                by_distance.sort_by(|a, b| a.0.total_cmp(&b.0));
                let examples = by_distance.iter().take(8).map(|&(_, i)| self.sample[i].1.clone()).collect();
                let layer_ratio = (0..self.settings.layers)
                    .map(|l| {
                        let mut v: Vec<f64> = members
                            .iter()
                            .filter_map(|&i| self.sample[i].1.layer_distance.get(l).map(|&x| f64::from(x)))
                            .collect();
                        median(&mut v) / typical_median.get(l).copied().unwrap_or(f64::NAN)
                    })
                    .collect();
                Some(Group {
                    size: (share * flagged as f64).round() as usize,
                    share,
                    mean_score,
                    examples,
                    layer_ratio,
                })
            })
            .collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.size));
        (groups, grouping.tried)
    }

    /// Removes the scratch files (after an error or an interruption).
    pub fn discard(self) {
        drop(self.lines);
        drop(self.skipped_file);
        let _ = std::fs::remove_file(&self.lines_path);
        let _ = std::fs::remove_file(&self.skipped_path);
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// Rewrites the unsorted lines in descending score order, each with `"rank"` first.
fn write_ranked(unsorted: &Path, spans: &[(u64, u32)], scores: &[f64], out: &Path) -> Result<(), AuditError> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // NaN scores (none expected) sort last; ties keep input order.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut reader = BufReader::new(File::open(unsorted).map_err(io(unsorted))?);
    let mut writer = BufWriter::new(File::create(out).map_err(io(out))?);
    let mut buf = Vec::new();
    for (rank, &i) in order.iter().enumerate() {
        let (offset, len) = spans[i];
        reader.seek(SeekFrom::Start(offset)).map_err(io(unsorted))?;
        buf.resize(len as usize, 0);
        reader.read_exact(&mut buf).map_err(io(unsorted))?;
        // Every line is a JSON object: put the rank in front of its first field.
        write!(writer, "{{\"rank\":{},", rank + 1).map_err(io(out))?;
        writer.write_all(&buf[1..]).map_err(io(out))?;
        writer.write_all(b"\n").map_err(io(out))?;
    }
    writer.flush().map_err(io(out))?;
    Ok(())
}

/// The false-positive rate to expect at `threshold`: the calibrated rate when it is the
/// calibrated threshold, else the share of held-out ID items above it.
pub fn expected_rate(calibration: &Calibration, kind: ScoreKind, threshold: f64) -> f64 {
    match calibration.scores.get(&kind) {
        Some(c) if c.threshold == threshold => c.achieved_fpr,
        Some(c) => c.id_exceedance(threshold),
        None => f64::NAN,
    }
}

/// The output folder's files, written under temporary names and put in place together.
pub struct Outputs {
    pub dir: PathBuf,
    staged: Vec<(PathBuf, PathBuf)>,
}

impl Outputs {
    pub fn create(dir: &Path) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(Self { dir: dir.to_path_buf(), staged: Vec::new() })
    }

    /// A temporary path for `name`, renamed to `name` by [`Outputs::commit`].
    pub fn stage(&mut self, name: &str) -> PathBuf {
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        self.staged.push((tmp.clone(), self.dir.join(name)));
        tmp
    }

    pub fn commit(mut self) -> Result<(), AuditError> {
        for (tmp, dest) in std::mem::take(&mut self.staged) {
            std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        }
        Ok(())
    }
}

impl Drop for Outputs {
    /// Whatever was staged and not committed is removed.
    fn drop(&mut self) {
        for (tmp, _) in &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    #[test]
    fn ranked_keeps_the_extremes() {
        let card = |score: f64| Card {
            id: score.to_string(),
            score,
            id_percentile: 0.0,
            is_ood: false,
            layer_distance: Vec::new(),
            thumbnail: String::new(),
            source: None,
        };
        let mut top = Ranked::new(3, true);
        let mut low = Ranked::new(2, false);
        for i in [5, 1, 9, 3, 7, 2, 8, 6, 4, 0] {
            let s = f64::from(i);
            if top.wants(s) {
                top.push(card(s));
            }
            if low.wants(s) {
                low.push(card(s));
            }
        }
        let top: Vec<f64> = top.finish().iter().map(|c| c.score).collect();
        let low: Vec<f64> = low.finish().iter().map(|c| c.score).collect();
        assert_eq!(top, [9.0, 8.0, 7.0]);
        assert_eq!(low, [0.0, 1.0]);
    }
}
