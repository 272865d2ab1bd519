"""LoRA adapters applied in the decode loop without PEFT's per-call machinery.

PEFT's mixed-adapter forward walks every module on each call to install hooks and slices the batch by adapter
in every layer (14 % of a decode on CPU). During generation the adapters' weights are fixed, so the LoRA layers
are swapped out of the module tree for the call and swapped back after, in a `finally`:

- `gathered_adapters`: each LoRA layer becomes one `base(x) + (mask * (x @ A_all^T)) @ B_all^T * scale`, where
  `A_all`/`B_all` hold the call's adapters side by side and each row's mask keeps only its own adapter's
  columns, so a batch can mix adapters (and base rows) in three dense matmuls per layer.
- `merged_adapter`: each LoRA layer becomes its base layer with `W + scale * B @ A` in place of `W`, for
  decoding one adapter's rows at a time; the original weight tensor itself is put back (never `W - delta`, whose
  rounding would drift the base model a little on every call).

Both read PEFT's own tensors, so a freshly trained adapter is used as soon as it exists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

Master = Callable[[torch.Tensor], torch.Tensor]  # a parameter -> its full-precision values (see local_precision)


@dataclass(frozen=True)
class _Site:
    parent: nn.Module
    attr: str
    layer: LoraLinear


def lora_sites(model: nn.Module) -> list[_Site]:
    """Every PEFT LoRA layer in the model, with where it hangs in the module tree."""
    sites = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, LoraLinear):
                sites.append(_Site(parent, attr, child))
    return sites


def unsupported_reason(model: nn.Module, names: Sequence[str]) -> str | None:
    """Why these adapters need PEFT's own forward (DoRA and other variants, LoRA biases, Conv1D weights), or None."""
    for site in lora_sites(model):
        layer = site.layer
        if type(layer) is not LoraLinear or not isinstance(layer.base_layer, nn.Linear) or layer.fan_in_fan_out:
            return f"{type(layer).__name__} over {type(layer.base_layer).__name__}"
        if layer.merged:
            return "an adapter is merged into the base weights"
        for name in names:
            if name in layer.lora_A and (name in layer.lora_variant or layer.lora_B[name].bias is not None):
                return f"adapter {name} is a LoRA variant or has a bias"
    sites = lora_sites(model)
    for name in names:
        used = [site.layer for site in sites if name in site.layer.lora_A]
        if len({layer.r[name] for layer in used}) > 1 or len({float(layer.scaling[name]) for layer in used}) > 1:
            return f"adapter {name} has per-layer ranks or scales"
    return None


class RowAdapters:
    """Which adapter each row of the current batch uses: the column mask and scale every gathered layer reads.

    Set again whenever the batch's rows change (prefill of new rows, rows dropped); cheap, tensors of
    `[rows, 1, columns]`.
    """

    def __init__(self, names: Sequence[str], ranks: Sequence[int], scales: Sequence[float], device: torch.device,
                 dtype: torch.dtype) -> None:
        self._index = {name: i for i, name in enumerate(names)}
        self._ranks = list(ranks)
        self._scales = list(scales)
        self._offsets = [sum(self._ranks[:i]) for i in range(len(self._ranks))]
        self.columns = sum(self._ranks)
        self._device, self._dtype = device, dtype
        self.active = False
        self.mask = torch.zeros(0, 1, self.columns, device=device, dtype=dtype)
        self.scale = torch.zeros(0, 1, 1, device=device, dtype=dtype)

    def set_rows(self, row_names: Sequence[str | None]) -> None:
        """`None` (or a name not in this call) is a base-model row."""
        mask = torch.zeros(len(row_names), 1, self.columns, dtype=self._dtype)
        scale = torch.zeros(len(row_names), 1, 1, dtype=self._dtype)
        for row, name in enumerate(row_names):
            i = self._index.get(name) if name is not None else None
            if i is not None:
                mask[row, 0, self._offsets[i] : self._offsets[i] + self._ranks[i]] = 1
                scale[row] = self._scales[i]
        self.active = bool(mask.any())
        self.mask = mask.to(self._device)
        self.scale = scale.to(self._device)


class GatheredLinear(nn.Module):
    """A base linear layer plus each row's own LoRA delta, in PEFT's order: `base(x) + B(A(x)) * scale`."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, rows: RowAdapters) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.a: torch.Tensor = a  # [columns, in]
        self.b: torch.Tensor = b  # [out, columns]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if not self.rows.active:
            return result
        low = nn.functional.linear(x, self.a) * self.rows.mask
        return result + nn.functional.linear(low, self.b) * self.rows.scale


@contextmanager
def gathered_adapters(model: nn.Module, names: Sequence[str], dtype: torch.dtype) -> Iterator[RowAdapters]:
    """Swap every LoRA layer for a `GatheredLinear` over the adapters `names` for the duration of the block."""
    sites = lora_sites(model)
    ranks = [_rank(sites, name) for name in names]
    scales = [_scale(sites, name) for name in names]
    device = next(model.parameters()).device
    rows = RowAdapters(names, ranks, scales, device, dtype)
    replacements: list[nn.Module] = []
    for site in sites:
        base = site.layer.base_layer
        assert isinstance(base, nn.Linear)
        a_parts, b_parts = [], []
        for name, rank in zip(names, ranks, strict=True):
            if name in site.layer.lora_A:
                a_parts.append(_weight(site.layer.lora_A, name))
                b_parts.append(_weight(site.layer.lora_B, name))
            else:  # this adapter leaves this layer alone: zero columns
                a_parts.append(torch.zeros(rank, base.in_features, device=device))
                b_parts.append(torch.zeros(base.out_features, rank, device=device))
        if names:
            a = torch.cat(a_parts).to(device=device, dtype=dtype)
            b = torch.cat(b_parts, dim=1).to(device=device, dtype=dtype).contiguous()
            replacements.append(GatheredLinear(base, a, b, rows))
        else:
            replacements.append(base)
    with _swapped(sites, replacements):
        yield rows


@contextmanager
def merged_adapter(model: nn.Module, name: str | None, master: Master | None = None) -> Iterator[None]:
    """Swap every LoRA layer for its base layer, with adapter `name` (None: none) merged into the weights.

    The merge is computed in float32 from `master` (the full-precision weights when generation runs on a lower-
    precision copy) and rounded once; afterwards each weight gets its original tensor object back.
    """
    sites = lora_sites(model)
    originals: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for site in sites:
            layer, base = site.layer, site.layer.base_layer
            if name is None or name not in layer.lora_A:
                continue
            assert isinstance(base, nn.Linear)
            weight = base.weight
            full = master(weight) if master is not None else weight.data
            delta = _weight(layer.lora_B, name).float() @ _weight(layer.lora_A, name).float()
            originals.append((weight, weight.data))
            weight.data = (full.float() + delta * layer.scaling[name]).to(weight.dtype)
        with _swapped(sites, [site.layer.base_layer for site in sites]):
            yield
    finally:
        for weight, original in originals:
            weight.data = original


@contextmanager
def _swapped(sites: Sequence[_Site], replacements: Sequence[nn.Module]) -> Iterator[None]:
    try:
        for site, module in zip(sites, replacements, strict=True):
            setattr(site.parent, site.attr, module)
        yield
    finally:
        for site in sites:
            setattr(site.parent, site.attr, site.layer)


def _weight(modules: Any, name: str) -> torch.Tensor:
    """One adapter's LoRA A or B matrix (PEFT keeps them in ModuleDicts of Linear layers)."""
    weight = modules[name].weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach()


def _rank(sites: Sequence[_Site], name: str) -> int:
    return next((int(site.layer.r[name]) for site in sites if name in site.layer.lora_A), 0)


def _scale(sites: Sequence[_Site], name: str) -> float:
    """One number per adapter (`unsupported_reason` refuses per-layer alpha patterns)."""
    return next((float(site.layer.scaling[name]) for site in sites if name in site.layer.lora_A), 1.0)
