"""The local backend: the run's base model in this process, every agent a LoRA adapter directory (and a student
distilled into another model: that model loaded beside it, its adapters onto it).

Finetuning runs synchronously inside `start_finetune`, but its record looks like a hosted job's (`job.json`:
status, events, loss, trained tokens), so the pipeline polls local and hosted jobs the same way and a resumed
run finds a finished adapter by its key instead of training it again.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from backends.base import (
    BASE_MODEL_ID,
    TERMINAL_STATUSES,
    BackendInfo,
    ChatRequest,
    ChatResult,
    FinetuneSpec,
    JobEvent,
    JobRef,
    JobState,
    ResultCallback,
    ScoreRequest,
)
from backends.local_dpo import train_adapter
from backends.local_generate import generate_chats
from backends.local_model import load_model, names_a_model, resolve_device
from backends.local_pool import AdapterPool, adapter_dir, adapter_name_for
from backends.local_score import score_requests
from backends.local_settings import DEFAULT_MODEL, LocalConfig
from backends.local_soup import soup_adapter
from backends.local_train import train_lora
from backends.settings import BackendSetup
from foundation.crashpoints import crashpoint
from foundation.errors import UserError

JOB_FILE = "job.json"


class LocalBackend:
    """transformers + PEFT on this machine. The model loads on first use, so building one is free."""

    name = "local"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        workdir: Path,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        show_progress: bool = True,
        training_epochs: int = 1,
    ) -> None:
        """`training_epochs` only informs estimates (`describe`); each job's own spec says how it trains.
        `dtype` is generation's (`resolve_device`): training runs in the dtype the weights load in."""
        resolve_device(device, dtype)  # a bad device or dtype fails now, not after a long debate
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.training_epochs = training_epochs
        self.workdir = Path(workdir)
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.show_progress = show_progress
        self._pools: dict[str, AdapterPool] = {}  # base model spec -> its pool; the run's model first
        self._roots: dict[str, str] = {}  # model id -> the base model spec it sits on (`root_of`)

    @classmethod
    def from_setup(cls, setup: BackendSetup[LocalConfig]) -> LocalBackend:
        """As `create_backend` makes it for a run: its `[local]` settings, the run's work folder and epochs."""
        settings = setup.settings
        return cls(setup.model, workdir=setup.workdir, device=settings.device, dtype=settings.dtype,
                   batch_size=settings.batch_size, show_progress=setup.show_progress,
                   training_epochs=setup.training.epochs)

    # -- Backend protocol -----------------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        device, _, _ = resolve_device(self.device, self.dtype)
        return BackendInfo(
            name=self.name,
            base_model=self.model,
            device=device.type,
            supports_finetuning=True,
            supports_batch=False,
            pricing_source="local compute: no per-token price",
            training_epochs=self.training_epochs,
            objectives=("sft", "dpo", "sft-then-dpo"),  # our trainer's DPO + NLL, weighted per pair
            other_models=True,  # a student's base model is loaded beside the run's (`root_of`)
        )

    def chat(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        results: dict[int, ChatResult] = {}
        for root, indices in self._by_root([r.model for r in requests]).items():
            got = generate_chats(self.pool_of(root), [requests[i] for i in indices], batch_size=self.batch_size,
                                 on_result=on_result)
            results.update(zip(indices, got, strict=True))
        return [results[i] for i in range(len(requests))]

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        """SupportsScoring: mean NLL per token (nats) of each fixed reply under its request's model (base or
        adapter), all models in the same batches; see `local_score`."""
        scores: dict[int, float] = {}
        for root, indices in self._by_root([r.model for r in requests]).items():
            got = score_requests(self.pool_of(root), [requests[i] for i in indices], batch_size=self.batch_size)
            scores.update(zip(indices, got, strict=True))
        return [scores[i] for i in range(len(requests))]

    def start_finetune(self, spec: FinetuneSpec) -> JobRef:
        """Train now unless this key already succeeded; a failure is recorded in the job, not raised."""
        ref = JobRef(key=spec.key, provider_job_id=provider_job_id(spec.key))
        if _read_job(self.adapter_path(spec.key)).get("status") == "succeeded":
            return ref
        self._run_job(spec)
        return ref

    def poll(self, job: JobRef) -> JobState:
        record = self._job_record(job.key)
        if not record:
            return JobState(status="failed", error=f"no local job with key {job.key!r} in {self.workdir}")
        succeeded = record["status"] == "succeeded"
        return JobState(
            status=record["status"],
            model_id=str(self.adapter_path(job.key)) if succeeded else None,
            trained_tokens=record.get("trained_tokens"),
            train_loss=record.get("train_loss"),
            error=record.get("error"),
            events=[JobEvent.model_validate(e) for e in record.get("events", [])],
        )

    def cancel(self, job: JobRef) -> None:
        """Training is synchronous, so only a job left unfinished by a crash can be cancelled."""
        staging = self.staging_path(job.key)
        record = _read_job(staging)
        if record and record.get("status") not in TERMINAL_STATUSES:
            record["status"] = "cancelled"
            _append_event(record, "cancelled")
            _write_job(staging, record)

    def close(self) -> None:
        self._pools.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def average_adapters(self, adapters: Sequence[str], out: Path) -> str:
        """AveragesAdapters: the soup of `adapters` (`local_soup`), made on a fresh float32 copy of their base
        model on the CPU (the pool's own copy must not be wrapped by PEFT), loaded as the run loads its model."""
        if not adapters:
            raise ValueError("no adapters to average")
        root = self.root_of(adapters[0])
        return str(soup_adapter(lambda: load_model(root, "cpu", "float32").model, adapters, out))

    # -- paths and model ------------------------------------------------------------------------------------

    @property
    def pool(self) -> AdapterPool:
        """The run's base model and its adapters."""
        return self.pool_of(self.model)

    def pool_of(self, root: str) -> AdapterPool:
        """The pool of base model `root` (the run's, or a student's), loaded on first use: a student distilled
        into another model needs its own weights in memory, and its adapters load onto those."""
        if root not in self._pools:
            loaded = load_model(root, self.device, self.dtype)
            self._pools[root] = AdapterPool(loaded, base_ids=(BASE_MODEL_ID, root) if root == self.model else (root,))
        return self._pools[root]

    def root_of(self, model_id: str) -> str:
        """The base model a model id sits on: an adapter we trained says in its job record (`root_model`), any other
        adapter is taken to be the run's model's, and a model on disk (an untrained student) is its own; an id
        that is none of these goes to the run's pool, which says what is wrong with it."""
        if model_id in (BASE_MODEL_ID, self.model):
            return self.model
        if model_id not in self._roots:  # read once per id: every request of every chat call asks
            path = Path(model_id).expanduser()
            if (path / "adapter_config.json").is_file():
                spec = _read_job(path).get("spec")
                root = str(spec.get("root_model") or self.model) if isinstance(spec, dict) else self.model
            else:
                root = model_id if names_a_model(model_id) else self.model
            self._roots[model_id] = root
        return self._roots[model_id]

    def _by_root(self, models: Sequence[str]) -> dict[str, list[int]]:
        """The requests' positions grouped by the base model each runs on: one group, the run's model, except
        where a student distilled into another model answers."""
        groups: dict[str, list[int]] = {}
        for i, model in enumerate(models):
            groups.setdefault(self.root_of(model), []).append(i)
        return groups

    def adapter_path(self, key: str) -> Path:
        return (self.workdir / "adapters" / sanitize_key(key)).resolve()

    def staging_path(self, key: str) -> Path:
        final = self.adapter_path(key)
        return final.with_name(f".{final.name}.partial")

    # -- training -------------------------------------------------------------------------------------------

    def _job_record(self, key: str) -> dict[str, Any]:
        return _read_job(self.adapter_path(key)) or _read_job(self.staging_path(key))

    def _run_job(self, spec: FinetuneSpec) -> None:
        """Train in a staging dir and rename it into place only when everything is saved: a crash leaves a
        `.partial` dir whose job says running, never an adapter dir that looks finished."""
        root = spec.root_model or self.root_of(spec.base_model)
        if root != self.model:  # the job record says which model the adapter sits on (`root_of`)
            spec = spec.model_copy(update={"root_model": root})
        pool = self.pool_of(root)  # a model that cannot load is the user's to fix now, not a failed job
        final, staging = self.adapter_path(spec.key), self.staging_path(spec.key)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        record = _new_record(spec)

        def on_event(message: str, level: str = "info") -> None:
            _append_event(record, message, level)
            _write_job(staging, record)

        on_event("started")
        name = adapter_name_for(final)
        try:
            init_from = None if pool.is_base(spec.base_model) else adapter_dir(spec.base_model)
            if init_from is not None:
                on_event(f"continuing from adapter {init_from}")
            if spec.objective == "sft":  # what `train_adapter` would call too; tests stop a job at this seam
                outcome = train_lora(pool, spec, staging, adapter_name=name, init_from=init_from, on_event=on_event,
                                     show_progress=self.show_progress)
            else:
                outcome = train_adapter(pool, spec, staging, adapter_name=name, init_from=init_from,
                                        on_event=on_event, show_progress=self.show_progress,
                                        objective=spec.objective, preference_file=spec.preference_file,
                                        dpo=spec.dpo)
        except Exception as exc:  # the job records the failure; the pipeline reads it through poll()
            pool.forget(name)
            error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            record.update(status="failed", error=error, finished_at=time.time())
            on_event(f"failed: {error}", level="error")
            return
        crashpoint("local.adapter_saved")  # the adapter is saved in its staging dir, job.json says running
        record.update(
            status="succeeded",
            finished_at=time.time(),
            train_loss=outcome.train_loss,
            trained_tokens=outcome.trained_tokens,
            examples=outcome.examples,
            steps=outcome.steps,
            train_seconds=round(outcome.seconds, 3),
            seconds_per_step=round(outcome.seconds / max(1, outcome.steps), 4),
            tokens_per_second=round(outcome.trained_tokens / max(outcome.seconds, 1e-9), 1),
            step_losses=outcome.step_losses,
            objective=spec.objective,
            stats=outcome.stats,  # what the objective measured (DPO: pairs, margin, reward accuracy)
        )
        on_event(f"trained {outcome.trained_tokens} tokens in {outcome.seconds:.1f} s "
                 f"({record['tokens_per_second']:.0f} tokens/s)")
        on_event("succeeded")
        shutil.rmtree(final, ignore_errors=True)  # only ever a leftover without a succeeded job.json
        os.replace(staging, final)
        crashpoint("local.adapter_in_place")  # finished on disk; the store's job row does not know yet
        pool.register(name, final)


def provider_job_id(key: str) -> str:
    return f"local-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def sanitize_key(key: str) -> str:
    """A directory name from a job key; when characters had to be replaced a hash suffix keeps keys that
    differ only in those characters (`a/b` vs `a_b`) apart."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:100] or "job"
    return safe if safe == key else f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _new_record(spec: FinetuneSpec) -> dict[str, Any]:
    return {
        "key": spec.key,
        "provider_job_id": provider_job_id(spec.key),
        "status": "running",
        "created_at": time.time(),
        "finished_at": None,
        "pid": os.getpid(),
        "spec": json.loads(spec.model_dump_json()),
        "train_loss": None,
        "trained_tokens": None,
        "error": None,
        "events": [],
    }


def _append_event(record: dict[str, Any], message: str, level: str = "info") -> None:
    record["events"].append({"created_at": time.time(), "level": level, "message": message})


def _read_job(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_job(folder: Path, record: dict[str, Any]) -> None:
    """Write-then-rename so a reader never sees half a job.json."""
    tmp = folder / f".{JOB_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, folder / JOB_FILE)
