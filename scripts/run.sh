#!/usr/bin/env bash
# The main job on the embedded default data, from a fresh clone: installs libtorch and
# the data sets (pinned, checksum-verified), builds dlsr, fits a DLSR model on
# Fashion-MNIST (in-distribution), evaluates it against MNIST (out-of-distribution),
# and scores a few images. Prints the table and where the report and plots are.
#   scripts/run.sh            10k training images (about 3 minutes on 2 cores)
#   TRAIN=60000 scripts/run.sh   the full training set (see scripts/benchmark.sh full)
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN="${TRAIN:-10000}"; EVAL="${EVAL:-2000}"; EPOCHS="${EPOCHS:-30}"
bash scripts/setup-libtorch.sh
bash scripts/fetch-assets.sh
cargo build --release --locked
BIN=target/release/dlsr
A=.deps/assets
OUT=runs/main; mkdir -p "$OUT"
"$BIN" doctor
echo; echo "== fit: Fashion-MNIST train, first $TRAIN images"
"$BIN" fit --data "$A/fashion-mnist/train-images-idx3-ubyte.gz" --limit "$TRAIN" --epochs "$EPOCHS" \
  --out "$OUT/fmnist.safetensors"
echo; echo "== eval: Fashion-MNIST test (ID) vs MNIST (OOD), $EVAL each"
"$BIN" eval --model "$OUT/fmnist.safetensors" --id "$A/fashion-mnist/t10k-images-idx3-ubyte.gz" \
  --ood "mnist=$A/mnist/mnist_5k.csv.gz" --limit "$EVAL" --out "$OUT/eval"
echo; echo "== score: two Fashion-MNIST, two MNIST images and an ImageNet photo"
"$BIN" -q score --model "$OUT/fmnist.safetensors" "$A/foolbox/fashionMNIST_00_9.png" "$A/foolbox/fashionMNIST_01_2.png" \
  "$A/foolbox/mnist_00_7.png" "$A/foolbox/mnist_01_2.png" "$A/foolbox/imagenet_00_243.jpg" \
  | python3 -c 'import json,sys
for l in sys.stdin:
    v = json.loads(l)
    print(f"{v[\"id\"]:>28}  {v[\"score_kind\"]} {v[\"score\"]:+.4f}  ID percentile {v[\"id_percentile\"]:6.2f}  {\"OOD\" if v[\"is_ood\"] else \"in-distribution\"}")'
echo; echo "report: $OUT/eval/report.md, plots: $OUT/eval/*.svg, bundle: $OUT/fmnist.safetensors"
