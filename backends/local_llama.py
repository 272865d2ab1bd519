"""A decode step (one new token per row) of a plain Llama in few tensor operations, for the refill engine.

transformers' forward spends a decode step of a small model largely in Python: some 75 tensor operations and
15 module calls per layer, plus five more operations for each LoRA layer gathered in (`local_lora`). This
step does the same arithmetic in about 20 operations per layer, reading the model's own weights:

- the projections that share an input (q, k and v; gate and up) are one matmul over their weights stacked,
  with every gathered adapter's A matrix stacked under them, so a layer's LoRA costs one `addmm` more;
- rotary embedding on queries and keys at once, `x * cos + roll(x) * signed_sin` (exactly transformers'
  `x * cos + rotate_half(x) * sin`: only a sign moves from one factor to the other);
- grouped-query attention through SDPA with the queries of a key/value head packed together (as transformers
  does for one query token), straight on the cache's buffers.

Prefill stays transformers' own forward: it writes the same cache layout (`local_cache`). Only models this
module can vouch for take this path (`supported`); the arithmetic is the same up to float rounding (the
engine's tests hold it to transformers' logits and the naive loop's greedy texts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from backends.local_cache import RowCache
from backends.local_lora import GatheredLinear, RowAdapters


def supported(model: PreTrainedModel) -> bool:
    """A Llama with no biases, SiLU MLP, plain rotary embedding, SDPA attention, and projections that are plain
    linear layers or gathered LoRA layers (what `local_lora` swaps in)."""
    config = model.config.get_text_config(decoder=True)
    rope = getattr(config, "rope_parameters", None) or {}
    if (
        config.model_type != "llama"
        or getattr(config, "attention_bias", False)
        or getattr(config, "mlp_bias", False)
        or config.hidden_act != "silu"
        or (getattr(config, "pretraining_tp", 1) or 1) != 1
        or rope.get("rope_type", "default") != "default"
        or getattr(config, "_attn_implementation", None) != "sdpa"
    ):
        return False
    decoder = model.get_decoder()
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
        projections += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(type(p) in (nn.Linear, GatheredLinear) for p in projections):
            return False
        if any(_base(p).bias is not None for p in projections):
            return False
    return True


def _base(module: nn.Module) -> nn.Linear:
    base = module.base if isinstance(module, GatheredLinear) else module
    assert isinstance(base, nn.Linear)
    return base


class _Fused:
    """Linear layers over one input as one matmul; gathered adapters' A stacked below, B block-placed after."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        weights = [_base(m).weight for m in modules]
        gathered = [m for m in modules if isinstance(m, GatheredLinear)]
        self.width = sum(int(w.shape[0]) for w in weights)
        self.weight = torch.cat([*weights, *(m.a for m in gathered)]).contiguous()
        self.repeat = len(gathered)
        self.b_t: torch.Tensor | None = None
        if gathered:
            columns = int(gathered[0].a.shape[0])
            b = weights[0].new_zeros((self.width, columns * len(gathered)))
            offset, g = 0, 0
            for module, weight in zip(modules, weights, strict=True):
                if isinstance(module, GatheredLinear):
                    b[offset : offset + weight.shape[0], g * columns : (g + 1) * columns] = module.b
                    g += 1
                offset += int(weight.shape[0])
            self.b_t = b.t().contiguous()

    def __call__(self, x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """`scales` [rows, columns]: each row's adapter columns times its scale (None: no adapter rows)."""
        y = nn.functional.linear(x, self.weight)
        if self.b_t is None:
            return y
        if scales is None:
            return y[:, : self.width]
        low = y[:, self.width :] * (scales if self.repeat == 1 else scales.repeat(1, self.repeat))
        return torch.addmm(y[:, : self.width], low, self.b_t)


class _Layer:
    def __init__(self, layer: Any) -> None:  # a LlamaDecoderLayer
        attention, mlp = layer.self_attn, layer.mlp
        self.qkv = _Fused([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o = _Fused([attention.o_proj])
        self.gate_up = _Fused([mlp.gate_proj, mlp.up_proj])
        self.down = _Fused([mlp.down_proj])
        self.norm_in: torch.Tensor = layer.input_layernorm.weight
        self.norm_post: torch.Tensor = layer.post_attention_layernorm.weight
        self.intermediate = int(_base(mlp.gate_proj).out_features)


class LlamaDecode:
    """One token per row through every layer; returns the final-norm hidden state of each row `[rows, hidden]`."""

    def __init__(self, model: PreTrainedModel, rows: RowAdapters | None) -> None:
        config = model.config.get_text_config(decoder=True)
        decoder: Any = model.get_decoder()
        self._rows = rows
        self._embed: torch.Tensor = decoder.embed_tokens.weight
        self._layers = [_Layer(layer) for layer in decoder.layers]
        self._norm: torch.Tensor = decoder.norm.weight
        self._eps = float(config.rms_norm_eps)
        self._heads = int(config.num_attention_heads)
        self._kv_heads = int(config.num_key_value_heads)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self._scaling = self._head_dim**-0.5
        self._inv_freq = decoder.rotary_emb.inv_freq.float()
        self._scales_for: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scales: torch.Tensor | None = None

    def hidden(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: RowCache
    ) -> torch.Tensor:
        """`input_ids` and `positions` `[rows, 1]`, `mask` `[rows, 1, 1, length]` with the new token's position."""
        rows = input_ids.shape[0]
        heads, kv_heads, dim = self._heads, self._kv_heads, self._head_dim
        x = nn.functional.embedding(input_ids[:, 0], self._embed)
        dtype = x.dtype
        cos, sin = self._rotary(positions[:, 0], dtype)
        scales = self._adapter_scales()
        q_width, k_width = heads * dim, kv_heads * dim
        for layer, cached in zip(self._layers, cache.roomy(), strict=True):
            h = self._rms(x, layer.norm_in)
            qkv = layer.qkv(h, scales)
            qk = qkv[:, : q_width + k_width].view(rows, heads + kv_heads, dim)
            qk = qk * cos + qk.roll(dim // 2, dims=-1) * sin
            query = qk[:, :heads].reshape(rows, kv_heads, heads // kv_heads, dim)
            key = qk[:, heads:].unsqueeze(2)
            value = qkv[:, q_width + k_width :].view(rows, kv_heads, 1, dim)
            keys, values = cached.update(key, value)
            attended = nn.functional.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=self._scaling
            )
            x = x + layer.o(attended.reshape(rows, q_width), scales)
            h = self._rms(x, layer.norm_post)
            gate_up = layer.gate_up(h, scales)
            inner = nn.functional.silu(gate_up[:, : layer.intermediate]) * gate_up[:, layer.intermediate :]
            x = x + layer.down(inner, scales)
        return self._rms(x, self._norm)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm: in float32, then back to the input's dtype, times the weight."""
        if x.dtype == torch.float32:
            return nn.functional.rms_norm(x, (x.shape[-1],), weight, self._eps)
        normed = nn.functional.rms_norm(x.float(), (x.shape[-1],), None, self._eps)
        return weight * normed.to(x.dtype)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin `[rows, 1, head_dim]`, computed as transformers' rotary embedding does."""
        freqs = positions[:, None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        half = self._head_dim // 2
        signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos[:, None, :], signed[:, None, :]

    def _adapter_scales(self) -> torch.Tensor | None:
        """Each row's adapter columns times its scale `[rows, columns]`, recomputed when the rows change."""
        if self._rows is None or not self._rows.active:
            return None
        mask, scale = self._rows.mask, self._rows.scale
        if self._scales_for is None or self._scales_for[0] is not mask or self._scales_for[1] is not scale:
            self._scales = (mask * scale)[:, 0, :].contiguous()
            self._scales_for = (mask, scale)
        return self._scales
