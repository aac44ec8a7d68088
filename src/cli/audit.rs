//! `dlsr audit`: files, folders, data sets or a range of a Kafka topic in; a report folder
//! out (`report.html`, `items.jsonl`, `summary.json`, `skipped.jsonl`). The work is in
//! [`crate::audit`]; this module reads the items, scores them in batches and writes.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tch::Tensor;

use super::model_cmds::{BundleArgs, JudgingArgs, WorkerModels};
use super::DataArgs;
use crate::audit::topic::{parse_time, Start, TopicMessage, TopicRange, TopicReader};
use crate::audit::window::{GroupBy, Item, Reference, WindowAuditor, WindowRecord};
use crate::audit::{
    self, report, AuditError, AuditSettings, Outputs, ScoredBatch, SetAudit, SetSummary, Skipped, Thumbnailer,
};
use crate::data::DataSet;
use crate::encode::{EncodeOptions, RawBatch};
use crate::kafka::message::{item_id, Source};
use crate::model::bundle::Bundle;
use crate::model::features::FeatureExtractor;
use crate::model::score::ScoreKind;
use crate::progress::Progress;
use crate::verdict::judge;

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub bundle: BundleArgs,
    /// Image files, folders, IDX files or MNIST-style CSVs (or --from-topic).
    pub specs: Vec<String>,
    /// Folder for report.html, items.jsonl, summary.json and skipped.jsonl (created; the
    /// files in it are replaced only when the new ones are complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Most out-of-distribution items shown in the report.
    #[arg(long, default_value_t = 48)]
    pub top: usize,
    /// Most typical items shown for contrast.
    #[arg(long, default_value_t = 12)]
    pub typical: usize,
    /// A second set shown side by side (e.g. last week's data).
    #[arg(long, num_args = 1.., value_name = "SPEC")]
    pub compare: Vec<String>,
    /// Read a Kafka topic instead of files, by assignment (no group, nothing committed).
    #[arg(long, value_name = "TOPIC", requires = "brokers")]
    pub from_topic: Option<String>,
    /// Bootstrap servers for --from-topic.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Start at the first message at or after this time: RFC 3339, milliseconds since
    /// the epoch, or a duration ago (90s, 30m, 6h, 7d). Default: the beginning.
    #[arg(long, requires = "from_topic", conflicts_with = "from_offset")]
    pub since: Option<String>,
    /// Start every partition at this offset.
    #[arg(long, requires = "from_topic")]
    pub from_offset: Option<i64>,
    /// Stop before the first message at or after this time (default: read each
    /// partition until the audit has caught up with it).
    #[arg(long, requires = "from_topic")]
    pub until: Option<String>,
    /// librdkafka property for --from-topic (security settings), KEY=VALUE; repeatable.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = super::stream_cmds::parse_kv)]
    pub kafka_properties: Vec<(String, String)>,
    /// Seconds the brokers may stay silent before the audit stops with an error.
    #[arg(long, default_value_t = 30)]
    pub kafka_timeout: u64,
    /// A daemon config whose `[input]` section says how the topic's values are read
    /// (format, pointers, allowed hosts, file root, object store); without it values are
    /// read with the defaults (`auto`, `/image`, `/uri`, references to cloud stores only).
    #[arg(long, value_name = "FILE", requires = "from_topic")]
    pub config: Option<PathBuf>,
    /// Also judge the items window by window, N items each, as the daemon does (files and
    /// folders in their listed order, --from-topic in offset order): windows.jsonl (the
    /// daemon's window records, docs/window.schema.json) and a p-value plot in the report.
    #[arg(long, value_name = "N")]
    pub window: Option<usize>,
    /// What a source is for --window: folder (the item's folder), header:NAME or
    /// json:/pointer (with --from-topic). Default: one group.
    #[arg(long, value_name = "SPEC", requires = "window")]
    pub group_by: Option<String>,
    /// Windows with fewer items are too small to judge (default: 100, at most N).
    #[arg(long, value_name = "N", requires = "window")]
    pub window_min_items: Option<usize>,
    /// A window is shifted when a corrected p-value is under this (the daemon's audit.alpha).
    #[arg(long, default_value_t = 0.001, requires = "window")]
    pub alpha: f64,
    #[command(flatten)]
    pub judging: JudgingArgs,
    /// Report title.
    #[arg(long, default_value = "dlsr audit")]
    pub title: String,
    #[command(flatten)]
    pub data_opts: DataArgs,
}

/// Hands free heap memory back to the kernel every few seconds, as the daemon does
/// (`crate::memory`): glibc's arenas otherwise keep the high-water marks of batches
/// scored on different threads, and resident memory creeps up with the items read.
struct Trim(std::time::Instant);

impl Trim {
    fn new() -> Self {
        Self(std::time::Instant::now())
    }

    fn tick(&mut self) {
        if self.0.elapsed() >= Duration::from_secs(5) {
            crate::memory::release_free_memory();
            self.0 = std::time::Instant::now();
        }
    }
}

/// `--window N`: the daemon's window auditor over the items in the order read.
struct OfflineWindows {
    auditor: WindowAuditor,
    records: Vec<WindowRecord>,
    /// The "topic" of items read from files.
    label: String,
    /// The position of the next item read from files (their "offset").
    next: i64,
}

impl OfflineWindows {
    fn new(
        args: &AuditArgs,
        n: usize,
        calibration: &crate::eval::calibration::Calibration,
        kind: ScoreKind,
        label: &str,
    ) -> anyhow::Result<Self> {
        let defaults = crate::config::AuditConfig::default();
        let group_by = GroupBy::parse(args.group_by.as_deref().unwrap_or(""))?;
        if args.from_topic.is_none() && !matches!(group_by, GroupBy::None | GroupBy::Folder) {
            bail!(
                "--group-by {:?} reads messages: it needs --from-topic (for files: folder)",
                args.group_by.as_deref().unwrap_or("")
            );
        }
        if args.from_topic.is_some() && group_by == GroupBy::Folder {
            bail!("--group-by folder is for files; a topic's messages are grouped by header:NAME or json:/pointer");
        }
        let settings = crate::audit::window::WindowSettings {
            window_items: n,
            window_max: None,
            min_items: args.window_min_items.unwrap_or(defaults.min_items.min(n)),
            alpha: args.alpha,
            max_groups: defaults.max_groups,
            group_idle: Duration::from_secs(u64::MAX / 4),
            expected_run_time_items: defaults.expected_run_time_items,
            detector_shift: defaults.detector_shift_sd,
        };
        let (reference, warning) = Reference::from_calibration(calibration, kind, true)?;
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        let auditor = WindowAuditor::new(settings, group_by, vec![reference], "offline".into())?;
        Ok(Self { auditor, records: Vec::new(), label: label.to_string(), next: 0 })
    }

    /// Feeds a scored batch; `groups[i]` is item i's grouping field (messages only).
    fn add(&mut self, scored: &ScoredBatch, groups: &[Option<Vec<u8>>]) {
        for (i, (v, source)) in scored.verdicts.iter().zip(&scored.sources).enumerate() {
            let folder = (*self.auditor.group_by() == GroupBy::Folder).then(|| {
                std::path::Path::new(&v.id)
                    .parent()
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let group = folder.map(String::into_bytes).or_else(|| groups.get(i).cloned().flatten());
            let (topic, partition, offset, timestamp) = match source {
                Some(s) => (s.topic.as_str(), s.partition, s.offset, s.timestamp),
                None => (self.label.as_str(), 0, self.next, None),
            };
            let layer_cos: Vec<f64> = v.layers.iter().map(|l| l.cos).collect();
            let item = Item {
                topic,
                group: group.as_deref(),
                partition,
                offset,
                timestamp,
                id: &v.id,
                kind: v.score_kind,
                score: v.score,
                threshold: v.threshold,
                flagged: v.is_ood,
                layer_cos: &layer_cos,
            };
            let closed = self.auditor.observe(&item);
            self.records.extend(closed);
            self.next += 1;
        }
    }

    fn finish(mut self) -> Vec<WindowRecord> {
        let rest = self.auditor.close_all("end");
        self.records.extend(rest);
        self.records
    }
}

/// Scores one batch of preprocessed images into verdicts.
fn score_batch(
    (bundle, extractor): &(Bundle, FeatureExtractor),
    kind: ScoreKind,
    threshold: f64,
    batch: RawBatch,
    sources: Vec<Option<Source>>,
) -> anyhow::Result<ScoredBatch> {
    let errors = batch
        .errors
        .iter()
        .map(|e| Skipped {
            id: e.id.clone(),
            code: e.code().to_string(),
            reason: e.kind.to_string(),
            source: None,
        })
        .collect();
    let Some(images) = batch.images else {
        return Ok(ScoredBatch { verdicts: Vec::new(), sources, features: None, images: None, errors });
    };
    let features = extractor.extract(&images)?;
    let scores = bundle.scorer(&bundle.meta.scoring).score(&features.values, &batch.seeds)?;
    let verdicts = batch
        .ids
        .iter()
        .zip(&scores)
        .map(|(id, s)| judge(id, s, kind, &bundle.meta.calibration, Some(threshold)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ScoredBatch { verdicts, sources, features: Some(features.values), images: Some(images), errors })
}

pub fn run(args: &AuditArgs, quiet: bool) -> anyhow::Result<()> {
    if args.specs.is_empty() == args.from_topic.is_none() {
        bail!("give either image SPECs or --from-topic TOPIC (not both, not neither)");
    }
    let range = topic_range(args)?;
    let interrupted = crate::shutdown::interrupt_flag();
    let (bundle, extractor) = args.bundle.load()?;
    let meta = bundle.meta.clone();
    let crate::stream::decide::Threshold { kind, value: threshold } = args.judging.threshold(&meta)?;
    let expected_rate = audit::expected_rate(&meta.calibration, kind, threshold);
    let settings = AuditSettings {
        top: args.top,
        typical: args.typical,
        kind,
        threshold,
        expected_rate,
        layers: meta.offsets.layers(),
    };
    let thumbnailer = Thumbnailer { normalisation: meta.preprocess.normalisation };
    let sha = bundle.sha256.clone();
    let pre = extractor.preprocess;
    let mut outputs = Outputs::create(&args.out)?;
    let models = WorkerModels::new(&args.bundle, (bundle, extractor));
    let opts = EncodeOptions { batch_size: args.bundle.batch_size, limits: args.data_opts.limits(), quiet };

    let mut sets: Vec<SetSummary> = Vec::new();
    let main_label = match &args.from_topic {
        Some(t) => format!("topic {t}"),
        None => args.specs.join(" + "),
    };
    let mut jobs = vec![("", main_label.clone(), args.specs.clone())];
    if !args.compare.is_empty() {
        jobs.push(("compare-", format!("compare: {}", args.compare.join(" + ")), args.compare.clone()));
    }
    let mut windows = match args.window {
        Some(0 | 1) => bail!("--window needs at least 2 items a window"),
        Some(n) => Some(OfflineWindows::new(args, n, &meta.calibration, kind, &main_label)?),
        None => None,
    };
    for (i, (prefix, label, specs)) in jobs.into_iter().enumerate() {
        // Windows cover the main set, not --compare's.
        let windows = if i == 0 { windows.as_mut() } else { None };
        let mut set =
            SetAudit::new(&label, settings.clone(), thumbnailer, &args.out, &format!("{prefix}audit"))?;
        let read = if let (0, Some(range)) = (i, &range) {
            audit_topic(range, args, &models, &settings, (&mut set, windows), &opts, interrupted)
        } else {
            audit_files(args, &models, &settings, (&specs, pre), (&mut set, windows), &opts, interrupted)
                .map(|()| Vec::new())
        };
        let partitions = match read {
            Ok(p) => p,
            Err(e) => {
                set.discard();
                return Err(e);
            }
        };
        let items = outputs.stage(&format!("{prefix}items.jsonl"));
        let skipped = outputs.stage(&format!("{prefix}skipped.jsonl"));
        sets.push(set.finish(&items, &skipped, partitions)?);
    }
    if interrupted.load(Ordering::SeqCst) {
        return Err(AuditError::Interrupted.into());
    }

    let windows = windows.map(OfflineWindows::finish);
    if let Some(records) = &windows {
        let path = outputs.stage("windows.jsonl");
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let empty = Vec::new();
    let quantiles = meta.calibration.scores.get(&kind).map(|c| &c.quantiles).unwrap_or(&empty);
    let channels: Vec<i64> = (0..meta.offsets.layers())
        .map(|l| {
            let (a, b) = meta.offsets.range(l);
            b - a
        })
        .collect();
    let generated = crate::kafka::message::rfc3339_now();
    let model_name =
        args.bundle.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let ctx = report::ReportContext {
        title: &args.title,
        generated: &generated,
        model_name: &model_name,
        model_sha256: &sha,
        encoder: &meta.encoder.name,
        input_size: meta.preprocess.size,
        id_quantiles: quantiles,
        calibration_items: meta.calibration.items,
        calibration_source: &meta.calibration.source,
        layer_channels: &channels,
        windows: windows.as_deref().unwrap_or(&[]),
        window_alpha: args.alpha,
    };
    let refs: Vec<&SetSummary> = sets.iter().collect();
    let html = report::render(&ctx, &refs);
    let report_path = outputs.stage("report.html");
    std::fs::write(&report_path, html).with_context(|| format!("writing {}", report_path.display()))?;
    let summary_path = outputs.stage("summary.json");
    let mut summary = serde_json::to_value(&sets[0])?;
    if let (Some(obj), Some(compare)) = (summary.as_object_mut(), sets.get(1)) {
        obj.insert("compare".into(), serde_json::to_value(compare)?);
    }
    if let Some(obj) = summary.as_object_mut() {
        obj.insert("model".into(), serde_json::json!({"name": model_name, "sha256": sha}));
        obj.insert("generated".into(), serde_json::json!(generated));
        if let Some(records) = &windows {
            obj.insert("windows".into(), windows_summary(records, args));
        }
    }
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", summary_path.display()))?;
    outputs.commit()?;

    for s in &sets {
        let skipped: usize = s.skipped.values().sum();
        println!(
            "{}: {} — {} items, {} flagged ({:.1}%, expected {:.1}%), p = {}, {} skipped{}",
            s.label,
            s.verdict,
            s.items,
            s.flagged,
            100.0 * s.flagged_rate,
            100.0 * s.expected_rate,
            report::p_value_text(s.p_value),
            skipped,
            s.skipped.iter().map(|(code, n)| format!(" {code}={n}")).collect::<String>()
        );
        if s.items == 0 {
            eprintln!("warning: {}: no item was scored; the report is empty", s.label);
        }
    }
    if let Some(records) = &windows {
        let shifted: Vec<&WindowRecord> = records.iter().filter(|w| w.shifted()).collect();
        let too_small = records.iter().filter(|w| w.verdict == "too_small").count();
        println!(
            "windows: {} of up to {} items, {} shifted, {} too small{}",
            records.len(),
            args.window.unwrap_or(0),
            shifted.len(),
            too_small,
            shifted.first().map_or(String::new(), |w| format!("; first shifted: {}", w.line()))
        );
    }
    println!(
        "wrote {}/report.html, items.jsonl, summary.json, skipped.jsonl{}",
        args.out.display(),
        if windows.is_some() { ", windows.jsonl" } else { "" }
    );
    Ok(())
}

fn audit_files(
    args: &AuditArgs,
    models: &WorkerModels,
    settings: &AuditSettings,
    (specs, pre): (&[String], crate::data::Preprocess),
    (set, mut windows): (&mut SetAudit, Option<&mut OfflineWindows>),
    opts: &EncodeOptions,
    interrupted: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let device = args.bundle.device.resolve()?;
    let (workers, threads_each) = crate::device::scoring_workers(args.judging.workers, device);
    let mut trim = Trim::new();
    for (spec, prefix) in specs.iter().zip(crate::data::source::id_prefixes(specs)) {
        let remaining = args.data_opts.limit.map(|l| l.saturating_sub(set.items()));
        if remaining == Some(0) {
            break;
        }
        let data = match DataSet::open(spec) {
            Ok(d) => d.with_limit(remaining).with_id_prefix(prefix),
            Err(e) => {
                set.skip(Skipped {
                    id: spec.clone(),
                    code: "unreadable".into(),
                    reason: e.to_string(),
                    source: None,
                })?;
                continue;
            }
        };
        crate::encode::parallel_batches(
            &data,
            opts,
            pre,
            (workers, threads_each),
            "audit",
            || models.get(),
            |state, batch| {
                let sources = vec![None; batch.ids.len()];
                score_batch(state, settings.kind, settings.threshold, batch, sources)
            },
            |scored| {
                if interrupted.load(Ordering::SeqCst) {
                    return Err(AuditError::Interrupted.into());
                }
                if let Some(w) = windows.as_deref_mut() {
                    w.add(&scored, &[]);
                }
                set.add(scored)?;
                trim.tick();
                Ok(())
            },
        )?;
    }
    Ok(())
}

/// The topic range the arguments ask for (checked before any model is loaded).
fn topic_range(args: &AuditArgs) -> anyhow::Result<Option<TopicRange>> {
    let Some(topic) = &args.from_topic else { return Ok(None) };
    let now = crate::kafka::message::now_millis();
    let time = |s: &Option<String>, flag: &str| -> anyhow::Result<Option<i64>> {
        s.as_deref().map(|s| parse_time(s, now).map_err(|e| anyhow::anyhow!("{flag}: {e}"))).transpose()
    };
    let start = match (time(&args.since, "--since")?, args.from_offset) {
        (Some(ms), _) => Start::Time(ms),
        (None, Some(o)) if o >= 0 => Start::Offset(o),
        (None, Some(o)) => bail!("--from-offset {o} must be 0 or more"),
        (None, None) => Start::Beginning,
    };
    Ok(Some(TopicRange {
        brokers: args.brokers.clone().unwrap_or_default(),
        topic: topic.clone(),
        start,
        until: time(&args.until, "--until")?,
        properties: args.kafka_properties.clone(),
        timeout: Duration::from_secs(args.kafka_timeout.max(1)),
    }))
}

/// A decoded message waiting for its batch: id, seed, image, where it came from, and its
/// grouping field for `--window`.
type Pending = (String, u64, Tensor, Source, Option<Vec<u8>>);

/// What summary.json says of the windows.
fn windows_summary(records: &[WindowRecord], args: &AuditArgs) -> serde_json::Value {
    let count = |v: &str| records.iter().filter(|w| w.verdict == v).count();
    serde_json::json!({
        "window_items": args.window,
        "group_by": args.group_by.clone().unwrap_or_default(),
        "alpha": args.alpha,
        "windows": records.len(),
        "shifted": count("shifted"),
        "in_distribution": count("in_distribution"),
        "too_small": count("too_small"),
        "groups": records.iter().map(|w| w.group.as_str()).collect::<std::collections::BTreeSet<_>>(),
    })
}

fn audit_topic(
    range: &TopicRange,
    args: &AuditArgs,
    models: &WorkerModels,
    settings: &AuditSettings,
    (set, mut windows): (&mut SetAudit, Option<&mut OfflineWindows>),
    opts: &EncodeOptions,
    interrupted: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Vec<audit::topic::PartitionRange>> {
    let mut reader = TopicReader::open(range).with_context(|| format!("reading topic {}", range.topic))?;
    let total = match args.data_opts.limit {
        Some(l) => reader.total().min(l as u64),
        None => reader.total(),
    };
    let state = models.get()?;
    let pre = state.1.preprocess;
    let limits = opts.limits;
    let batch_size = opts.batch_size.max(1);
    let mut progress = Progress::new("audit", total, opts.quiet);
    let mut trim = Trim::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut taken = 0u64;
    let input = match &args.config {
        Some(path) => crate::config::Config::load(Some(path))?.input,
        None => crate::config::InputConfig::default(),
    };
    let group_by = windows.as_deref().map(|w| w.auditor.group_by().clone()).unwrap_or(GroupBy::None);
    // The daemon's envelope, reading the window audit's source as its resolve stage does.
    let spec = crate::data::envelope::EnvelopeSpec {
        group_pointer: group_by.json_pointer().to_string(),
        ..input.envelope_for(&range.topic)
    };
    let fetcher = crate::data::reference::Fetcher::new(
        input.fetch_policy(&limits, crate::data::reference::Persistence::Retries),
    );
    let runtime = crate::data::chain::io_runtime()?;
    let decoder = crate::data::chain::default_decoder();
    let flush = |pending: &mut Vec<Pending>,
                 set: &mut SetAudit,
                 windows: Option<&mut OfflineWindows>|
     -> anyhow::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let items: Vec<_> = std::mem::take(pending);
        let tensors: Vec<&Tensor> = items.iter().map(|i| &i.2).collect();
        let images = Tensor::f_stack(&tensors, 0)?;
        let raw = RawBatch {
            ids: items.iter().map(|i| i.0.clone()).collect(),
            seeds: items.iter().map(|i| i.1).collect(),
            images: Some(images),
            errors: Vec::new(),
        };
        let groups: Vec<Option<Vec<u8>>> = items.iter().map(|i| i.4.clone()).collect();
        let sources = items.into_iter().map(|i| Some(i.3)).collect();
        let scored = score_batch(&state, settings.kind, settings.threshold, raw, sources)?;
        if let Some(w) = windows {
            w.add(&scored, &groups);
        }
        set.add(scored)?;
        Ok(())
    };
    reader.read(|m: TopicMessage| -> anyhow::Result<bool> {
        if interrupted.load(Ordering::SeqCst) {
            return Err(AuditError::Interrupted.into());
        }
        let key_id = item_id(m.key.as_deref(), &m.source);
        // The daemon's input chain: the same envelopes, fetches, limits and error codes.
        let read = crate::data::chain::unpack(&m.value, &spec).and_then(|mut u| {
            let observer = crate::data::reference::Unobserved;
            runtime.block_on(crate::data::chain::fetch_into(&mut u, &fetcher, &observer))?;
            let image = u.image.as_deref().unwrap_or(&m.value);
            let tensor = crate::data::chain::decode_to_tensor(&decoder, image, &limits, &pre)?;
            Ok((u.id, u.group, tensor))
        });
        match read {
            Ok((id, json_group, (image, seed))) => {
                // The daemon's grouping of the same message.
                let group =
                    crate::stream::window_stage::group_value(&group_by, &m.headers, json_group.as_deref());
                pending.push((id.unwrap_or(key_id), seed, image, m.source, group))
            }
            Err(e) => {
                let (code, reason) = (e.code(), e.to_string());
                set.skip(Skipped { id: key_id, code: code.into(), reason, source: Some(m.source) })?;
            }
        }
        if pending.len() >= batch_size {
            flush(&mut pending, set, windows.as_deref_mut())?;
            trim.tick();
        }
        taken += 1;
        progress.inc(1, None);
        Ok(args.data_opts.limit.is_none_or(|l| taken < l as u64))
    })?;
    flush(&mut pending, set, windows)?;
    progress.finish();
    Ok(reader.ranges.clone())
}
