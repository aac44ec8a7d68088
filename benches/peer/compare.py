#!/usr/bin/env python3
"""dlsr against the PyTorch peer, side by side on one machine (scripts/benchmark.sh peer).

For 64 and 224 px: the encoder alone (random tensors in; dlsr through
`benches/throughput.rs encoder PX BATCH`, the peer through `peer.py encoder`) and end to
end on the same PNG files (dlsr: `dlsr score`; peer: `peer.py score`), each after its
model is loaded. The peer runs plain (batch 64) and tuned (batches 16 and 64, the best
kept); dlsr at batches 16 and 64. The configurations alternate for ROUNDS rounds and the
best rate of each is kept, so a noisy neighbour slows all of them alike. Prints a
Markdown table with the ratios and writes results.json."""
import argparse
import json
import os
import re
import subprocess


def run(cmd, pattern, stream="stderr"):
    p = subprocess.run(cmd, capture_output=True, text=True)
    text = getattr(p, stream)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    m = re.findall(pattern, text)
    if not m:
        raise SystemExit(f"{' '.join(cmd)}: no rate in output:\n{text[-2000:]}")
    return float(m[-1])


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--dlsr", required=True)
    a.add_argument("--peer-python", required=True)
    a.add_argument("--bench", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--rounds", type=int, default=2)
    a.add_argument("--threads", type=int, default=os.cpu_count())
    a = a.parse_args()
    peer = [a.peer_python, os.path.join(os.path.dirname(__file__), "peer.py")]
    peer_rate = r'"items_per_s": ([0-9.]+)'
    configs = {}
    for px in (64, 224):
        files = os.path.join(a.out, f"png{px}")
        model = os.path.join(a.out, f"m{px}.safetensors")
        t = ["--threads", str(a.threads)]
        configs[(px, "encoder", "dlsr", 16)] = ([a.bench, "encoder", str(px), "16"], peer_rate, "stdout")
        configs[(px, "encoder", "dlsr", 64)] = ([a.bench, "encoder", str(px), "64"], peer_rate, "stdout")
        configs[(px, "encoder", "plain", 64)] = (peer + ["encoder", "--size", str(px), "--batch-size", "64"] + t, peer_rate, "stderr")
        for b in (16, 64):
            configs[(px, "encoder", "tuned", b)] = (peer + ["encoder", "--tuned", "--size", str(px), "--batch-size", str(b)] + t, peer_rate, "stderr")
            configs[(px, "end to end", "dlsr", b)] = ([a.dlsr, "score", "--model", model, "--batch-size", str(b), files], r"\(([0-9.]+) items/s", "stderr")
            configs[(px, "end to end", "tuned", b)] = (peer + ["score", "--tuned", "--bundle", model, "--batch-size", str(b), "--out", os.devnull, files] + t, peer_rate, "stderr")
        configs[(px, "end to end", "plain", 64)] = (peer + ["score", "--bundle", model, "--batch-size", "64", "--out", os.devnull, files] + t, peer_rate, "stderr")
    best = {}
    for r in range(a.rounds):
        for key, (cmd, pattern, stream) in configs.items():
            rate = run(cmd, pattern, stream)
            best[key] = max(best.get(key, 0.0), rate)
            print(f"round {r + 1}: {key} {rate:.1f}/s", flush=True, file=__import__("sys").stderr)
    rows = []
    print(f"threads: {a.threads}, best of {a.rounds} rounds, images/s\n")
    print("| input px | stage | dlsr (batch) | peer plain, batch 64 | peer tuned (batch) | dlsr / plain | dlsr / tuned |")
    print("|---|---|---|---|---|---|---|")
    for px in (64, 224):
        for stage in ("encoder", "end to end"):
            pick = lambda who: max(((b, v) for (p, s, w, b), v in best.items() if (p, s, w) == (px, stage, who)), key=lambda x: x[1])
            (db, d), (_, pl), (tb, tu) = pick("dlsr"), pick("plain"), pick("tuned")
            rows.append({"px": px, "stage": stage, "dlsr": d, "dlsr_batch": db, "plain": pl, "tuned": tu, "tuned_batch": tb})
            print(f"| {px} | {stage} | {d:.0f} ({db}) | {pl:.0f} | {tu:.0f} ({tb}) | {d / pl:.2f} | {d / tu:.2f} |")
    detail = {" ".join(map(str, k)): v for k, v in best.items()}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"threads": a.threads, "rounds": a.rounds, "rows": rows, "all": detail}, f, indent=1)


if __name__ == "__main__":
    main()
