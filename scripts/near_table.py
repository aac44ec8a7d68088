#!/usr/bin/env python3
"""Prints the near-OOD benchmark's table from `dlsr eval` runs (scripts/benchmark.sh
near): one row per OOD set of each run with AUROC and FPR95 of MSE and MFsim and the
share flagged at the bundle's calibrated threshold.

usage: near_table.py RUN_DIR [RUN_DIR...]   (each holding metrics.json)
"""
import json
import os
import sys


def main():
    print("| run | OOD set | n | AUROC mse | AUROC mfsim | FPR95 mse | FPR95 mfsim | flagged (ID test) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in sys.argv[1:]:
        m = json.load(open(os.path.join(run, "metrics.json")))
        t = m.get("threshold") or {}
        id_flagged = t.get("id_flagged")
        for s in m["sets"]:
            a, f = s["auroc"], s["fpr95"]
            flagged = s.get("flagged")
            share = "-" if flagged is None else f"{flagged * 100:.1f}%"
            if id_flagged is not None:
                share += f" ({id_flagged * 100:.1f}%)"
            print(f"| {os.path.basename(run)} | {s['name']} | {s['n']} | {a['mse']:.4f} | {a['mfsim']:.4f} | "
                  f"{f['mse'] * 100:.2f}% | {f['mfsim'] * 100:.2f}% | {share} |")


if __name__ == "__main__":
    main()
