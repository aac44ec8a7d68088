#!/usr/bin/env bash
# Reproduces the benchmark tables of the README: fit on Fashion-MNIST, evaluate
# Fashion-MNIST test (ID) against MNIST-5k (OOD), end to end (encoding included).
#   scripts/benchmark.sh full    60k train, 10k test vs 5k MNIST (the standard table), and
#                                the scoring candidates on it (eval --compare --no-cache)
#   scripts/benchmark.sh sizes   6k train, 2k test vs 2k MNIST at 32, 64 and 224 px
#   scripts/benchmark.sh ci      3k train, 1k test vs 1k MNIST (minutes; what CI runs)
#   scripts/benchmark.sh pairs   the evidence behind the defaults: four ID/OOD pairs
#                                (scripts/make_pairs.py), per-layer AUROC and MFsim over
#                                layer sets; env: LRS ("1e-3 1e-4"), PRESETS ("small"),
#                                EPOCHS (60 small, 20 paper); 6k/4k train, 2k vs 2k
#   scripts/benchmark.sh score   `dlsr score` throughput, batch 64, with/without encoder
#   scripts/benchmark.sh peer    dlsr against the PyTorch peer (benches/peer/peer.py, its
#                                plain and tuned eager configurations) on the same PNG
#                                files, same threads, at 64 and 224 px: encoder alone and
#                                end to end, best of ROUNDS (2) alternating runs; env:
#                                N64 (files at 64 px, 4000), N224 (files at 224 px, 400)
#   scripts/benchmark.sh references  the daemon on S3 references (moto's server behind a
#                                20 ms-per-request proxy) vs raw values, same PNGs; env: N
#                                (4000), LATENCY_MS (20), ROUNDS (2)
#   scripts/benchmark.sh daemon  messages/s through a real broker (tansu) vs offline
#                                `dlsr score`, latency at half that rate, memory over time;
#                                env: SIZE (input px, 64), N (messages per batch, 10000),
#                                MEM_CHUNKS (more batches for the memory curve, 9),
#                                FIT_LIMIT (training images, 5000)
#   scripts/benchmark.sh windows the window auditor's cost with 100 groups and the online
#                                detector's delay per shift size (benches/window_audit.rs)
#   scripts/benchmark.sh memory  peak resident memory with large images (6000x6000 PNGs,
#                                12 MP JPEGs) through the daemon and `dlsr score`
#                                (scripts/memory_check.py; needs scripts/setup-peer.sh)
#   scripts/benchmark.sh near    near-OOD: held-out Fashion-MNIST classes (footwear from
#                                the other seven; shirt from the other nine) and the ID
#                                classes' test images rotated, cropped, blurred, with
#                                less contrast or brighter, each kind and strength a row,
#                                MNIST as the far row, and the validation split (unused
#                                train records vs the same upside down), each with the
#                                scoring candidates (eval --compare); env: NEAR_TRAIN
#                                (12000), NEAR_EVAL (2000), EPOCHS (30)
# Extra arguments go to `dlsr fit` (e.g. --epochs 20 --device cuda --preset paper).
# Results land in runs/bench-<mode>/; each run prints a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-full}"; shift || true
bash scripts/setup-libtorch.sh >/dev/null
bash scripts/fetch-assets.sh >/dev/null
cargo build --release --locked -q
BIN=target/release/dlsr
A="${DLSR_ASSETS:-.deps/assets}"
DEPS_DIR="${DLSR_DEPS:-.deps}"
TRAIN="$A/fashion-mnist/train-images-idx3-ubyte.gz"
TEST="$A/fashion-mnist/t10k-images-idx3-ubyte.gz"
MNIST="$A/mnist/mnist_5k.csv.gz"
OUT="runs/bench-$MODE${SIZE:+-$SIZE}"; mkdir -p "$OUT"
# A private cache so that encoding time is measured, not skipped.
export DLSR_CACHE="$OUT/cache"; rm -rf "$DLSR_CACHE"

run() { # name size train_limit eval_limit epochs [fit args...]
  local name="$1" size="$2" tl="$3" el="$4" epochs="$5"; shift 5
  local tlim=() elim=()
  [ "$tl" != all ] && tlim=(--limit "$tl")
  [ "$el" != all ] && elim=(--limit "$el")
  local t0=$SECONDS
  "$BIN" -q fit --data "$TRAIN" "${tlim[@]}" --input-size "$size" --epochs "$epochs" \
    --out "$OUT/$name.safetensors" "$@" | tee "$OUT/$name.fit.txt"
  local t1=$SECONDS
  "$BIN" -q eval --model "$OUT/$name.safetensors" --id "$TEST" --ood "mnist=$MNIST" "${elim[@]}" \
    --out "$OUT/$name" | tee "$OUT/$name.eval.txt"
  local t2=$SECONDS
  python3 - "$OUT/$name/metrics.json" "$name" "$size" "$((t1 - t0))" "$((t2 - t1))" >> "$OUT/summary.md" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])); s = m["sets"][0]
f = lambda d, k: f"{d[k]:.4f}" if k in d else "-"
p = lambda d, k: f"{d[k] * 100:.2f}%" if k in d else "-"
every = max(s["mfsim_layer_sets"], key=lambda x: len(x["layers"]))
print(f"| {sys.argv[2]} | {sys.argv[3]} | {m['id']['n']} / {s['n']} | "
      + " | ".join(f(s['auroc'], k) for k in ('mse', 'mfsim')) + f" | {every['auroc']:.4f} | {f(s['auroc'], 'lr')} | "
      + " | ".join(p(s['fpr95'], k) for k in ('mse', 'mfsim')) + f" | {every['fpr95'] * 100:.2f}% | {p(s['fpr95'], 'lr')}"
      + f" | {sys.argv[4]} | {sys.argv[5]} |")
PY
}

echo "| run | input px | ID / OOD n | AUROC mse | AUROC mfsim | AUROC mfsim all layers | AUROC lr | FPR95 mse | FPR95 mfsim | FPR95 mfsim all layers | FPR95 lr | fit s | eval s |" > "$OUT/summary.md"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|" >> "$OUT/summary.md"
case "$MODE" in
  full)  run full 64 all all "${EPOCHS:-40}" "$@"
         # The scoring candidates on the same sets, every row encoding again (--no-cache),
         # so that the cost column includes the encoder.
         "$BIN" -q eval --model "$OUT/full.safetensors" --id "$TEST" --ood "mnist=$MNIST" --no-cache --compare \
           --out "$OUT/compare" > "$OUT/compare.txt"
         tee -a "$OUT/summary.md" < "$OUT/compare/compare.md" ;;
  ci)    run ci 64 3000 1000 30 "$@" ;;
  sizes) for s in 32 64 224; do run "px$s" "$s" 6000 2000 60 "$@"; done ;;
  pairs)
    P="$OUT/data"; python3 scripts/make_pairs.py "$A" "$P"
    pair() { # name train limit id ood...
      local name="$1" train="$2" limit="$3" id="$4"; shift 4
      local oods=(); for o in "$@"; do oods+=(--ood "$o"); done
      [ -f "$OUT/$name/metrics.json" ] && return
      "$BIN" -q fit --data "$train" --limit "$limit" --epochs "$epochs" --lr "$lr" --preset "$preset" \
        --no-first-epoch --out "$OUT/$name.safetensors" > "$OUT/$name.fit.txt"
      "$BIN" -q eval --model "$OUT/$name.safetensors" --id "$id" "${oods[@]}" --limit 2000 \
        --out "$OUT/$name" > "$OUT/$name.eval.txt"
    }
    for preset in ${PRESETS:-small}; do
      epochs="${EPOCHS:-$([ "$preset" = paper ] && echo 20 || echo 60)}"
      for lr in ${LRS:-1e-3 1e-4}; do
        pair "fm-$preset-$lr" "$TRAIN" 6000 "$TEST" "mnist=$MNIST" "photos=$P/photos"
        [ "$preset" = paper ] && continue  # the paper preset costs ~10x: one pair
        pair "fm07-$preset-$lr" "$P/fm07-train.idx.gz" 6000 "$P/fm07-test.idx.gz" "fm89=$P/fm89.idx.gz"
        pair "mn07-$preset-$lr" "$P/mn07-train.idx.gz" 4000 "$P/mn07-test.idx.gz" "mn89=$P/mn89.idx.gz"
        pair "mn-$preset-$lr" "$P/mnist-train.idx.gz" 4000 "$P/mnist-test.idx.gz" "fmnist=$TEST" "photos=$P/photos"
      done
    done
    python3 scripts/pairs_table.py "$OUT" > "$OUT/summary.md" ;;
  score)
    "$BIN" -q fit --data "$TRAIN" --limit 3000 --input-size 64 --epochs 5 --out "$OUT/m.safetensors" >/dev/null
    python3 - "$BIN" "$OUT/m.safetensors" "$TEST" <<'PY'
import subprocess, sys, time
bin_, model, test = sys.argv[1:]
t = time.time()
out = subprocess.run([bin_, "-q", "score", "--model", model, test, "--limit", "4096", "--batch-size", "64"],
                     check=True, capture_output=True, text=True).stdout
n = out.count("\n"); dt = time.time() - t
print(f"| dlsr score end to end (decode + encoder + LFDN), batch 64 | {n / dt:.0f} images/s |")
PY
    "$BIN" features --data "$TEST" --limit 4096 --input-size 64 --batch-size 64 -q | grep time ;;
  peer)
    bash scripts/setup-peer.sh >/dev/null
    rm -rf "$OUT/png64" "$OUT/png224"
    python3 benches/peer/make_pngs.py "$OUT/png64" "$TEST" "$MNIST" "${N64:-4000}"
    python3 benches/peer/make_pngs.py "$OUT/png224" "$TEST" "$MNIST" "${N224:-400}"
    for px in 64 224; do
      "$BIN" -q fit --data "$TRAIN" --limit 1500 --input-size "$px" --epochs 3 --out "$OUT/m$px.safetensors" >/dev/null
    done
    cargo bench --locked --bench throughput --no-run -q 2>/dev/null
    python3 benches/peer/compare.py --dlsr "$BIN" --peer-python "$DEPS_DIR/peer-venv/bin/python" \
      --bench "$(ls -t target/release/deps/throughput-* | grep -v '\.d$' | head -1)" \
      --out "$OUT" --rounds "${ROUNDS:-2}" | tee "$OUT/summary.md" ;;
  daemon)
    N="${N:-10000}"
    "$BIN" -q fit --data "$TRAIN" --limit "${FIT_LIMIT:-5000}" --input-size "${SIZE:-64}" --epochs 10 --out "$OUT/m.safetensors" >/dev/null
    { echo "| measure | value |"; echo "|---|---|"; } > "$OUT/summary.md"
    SIZE="${SIZE:-64}" JSON_OUT="$OUT/daemon.json" python3 scripts/bench_daemon.py "$BIN" "$OUT/m.safetensors" "$TEST" "$N" | tee -a "$OUT/summary.md"
    echo "figures for scripts/capacity_plan.py: $OUT/daemon.json" ;;
  references)
    N="${N:-4000}"
    bash scripts/setup-moto.sh >/dev/null
    rm -rf "$OUT/png"
    python3 benches/peer/make_pngs.py "$OUT/png" "$TEST" "$MNIST" "$N" "0"
    "$BIN" -q fit --data "$TRAIN" --limit "${FIT_LIMIT:-3000}" --input-size "${SIZE:-64}" --epochs 5 --out "$OUT/m.safetensors" >/dev/null
    { echo "| measure | value |"; echo "|---|---|"; } > "$OUT/summary.md"
    "$DEPS_DIR/moto-venv/bin/python" scripts/bench_references.py "$BIN" "$OUT/m.safetensors" "$OUT/png" "$N" | tee -a "$OUT/summary.md" ;;
  windows)
    cargo bench --locked -q --bench window_audit | tee "$OUT/summary.md" ;;
  memory)
    "$BIN" -q fit --data "$TRAIN" --limit "${FIT_LIMIT:-2000}" --epochs 2 --out "$OUT/m.safetensors" "$@" >/dev/null
    "$DEPS_DIR/peer-venv/bin/python" scripts/memory_check.py "$BIN" "$PWD/$OUT/m.safetensors" "$OUT/sets" | tee "$OUT/summary.md" ;;
  near)
    # Near-OOD (README, "Near-OOD"): fit on some Fashion-MNIST classes, the held-out
    # classes are OOD; and the ID classes' test images transformed, one row per kind and
    # strength. Splits: footwear (5 sandal, 7 sneaker, 9 ankle boot) held out from the
    # other seven, and shirt (6) held out from the rest (it looks like T-shirt 0,
    # pullover 2 and coat 4). Every set is read with SPEC options (?classes=, ?rotate=...).
    NEAR_TRAIN="${NEAR_TRAIN:-12000}"; NEAR_EVAL="${NEAR_EVAL:-2000}"; EPOCHS="${EPOCHS:-30}"
    near() { # name id_classes ood_classes
      local name="$1" id="$2" ood="$3"; shift 3
      "$BIN" -q fit --data "$TRAIN?classes=$id" --limit "$NEAR_TRAIN" --input-size 64 --epochs "$EPOCHS" \
        --out "$OUT/$name.safetensors" "$@" > "$OUT/$name.fit.txt"
      local rows=(--ood "held-out=$TEST?classes=$ood")
      if [ "$name" = footwear ]; then
        for t in rotate=15 rotate=45 rotate=90 crop=0.8 crop=0.6 blur=0.5 blur=1 blur=2 contrast=0.5 \
                 contrast=0.25 brightness=40 brightness=80; do
          rows+=(--ood "${t/=/}=$TEST?classes=$id&$t")
        done
        rows+=(--ood "mnist=$MNIST")
      fi
      "$BIN" -q eval --model "$OUT/$name.safetensors" --id "$TEST?classes=$id" "${rows[@]}" \
        --limit "$NEAR_EVAL" --out "$OUT/$name" --compare > "$OUT/$name.eval.txt"
      # The validation split: train records the fit did not use, against the same records
      # upside down (a transform that is in no test row).
      "$BIN" -q eval --model "$OUT/$name.safetensors" --id "$TRAIN?classes=$id&from=40000" \
        --ood "vflip=$TRAIN?classes=$id&from=40000&flip=v" --limit "$NEAR_EVAL" --out "$OUT/$name-validation" \
        --compare > "$OUT/$name-validation.eval.txt"
    }
    near footwear 0,1,2,3,4,6,8 5,7,9 "$@"
    near shirt 0,1,2,3,4,5,7,8,9 6 "$@"
    python3 scripts/near_table.py "$OUT/footwear" "$OUT/shirt" "$OUT/footwear-validation" "$OUT/shirt-validation" \
      | tee "$OUT/summary.md"
    # The scoring candidates (eval --compare) on every run, validation first.
    cat "$OUT"/*-validation/compare.md "$OUT/footwear/compare.md" "$OUT/shirt/compare.md" | tee -a "$OUT/summary.md" ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac
echo; echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cat "$OUT/summary.md"
