"""The table of `scripts/benchmark.sh pairs`: per run and OOD set, the final training
loss, AUROC of MSE and of MFsim over layer sets, FPR95, and each layer alone; then the
mean AUROC per run kind over the pairs that are not trivially separable (every score at
AUROC 1.0 says nothing about which is better).

usage: python3 scripts/pairs_table.py RUNS_DIR
"""
import glob
import json
import os
import struct
import sys
from collections import defaultdict

out = sys.argv[1]


def bundle_meta(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return json.loads(header["__metadata__"]["dlsr_bundle"])


SETS = [(0, 1, 2, 3, 4), (1, 2, 3, 4), (2, 3, 4), (3, 4)]
print("| run | OOD | final loss | AUROC MSE | MFsim 0-4 | MFsim 1-4 | MFsim 2-4 | MFsim 3-4 "
      "| FPR95 MSE | FPR95 MFsim 0-4 | FPR95 MFsim 2-4 | each layer alone (1 - cos), 0..4 |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
means = defaultdict(lambda: defaultdict(list))
for metrics in sorted(glob.glob(os.path.join(out, "*", "metrics.json"))):
    run = os.path.basename(os.path.dirname(metrics))
    bundle = os.path.join(out, run + ".safetensors")
    if not os.path.exists(bundle):
        continue
    loss = bundle_meta(bundle)["training"]["summary"]["epoch_loss"][-1]
    m = json.load(open(metrics))
    for s in m["sets"]:
        by = {tuple(x["layers"]): x for x in s["mfsim_layer_sets"]}
        aurocs = [s["auroc"]["mse"]] + [by[k]["auroc"] for k in SETS]
        layers = " ".join(f"{x['auroc_cos']:.3f}" for x in s["per_layer"])
        print(f"| {run} | {s['name']} | {loss:.4f} | " + " | ".join(f"{a:.4f}" for a in aurocs)
              + f" | {s['fpr95']['mse'] * 100:.2f}% | {by[SETS[0]]['fpr95'] * 100:.2f}% "
              f"| {by[SETS[2]]['fpr95'] * 100:.2f}% | {layers} |")
        if min(aurocs) < 0.9999 and s["name"] != "photos":
            kind = run.split("-", 1)[1]
            for name, a in zip(["MSE", "MFsim 0-4", "MFsim 1-4", "MFsim 2-4", "MFsim 3-4"], aurocs):
                means[kind][name].append(a)
print()
print("Mean AUROC over the pairs that are not trivially separable:")
print()
print("| runs | pairs | MSE | MFsim 0-4 | MFsim 1-4 | MFsim 2-4 | MFsim 3-4 |")
print("|---|---|---|---|---|---|---|")
for kind, by_score in sorted(means.items()):
    n = len(by_score["MSE"])
    print(f"| {kind} | {n} | " + " | ".join(f"{sum(v) / len(v):.4f}" for v in by_score.values()) + " |")
