#!/usr/bin/env bash
# How far serving a bundle in another encoder precision than it was calibrated in moves
# its false-positive rate: fit (f32) on Fashion-MNIST, then evaluate the Fashion-MNIST
# test set at the calibrated threshold in f32 and in bf16 (CPU) or f16/bf16 (CUDA).
#   scripts/precision-shift.sh [BUNDLE]   (default: fits runs/precision/m.safetensors)
# env: DEVICE (cpu), N (test images, 2000). Prints one line per precision.
set -euo pipefail
cd "$(dirname "$0")/.."
A="${DLSR_ASSETS:-.deps/assets}"
BIN="${DLSR_BIN:-target/release/dlsr}"
OUT=runs/precision; mkdir -p "$OUT"
DEVICE="${DEVICE:-cpu}"
MODEL="${1:-$OUT/m.safetensors}"
if [ ! -f "$MODEL" ]; then
  "$BIN" -q fit --data "$A/fashion-mnist/train-images-idx3-ubyte.gz" --limit 6000 --epochs 60 \
    --device "$DEVICE" --out "$MODEL" >/dev/null
fi
precisions="f32 bf16"; [ "$DEVICE" != cpu ] && precisions="f32 f16 bf16"
echo "| precision | ID test flagged at the calibrated threshold | AUROC mfsim vs MNIST |"
echo "|---|---|---|"
for p in $precisions; do
  "$BIN" -q eval --model "$MODEL" --device "$DEVICE" --precision "$p" \
    --id "$A/fashion-mnist/t10k-images-idx3-ubyte.gz" --ood "mnist=$A/mnist/mnist_5k.csv.gz" \
    --limit "${N:-2000}" --out "$OUT/eval-$p" 2>/dev/null >/dev/null
  python3 - "$OUT/eval-$p/metrics.json" "$p" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
t = m["threshold"]
print(f"| {sys.argv[2]} | {t['id_flagged'] * 100:.2f}% (calibrated for {t['target_fpr'] * 100:.1f}%) | {m['sets'][0]['auroc']['mfsim']:.4f} |")
PY
done
