"""The KV cache of the refill decode loop: rows come and go, and a step writes in place.

transformers' `DynamicCache` concatenates every layer's whole cache on every token (on CPU that copy was 11 %
of a long decode), and its rows can only be dropped, never added. Here each layer keeps its keys and values in
a buffer with room for the tokens still to come, and `gather_rows` builds a new cache from rows of several
(the running batch without its finished rows, plus rows just prefilled), right-aligned on a common length and
left-padded with zeros that the attention mask hides, in one copy per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


class RoomyLayer(DynamicLayer):
    """One layer's keys and values, `[batch, heads, length, head_dim]` views of a buffer with spare length."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.room = 0  # extra positions to allocate on a growth: the tokens the rows may still decode
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.buffers is None or self.length + new > self.buffers[0].shape[-2]:
            self._grow(key_states, value_states, self.length + new + self.room)
        assert self.buffers is not None
        keys, values = self.buffers
        keys[:, :, self.length : self.length + new] = key_states
        values[:, :, self.length : self.length + new] = value_states
        self.length += new
        self.expose()
        return keys[:, :, : self.length], values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def expose(self) -> None:
        assert self.buffers is not None
        self.keys = self.buffers[0][:, :, : self.length]
        self.values = self.buffers[1][:, :, : self.length]

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        batch, heads, _, dim = key_states.shape
        keys = key_states.new_empty((batch, heads, capacity, dim))
        values = value_states.new_empty((batch, value_states.shape[1], capacity, value_states.shape[-1]))
        if self.buffers is not None:
            keys[:, :, : self.length] = self.buffers[0][:, :, : self.length]
            values[:, :, : self.length] = self.buffers[1][:, :, : self.length]
        self.buffers = (keys, values)


class RowCache(DynamicCache):
    """A cache of `RoomyLayer`s, one per decoder layer, for models whose layers all attend to the full past."""

    def __init__(self, num_layers: int, room: int = 0) -> None:
        Cache.__init__(self, layers=[RoomyLayer() for _ in range(num_layers)])  # not DynamicCache's lazy layers
        for layer in self.roomy():
            layer.room = room

    @property
    def length(self) -> int:
        return self.roomy()[0].length

    def roomy(self) -> list[RoomyLayer]:
        layers = [layer for layer in self.layers if isinstance(layer, RoomyLayer)]
        assert len(layers) == len(self.layers)
        return layers


@dataclass(frozen=True)
class Rows:
    """Some rows of a cache: `index` (None: all of them), after dropping its first `lead` positions."""

    cache: RowCache
    index: torch.Tensor | None
    count: int
    lead: int = 0


def gather_rows(parts: Sequence[Rows], room: int) -> RowCache:
    """One cache holding `parts`' rows in order, right-aligned on the longest part, with `room` spare positions.

    The left padding is zero: masked, but it must be finite, since 0 x NaN would still be NaN in the attention.
    """
    num_layers = len(parts[0].cache.layers)
    merged = RowCache(num_layers, room)
    lengths = [part.cache.length - part.lead for part in parts]
    length = max(lengths)
    total = sum(part.count for part in parts)
    for i, target in enumerate(merged.roomy()):
        sources = [part.cache.roomy()[i] for part in parts]
        template = next(s.buffers for s in sources if s.buffers is not None)
        buffers = tuple(
            t.new_empty((total, t.shape[1], length + room, t.shape[-1])) for t in template
        )
        start = 0
        for part, source, part_length in zip(parts, sources, lengths, strict=True):
            assert source.buffers is not None
            pad = length - part_length
            for buffer, own in zip(buffers, source.buffers, strict=True):
                rows = own[:, :, part.lead : source.length]
                if part.index is not None:
                    rows = rows.index_select(0, part.index)
                buffer[start : start + part.count, :, :pad] = 0
                buffer[start : start + part.count, :, pad:length] = rows
            start += part.count
        target.lazy_initialization(buffers[0], buffers[1])
        target.buffers = (buffers[0], buffers[1])
        target.length = length
        target.expose()
    return merged
