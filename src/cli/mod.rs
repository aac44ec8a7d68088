//! The command line: argument definitions and one function per subcommand. This is an
//! edge of the program, so it reports errors with `anyhow` context; everything it calls
//! returns typed errors.

mod audit;
pub mod demo;
pub mod doctor;
mod features;
mod model_cmds;
mod stream_cmds;
mod tail;

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::data::{DecodeLimits, Normalisation, Preprocess, ResizeMode};
use crate::device::DeviceSpec;
use crate::model::encoder::{self, EncoderSpec, Precision};
use crate::model::features::FeatureExtractor;

#[derive(Debug, Parser)]
#[command(name = "dlsr", version, about = "Out-of-distribution auditing of image streams with DLSR", long_about = None)]
pub struct Cli {
    /// Log level filter (error, warn, info, debug, trace or a tracing directive).
    #[arg(long, global = true, default_value = "warn", env = "DLSR_LOG")]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// No progress output.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Encode an in-distribution set, train the diffusion model, calibrate, write a bundle.
    Fit(Box<model_cmds::FitArgs>),
    /// Recompute a bundle's thresholds from another in-distribution set.
    Calibrate(Box<model_cmds::CalibrateArgs>),
    /// Score images (files, folders, IDX, CSV): JSON lines out.
    Score(Box<model_cmds::ScoreArgs>),
    /// An ID set against OOD sets: AUROC, FPR95, AUPR, plots and a report.
    Eval(Box<model_cmds::EvalArgs>),
    /// Audit a set of images or a range of a Kafka topic as a whole: is it like the data
    /// the model was fitted on? Writes report.html, items.jsonl and summary.json.
    Audit(Box<audit::AuditArgs>),
    /// The streaming daemon: Kafka in, verdicts and dead letters out, Prometheus metrics.
    Serve(stream_cmds::ServeArgs),
    /// Print the daemon's verdicts and dead letters from Kafka, one line each (reads by
    /// assignment: no group, nothing committed).
    Tail(Box<tail::TailArgs>),
    /// Push images from files or data sets into a Kafka topic.
    Publish(Box<stream_cmds::PublishArgs>),
    /// Self-contained demonstration: in-process broker, model, daemon, metrics.
    Demo(Box<stream_cmds::DemoArgs>),
    /// Encode images into DLSR multi-layer feature vectors (optionally to a file).
    Features(Box<features::FeaturesArgs>),
    /// Report libtorch, devices, threads and installed assets.
    Doctor(doctor::DoctorArgs),
}

/// Encoder input size unless `--input-size` says otherwise (chosen by measurement).
pub const DEFAULT_INPUT_SIZE: i64 = 64;

/// Options shared by every command that runs an encoder.
#[derive(Debug, Args, Clone)]
pub struct EncoderArgs {
    /// Encoder: lite0, lite2, or a TorchScript .pt that returns a list of feature maps.
    #[arg(long, default_value = "lite0")]
    pub encoder: String,
    /// Weights for a native encoder (default: the installed ImageNet checkpoint).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Side of the square encoder input in pixels. 64 by default: on Fashion-MNIST vs
    /// MNIST it scored AUROC 0.996 against 0.970 at 224 px, at 1/18 of the CPU time (see
    /// the README's benchmark); photos of ImageNet-like content may want 224.
    #[arg(long, default_value_t = DEFAULT_INPUT_SIZE)]
    pub input_size: i64,
    /// stretch (DLSR: resize to the square) or center-crop (ImageNet evaluation style).
    #[arg(long, default_value = "stretch", value_parser = parse_resize)]
    pub resize: ResizeMode,
    /// Normalisation: lite, imagenet, or MEAN,MEAN,MEAN/STD,STD,STD on the 0..255 scale
    /// (default: what the encoder expects).
    #[arg(long, value_parser = parse_norm)]
    pub norm: Option<Normalisation>,
    /// Images per encoder batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Shrink images with plain bilinear sampling, as dlsr did before anti-aliasing
    /// (enlarging is plain bilinear either way).
    #[arg(long)]
    pub no_antialias: bool,
    /// f32, or on CUDA f16 (autocast) / bf16.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// auto (CUDA when available), cpu, cuda (or gpu) or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

fn parse_resize(s: &str) -> Result<ResizeMode, String> {
    match s {
        "stretch" => Ok(ResizeMode::Stretch),
        "center-crop" | "centre-crop" => Ok(ResizeMode::CenterCrop),
        other => Err(format!("unknown resize mode {other:?}: expected stretch or center-crop")),
    }
}

fn parse_norm(s: &str) -> Result<Normalisation, String> {
    Normalisation::parse(s)
        .ok_or_else(|| format!("bad normalisation {s:?}: expected lite, imagenet or M,M,M/S,S,S with S > 0"))
}

impl EncoderArgs {
    pub fn build(&self) -> anyhow::Result<FeatureExtractor> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if !(16..=2048).contains(&self.input_size) {
            bail!("--input-size {} is outside 16..2048", self.input_size);
        }
        let device = self.device.resolve()?;
        let spec: EncoderSpec = self.encoder.parse()?;
        let encoder = encoder::load(&spec, self.weights.as_deref(), device, self.precision)
            .with_context(|| format!("loading encoder {}", self.encoder))?;
        let native = encoder.identity().native_preprocess;
        let preprocess = Preprocess {
            size: self.input_size,
            resize: self.resize,
            normalisation: self.norm.unwrap_or(native.normalisation),
            antialias: !self.no_antialias,
        };
        Ok(FeatureExtractor::new(encoder, preprocess))
    }
}

/// Options of every command that reads image data.
#[derive(Debug, Args, Clone)]
pub struct DataArgs {
    /// Take only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Largest encoded image accepted, in bytes.
    #[arg(long, default_value_t = DecodeLimits::default().max_bytes)]
    pub max_bytes: u64,
    /// Largest accepted width x height.
    #[arg(long, default_value_t = DecodeLimits::default().max_pixels)]
    pub max_pixels: u64,
}

impl DataArgs {
    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits { max_bytes: self.max_bytes, max_pixels: self.max_pixels, ..DecodeLimits::default() }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Doctor(args) => doctor::run(&args),
        Command::Features(args) => features::run(&args, cli.quiet),
        Command::Fit(args) => model_cmds::run_fit(&args, cli.quiet),
        Command::Score(args) => model_cmds::run_score(&args, cli.quiet),
        Command::Eval(args) => model_cmds::run_eval(&args, cli.quiet),
        Command::Calibrate(args) => model_cmds::run_calibrate(&args, cli.quiet),
        Command::Serve(args) => stream_cmds::run_serve(&args),
        Command::Publish(args) => stream_cmds::run_publish(&args),
        Command::Tail(args) => tail::run(&args, cli.quiet),
        Command::Demo(args) => stream_cmds::run_demo(&args, cli.quiet),
        Command::Audit(args) => audit::run(&args, cli.quiet),
    }
}
