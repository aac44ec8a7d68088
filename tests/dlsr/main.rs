//! Integration tests, one binary; modules group behaviour. Tests that need the installed
//! assets (weights, data sets) fail with a pointer to `scripts/fetch-assets.sh` when
//! they are missing, rather than passing vacuously.

mod audit;
mod broker;
mod cli;
mod common;
mod encoders;
mod inputs;
mod kubernetes;
mod model;
mod ops;
mod peer;
mod pipeline;
mod references;
mod secured;
mod stream;
mod swap;
mod topics;
mod windows;
