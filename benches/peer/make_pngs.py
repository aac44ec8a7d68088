#!/usr/bin/env python3
"""Writes the benchmark's shared image set: the first N/2 Fashion-MNIST test images and
N/2 MNIST-5k digits as 28x28 greyscale PNG files (plain Python, no third-party module).
With N_MNIST, N - N_MNIST Fashion-MNIST images and N_MNIST digits (the audit's example).
Usage: make_pngs.py OUT_DIR FASHION_IDX_GZ MNIST_CSV_GZ N [N_MNIST]"""
import gzip
import os
import struct
import sys
import zlib


def png(path, pixels, width, height):
    """A greyscale 8-bit PNG, filter 0 on every row."""
    raw = b"".join(b"\x00" + pixels[r * width : (r + 1) * width] for r in range(height))
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(data)


def main():
    out, fashion, mnist, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    os.makedirs(out, exist_ok=True)
    half = n - int(sys.argv[5]) if len(sys.argv) > 5 else n // 2
    with gzip.open(fashion, "rb") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        assert magic == 2051 and count >= half, "not an IDX image file, or too few images"
        for i in range(half):
            png(os.path.join(out, f"fashion-{i:05}.png"), f.read(rows * cols), cols, rows)
    with gzip.open(mnist, "rt") as f:
        for i, line in zip(range(n - half), f):
            values = bytes(int(v) for v in line.strip().split(",")[:784])
            png(os.path.join(out, f"mnist-{i:05}.png"), values, 28, 28)


if __name__ == "__main__":
    main()
