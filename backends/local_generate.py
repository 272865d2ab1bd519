"""Batched generation where every row may use a different LoRA adapter of the same base model.

All agents of a society are adapters on one base model, so a debate round (N agents x many problems) can be
one batch: PEFT's mixed-adapter forward (`adapter_names=[...]`, one per row) runs the base weights once and
each adapter only on its own rows. `generate()` would work too, but it keeps finished rows in the batch
until the longest one ends; on CPU that wastes most of the compute (NOTES: 23 useful tok/s vs 188), so the
decode loop here drops a row from the batch, its KV cache included, as soon as it finishes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DynamicCache

from backends.base import BASE_MODEL_ID, ChatRequest, ChatResult, ResultCallback, Usage
from backends.local_model import LoadedModel
from orchestrator.errors import UserError

PEFT_BASE_ROW = "__base__"  # PEFT's reserved name for "no adapter on this row"
GREEDY_BELOW = 1e-5  # temperatures this small are greedy; dividing logits by them would overflow
NUCLEUS_CANDIDATES = 256  # top-p looks at this many most likely tokens first (see _sample)


def adapter_name_for(path: Path) -> str:
    """Adapter names must be valid attribute names and stable for a path, however the path was spelled."""
    digest = hashlib.sha256(str(path.expanduser().resolve()).encode()).hexdigest()[:12]
    return f"agent_{digest}"


class AdapterPool:
    """The one base model in memory, and the LoRA adapters loaded onto it by path.

    Generation and training both go through this pool so the base weights exist once however many agents
    there are; the PeftModel wrapper is created with the first adapter and unwrapped if the last one goes.
    """

    def __init__(self, loaded: LoadedModel, base_ids: Sequence[str] = (BASE_MODEL_ID,)) -> None:
        self.loaded = loaded
        self._base_ids = frozenset(base_ids) | {BASE_MODEL_ID}
        self._peft: PeftModel | None = None
        self._paths: dict[str, Path] = {}

    @property
    def model(self) -> torch.nn.Module:
        return self._peft if self._peft is not None else self.loaded.model

    def is_base(self, model_id: str) -> bool:
        return model_id in self._base_ids

    def name_for(self, model_id: str) -> str:
        """Map a chat model id to a PEFT adapter name, loading the adapter the first time it is asked for."""
        if self.is_base(model_id):
            return PEFT_BASE_ROW
        path = adapter_dir(model_id)
        name = adapter_name_for(path)
        if name not in self._paths:
            self._load(name, path, trainable=False)
            self._paths[name] = path
        return name

    def add_trainable(self, name: str, *, lora: LoraConfig | None = None, init_from: Path | None = None) -> PeftModel:
        """A fresh adapter from `lora`, or a trainable copy of the adapter at `init_from` (strategy continue);
        only its weights require grad, so the Trainer's optimizer sees nothing else."""
        self.forget(name)
        if init_from is not None:
            self._load(name, init_from, trainable=True)
        elif lora is None:
            raise ValueError("add_trainable needs a LoraConfig or an adapter to start from")
        elif self._peft is None:
            self._peft = get_peft_model(self.loaded.model, lora, adapter_name=name)
        else:
            self._peft.add_adapter(name, lora)
        peft = self._require_peft()
        peft.set_adapter(name)
        self._set_trainable(name)
        return peft

    def register(self, name: str, path: Path) -> None:
        """Declare that adapter `name` (already in memory, e.g. just trained) is the one saved at `path`."""
        if name != adapter_name_for(path):
            raise ValueError(f"adapter {name} cannot stand for {path}: names derive from paths")
        self._paths[name] = path
        self._set_trainable(None)

    def forget(self, name: str) -> None:
        if self._peft is None or name not in self._peft.peft_config:
            return
        self._paths.pop(name, None)
        if len(self._peft.peft_config) == 1:  # PEFT breaks when its last adapter is deleted: unwrap instead
            self._peft.unload()
            self._peft = None
        else:
            self._peft.delete_adapter(name)

    def forward_kwargs(self, names: Sequence[str]) -> dict[str, Any]:
        """Always name every row's adapter once PEFT is in: without it PEFT would apply the active adapter."""
        return {"adapter_names": list(names)} if self._peft is not None else {}

    def _load(self, name: str, path: Path, *, trainable: bool) -> None:
        if self._peft is None:
            self._peft = PeftModel.from_pretrained(
                self.loaded.model, str(path), adapter_name=name, is_trainable=trainable
            )
        else:
            self._peft.load_adapter(str(path), adapter_name=name, is_trainable=trainable)

    def _require_peft(self) -> PeftModel:
        if self._peft is None:
            raise RuntimeError("no adapter is loaded")
        return self._peft

    def _set_trainable(self, name: str | None) -> None:
        marker = f".{name}." if name else None
        for param_name, param in self.model.named_parameters():
            param.requires_grad_(marker is not None and "lora_" in param_name and marker in param_name)


def adapter_dir(model_id: str) -> Path:
    path = Path(model_id).expanduser().resolve()
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"unknown model id {model_id!r}: use {BASE_MODEL_ID!r} or a LoRA adapter directory "
            "(one holding adapter_config.json)"
        )
    return path


@dataclass
class _Row:
    """One request's state while it is being decoded."""

    index: int
    request: ChatRequest
    prompt: list[int]
    adapter: str
    max_tokens: int
    generator: torch.Generator | None  # None = greedy
    tokens: list[int] = field(default_factory=list)


def generate_chats(
    pool: AdapterPool,
    requests: Sequence[ChatRequest],
    *,
    batch_size: int = 32,
    on_result: ResultCallback | None = None,
) -> list[ChatResult]:
    """Answer every request; results come back in input order, `on_result` fires as each row finishes.

    Requests are sorted by prompt length before chunking so a batch holds similar lengths and little padding.
    """
    rows = [_make_row(pool, i, request) for i, request in enumerate(requests)]
    results: list[ChatResult | None] = [None] * len(rows)

    def finish(row: _Row, reason: str) -> None:
        result = _result(pool, row, reason)
        results[row.index] = result
        if on_result is not None:
            on_result(result)

    for row in rows:
        if row.max_tokens <= 0:
            finish(row, "length")
    pending = sorted((r for r in rows if r.max_tokens > 0), key=lambda r: len(r.prompt))
    pool.model.eval()
    with torch.inference_mode():
        for start in range(0, len(pending), max(1, batch_size)):
            _decode_batch(pool, pending[start : start + batch_size], finish)
    return [r for r in results if r is not None]


def _make_row(pool: AdapterPool, index: int, request: ChatRequest) -> _Row:
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
    return _Row(
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


def _decode_batch(pool: AdapterPool, rows: list[_Row], finish: Callable[[_Row, str], None]) -> None:
    """Prefill the left-padded batch, then one token per step, shrinking the batch as rows finish."""
    device = pool.loaded.device
    stop_ids = _stop_ids(pool)
    input_ids, mask = _left_pad([r.prompt for r in rows], _pad_id(pool), device)
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
    rows: list[_Row],
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


def _choose(rows: list[_Row], logits: torch.Tensor) -> list[int]:
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


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


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


def _result(pool: AdapterPool, row: _Row, reason: str) -> ChatResult:
    """Completion tokens include the stop token: it was computed, and hosted APIs bill it too."""
    body = row.tokens[:-1] if reason == "stop" else row.tokens
    text = str(pool.loaded.tokenizer.decode(body, skip_special_tokens=True))
    usage = Usage(prompt_tokens=len(row.prompt), completion_tokens=len(row.tokens))
    return ChatResult(key=row.request.key, text=text, finish_reason=reason, usage=usage)
