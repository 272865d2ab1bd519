"""Generation in bfloat16 on a CPU whose matmuls run faster in it, while training keeps the float32 weights.

The base model stays loaded in float32 (LoRA training on CPU stays in float32); for a generation call each base
weight's `.data` is pointed at a bfloat16 copy made once, and pointed back at the very same float32 tensor
after, so nothing is ever rounded twice and the training weights are untouched bit for bit. The copies cost
half the model's float32 size in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from backends.local_lora import Master


class GenerationWeights:
    """The weights generation runs on: the model's own, or cached lower-precision copies of them."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(param) -> (master, copy)

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[Master]:
        """Inside the block the base weights are in `dtype`; yields a lookup of each weight's master values."""
        swapped: list[tuple[nn.Parameter, torch.Tensor]] = []
        masters: dict[int, torch.Tensor] = {}
        try:
            for name, param in model.named_parameters():
                if "lora_" in name or param.dtype == self.dtype:
                    continue
                master = param.data
                masters[id(param)] = master
                swapped.append((param, master))
                param.data = self._copy(param, master)
            yield lambda param: masters.get(id(param), param.data)
        finally:
            for param, master in swapped:
                param.data = master

    def _copy(self, param: nn.Parameter, master: torch.Tensor) -> torch.Tensor:
        cached = self._copies.get(id(param))
        if cached is not None and cached[0].data_ptr() == master.data_ptr() and cached[0].shape == master.shape:
            return cached[1]
        copy = master.to(self.dtype)
        self._copies[id(param)] = (master, copy)
        return copy
