"""How likely the local model finds a given reply: mean negative log-likelihood per token, row by row.

This is what the "NLL of other agents' answers under a held-out critic" diversity metric needs. Each request's
conversation plus its reply is rendered and masked exactly as training does (`encode_example`): the reply's
tokens up to and including the end-of-turn token are scored, the prompt and the template's trailing newline
are not; so a score is the per-token training loss the model would have on that reply.

Rows are left-padded, so every reply ends in the last column, and the model is asked for the logits of only
the last K columns (K = the longest reply in the batch + 1): the full [batch, length, vocab] tensor of a 49k
vocabulary would be most of the memory and all of it unused. Every row runs under its own adapter through
PEFT's mixed-adapter forward, exactly as in generation, so scoring N critics' views of N answers is one batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.base import ChatMessage, ScoreRequest
from backends.local_generate import _context_length, _pad_id
from backends.local_pool import AdapterPool
from backends.local_static import left_pad as _left_pad
from backends.local_train import IGNORE_INDEX, EncodedExample, encode_example
from foundation.errors import UserError

# Logit elements one batch may hold (128 Mi: 512 MiB in fp32, plus as much again for the softmax). Long replies
# therefore make smaller batches instead of running out of memory; at least one row always goes.
LOGITS_BUDGET = 1 << 27
_NO_TRUNCATION = 1 << 40


@dataclass(frozen=True)
class _Row:
    """One request, tokenized: `input_ids` ends with the last scored token, `scored` tokens are its tail."""

    index: int
    input_ids: list[int]
    scored: int
    adapter: str

    @property
    def targets(self) -> list[int]:
        return self.input_ids[-self.scored :]


def score_requests(pool: AdapterPool, requests: Sequence[ScoreRequest], *, batch_size: int = 32) -> list[float]:
    """Mean NLL per scored token, in nats, for each request in the order given.

    Rows are sorted by length before batching so a batch holds little padding; a row's score does not depend on
    which rows share its batch (up to float rounding).
    """
    rows = [_make_row(pool, i, request) for i, request in enumerate(requests)]  # adapters load outside inference
    scores = [math.nan] * len(rows)
    vocab = int(getattr(pool.loaded.model.config, "vocab_size", None) or 1 << 16)
    pool.model.eval()
    with torch.inference_mode():
        for batch in _batches(sorted(rows, key=lambda r: len(r.input_ids)), max(1, batch_size), vocab):
            for row, value in zip(batch, _score_batch(pool, batch), strict=True):
                scores[row.index] = value
    return scores


def _make_row(pool: AdapterPool, index: int, request: ScoreRequest) -> _Row:
    context = [m.model_copy(update={"weight": 0}) if m.role == "assistant" else m for m in request.messages]
    example = _encode(pool, context, request.continuation)  # leading whitespace is dropped as in training
    scored_at = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    if not scored_at:
        raise UserError(f"score request {request.key!r}: the chat template renders no assistant tokens to score")
    start, end = scored_at[0], scored_at[-1] + 1
    limit = _context_length(pool)
    if end > limit:
        raise UserError(
            f"score request {request.key!r} needs {end} tokens, beyond the model's {limit}-token context: "
            "shorten the conversation or the reply"
        )
    return _Row(
        index=index, input_ids=example.input_ids[:end], scored=end - start, adapter=pool.name_for(request.model)
    )


def _encode(pool: AdapterPool, context: list[ChatMessage], reply: str) -> EncodedExample:
    """The training encoder, untruncated: earlier assistant turns carry weight 0, so only `reply` is scored."""
    messages = [*context, ChatMessage(role="assistant", content=reply)]
    return encode_example(pool.loaded.tokenizer, messages, _NO_TRUNCATION)


def _batches(rows: Sequence[_Row], batch_size: int, vocab: int) -> Iterator[list[_Row]]:
    """Consecutive rows, at most `batch_size` of them and at most LOGITS_BUDGET logit elements per batch."""
    batch: list[_Row] = []
    width = 0  # logit columns the batch needs: its longest reply + 1
    for row in rows:
        wider = max(width, row.scored + 1)
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * wider * vocab > LOGITS_BUDGET):
            yield batch
            batch, wider = [], row.scored + 1
        batch.append(row)
        width = wider
    if batch:
        yield batch


def _score_batch(pool: AdapterPool, rows: list[_Row]) -> list[float]:
    """One left-padded forward; logits at column j predict the token at column j + 1."""
    device = pool.loaded.device
    input_ids, mask = _left_pad([r.input_ids for r in rows], _pad_id(pool), device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    width = max(r.scored for r in rows)
    output = pool.model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=False,
        logits_to_keep=width + 1,
        **pool.forward_kwargs([r.adapter for r in rows]),
    )
    logits = output.logits[:, :-1, :].float()  # [rows, width, vocab]: predictions of the last `width` columns
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        targets[i, width - row.scored :] = torch.tensor(row.targets, dtype=torch.long)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.to(device).reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(len(rows), width)
    totals: list[float] = nll.sum(dim=1).tolist()
    return [total / row.scored for total, row in zip(totals, rows, strict=True)]
