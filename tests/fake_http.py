"""Provider-neutral machinery of the fake LLM APIs (`fake_openai`, `fake_together`): one place for what they share.

Why a real server: the official SDKs send requests through httpx (openai >= 3 through httpx2), which transport
mocks do not reliably intercept, and only a real socket lets a test see what a backend does when a connection is
dropped without a response. Standard library only (`ThreadingHTTPServer` in a daemon thread), so the fakes need
nothing beyond the dev extras.

What lives here:
- answers: a tokenizer (4 characters a token), Du et al.'s arithmetic prompts and GSM8K questions (from the data
  shipped with the package) answered right with a per-model probability that grows with finetune depth, and the
  summaries the debate asks for;
- HTTP: `FakeLLMServer`, a threaded server on 127.0.0.1 with TCP_NODELAY and single-write answers, a clean stop,
  request counts, fault injection (`inject`, `storm`) and OpenAI-shaped JSON errors; a provider subclasses it,
  declares its routes and answers them.

Faults are matched with `re.search` against "METHOD /raw/path" (no query string), before the API key is checked.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

GSM8K_DIR = Path(__file__).resolve().parents[1] / "orchestrator" / "tasks" / "data" / "gsm8k"
FAULT_KINDS = ("429", "500", "503", "slow", "drop", "drop_after")
SUMMARY_PREFIX = "Here are a list of opinions"


# ---------------------------------------------------------------- tokens and answers (pure functions)


def count_tokens(text: str) -> int:
    """The fakes' tokenizer: four characters a token, so tests can compute expected usage by hand."""
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


def answer_text(seed: int, model: str, body: Mapping[str, Any], index: int, p: float) -> str:
    """The text of one chat choice: right with probability p, decided by the request's content alone.

    A summary request gets a summary; a prompt the fake cannot read gets "I am not sure." (no number to grade).
    """
    messages = body["messages"]
    text = first_user_text(messages)
    if text.startswith(SUMMARY_PREFIX):
        return summarize_opinions(text)
    problem = find_problem(text)
    if problem is None:
        return "I am not sure."
    rng = request_rng(seed, model, body.get("seed"), messages, index)
    value = problem.answer if rng.random() < p else wrong_value(problem.answer, rng)
    return render_answer(problem, value)


@dataclass
class ModelInfo:
    """A model the fake serves or knows: a base model (depth 0) or a finetune of one."""

    id: str
    root: str  # the base model at the bottom of a chain of finetunes
    depth: int  # how many finetunes deep (0 for a base model)
    created: int
    owned_by: str


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


# ---------------------------------------------------------------- requests, answers and errors


class ApiError(Exception):
    """An error answered as OpenAI (and Together, which copies it) do: `{"error": {message, type, param, code}}`."""

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
    """One endpoint: METHOD + path template ("{name}" matches one path segment) -> name of the method answering it.

    The handler is looked up by name on each request, so a test may replace it on one fake instance.
    """

    method: str
    template: str  # e.g. "/files/{id}/content"
    handler: str

    @functools.cached_property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.sub(r"\\\{\w+\\\}", "([^/]+)", re.escape(self.template)) + "$")

    def match(self, method: str, path: str) -> tuple[str, ...] | None:
        """The url-decoded path parameters when this route serves the request, else None."""
        if method != self.method or not (match := self.pattern.match(path)):
            return None
        return tuple(unquote(p) for p in match.groups())


RouteT = TypeVar("RouteT", bound=Route)


def find_route(routes: Sequence[RouteT], method: str, path: str) -> tuple[RouteT, tuple[str, ...]] | None:
    """The first route (in declaration order) that serves the request, with its path parameters."""
    for route in routes:
        if (params := route.match(method, path)) is not None:
            return route, params
    return None


def fault_error(kind: str, retry_after: float | None, source: str) -> ApiError:
    """The error answer of an injected 429, 500 or 503 (Retry-After and retry-after-ms when retry_after is given)."""
    headers = {}
    if retry_after is not None:
        headers = {"Retry-After": f"{retry_after:g}", "retry-after-ms": str(round(retry_after * 1000))}
    if kind == "429":
        return ApiError(429, f"Rate limit reached for requests (injected by {source}).", type="requests",
                        code="rate_limit_exceeded", headers=headers)
    if kind == "503":
        return ApiError(503, "The server is overloaded or not ready yet.", type="server_error", headers=headers)
    return ApiError(500, "The server had an error while processing your request. Sorry about that!",
                    type="server_error")


@dataclass
class Injection:
    pattern: re.Pattern[str]
    kind: str
    times: int
    retry_after: float | None
    delay: float


# ---------------------------------------------------------------- the server


class FakeLLMServer:
    """What every fake provider shares: lifecycle, counts, faults, ids, usage, and chat answers by accuracy.

    A subclass sets `name` and `usage_keys`, and implements `resolve` (which route a request is, and the key it is
    counted under) and `dispatch` (check the key and answer). All state lives behind one re-entrant lock; handlers
    sleep (latency, "slow" faults) outside it, so a slow request never blocks the others.
    """

    name = "fake_http"  # named in injected errors and in the 500 a bug in the fake answers
    api_key = "fake-test-key"
    usage_keys: tuple[str, ...] = ("prompt_tokens", "completion_tokens", "requests", "trained_tokens")

    def __init__(
        self,
        *,
        seed: int = 0,
        chat_latency: float = 0.0,
        base_accuracy: float = 0.5,
        finetune_bonus: float = 0.25,
        accuracy: Mapping[str, float] | None = None,
    ) -> None:
        self.seed, self.chat_latency = seed, chat_latency
        self.base_accuracy, self.finetune_bonus = base_accuracy, finetune_bonus
        self.origin = ""  # "http://127.0.0.1:PORT" once started
        self.counts: collections.Counter[str] = collections.Counter()
        # every chat completion the server produced (and billed), by the request's content: a count above 1 is
        # the same paid request answered twice (a client retry after a lost answer, a resume redoing work)
        self.chat_bodies: collections.Counter[str] = collections.Counter()
        self.usage: dict[str, dict[str, int]] = {}
        self._accuracy = dict(accuracy or {})
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._ids = random.Random(f"ids/{seed}")
        self._storm_rng = random.Random(f"storm/{seed}")
        self._storm: tuple[float, tuple[str, ...], float | None, float] = (0.0, (), None, 0.0)
        self._injections: list[Injection] = []
        self._down = False
        self._down_after: tuple[int, float] | None = None  # (total requests, seconds down), see `outage`
        self.outages = 0  # times the server went down
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Listen on a free port of 127.0.0.1 and serve from a daemon thread."""
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ behaviour switches

    def inject(
        self, path_regex: str, kind: str, *, times: int = 1, retry_after: float | None = None, delay: float = 0.0
    ) -> None:
        """Answer the next `times` requests whose "METHOD /path" matches (re.search) with a fault.

        kind: "429", "500", "503" (error JSON; Retry-After and retry-after-ms when retry_after is given),
        "slow" (sleep `delay` seconds, then answer normally), "drop" (close the socket without any response), or
        "drop_after" (do the work, e.g. create the job and bill the chat, then close the socket without answering:
        the lost-response case that idempotency keys exist for).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        with self._lock:
            self._injections.append(Injection(re.compile(path_regex), kind, times, retry_after, delay))

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

    def go_down(self) -> None:
        """Answer nothing until `come_up`: every request's connection is closed unanswered, before any work (so
        nothing is paid for or created), as a server that is down or unreachable looks to a client."""
        with self._lock:
            self._down = True
            self.outages += 1

    def come_up(self) -> None:
        with self._lock:
            self._down = False

    def outage(self, after: int, seconds: float) -> None:
        """Go down once `after` requests have been served in all, and come back `seconds` later (`inf`: stay
        down until `come_up`)."""
        with self._lock:
            self._down_after = (after, seconds)

    def total_requests(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def set_accuracy(self, model: str, p: float) -> None:
        """Fix the chance that `model` answers right (wins over base_accuracy and the finetune bonus)."""
        with self._lock:
            self._accuracy[model] = p

    # ------------------------------------------------------------ request entry point

    def serve(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """Answer one HTTP request: count it, maybe fault it, then let the provider answer it."""
        split = urlsplit(target)
        path, query = split.path, parse_qsl(split.query, keep_blank_values=True)
        key, resolved = self.resolve(method, path)
        with self._lock:
            self._maybe_go_down()
            if self._down:
                return Reply(drop=True)
            self.counts[key] += 1
            fault = self._take_fault(f"{method} {path}")
        kind = fault.kind if fault else None
        if fault is not None and kind == "drop":
            return Reply(drop=True)
        if fault is not None and kind == "slow":
            self._stopping.wait(fault.delay)
        if fault is not None and kind in ("429", "500", "503"):
            return self.fault_error(fault.kind, fault.retry_after).reply()
        try:
            reply = self.dispatch(Call(method, path, query, headers, body), resolved)
        except ApiError as e:
            reply = e.reply()
        except Exception as e:  # a bug in the fake: say so loudly instead of hanging the client
            reply = ApiError(500, f"{self.name} bug: {type(e).__name__}: {e}", type="server_error").reply()
        return Reply(drop=True) if kind == "drop_after" else reply

    def resolve(self, method: str, path: str) -> tuple[str, Any]:
        """(the key `counts` uses for this request, whatever `dispatch` needs to answer it)."""
        raise NotImplementedError

    def dispatch(self, call: Call, resolved: Any) -> Reply:
        """Answer a request that was not faulted; raise ApiError for an error answer."""
        raise NotImplementedError

    def fault_error(self, kind: str, retry_after: float | None) -> ApiError:
        """The answer of an injected 429, 500 or 503; a provider may override it to use its own wording."""
        return fault_error(kind, retry_after, self.name)

    def call_handler(self, handler: str, call: Call) -> Reply:
        """Run the method named by a route (looked up now, so a test can replace it on one instance)."""
        method: Callable[[Call], Reply] = getattr(self, handler)
        return method(call)

    def _maybe_go_down(self) -> None:
        """Start the outage `outage` planned, once its request count is reached (called under the lock)."""
        if self._down_after is None or sum(self.counts.values()) < self._down_after[0]:
            return
        seconds = self._down_after[1]
        self._down_after, self._down = None, True
        self.outages += 1
        if math.isfinite(seconds):
            timer = threading.Timer(seconds, self.come_up)
            timer.daemon = True
            timer.start()

    def _take_fault(self, line: str) -> Injection | None:
        for injection in self._injections:
            if injection.times > 0 and injection.pattern.search(line):
                injection.times -= 1
                return injection
        rate, kinds, retry_after, delay = self._storm
        if rate > 0 and self._storm_rng.random() < rate:
            return Injection(re.compile(""), self._storm_rng.choice(kinds), 1, retry_after, delay)
        return None

    def _new_id(self, prefix: str, length: int = 24, alphabet: str = string.ascii_letters + string.digits) -> str:
        """A deterministic (seeded) random id, so two runs of a test see the same ids."""
        with self._lock:
            return prefix + "".join(self._ids.choices(alphabet, k=length))

    # ------------------------------------------------------------ chat answers and billing

    def _accuracy_for(self, info: ModelInfo, *names: str) -> float:
        """An explicit entry for any of `names` or the model's id wins; otherwise the root base model's accuracy
        (its entry, else base_accuracy) plus finetune_bonus per finetune, capped at 1."""
        with self._lock:
            for name in (*names, info.id):
                if name in self._accuracy:
                    return self._accuracy[name]
            base = self._accuracy.get(info.root, self.base_accuracy)
        return min(1.0, base + self.finetune_bonus * info.depth)

    def _answer(self, model: str, body: Mapping[str, Any], index: int, p: float) -> str:
        return answer_text(self.seed, model, body, index, p)

    def _wait_chat_latency(self) -> None:
        if self.chat_latency:
            self._stopping.wait(self.chat_latency)

    def record_chat(self, body: Mapping[str, Any]) -> None:
        """Count a chat request about to be answered, keyed by its content (model, messages, sampling, seed, ...;
        everything the client sent), so `repeated_chats` can tell a test whether paid work was asked for twice."""
        key = json.dumps(body, sort_keys=True, default=str)
        with self._lock:
            self.chat_bodies[key] += 1

    def repeated_chats(self) -> int:
        """Chat answers produced for a request whose identical twin had been answered before."""
        with self._lock:
            return sum(n - 1 for n in self.chat_bodies.values() if n > 1)

    def _bill(self, model: str, **amounts: int) -> None:
        with self._lock:
            row = self.usage.setdefault(model, dict.fromkeys(self.usage_keys, 0))
            for name, amount in amounts.items():
                row[name] += amount


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler stuck in a "slow" fault must never keep the test process alive
    request_queue_size = 128  # backends open many connections at once
    fake: FakeLLMServer

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
        reply = self.server.fake.serve(self.command, self.path, Headers(headers), body)
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


class Headers(dict[str, str]):
    """Case-insensitive header lookup, as HTTP requires."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        super().__init__({k.lower(): v for k, v in headers.items()})

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)
