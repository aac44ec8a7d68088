#!/usr/bin/env python3
"""The capacity plan of docs/operations.md, computed from measured per-instance rates, so
that it is redone whenever the daemon benchmark is (scripts/benchmark.sh daemon writes
runs/bench-daemon[-SIZE]/daemon.json).

usage: capacity_plan.py [--stream 100000] [--headroom 2] [--outage-hours 1]
                        [--image-bytes 64=2000,224=150000] [--reference-bytes 120]
                        [--flagged 0.05] [--verdict-bytes 900]
                        [--gpu "224=6000:SOURCE"] LABEL=daemon.json ...

Each LABEL=FILE is one measured instance type (e.g. cpu-64=runs/bench-daemon/daemon.json);
--gpu adds figures not measured here, marked with where they come from. Prints Markdown.
"""
import argparse
import json
import math


def parse_map(text, cast=float):
    out = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=", 1)
        out[int(key)] = cast(value)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("measured", nargs="*", help="LABEL=daemon.json")
    ap.add_argument("--stream", type=float, default=100_000, help="images per second to audit")
    ap.add_argument("--headroom", type=float, default=2.0, help="capacity over the stream's rate")
    ap.add_argument("--outage-hours", type=float, default=1.0)
    ap.add_argument("--image-bytes", default="64=2000,224=150000",
                    help="bytes of one raw image value per input size (a JPEG at 224 px is ~150 kB)")
    ap.add_argument("--reference-bytes", type=int, default=120, help="bytes of a JSON reference event")
    ap.add_argument("--flagged", type=float, default=0.05, help="share of items published as verdicts")
    ap.add_argument("--verdict-bytes", type=int, default=900)
    ap.add_argument("--gpu", default="224=6000:the plain PyTorch peer on one H200 as issue #24 quotes it - not measured here",
                    help="PX=RATE:SOURCE[;...] figures not measured here")
    a = ap.parse_args()
    image_bytes = parse_map(a.image_bytes, int)
    rows = []
    for item in a.measured:
        label, path = item.split("=", 1)
        d = json.load(open(path))
        source = f"measured: `dlsr serve` through tansu, {d.get('cores', '?')} cores {d.get('cpu', '')}".strip()
        rows.append((label, d["input_px"], d["daemon_msgs_per_s"], source))
    for part in filter(None, a.gpu.split(";")):
        px_rate, source = part.split(":", 1)
        px, rate = px_rate.split("=")
        rows.append((f"gpu-{px}", int(px), float(rate), source))

    need = a.stream * a.headroom
    backlog = a.stream * a.outage_hours * 3600
    print(f"Stream: {a.stream:,.0f} images/s; capacity {a.headroom:g}x that; outage {a.outage_hours:g} h.\n")
    print("| instance type | input | per instance | instances | partitions (min) | ingress, raw values | ingress, references | verdicts out | catch-up after the outage | source |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, px, rate, source in rows:
        instances = math.ceil(need / rate)
        capacity = instances * rate
        # Each partition is read by one instance: fewer partitions than instances leaves
        # instances idle. Twice as many lets the group spread them evenly when it scales
        # and leaves KEDA room to add instances.
        partitions = 2 * instances
        raw = a.stream * image_bytes.get(px, 0)
        refs = a.stream * a.reference_bytes
        out = a.stream * a.flagged * a.verdict_bytes
        spare = capacity - a.stream
        catch_up = backlog / spare if spare > 0 else float("inf")
        print(f"| {label} | {px} px | {rate:,.0f}/s | {instances:,} | {partitions:,} | {raw / 1e6:,.0f} MB/s |"
              f" {refs / 1e6:,.1f} MB/s (+ {raw / 1e6:,.0f} MB/s from the store) | {out / 1e6:,.1f} MB/s |"
              f" {catch_up / 3600:.2f} h | {source} |")


if __name__ == "__main__":
    main()
