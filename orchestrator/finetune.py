"""The 2N finetuning jobs of an iteration: start (or re-attach to) each, poll them all, collect model ids.

The job row is written before every remote call and again after it, so a crash at any point leaves enough in
the store to find the job again instead of paying for a second one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pydantic import BaseModel

from backends.base import TERMINAL_STATUSES, Backend, FinetuneSpec, JobRef, JobState
from orchestrator.store import JobEventRow, JobRow, Store


class RunStopped(Exception):
    """The run cannot go on (e.g. a finetuning job failed); everything done so far is stored."""


class FinetunePlan(BaseModel):
    job: JobRow
    spec: FinetuneSpec


def _apply(job: JobRow, state: JobState) -> list[JobEventRow]:
    job.status = state.status
    job.model_id = state.model_id
    job.train_loss = state.train_loss
    job.trained_tokens = state.trained_tokens
    job.error = state.error
    if state.status in TERMINAL_STATUSES and job.finished_at is None:
        job.finished_at = time.time()
    return [JobEventRow(job_key=job.key, created_at=e.created_at, level=e.level, message=e.message)
            for e in state.events]


def _poll_once(job: JobRow, ref: JobRef, backend: Backend, store: Store, done: dict[str, JobRow]) -> bool:
    """Poll, store the state and its events; True when the job has ended."""
    events = _apply(job, backend.poll(ref))
    store.save_job(job, events)
    if job.status in TERMINAL_STATUSES:
        done[job.key] = job
        return True
    return False


def run_jobs(
    plans: Sequence[FinetunePlan],
    backend: Backend,
    store: Store,
    *,
    poll_interval: float = 5.0,
    max_interval: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, JobRow]:
    """Bring every planned job to a terminal state; raise RunStopped if any did not succeed."""
    done: dict[str, JobRow] = {}
    active: list[tuple[JobRow, JobRef]] = []
    for plan in plans:
        stored = store.get_job(plan.job.key)
        if stored is not None and stored.status == "succeeded":
            done[stored.key] = stored
            continue
        if stored is not None and stored.provider_job_id and stored.status not in TERMINAL_STATUSES:
            active.append((stored, JobRef(key=stored.key, provider_job_id=stored.provider_job_id)))
            continue
        job = plan.job.model_copy(update={"status": "pending", "error": None, "finished_at": None})
        store.save_job(job)
        ref = backend.start_finetune(plan.spec)
        job.provider_job_id = ref.provider_job_id
        job.status = "queued"
        store.save_job(job)
        # A first look right away: a local job is already finished, a hosted one shows its first state.
        if not _poll_once(job, ref, backend, store, done):
            active.append((job, ref))

    interval = poll_interval
    while active:
        sleep(interval)
        interval = min(interval * 1.5, max_interval)
        active = [(job, ref) for job, ref in active if not _poll_once(job, ref, backend, store, done)]

    failed = [j for j in done.values() if j.status != "succeeded"]
    if failed:
        first = failed[0]
        raise RunStopped(
            f"{len(failed)} finetuning job(s) did not succeed; agent {first.agent + 1} {first.role} "
            f"({first.provider_job_id}) {first.status}: {first.error or 'no error given'}"
        )
    return done
