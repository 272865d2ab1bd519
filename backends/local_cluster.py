"""The local backend with its finetunes as Ray tasks: an iteration's 2N jobs train side by side on a cluster.

Each task builds a plain `LocalBackend` on its worker (the run's model, device and dtype; the shared storage as
its work folder) and runs the very job the in-process path runs: the same staging dir renamed into place, the
same job.json. So the driver polls, reports and resumes a cluster job as it does a local one, from the files.
The task's ObjectRef adds only what a file cannot say: that the worker died (OOM, a lost node) before it could
record a failure.

A driver killed mid-iteration takes its tasks with it (Ray ends a dead driver's tasks), leaving job rows that
have a provider job id and job.json files that say queued or running. Polled by the next driver, such a job is
not one of its tasks: it is submitted again from the spec its record holds (an event says so), while a finished
adapter is never trained again.

Ray is imported here only, and only once a cluster is asked for (`[cluster] address`); the registry names this
class for the local backend, and without an address it builds the plain in-process `LocalBackend`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict

from backends.base import (
    TERMINAL_STATUSES,
    ChatRequest,
    ChatResult,
    FinetuneSpec,
    JobEvent,
    JobRef,
    JobState,
    ResultCallback,
)
from backends.cluster_settings import ClusterConfig
from backends.local import LocalBackend, _append_event, _new_record, _read_job, _write_job, provider_job_id
from backends.local_cluster_chat import ChatWorkers, ChatWorkerSetup
from backends.local_model import resolve_device
from backends.local_settings import LocalConfig
from backends.settings import BackendSetup
from foundation.errors import UserError

RAY_MISSING = "[cluster] needs Ray: pip install 'maft-orchestrator[cluster]'"
INPUTS = "inputs"  # the storage folder the jobs' data files are copied to when they are not on it already


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


class WorkerSetup(BaseModel):
    """What each task rebuilds the backend from on its worker: small (no model in it), pickled to every task."""

    model_config = ConfigDict(frozen=True)

    model: str
    workdir: Path  # the shared storage folder of the run: adapters, job records, input copies
    device: str
    dtype: str
    threads: int  # torch's intra-op threads: the CPUs the task asked for


def train_on_worker(setup: WorkerSetup, spec_json: str) -> str:
    """A Ray task's body: one finetune, recorded in job.json as in-process training records it."""
    import torch

    torch.set_num_threads(setup.threads)
    spec = FinetuneSpec.model_validate_json(spec_json)
    backend = LocalBackend(setup.model, workdir=setup.workdir, device=setup.device, dtype=setup.dtype,
                           show_progress=False)
    try:
        backend._run_job(spec)
        return str(backend.poll(JobRef(key=spec.key, provider_job_id=provider_job_id(spec.key))).status)
    finally:
        backend.close()


class _Task(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    ref: Any  # ray.ObjectRef
    spec: FinetuneSpec


class RayLocalBackend(LocalBackend):
    """`LocalBackend` whose `start_finetune` submits a Ray task and returns at once; chat too runs on Ray actors
    when `[cluster] generation_workers` asks for them (`local_cluster_chat`), scoring stays here.

    No job limit (`describe().max_concurrent_jobs` is None): all 2N are submitted and Ray queues what does not fit
    the cluster's CPUs and GPUs. `poll` is called from the job poller's threads, hence the lock."""

    cluster: ClusterConfig

    @classmethod
    def from_setup(cls, setup: BackendSetup[LocalConfig]) -> LocalBackend:
        """The in-process backend unless `[cluster] address` is set; Ray must then be installed (said now, before
        anything is spent), and the cluster is reached only when a finetune needs it (`check_server`)."""
        if not setup.cluster.enabled:
            return LocalBackend.from_setup(setup)
        import_ray()
        backend = super().from_setup(setup)
        if not isinstance(backend, RayLocalBackend):
            raise TypeError(f"{cls.__name__}.from_setup built {type(backend).__name__}")
        backend.attach(setup.cluster)
        return backend

    def attach(self, cluster: ClusterConfig) -> None:
        """Finetune on `cluster` from now on; its storage (when set) holds the adapters instead of the work folder.
        A folder per run work folder, named after it, so runs of other projects on the same storage never meet."""
        self.cluster = cluster
        if cluster.storage is not None:
            digest = hashlib.sha256(str(self.workdir.resolve()).encode()).hexdigest()[:8]
            self.workdir = (Path(cluster.storage).expanduser() / f"{self.workdir.name}-{digest}").resolve()
        self._ray: ModuleType | None = None
        self._started_ray = False  # whether this process started the Ray it uses (so it also shuts it down)
        self._remote: Any = None
        self._tasks: dict[str, _Task] = {}  # key -> the task this driver submitted for it, until it ended
        self._generation: ChatWorkers | None = None  # the generation actors' driver side, once a chat needs them
        self._lock = threading.RLock()

    # -- Backend protocol -----------------------------------------------------------------------------------

    def check_server(self, *, finetuning: bool) -> None:
        """ChecksServer: reach the cluster (or start the local one) before the run spends anything."""
        if finetuning or self.cluster.generation_workers:
            self._connect()

    def chat(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        """On the generation actors when `[cluster] generation_workers` asks for them (started on the first call,
        kept until a finetune needs their CPUs and GPUs or the backend closes), else in this process."""
        if not self.cluster.generation_workers:
            return super().chat(requests, on_result)
        ray = self._connect()
        with self._lock:
            if self._generation is None:
                setup = self._worker()
                self._generation = ChatWorkers(
                    ray, ChatWorkerSetup(model=setup.model, workdir=setup.workdir, device=setup.device,
                                         dtype=setup.dtype, batch_size=self.batch_size, threads=setup.threads),
                    workers=self.cluster.generation_workers, cpus=self.cluster.cpus_per_job, gpus=self._gpus())
            generation = self._generation
        return generation.chat(requests, on_result)

    def start_finetune(self, spec: FinetuneSpec) -> JobRef:
        """Submit the job unless its key already succeeded or is running as a task of this driver."""
        ref = JobRef(key=spec.key, provider_job_id=provider_job_id(spec.key))
        with self._lock:
            if spec.key not in self._tasks and not self._succeeded(spec.key):
                self._submit(spec, "queued on the Ray cluster")
        return ref

    def poll(self, job: JobRef) -> JobState:
        with self._lock:
            note = self._watch(job.key)
            running = job.key in self._tasks
        # no record while a task of ours runs: between the worker's fresh staging dir and its first record
        state = JobState(status="queued") if not self._job_record(job.key) and running else super().poll(job)
        if running and state.status == "succeeded" and not self._succeeded(job.key):
            # recorded in its staging dir, not yet renamed into place: its model id would name nothing yet
            state = state.model_copy(update={"status": "running", "model_id": None})
        if note is not None and note not in state.events:  # the worker's fresh job.json may not hold it
            state.events.insert(0, note)
        return state

    def cancel(self, job: JobRef) -> None:
        with self._lock:
            task = self._tasks.pop(job.key, None)
        if task is not None and self._ray is not None:
            self._ray.cancel(task.ref, force=True)
        super().cancel(job)

    def close(self) -> None:
        """Stop this driver's tasks (a resumed run submits them again), its generation actors, and the Ray this
        process started."""
        with self._lock:
            tasks, self._tasks = list(self._tasks.values()), {}
            ray = self._ray
            self._stop_generation()
            if ray is not None:
                for task in tasks:
                    ray.cancel(task.ref, force=True)
                if self._started_ray:
                    ray.shutdown()
                self._ray, self._remote, self._started_ray = None, None, False
        super().close()

    # -- the cluster ----------------------------------------------------------------------------------------

    def _connect(self) -> ModuleType:
        """Join the cluster `[cluster] address` names, or start one in this process for "local"; a process already
        connected (a test's cluster) keeps its connection. Ray's own SIGTERM handler is taken off again: stopping
        at a safe point on SIGTERM is ours to do (`orchestrator.interrupts`)."""
        with self._lock:
            if self._ray is not None:
                return self._ray
            ray = import_ray()
            if not ray.is_initialized():
                main = threading.current_thread() is threading.main_thread()
                handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
                address = self.cluster.address
                options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
                if address == "local":
                    options.update(num_cpus=self.cluster.num_cpus, num_gpus=self.cluster.num_gpus,
                                   include_dashboard=False)
                else:
                    options.update(address=address)
                try:
                    ray.init(**options)
                except Exception as exc:  # ConnectionError, a version mismatch, a bad ray:// server
                    raise UserError(f"cannot reach the Ray cluster at [cluster] address = {address!r} "
                                    f"({_first_line(exc)}): start it with `ray start --head`, or fix the "
                                    "address") from None
                finally:
                    for sig, handler in handlers.items():
                        signal.signal(sig, handler)
                self._started_ray = True
            try:
                self._check_resources(ray.cluster_resources())
            except UserError:
                if self._started_ray:
                    ray.shutdown()
                    self._started_ray = False
                raise
            self._remote = ray.remote(max_retries=0)(train_on_worker)  # a died worker is a failed job, not a rerun
            self._ray = ray
            return ray

    def _stop_generation(self) -> None:
        with self._lock:
            generation, self._generation = self._generation, None
        if generation is not None:
            generation.close()

    def _check_resources(self, resources: dict[str, float]) -> None:
        """A task that asks for more than the whole cluster has waits forever, silently: refuse it now; so is the
        last of K generation actors that together ask more."""
        workers = self.cluster.generation_workers
        for name, key, wanted in (("CPUs", "CPU", self.cluster.cpus_per_job), ("GPUs", "GPU", self._gpus())):
            have = resources.get(key, 0)
            if wanted > have:
                raise UserError(f"[cluster] asks {wanted:g} {name} per job but the Ray cluster has "
                                f"{have:g}: lower {key.lower()}s_per_job, or add nodes that have them")
            if workers * wanted > have:
                raise UserError(f"[cluster] generation_workers = {workers} ask {workers * wanted:g} {name} "
                                f"({wanted:g} each, as a job) but the Ray cluster has {have:g}: lower "
                                f"generation_workers or {key.lower()}s_per_job, or add nodes")

    def _worker(self) -> WorkerSetup:
        gpus = self._gpus()
        device = "cpu" if gpus == 0 and self.device == "auto" else self.device
        return WorkerSetup(model=self.model, workdir=self.workdir, device=device, dtype=self.dtype,
                           threads=self.cluster.cpus_per_job)

    def _gpus(self) -> float:
        device, _, _ = resolve_device(self.device, self.dtype)
        return self.cluster.gpus(device.type)

    def _submit(self, spec: FinetuneSpec, message: str, level: str = "info") -> JobEvent:
        """Record the job as queued in its staging dir (so a later driver can submit it again from its spec), then
        hand it to Ray; the event it recorded. The worker's `_run_job` starts that dir afresh. The generation
        actors go first: their CPUs and GPUs are the jobs' now (kept, they could leave a job waiting forever), and
        the society they held changes with these jobs anyway."""
        self._connect()
        self._stop_generation()
        spec = self._shared_inputs(spec)
        staging = self.staging_path(spec.key)
        staging.mkdir(parents=True, exist_ok=True)
        record = _new_record(spec)
        record["status"] = "queued"
        _append_event(record, message, level)
        _write_job(staging, record)
        ref = self._remote.options(num_cpus=self.cluster.cpus_per_job, num_gpus=self._gpus()).remote(
            self._worker(), spec.model_dump_json())
        self._tasks[spec.key] = _Task(ref=ref, spec=spec)
        return JobEvent.model_validate(record["events"][-1])

    def _watch(self, key: str) -> JobEvent | None:
        """What the files cannot say yet: a task of ours that ended by raising is a failed job; a job no task of
        ours runs, unfinished in its staging dir, is submitted again. The event of a resubmission, else None."""
        task = self._tasks.get(key)
        if task is not None:
            ray = self._connect()
            done, _ = ray.wait([task.ref], timeout=0)
            if done:
                del self._tasks[key]
                try:
                    ray.get(task.ref)
                except Exception as exc:  # the worker died, ran out of memory, or the job could not begin
                    self._record_failure(task.spec, exc)
            return None
        if self._succeeded(key):
            return None
        staging = self.staging_path(key)
        record = _read_job(staging)
        if record.get("status") == "succeeded":  # saved and recorded, its worker killed before the rename
            final = self.adapter_path(key)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            return None
        if not record or record.get("status") in TERMINAL_STATUSES or not isinstance(record.get("spec"), dict):
            return None
        message = "submitted again: the driver that started it is gone, and its Ray task with it"
        return self._submit(FinetuneSpec.model_validate(record["spec"]), message, "warning")

    def _record_failure(self, spec: FinetuneSpec, exc: BaseException) -> None:
        """Write a raised task's error into its job record, unless the job ended on its own terms first."""
        if self._succeeded(spec.key):
            return
        staging = self.staging_path(spec.key)
        record = _read_job(staging) or _new_record(spec)
        if record.get("status") in TERMINAL_STATUSES:
            return
        cause = getattr(exc, "cause", None) or exc  # a RayTaskError wraps what the task raised
        error = str(cause) if isinstance(cause, UserError) else f"the Ray task failed: {_first_line(cause)}"
        record.update(status="failed", error=error, finished_at=time.time())
        _append_event(record, f"failed: {error}", "error")
        staging.mkdir(parents=True, exist_ok=True)
        _write_job(staging, record)

    def _succeeded(self, key: str) -> bool:
        return _read_job(self.adapter_path(key)).get("status") == "succeeded"

    def _shared_inputs(self, spec: FinetuneSpec) -> FinetuneSpec:
        """The spec with its data files on the storage every worker sees: a file elsewhere is copied there, named
        by its content (the same data twice is one copy), and the spec points at the copy."""
        update: dict[str, Path] = {}
        for field in ("training_file", "preference_file"):
            path: Path | None = getattr(spec, field)
            if path is None or Path(path).resolve().is_relative_to(self.workdir):
                continue
            data = Path(path).read_bytes()
            copy = self.workdir / INPUTS / f"{hashlib.sha256(data).hexdigest()[:16]}-{Path(path).name}"
            if not copy.is_file():
                copy.parent.mkdir(parents=True, exist_ok=True)
                tmp = copy.with_name(f".{copy.name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, copy)
            update[field] = copy
        return spec.model_copy(update=update) if update else spec


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
