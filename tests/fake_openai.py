"""A stateful fake of the OpenAI HTTP API on 127.0.0.1, for tests that drive the official `openai` SDK.

The server, fault injection, counts and chat answers are shared with the other fakes (`tests/fake_http.py`, which
also says why a real server); this module holds what is OpenAI's: routes, shapes, files, jobs and batches.

What it serves (bodies shaped like OpenAI's, so the SDK's typed models parse them):
  chat      POST /v1/chat/completions                      answers arithmetic and GSM8K prompts, right with a
                                                           probability per model (see `FakeOpenAI.accuracy_of`)
  files     POST|GET /v1/files, GET|DELETE /v1/files/{id}, GET /v1/files/{id}/content
  jobs      POST|GET /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs/{id}, POST .../{id}/cancel, GET .../{id}/events
  batches   POST|GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel
  models    GET /v1/models, GET /v1/models/{id}
The same handlers answer Azure paths: `/openai/...` with `?api-version=` (the `AzureOpenAI` client; chat at
`/openai/deployments/{deployment}/chat/completions`, deployment name = model name) and Azure's newer `/openai/v1/...`.

`counts` keys are "METHOD prefix+template", e.g. "GET /v1/fine_tuning/jobs/{id}" or
"POST /openai/deployments/{deployment}/chat/completions"; an unknown route is counted under its raw path.
Faults (`inject`, `storm`) are matched with `re.search` against "METHOD /raw/path" (no query string).

State moves only when a client looks at it (a job advances one state every `job_polls_per_state` GETs of
/fine_tuning/jobs/{id}, not on list or events; a batch likewise on GET /batches/{id}), so tests are fast and
deterministic and never wait on wall-clock timers.

Details a test may rely on, beyond OpenAI's shapes:
- Model aliases (a snapshot name without its date, e.g. "gpt-4o-mini") are accepted and answered as the snapshot.
- `usage[model]`: chat answers bill prompt/completion/cached tokens and `requests`; batch lines bill only the
  batch_* counters; a finished job bills `trained_tokens` to its root base model. Faulted requests bill nothing.
- A finetuned model's id is a pure function of its root base model, parent model, suffix and training data
  (`fine_tuned_model_name`), never of job ids or request order; answers are keyed by model id, so a run that was
  killed and resumed gets exactly the models and answers of an uninterrupted one.
- `chat_bodies` counts every chat completion produced (HTTP or batch line) by request content;
  `repeated_chats()` says how many were the same paid request answered again.
- `finetuning=False` hides /batches as well as /files and /fine_tuning (a batch needs an uploaded file).
- An expired batch writes the requests it never ran to its error file (code "batch_expired"), as OpenAI does; a
  cancelled batch keeps the first half of its requests if it was in progress, none if it was still validating.

    with FakeOpenAI(base_accuracy=0.5) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
        fake.inject(r"POST /v1/chat/completions", "429", retry_after=1.5)
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import string
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from tests.fake_http import (
    FAULT_KINDS,
    GSM8K_DIR,
    ApiError,
    Call,
    FakeLLMServer,
    ModelInfo,
    Reply,
    Route,
    content_text,
    count_tokens,
    find_route,
    messages_tokens,
    parse_multipart,
)

__all__ = ["API_KEY", "BASE_MODELS", "FAULT_KINDS", "GSM8K_DIR", "ApiError", "Call", "FakeOpenAI", "Reply"]

API_KEY = "sk-fake-test-key"
ORG = "fake-org"
BASE_MODELS = ("gpt-4.1-mini-2025-04-14", "gpt-4.1-nano-2025-04-14", "gpt-4o-mini-2024-07-18", "gpt-3.5-turbo-0125")
AUTO_EPOCHS = 3  # what "auto" n_epochs resolves to; trained_tokens = file tokens x epochs
MIN_TRAINING_EXAMPLES = 10  # OpenAI refuses smaller training files
MAX_STEP_EVENTS = 20  # long jobs log every k-th step, like OpenAI, so event lists stay short
TRAINING_ROLES = ("system", "user", "assistant")
_TERMINAL_JOB = ("succeeded", "failed", "cancelled")
_TERMINAL_BATCH = ("completed", "failed", "expired", "cancelled")
_Model = ModelInfo


# ---------------------------------------------------------------- training files (OpenAI's rules)

def check_training_example(line: str) -> tuple[int, str | None]:
    """Tokens of one line of a chat finetuning file, and what is wrong with it (None when it is fine)."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError:
        return 0, "not valid JSON"
    messages = example.get("messages") if isinstance(example, dict) else None
    if not isinstance(messages, list) or not messages:
        return 0, "'messages' must be a non-empty list"
    learned = 0
    for j, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in TRAINING_ROLES:
            return 0, f"message {j} has an unrecognized role (expected one of {', '.join(TRAINING_ROLES)})"
        if not isinstance(message.get("content"), str):
            return 0, f"message {j} has no string 'content'"
        weight = message.get("weight", 1)
        if weight not in (0, 1) or ("weight" in message and message["role"] != "assistant"):
            return 0, f"message {j}: 'weight' must be 0 or 1, on assistant messages only"
        learned += message["role"] == "assistant" and weight != 0
    if not learned:
        return 0, "no assistant message to learn from (every assistant message is missing or has weight 0)"
    return messages_tokens(messages), None


PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")


def check_preference_example(line: str) -> tuple[int, str | None]:
    """Tokens of one line of a preference (DPO) file, and what is wrong with it: OpenAI's format (`input.messages`,
    `preferred_output` and `non_preferred_output` each one assistant message) and its rule that "we only train on
    one-turn conversations" (one user message, the outputs answering it)."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError:
        return 0, "not valid JSON"
    if not isinstance(example, dict) or any(k not in example for k in PREFERENCE_KEYS):
        return 0, "a preference example needs 'input', 'preferred_output' and 'non_preferred_output'"
    messages = example["input"].get("messages") if isinstance(example["input"], dict) else None
    if not isinstance(messages, list) or not messages:
        return 0, "'input.messages' must be a non-empty list"
    for j, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in TRAINING_ROLES:
            return 0, f"input message {j} has an unrecognized role (expected one of {', '.join(TRAINING_ROLES)})"
        if not isinstance(message.get("content"), str):
            return 0, f"input message {j} has no string 'content'"
    if sum(m["role"] == "user" for m in messages) != 1 or messages[-1]["role"] != "user":
        return 0, ("only one-turn conversations are supported: 'input.messages' must hold exactly one user message, "
                   "and end with it")
    outputs = []
    for name in PREFERENCE_KEYS[1:]:
        output = example[name]
        if (not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict)
                or output[0].get("role") != "assistant" or not isinstance(output[0].get("content"), str)):
            return 0, f"'{name}' must be a list of exactly one assistant message"
        outputs += output
    return messages_tokens(messages + outputs), None


def check_preference_file(data: bytes) -> tuple[int, int, str | None]:
    """(examples, tokens, error message naming the line or None) for a preference JSONL file."""
    return _check_lines(data, check_preference_example)


def check_training_file(data: bytes) -> tuple[int, int, str | None]:
    """(examples, tokens, error message naming the line or None) for a chat finetuning JSONL file."""
    return _check_lines(data, check_training_example)


def _check_lines(data: bytes, check: Any) -> tuple[int, int, str | None]:
    """(examples, tokens, error message naming the line or None) for a chat finetuning JSONL file."""
    try:
        lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        return 0, 0, "Invalid file format. The file is not UTF-8 text."
    tokens = 0
    for i, line in enumerate(lines, 1):
        line_tokens, problem = check(line)
        if problem:
            return len(lines), 0, f"Invalid file format. Line {i}: {problem}."
        tokens += line_tokens
    if len(lines) < MIN_TRAINING_EXAMPLES:
        return len(lines), tokens, (
            f"Training file has {len(lines)} example(s), but must have at least {MIN_TRAINING_EXAMPLES} examples."
        )
    return len(lines), tokens, None


# ---------------------------------------------------------------- routes


def not_found(what: str, object_id: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(404, f"No such {what}: '{object_id}'.", param=param, code=code)


@dataclass(frozen=True)
class OpenAIRoute(Route):
    """A route relative to the API prefix ("/v1", "/openai" or "/openai/v1")."""

    gated: bool = False  # served only when finetuning=True (files, jobs, batches: a chat-only server lacks them)
    azure_only: bool = False


ROUTES = (
    OpenAIRoute("POST", "/chat/completions", "_chat"),
    OpenAIRoute("POST", "/embeddings", "_embed"),
    OpenAIRoute("POST", "/deployments/{deployment}/chat/completions", "_chat", azure_only=True),
    OpenAIRoute("GET", "/models", "_list_models"),
    OpenAIRoute("GET", "/models/{id}", "_get_model"),
    OpenAIRoute("POST", "/files", "_upload_file", gated=True),
    OpenAIRoute("GET", "/files", "_list_files", gated=True),
    OpenAIRoute("GET", "/files/{id}", "_get_file", gated=True),
    OpenAIRoute("DELETE", "/files/{id}", "_delete_file", gated=True),
    OpenAIRoute("GET", "/files/{id}/content", "_get_file_content", gated=True),
    OpenAIRoute("POST", "/fine_tuning/jobs", "_create_job", gated=True),
    OpenAIRoute("GET", "/fine_tuning/jobs", "_list_jobs", gated=True),
    OpenAIRoute("GET", "/fine_tuning/jobs/{id}", "_get_job", gated=True),
    OpenAIRoute("POST", "/fine_tuning/jobs/{id}/cancel", "_cancel_job", gated=True),
    OpenAIRoute("GET", "/fine_tuning/jobs/{id}/events", "_list_job_events", gated=True),
    OpenAIRoute("POST", "/batches", "_create_batch", gated=True),
    OpenAIRoute("GET", "/batches", "_list_batches", gated=True),
    OpenAIRoute("GET", "/batches/{id}", "_get_batch", gated=True),
    OpenAIRoute("POST", "/batches/{id}/cancel", "_cancel_batch", gated=True),
)
# Longest first: "/openai/v1/files" is Azure's v1 API, not "/openai" + "/v1/files".
PREFIXES = ("/openai/v1", "/openai", "/v1")


def match_route(method: str, path: str) -> tuple[str, OpenAIRoute, tuple[str, ...]] | None:
    """(prefix, route, url-decoded path parameters) for a request path, or None when nothing serves it."""
    for prefix in PREFIXES:
        if not path.startswith(prefix + "/"):
            continue
        routes = [r for r in ROUTES if not r.azure_only or prefix == "/openai"]
        found = find_route(routes, method, path[len(prefix) :])
        return None if found is None else (prefix, *found)
    return None

def page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """One cursor page of `items` (already in listing order), starting after the item whose id is `after`."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "has_more": len(items) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }



@dataclass
class _JobState:
    polls: int = 0
    depth: int = 1
    root: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _BatchState:
    polls: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    expire_after: int | None = None
    cancelled_in_progress: bool = False


# ---------------------------------------------------------------- the fake


class FakeOpenAI(FakeLLMServer):
    """The fake provider: state, behaviour switches for tests, and one handler method per route.

    All state lives behind one lock; handlers sleep (latency, "slow" faults) outside it, so a slow request never
    blocks the others.
    """

    name = "fake_openai"
    api_key: str = API_KEY
    usage_keys = ("prompt_tokens", "completion_tokens", "cached_tokens", "requests", "batch_prompt_tokens",
                  "batch_completion_tokens", "trained_tokens", "embedding_tokens")

    def __init__(
        self,
        *,
        seed: int = 0,
        finetuning: bool = True,
        chat_latency: float = 0.0,
        base_accuracy: float = 0.5,
        finetune_bonus: float = 0.25,
        accuracy: dict[str, float] | None = None,
        job_polls_per_state: int = 1,
        max_running_jobs: int | None = None,
        daily_job_limit: int | None = None,
        batch_polls_per_state: int = 1,
        base_models: Iterable[str] = BASE_MODELS,
    ) -> None:
        super().__init__(seed=seed, chat_latency=chat_latency, base_accuracy=base_accuracy,
                         finetune_bonus=finetune_bonus, accuracy=accuracy)
        self.finetuning = finetuning
        self.job_polls_per_state, self.batch_polls_per_state = job_polls_per_state, batch_polls_per_state
        self.max_running_jobs, self.daily_job_limit = max_running_jobs, daily_job_limit
        self.base_url = ""
        self.azure_endpoint = ""
        self.files: dict[str, dict[str, Any]] = {}
        self.file_contents: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._fail_rules: list[tuple[str, str, str]] = []
        self._models = {m: _Model(m, m, 0, 1_700_000_000, "system") for m in base_models}
        self._aliases = {re.sub(r"-(\d{4}-\d{2}-\d{2}|\d{4})$", "", m): m for m in base_models}
        self._seen_prefixes: set[tuple[str, str]] = set()
        self._job_state: dict[str, _JobState] = {}
        self._batch_state: dict[str, _BatchState] = {}
        self._expire_next: int | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Listen on a free port of 127.0.0.1; `base_url` is its /v1 API, `azure_endpoint` its root."""
        super().start()
        self.azure_endpoint = self.origin
        self.base_url = f"{self.origin}/v1"
        return self

    # ------------------------------------------------------------ behaviour switches

    def fail_jobs(
        self, suffix_contains: str, *, code: str = "invalid_training_file", message: str = "Injected failure."
    ) -> None:
        """Jobs whose suffix contains this string end `failed` at their next state change (so right after
        validating_files for new jobs) with error {code, message, param: None}."""
        with self._lock:
            self._fail_rules.append((suffix_contains, code, message))

    def clear_failures(self) -> None:
        """The cause of injected job failures is fixed: new jobs succeed again."""
        with self._lock:
            self._fail_rules.clear()


    def expire_batch(self, batch_id: str | None, after_lines: int) -> None:
        """The batch (None: the next one created) ends `expired` with output for only its first `after_lines`
        requests; the rest are written to the error file with code "batch_expired", as OpenAI does."""
        with self._lock:
            if batch_id is None:
                self._expire_next = after_lines
                return
            if batch_id not in self.batches:
                raise KeyError(batch_id)
            if self.batches[batch_id]["status"] in _TERMINAL_BATCH:
                raise ValueError(f"batch {batch_id} has already ended ({self.batches[batch_id]['status']})")
            self._batch_state[batch_id].expire_after = after_lines

    def accuracy_of(self, model: str) -> float:
        """The chance that `model` answers right: an explicit entry (set_accuracy / accuracy=) wins; otherwise the
        root base model's accuracy (its entry, else base_accuracy) plus finetune_bonus per finetune, capped at 1."""
        with self._lock:
            info = self._resolve_model(model)
        if info is None:
            raise KeyError(model)
        return self._accuracy_for(info, model)
    @property
    def model_ids(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def job_events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's events, oldest first (the API lists them newest first)."""
        with self._lock:
            return list(self._job_state[job_id].events)

    # ------------------------------------------------------------ request entry point

    # ------------------------------------------------------------ request entry point

    def resolve(self, method: str, path: str) -> tuple[str, tuple[str, OpenAIRoute, tuple[str, ...]] | None]:
        """Counted as "METHOD prefix+template", or "METHOD /raw/path" when no route serves it."""
        matched = match_route(method, path)
        return (f"{method} {matched[0]}{matched[1].template}" if matched else f"{method} {path}"), matched

    def dispatch(self, call: Call, matched: tuple[str, OpenAIRoute, tuple[str, ...]] | None) -> Reply:
        self._authorize(call.headers)
        if matched is None or (matched[1].gated and not self.finetuning):
            raise ApiError(404, f"Invalid URL ({call.method} {call.path})")
        prefix, route, call.params = matched
        if prefix == "/openai" and call.arg("api-version") is None:
            raise ApiError(404, "Resource not found: Azure paths need an api-version query parameter.")
        return self.call_handler(route.handler, call)

    def _authorize(self, headers: Mapping[str, str]) -> None:
        bearer = headers.get("Authorization") or ""
        if bearer == f"Bearer {self.api_key}" or headers.get("api-key") == self.api_key:
            return
        given = bearer.removeprefix("Bearer ") or headers.get("api-key") or ""
        shown = f"{given[:3]}***{given[-4:]}" if given else "(none)"
        raise ApiError(
            401,
            f"Incorrect API key provided: {shown}. You can find your API key at https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )


    # ------------------------------------------------------------ models

    def _resolve_model(self, name: Any) -> _Model | None:
        if not isinstance(name, str):
            return None
        return self._models.get(name) or self._models.get(self._aliases.get(name, ""))

    def _require_model(self, name: Any, status: int = 404) -> _Model:
        with self._lock:
            info = self._resolve_model(name)
        if info is None:
            raise ApiError(
                status,
                f"The model `{name}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return info

    @staticmethod
    def _model_object(info: _Model) -> dict[str, Any]:
        return {"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by}

    def _list_models(self, call: Call) -> Reply:
        with self._lock:
            data = [self._model_object(m) for m in self._models.values()]
            data += [self._model_object(self._models[m]) | {"id": alias} for alias, m in self._aliases.items()]
        return Reply.json({"object": "list", "data": data})

    def _get_model(self, call: Call) -> Reply:
        info = self._require_model(call.params[0])
        return Reply.json(self._model_object(info) | {"id": call.params[0]})

    # ------------------------------------------------------------ embeddings

    EMBEDDING_MODELS = ("text-embedding-3-small", "text-embedding-3-large")

    def _embed(self, call: Call) -> Reply:
        """Bag-of-words vectors (64 hashed buckets): texts sharing words point the same way, so diversity
        measured through this endpoint behaves like a real embedding, deterministically."""
        body = call.json()
        model = body.get("model")
        if model not in self.EMBEDDING_MODELS:
            raise ApiError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "'input' must be a string or a non-empty array of strings.", param="input")
        data = []
        for i, text in enumerate(texts):
            vector = [0.0] * 64
            for word in text.lower().split():
                vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1.0
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(count_tokens(t) for t in texts)
        self._bill(model, embedding_tokens=tokens)
        return Reply.json({"object": "list", "data": data, "model": model,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ------------------------------------------------------------ chat

    def _chat(self, call: Call) -> Reply:
        body = call.json()
        if call.params:  # Azure: the deployment names the model
            body["model"] = call.params[0]
        self._wait_chat_latency()
        return Reply.json(self.complete_chat(body))

    def complete_chat(self, body: dict[str, Any], *, batch: bool = False) -> dict[str, Any]:
        """A chat.completion for a request body, billed into `usage` (under batch_* counters for batch lines)."""
        if body.get("stream"):
            raise ApiError(400, "The fake does not stream; send stream=false.", param="stream")
        info = self._require_model(body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty array of message objects.", param="messages")
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 128:
            raise ApiError(400, f"Invalid 'n': {n!r}.", param="n")
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        self.record_chat(body)
        p = self.accuracy_of(info.id)
        texts = [self._answer(info.id, body, i, p) for i in range(n)]
        choices, completion_tokens = [], 0
        for i, text in enumerate(texts):
            finish = "stop"
            if isinstance(limit, int) and count_tokens(text) > limit:
                text, finish = text[: limit * 4], "length"
            completion_tokens += count_tokens(text)
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish})
        prompt_tokens = messages_tokens(messages)
        cached = self._cached_tokens(info.id, messages[0])
        self._bill_chat(info.id, prompt_tokens, completion_tokens, cached, batch=batch)
        return {
            "id": self._new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": info.id,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

    def _cached_tokens(self, model: str, first_message: dict[str, Any]) -> int:
        """A repeated first message is a cache hit: its tokens count as cached (a crude model of prompt caching)."""
        key = (model, json.dumps(first_message, sort_keys=True))
        with self._lock:
            if key in self._seen_prefixes:
                return count_tokens(content_text(first_message.get("content")))
            self._seen_prefixes.add(key)
            return 0

    def _bill_chat(self, model: str, prompt: int, completion: int, cached: int, *, batch: bool) -> None:
        if batch:
            self._bill(model, batch_prompt_tokens=prompt, batch_completion_tokens=completion)
        else:
            self._bill(model, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, requests=1)

    # ------------------------------------------------------------ files

    def store_file(self, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        """Keep a file (uploaded, or written by a job or batch) and return its file object."""
        file: dict[str, Any] = {
            "id": self._new_id("file-"),
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }
        with self._lock:
            self.files[file["id"]] = file
            self.file_contents[file["id"]] = content
        return file

    def _require_file(self, file_id: str, *, param: str | None = None) -> dict[str, Any]:
        with self._lock:
            if file_id not in self.files:
                raise not_found("File", file_id, param=param)
            return self.files[file_id]

    def _upload_file(self, call: Call) -> Reply:
        fields = parse_multipart(call.body, call.headers.get("Content-Type") or "")
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if "file" not in fields:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        if purpose not in ("fine-tune", "batch"):
            raise ApiError(400, f"Invalid purpose {purpose!r}; expected 'fine-tune' or 'batch'.", param="purpose")
        filename, content = fields["file"]
        return Reply.json(self.store_file(filename or "upload.jsonl", content, purpose))

    def _list_files(self, call: Call) -> Reply:
        purpose = call.arg("purpose")
        with self._lock:
            files = [f for f in self.files.values() if purpose is None or f["purpose"] == purpose]
        if call.arg("order") != "asc":
            files.reverse()
        return Reply.json(page(files, call.arg("after"), call.limit(10_000)))

    def _get_file(self, call: Call) -> Reply:
        return Reply.json(self._require_file(call.params[0]))

    def _get_file_content(self, call: Call) -> Reply:
        with self._lock:
            self._require_file(call.params[0])
            return Reply(body=self.file_contents[call.params[0]], content_type="application/octet-stream")

    def _delete_file(self, call: Call) -> Reply:
        file_id = call.params[0]
        with self._lock:
            self._require_file(file_id)
            del self.files[file_id], self.file_contents[file_id]
        return Reply.json({"id": file_id, "object": "file", "deleted": True})

    # ------------------------------------------------------------ fine-tuning jobs

    def _create_job(self, call: Call) -> Reply:
        body = call.json()
        base = self._require_model(body.get("model"), status=400)
        training_file = self._require_file(str(body.get("training_file")), param="training_file")
        if training_file["purpose"] != "fine-tune":
            raise ApiError(400, f"File {training_file['id']} was not uploaded for purpose 'fine-tune'.",
                           param="training_file")
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64):
            raise ApiError(400, "'suffix' must be a string of at most 64 characters.", param="suffix")
        metadata = check_metadata(body.get("metadata"))
        legacy_azure = call.path.startswith("/openai/") and not call.path.startswith("/openai/v1/")
        kind, hyperparameters = job_hyperparameters(body, azure=legacy_azure)
        with self._lock:
            if self.daily_job_limit is not None and len(self.jobs) >= self.daily_job_limit:
                raise ApiError(
                    429,
                    f"This fine-tune request has been rate-limited. Your organization has reached the maximum of "
                    f"{self.daily_job_limit} fine-tuning requests per day.",
                    code="daily_rate_limit_exceeded",
                )
            job = self._new_job(body, base, training_file["id"], suffix, metadata, hyperparameters, kind)
        return Reply.json(job)

    def _new_job(
        self,
        body: dict[str, Any],
        base: _Model,
        training_file: str,
        suffix: str | None,
        metadata: dict[str, str] | None,
        hyperparameters: dict[str, Any],
        kind: str = "supervised",
    ) -> dict[str, Any]:
        job_id = self._new_id("ftjob-")
        seed = body.get("seed")
        job: dict[str, Any] = {
            "object": "fine_tuning.job",
            "id": job_id,
            "model": base.id,
            "created_at": int(time.time()),
            "finished_at": None,
            "fine_tuned_model": None,
            "organization_id": f"org-{ORG}",
            "result_files": [],
            "status": "validating_files",
            "validation_file": body.get("validation_file"),
            "training_file": training_file,
            "hyperparameters": hyperparameters,
            "method": {"type": kind, kind: {"hyperparameters": dict(hyperparameters)}},
            "trained_tokens": None,
            "error": None,
            "user_provided_suffix": suffix,
            "seed": seed if isinstance(seed, int) else self._ids.randrange(2**31),
            "estimated_finish": None,
            "integrations": [],
            "metadata": metadata,
        }
        self.jobs[job_id] = job
        self._job_state[job_id] = _JobState(depth=base.depth + 1, root=base.root)
        self._event(job_id, f"Created fine-tuning job: {job_id}")
        self._event(job_id, f"Validating training file: {training_file}")
        return job

    def _event(self, job_id: str, message: str, level: str = "info") -> None:
        self._job_state[job_id].events.append(
            {
                "object": "fine_tuning.job.event",
                "id": self._new_id("ftevent-"),
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": {},
                "type": "message",
            }
        )

    def _require_job(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise not_found("fine-tuning job", job_id, param="fine_tuning_job_id")
        return self.jobs[job_id]

    def _list_jobs(self, call: Call) -> Reply:
        wanted = {k[len("metadata[") : -1]: v for k, v in call.query if k.startswith("metadata[") and k.endswith("]")}
        null_metadata = call.arg("metadata") == "null"
        with self._lock:
            jobs = [
                job
                for job in reversed(self.jobs.values())
                if (job["metadata"] is None if null_metadata else all(
                    (job["metadata"] or {}).get(k) == v for k, v in wanted.items()))
            ]
            return Reply.json(page(jobs, call.arg("after"), call.limit()))

    def _get_job(self, call: Call) -> Reply:
        with self._lock:
            job = self._require_job(call.params[0])
            self._poll_job(job)
            return Reply.json(job)

    def _cancel_job(self, call: Call) -> Reply:
        with self._lock:
            job = self._require_job(call.params[0])
            if job["status"] in _TERMINAL_JOB:
                raise ApiError(400, f"Job {job['id']} has already ended ({job['status']}) and cannot be cancelled.")
            job["status"] = "cancelled"
            self._event(job["id"], "Fine-tuning job cancelled")
            return Reply.json(job)

    def _list_job_events(self, call: Call) -> Reply:
        with self._lock:
            self._require_job(call.params[0])
            events = list(reversed(self._job_state[call.params[0]].events))
            return Reply.json(page(events, call.arg("after"), call.limit()))

    def _poll_job(self, job: dict[str, Any]) -> None:
        """Count a retrieval; every `job_polls_per_state` of them the job moves on by one state."""
        state = self._job_state[job["id"]]
        if job["status"] in _TERMINAL_JOB:
            return
        state.polls += 1
        if state.polls >= self.job_polls_per_state and self._advance_job(job, state):
            state.polls = 0

    def _advance_job(self, job: dict[str, Any], state: _JobState) -> bool:
        """One step of validating_files -> queued -> running -> succeeded (or failed); False if it must wait."""
        suffix = job["user_provided_suffix"] or ""
        rule = next((r for r in self._fail_rules if r[0] in suffix), None)
        if rule is not None:
            self._fail_job(job, rule[1], rule[2], None)
        elif job["status"] == "validating_files":
            self._validate_job(job)
        elif job["status"] == "queued":
            running = sum(j["status"] == "running" for j in self.jobs.values())
            if self.max_running_jobs is not None and running >= self.max_running_jobs:
                return False
            job["status"] = "running"
            job["hyperparameters"] = resolved_hyperparameters(job["hyperparameters"])
            job["method"][job["method"]["type"]]["hyperparameters"] = dict(job["hyperparameters"])
            self._event(job["id"], "Fine-tuning job started")
        elif job["status"] == "running":
            self._finish_job(job, state)
        return True

    def _validate_job(self, job: dict[str, Any]) -> None:
        content = self.file_contents.get(job["training_file"])
        if content is None:
            self._fail_job(job, "invalid_training_file", f"Training file {job['training_file']} was deleted.",
                           "training_file")
            return
        _, _, problem = self._check_job_file(job, content)
        if problem:
            self._fail_job(job, "invalid_training_file", f"The job failed due to an invalid training file. {problem}",
                           "training_file")
            return
        job["status"] = "queued"
        self._event(job["id"], "Files validated, moving job to queued state")

    @staticmethod
    def _check_job_file(job: dict[str, Any], content: bytes) -> tuple[int, int, str | None]:
        """A DPO job's file in the preference format, any other's in the chat format."""
        return (check_preference_file if job["method"]["type"] == "dpo" else check_training_file)(content)

    def _fail_job(self, job: dict[str, Any], code: str, message: str, param: str | None) -> None:
        job["status"] = "failed"
        job["error"] = {"code": code, "message": message, "param": param}
        job["finished_at"] = int(time.time())
        self._event(job["id"], message, level="error")

    def _finish_job(self, job: dict[str, Any], state: _JobState) -> None:
        """Succeed: log the steps, register the new model, write the results file, bill the trained tokens."""
        examples, tokens, _ = self._check_job_file(job, self.file_contents.get(job["training_file"], b""))
        epochs, batch_size = job["hyperparameters"]["n_epochs"], job["hyperparameters"]["batch_size"]
        total = max(1, math.ceil(examples / batch_size) * epochs)
        rng = random.Random(job["seed"])
        rows = []
        for step in sorted({*range(1, total + 1, math.ceil(total / MAX_STEP_EVENTS)), total}):
            loss = 1.5 * math.exp(-3 * step / total) + 0.05 * rng.random()
            rows.append(f"{step},{loss:.4f}")
            self._event(job["id"], f"Step {step}/{total}: training loss={loss:.4f}")
        content = self.file_contents.get(job["training_file"], b"")
        name = fine_tuned_model_name(state.root, job["model"], job["user_provided_suffix"], content)
        self._models[name] = _Model(name, state.root, state.depth, int(time.time()), ORG)
        results = self.store_file("step_metrics.csv", ("step,train_loss\n" + "\n".join(rows) + "\n").encode(),
                                  "fine-tune-results")
        trained = tokens * epochs
        job.update(status="succeeded", fine_tuned_model=name, trained_tokens=trained, finished_at=int(time.time()),
                   result_files=[results["id"]])
        self._bill(state.root, trained_tokens=trained)
        self._event(job["id"], f"New fine-tuned model created: {name}")
        self._event(job["id"], "The job has successfully completed")

    # ------------------------------------------------------------ batches

    def _create_batch(self, call: Call) -> Reply:
        body = call.json()
        input_file = self._require_file(str(body.get("input_file_id")), param="input_file_id")
        if input_file["purpose"] != "batch":
            raise ApiError(400, f"File {input_file['id']} was not uploaded for purpose 'batch'.", param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in ("/v1/chat/completions", "/chat/completions"):
            raise ApiError(400, f"The fake batches only chat completions, not {endpoint!r}.", param="endpoint")
        if body.get("completion_window") != "24h":
            raise ApiError(400, "completion_window must be '24h'.", param="completion_window")
        now = int(time.time())
        batch = {
            "id": self._new_id("batch_"),
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file["id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86_400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": check_metadata(body.get("metadata")),
            "model": None,
            "usage": None,
        }
        with self._lock:
            self.batches[batch["id"]] = batch
            self._batch_state[batch["id"]] = _BatchState(expire_after=self._expire_next)
            self._expire_next = None
        return Reply.json(batch)

    def _require_batch(self, batch_id: str) -> dict[str, Any]:
        if batch_id not in self.batches:
            raise not_found("batch", batch_id, param="batch_id")
        return self.batches[batch_id]

    def _list_batches(self, call: Call) -> Reply:
        with self._lock:
            return Reply.json(page(list(reversed(self.batches.values())), call.arg("after"), call.limit()))

    def _get_batch(self, call: Call) -> Reply:
        with self._lock:
            batch = self._require_batch(call.params[0])
            state = self._batch_state[batch["id"]]
            if batch["status"] not in _TERMINAL_BATCH:
                state.polls += 1
                if state.polls >= self.batch_polls_per_state:
                    state.polls = 0
                    self._advance_batch(batch, state)
            return Reply.json(batch)

    def _cancel_batch(self, call: Call) -> Reply:
        with self._lock:
            batch = self._require_batch(call.params[0])
            if batch["status"] in ("completed", "failed", "expired"):
                raise ApiError(400, f"Cannot cancel a batch with status '{batch['status']}'.")
            if batch["status"] in ("validating", "in_progress"):
                self._batch_state[batch["id"]].cancelled_in_progress = batch["status"] == "in_progress"
                batch.update(status="cancelling", cancelling_at=int(time.time()))
            return Reply.json(batch)

    def _advance_batch(self, batch: dict[str, Any], state: _BatchState) -> None:
        """validating -> in_progress -> completed | expired; cancelling -> cancelled (half done if it had started)."""
        if batch["status"] == "validating":
            self._start_batch(batch, state)
        elif batch["status"] == "in_progress":
            if state.expire_after is not None:
                self._end_batch(batch, state, "expired", state.requests[: state.expire_after])
            else:
                self._end_batch(batch, state, "completed", state.requests)
        elif batch["status"] == "cancelling":
            done = state.requests[: len(state.requests) // 2] if state.cancelled_in_progress else []
            self._end_batch(batch, state, "cancelled", done)

    def _start_batch(self, batch: dict[str, Any], state: _BatchState) -> None:
        requests, errors = parse_batch_input(self.file_contents.get(batch["input_file_id"], b""), batch["endpoint"])
        if errors:
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors})
            return
        state.requests = requests
        model = requests[0]["body"].get("model") if requests else None
        batch.update(status="in_progress", in_progress_at=int(time.time()), model=model,
                     request_counts={"total": len(requests), "completed": 0, "failed": 0})

    def _end_batch(self, batch: dict[str, Any], state: _BatchState, status: str, done: list[dict[str, Any]]) -> None:
        """Run the requests that got done, write the output and error files, and close the batch with `status`."""
        outputs, errors, usage = [], [], {"input": 0, "cached": 0, "output": 0}
        for request in done:
            line = {"id": self._new_id("batch_req_"), "custom_id": request["custom_id"], "error": None}
            try:
                body = self.complete_chat(dict(request["body"]), batch=True)
            except ApiError as e:
                errors.append(line | {"response": self._batch_response(e.status, e.payload())})
                continue
            outputs.append(line | {"response": self._batch_response(200, body)})
            tokens = body["usage"]
            usage["input"] += tokens["prompt_tokens"]
            usage["cached"] += tokens["prompt_tokens_details"]["cached_tokens"]
            usage["output"] += tokens["completion_tokens"]
        if status == "expired":
            message = "This request could not be executed before the completion window expired."
            errors += [
                {"id": self._new_id("batch_req_"), "custom_id": r["custom_id"], "response": None,
                 "error": {"code": "batch_expired", "message": message}}
                for r in state.requests[len(done) :]
            ]
        now = int(time.time())
        batch.update(
            status=status,
            output_file_id=self._batch_file(batch, "output", outputs),
            error_file_id=self._batch_file(batch, "error", errors),
            request_counts={"total": len(state.requests), "completed": len(outputs), "failed": len(errors)},
            usage={
                "input_tokens": usage["input"],
                "input_tokens_details": {"cached_tokens": usage["cached"]},
                "output_tokens": usage["output"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["input"] + usage["output"],
            },
            finalizing_at=now if status == "completed" else None,
        )
        batch[f"{status}_at"] = now

    def _batch_response(self, status: int, body: dict[str, Any]) -> dict[str, Any]:
        return {"status_code": status, "request_id": self._new_id("req_", 32), "body": body}

    def _batch_file(self, batch: dict[str, Any], kind: str, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return None
        content = "".join(json.dumps(line) + "\n" for line in lines).encode()
        return str(self.store_file(f"{batch['id']}_{kind}.jsonl", content, "batch_output")["id"])



def fine_tuned_model_name(root: str, parent: str, suffix: str | None, training_file: bytes) -> str:
    """`ft:ROOT:ORG:SUFFIX:ID`, with ID a pure function of what the model is made of: its root base model, the
    model it was trained from (a chained finetune's parent), the suffix and the training data's content.

    Not of the job id or of how many requests the fake has served: a run killed and resumed makes extra list and
    retrieve calls, and its retried jobs get new ids, yet must get the very same model, hence (answers being keyed
    by model id) the very same answers as an uninterrupted run.
    """
    blob = json.dumps([root, parent, suffix or "", hashlib.sha256(training_file).hexdigest()]).encode()
    number = int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")
    alphabet = string.ascii_letters + string.digits
    short = ""
    for _ in range(8):
        number, digit = divmod(number, len(alphabet))
        short += alphabet[digit]
    return f"ft:{root}:{ORG}:{suffix or ''}:{short}"


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """OpenAI's rule: at most 16 string pairs, keys up to 64 and values up to 512 characters."""
    if metadata is None:
        return None
    valid = isinstance(metadata, dict) and len(metadata) <= 16 and all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items()
    )
    if not valid:
        raise ApiError(400, "Invalid metadata: at most 16 string pairs, keys <= 64 and values <= 512 characters.",
                       param="metadata")
    return dict(metadata)


def job_hyperparameters(body: dict[str, Any], *, azure: bool = False) -> tuple[str, dict[str, Any]]:
    """The method type and its hyperparameters: from `method.supervised.hyperparameters` (or the legacy top-level
    `hyperparameters`), or `method.dpo.hyperparameters` (with `beta`). Azure's api-version API takes a DPO
    method's hyperparameters flat, `method.dpo.beta` (and `l2_multiplier`), and refuses OpenAI's nesting."""
    method = body.get("method")
    kind = "supervised"
    if method is not None:
        if not isinstance(method, dict) or method.get("type") not in ("supervised", "dpo"):
            raise ApiError(400, "The fake supports only method.type 'supervised' and 'dpo'.", param="method")
        kind = method["type"]
        given = dict((method.get(kind) or {}).get("hyperparameters") or {})
        if kind == "dpo" and azure:
            flat = dict(method.get("dpo") or {})
            if "hyperparameters" in flat:
                raise ApiError(400, "Unknown parameter 'method.dpo.hyperparameters': give beta and l2_multiplier "
                               "directly in method.dpo.", param="method.dpo.hyperparameters")
            given = {k: v for k, v in flat.items() if k != "l2_multiplier"}
    else:
        given = body.get("hyperparameters") or {}
    hyperparameters = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    if kind == "dpo":
        hyperparameters["beta"] = "auto"
    for name, value in given.items():
        if name not in hyperparameters:
            raise ApiError(400, f"Unknown hyperparameter {name!r}.", param=f"hyperparameters.{name}")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise ApiError(400, f"Invalid value for {name}: {value!r}.", param=f"hyperparameters.{name}")
        hyperparameters[name] = value
    return kind, hyperparameters


def resolved_hyperparameters(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """What "auto" becomes once a job starts (OpenAI reports the chosen values from then on)."""
    auto = {"n_epochs": AUTO_EPOCHS, "batch_size": 1, "learning_rate_multiplier": 2.0, "beta": 0.1}
    return {k: auto[k] if v == "auto" else v for k, v in hyperparameters.items()}


def parse_batch_input(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The requests of a batch input file, or the errors that make the whole batch fail (as OpenAI validates)."""
    requests: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    accepted_urls = {endpoint, "/v1" + endpoint, endpoint.removeprefix("/v1")}
    for i, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError:
            errors.append({"code": "invalid_json_line", "message": "This line is not valid JSON.", "line": i,
                           "param": None})
            continue
        problem = None
        if not isinstance(request, dict) or not isinstance(request.get("custom_id"), str):
            problem = ("missing_required_parameter", "Each line needs a string custom_id.", "custom_id")
        elif request["custom_id"] in seen:
            problem = ("duplicate_custom_id", f"custom_id {request['custom_id']!r} is used twice.", "custom_id")
        elif request.get("method") != "POST" or request.get("url") not in accepted_urls:
            problem = ("invalid_url", f"Each line must POST to {endpoint}.", "url")
        elif not isinstance(request.get("body"), dict):
            problem = ("missing_required_parameter", "Each line needs a body object.", "body")
        if problem:
            errors.append({"code": problem[0], "message": problem[1], "line": i, "param": problem[2]})
            continue
        seen.add(request["custom_id"])
        requests.append(request)
    if not requests and not errors:
        errors.append({"code": "empty_file", "message": "The input file has no requests.", "line": None,
                       "param": None})
    return requests, errors

