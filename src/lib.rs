//! dlsr: out-of-distribution auditing of image streams with DLSR (diffusion-based
//! layer-wise semantic reconstruction, NeurIPS 2024).
//!
//! The library follows the data:
//! - [`device`] loads the CUDA backend when a CUDA libtorch is present and turns
//!   `--device auto|cpu|cuda|cuda:N` into a `tch::Device` (or a clear error).
//! - [`assets`] finds the files the project's scripts install (weights, data sets).
//! - [`data`] decodes images under size limits, reads data sets (image files and folders,
//!   IDX, the MNIST CSV) and preprocesses them for an encoder.
//! - [`model`] holds the frozen encoders (native EfficientNet-Lite, any TorchScript module
//!   returning feature maps) and turns their maps into DLSR's multi-layer feature vector.
//! - [`cli`] implements the subcommands; `main.rs` only parses arguments and maps errors
//!   to exit codes.
//!
//! The diffusion model, calibration, evaluation and the Kafka daemon arrive with later
//! issues (see `docs/ARCHITECTURE.md`).

pub mod assets;
pub mod audit;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod encode;
pub mod eval;
pub mod evaluate;
pub mod fit;
pub mod memory;
pub mod model;
pub mod progress;
pub mod shutdown;
pub mod stream;
pub mod telemetry;
pub mod tensor_file;
pub mod verdict;
