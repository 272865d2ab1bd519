"""The refill ("continuous") decode loop: the live batch is topped up from the queue as rows finish.

A static chunk decodes until its longest answer ends, and sampled answers vary so much in length that about
half of a chunk's steps ran with a few rows (bench/RESULTS.md). Here, whenever enough slots are free, the next
waiting prompts are prefilled on their own and merged into the running batch (`RowCache.merged_with`), so the
batch stays full until the queue runs dry. What the loop guarantees, whatever shares a row's batch:

- each row draws from its own generator (seeded by its request) and from its own logits, so its sample does
  not depend on its batch mates; greedy rows take the argmax, in float32;
- each row stops on its own (end of turn or `max_tokens`) and is handed to `finish` at once;
- rows with the same model and the same prompt are prefilled once and then sampled each on its own.

The model is reached through `StepModel`, which hides how adapters and precision are applied.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from backends.base import ChatRequest
from backends.local_cache import RowCache, Rows, gather_rows

NUCLEUS_CANDIDATES = 256  # top-p looks at this many most likely tokens first (see _Sampler)
REFILL_CHUNK = 4  # refill once a quarter of the slots (or the whole rest of the queue) can be taken
COMPACT_SHARE = 8  # drop finished rows from the cache once they are an eighth of the batch
PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward: bounds its activation memory


@dataclass
class Row:
    """One request's state while it is being decoded."""

    index: int
    request: ChatRequest
    prompt: list[int]
    adapter: str
    max_tokens: int
    generator: torch.Generator | None  # None = greedy
    tokens: list[int] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.tokens)


Finish = Callable[[Row, str], None]


class StepModel(Protocol):
    """One forward of the model for the rows given, returning float32 logits of each row's last position."""

    num_layers: int
    device: torch.device

    def logits(
        self, rows: Sequence[Row], input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: RowCache
    ) -> torch.Tensor: ...


@dataclass
class _Batch:
    """Rows and their decoding state, all indexed alike along the batch axis."""

    rows: list[Row]
    cache: RowCache
    mask: torch.Tensor  # [rows, length] bool: which cached positions are real tokens
    next_pos: torch.Tensor  # [rows, 1] position of each row's next token
    done: list[bool]
    source: torch.Tensor | None = None  # prefill: which cache row each row reads (identical prompts share one)

    @property
    def live(self) -> int:
        return len(self.rows) - sum(self.done)


def decode(
    model: StepModel,
    rows: Sequence[Row],
    finish: Finish,
    *,
    slots: int,
    stop_ids: frozenset[int],
    pad_id: int,
) -> None:
    """Decode every row, at most `slots` at a time, refilling freed slots from `rows` in order."""
    queue = deque(rows)
    batch: _Batch | None = None
    chunk = max(1, slots // REFILL_CHUNK)
    while queue or batch is not None:
        live = batch.live if batch is not None else 0
        if queue and slots - live >= min(chunk, len(queue)):
            admitted = [queue.popleft() for _ in range(min(slots - live, len(queue)))]
            fresh = [_prefill(model, part, pad_id) for part in _prefill_parts(admitted)]
            for part in fresh:
                tokens = _Sampler(part.rows, part.logits).choose()
                for i, (row, token) in enumerate(zip(part.rows, tokens, strict=True)):
                    part.batch.done[i] = _record(row, token, finish, stop_ids)
            batch = _rebuild([b for b in [batch, *(part.batch for part in fresh)] if b is not None])
            continue
        assert batch is not None
        _step(model, batch, finish, stop_ids)
        if batch.live == 0:
            batch = None
        elif sum(batch.done) * COMPACT_SHARE >= len(batch.rows):
            batch = _rebuild([batch])


@dataclass
class _Prefilled:
    rows: list[Row]
    batch: _Batch
    logits: torch.Tensor


def _prefill_parts(rows: list[Row]) -> list[list[Row]]:
    """Split rows (sorted by prompt length) into prefill forwards of little padding: a new part starts when
    padding would pass a quarter of the real tokens, or the part PREFILL_TOKENS padded tokens."""
    parts: list[list[Row]] = []
    current: list[Row] = []
    real = 0
    for row in rows:
        width = max([len(row.prompt), *(len(r.prompt) for r in current)])
        padded = width * (len(current) + 1)
        if current and (padded > PREFILL_TOKENS or 4 * padded > 5 * (real + len(row.prompt))):
            parts.append(current)
            current, real = [], 0
        current.append(row)
        real += len(row.prompt)
    if current:
        parts.append(current)
    return parts


def _prefill(model: StepModel, rows: list[Row], pad_id: int) -> _Prefilled:
    """One forward over the distinct (adapter, prompt) pairs; a duplicate reads its first's cache row."""
    keys = [(row.adapter, tuple(row.prompt)) for row in rows]
    unique: dict[tuple[str, tuple[int, ...]], int] = {}
    for key in keys:
        unique.setdefault(key, len(unique))
    firsts = [rows[keys.index(key)] for key in unique]
    ids, mask = _left_pad([r.prompt for r in firsts], pad_id, model.device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = RowCache(model.num_layers)
    logits = model.logits(firsts, ids, _prefill_mask(mask), positions, cache)
    source = None
    if len(firsts) < len(rows):
        source = torch.tensor([unique[key] for key in keys], device=model.device)
        logits, mask, positions = logits[source], mask[source], positions[source]
    batch = _Batch(rows, cache, mask, positions[:, -1:] + 1, [False] * len(rows), source)
    return _Prefilled(rows, batch, logits)


def _step(model: StepModel, batch: _Batch, finish: Finish, stop_ids: frozenset[int]) -> None:
    """One token for every row; finished rows stay in the batch (computed, ignored) until it is rebuilt."""
    device = batch.mask.device
    ids = torch.tensor([row.tokens[-1] for row in batch.rows], device=device).unsqueeze(1)
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
    logits = model.logits(batch.rows, ids, batch.mask[:, None, None, :], batch.next_pos, batch.cache)
    batch.next_pos = batch.next_pos + 1
    live = [i for i, done in enumerate(batch.done) if not done]
    chosen = _Sampler([batch.rows[i] for i in live], logits[live] if len(live) < len(batch.rows) else logits).choose()
    for i, token in zip(live, chosen, strict=True):
        batch.done[i] = _record(batch.rows[i], token, finish, stop_ids)


def _record(row: Row, token: int, finish: Finish, stop_ids: frozenset[int]) -> bool:
    row.tokens.append(token)
    if token in stop_ids:
        finish(row, "stop")
    elif len(row.tokens) >= row.max_tokens:
        finish(row, "length")
    else:
        return False
    return True


def _rebuild(batches: list[_Batch]) -> _Batch | None:
    """One batch of every unfinished row of `batches`, in one copy of the cache: finished rows dropped, and the
    leading positions none of a batch's remaining rows attends to."""
    parts: list[Rows] = []
    rows: list[Row] = []
    masks: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    for batch in batches:
        keep = [i for i, done in enumerate(batch.done) if not done]
        if not keep:
            continue
        index = torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask[index]
        used = mask.any(dim=0).nonzero()
        lead = int(used[0]) if len(used) else 0
        source = index if batch.source is None else batch.source[index]
        whole = batch.source is None and len(keep) == len(batch.rows)
        parts.append(Rows(batch.cache, None if whole else source, len(keep), lead))
        rows.extend(batch.rows[i] for i in keep)
        masks.append(mask[:, lead:])
        positions.append(batch.next_pos[index])
    if not rows:
        return None
    room = max(row.remaining for row in rows)
    width = max(mask.shape[1] for mask in masks)
    mask = torch.cat([torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], dim=1) for m in masks])
    cache = gather_rows(parts, room)
    return _Batch(rows, cache, mask, torch.cat(positions), [False] * len(rows))


def _prefill_mask(mask: torch.Tensor) -> torch.Tensor:
    """Causal and padding mask `[rows, 1, length, length]`; a padding query that may see nothing sees all instead
    (its output is never used, but an empty softmax row would be NaN and NaN reaches the cache)."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    full = causal[None, None] & mask[:, None, None, :]
    return full | ~full.any(dim=-1, keepdim=True)


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = True
    return ids.to(device), mask.to(device)


class _Sampler:
    """Greedy rows take the argmax. Sampled rows draw by inverse CDF from their own float32 nucleus, with one
    uniform number per row per token from the row's own generator (on the CPU, so the draw does not depend on
    the device); everything else is batched on the device, and each row's numbers are computed from its own
    logits only, so a draw does not depend on the batch either."""

    def __init__(self, rows: Sequence[Row], logits: torch.Tensor) -> None:
        self._rows = rows
        self._logits = logits.float()

    def choose(self) -> list[int]:
        chosen: list[int] = self._logits.argmax(dim=-1).tolist()
        sampled = [i for i, row in enumerate(self._rows) if row.generator is not None]
        if not sampled:
            return chosen
        device = self._logits.device
        rows = [self._rows[i] for i in sampled]
        logits = self._logits[sampled] if len(sampled) < len(self._rows) else self._logits
        temperature = torch.tensor([r.request.temperature for r in rows], device=device)
        top_p = torch.tensor([r.request.top_p for r in rows], device=device)
        uniform = torch.tensor([float(torch.rand((), generator=r.generator)) for r in rows], device=device)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        top_probs, top_ids = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]))
        # the nucleus almost always lies in the top few hundred tokens; rows whose does not sort everything
        full = (top_p >= 1.0) | (top_probs.sum(dim=-1) < top_p)
        tokens = _draw(top_probs, top_ids, top_p, uniform)
        if bool(full.any()):
            wide = full.nonzero().squeeze(1)
            sorted_probs, sorted_ids = probs[wide].sort(dim=-1, descending=True)
            tokens[wide] = _draw(sorted_probs, sorted_ids, top_p[wide], uniform[wide])
        for i, token in zip(sampled, tokens.tolist(), strict=True):
            chosen[i] = int(token)
        return chosen


def _draw(probs: torch.Tensor, ids: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Rows of descending probabilities: keep the smallest prefix whose mass reaches top_p (the first token
    always stays), then the token where the kept mass first exceeds uniform x that mass."""
    outside = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1.0)
    kept = probs.masked_fill(outside, 0.0).cumsum(dim=-1)
    target = (uniform * kept[:, -1]).unsqueeze(1)
    index = torch.searchsorted(kept, target, right=True).clamp(max=probs.shape[-1] - 1)
    return ids.gather(1, index).squeeze(1)
