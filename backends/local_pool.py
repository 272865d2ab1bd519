"""The local backend's pool: the one base model in memory and the LoRA adapters loaded onto it by path.

Generation (`local_generate`, `local_static`), scoring and training all go through it, so it sits below them.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from backends.base import BASE_MODEL_ID
from backends.local_lora import Master
from backends.local_model import LoadedModel
from backends.local_precision import GenerationWeights
from foundation.errors import UserError

PEFT_BASE_ROW = "__base__"  # PEFT's reserved name for "no adapter on this row"


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
        with warnings.catch_warnings():
            # PEFT 0.21 calls transformers' deprecated `is_gradient_checkpointing`: noise, not the user's to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
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
