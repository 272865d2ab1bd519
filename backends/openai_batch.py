"""Chat through the Batch API (`openai.batch = true`): half the price, answers within 24 hours.

A list of ChatRequests becomes one JSONL input file (`custom_id` = request key) and one batch. What was paid for
is never paid for again: BackendState records the batch of an input (`batch:<sha256 of the input>`) before and
after creating it and, for every request, the input it went into (`batchreq:<key>`); batches carry
`metadata.maft_batch`, so a batch created just before a crash is found on the server. A resumed run re-attaches
to the batches its requests went into and downloads their output. A batch that expired, was cancelled or failed
keeps its partial output; only the requests still missing go into a new batch, a bounded number of times.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, ValidationError

from backends.base import BackendState, ChatRequest, ChatResult, ResultCallback
from backends.hosted.chat import ChatBody, CompletionPayload, chat_body
from backends.hosted.clients import HostedClients
from backends.hosted.errors import HostedRequestError, error_message
from backends.hosted.names import scan
from backends.hosted.retry import RetryPolicy
from backends.openai_client import OPENAI_ERRORS
from backends.openai_settings import OpenAIConfig
from foundation.crashpoints import crashpoint
from foundation.errors import UserError

ENDPOINT: Final = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
UNUSABLE = frozenset({"failed", "expired", "cancelled"})  # never re-attach to these for new work
MAX_REQUESTS_PER_BATCH = 50_000  # OpenAI's limit per batch
_BATCHES_SCANNED = 200
Refusal = tuple[str, int, str]  # custom_id, HTTP status, the server's message


class BatchLine(BaseModel):
    """One line of a Batch API input file."""

    custom_id: str
    method: Literal["POST"] = "POST"
    url: str = ENDPOINT
    body: ChatBody


class BatchRecord(BaseModel):
    """Under `batch:<input sha256>`: the intent (input file uploaded) before creation, the batch id after."""

    status: Literal["creating", "created"]
    input_file_id: str
    batch_id: str | None = None
    requests: int


class _LineResponse(BaseModel):
    status_code: int
    body: Any = None


class OutputLine(BaseModel):
    """One line of a batch's output or error file."""

    custom_id: str
    response: _LineResponse | None = None
    error: dict[str, Any] | None = None


def batch_input(lines: Sequence[BatchLine]) -> tuple[bytes, str]:
    """The JSONL bytes of an input file and their sha256 (the batch's idempotency key)."""
    data = "".join(line.model_dump_json(exclude_none=True) + "\n" for line in lines).encode()
    return data, hashlib.sha256(data).hexdigest()


class OpenAIBatches:
    """Sends ChatRequests as Batch API jobs and waits for them; results in input order, billing="batch"."""

    def __init__(
        self,
        client: OpenAI,
        clients: HostedClients[OpenAI, Any],  # an OpenAIClients
        state: BackendState,
        settings: OpenAIConfig,
        *,
        retry: RetryPolicy,
        resolve_model: Callable[[str], str],
        sleep: Callable[[float], None] = time.sleep,
        poll_initial: float = 5.0,
        max_resubmissions: int = 3,
        max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.clients = clients
        self.state = state
        self.settings = settings
        self.retry = retry
        self.resolve_model = resolve_model
        self.sleep = sleep  # between polls
        self.poll_initial = poll_initial
        self.max_resubmissions = max_resubmissions
        self.max_requests_per_batch = max_requests_per_batch
        self.log = log or (lambda message: None)

    def _call(self, what: str, fn: Callable[[], Any], *, missing_ok: bool = False) -> Any:
        """`fn` under the retry policy; a refusal is `_refused`'s error; with `missing_ok` a 404 is None."""
        return self.retry.call_or_refuse(fn, what, self._refused, missing_ok=missing_ok)

    def _refused(self, exc: Exception, what: str) -> Exception:
        where, scrub = self.clients.where, self.clients.scrubber
        refused = self.clients.key_error(exc)
        if refused is not None:
            return refused
        if isinstance(exc, openai.NotFoundError):
            return UserError(f"this server ({where}) has no Batch API ({what}: 404): set openai.batch = false")
        if isinstance(exc, openai.BadRequestError):
            return UserError(f"the server refused {what}: {scrub.scrub(error_message(exc))}")
        return OPENAI_ERRORS.failure(exc, what, scrub)

    def check_available(self) -> None:
        """One cheap call that finds out, before anything is spent, whether this server has a Batch API."""
        self._call("listing batches", lambda: self.client.batches.list(limit=1))

    # -- the whole round ----------------------------------------------------------------------------------------

    def run(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        if not requests:
            return []
        keys = [r.key for r in requests]
        if len(set(keys)) != len(keys):
            raise ValueError("request keys must be unique in a batch (they are its custom_ids)")
        results: dict[str, ChatResult] = {}
        used: set[str] = set()  # batches already read in this call: never re-attach to them for missing requests

        def deliver(outcome: tuple[dict[str, ChatResult], list[Refusal]]) -> None:
            """Hand over every answer first, then stop on a request the server refused for good."""
            found, refused = outcome
            for key, result in found.items():
                if key not in results:
                    results[key] = result
                    if on_result is not None:
                        on_result(result)
            if refused:
                raise self._refusal_error(refused)

        for batch_id, earlier in self._earlier_batches(keys, used).items():  # a resumed run: re-attach, pay nothing
            self.log(f"re-attaching to batch {batch_id} ({len(earlier)} requests)")
            deliver(self._collect(self._wait(batch_id), set(earlier)))
            used.add(batch_id)

        submissions = 0
        while missing := [r for r in requests if r.key not in results]:
            if submissions > self.max_resubmissions:
                raise HostedRequestError(
                    f"batch chat ({len(missing)} of {len(requests)} requests, first {missing[0].key!r})",
                    "unanswered", f"still missing after {submissions} batches; run again to resubmit them",
                    submissions)
            submissions += 1
            batch_ids = [self._submit(missing[i:i + self.max_requests_per_batch], used)
                         for i in range(0, len(missing), self.max_requests_per_batch)]
            wanted = {r.key for r in missing}
            for batch_id in batch_ids:
                deliver(self._collect(self._wait(batch_id), wanted))
                used.add(batch_id)
        return [results[key] for key in keys]

    def _earlier_batches(self, keys: Sequence[str], used: set[str]) -> dict[str, list[str]]:
        """The batches earlier calls sent some of these requests in (a resumed run), by batch id."""
        by_input: dict[str, list[str]] = {}
        for key in keys:
            record = self.state.get(f"batchreq:{key}")
            if record and record.get("input_sha256"):
                by_input.setdefault(str(record["input_sha256"]), []).append(key)
        groups: dict[str, list[str]] = {}
        for sha, members in by_input.items():
            batch_id = self._known_batch(sha, used, usable_only=False)  # an expired one still has partial output
            if batch_id is not None:
                groups.setdefault(batch_id, []).extend(members)
        return groups

    # -- one batch ----------------------------------------------------------------------------------------------

    def _known_batch(self, sha: str, used: set[str], *, usable_only: bool) -> str | None:
        """The batch made for this input: the recorded one, else one found on the server by its metadata (created
        just before a crash). `usable_only` skips batches that ended unfinished; `used` ones are always skipped."""
        record_key = f"batch:{sha}"
        stored = self.state.get(record_key)
        record = BatchRecord.model_validate(stored) if stored else None
        if record is not None and record.batch_id and record.batch_id not in used:
            batch = self._retrieve(record.batch_id)
            if batch is not None and not (usable_only and batch.status in UNUSABLE):
                return record.batch_id
        found = self._find(sha, used, usable_only=usable_only)
        if found is not None and record is not None:
            self.state.put(record_key, record.model_copy(update={"status": "created", "batch_id": found}).model_dump())
        return found

    def _submit(self, requests: Sequence[ChatRequest], used: set[str]) -> str:
        """The id of a batch answering exactly these requests: one already made for the same input (unless it
        ended unfinished, or was read already in this call), else a new one.

        Order matters for a crash at any point: the input's record and every request's pointer to the input
        (`batchreq:<key>` -> input sha256) are written before the batch is created, the batch id after; a resumed
        run follows the pointers and finds the batch by record or, failing that, by `metadata.maft_batch`."""
        lines = [BatchLine(custom_id=r.key, body=chat_body(r, self.resolve_model(r.model))) for r in requests]
        data, sha = batch_input(lines)
        found = self._known_batch(sha, used, usable_only=True)
        if found is not None:
            return found
        record_key = f"batch:{sha}"
        stored = self.state.get(record_key)
        input_file_id = str(stored["input_file_id"]) if stored and stored.get("input_file_id") else None
        if input_file_id is None or not self._file_exists(input_file_id):
            uploaded = self._call("uploading a batch input file",
                                  lambda: self.client.files.create(file=(f"maft-batch-{sha[:12]}.jsonl", data),
                                                                   purpose="batch"))
            input_file_id = str(uploaded.id)
        record = BatchRecord(status="creating", input_file_id=input_file_id, requests=len(lines))
        self.state.put(record_key, record.model_dump())
        for line in lines:
            self.state.put(f"batchreq:{line.custom_id}", {"input_sha256": sha})
        batch_id = self._create(input_file_id, sha, used)
        crashpoint("batch.created")  # the server has the batch; our record does not have its id
        self.state.put(record_key, record.model_copy(update={"status": "created", "batch_id": batch_id}).model_dump())
        self.log(f"batch {batch_id}: {len(lines)} requests submitted")
        return batch_id

    def _retrieve(self, batch_id: str) -> Any | None:
        return self._call(f"looking up {batch_id}", lambda: self.client.batches.retrieve(batch_id), missing_ok=True)

    def _file_exists(self, file_id: str) -> bool:
        """False when the server no longer has it (deleted: upload again)."""
        return self._call("checking a batch input file", lambda: self.client.files.retrieve(file_id),
                          missing_ok=True) is not None

    def _create(self, input_file_id: str, sha: str, used: set[str]) -> str:
        """Create the batch; after a retryable failure look for it before trying again (it may exist)."""

        def create() -> str:
            batch = self.client.batches.create(completion_window="24h", endpoint=ENDPOINT,
                                               input_file_id=input_file_id, metadata={"maft_batch": sha})
            return str(batch.id)

        return self.retry.create_once(create, lambda: self._find(sha, used, usable_only=True), "creating a batch",
                                      refused=lambda exc: self._refused(exc, "creating a batch"))

    def _find(self, sha: str, used: set[str], *, usable_only: bool) -> str | None:
        """The newest batch on the server carrying `metadata.maft_batch == sha` (the list is newest first)."""

        def find() -> str | None:
            batches: Iterator[Any] = iter(self.client.batches.list(limit=100))
            for batch in scan(batches, _BATCHES_SCANNED):
                if ((batch.metadata or {}).get("maft_batch") == sha and batch.id not in used
                        and not (usable_only and batch.status in UNUSABLE)):
                    return str(batch.id)
            return None

        return self._call("listing batches", find)  # type: ignore[no-any-return]

    def _wait(self, batch_id: str) -> Any:
        """Poll until the batch ends: every `poll_initial` seconds at first, growing to `poll_interval`."""
        delay = min(self.poll_initial, self.settings.poll_interval)
        last = None
        while True:
            batch = self._call(f"polling batch {batch_id}", lambda: self.client.batches.retrieve(batch_id))
            if batch.status != last:
                counts = batch.request_counts
                done = f" ({counts.completed}/{counts.total} done)" if counts is not None else ""
                self.log(f"batch {batch_id}: {batch.status}{done}")
                last = batch.status
            if batch.status in TERMINAL:
                return batch
            self.sleep(delay)
            delay = min(delay * 1.5, self.settings.poll_interval)

    def _download(self, file_id: str | None) -> list[OutputLine]:
        if not file_id:
            return []
        text = self._call(f"downloading batch file {file_id}", lambda: self.client.files.content(file_id).text)
        lines = []
        for raw in str(text).splitlines():
            if raw.strip():
                try:
                    lines.append(OutputLine.model_validate_json(raw))
                except ValidationError:
                    continue  # a line we cannot read counts as missing and is sent again
        return lines

    def _collect(self, batch: Any, wanted: set[str]) -> tuple[dict[str, ChatResult], list[Refusal]]:
        """The answered requests of a finished batch, and those refused for good (4xx other than 429).
        Anything else missing (expired, 429, 5xx, unreadable) is left to be sent again."""
        found: dict[str, ChatResult] = {}
        refused: list[Refusal] = []
        for line in self._download(batch.output_file_id) + self._download(batch.error_file_id):
            if line.custom_id not in wanted or line.custom_id in found:
                continue
            status = line.response.status_code if line.response is not None else 0
            if status == 200 and line.response is not None:
                found[line.custom_id] = CompletionPayload.model_validate(line.response.body).to_result(
                    line.custom_id, billing="batch")
            elif 400 <= status < 500 and status != 429:
                body = line.response.body if line.response is not None else None
                refused.append((line.custom_id, status, _line_error(body, line.error)))
        if batch.status in UNUSABLE:
            errors = [e.message for e in (batch.errors.data or [])] if batch.errors is not None else []
            self.log(f"batch {batch.id} {batch.status} with {len(found)} answers; "
                     f"{'; '.join(str(e) for e in errors[:3]) or 'no error given'}")
        return found, refused

    def _refusal_error(self, refused: list[Refusal]) -> Exception:
        key, status, message = refused[0]
        message = self.clients.scrubber.scrub(message)
        if status == 404:
            return UserError(f"the model of batch request {key!r} is not available on this server: {message}")
        if status == 401:
            return UserError(f"the server rejected the API key (401): check {self.clients.key_variable} "
                             "in the environment or ./.env")
        return HostedRequestError(f"batch request {key!r} ({len(refused)} refused)", str(status), message)


def _line_error(body: Any, error: dict[str, Any] | None) -> str:
    for source in (body.get("error") if isinstance(body, dict) else None, error):
        if isinstance(source, dict) and source.get("message"):
            code = source.get("code")
            return f"{code}: {source['message']}" if code else str(source["message"])
    return json.dumps(body)[:300] if body is not None else "no error given"
