"""Finetuning on OpenAI (and Azure OpenAI): check the file, upload it once, start one job per key, poll, cancel.

Three things cost money or a day here, so each is guarded:
- a bad training file: checked locally with OpenAI's documented rules before upload, failing on the exact line
  and rule, instead of minutes later as a failed job;
- a second upload of the same data: files are de-duplicated by content sha256 through BackendState;
- a second job for the same key after a crash between "create" and "store the id": the intent is recorded before
  the call, every job carries `metadata.maft_key`, and a retried start finds the job the server already has.

Preference finetuning (developers.openai.com/api/docs/guides/direct-preference-optimization): `method` type "dpo"
on a pair file, "one-turn conversations" only (one user message; the pipeline drops the critics' pairs), with no
NLL term, so only "sft-then-dpo" is offered: an SFT job, then a DPO job on its `ft:` model (`HostedJobs` chains
them). OpenAI nests the hyperparameters (`{"type": "dpo", "dpo": {"hyperparameters": {"beta": ...}}}`); Azure
OpenAI's fine_tuning API (api-version query) takes them flat (`{"type": "dpo", "dpo": {"beta": ...}}`). OpenAI
is winding its finetuning platform down: it takes no new users, and existing ones "for the coming months".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, ConfigDict

from backends.base import BackendState, DpoParams, FinetuneSpec, JobEvent, JobRef, JobState, JobStatus
from backends.hosted.chat_files import ChatFileRules, FileCheck, TokenCounter, load_token_counter, validate_chat_file
from backends.hosted.clients import HostedClients
from backends.hosted.errors import error_code, error_message
from backends.hosted.jobs import HostedJobs
from backends.hosted.names import key_digest, scan
from backends.hosted.names import sanitize_suffix as shared_sanitize_suffix
from backends.hosted.preference_files import PreferenceRules, validate_preference_file
from backends.hosted.records import PreparedJob, upload_once
from backends.hosted.retry import RetryPolicy
from backends.openai_settings import OpenAIConfig
from foundation.errors import UserError

# What a command that will finetune on OpenAI (not Azure OpenAI, another service) says first, once: the notice of
# 2026-05-07 closed self-serve finetuning to organizations that never finetuned, and new jobs are being phased out
SELF_SERVE_NOTICE = ("OpenAI is closing self-serve finetuning to new jobs (organizations that never finetuned are "
                     "refused already), so these finetuning jobs may be refused; Azure OpenAI ([openai] api = "
                     "\"azure\"), the together backend and the local one keep finetuning")
DEFAULT_MAX_EXAMPLE_TOKENS = 65_536
MIN_EXAMPLES = 10
MAX_SUFFIX_CHARS = 64
OPENAI_RULES = ChatFileRules(
    provider="OpenAI",
    example_keys=("messages", "tools", "parallel_tool_calls", "functions"),
    message_keys=("role", "content", "name", "weight", "tool_calls", "function_call"),
    roles=("system", "user", "assistant", "tool", "function"),
    weight_roles=("assistant",),
    min_examples=MIN_EXAMPLES,
    max_example_tokens=DEFAULT_MAX_EXAMPLE_TOKENS,
)
# "Currently, we only train on one-turn conversations for each example" (the DPO guide); tools are allowed in `input`
OPENAI_PREFERENCE_RULES = PreferenceRules(provider="OpenAI", input_keys=("messages", "tools", "parallel_tool_calls"),
                                          one_turn=True, min_examples=MIN_EXAMPLES,
                                          max_example_tokens=DEFAULT_MAX_EXAMPLE_TOKENS)
_STATUS: Mapping[str, JobStatus] = MappingProxyType({
    "validating_files": "queued",
    "queued": "queued",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
})
_JOBS_SCANNED = 200  # jobs looked at when searching for one created just before a crash
_FILES_SCANNED = 1000  # uploaded files looked at when searching for one uploaded just before a crash
DAILY_LIMIT_MESSAGE = ("OpenAI's daily limit on finetuning jobs is reached: run `orchestrator run --resume RUN` "
                       "tomorrow; finished work is kept")


def validate_training_file(
    path: Path,
    *,
    counter: TokenCounter | None = None,
    max_example_tokens: int = DEFAULT_MAX_EXAMPLE_TOKENS,
    min_examples: int = MIN_EXAMPLES,
) -> FileCheck:
    """Every rule OpenAI documents for chat finetuning files that can be checked without the server.

    The first broken rule is a UserError naming the file, the line (and message) and the rule.
    """
    rules = replace(OPENAI_RULES, max_example_tokens=max_example_tokens, min_examples=min_examples)
    return validate_chat_file(path, rules, counter=counter)


# -- payloads -----------------------------------------------------------------------------------------------


class Hyperparameters(BaseModel):
    n_epochs: int | Literal["auto"]
    batch_size: int | Literal["auto"]
    learning_rate_multiplier: float | Literal["auto"]


class Supervised(BaseModel):
    hyperparameters: Hyperparameters


class DpoHyperparameters(Hyperparameters):
    beta: float | Literal["auto"]


class Dpo(BaseModel):
    hyperparameters: DpoHyperparameters


class AzureDpo(BaseModel):
    """Azure OpenAI's DPO method: its hyperparameters directly under `dpo` (no `hyperparameters` level)."""

    beta: float


class Method(BaseModel):
    """`method`: "supervised" (SFT) or "dpo"; only the one named by `type` is set (and sent)."""

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | AzureDpo | None = None


class JobCreate(BaseModel):
    """The body of `POST /v1/fine_tuning/jobs`."""

    model_config = ConfigDict(frozen=True)

    model: str
    training_file: str
    suffix: str
    seed: int
    method: Method
    metadata: dict[str, str]


def job_status(remote: str) -> JobStatus:
    """Our status for OpenAI's; one we do not know (e.g. `paused`) is not an end, so it counts as running."""
    return _STATUS.get(remote, "running")


def maft_key(key: str) -> str:
    """The job's idempotency key as stored in its metadata (a hash: keys may hold paths or be long)."""
    return key_digest(key)


def sanitize_suffix(suffix: str) -> str:
    """A suffix OpenAI accepts: letters, digits, `-` and `_`, at most 64 characters."""
    return shared_sanitize_suffix(suffix, MAX_SUFFIX_CHARS)


# -- jobs -------------------------------------------------------------------------------------------------------


class OpenAIJobs(HostedJobs[OpenAI, OpenAIConfig]):
    """Files and fine_tuning.jobs through the sync client, idempotent by FinetuneSpec.key."""

    events_page_size = 100

    def __init__(
        self,
        client: OpenAI,
        clients: HostedClients[OpenAI, Any],  # an OpenAIClients
        state: BackendState,
        settings: OpenAIConfig,
        *,
        retry: RetryPolicy,
        resolve_model: Callable[[str], str],
        max_example_tokens: int = DEFAULT_MAX_EXAMPLE_TOKENS,
    ) -> None:
        super().__init__(client, clients, state, settings, retry=retry)
        self.resolve_model = resolve_model
        self.max_example_tokens = max_example_tokens
        self._counter: TokenCounter | None = None

    # -- OpenAI's calls

    def _retrieve_job(self, job_id: str) -> Any:
        return self.client.fine_tuning.jobs.retrieve(job_id)

    def _retrieve_file(self, file_id: str) -> Any:
        return self.client.files.retrieve(file_id)

    def _cancel_job(self, job_id: str) -> Any:
        return self.client.fine_tuning.jobs.cancel(job_id)

    @property
    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = load_token_counter()
        return self._counter

    def _refused(self, exc: Exception, doing: str, model: str | None = None) -> Exception:
        """What to raise for a non-retryable error while uploading or creating."""
        where, scrub = self.clients.where, self.clients.scrubber
        detail = scrub.scrub(error_message(exc))
        refused = self.clients.key_error(exc)
        if refused is not None:
            return refused
        code = error_code(exc) or ""
        if isinstance(exc, openai.RateLimitError) and code == "daily_rate_limit_exceeded":
            return UserError(DAILY_LIMIT_MESSAGE)
        if model is not None and code == "model_not_found":
            return UserError(f"model {model} cannot be finetuned on this server ({where}): {detail}")
        if isinstance(exc, openai.NotFoundError):
            return UserError(f"this server ({where}) has no finetuning API: use it for chat only, or point "
                             "--base-url at OpenAI/Azure")
        if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
            return UserError(f"the server refused {doing}: {detail}")
        return self.clients.errors.failure(exc, doing, scrub)

    def check_available(self) -> None:
        """One cheap call that finds out, before anything is spent, whether this server has a finetuning API (a
        404 is a UserError saying so)."""
        self._call("listing finetuning jobs", lambda: self.client.fine_tuning.jobs.list(limit=1))

    # -- files

    def check(self, path: Path) -> FileCheck:
        return validate_training_file(path, counter=self.counter, max_example_tokens=self.max_example_tokens)

    def check_pairs(self, path: Path) -> FileCheck:
        rules = replace(OPENAI_PREFERENCE_RULES, max_example_tokens=self.max_example_tokens)
        return validate_preference_file(path, rules, counter=self.counter)

    def upload(self, path: Path, sha256: str) -> str:
        """The id of an uploaded copy of this content: reused when the server still has it, else uploaded.

        The name on the server carries the content's hash (`agent-1-critic-<sha256[:16]>.jsonl`), so an upload
        whose answer was lost (a crash, a dropped connection) can be recognised in the file list by name and size
        and is not paid for twice."""
        data = path.read_bytes()
        name = f"{path.stem}-{sha256[:16]}{path.suffix}"

        def find() -> str | None:
            def search() -> str | None:
                files: Iterator[Any] = iter(self.client.files.list(purpose="fine-tune", limit=100))
                for file in scan(files, _FILES_SCANNED):  # newest first
                    if file.filename == name and file.bytes == len(data) and file.status != "error":
                        return str(file.id)
                return None

            return self._call("listing uploaded files", search)  # type: ignore[no-any-return]

        def upload() -> str:
            doing = f"the upload of {path.name}"
            return self.retry.create_once(
                lambda: str(self.client.files.create(file=(name, data), purpose="fine-tune").id), find, doing,
                refused=lambda exc: self._refused(exc, doing))

        return upload_once(self.state, sha256, exists=self._file_exists, upload=upload, filename=name,
                           nbytes=len(data), find=find)

    # -- jobs

    def _prepare(self, spec: FinetuneSpec) -> PreparedJob:
        dpo = spec.objective == "dpo"
        if dpo and spec.preference_file is None:
            raise UserError(f"finetune {spec.key!r} is dpo without a preference file")
        path = spec.preference_file if dpo and spec.preference_file is not None else spec.training_file
        check = self.check_pairs(path) if dpo else self.check(path)
        model = self.resolve_model(spec.base_model)
        file_id = self.upload(path, check.sha256)
        mkey = maft_key(spec.key)
        body = self._body(spec, model, file_id, mkey, check.sha256)
        return PreparedJob(file_id=file_id, maft_key=mkey, find=lambda: self._find(mkey, check.sha256),
                           create=lambda: self._create(body, spec.key))

    def _body(self, spec: FinetuneSpec, model: str, file_id: str, mkey: str, file_sha: str) -> JobCreate:
        s = self.settings
        hyper = Hyperparameters(n_epochs=s.n_epochs, batch_size=s.batch_size,
                                learning_rate_multiplier=s.learning_rate_multiplier)
        method = Method(supervised=Supervised(hyperparameters=hyper))
        if spec.objective == "dpo":
            beta = (spec.dpo or DpoParams()).beta
            shape: Dpo | AzureDpo = (AzureDpo(beta=beta) if s.api == "azure" else
                                     Dpo(hyperparameters=DpoHyperparameters(**hyper.model_dump(), beta=beta)))
            method = Method(type="dpo", dpo=shape)
        return JobCreate(model=model, training_file=file_id, suffix=sanitize_suffix(spec.suffix), seed=spec.seed,
                         method=method,
                         metadata={"maft_key": mkey, "maft_file": file_sha[:32]})

    def _create(self, body: JobCreate, key: str) -> str:
        """Create the job; after a retryable failure, look for it before trying again (the request may have
        reached the server even though the answer did not reach us)."""
        doing = f"creating the finetuning job for {key!r}"
        return self.retry.create_once(
            lambda: str(self.client.fine_tuning.jobs.create(**body.model_dump(exclude_none=True)).id),
            lambda: self._find(body.metadata["maft_key"], body.metadata["maft_file"]), doing,
            refused=lambda exc: self._refused(exc, doing, body.model))

    def _find(self, mkey: str, file_sha: str) -> str | None:
        """A live job for this key and this data (created by an earlier, interrupted start). The metadata filter
        is checked here too, for servers that ignore it."""
        wanted = {"maft_key": mkey, "maft_file": file_sha[:32]}

        def matches(job: Any) -> bool:
            metadata = job.metadata or {}
            return all(metadata.get(k) == v for k, v in wanted.items()) and job.status not in ("failed", "cancelled")

        return self._first_job(lambda: self.client.fine_tuning.jobs.list(metadata={"maft_key": mkey}, limit=100),
                               _JOBS_SCANNED, matches)

    # -- poll

    def _state_of(self, job: JobRef, remote: Any) -> JobState:
        status = job_status(remote.status)
        events, train_loss = self._new_events(job.provider_job_id)
        error = None
        if status == "failed":
            err = remote.error
            parts = [getattr(err, "code", None), getattr(err, "message", None)] if err is not None else []
            error = self.clients.scrubber.scrub(": ".join(str(p) for p in parts if p) or "no error given")
        return JobState(
            status=status,
            provider_status=str(remote.status),
            model_id=remote.fine_tuned_model if status == "succeeded" else None,
            trained_tokens=remote.trained_tokens,
            train_loss=train_loss,
            error=error,
            events=events,
        )

    def _new_events(self, job_id: str) -> tuple[list[JobEvent], float | None]:
        """Events not returned before, oldest first. The API lists newest first and pages towards older ones,
        so read from the newest until an event already seen."""

        def fresh(seen: set[str]) -> list[tuple[str, Any]]:
            def fetch() -> list[Any]:
                newest: list[Any] = []
                for event in self.client.fine_tuning.jobs.list_events(job_id, limit=self.events_page_size):
                    if event.id in seen:
                        break
                    newest.append(event)
                return newest

            newest = self._call(f"reading events of job {job_id}", fetch, missing_ok=True) or []
            return [(e.id, e) for e in reversed(newest)]

        return self._take_events(job_id, fresh)

    def _event_of(self, event: Any) -> JobEvent:
        return JobEvent(created_at=float(event.created_at), level=event.level, message=event.message)
