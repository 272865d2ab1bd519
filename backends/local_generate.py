"""Generation for the local backend: every row may use a different LoRA adapter of the same base model.

All agents of a society are adapters on one base model, so a debate stage (N agents x many problems) is one
queue of rows decoded by the refill engine (`local_engine`): the batch is topped up with waiting prompts as
rows finish, adapters are applied without PEFT in the loop (`local_lora`), and on a CPU with fast bfloat16
matmuls the base weights can run in bfloat16 (`local_precision`) while logits and sampling stay in float32.
This module holds what ties them together: the pool of adapters, the rows made from requests, the results.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from backends.base import BASE_MODEL_ID, ChatRequest, ChatResult, ResultCallback, Usage
from backends.local_engine import Finish, Row, decode
from backends.local_lora import Master, gathered_adapters, merged_adapter, unsupported_reason
from backends.local_model import LoadedModel
from backends.local_precision import GenerationWeights
from backends.local_static import decode_static
from backends.local_static import left_pad as _left_pad  # local_score pads its rows the same way
from backends.local_step import HFStep, full_attention_only
from foundation.errors import UserError

PEFT_BASE_ROW = "__base__"  # PEFT's reserved name for "no adapter on this row"
GREEDY_BELOW = 1e-5  # temperatures this small are greedy; dividing logits by them would overflow

__all__ = ["AdapterPool", "adapter_dir", "adapter_name_for", "generate_chats", "_left_pad"]


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
        low = loaded.generation_dtype != loaded.dtype
        self._weights = GenerationWeights(loaded.generation_dtype) if low else None

    @property
    def generation_dtype(self) -> torch.dtype:
        return self.loaded.generation_dtype

    @contextmanager
    def generation_weights(self) -> Iterator[Master | None]:
        """The base weights in the generation dtype for the block (a no-op when it is the loaded dtype)."""
        if self._weights is None:
            with nullcontext():
                yield None
            return
        with self._weights.active(self.loaded.model) as master:
            yield master

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
) -> list[ChatResult]:
    """Answer every request; results come back in input order, `on_result` fires as each row finishes.

    `engine="static"` is the earlier static-chunk decode through PEFT (`local_static`), also the fallback for
    models and adapters the refill engine does not cover. `adapters="merged"` decodes each adapter's rows on
    merged weights instead of one mixed batch.
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
        _decode_refill(pool, pending, finish, names, batch_size, adapters)
    return [r for r in results if r is not None]


def _decode_refill(
    pool: AdapterPool, rows: list[Row], finish: Finish, names: list[str], batch_size: int, adapters: AdapterMode
) -> None:
    """Rows in prompt-length order (identical prompts adjacent, so they are prefilled once), on the pool's
    generation weights, with the adapters gathered into one mixed batch or merged one adapter at a time."""
    model = pool.loaded.model
    queue = sorted(rows, key=lambda r: (len(r.prompt), r.adapter, r.prompt))
    stop_ids, pad_id = _stop_ids(pool), _pad_id(pool)
    with pool.generation_weights() as master, torch.inference_mode():
        if adapters == "gathered":
            with gathered_adapters(model, names, pool.generation_dtype) as row_adapters:
                step = HFStep(model, rows=row_adapters, master=master, base_row=PEFT_BASE_ROW)
                decode(step, queue, finish, slots=batch_size, stop_ids=stop_ids, pad_id=pad_id)
            return
        for name in [PEFT_BASE_ROW, *names]:
            group = [r for r in queue if r.adapter == name]
            if group:
                with merged_adapter(model, None if name == PEFT_BASE_ROW else name, master):
                    step = HFStep(model, rows=None, master=master, base_row=PEFT_BASE_ROW)
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
