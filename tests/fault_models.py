"""Tiny user models (`model.entrypoint: fault_models:<name>`, --trust-code) that fail the way real
models and real Ray clusters do, for the CLI's fault tests. Each is a small transformer-ish
stack with its blocks at `layers`; `fault` says what its forward does:

- none: nothing (the clean run the others are compared with)
- raise: raises ValueError in the first block
- exit_once: the first process that runs forward dies (os._exit) and leaves `marker`, so a
  restarted actor (Ray's retry) runs it cleanly
- hang: sleeps `seconds` in forward (a rank that never finishes)
- sleep: sleeps `seconds` in forward, then runs (a slow rank, to act on the cluster meanwhile)
- item: reads a tensor's value (`.item()`), which fake tensors do not have
- nonzero: an op whose output shape depends on values
- custom_op: a custom op without a fake kernel

The forward runs only in the rank actors (the driver builds the model on meta, never calls it),
so a fault here is a fault of the simulation, not of the planning."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


@torch.library.custom_op("simdist_tests::opaque", mutates_args=())
def opaque(x: torch.Tensor) -> torch.Tensor:  # no register_fake: fake tensors cannot run it
    return x.clone()


class Block(nn.Module):
    def __init__(self, dim: int, fault: str, marker: str, seconds: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.fault, self.marker, self.seconds = fault, marker, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fault
        if f == "raise":
            raise ValueError("the user model rejects this input")
        if f == "exit_once" and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(3)
        if f in ("hang", "sleep"):
            time.sleep(self.seconds)
        if f == "item" and x.sum().item() > 0:
            x = x * 2
        if f == "nonzero":
            x = x[x.nonzero()[:, 0]]
        if f == "custom_op":
            x = opaque(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Tiny(nn.Module):
    def __init__(self, vocab_size: int, dim: int, n_layers: int, fault: str, marker: str,
                 seconds: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim, fault if i == 0 else "none", marker,
                                                   seconds) for i in range(n_layers)})
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.layers.values():
            h = block(h)
        return self.head(h)


def tiny(fault: str = "none", marker: str = "", seconds: float = 0.0, vocab_size: int = 512,
         dim: int = 64, n_layers: int = 2) -> Tiny:
    return Tiny(vocab_size, dim, n_layers, fault, marker, seconds)
