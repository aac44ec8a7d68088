#!/usr/bin/env python3
"""Export an ImageNet CNN as a TorchScript encoder for dlsr (`--encoder PATH.pt`).

The contract: the module takes a float batch [B, 3, S, S] (already normalised) and
returns a list of feature maps [B, C_l, H_l, W_l]. dlsr pools, z-scores and
concatenates them (METHOD.md section 2). Pass the normalisation the weights expect to
dlsr with `--norm imagenet` (the default for TorchScript encoders).

  # ResNet-50 taps layer1..layer3 (256 + 512 + 1024 values), torchvision weights file:
  python3 scripts/export_torchscript.py resnet50 --weights resnet50-0676ba61.pth --out resnet50.pt
  # The paper's EfficientNet-B4 (lukemelas `efficientnet_pytorch` weights), five taps with
  # 24, 32, 56, 160 and 448 channels (720 values):
  python3 scripts/export_torchscript.py efficientnet-b4 --weights efficientnet-b4-6ed6700e.pth --out b4.pt

Needs torch 2.11 plus torchvision (resnet50) or efficientnet_pytorch (efficientnet-b4).
`--random-weights` skips the weights file (for testing the export only).
"""
import argparse
from typing import List

import torch


class ResNetTaps(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.stem = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(x)
        a = self.layer1(x)
        b = self.layer2(a)
        c = self.layer3(b)
        return [a, b, c]


class EfficientNetTaps(torch.nn.Module):
    """Stage outputs of a lukemelas EfficientNet: the last block of each tapped stage."""

    def __init__(self, net, taps):
        super().__init__()
        self.net = net
        self.taps = taps

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        out = []
        n = len(net._blocks)
        for i, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate * float(i) / n
            x = block(x, drop_connect_rate=rate)
            if i in self.taps:
                out.append(x)
        return out


def build(name, weights):
    if name == "resnet50":
        import torchvision
        net = torchvision.models.resnet50()
        if weights:
            net.load_state_dict(torch.load(weights, map_location="cpu"))
        return ResNetTaps(net)
    if name == "efficientnet-b4":
        from efficientnet_pytorch import EfficientNet
        net = EfficientNet.from_name("efficientnet-b4")
        if weights:
            net.load_state_dict(torch.load(weights, map_location="cpu"))
        net.set_swish(memory_efficient=False)  # scriptable
        # Last block of each stage whose output has 24, 32, 56, 160 and 448 channels.
        ends, prev = [], None
        for i, b in enumerate(net._blocks):
            c = b._block_args.output_filters
            if prev is not None and c != prev:
                ends.append(i - 1)
            prev = c
        ends.append(len(net._blocks) - 1)
        wanted = {24, 32, 56, 160, 448}
        taps = [i for i in ends if net._blocks[i]._block_args.output_filters in wanted]
        return EfficientNetTaps(net, taps)
    raise SystemExit(f"unknown model {name}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["resnet50", "efficientnet-b4"])
    p.add_argument("--weights", help="state-dict file of the model")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=224, help="input size used for the check run")
    a = p.parse_args()
    if not a.weights and not a.random_weights:
        raise SystemExit("give --weights FILE (or --random-weights to test the export)")
    module = build(a.model, a.weights).eval()
    with torch.no_grad():
        try:
            scripted = torch.jit.script(module)
        except Exception:  # some third-party blocks only trace
            scripted = torch.jit.trace(module, torch.zeros(1, 3, a.size, a.size))
        maps = scripted(torch.zeros(2, 3, a.size, a.size))
    scripted.save(a.out)
    print(f"wrote {a.out}: {len(maps)} feature maps, channels {[m.shape[1] for m in maps]}")


if __name__ == "__main__":
    main()
