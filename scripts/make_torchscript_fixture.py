#!/usr/bin/env python3
"""Make the tiny TorchScript encoders used by tests/dlsr/encoders.rs.

Needs python torch 2.11 (`pip install torch==2.11.0` in a venv). The outputs are
committed (a few KB), so tests never need python:
  tests/fixtures/tiny_encoder.pt          returns a list of two feature maps (4 and 8 ch)
  tests/fixtures/single_tensor_encoder.pt returns one tensor: breaks the contract
"""
import pathlib
from typing import List

import torch

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"


class TinyEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        f1 = torch.relu(self.a(x))
        f2 = torch.relu(self.b(f1))
        return [f1, f2]


class SingleTensor(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


if __name__ == "__main__":
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.jit.script(TinyEncoder().eval()).save(str(OUT / "tiny_encoder.pt"))
    torch.jit.script(SingleTensor().eval()).save(str(OUT / "single_tensor_encoder.pt"))
    print("wrote", OUT / "tiny_encoder.pt", OUT / "single_tensor_encoder.pt")
