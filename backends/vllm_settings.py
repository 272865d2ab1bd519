"""The vllm backend's settings (`[vllm]`): light, so reading a config never imports torch or vLLM.

Where the server is, how it is started and how hard it is driven are operational (a resume may change them);
what changes the answers (the dtype, the server's seed, whether each request's seed is sent) is the run's
identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from backends.settings import BackendSettings, operational

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = REPO / ".venv-vllm" / "bin" / "python"  # made by scripts/setup-vllm
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts


class VLLMConfig(BackendSettings):
    """Settings only the vllm backend reads. Chat goes through the hosted chat code (the OpenAI SDK's async
    client, `concurrency` requests in flight, retries); finetuning is the local backend's PEFT trainer."""

    # Start a server in its own virtual environment (`python`), unless `base_url` names one you run.
    start: bool = operational(True)
    base_url: str | None = operational(None)  # e.g. http://127.0.0.1:8000 (with or without /v1): no server started
    python: str | None = operational(None)  # the vLLM venv's python; None: .venv-vllm/bin/python in the repository
    host: str = operational("127.0.0.1")
    port: int = operational(0, ge=0, le=65535)  # 0: a free port
    # LoRA slots: a run's society is 2N adapters (a generator and a critic per agent), checked before it starts;
    # past max_loras vLLM would silently evict adapters
    max_loras: int = operational(8, ge=1, le=512)
    max_lora_rank: int = operational(16, ge=1)  # at least [training] lora_rank; one of LORA_RANKS
    # One GPU for both: the server takes this share of its memory at start and the trainer (in this process)
    # uses the rest; on CPU the KV cache is `cpu_kv_cache_gib` instead
    gpu_memory_utilization: float = operational(0.45, gt=0.0, le=1.0)
    cpu_kv_cache_gib: float = operational(2.0, gt=0.0)  # VLLM_CPU_KVCACHE_SPACE, CPU builds only
    max_model_len: int | None = operational(None, ge=16)  # None: the model's own context length
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the served weights' (vLLM's --dtype)
    seed: int = 0  # the server's global sampling seed
    # send: each request's seed (vLLM's CPU build 0.32.0 takes them through the server too: sampled answers were
    # the same, batched and in another order, 2026-12-03); drop: none, the server's global `seed` alone, so a sampled
    # answer depends on the order the server takes requests in (for a server that refuses per-request seeds)
    request_seeds: Literal["send", "drop"] = "send"
    server_args: list[str] = operational(default_factory=list)  # more `vllm serve` flags, e.g. ["--enforce-eager"]
    startup_timeout: float = operational(900.0, gt=0)  # seconds the server may take to answer /health
    concurrency: int = operational(64, ge=1, le=4096)
    max_retries: int = operational(6, ge=0, le=50)
    give_up_after: float = operational(900.0, gt=0)
    backoff_initial: float = operational(1.0, gt=0)
    backoff_max: float = operational(30.0, gt=0)
    timeout: float = operational(600.0, gt=0)  # one chat request; a CPU server answers a full batch slowly
    extra_env: dict[str, str] = operational(default_factory=dict)  # for the server process

    def problem(self) -> str | None:
        if not self.start and self.base_url is None:
            return "[vllm] start = false needs [vllm] base_url (the server you run), or set start = true"
        if self.max_lora_rank not in LORA_RANKS:
            allowed = ", ".join(map(str, LORA_RANKS))
            return f"[vllm] max_lora_rank must be one of vLLM's ranks ({allowed}), got {self.max_lora_rank}"
        return None

    def python_path(self) -> Path:
        return Path(self.python).expanduser() if self.python else DEFAULT_PYTHON
