"""The vllm backend: debates and evaluations served by vLLM with every agent's LoRA adapter mixed in its
batches, finetuning by our own PEFT LoRA trainer.

A backend of its own, not a `[local] engine` switch: a backend is already the unit that owns a settings section,
a place in the run's identity and its capabilities in the registry, and this one has settings (the server, its
LoRA slots, its seeds) that mean nothing to the in-process engine.

It is assembled from parts that exist:
- chat: the hosted chat code (`OpenAIBackend` pointed at the server's OpenAI-compatible API: concurrency,
  retries, every answer handed over as it arrives), with each request's model mapped to a served name;
- finetuning, job records and scoring: a `LocalBackend` in this process (the same trainer, the same
  stage-then-rename adapter folders and job.json records, so resume and idempotency are the local backend's);
- the server (`vllm_server`), started in its own virtual environment or one the user runs (`[vllm] base_url`),
  the model it serves (`vllm_model`) and the adapters it holds (`vllm_adapters`).

A finetuned agent's model id is its adapter folder, as on the local backend. Before a chat call the adapters it
names are loaded under names derived from their path and content (never one name for two sets of weights), and
when finetuning starts the adapters loaded so far are unloaded: they served the debates of an iteration that is
finished (one asked for again later is loaded again, under the same name, since its files are the same).

One GPU for both: the server takes `[vllm] gpu_memory_utilization` of the GPU's memory when it starts (0.45 by
default) and the trainer, in this process, the rest; the server is not put to sleep.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from backends.base import (
    BASE_MODEL_ID,
    BackendInfo,
    BackendState,
    ChatRequest,
    ChatResult,
    FinetuneSpec,
    JobRef,
    JobState,
    ResultCallback,
    ScoreRequest,
    TrainingParams,
)
from backends.local import LocalBackend
from backends.local_pool import adapter_dir
from backends.openai import OpenAIBackend
from backends.openai_settings import OpenAIConfig
from backends.settings import BackendSetup
from backends.vllm_adapters import AdapterSlots
from backends.vllm_model import served_model
from backends.vllm_server import ServerError, VLLMAdmin, VLLMServer, launch_for, quoted, require_python
from backends.vllm_settings import LORA_RANKS, VLLMConfig
from foundation.errors import UserError

SERVER_LOG = "vllm-server.log"


def rank_problem(settings: VLLMConfig, lora_rank: int) -> str | None:
    """What makes `[vllm] max_lora_rank` too small for adapters of rank `lora_rank`; None when it fits."""
    if lora_rank <= settings.max_lora_rank:
        return None
    fits = next((r for r in LORA_RANKS if r >= lora_rank), None)
    fix = (f"set [vllm] max_lora_rank = {fits}" if fits is not None
           else f"lower [training] lora_rank to {LORA_RANKS[-1]}")
    return f"[training] lora_rank {lora_rank} is above [vllm] max_lora_rank {settings.max_lora_rank}: {fix}"


def society_problem(settings: VLLMConfig, agents: int, lora_rank: int) -> str | None:
    """What makes the server's LoRA settings too small for a society of `agents` agents (2N adapters: a generator
    and a critic each) trained at `lora_rank`; None when they fit."""
    if (problem := rank_problem(settings, lora_rank)) is not None:
        return problem
    if 2 * agents > settings.max_loras:
        return (f"{agents} agents are {2 * agents} LoRA adapters but [vllm] max_loras is {settings.max_loras} "
                f"(past it vLLM evicts adapters silently): set [vllm] max_loras = {2 * agents} or more")
    return None


class VLLMBackend:
    """Chat through a vLLM server, finetuning in this process. Building one starts nothing: the server starts
    at `check_server` (before a run is recorded) or at the first chat, whichever comes first."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        settings: VLLMConfig,
        state: BackendState,
        *,
        workdir: Path,
        training: TrainingParams | None = None,
        show_progress: bool = True,
        trainer: LocalBackend | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.state = state
        self.workdir = Path(workdir)
        self.training = training or TrainingParams()
        self.show_progress = show_progress
        self.trainer = trainer or LocalBackend(model, workdir=self.workdir, show_progress=show_progress,
                                               training_epochs=self.training.epochs)
        self._lock = threading.RLock()
        self._server: VLLMServer | None = None
        self._admin: VLLMAdmin | None = None
        self._slots: AdapterSlots | None = None
        self._chat: OpenAIBackend | None = None

    @classmethod
    def from_setup(cls, setup: BackendSetup[VLLMConfig]) -> VLLMBackend:
        return cls(setup.model, setup.settings, setup.state, workdir=setup.workdir, training=setup.training,
                   show_progress=setup.show_progress)

    # -- Backend protocol -----------------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        """Needs no server (a dry run describes without starting one)."""
        return BackendInfo(
            name=self.name,
            base_model=self.model,
            device=None if self.settings.base_url else ("cuda" if torch.cuda.is_available() else "cpu"),
            supports_finetuning=True,
            supports_batch=False,
            pricing_source="local compute: no per-token price",
            billed=False,
            training_epochs=self.training.epochs,
            objectives=("sft", "dpo", "sft-then-dpo"),  # the local backend's trainer, in this process
        )

    def check_server(self, *, finetuning: bool) -> None:
        """ChecksServer: the LoRA rank fits the server's slots, the server is up (started now if it is ours)
        and serves the model. Said before anything is recorded, as one line."""
        if finetuning and (problem := rank_problem(self.settings, self.training.lora_rank)) is not None:
            raise UserError(problem)
        admin = self.admin
        served = admin.models()
        if self.model not in served:
            raise UserError(f"the vLLM server at {admin.root} does not serve {self.model} (it serves "
                            f"{', '.join(served) or 'nothing'}): serve it under that name "
                            f"(--served-model-name {self.model}) or pass --model with the name it serves")

    def check_society(self, agents: int) -> None:
        """The society's 2N adapters fit `[vllm] max_loras` and its LoRA rank `max_lora_rank` (a UserError
        naming the setting to change)."""
        if (problem := society_problem(self.settings, agents, self.training.lora_rank)) is not None:
            raise UserError(problem)

    def chat(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        if not requests:
            return []
        _ = self.admin  # the server, started now if it is ours and not up yet
        assert self._slots is not None and self._chat is not None
        folders = {r.model: adapter_dir(r.model) for r in requests if not self._is_base(r.model)}
        with self._lock:
            names = self._slots.ensure(folders.values())
        served = {model: names[folder] for model, folder in folders.items()}
        keep_seed = self._sends_seeds()
        sent = [r.model_copy(update={"model": served.get(r.model, BASE_MODEL_ID),
                                     "seed": r.seed if keep_seed else None}) for r in requests]
        return self._chat.chat(sent, on_result)

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        """SupportsScoring, in this process by the local backend's scorer (vLLM's API scores no given reply)."""
        return self.trainer.score(requests)

    def start_finetune(self, spec: FinetuneSpec) -> JobRef:
        """The local backend's trainer; the adapters loaded so far served an iteration now finished."""
        with self._lock:
            if self._slots is not None:
                self._slots.unload_all()
        return self.trainer.start_finetune(spec)

    def poll(self, job: JobRef) -> JobState:
        return self.trainer.poll(job)

    def cancel(self, job: JobRef) -> None:
        self.trainer.cancel(job)

    def close(self) -> None:
        """Stop the server if it is ours; on a server the user runs, unload what we loaded."""
        with self._lock:
            if self._chat is not None:
                self._chat.close()
            if self._server is not None:
                self._server.stop()
            elif self._slots is not None:
                with contextlib.suppress(OSError, ServerError, UserError):  # a server gone away holds nothing
                    self._slots.unload_all()
            self._server = self._admin = self._slots = self._chat = None
        self.trainer.close()

    # -- the server -----------------------------------------------------------------------------------------

    @property
    def admin(self) -> VLLMAdmin:
        """The server, started on first use when it is ours."""
        with self._lock:
            if self._admin is None:
                self._admin = self._connect() if self.settings.base_url else self._start()
                self._slots = AdapterSlots(self._admin, self.settings.max_loras)
                self._chat = OpenAIBackend(self.model, self._chat_settings(self._admin.openai_base_url), self.state,
                                           show_progress=self.show_progress, environ={}, dotenv=Path(os.devnull))
            return self._admin

    @property
    def server(self) -> VLLMServer | None:
        """The server process we started (None: none yet, or the user's)."""
        return self._server

    @property
    def slots(self) -> AdapterSlots | None:
        return self._slots

    def _connect(self) -> VLLMAdmin:
        assert self.settings.base_url is not None
        admin = VLLMAdmin(self.settings.base_url)
        if not admin.healthy():
            raise UserError(f"no vLLM server answers at {admin.root}/health: start it (with --enable-lora and "
                            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1), or fix [vllm] base_url, or drop it to let the "
                            "tool start one")
        return admin

    def _start(self) -> VLLMAdmin:
        require_python(self.settings)  # before the model cache is made (a first load dequantizes the GGUF)
        source = served_model(self.model, self.workdir, make_cache=lambda: self.trainer.pool.loaded)
        launch = launch_for(self.settings, source, self.model, self.workdir / SERVER_LOG,
                            cpu=not torch.cuda.is_available())
        self._log(f"starting vLLM: {quoted(launch.command)}")
        server = VLLMServer(launch)
        server.start(self.settings.startup_timeout)
        self._server = server
        self._log(f"vLLM serves {self.model} at {launch.root} (ready in {server.started_in or 0:.0f} s; log "
                  f"{launch.log})")
        return server.admin

    def _chat_settings(self, base_url: str) -> OpenAIConfig:
        s = self.settings
        return OpenAIConfig(base_url=base_url, concurrency=s.concurrency, max_retries=s.max_retries,
                            give_up_after=s.give_up_after, backoff_initial=s.backoff_initial,
                            backoff_max=s.backoff_max, timeout=s.timeout, billed=False)

    def _sends_seeds(self) -> bool:
        """Per-request seeds unless `[vllm] request_seeds = "drop"` (then only the server's global `--seed`)."""
        return self.settings.request_seeds == "send"

    def _is_base(self, model_id: str) -> bool:
        return model_id in (BASE_MODEL_ID, self.model)

    def _log(self, message: str) -> None:
        if self.show_progress:
            print(message, file=sys.stderr, flush=True)
