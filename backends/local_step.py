"""One forward of a transformers causal LM for the refill engine: the model's own layers, float32 logits.

The decoder runs as transformers builds it (with the LoRA layers swapped as `local_lora` says), but the output
layer is applied here, to the last position only and with float32 weights, so logits and sampling stay in
float32 when the rest of the model runs in bfloat16. That split is only done for architectures whose logits
are exactly `lm_head(norm(h))`; any other model gets its own full forward and its logits cast to float32.

A decode step (one new token per row) of a plain Llama runs through `LlamaDecode` instead: the same arithmetic
as transformers' forward in a third of the tensor operations and none of its per-module Python (bench/
RESULTS.md: small ops and dispatch were a sixth of a long decode), with the projections that share an input
fused into one matmul and each gathered adapter's A matrix appended to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs

from backends.local_cache import RowCache
from backends.local_engine import Row
from backends.local_llama import LlamaDecode, supported
from backends.local_lora import Master, RowAdapters

# Architectures whose logits are the output layer applied to the decoder's last hidden state, nothing more
# (no soft-capping, no logit scale).
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2"})


def full_attention_only(model: PreTrainedModel) -> bool:
    """The refill cache keeps every position: sliding-window or chunked layers need transformers' own caches."""
    config = model.config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(config)
    return all(kind == "full_attention" for kind in layer_types)


class HFStep:
    """`StepModel` over a transformers model; `rows` (gathered adapters) is told each batch's adapters."""

    def __init__(
        self, model: PreTrainedModel, *, rows: RowAdapters | None, master: Master | None, base_row: str,
        fused: bool = True,
    ):
        """`fused=False` keeps transformers' own forward for decode steps too (the bench's "before" row)."""
        self._model = model
        self._rows = rows
        self._base_row = base_row
        self._names: list[str] | None = None
        config = model.config.get_text_config(decoder=True)
        self.num_layers = int(config.num_hidden_layers)
        self.device = next(model.parameters()).device
        self._decoder: nn.Module | None = None
        self._head: torch.Tensor | None = None
        head = model.get_output_embeddings()
        if (
            config.model_type in PLAIN_HEAD_TYPES
            and isinstance(head, nn.Linear)
            and head.bias is None
            and not getattr(config, "final_logit_softcapping", None)
        ):
            self._decoder = model.get_decoder()
            weight = master(head.weight) if master is not None else head.weight
            self._head = weight.float()
        self._fast: LlamaDecode | None = None
        self._fast_supported = fused and self._head is not None and supported(model)

    def logits(
        self,
        rows: Sequence[Row],
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: RowCache,
    ) -> torch.Tensor:
        self._set_rows(rows)
        if input_ids.shape[1] == 1 and self._fast_supported and self._head is not None:
            if self._fast is None:  # built on the first decode step: a call that only prefills never pays for it
                self._fast = LlamaDecode(self._model, self._rows)
            hidden = self._fast.hidden(input_ids, mask, positions, cache)
            return nn.functional.linear(hidden.to(self._head.dtype), self._head)
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            "cache": cache,
            "use_cache": True,
        }
        if self._decoder is None or self._head is None:
            return self._model(**inputs, logits_to_keep=1).logits[:, -1, :].float()
        hidden = self._decoder(**inputs).last_hidden_state[:, -1, :]
        return nn.functional.linear(hidden.to(self._head.dtype), self._head)

    def _set_rows(self, rows: Sequence[Row]) -> None:
        if self._rows is None:
            return
        names = [row.adapter for row in rows]
        if names != self._names:
            self._rows.set_rows([None if name == self._base_row else name for name in names])
            self._names = names
