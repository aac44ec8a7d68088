//! `fit`, `score`, `eval` and `calibrate`: argument parsing and printing around the
//! library's [`crate::fit`], [`crate::evaluate`] and scoring functions.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::{DataArgs, EncoderArgs};
use crate::data::DataSet;
use crate::device::DeviceSpec;
use crate::encode::{cache_dir, count_by_code, encode_set_cached, EncodeOptions};
use crate::eval::calibration::Calibration;
use crate::fit::{by_kind, check_output_path, fit, FitOptions};
use crate::model::bundle::Bundle;
use crate::model::encoder::{EncoderSpec, Precision};
use crate::model::features::FeatureExtractor;
use crate::model::lfdn::Preset;
use crate::model::score::{score_all, ScoreKind, ScoreSettings};
use crate::model::train::TrainConfig;
use crate::stream::decide::{resolve_threshold, Threshold};
use crate::verdict::judge;

#[derive(Debug, Args)]
pub struct FitArgs {
    /// In-distribution data: image file, folder, IDX file or MNIST-style CSV.
    #[arg(long)]
    pub data: String,
    /// Where to write the bundle (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// LFDN size: small (W 512, N 4) or paper (W = 2 x feature size, N 16).
    #[arg(long, default_value = "small")]
    pub preset: Preset,
    /// Override the preset's width W.
    #[arg(long)]
    pub width: Option<i64>,
    /// Override the preset's depth N.
    #[arg(long)]
    pub depth: Option<usize>,
    #[arg(long, default_value_t = TrainConfig::default().epochs)]
    pub epochs: usize,
    #[arg(long, default_value_t = TrainConfig::default().batch_size)]
    pub train_batch_size: usize,
    #[arg(long, default_value_t = TrainConfig::default().lr)]
    pub lr: f64,
    #[arg(long, default_value_t = TrainConfig::default().weight_decay)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = TrainConfig::default().ema_decay)]
    pub ema_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Do not keep the first-epoch weights (no LR score).
    #[arg(long)]
    pub no_first_epoch: bool,
    /// Fraction of the ID data held out for calibration.
    #[arg(long, default_value_t = 0.1)]
    pub holdout: f64,
    /// Target false-positive rate of the calibrated thresholds.
    #[arg(long, default_value_t = 0.05)]
    pub target_fpr: f64,
    #[command(flatten)]
    pub scoring: ScoringArgs,
    /// Do not read or write the feature cache.
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub encoder: EncoderArgs,
    #[command(flatten)]
    pub data_opts: DataArgs,
}

#[derive(Debug, Args, Clone)]
pub struct ScoringArgs {
    /// Distortion step t0.
    #[arg(long, default_value_t = ScoreSettings::default().t0)]
    pub t0: usize,
    /// DDIM stride.
    #[arg(long, default_value_t = ScoreSettings::default().stride)]
    pub stride: usize,
    /// DDIM eta (0 = deterministic).
    #[arg(long, default_value_t = ScoreSettings::default().eta)]
    pub eta: f64,
    /// Layers MFsim averages, e.g. 0,1,2,3,4 (default: all but the two shallowest, which
    /// describe texture rather than content, keeping at least two; see the README).
    #[arg(long, value_delimiter = ',')]
    pub mfsim_layers: Option<Vec<usize>>,
    /// The score that decides verdicts: mse, mfsim or lr.
    #[arg(long, default_value = "mfsim")]
    pub score_kind: ScoreKind,
    /// Noise draws averaged per item (1..=64; see the README's benchmark for the cost).
    #[arg(long, default_value_t = ScoreSettings::default().draws)]
    pub draws: usize,
    /// MFsim with each layer's cosine in units of its held-out ID spread: on or off.
    #[arg(long, default_value = "off", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub layer_norm: bool,
}

/// `on` or `off`.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?}: expected on or off")),
    }
}

fn encode_opts(e: &EncoderArgs, d: &DataArgs, quiet: bool) -> EncodeOptions {
    EncodeOptions { batch_size: e.batch_size, limits: d.limits(), quiet }
}

pub fn run_fit(args: &FitArgs, quiet: bool) -> anyhow::Result<()> {
    check_output_path(&args.out)?;
    let device = args.encoder.device.resolve()?;
    let extractor = args.encoder.build()?;
    let source: EncoderSpec = args.encoder.encoder.parse()?;
    let preset = args.preset.config(0);
    let opts = FitOptions {
        data: args.data.clone(),
        limit: args.data_opts.limit,
        out: args.out.clone(),
        encoder_source: source,
        width: args.width.or((args.preset == Preset::Small).then_some(preset.width)),
        depth: args.depth.unwrap_or(preset.depth),
        train: TrainConfig {
            epochs: args.epochs,
            batch_size: args.train_batch_size,
            lr: args.lr,
            weight_decay: args.weight_decay,
            ema_decay: args.ema_decay,
            seed: args.seed,
            keep_first_epoch: !args.no_first_epoch,
        },
        holdout_fraction: args.holdout,
        target_fpr: args.target_fpr,
        scoring: ScoreSettings {
            t0: args.scoring.t0,
            stride: args.scoring.stride,
            eta: args.scoring.eta,
            mfsim_layers: args.scoring.mfsim_layers.clone(),
            draws: args.scoring.draws,
            layer_norm: None,
        },
        layer_norm: args.scoring.layer_norm,
        default_score: args.scoring.score_kind,
        encode: encode_opts(&args.encoder, &args.data_opts, quiet),
        cache: (!args.no_cache).then(cache_dir),
        device,
    };
    let interrupted = crate::shutdown::interrupt_flag();
    let report = fit(&extractor, &opts, interrupted).context("fit failed; no bundle was written")?;
    let m = &report.meta;
    let t = &m.training;
    println!("bundle: {}", args.out.display());
    println!(
        "encoder: {} at {} px on {}; features {} ({} layers){}",
        m.encoder.name,
        m.preprocess.size,
        t.summary.device,
        m.lfdn.dim,
        m.offsets.layers(),
        if report.features_cached { ", from cache" } else { "" }
    );
    println!(
        "items: {} train, {} held out, {}",
        t.train_items,
        t.holdout_items,
        skipped_text(t.skipped_items, &report.skipped)
    );
    println!(
        "lfdn: W {} N {}, {} epochs, {} steps, final loss {:.5}",
        m.lfdn.width,
        m.lfdn.depth,
        t.summary.epochs,
        t.summary.steps,
        t.summary.epoch_loss.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "time: encode {:.1}s, train {:.1}s ({:.0} items/s), calibrate {:.1}s",
        report.encode_seconds,
        t.summary.seconds,
        (t.train_items * t.summary.epochs) as f64 / t.summary.seconds.max(1e-9),
        report.calibrate_seconds
    );
    print_calibration(&m.calibration);
    match &m.self_test {
        Some(test) => println!(
            "self-test: {} held-out items and their scores stored ({} {}); a loading daemon checks them",
            test.ids.len(),
            test.device,
            test.precision
        ),
        None => println!("self-test: none stored (no held-out item could be read again)"),
    }
    Ok(())
}

/// "none skipped", or "3 skipped (empty 1, undecodable 2)".
pub(super) fn skipped_text<K: std::fmt::Display>(
    total: usize,
    by_code: &std::collections::BTreeMap<K, usize>,
) -> String {
    if total == 0 {
        return "none skipped".into();
    }
    let codes: Vec<String> = by_code.iter().map(|(code, n)| format!("{code} {n}")).collect();
    format!("{total} skipped ({})", codes.join(", "))
}

fn print_calibration(c: &Calibration) {
    println!(
        "calibration at target FPR {:.2}% on {} held-out items ({} features):",
        c.target_fpr * 100.0,
        c.items,
        c.precision
    );
    for (kind, s) in &c.scores {
        let (lo, hi) = s.fpr_interval(c.items);
        println!(
            "  {:<5} threshold {:.6}  achieved FPR {:.2}% (95% CI {:.2}%..{:.2}%){}",
            kind.name(),
            s.threshold,
            s.achieved_fpr * 100.0,
            lo * 100.0,
            hi * 100.0,
            if s.achievable { "" } else { "  NOT ACHIEVABLE" }
        );
    }
    // One note per distinct text: the scores share the held-out count, so usually one.
    let notes: std::collections::BTreeSet<&str> =
        c.scores.values().filter_map(|s| s.note.as_deref()).collect();
    for note in notes {
        println!("  note: {note}");
    }
}

/// Options of commands that load a bundle.
#[derive(Debug, Args, Clone)]
pub struct BundleArgs {
    /// The model bundle written by `dlsr fit`.
    #[arg(long)]
    pub model: PathBuf,
    /// auto (CUDA when available), cpu, cuda (or gpu) or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Encoder override (must have the bundle's weights checksum), e.g. a moved .pt file.
    #[arg(long)]
    pub encoder: Option<String>,
    /// f32, or on CUDA f16 (autocast) / bf16.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Images per encoder batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
}

/// The models of parallel scoring workers: the first worker takes the ones loaded to
/// check the bundle before any work started, the others load their own.
pub struct WorkerModels<'a> {
    args: &'a BundleArgs,
    first: std::sync::Mutex<Option<(Bundle, FeatureExtractor)>>,
}

impl<'a> WorkerModels<'a> {
    pub fn new(args: &'a BundleArgs, loaded: (Bundle, FeatureExtractor)) -> Self {
        Self { args, first: std::sync::Mutex::new(Some(loaded)) }
    }

    pub fn get(&self) -> anyhow::Result<(Bundle, FeatureExtractor)> {
        if let Some(first) = self.first.lock().ok().and_then(|mut l| l.take()) {
            return Ok(first);
        }
        self.args.load()
    }
}

impl BundleArgs {
    pub fn load(&self) -> anyhow::Result<(Bundle, FeatureExtractor)> {
        let device = self.device.resolve()?;
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        // Every bundle error names the file already.
        let bundle = Bundle::load(&self.model, device)?;
        let extractor = bundle.load_encoder(self.encoder.as_deref(), self.precision)?;
        Ok((bundle, extractor))
    }
}

/// What a `score` worker hands back for one batch: its output lines (error lines first),
/// the error codes among them and how many verdicts flagged their item.
struct ScoredLines {
    lines: Vec<String>,
    failed_codes: Vec<&'static str>,
    flagged: usize,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// Image files, folders, IDX files or MNIST-style CSVs.
    #[arg(required = true)]
    pub specs: Vec<String>,
    #[command(flatten)]
    pub judging: JudgingArgs,
    #[command(flatten)]
    pub data_opts: DataArgs,
}

/// How items are judged and how many workers score them (`score` and `audit`).
#[derive(Debug, Args, Clone)]
pub struct JudgingArgs {
    /// The score that decides verdicts (default: the bundle's).
    #[arg(long)]
    pub score_kind: Option<ScoreKind>,
    /// Absolute threshold instead of the calibrated one.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Scoring workers, each with its own model and a share of the libtorch threads (0:
    /// one per libtorch thread, at most 4, on the CPU; one on CUDA).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

impl JudgingArgs {
    /// The score and threshold that decide verdicts, resolved against what the bundle
    /// holds as the daemon resolves its configuration ([`crate::stream::decide`]).
    pub fn threshold(&self, meta: &crate::model::bundle::BundleMeta) -> anyhow::Result<Threshold> {
        let spec = crate::config::ThresholdSpec {
            score_kind: self.score_kind,
            value: self.threshold,
            ..Default::default()
        };
        resolve_threshold(&spec, &meta.calibration, meta.default_score, meta.has_first_epoch)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

pub fn run_score(args: &ScoreArgs, quiet: bool) -> anyhow::Result<()> {
    // Loaded once here to check the bundle and the score before any work starts.
    let (bundle, extractor) = args.bundle.load()?;
    let Threshold { kind, value: threshold } = args.judging.threshold(&bundle.meta)?;
    let (workers, threads_each) = crate::device::scoring_workers(args.judging.workers, bundle.device);
    let pre = extractor.preprocess;
    let models = WorkerModels::new(&args.bundle, (bundle, extractor));
    let make_state = || models.get();
    let process = |(bundle, extractor): &mut (Bundle, FeatureExtractor),
                   b: crate::encode::RawBatch|
     -> anyhow::Result<ScoredLines> {
        let mut lines: Vec<String> = b
            .errors
            .iter()
            .map(|e| {
                serde_json::json!({"id": e.id, "error": e.kind.to_string(), "code": e.code()}).to_string()
            })
            .collect();
        let failed_codes = b.errors.iter().map(|e| e.code()).collect();
        let mut flagged = 0;
        if let Some(images) = &b.images {
            let features = extractor.extract(images)?;
            let scores = bundle.scorer(&bundle.meta.scoring).score(&features.values, &b.seeds)?;
            for (id, s) in b.ids.iter().zip(&scores) {
                let v = judge(id, s, kind, &bundle.meta.calibration, Some(threshold))?;
                flagged += usize::from(v.is_ood);
                lines.push(serde_json::to_string(&v)?);
            }
        }
        Ok(ScoredLines { lines, failed_codes, flagged })
    };
    let opts = EncodeOptions { batch_size: args.bundle.batch_size, limits: args.data_opts.limits(), quiet };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (mut scored, mut failed, mut flagged) = (0usize, 0usize, 0usize);
    let mut failed_by_code = std::collections::BTreeMap::<&str, usize>::new();
    let started = std::time::Instant::now();
    let prefixes = crate::data::source::id_prefixes(&args.specs);
    for (spec, prefix) in args.specs.iter().zip(prefixes) {
        let set = match DataSet::open(spec) {
            Ok(s) => s.with_limit(args.data_opts.limit).with_id_prefix(prefix),
            Err(e) => {
                failed += 1;
                *failed_by_code.entry("unreadable").or_default() += 1;
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"id": spec, "error": e.to_string(), "code": "unreadable"})
                )?;
                continue;
            }
        };
        crate::encode::parallel_batches(
            &set,
            &opts,
            pre,
            (workers, threads_each),
            "score",
            make_state,
            process,
            |batch: ScoredLines| {
                for line in &batch.lines {
                    writeln!(out, "{line}")?;
                }
                for code in &batch.failed_codes {
                    *failed_by_code.entry(code).or_default() += 1;
                }
                failed += batch.failed_codes.len();
                scored += batch.lines.len() - batch.failed_codes.len();
                flagged += batch.flagged;
                out.flush()?;
                Ok(())
            },
        )?;
    }
    out.flush()?;
    if scored == 0 {
        bail!("nothing could be scored ({failed} error(s))");
    }
    if !quiet {
        // After loading the model: the rate of reading, decoding, encoding and scoring
        // (what scripts/benchmark.sh peer compares).
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "score: {scored} items scored, {failed} failed, in {seconds:.2} s ({:.1} items/s, {workers} worker(s)); \
             {flagged} flagged; {}",
            scored as f64 / seconds.max(1e-9),
            skipped_text(failed, &failed_by_code)
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// In-distribution test data.
    #[arg(long)]
    pub id: String,
    /// An OOD set as NAME=SPEC; repeat for several.
    #[arg(long = "ood", required = true, value_parser = parse_named_spec)]
    pub oods: Vec<(String, String)>,
    /// Directory for metrics.json, report.md and the plots.
    #[arg(long)]
    pub out: PathBuf,
    /// Layers MFsim averages in this evaluation, e.g. 1,2,3,4 (default: the bundle's).
    /// Only the averaging changes, no refit; the calibrated MFsim threshold no longer
    /// applies, so flagged shares need --threshold.
    #[arg(long, value_delimiter = ',')]
    pub mfsim_layers: Option<Vec<usize>>,
    /// Noise draws averaged per item instead of the bundle's (no refit; the calibrated
    /// thresholds then no longer hold).
    #[arg(long)]
    pub draws: Option<usize>,
    /// MFsim per-layer normalisation on or off instead of the bundle's (on: with the
    /// bundle's held-out layer statistics).
    #[arg(long, value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub layer_norm: Option<bool>,
    /// Also score the same encoded sets with the scoring candidates (1, 4 and 8 noise
    /// draws, with and without per-layer normalisation) and print their comparison: AUROC,
    /// FPR95 and the cost per image relative to the first row, encoder included.
    #[arg(long)]
    pub compare: bool,
    /// The score whose flagged shares are reported (default: the bundle's).
    #[arg(long)]
    pub score_kind: Option<ScoreKind>,
    /// Report flagged shares at this threshold instead of the calibrated one.
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Do not read or write the feature cache.
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub data_opts: DataArgs,
}

fn parse_named_spec(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, spec)) if !name.is_empty() && !spec.is_empty() => {
            Ok((name.to_string(), spec.to_string()))
        }
        _ => Err(format!("{s:?} is not NAME=SPEC")),
    }
}

pub fn run_eval(args: &EvalArgs, quiet: bool) -> anyhow::Result<()> {
    let (bundle, extractor) = args.bundle.load()?;
    let mut settings = bundle.meta.scoring.clone();
    if let Some(layers) = &args.mfsim_layers {
        settings.mfsim_layers = Some(layers.clone());
    }
    if let Some(draws) = args.draws {
        settings.draws = draws;
    }
    match args.layer_norm {
        Some(true) if settings.layer_norm.is_none() => {
            if bundle.meta.calibration.layer_cos.is_empty() {
                bail!(
                    "the bundle keeps no held-out layer statistics (calibrate it again) for --layer-norm on"
                );
            }
            settings.layer_norm = Some(bundle.meta.calibration.layer_cos.clone());
        }
        Some(false) => settings.layer_norm = None,
        _ => {}
    }
    let choice = crate::evaluate::ThresholdChoice { score: args.score_kind, value: args.threshold };
    let opts = EncodeOptions { batch_size: args.bundle.batch_size, limits: args.data_opts.limits(), quiet };
    let cache = (!args.no_cache).then(cache_dir);
    let evaluate = |settings: &crate::model::score::ScoreSettings, out: &std::path::Path| {
        crate::evaluate::evaluate(
            &bundle,
            &extractor,
            settings,
            choice,
            &args.id,
            &args.oods,
            args.data_opts.limit,
            &opts,
            cache.as_deref(),
            out,
        )
    };
    let report = evaluate(&settings, &args.out)?;
    println!("ID: {} ({} items, {} skipped)", report.id.name, report.id.n, report.id.skipped);
    print!("{}", crate::evaluate::table(&report));
    let timing: Vec<String> = std::iter::once(&report.id)
        .chain(&report.ood_sets)
        .map(|s| format!("{} encode {:.1}s score {:.1}s", s.name, s.encode_seconds, s.score_seconds))
        .collect();
    println!("time: {}", timing.join("; "));
    println!("wrote {}/metrics.json, report.md and plots", args.out.display());
    if args.compare {
        let stats = &bundle.meta.calibration.layer_cos;
        let mut rows = vec![(describe_scoring(&settings), report)];
        for (draws, norm) in [(1, false), (4, false), (1, true), (4, true), (8, true)] {
            let candidate = crate::model::score::ScoreSettings {
                draws,
                layer_norm: (norm && !stats.is_empty()).then(|| stats.clone()),
                ..settings.clone()
            };
            if candidate == settings || (norm && stats.is_empty()) {
                continue;
            }
            let name = describe_scoring(&candidate);
            let out = args.out.join("compare").join(name.replace([' ', ','], "_"));
            let r = evaluate(&candidate, &out)?;
            rows.push((name, r));
        }
        let table = crate::evaluate::comparison_table(&rows);
        print!("{table}");
        std::fs::write(args.out.join("compare.md"), &table)
            .with_context(|| format!("writing {}", args.out.join("compare.md").display()))?;
    }
    Ok(())
}

/// `draws 4, layer norm`: how a scoring candidate differs from one plain draw.
fn describe_scoring(s: &crate::model::score::ScoreSettings) -> String {
    format!("draws {}{}", s.draws, if s.layer_norm.is_some() { ", layer norm" } else { "" })
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// In-distribution data to calibrate on (not the data the model was trained on).
    #[arg(long)]
    pub data: String,
    /// Target false-positive rate (default: the bundle's).
    #[arg(long)]
    pub target_fpr: Option<f64>,
    #[command(flatten)]
    pub data_opts: DataArgs,
}

pub fn run_calibrate(args: &CalibrateArgs, quiet: bool) -> anyhow::Result<()> {
    let (mut bundle, extractor) = args.bundle.load()?;
    let settings = bundle.meta.scoring.clone();
    let opts = EncodeOptions { batch_size: args.bundle.batch_size, limits: args.data_opts.limits(), quiet };
    let set = DataSet::open(&args.data)?.with_limit(args.data_opts.limit);
    let encoded = encode_set_cached(&extractor, &set, &opts, Some(&cache_dir()))?;
    if encoded.ids.is_empty() {
        bail!("no item of {} could be encoded", args.data);
    }
    let scores = score_all(&bundle.scorer(&settings), &encoded.values, &encoded.seeds, 256)?;
    let target = args.target_fpr.unwrap_or(bundle.meta.calibration.target_fpr);
    let calibration =
        Calibration::build(&by_kind(&scores), target, &args.data, extractor.encoder.precision())?
            .with_layers(&scores);
    println!(
        "{} items scored, {}",
        encoded.ids.len(),
        skipped_text(encoded.skipped.len(), &count_by_code(&encoded.skipped))
    );
    print_calibration(&calibration);
    bundle.save_with_calibration(calibration)?;
    println!("updated {}", bundle.path.display());
    Ok(())
}
