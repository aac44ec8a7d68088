#!/usr/bin/env python3
"""Writes Fashion-MNIST test images as PNG files: OUT/plain/ (items FROM..FROM+N) as they
are, and OUT/shifted/ (the next N items) with a brightness or contrast change, so that
`dlsr audit OUT/plain OUT/shifted --window 1000` shows a shift that few items' scores
cross the threshold for (README, "The window audit"). Needs numpy and Pillow
(scripts/setup-peer.sh installs both into .deps/peer-venv).

usage: make_shifted.py IDX_GZ OUT [--n 3000] [--from 0] [--brightness 40] [--contrast 1.0]
"""
import argparse
import gzip
import os

import numpy as np
from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("idx")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--from", dest="start", type=int, default=0)
    ap.add_argument("--brightness", type=float, default=40.0, help="added to every pixel (0..255)")
    ap.add_argument("--contrast", type=float, default=1.0, help="pixels scaled around 127.5")
    a = ap.parse_args()
    with gzip.open(a.idx, "rb") as f:
        raw = f.read()
    count, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows, cols)
    if a.start + 2 * a.n > count:
        raise SystemExit(f"{a.idx} has {count} images; --from {a.start} --n {a.n} needs {a.start + 2 * a.n}")
    for name, first, change in (("plain", a.start, False), ("shifted", a.start + a.n, True)):
        folder = os.path.join(a.out, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(a.n):
            x = images[first + i].astype(np.float64)
            if change:
                x = np.clip((x - 127.5) * a.contrast + 127.5 + a.brightness, 0, 255)
            Image.fromarray(x.round().astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.png"))
    print(f"wrote {a.n} plain and {a.n} shifted images (brightness {a.brightness:+g}, contrast x{a.contrast:g}) to {a.out}/")


if __name__ == "__main__":
    main()
