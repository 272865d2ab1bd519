"""The 2N finetuning jobs of an iteration: start (or re-attach to) each, poll them all, collect model ids.

The job row is written before every remote call and again after it, so a crash at any point leaves enough in
the store to find the job again instead of paying for a second one (the backend's start is idempotent by the
spec's key). At most `max_active` jobs run at once; the rest wait their turn. A failed job is retried on the
next resume as a new attempt, under a new key, told the key of the attempt it retries (so that a backend training
in stages pays again only for the stages that did not succeed); a job the provider no longer knows (404) is
started again at once, as a new attempt in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from pydantic import BaseModel

from backends.base import TERMINAL_STATUSES, Backend, FinetuneSpec, JobEvent, JobRef, JobState
from foundation.crashpoints import crashpoint
from foundation.errors import RunStopped
from orchestrator.interrupts import never
from orchestrator.names import attempt_key
from orchestrator.store import JobEventRow, JobRow, Store

if TYPE_CHECKING:
    from orchestrator.costs import Ledger


class FinetunePlan(BaseModel):
    job: JobRow
    spec: FinetuneSpec
    epochs_estimate: int = 1  # for the budget's upper bound before the provider reports trained tokens


def _status_change(job: JobRow, state: JobState) -> str | None:
    """The event for a change of our status or of the provider's own (`validating_files -> queued` and
    `running -> paused` are both `queued`/`running` to us); None when neither changed."""
    raw = state.provider_status
    raw_changed = raw is not None and raw != job.provider_status
    if state.status == job.status and not raw_changed:
        return None
    message = f"status {job.status} -> {state.status}" if state.status != job.status else f"status {job.status}"
    if raw_changed:
        message += f" (provider: {f'{job.provider_status} -> ' if job.provider_status else ''}{raw})"
    return message


def _apply(job: JobRow, state: JobState) -> list[JobEventRow]:
    """Copy a polled state into the row; every status change (ours or the provider's) is an event of its own."""
    events = [JobEventRow(job_key=job.key, created_at=e.created_at, level=e.level, message=e.message)
              for e in state.events]
    change = _status_change(job, state)
    if change is not None:
        events.append(JobEventRow(job_key=job.key, created_at=time.time(), level="status", message=change))
    job.status = state.status
    job.provider_status = state.provider_status or job.provider_status
    job.model_id = state.model_id
    job.train_loss = state.train_loss
    job.trained_tokens = state.trained_tokens
    job.error = state.error
    if state.status in TERMINAL_STATUSES and job.finished_at is None:
        job.finished_at = time.time()
    return events


class _Runner:
    def __init__(self, backend: Backend, store: Store, ledger: Ledger | None) -> None:
        self.backend = backend
        self.store = store
        self.ledger = ledger
        self.done: dict[str, JobRow] = {}

    def start(self, plan: FinetunePlan, previous: JobRow | None) -> tuple[JobRow, JobRef]:
        attempt = previous.attempt + 1 if previous is not None else 1
        job = plan.job.model_copy(update={"status": "pending", "attempt": attempt})
        retry_of = attempt_key(plan.spec.key, attempt - 1) if attempt > 1 else None  # its stages that succeeded
        spec = plan.spec.model_copy(update={"key": attempt_key(plan.spec.key, attempt), "retry_of": retry_of})
        what = f"finetuning agent {job.agent + 1} {job.role} (iteration {job.iteration})"
        if self.ledger is not None:
            self.ledger.check_training(spec, plan.epochs_estimate, what)  # every stage's file (sft-then-dpo: both)
            self.ledger.record_training_estimate(job, spec, plan.epochs_estimate)
        self.store.save_job(job)  # intent first: a crash from here on finds this row
        crashpoint("finetune.intent_stored")
        ref = self.backend.start_finetune(spec)
        crashpoint("finetune.started")  # the provider has the job; our row does not have its id yet
        job.provider_job_id = ref.provider_job_id
        job.status = "queued"
        self.store.save_job(job)
        return job, ref

    def poll(self, job: JobRow, ref: JobRef, state: JobState) -> bool:
        """Store a polled state and its events; True when the job has ended."""
        events = _apply(job, state)
        crashpoint("finetune.poll_fetched")  # polled (new events handed over), nothing of it stored yet
        self.store.save_job(job, events)
        crashpoint("finetune.polled")
        if job.status not in TERMINAL_STATUSES:
            return False
        if self.ledger is not None:
            # the bill replaces the estimate; a failed job bills what it reports
            self.ledger.record_training(job, dpo_tokens=state.dpo_tokens, billed_usd=state.billed_usd)
        self.done[job.key] = job
        return True


def job_ref(job: JobRow) -> JobRef:
    """The provider's handle on a stored job's current attempt."""
    return JobRef(key=attempt_key(job.key, job.attempt), provider_job_id=job.provider_job_id or "")


def refresh_job(job: JobRow, backend: Backend, store: Store, ledger: Ledger | None = None) -> JobState:
    """Poll one stored job and store what the provider says, as a run does: its events, its status (ours and the
    provider's), and for an ended job the bill. For `jobs cancel`, which must not guess how a job ended."""
    ref = job_ref(job)
    state = backend.poll(ref)
    _Runner(backend, store, ledger).poll(job, ref, state)
    return state


def run_jobs(
    plans: Sequence[FinetunePlan],
    backend: Backend,
    store: Store,
    *,
    ledger: Ledger | None = None,
    max_active: int | None = None,
    poll_interval: float = 5.0,
    max_interval: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    checkpoint: Callable[[], None] = never,
) -> dict[str, JobRow]:
    """Bring every planned job to a terminal state; raise RunStopped if any did not succeed."""
    runner = _Runner(backend, store, ledger)
    waiting: list[tuple[FinetunePlan, JobRow | None]] = []
    active: list[tuple[JobRow, JobRef]] = []
    for plan in plans:
        stored = store.get_job(plan.job.key)
        if stored is not None and stored.status == "succeeded":
            runner.done[stored.key] = stored
        elif stored is not None and stored.provider_job_id and stored.status not in TERMINAL_STATUSES:
            active.append((stored, job_ref(stored)))  # re-attach: it was started by an earlier session
            if ledger is not None:  # how its files split its tokens, for a backend that does not count them apart
                ledger.expect_training(stored, plan.spec, plan.epochs_estimate)
        elif stored is not None and stored.status == "pending" and stored.provider_job_id is None:
            # Crashed between recording the intent and storing the id: the backend finds the job by its key.
            waiting.append((plan, stored.model_copy(update={"attempt": stored.attempt - 1})))
        else:
            waiting.append((plan, stored))  # new, or failed/cancelled before: a new attempt

    limit = max_active or len(plans) or 1
    interval = poll_interval
    by_key = {plan.job.key: plan for plan in plans}
    restarted: set[str] = set()

    def settle(job: JobRow, ref: JobRef, state: JobState) -> bool:
        """Store a polled state; True when the job needs no more polling. A job the provider no longer knows
        (404: deleted, or expired while no run watched) is started again once as a new attempt, not a failure."""
        gone = state.missing and job.key not in restarted and job.key in by_key
        if gone:
            note = JobEvent(created_at=time.time(), level="warning",
                            message=f"the provider no longer knows job {job.provider_job_id} (404): starting it "
                                    f"again as attempt {job.attempt + 1}")
            state = state.model_copy(update={"events": [*state.events, note]})
        if not runner.poll(job, ref, state):
            return False
        if gone:
            restarted.add(job.key)
            del runner.done[job.key]
            waiting.insert(0, (by_key[job.key], job))
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:

        def poll_all(jobs: list[tuple[JobRow, JobRef]]) -> list[tuple[JobRow, JobRef]]:
            states = list(pool.map(lambda pair: backend.poll(pair[1]), jobs))  # all jobs polled concurrently
            return [(job, ref) for (job, ref), state in zip(jobs, states, strict=True)
                    if not settle(job, ref, state)]

        active = poll_all(active)  # re-attached jobs may have finished while nobody watched
        while waiting or active:
            checkpoint()  # a safe point: every job so far is stored, started or not
            while waiting and len(active) < limit:
                checkpoint()
                plan, previous = waiting.pop(0)
                job, ref = runner.start(plan, previous)
                # A first look right away: a local job is already finished, a hosted one shows its first state.
                if not settle(job, ref, backend.poll(ref)):
                    active.append((job, ref))
            if active:
                sleep(interval)
                interval = min(interval * 1.5, max_interval)
                active = poll_all(active)

    failed = [j for j in runner.done.values() if j.status != "succeeded"]
    if failed:
        first = failed[0]
        raise RunStopped(
            f"{len(failed)} finetuning job(s) did not succeed; agent {first.agent + 1} {first.role} "
            f"({first.provider_job_id}) {first.status}: {first.error or 'no error given'}"
        )
    return runner.done
