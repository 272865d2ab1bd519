"""`HostedJobs`: finetuning jobs on a hosted provider, the base of `OpenAIJobs` and `TogetherJobs`.

The base owns the flow every provider's jobs follow: each call under the backend's one `RetryPolicy`, a refusal
turned into an error that says what to do (`_refused`), a job started at most once per key (`start_once`), a
poll that notices a job gone from the server, a cancel that is a no-op on a job that already ended, and the
cursor that hands every job event over once; and "sft-then-dpo" as two provider jobs under one key (an SFT job,
then a DPO job on its result, started by the poll that finds the first done), whose retry keeps an SFT stage that
succeeded and trains (and bills) the DPO stage alone. A provider supplies only its API
calls and its payloads: the hooks below (`_prepare`, `check`, `check_pairs`, `_retrieve_job`, `_retrieve_file`,
`_cancel_job`, `_state_of`, `_event_of`, `_refused`), in the spirit of a base request processor whose providers
fill in what differs.
"""

from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from backends.base import BackendState, DpoParams, FinetuneSpec, JobEvent, JobRef, JobState
from backends.hosted.chat_files import FileCheck
from backends.hosted.clients import HostedClients
from backends.hosted.names import scan, train_loss_in
from backends.hosted.records import SEEN_EVENTS_KEPT, EventCursor, PreparedJob, start_once
from backends.hosted.retry import RetryPolicy
from foundation.errors import UserError

ClientT = TypeVar("ClientT")
SettingsT = TypeVar("SettingsT")
# The events of one job not handed over yet, oldest first, each with its id: given the ids already handed over.
FreshEvents = Callable[[set[str]], Sequence[tuple[str, Any]]]


class HostedJobs(ABC, Generic[ClientT, SettingsT]):
    """Files and finetuning jobs through a provider's sync client, idempotent by FinetuneSpec.key."""

    events_kept = SEEN_EVENTS_KEPT  # event ids remembered per job (a provider listing every event keeps more)

    def __init__(
        self,
        client: ClientT,
        clients: HostedClients[ClientT, Any],
        state: BackendState,
        settings: SettingsT,
        *,
        retry: RetryPolicy,
    ) -> None:
        self.client = client
        self.clients = clients
        self.state = state
        self.events = EventCursor(state)
        self.settings = settings
        self.retry = retry

    # -- what a provider supplies

    @abstractmethod
    def _refused(self, exc: Exception, doing: str) -> Exception:
        """What to raise for a non-retryable error while `doing` something."""

    @abstractmethod
    def check(self, path: Path) -> FileCheck:
        """The provider's rules for a training file, checked locally (a UserError on the first broken one)."""

    @abstractmethod
    def check_pairs(self, path: Path) -> FileCheck:
        """The provider's rules for a preference file, checked locally (a UserError on the first broken one)."""

    @abstractmethod
    def _prepare(self, spec: FinetuneSpec) -> PreparedJob:
        """Check and upload the file, and say how to find and create the job (no job is created here)."""

    @abstractmethod
    def _retrieve_job(self, job_id: str) -> Any: ...

    @abstractmethod
    def _retrieve_file(self, file_id: str) -> Any: ...

    @abstractmethod
    def _cancel_job(self, job_id: str) -> Any: ...

    @abstractmethod
    def _state_of(self, job: JobRef, remote: Any) -> JobState:
        """Our JobState for the provider's job (its new events read with `_take_events`)."""

    @abstractmethod
    def _event_of(self, event: Any) -> JobEvent:
        """Our JobEvent for one of the provider's (its message is scrubbed by the caller)."""

    # -- plumbing

    def _call(self, what: str, fn: Callable[[], Any], *, missing_ok: bool = False) -> Any:
        """`fn` under the retry policy; a refusal is `_refused`'s error; with `missing_ok` a 404 is None."""
        return self.retry.call_or_refuse(fn, what, self._refused, missing_ok=missing_ok)

    def _file_exists(self, file_id: str) -> bool:
        return bool(self._call("checking an uploaded file", lambda: self._retrieve_file(file_id), missing_ok=True))

    def _alive(self, job_id: str) -> bool:
        return bool(self._call("looking up a finetuning job", lambda: self._retrieve_job(job_id), missing_ok=True))

    def _first_job(self, jobs: Callable[[], Iterable[Any]], limit: int, matches: Callable[[Any], bool]) -> str | None:
        """The id of the first of at most `limit` listed jobs that `matches` (listings are newest first)."""

        def find() -> str | None:
            for job in scan(jobs(), limit):
                if matches(job):
                    return str(job.id)
            return None

        found = self._call("listing finetuning jobs", find)
        return None if found is None else str(found)

    # -- jobs

    def start(self, spec: FinetuneSpec) -> JobRef:
        """The job for `spec.key` (the one an earlier call started, while the server still has it, else new); under
        "sft-then-dpo" its first stage (SFT), with what the second needs recorded
        first and the pair file checked, so that a bad pair file costs no SFT job. A retry (`spec.retry_of`) of an
        attempt whose SFT stage succeeded on the same file from the same model takes that SFT job as its own first
        stage, so only its DPO stage is trained and billed again."""
        if spec.objective == "sft-then-dpo":
            if spec.preference_file is None:
                raise UserError(f"finetune {spec.key!r} is sft-then-dpo without a preference file")
            self.check_pairs(spec.preference_file)
            dpo = spec.dpo or DpoParams()
            trains = {"base_model": spec.base_model, "root_model": spec.root_model,
                      "training_sha256": hashlib.sha256(spec.training_file.read_bytes()).hexdigest()}
            earlier = self._sft_stage_done(spec.retry_of, trains)
            self.state.put(f"then-dpo:{spec.key}", {"preference_file": str(spec.preference_file),
                                                    "suffix": spec.suffix, "seed": spec.seed,
                                                    "dpo": dpo.model_dump(), **trains,
                                                    "sft_reused": earlier is not None})
            if earlier is not None:
                self.state.put(f"job:{spec.key}", earlier)  # its SFT stage is the earlier attempt's job
                return JobRef(key=spec.key, provider_job_id=str(earlier["job_id"]))
        return self._start_one(spec)

    def _sft_stage_done(self, earlier: str | None, trains: dict[str, Any]) -> dict[str, Any] | None:
        """The job record of attempt `earlier`'s SFT stage, when it succeeded training what `trains` says (the
        same starting model and SFT file: a rebuilt data set trains anew) and the server still has the job.
        Its DPO stage was noted only once a poll found the SFT stage succeeded."""
        if earlier is None or not self.state.get(f"then-dpo-noted:{earlier}"):
            return None
        plan = self.state.get(f"then-dpo:{earlier}") or {}
        record = self.state.get(f"job:{earlier}") or {}
        if any(plan.get(name) != value for name, value in trains.items()) or not record.get("job_id"):
            return None
        return record if self._alive(str(record["job_id"])) else None

    def poll(self, job: JobRef) -> JobState:
        """The job's state; for "sft-then-dpo", the SFT stage's until it completes, then the DPO stage's (started
        here, once, from the SFT job's model or checkpoint, under the key `<key>/dpo`) with the trained tokens of
        both (of the DPO stage alone where the SFT stage is an earlier attempt's, billed there). The SFT job's id
        is stored (the job row, `job:<key>`) before the DPO job is started, and the DPO job is started by
        `start_once`, so a resumed run starts neither stage twice."""
        plan = self.state.get(f"then-dpo:{job.key}")
        first = self._poll_one(job)
        if plan is None:
            return first
        if first.status != "succeeded":  # every token trained so far is the SFT stage's
            return first.model_copy(update={"dpo_tokens": None if first.trained_tokens is None else 0})
        stage = FinetuneSpec(key=f"{job.key}/dpo", base_model=str(first.model_id),
                             training_file=Path(plan["preference_file"]), suffix=str(plan["suffix"]),
                             seed=int(plan["seed"]), objective="dpo", preference_file=Path(plan["preference_file"]),
                             dpo=DpoParams.model_validate(plan["dpo"]))
        ref = self._start_one(stage)  # start_once: the job started by an earlier poll, while it lives
        second = self._poll_one(ref)
        # the SFT stage's tokens count once the stage is done, even when the DPO stage then fails (they were
        # trained); a retry that took an earlier attempt's SFT stage bills its DPO stage alone
        reused = bool(plan.get("sft_reused"))
        counts = [t for t in (None if reused else first.trained_tokens, second.trained_tokens) if t is not None]
        trained = sum(counts) if counts else None
        # the provider's bill of both stages, only when it gave one for each it charges this attempt for
        bills = [second.billed_usd] if reused else [first.billed_usd, second.billed_usd]
        billed = None if any(b is None for b in bills) else sum(b for b in bills if b is not None)
        note = []
        if (self.state.get(f"then-dpo-noted:{job.key}") or {}).get("job_id") != ref.provider_job_id:
            done = (f"SFT stage: {first.model_id} of job {job.provider_job_id}, trained by an earlier attempt (not "
                    "trained or billed again)" if reused else f"SFT stage done ({first.model_id})")
            note = [JobEvent(created_at=time.time(), message=f"{done}; DPO stage: job {ref.provider_job_id}")]
            self.state.put(f"then-dpo-noted:{job.key}", {"job_id": ref.provider_job_id})
        return second.model_copy(update={
            "events": [*first.events, *note, *second.events], "trained_tokens": trained,
            "dpo_tokens": None if trained is None else second.trained_tokens or 0, "billed_usd": billed,
            "error": None if second.error is None else f"DPO stage (job {ref.provider_job_id}): {second.error}"})

    def cancel(self, job: JobRef) -> None:
        """Cancel the job, and the DPO stage of an "sft-then-dpo" job once it is started."""
        self._cancel_one(job)
        second = (self.state.get(f"then-dpo-noted:{job.key}") or {}).get("job_id")
        if second:
            self._cancel_one(JobRef(key=f"{job.key}/dpo", provider_job_id=str(second)))

    def _start_one(self, spec: FinetuneSpec) -> JobRef:
        """One provider job for `spec.key`: the one an earlier call started, while the server still has it, else
        new."""
        job_id = start_once(self.state, spec.key, alive=self._alive, prepare=lambda: self._prepare(spec))
        return JobRef(key=spec.key, provider_job_id=job_id)

    def _poll_one(self, job: JobRef) -> JobState:
        job_id = job.provider_job_id
        remote = self._call(f"polling job {job_id}", lambda: self._retrieve_job(job_id), missing_ok=True)
        if remote is None:
            return JobState(status="failed", missing=True, error=f"job {job_id} no longer exists on the server")
        return self._state_of(job, remote)

    def _take_events(self, job_id: str, fresh: FreshEvents) -> tuple[list[JobEvent], float | None]:
        """The job's events not handed over before, oldest first (each once, by id), scrubbed; and the newest
        training loss seen in any event so far."""
        record, seen = self.events.load(job_id)
        unique = list(dict(fresh(seen)).items())  # a repeated id keeps its first place and its last content
        loss = record.train_loss
        for _, event in unique:
            step_loss = train_loss_in(event)
            loss = step_loss if step_loss is not None else loss
        if unique:
            self.events.hand_over(job_id, record, (i for i, _ in unique), loss, keep=self.events_kept)
        scrub = self.clients.scrubber.scrub
        events = [self._event_of(e) for _, e in unique]
        return [e.model_copy(update={"message": scrub(e.message)}) for e in events], loss

    def _cancel_one(self, job: JobRef) -> None:
        """Cancel; a job that already ended (or is gone) needs nothing."""
        errors = self.clients.errors
        what = f"cancelling job {job.provider_job_id}"
        try:
            self.retry.call(lambda: self._cancel_job(job.provider_job_id), what)
        except (errors.not_found, errors.bad_request, errors.conflict):
            return
        except errors.status as exc:
            raise self._refused(exc, what) from None
