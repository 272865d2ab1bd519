"""What the vLLM server is given to serve for a model spec.

vLLM cannot read the bundled GGUF, but the local backend already dequantizes it once into a safetensors cache
(`local_model`), which vLLM serves. A checkpoint whose config.json still carries a gguf `quantization_config`
would make vLLM look for GGUF weights, so such a folder is served through a copy of its own: every file a link
to the original, config.json rewritten without that entry. The original is never touched (the local backend and
the trainer keep reading it as it is).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.local_model import BUNDLED_ALIASES, bundled_gguf, gguf_cache_dir

CONFIG = "config.json"


def served_model(spec: str, workdir: Path, make_cache: Callable[[], object]) -> str:
    """The folder (or cached Hugging Face id) the server should load for `spec`; `make_cache` writes the
    local backend's safetensors cache of a GGUF when it is not there yet."""
    if spec.lower() in BUNDLED_ALIASES or spec.endswith(".gguf"):
        gguf = bundled_gguf() if spec.lower() in BUNDLED_ALIASES else Path(spec).expanduser().resolve()
        folder = gguf_cache_dir(gguf)
        if not (folder / CONFIG).is_file():
            make_cache()
        return str(servable(folder, workdir / "vllm-model"))
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(servable(path.resolve(), workdir / "vllm-model"))
    return spec  # a Hugging Face id, read from the local cache by the server (offline)


def gguf_quantized(config: dict[str, Any]) -> bool:
    quantization = config.get("quantization_config")
    return isinstance(quantization, dict) and str(quantization.get("quant_method", "")).lower() == "gguf"


def servable(folder: Path, copies: Path) -> Path:
    """`folder` itself, or (when its config names gguf quantization) a linked copy without that entry."""
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    if not gguf_quantized(config):
        return folder
    del config["quantization_config"]
    target = copies / folder.name
    text = json.dumps(config, indent=2, sort_keys=True)
    if (target / CONFIG).is_file() and (target / CONFIG).read_text(encoding="utf-8") == text:
        return target
    copies.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=copies))
    try:
        for item in folder.iterdir():
            if item.name != CONFIG:
                (tmp / item.name).symlink_to(item.resolve())
        (tmp / CONFIG).write_text(text, encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
