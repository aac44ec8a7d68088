//! dlsr: out-of-distribution auditing of image streams with DLSR (diffusion-based
//! layer-wise semantic reconstruction, NeurIPS 2024).
//!
//! The library follows the data:
//! - [`device`] loads the CUDA backend when a CUDA libtorch is present and turns
//!   `--device auto|cpu|cuda|cuda:N` into a `tch::Device` (or a clear error); [`memory`]
//!   keeps the allocator's footprint flat.
//! - [`assets`] finds the files the project's scripts install (weights, data sets).
//! - [`data`] is the one input chain: data sets (files, folders, IDX, MNIST CSV, object
//!   store prefixes), message envelopes (raw or JSON), references fetched through
//!   `object_store`, decoding under limits, preprocessing, one typed error per item.
//! - [`model`]: the frozen encoders, the multi-layer feature vector, the LFDN, its
//!   training and scoring, and the model bundle; [`encode`] batches images through an
//!   encoder; [`fit`] trains and calibrates a bundle.
//! - [`stats`] (binomial tail, Clopper-Pearson) and [`calibration`] (thresholds and ID
//!   quantiles from held-out scores) sit below both [`model`] and the judging modules.
//! - [`verdict`] turns an item's scores into a verdict; [`eval`] and [`evaluate`] measure
//!   detection (AUROC, FPR95, AUPR, plots); [`audit`] judges whole sets and windows of a
//!   stream (reports, two-sample tests, the online detector).
//! - [`stream`] is the daemon (consumer, resolve, decode, score, decide, produce,
//!   offsets, the served models and their hot swap, the window auditor) and the Kafka
//!   tools built on it (`publish`, `tail`); [`kafka`] the client helpers they and the
//!   topic audit share (settings, topics, headers, records, librdkafka's logs);
//!   [`config`] its configuration; [`telemetry`] its metrics, HTTP probes and logs;
//!   [`shutdown`] the interruption of long batch work.
//! - [`cli`] implements the subcommands; `main.rs` only parses arguments and maps errors
//!   to exit codes. [`progress`] and [`tensor_file`] are small helpers.
//!
//! `docs/ARCHITECTURE.md` has the module table with what each module must never do.

pub mod assets;
pub mod audit;
pub mod calibration;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod encode;
pub mod eval;
pub mod evaluate;
pub mod fit;
pub mod kafka;
pub mod memory;
pub mod model;
pub mod progress;
pub mod shutdown;
pub mod stats;
pub mod stream;
pub mod telemetry;
pub mod tensor_file;
pub mod verdict;
