"""Today's static-chunk decode, kept as it was: the fallback for models the refill engine does not cover, and
the "before" side of bench/local_generation.py.

Each chunk of `batch_size` rows is prefilled left-padded and decoded through PEFT's mixed-adapter forward
(`adapter_names=[...]`, one per row); a row leaves the batch, its KV cache included, when it finishes, but no
row joins until the whole chunk is done, so a chunk's last long answers decode almost alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from backends.local_engine import NUCLEUS_CANDIDATES, Row

if TYPE_CHECKING:
    from backends.local_pool import AdapterPool


def decode_static(
    pool: AdapterPool,
    rows: Sequence[Row],
    finish: Callable[[Row, str], None],
    *,
    batch_size: int,
    stop_ids: frozenset[int],
    pad_id: int,
) -> None:
    """Rows sorted by prompt length, then one chunk of `batch_size` after another."""
    pending = sorted(rows, key=lambda r: len(r.prompt))
    for start in range(0, len(pending), max(1, batch_size)):
        _decode_batch(pool, pending[start : start + batch_size], finish, stop_ids, pad_id)


def _decode_batch(
    pool: AdapterPool, rows: list[Row], finish: Callable[[Row, str], None], stop_ids: frozenset[int], pad_id: int
) -> None:
    """Prefill the left-padded batch, then one token per step, shrinking the batch as rows finish."""
    device = pool.loaded.device
    input_ids, mask = left_pad([r.prompt for r in rows], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    cache = DynamicCache(config=pool.loaded.model.config)
    logits = _forward(pool, rows, input_ids, mask, positions, cache)
    next_pos = positions[:, -1:] + 1
    while rows:
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(rows, _choose(rows, logits), strict=True)):
            row.tokens.append(token)
            if token in stop_ids:
                finish(row, "stop")
            elif len(row.tokens) >= row.max_tokens:
                finish(row, "length")
            else:
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, next_pos = mask[index], next_pos[index]
            rows = [rows[i] for i in keep]
        step = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = _forward(pool, rows, step, mask, next_pos, cache)
        next_pos = next_pos + 1


def _forward(
    pool: AdapterPool,
    rows: list[Row],
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """Logits of the last position only: full [batch, length, vocab] prefill logits are large and unused."""
    output = pool.model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **pool.forward_kwargs([r.adapter for r in rows]),
    )
    return output.logits[:, -1, :]


def _choose(rows: list[Row], logits: torch.Tensor) -> list[int]:
    """Greedy rows take the argmax; sampled rows draw on the CPU with their own generator so the draw does not
    depend on the device or on the batch."""
    chosen: list[int] = logits.argmax(dim=-1).tolist()
    if all(r.generator is None for r in rows):
        return chosen
    cpu_logits = logits.float().cpu()
    for i, row in enumerate(rows):
        if row.generator is not None:
            chosen[i] = _sample(cpu_logits[i], row.request.temperature, row.request.top_p, row.generator)
    return chosen


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator))
    # Nucleus: the smallest prefix of the sorted distribution whose mass reaches top_p. It almost always lies
    # in the top few hundred tokens, and sorting those instead of the whole vocabulary took a sort of ~50k
    # floats per row per step off the decode loop (~15% of its time on CPU); fall back when it does not.
    top_probs, top_ids = probs.topk(min(NUCLEUS_CANDIDATES, probs.numel()))
    if float(top_probs.sum()) < top_p:
        top_probs, top_ids = probs.sort(descending=True)
    outside = top_probs.cumsum(-1) - top_probs >= top_p  # the first token always stays
    top_probs = top_probs.masked_fill(outside, 0.0)
    return int(top_ids[torch.multinomial(top_probs, 1, generator=generator)])


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)
