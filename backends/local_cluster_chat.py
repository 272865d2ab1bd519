"""The local backend's generation sharded over Ray actors (`[cluster] generation_workers`).

Each actor holds a plain `LocalBackend` on its worker: the run's model, loaded once, and every adapter a request
names, loaded by its path on the shared storage the first time and kept, so a debate's society loads once per
actor rather than once per call. A chat call splits its requests into one shard per actor; each actor decodes its
whole shard in one refill queue (its backend's `chat` runs in a thread, so the engine keeps every row it was
given) and streams each answer back the moment its row finishes. The driver hands every answer to `on_result` in
the calling thread, since the debate's callback writes SQLite, so an answer is stored as it arrives, and a shard
lost with its actor leaves the answers already sent stored for the resume.

Exactness: each request carries its own seed, and in float32 a row's text does not depend on its batch mates, so
a sharded call answers what the in-process one answers (bfloat16 rounding would break this, as it breaks batch
independence in-process).

Ray is passed in by `backends.local_cluster`, the only module that imports it; this one holds no Ray import, and
the actor class is plain until `ChatWorkers` wraps it with `ray.remote`.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from backends.base import ChatRequest, ChatResult, ResultCallback
from backends.local import LocalBackend
from foundation.errors import RunStopped, UserError

_POLL_SECONDS = 0.5  # how often the driver's wait for the next answer lets a signal handler run


class ChatWorkerSetup(BaseModel):
    """What each actor builds its backend from: small, sent once when the actor starts."""

    model_config = ConfigDict(frozen=True)

    model: str
    workdir: Path  # the run's shared storage: adapters are model ids that are paths in it
    device: str
    dtype: str
    batch_size: int
    threads: int  # torch's intra-op threads: the CPUs the actor asked for


class ChatWorker:
    """The body of one generation actor (wrapped by `ray.remote` in `ChatWorkers`; plain here, so importing this
    module needs no Ray)."""

    def __init__(self, index: int, setup: ChatWorkerSetup) -> None:
        import torch

        torch.set_num_threads(setup.threads)
        self.index = index
        self.calls = 0
        self.backend = LocalBackend(setup.model, workdir=setup.workdir, device=setup.device, dtype=setup.dtype,
                                    batch_size=setup.batch_size, show_progress=False)

    def ready(self) -> int:
        """Its process id, once it runs: the driver waits for it, so a worker that cannot start says so at once."""
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        """What the tests check reuse by: the process, the calls it served, the adapters it holds."""
        return {"pid": os.getpid(), "calls": self.calls,
                "adapters": sorted(str(p) for pool in self.backend._pools.values() for p in pool._paths.values())}

    def chat(self, requests_json: list[str]) -> Iterator[str]:
        """A streaming generator: each answer of the shard, as JSON, the moment its row finishes. The backend runs
        in a thread because `on_result` cannot yield; a queue carries its answers here."""
        self.calls += 1
        requests = [ChatRequest.model_validate_json(r) for r in requests_json]
        answers: queue.Queue[tuple[Literal["result", "error", "done"], Any]] = queue.Queue()

        def run() -> None:
            try:
                self.backend.chat(requests, on_result=lambda r: answers.put(("result", r.model_dump_json())))
                answers.put(("done", None))
            except BaseException as exc:  # raised again below, in the generator, where Ray reports it
                answers.put(("error", exc))

        thread = threading.Thread(target=run, name=f"chat-worker-{self.index}", daemon=True)
        thread.start()
        while True:
            kind, value = answers.get()
            if kind == "result":
                yield value
            elif kind == "error":
                raise value
            else:
                break
        thread.join()


def shard(requests: Sequence[ChatRequest], count: int) -> list[list[int]]:
    """The requests' positions split into `count` shards of about equal work (their max_tokens summed): identical
    conversations on one model stay together (the engine prefills them once), the largest groups are placed
    first, each on the least loaded shard. Deterministic, so a repeated call shards the same way."""
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[int]] = {}
    for i, request in enumerate(requests):
        conversation = tuple((m.role, m.content) for m in request.messages)
        groups.setdefault((request.model, conversation), []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (-sum(max(1, requests[i].max_tokens) for i in g), g[0]))
    shards: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for group in ordered:
        target = min(range(count), key=lambda s: (load[s], s))
        shards[target].extend(group)
        load[target] += sum(max(1, requests[i].max_tokens) for i in group)
    return [sorted(s) for s in shards]


class ChatWorkers:
    """The driver's side: K actors, started on the first call and kept until `close`, and the chat over them."""

    def __init__(self, ray: ModuleType, setup: ChatWorkerSetup, *, workers: int, cpus: int, gpus: float) -> None:
        self._ray = ray
        self._setup = setup
        self._workers = workers
        self._cpus = cpus
        self._gpus = gpus
        self._actors: list[Any] = []
        self._lock = threading.Lock()

    @property
    def actors(self) -> list[Any]:
        """The actor handles, started on first use."""
        with self._lock:
            if not self._actors:
                self._actors = self._start()
            return list(self._actors)

    def chat(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        """Every request answered by the actors, in request order; `on_result` runs here, in the calling thread,
        once per answer as it arrives. Anything that ends the call early (an actor lost, `on_result` raising, a
        signal) kills the actors too: their shards would go on decoding for nobody. The next call starts afresh."""
        if not requests:
            return []
        actors = self.actors
        arrivals: queue.Queue[tuple[Literal["result", "error", "done"], int, Any]] = queue.Queue()
        results: dict[int, ChatResult] = {}
        readers: list[threading.Thread] = []
        positions: list[dict[str, deque[int]]] = []
        try:
            for n, (actor, indices) in enumerate(zip(actors, shard(requests, len(actors)), strict=True)):
                if not indices:
                    continue
                by_key: dict[str, deque[int]] = {}
                for i in indices:
                    by_key.setdefault(requests[i].key, deque()).append(i)
                positions.append(by_key)
                stream = actor.chat.options(num_returns="streaming").remote(
                    [requests[i].model_dump_json() for i in indices])
                reader = threading.Thread(target=self._read, args=(len(positions) - 1, n, stream, arrivals),
                                          name=f"chat-shard-{n}", daemon=True)
                readers.append(reader)
            for reader in readers:
                reader.start()
            done = 0
            while done < len(readers):
                try:
                    kind, slot, value = arrivals.get(timeout=_POLL_SECONDS)
                except queue.Empty:
                    continue
                if kind == "done":
                    done += 1
                elif kind == "error":
                    raise self._failure(slot, value)
                else:
                    result = ChatResult.model_validate_json(value)
                    waiting = positions[slot].get(result.key)
                    if not waiting:
                        raise RuntimeError(f"generation worker {slot + 1} answered {result.key!r}, which it was "
                                           "not asked")
                    results[waiting.popleft()] = result
                    if on_result is not None:
                        on_result(result)
        except BaseException:
            self.close()
            raise
        for reader in readers:
            reader.join()
        missing = [requests[i].key for i in range(len(requests)) if i not in results]
        if missing:
            raise RuntimeError(f"the generation workers returned no answer for {len(missing)} request(s), "
                               f"e.g. {missing[0]!r}")
        return [results[i] for i in range(len(requests))]

    def close(self) -> None:
        """Kill the actors (what they hold in memory goes with them); a later call starts new ones."""
        with self._lock:
            actors, self._actors = self._actors, []
        for actor in actors:
            try:
                self._ray.kill(actor)
            except Exception:  # already dead, or Ray itself is gone: nothing left to free
                continue

    # -- inside ---------------------------------------------------------------------------------------------

    def _start(self) -> list[Any]:
        """K actors, each asking a job's CPUs and GPUs (that K fit the cluster is checked when it is joined), waited
        for, so one that cannot start fails here."""
        remote = self._ray.remote(max_restarts=0, max_task_retries=0)(ChatWorker)
        actors = [remote.options(num_cpus=self._cpus, num_gpus=self._gpus).remote(n, self._setup)
                  for n in range(self._workers)]
        try:
            self._ray.get([a.ready.remote() for a in actors])
        except Exception as exc:
            for actor in actors:
                self._ray.kill(actor)
            raise UserError(f"a generation worker could not start ({_first_line(_cause(exc))}): check that "
                            f"{self._setup.model} loads on every node, or set [cluster] generation_workers = 0"
                            ) from None
        return actors

    def _read(self, slot: int, index: int, stream: Any, arrivals: queue.Queue[Any]) -> None:
        """One shard's answers onto the driver's queue, then "done"; what ended the stream early as "error"."""
        try:
            for ref in stream:
                arrivals.put(("result", slot, self._ray.get(ref)))
        except BaseException as exc:
            arrivals.put(("error", slot, (index, exc)))
            return
        arrivals.put(("done", slot, None))

    def _failure(self, slot: int, value: tuple[int, BaseException]) -> BaseException:
        """A shard's error as the user should see it: what the request itself got wrong (a UserError raised in the
        actor, e.g. a prompt past the context) as that; a lost actor as a stopped, resumable run."""
        index, exc = value
        cause = _cause(exc)
        if isinstance(cause, UserError):
            return cause
        actor_error = getattr(getattr(self._ray, "exceptions", None), "RayActorError", ())
        if isinstance(exc, actor_error):
            return RunStopped(f"generation worker {index + 1} of {self._workers} (a Ray actor) died "
                              f"({_first_line(exc)}); the answers it sent are stored. Give it more memory, or "
                              "lower [cluster] generation_workers (0: generate in this process)")
        return RuntimeError(f"generation worker {index + 1} of {self._workers} failed: {_first_line(cause)}")


def _cause(exc: BaseException) -> BaseException:
    """What an actor's code raised, out of the RayTaskError that wraps it."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
