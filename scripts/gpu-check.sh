#!/usr/bin/env bash
# The GPU check of issue #10, for a short window on a CUDA machine.
#
#   bash scripts/gpu-check.sh prepare   here (no GPU needed): builds dlsr, strips it and
#                                       gathers weights, data and PNG files into runs/gpu
#                                       (about 40 MB; carry it: the limit is 64 MiB)
#   bash scripts/gpu-check.sh run       there, in the repository root with runs/gpu: needs
#                                       a python3 with a CUDA torch 2.11 (its lib dir is put
#                                       on LD_LIBRARY_PATH, where dlsr finds libtorch_cuda)
#
# `run` takes about 3-5 minutes: it fits 64- and 224-px bundles on the device, then
# `dlsr doctor` with the ImageNet check on CUDA in f32 and
# f16, the bare encoder's rate, `dlsr score` at 64 and 224 px in f32 and f16 (batch 256;
# the f16 scores are compared with f32), the PyTorch peer on the same card and files
# (plain and tuned), and `dlsr demo` (the daemon on the in-process mock cluster) on CUDA.
# It writes $OUT/gpu-check.json (OUT defaults to runs/gpu/out) and prints a table.
# PYTHON names the python with torch (python3). DEVICE=cpu runs the same steps on the CPU (to try the script without a GPU); N64 and
# N224 (prepare) set how many PNG files are scored (4096 and 1024).
set -euo pipefail
cd "$(dirname "$0")/.."
G=runs/gpu

prepare() {
  bash scripts/setup-libtorch.sh >/dev/null
  bash scripts/fetch-assets.sh >/dev/null
  cargo build --release --locked -q
  local A="${DLSR_ASSETS:-.deps/assets}"
  rm -rf "$G"; mkdir -p "$G/assets/weights" "$G/assets/fashion-mnist" "$G/assets/mnist"
  strip -o "$G/dlsr" target/release/dlsr
  cp "$A/weights/efficientnet-lite0.safetensors" "$G/assets/weights/"
  cp -r "$A/foolbox" "$G/assets/"
  cp "$A/fashion-mnist/t10k-images-idx3-ubyte.gz" "$G/assets/fashion-mnist/"
  cp "$A/mnist/mnist_5k.csv.gz" "$G/assets/mnist/"
  python3 benches/peer/make_pngs.py "$G/png64" "$A/fashion-mnist/t10k-images-idx3-ubyte.gz" "$A/mnist/mnist_5k.csv.gz" "${N64:-4096}"
  python3 benches/peer/make_pngs.py "$G/png224" "$A/fashion-mnist/t10k-images-idx3-ubyte.gz" "$A/mnist/mnist_5k.csv.gz" "${N224:-1024}"
  du -sh "$G"
}

run() {
  local DEVICE="${DEVICE:-cuda}" OUTDIR="${OUT:-$G/out}" BIN="$G/dlsr" PY="${PYTHON:-python3}"
  mkdir -p "$OUTDIR"
  local TORCH_LIB
  TORCH_LIB="$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
  export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export DLSR_ASSETS="$G/assets" DLSR_CACHE="$OUTDIR/cache"
  local W="$G/assets/weights/efficientnet-lite0.safetensors" B=256
  [ "$DEVICE" = cpu ] && B=64
  local log="$OUTDIR/gpu-check.log"; : > "$log"
  # Bundles are fitted here, not carried (33 MB each): 1500 Fashion-MNIST test images,
  # 3 epochs; what is measured is speed and f16 drift, not detection quality. They go
  # to a scratch folder, so neither runs/gpu nor $OUT grows by them.
  local M; M="$(mktemp -d)"
  for px in 64 224; do
    "$BIN" -q fit --device "$DEVICE" --data "$G/assets/fashion-mnist/t10k-images-idx3-ubyte.gz" --limit 1500 \
      --input-size "$px" --epochs 3 --out "$M/m$px.safetensors" >> "$log" 2>&1 || echo "FAILED: fit $px" >> "$log"
  done
  # A failing step is logged and the rest still run: one window, as much as it can tell.
  step() { echo "+ $*" | tee -a "$log" >&2; "$@" 2>&1 | tee -a "$log" || echo "FAILED: $*" | tee -a "$log"; }
  step "$BIN" doctor --device "$DEVICE" --imagenet --encoder-rate 64 --batch-size "$B"
  step "$BIN" doctor --device "$DEVICE" --imagenet --encoder-rate 224 --batch-size "$B" --precision f16
  step "$BIN" doctor --device "$DEVICE" --encoder-rate 224 --batch-size "$B"
  step "$BIN" doctor --device "$DEVICE" --encoder-rate 64 --batch-size "$B" --precision f16
  for px in 64 224; do
    for prec in f32 f16; do
      echo "+ dlsr score $px px $prec" | tee -a "$log" >&2
      "$BIN" score --device "$DEVICE" --precision "$prec" --batch-size "$B" --model "$M/m$px.safetensors" \
        "$G/png$px" > "$OUTDIR/score-$px-$prec.jsonl" 2>> "$log" || echo "FAILED: dlsr score $px $prec" >> "$log"
      tail -1 "$log"
    done
    for mode in "" --tuned; do
      step "$PY" benches/peer/peer.py score --device "$DEVICE" $mode --weights "$W" --batch-size "$B" \
        --bundle "$M/m$px.safetensors" --out "$OUTDIR/peer-$px${mode}.jsonl" "$G/png$px"
      step "$PY" benches/peer/peer.py encoder --device "$DEVICE" $mode --weights "$W" --batch-size "$B" --size "$px"
    done
  done
  step timeout 240 "$BIN" demo --device "$DEVICE" --bundle "$M/m64.safetensors" --id-images 3000 --ood-images 1000 \
    --metrics-listen 127.0.0.1:0 --timeout 200
  "$PY" - "$OUTDIR" "$DEVICE" <<'PY'
import json, re, sys
out, device = sys.argv[1], sys.argv[2]
log = open(f"{out}/gpu-check.log").read()
res = {"device": device}
res["failed"] = re.findall(r"^FAILED: (.*)", log, re.M)
res["imagenet"] = re.findall(r"imagenet check: (\d+/\d+) top-1 on (.*)", log)
res["encoder_rate"] = [{"images_per_s": float(r), "px": int(p), "batch": int(b), "precision": q}
                       for r, p, b, q in re.findall(r"encoder rate: ([0-9.]+) images/s \(Lite0, (\d+) px, batch (\d+), (\w+)", log)]
res["dlsr_score"] = [{"px": int(px), "precision": q, "images_per_s": float(r)} for px, q, r in
                     re.findall(r"\+ dlsr score (\d+) px (\w+)\nscore: \d+ items scored, \d+ failed, in [0-9.]+ s \(([0-9.]+) items/s", log)]
res["peer"] = [json.loads(l) for l in re.findall(r'^\{"peer".*\}$', log, re.M)]
def load(path):
    return {j["id"]: j for j in map(json.loads, open(path))}
drift = {}
for px in (64, 224):
    try:
        a, b = load(f"{out}/score-{px}-f32.jsonl"), load(f"{out}/score-{px}-f16.jsonl")
        diffs = [abs(a[k]["score"] - b[k]["score"]) for k in a if k in b]
        flips = sum(a[k]["is_ood"] != b[k]["is_ood"] for k in a if k in b)
        drift[px] = {"max_abs_score_diff": max(diffs), "verdict_flips": flips, "items": len(diffs)}
    except (OSError, KeyError, ValueError) as e:
        drift[px] = {"error": str(e)}
res["f16_vs_f32"] = drift
section = log.split(" demo ")[-1]
progress = re.findall(r"^\[ *[0-9.]+s\] verdicts.*", section, re.M)
res["demo"] = progress[-1:] + re.findall(r"^(?:flagged:|daemon:).*", section, re.M)
json.dump(res, open(f"{out}/gpu-check.json", "w"), indent=1)
print(f"\n| measure | value |\n|---|---|")
for name, who in res["imagenet"]:
    print(f"| ImageNet check | {name} on {who} |")
for e in res["encoder_rate"]:
    print(f"| dlsr bare encoder {e['px']} px {e['precision']} batch {e['batch']} | {e['images_per_s']:.0f} images/s |")
for e in res["dlsr_score"]:
    print(f"| dlsr score end to end {e['px']} px {e['precision']} | {e['images_per_s']:.0f} images/s |")
for p in res["peer"]:
    print(f"| peer {p['peer']} | {p['items_per_s']:.0f} images/s |")
for px, d in drift.items():
    print(f"| f16 against f32 at {px} px | {d} |")
for f in res["failed"]:
    print(f"| FAILED | {f} |")
for line in res["demo"]:
    print(f"| demo | {line.strip()} |")
PY
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
