#!/usr/bin/env bash
# The main job on the embedded default data, from a fresh clone, with nothing started by
# hand: installs libtorch, the data sets and the test broker (pinned, checksum-verified),
# builds dlsr, and runs `dlsr demo`: an in-process Kafka, a model fitted on Fashion-MNIST
# on first use, a stream of Fashion-MNIST (in-distribution), MNIST (out-of-distribution)
# and corrupt images through the real daemon, /metrics served, a live summary, the
# flagged items and the dead letters. Then it evaluates the demo's model (AUROC, FPR95,
# AUPR, plots) on 2000 Fashion-MNIST test images against 2000 MNIST digits, and audits a
# folder of 1800 Fashion-MNIST test images with 200 MNIST digits mixed in (report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-libtorch.sh
bash scripts/fetch-assets.sh
cargo build --release --locked
BIN=target/release/dlsr
A=.deps/assets
"$BIN" doctor
echo; echo "== dlsr demo"
"$BIN" demo --bundle runs/demo/fmnist.safetensors "$@"
echo; echo "== dlsr eval: Fashion-MNIST test (ID) vs MNIST (OOD)"
"$BIN" -q eval --model runs/demo/fmnist.safetensors --id "$A/fashion-mnist/t10k-images-idx3-ubyte.gz" \
  --ood "mnist=$A/mnist/mnist_5k.csv.gz" --limit 2000 --out runs/demo/eval
echo; echo "== dlsr audit: 1800 Fashion-MNIST test images with 200 MNIST digits mixed in"
rm -rf runs/demo/mixed
python3 benches/peer/make_pngs.py runs/demo/mixed "$A/fashion-mnist/t10k-images-idx3-ubyte.gz" \
  "$A/mnist/mnist_5k.csv.gz" 2000 200
"$BIN" audit --model runs/demo/fmnist.safetensors runs/demo/mixed --out runs/demo/audit
echo; echo "eval report: runs/demo/eval/report.md, plots: runs/demo/eval/*.svg"
echo "audit report: runs/demo/audit/report.html (open it in a browser), bundle: runs/demo/fmnist.safetensors"
