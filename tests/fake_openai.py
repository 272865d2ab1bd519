"""A stateful fake of the OpenAI HTTP API on 127.0.0.1, for tests that drive the official `openai` SDK.

Why a real server: openai >= 3 sends requests through httpx2, which respx-style transport mocks do not intercept,
and only a real socket lets a test see what a backend does when a connection is dropped without a response.
Standard library only (`ThreadingHTTPServer` in a daemon thread), so the fake needs nothing beyond the dev extras.

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
- `finetuning=False` hides /batches as well as /files and /fine_tuning (a batch needs an uploaded file).
- An expired batch writes the requests it never ran to its error file (code "batch_expired"), as OpenAI does; a
  cancelled batch keeps the first half of its requests if it was in progress, none if it was still validating.

    with FakeOpenAI(base_accuracy=0.5) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
        fake.inject(r"POST /v1/chat/completions", "429", retry_after=1.5)
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import math
import random
import re
import socket
import string
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

API_KEY = "sk-fake-test-key"
ORG = "fake-org"
BASE_MODELS = ("gpt-4.1-mini-2025-04-14", "gpt-4.1-nano-2025-04-14", "gpt-4o-mini-2024-07-18", "gpt-3.5-turbo-0125")
GSM8K_DIR = Path(__file__).resolve().parents[1] / "orchestrator" / "tasks" / "data" / "gsm8k"
FAULT_KINDS = ("429", "500", "503", "slow", "drop", "drop_after")
AUTO_EPOCHS = 3  # what "auto" n_epochs resolves to; trained_tokens = file tokens x epochs
MIN_TRAINING_EXAMPLES = 10  # OpenAI refuses smaller training files
MAX_STEP_EVENTS = 20  # long jobs log every k-th step, like OpenAI, so event lists stay short
TRAINING_ROLES = ("system", "user", "assistant")
_TERMINAL_JOB = ("succeeded", "failed", "cancelled")
_TERMINAL_BATCH = ("completed", "failed", "expired", "cancelled")


# ---------------------------------------------------------------- tokens and answers (pure functions)


def count_tokens(text: str) -> int:
    """The fake's tokenizer: four characters a token, so tests can compute expected usage by hand."""
    return math.ceil(len(text) / 4)


def content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts (other parts count as nothing)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def messages_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    return sum(count_tokens(content_text(m.get("content"))) for m in messages)


def evaluate_arithmetic(expression: str) -> int | None:
    """Value of `a+b*c-d...` (non-negative integers, + - *, usual precedence); None for anything else.

    A tiny parser instead of `eval`, because the text comes from the request.
    """
    tokens = re.findall(r"\d+|\S", expression)
    numbers, operators = tokens[0::2], tokens[1::2]
    if len(tokens) % 2 == 0 or not all(t.isdigit() for t in numbers) or not all(o in "+-*" for o in operators):
        return None
    terms, signs = [int(numbers[0])], [1]
    for operator, number in zip(operators, numbers[1:], strict=True):
        if operator == "*":
            terms[-1] *= int(number)
        else:
            terms.append(int(number))
            signs.append(1 if operator == "+" else -1)
    return sum(sign * term for sign, term in zip(signs, terms, strict=True))


def normalize_question(text: str) -> str:
    return " ".join(text.split())


@functools.cache
def gsm8k_answers() -> dict[str, str]:
    """Question (whitespace-normalized) -> gold answer, from the GSM8K files shipped with the package.

    Loaded once per process on first use: most tests never ask a GSM8K question.
    """
    answers: dict[str, str] = {}
    for split in ("train", "test"):
        with (GSM8K_DIR / f"{split}.jsonl").open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                gold = row["answer"].rpartition("####")[2]
                answers[normalize_question(row["question"])] = gold.strip().replace(",", "")
    return answers


@dataclass(frozen=True)
class Problem:
    kind: str  # "arithmetic" or "gsm8k"
    answer: int | float


_ARITHMETIC_PROMPT = re.compile(r"What is the result of\s*([0-9+\-*\s]+?)\s*\?")
_GSM8K_PROMPT = re.compile(
    r"Can you solve the following math problem\?\s*(.*?)\s*(?:Explain your reasoning|Provide a bullet point)", re.S
)
SUMMARY_PREFIX = "Here are a list of opinions"


def parse_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def first_user_text(messages: list[dict[str, Any]]) -> str:
    return next((content_text(m.get("content")) for m in messages if m.get("role") == "user"), "")


def find_problem(text: str) -> Problem | None:
    """The problem a prompt asks about: Du et al.'s arithmetic prompt, or a GSM8K question from the shipped data."""
    if match := _ARITHMETIC_PROMPT.search(text):
        value = evaluate_arithmetic(match.group(1))
        return None if value is None else Problem("arithmetic", value)
    if match := _GSM8K_PROMPT.search(text):
        answer = gsm8k_answers().get(normalize_question(match.group(1)))
        return None if answer is None else Problem("gsm8k", parse_number(answer))
    return None


def render_answer(problem: Problem, value: int | float) -> str:
    if problem.kind == "arithmetic":
        return f"Let me compute step by step. The answer is {format_number(value)}."
    return f"Reasoning: I worked through the problem step by step. The answer is \\boxed{{{format_number(value)}}}"


def summarize_opinions(text: str) -> str:
    """A summary that names each agent's final number (the last number in each quoted response)."""
    responses = re.findall(r"```(.*?)```", text, re.S) or [text]
    finals = [numbers[-1] for r in responses if (numbers := re.findall(r"-?\d+(?:\.\d+)?", r))]
    if not finals:
        return "The agents gave no numerical answers."
    return "Summary of the opinions: the agents' final answers were " + ", ".join(finals) + "."


def request_rng(*parts: Any) -> random.Random:
    """A RNG fixed by the request's content, so the same request always gets the same answer."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return random.Random(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))


def wrong_value(value: int | float, rng: random.Random) -> int | float:
    return value + rng.choice([-10, -7, -5, -3, -2, -1, 1, 2, 3, 5, 7, 10])


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


def check_training_file(data: bytes) -> tuple[int, int, str | None]:
    """(examples, tokens, error message naming the line or None) for a chat finetuning JSONL file."""
    try:
        lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        return 0, 0, "Invalid file format. The file is not UTF-8 text."
    tokens = 0
    for i, line in enumerate(lines, 1):
        line_tokens, problem = check_training_example(line)
        if problem:
            return len(lines), 0, f"Invalid file format. Line {i}: {problem}."
        tokens += line_tokens
    if len(lines) < MIN_TRAINING_EXAMPLES:
        return len(lines), tokens, (
            f"Training file has {len(lines)} example(s), but must have at least {MIN_TRAINING_EXAMPLES} examples."
        )
    return len(lines), tokens, None


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Form fields of a multipart/form-data body: name -> (filename or None, raw bytes)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ApiError(400, "Expected a multipart/form-data body with a boundary.")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + match.group(1).encode())[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        disposition = head.decode("utf-8", "replace")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, data.removesuffix(b"\r\n"))
    return fields


# ---------------------------------------------------------------- HTTP plumbing


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def reply(self) -> Reply:
        return Reply.json(self.payload(), self.status, self.headers)


def not_found(what: str, object_id: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(404, f"No such {what}: '{object_id}'.", param=param, code=code)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the socket without answering

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(obj).encode(), headers=headers or {})


@dataclass
class Call:
    """One parsed request, as the handlers see it."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: Mapping[str, str]
    body: bytes
    params: tuple[str, ...] = ()

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body or b"{}")
        except json.JSONDecodeError as e:
            raise ApiError(400, f"We could not parse the JSON body of your request. ({e})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return data

    def arg(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)

    def limit(self, default: int = 20) -> int:
        raw = self.arg("limit")
        if raw is None:
            return default
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise ApiError(400, f"Invalid 'limit': {raw!r}; expected an integer between 1 and 100.", param="limit")
        return int(raw)


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # relative to the API prefix, e.g. "/files/{id}/content"
    handler: str  # name of the FakeOpenAI method that answers it
    gated: bool = False  # served only when finetuning=True (files, jobs, batches: a chat-only server lacks them)
    azure_only: bool = False

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.sub(r"\\\{\w+\\\}", "([^/]+)", re.escape(self.template)) + "$")


ROUTES = (
    Route("POST", "/chat/completions", "_chat"),
    Route("POST", "/deployments/{deployment}/chat/completions", "_chat", azure_only=True),
    Route("GET", "/models", "_list_models"),
    Route("GET", "/models/{id}", "_get_model"),
    Route("POST", "/files", "_upload_file", gated=True),
    Route("GET", "/files", "_list_files", gated=True),
    Route("GET", "/files/{id}", "_get_file", gated=True),
    Route("DELETE", "/files/{id}", "_delete_file", gated=True),
    Route("GET", "/files/{id}/content", "_get_file_content", gated=True),
    Route("POST", "/fine_tuning/jobs", "_create_job", gated=True),
    Route("GET", "/fine_tuning/jobs", "_list_jobs", gated=True),
    Route("GET", "/fine_tuning/jobs/{id}", "_get_job", gated=True),
    Route("POST", "/fine_tuning/jobs/{id}/cancel", "_cancel_job", gated=True),
    Route("GET", "/fine_tuning/jobs/{id}/events", "_list_job_events", gated=True),
    Route("POST", "/batches", "_create_batch", gated=True),
    Route("GET", "/batches", "_list_batches", gated=True),
    Route("GET", "/batches/{id}", "_get_batch", gated=True),
    Route("POST", "/batches/{id}/cancel", "_cancel_batch", gated=True),
)
# Longest first: "/openai/v1/files" is Azure's v1 API, not "/openai" + "/v1/files".
PREFIXES = ("/openai/v1", "/openai", "/v1")


def match_route(method: str, path: str) -> tuple[str, Route, tuple[str, ...]] | None:
    """(prefix, route, url-decoded path parameters) for a request path, or None when nothing serves it."""
    for prefix in PREFIXES:
        if not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) :]
        for route in ROUTES:
            servable = route.method == method and (not route.azure_only or prefix == "/openai")
            if servable and (match := route.pattern.match(rest)):
                return prefix, route, tuple(unquote(p) for p in match.groups())
        return None
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
class _Injection:
    pattern: re.Pattern[str]
    kind: str
    times: int
    retry_after: float | None
    delay: float


@dataclass
class _Model:
    id: str
    root: str  # the base model at the bottom of a chain of finetunes
    depth: int  # how many finetunes deep (0 for a base model)
    created: int
    owned_by: str


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


def _empty_usage() -> dict[str, int]:
    keys = ("prompt_tokens", "completion_tokens", "cached_tokens", "requests", "batch_prompt_tokens",
            "batch_completion_tokens", "trained_tokens")
    return dict.fromkeys(keys, 0)


# ---------------------------------------------------------------- the fake


class FakeOpenAI:
    """The fake provider: state, behaviour switches for tests, and one handler method per route.

    All state lives behind one lock; handlers sleep (latency, "slow" faults) outside it, so a slow request never
    blocks the others.
    """

    api_key: str = API_KEY

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
        self.seed, self.finetuning, self.chat_latency = seed, finetuning, chat_latency
        self.base_accuracy, self.finetune_bonus = base_accuracy, finetune_bonus
        self.job_polls_per_state, self.batch_polls_per_state = job_polls_per_state, batch_polls_per_state
        self.max_running_jobs, self.daily_job_limit = max_running_jobs, daily_job_limit
        self.base_url = ""
        self.azure_endpoint = ""
        self.counts: collections.Counter[str] = collections.Counter()
        self.files: dict[str, dict[str, Any]] = {}
        self.file_contents: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.usage: dict[str, dict[str, int]] = {}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._ids = random.Random(f"ids/{seed}")
        self._storm_rng = random.Random(f"storm/{seed}")
        self._storm: tuple[float, tuple[str, ...], float | None, float] = (0.0, (), None, 0.0)
        self._injections: list[_Injection] = []
        self._fail_rules: list[tuple[str, str, str]] = []
        self._accuracy = dict(accuracy or {})
        self._models = {m: _Model(m, m, 0, 1_700_000_000, "system") for m in base_models}
        self._aliases = {re.sub(r"-(\d{4}-\d{2}-\d{2}|\d{4})$", "", m): m for m in base_models}
        self._seen_prefixes: set[tuple[str, str]] = set()
        self._job_state: dict[str, _JobState] = {}
        self._batch_state: dict[str, _BatchState] = {}
        self._expire_next: int | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeOpenAI:
        """Listen on a free port of 127.0.0.1 and serve from a daemon thread."""
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        port = self._server.server_address[1]
        self.azure_endpoint = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.azure_endpoint}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and close kept-alive connections, so no thread outlives a test."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ behaviour switches

    def inject(
        self, path_regex: str, kind: str, *, times: int = 1, retry_after: float | None = None, delay: float = 0.0
    ) -> None:
        """Answer the next `times` requests whose "METHOD /path" matches (re.search) with a fault.

        kind: "429", "500", "503" (OpenAI error JSON; Retry-After and retry-after-ms when retry_after is given),
        "slow" (sleep `delay` seconds, then answer normally), "drop" (close the socket without any response), or
        "drop_after" (do the work, e.g. create the job and bill the chat, then close the socket without answering:
        the lost-response case that idempotency keys exist for).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        with self._lock:
            self._injections.append(_Injection(re.compile(path_regex), kind, times, retry_after, delay))

    def storm(
        self,
        rate: float,
        kinds: tuple[str, ...] = ("429", "500", "drop"),
        *,
        retry_after: float | None = None,
        delay: float = 0.05,
    ) -> None:
        """Fault every request on every endpoint with probability `rate` (seeded RNG); rate 0 turns it off."""
        if unknown := set(kinds) - set(FAULT_KINDS):
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        with self._lock:
            self._storm = (rate, tuple(kinds), retry_after, delay)

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

    def set_accuracy(self, model: str, p: float) -> None:
        with self._lock:
            self._accuracy[model] = p

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
            for name in (model, info.id):
                if name in self._accuracy:
                    return self._accuracy[name]
            base = self._accuracy.get(info.root, self.base_accuracy)
            return min(1.0, base + self.finetune_bonus * info.depth)

    @property
    def model_ids(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def job_events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's events, oldest first (the API lists them newest first)."""
        with self._lock:
            return list(self._job_state[job_id].events)

    # ------------------------------------------------------------ request entry point

    def serve(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """Answer one HTTP request: count it, maybe fault it, check the key, then route it."""
        split = urlsplit(target)
        path, query = split.path, parse_qsl(split.query, keep_blank_values=True)
        matched = match_route(method, path)
        key = f"{method} {matched[0]}{matched[1].template}" if matched else f"{method} {path}"
        with self._lock:
            self.counts[key] += 1
            fault = self._take_fault(f"{method} {path}")
        kind = fault.kind if fault else None
        if fault is not None and kind == "drop":
            return Reply(drop=True)
        if fault is not None and kind == "slow":
            self._stopping.wait(fault.delay)
        if fault is not None and kind in ("429", "500", "503"):
            return fault_error(fault.kind, fault.retry_after).reply()
        try:
            reply = self._route(Call(method, path, query, headers, body), matched)
        except ApiError as e:
            reply = e.reply()
        except Exception as e:  # a bug in the fake: say so loudly instead of hanging the client
            reply = ApiError(500, f"fake_openai bug: {type(e).__name__}: {e}", type="server_error").reply()
        return Reply(drop=True) if kind == "drop_after" else reply

    def _route(self, call: Call, matched: tuple[str, Route, tuple[str, ...]] | None) -> Reply:
        self._authorize(call.headers)
        if matched is None or (matched[1].gated and not self.finetuning):
            raise ApiError(404, f"Invalid URL ({call.method} {call.path})")
        prefix, route, call.params = matched
        if prefix == "/openai" and call.arg("api-version") is None:
            raise ApiError(404, "Resource not found: Azure paths need an api-version query parameter.")
        handler: Callable[[Call], Reply] = getattr(self, route.handler)
        return handler(call)

    def _take_fault(self, line: str) -> _Injection | None:
        for injection in self._injections:
            if injection.times > 0 and injection.pattern.search(line):
                injection.times -= 1
                return injection
        rate, kinds, retry_after, delay = self._storm
        if rate > 0 and self._storm_rng.random() < rate:
            return _Injection(re.compile(""), self._storm_rng.choice(kinds), 1, retry_after, delay)
        return None

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

    def _new_id(self, prefix: str, length: int = 24) -> str:
        with self._lock:
            return prefix + "".join(self._ids.choices(string.ascii_letters + string.digits, k=length))

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

    # ------------------------------------------------------------ chat

    def _chat(self, call: Call) -> Reply:
        body = call.json()
        if call.params:  # Azure: the deployment names the model
            body["model"] = call.params[0]
        if self.chat_latency:
            self._stopping.wait(self.chat_latency)
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

    def _answer(self, model: str, body: dict[str, Any], index: int, p: float) -> str:
        """The text of one choice: right with probability p, decided by the request's content alone."""
        messages = body["messages"]
        text = first_user_text(messages)
        if text.startswith(SUMMARY_PREFIX):
            return summarize_opinions(text)
        problem = find_problem(text)
        if problem is None:
            return "I am not sure."
        rng = request_rng(self.seed, model, body.get("seed"), messages, index)
        value = problem.answer if rng.random() < p else wrong_value(problem.answer, rng)
        return render_answer(problem, value)

    def _cached_tokens(self, model: str, first_message: dict[str, Any]) -> int:
        """A repeated first message is a cache hit: its tokens count as cached (a crude model of prompt caching)."""
        key = (model, json.dumps(first_message, sort_keys=True))
        with self._lock:
            if key in self._seen_prefixes:
                return count_tokens(content_text(first_message.get("content")))
            self._seen_prefixes.add(key)
            return 0

    def _bill(self, model: str, **amounts: int) -> None:
        with self._lock:
            row = self.usage.setdefault(model, _empty_usage())
            for name, amount in amounts.items():
                row[name] += amount

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
        hyperparameters = job_hyperparameters(body)
        with self._lock:
            if self.daily_job_limit is not None and len(self.jobs) >= self.daily_job_limit:
                raise ApiError(
                    429,
                    f"This fine-tune request has been rate-limited. Your organization has reached the maximum of "
                    f"{self.daily_job_limit} fine-tuning requests per day.",
                    code="daily_rate_limit_exceeded",
                )
            job = self._new_job(body, base, training_file["id"], suffix, metadata, hyperparameters)
        return Reply.json(job)

    def _new_job(
        self,
        body: dict[str, Any],
        base: _Model,
        training_file: str,
        suffix: str | None,
        metadata: dict[str, str] | None,
        hyperparameters: dict[str, Any],
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
            "method": {"type": "supervised", "supervised": {"hyperparameters": dict(hyperparameters)}},
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
            job["method"]["supervised"]["hyperparameters"] = dict(job["hyperparameters"])
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
        _, _, problem = check_training_file(content)
        if problem:
            self._fail_job(job, "invalid_training_file", f"The job failed due to an invalid training file. {problem}",
                           "training_file")
            return
        job["status"] = "queued"
        self._event(job["id"], "Files validated, moving job to queued state")

    def _fail_job(self, job: dict[str, Any], code: str, message: str, param: str | None) -> None:
        job["status"] = "failed"
        job["error"] = {"code": code, "message": message, "param": param}
        job["finished_at"] = int(time.time())
        self._event(job["id"], message, level="error")

    def _finish_job(self, job: dict[str, Any], state: _JobState) -> None:
        """Succeed: log the steps, register the new model, write the results file, bill the trained tokens."""
        examples, tokens, _ = check_training_file(self.file_contents.get(job["training_file"], b""))
        epochs, batch_size = job["hyperparameters"]["n_epochs"], job["hyperparameters"]["batch_size"]
        total = max(1, math.ceil(examples / batch_size) * epochs)
        rng = random.Random(job["seed"])
        rows = []
        for step in sorted({*range(1, total + 1, math.ceil(total / MAX_STEP_EVENTS)), total}):
            loss = 1.5 * math.exp(-3 * step / total) + 0.05 * rng.random()
            rows.append(f"{step},{loss:.4f}")
            self._event(job["id"], f"Step {step}/{total}: training loss={loss:.4f}")
        short = self._new_id("", 8)
        name = f"ft:{state.root}:{ORG}:{job['user_provided_suffix'] or ''}:{short}"
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


def fault_error(kind: str, retry_after: float | None) -> ApiError:
    """The error answer of an injected 429, 500 or 503."""
    headers = {}
    if retry_after is not None:
        headers = {"Retry-After": f"{retry_after:g}", "retry-after-ms": str(round(retry_after * 1000))}
    if kind == "429":
        return ApiError(429, "Rate limit reached for requests (injected by fake_openai).", type="requests",
                        code="rate_limit_exceeded", headers=headers)
    if kind == "503":
        return ApiError(503, "The server is overloaded or not ready yet.", type="server_error", headers=headers)
    return ApiError(500, "The server had an error while processing your request. Sorry about that!",
                    type="server_error")


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


def job_hyperparameters(body: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters from `method.supervised.hyperparameters`, or the legacy top-level `hyperparameters`."""
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            raise ApiError(400, "The fake supports only method.type = 'supervised'.", param="method")
        given = (method.get("supervised") or {}).get("hyperparameters") or {}
    else:
        given = body.get("hyperparameters") or {}
    hyperparameters = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    for name, value in given.items():
        if name not in hyperparameters:
            raise ApiError(400, f"Unknown hyperparameter {name!r}.", param=f"hyperparameters.{name}")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise ApiError(400, f"Invalid value for {name}: {value!r}.", param=f"hyperparameters.{name}")
        hyperparameters[name] = value
    return hyperparameters


def resolved_hyperparameters(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """What "auto" becomes once a job starts (OpenAI reports the chosen values from then on)."""
    auto = {"n_epochs": AUTO_EPOCHS, "batch_size": 1, "learning_rate_multiplier": 2.0}
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler stuck in a "slow" fault must never keep the test process alive
    request_queue_size = 128  # backends open many connections at once
    fake: FakeOpenAI

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (timeouts, a stopped server) are expected; anything else is printed."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, lets the fake answer it, and writes (or withholds) the answer on a keep-alive connection."""

    protocol_version = "HTTP/1.1"
    wbufsize = -1  # headers and body leave in one write (the base class flushes after each request)
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Without this, Nagle's algorithm and delayed ACKs add ~40 ms to every small answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.fake._lock:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._lock:
            self.server.fake._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def _serve(self) -> None:
        body = self._read_body()
        headers = {k: v for k, v in self.headers.items()}
        reply = self.server.fake.serve(self.command, self.path, _Headers(headers), body)
        if reply.drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("x-request-id", self.server.fake._new_id("req_"))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: pytest output should show test failures, not access logs."""


class _Headers(dict[str, str]):
    """Case-insensitive header lookup, as HTTP requires."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        super().__init__({k.lower(): v for k, v in headers.items()})

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)
