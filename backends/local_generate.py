"""Generation for the local backend: every row may use a different LoRA adapter of the same base model.

All agents of a society are adapters on one base model, so a debate stage (N agents x many problems) is one
queue of rows decoded by the refill engine (`local_engine`): the batch is topped up with waiting prompts as
rows finish, adapters are applied without PEFT in the loop (`local_lora`), and on a CPU with fast bfloat16
matmuls the base weights can run in bfloat16 (`local_precision`) while logits and sampling stay in float32.
This module holds what ties them together: the rows made from requests (on the adapter pool, `local_pool`),
the results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from backends.base import ChatRequest, ChatResult, ResultCallback, Usage
from backends.local_engine import Finish, Row, decode
from backends.local_lora import gathered_adapters, merged_adapter, unsupported_reason
from backends.local_pool import PEFT_BASE_ROW, AdapterPool
from backends.local_static import decode_static
from backends.local_step import HFStep, full_attention_only
from foundation.errors import UserError

GREEDY_BELOW = 1e-5  # temperatures this small are greedy; dividing logits by them would overflow

Engine = Literal["refill", "static"]
AdapterMode = Literal["gathered", "merged"]


def generate_chats(
    pool: AdapterPool,
    requests: Sequence[ChatRequest],
    *,
    batch_size: int = 32,
    on_result: ResultCallback | None = None,
    engine: Engine = "refill",
    adapters: AdapterMode = "gathered",
    fused: bool = True,
) -> list[ChatResult]:
    """Answer every request; results come back in input order, `on_result` fires as each row finishes.

    `engine="static"` is the earlier static-chunk decode through PEFT (`local_static`), also the fallback for
    models and adapters the refill engine does not cover. `adapters="merged"` decodes each adapter's rows on
    merged weights instead of one mixed batch. `fused=False` decodes through transformers' own forward instead of
    `local_llama`'s fused step (for measuring it).
    """
    rows = [_make_row(pool, i, request) for i, request in enumerate(requests)]
    results: list[ChatResult | None] = [None] * len(rows)

    def finish(row: Row, reason: str) -> None:
        result = _result(pool, row, reason)
        results[row.index] = result
        if on_result is not None:
            on_result(result)

    for row in rows:
        if row.max_tokens <= 0:
            finish(row, "length")
    pending = [r for r in rows if r.max_tokens > 0]
    pool.model.eval()
    names = sorted({r.adapter for r in pending} - {PEFT_BASE_ROW})
    if engine == "static" or _refill_unsupported(pool, names):
        with torch.inference_mode():
            decode_static(pool, pending, finish, batch_size=batch_size, stop_ids=_stop_ids(pool), pad_id=_pad_id(pool))
    else:
        _decode_refill(pool, pending, finish, names, batch_size, adapters, fused)
    return [r for r in results if r is not None]


def _decode_refill(
    pool: AdapterPool, rows: list[Row], finish: Finish, names: list[str], batch_size: int, adapters: AdapterMode,
    fused: bool,
) -> None:
    """Rows in prompt-length order (identical prompts adjacent, so they are prefilled once), on the pool's
    generation weights, with the adapters gathered into one mixed batch or merged one adapter at a time."""
    model = pool.loaded.model
    queue = sorted(rows, key=lambda r: (len(r.prompt), r.adapter, r.prompt))
    stop_ids, pad_id = _stop_ids(pool), _pad_id(pool)
    with pool.generation_weights() as master, torch.inference_mode():
        if adapters == "gathered":
            with gathered_adapters(model, names, pool.generation_dtype) as row_adapters:
                step = HFStep(model, rows=row_adapters, master=master, base_row=PEFT_BASE_ROW, fused=fused)
                decode(step, queue, finish, slots=batch_size, stop_ids=stop_ids, pad_id=pad_id)
            return
        for name in [PEFT_BASE_ROW, *names]:
            group = [r for r in queue if r.adapter == name]
            if group:
                with merged_adapter(model, None if name == PEFT_BASE_ROW else name, master):
                    step = HFStep(model, rows=None, master=master, base_row=PEFT_BASE_ROW, fused=fused)
                    decode(step, group, finish, slots=batch_size, stop_ids=stop_ids, pad_id=pad_id)


def _refill_unsupported(pool: AdapterPool, names: list[str]) -> bool:
    return not full_attention_only(pool.loaded.model) or unsupported_reason(pool.loaded.model, names) is not None


def _make_row(pool: AdapterPool, index: int, request: ChatRequest) -> Row:
    """Resolve the adapter here, outside inference_mode: tensors created inside it could never train later."""
    tokenizer = pool.loaded.tokenizer
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = _context_length(pool)
    if len(prompt) >= context:
        raise UserError(
            f"request {request.key!r} has a {len(prompt)}-token prompt, beyond the model's {context}-token "
            "context: shorten the conversation (fewer rounds or a summary)"
        )
    return Row(
        index=index,
        request=request,
        prompt=list(prompt),
        adapter=pool.name_for(request.model),
        max_tokens=min(request.max_tokens, context - len(prompt)),
        generator=_generator(request),
    )


def _generator(request: ChatRequest) -> torch.Generator | None:
    """A per-row generator makes a row's samples independent of which rows share its batch."""
    if request.temperature < GREEDY_BELOW:
        return None
    generator = torch.Generator()
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed)
    return generator


def _stop_ids(pool: AdapterPool) -> frozenset[int]:
    """End of turn: the tokenizer's eos, the generation config's eos ids, and ChatML's `<|im_end|>`."""
    tokenizer = pool.loaded.tokenizer
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(pool.loaded.model.generation_config, "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, list) else [config_eos]))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(ids)


def _pad_id(pool: AdapterPool) -> int:
    tokenizer = pool.loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def _context_length(pool: AdapterPool) -> int:
    return int(getattr(pool.loaded.model.config, "max_position_embeddings", None) or 1 << 30)


def _result(pool: AdapterPool, row: Row, reason: str) -> ChatResult:
    """Completion tokens include the stop token: it was computed, and hosted APIs bill it too."""
    body = row.tokens[:-1] if reason == "stop" else row.tokens
    text = str(pool.loaded.tokenizer.decode(body, skip_special_tokens=True))
    usage = Usage(prompt_tokens=len(row.prompt), completion_tokens=len(row.tokens))
    return ChatResult(key=row.request.key, text=text, finish_reason=reason, usage=usage)
