//! `serve`, `publish` and `demo`: the daemon and the tools around it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::config::Config;
use crate::data::DataSet;
use crate::stream::daemon::{self, Control};
use crate::stream::publish::{publish_set, PublishAs, Publisher};
use crate::telemetry::metrics::{score_buckets, Metrics};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file (TOML); `DLSR__SECTION__KEY` environment variables override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Metrics whose score buckets come from the bundle named in the configuration.
pub fn metrics_for(cfg: &Config) -> anyhow::Result<Arc<Metrics>> {
    let meta = crate::model::bundle::read_meta(&cfg.model.bundle)
        .with_context(|| format!("model.bundle = {}", cfg.model.bundle.display()))?;
    let thresholds = crate::stream::decide::Thresholds::resolve(
        &cfg.thresholds,
        &meta.calibration,
        meta.default_score,
        meta.has_first_epoch,
    )?;
    Ok(Arc::new(Metrics::new(score_buckets(&meta.calibration, &thresholds.values()))))
}

pub fn run_serve(args: &ServeArgs) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM during start-up must also end in a clean, drained exit.
    let control = Control::default();
    crate::shutdown::forward_signals(control.shutdown.clone(), control.reload.clone());
    let cfg = Config::load(args.config.as_deref())?;
    crate::telemetry::init_logging(cfg.log.format, &cfg.log.level);
    if args.config.is_none() {
        tracing::warn!(
            brokers = %cfg.kafka.brokers,
            bundle = %cfg.model.bundle.display(),
            "no --config: serving with the built-in defaults and DLSR__* environment variables \
             (config/dlsr.toml lists every key with its default)"
        );
    }
    let metrics = metrics_for(&cfg)?;
    let summary = daemon::run(cfg, args.config.clone(), control, metrics)?;
    eprintln!("{}", serde_json::to_string(&summary)?);
    if summary.threads_left_running > 0 {
        // A scorer still inside a libtorch call when the drain deadline came: leave
        // without running exit-time destructors under its feet (everything that
        // matters, the final commit included, is done).
        use std::io::Write;
        let _ = std::io::stderr().flush();
        let _ = std::io::stdout().flush();
        // SAFETY: _exit ends the process at once; no Rust state is used afterwards.
        unsafe { libc::_exit(0) };
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// The topic to publish to (the daemon's `kafka.topics`).
    #[arg(long)]
    pub topic: String,
    /// Image files, folders, IDX files or MNIST-style CSVs.
    #[arg(required = true)]
    pub specs: Vec<String>,
    /// Messages per second (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Take only the first N items of each SPEC.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Create the topic with this many partitions if it does not exist.
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Extra librdkafka producer property, KEY=VALUE (repeatable).
    #[arg(short = 'X', value_parser = parse_kv)]
    pub properties: Vec<(String, String)>,
    /// Seconds to wait for the brokers to answer before giving up (exit 1), at the start.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// Publish JSON references `{"id": ..., "uri": ...}` to the images where they are
    /// (objects under an `s3://`/`gs://`/`az://` SPEC, or `file://` paths) instead of
    /// their bytes: the claim-check pattern, for demos and tests.
    #[arg(long)]
    pub as_reference: bool,
}

pub(super) fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub fn run_publish(args: &PublishArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut publisher = Publisher::new(&args.brokers, &args.properties)?;
    if let Some(p) = args.partitions {
        // Reachable first, so a wrong address gets that message, not a topic error.
        publisher.check_reachable(&args.brokers, timeout)?;
        crate::stream::publish::ensure_topic(&args.brokers, &args.topic, p, &args.properties)?;
    }
    publisher.check(&args.brokers, &args.topic, timeout)?;
    let mut unreadable = 0;
    for (spec, prefix) in args.specs.iter().zip(crate::data::source::id_prefixes(&args.specs)) {
        let set = DataSet::open(spec)?.with_limit(args.limit).with_id_prefix(prefix);
        let how = if args.as_reference { PublishAs::Reference } else { PublishAs::Bytes };
        unreadable += publish_set(&mut publisher, &set, &args.topic, args.rate, how)?;
    }
    let report = publisher.finish(started, unreadable)?;
    println!(
        "published {} of {} messages to {} in {:.1}s ({:.0}/s); {} failed, {} unreadable items",
        report.delivered,
        report.sent,
        args.topic,
        report.seconds,
        report.delivered as f64 / report.seconds.max(1e-9),
        report.failed,
        report.unreadable
    );
    if report.failed > 0 || report.delivered < report.sent {
        bail!("{} messages were not delivered", report.sent - report.delivered);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo's model bundle is kept (fitted on first use).
    #[arg(long, default_value = "runs/demo/fmnist.safetensors")]
    pub bundle: PathBuf,
    /// Fashion-MNIST test images to send (in-distribution).
    #[arg(long, default_value_t = 300)]
    pub id_images: usize,
    /// MNIST digits to send (out-of-distribution).
    #[arg(long, default_value_t = 100)]
    pub ood_images: usize,
    /// Address for /metrics while the demo runs.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,
    /// Seconds after which the demo stops even if outputs are missing.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run_demo(args: &DemoArgs, quiet: bool) -> anyhow::Result<()> {
    crate::telemetry::init_logging(crate::config::LogFormat::Text, "warn");
    let opts = super::demo::DemoOptions {
        bundle: args.bundle.clone(),
        id_images: args.id_images,
        ood_images: args.ood_images,
        metrics_listen: args.metrics_listen.clone(),
        timeout: Duration::from_secs(args.timeout),
        device: args.device.clone(),
        quiet,
    };
    let report = super::demo::run(&opts)?;
    if !report.complete {
        bail!("the demo stopped before every message had its verdict or dead letter");
    }
    Ok(())
}
