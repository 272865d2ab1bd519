"""The openai backend: pure logic first (validation, limiter, retry parsing, secrets), then the whole backend
against the fake OpenAI server on loopback, only ever through the official SDK."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from backends.base import BASE_MODEL_ID, ChatMessage, ChatRequest, ChatResult, FinetuneSpec, JobRef, MemoryState
from backends.hosted.chat import ChatBody, CompletionPayload, chat_body
from backends.hosted.chat_files import CharEstimate, load_token_counter
from backends.hosted.env import Scrubber, parse_dotenv, read_environment
from backends.hosted.errors import HostedRequestError, ProviderUnavailable
from backends.hosted.rate_limit import RateLimiter, TokenBucket, estimate_request_tokens
from backends.hosted.retry import Backoff, parse_retry_after
from backends.openai import OpenAIBackend
from backends.openai_batch import batch_input
from backends.openai_client import NO_KEY_PLACEHOLDER, OPENAI_ERRORS, resolve_credentials
from backends.openai_finetune import job_status, maft_key, sanitize_suffix, validate_training_file
from backends.openai_settings import OpenAIConfig
from foundation.errors import UserError
from tests.fake_openai import FakeOpenAI

MODEL = "gpt-4.1-mini-2025-04-14"
NO_DOTENV = Path("/nonexistent/.env")
QUESTION = "What is the result of {a}+{b}? Make sure to state your answer at the end of the response."


# ================================================================ pure logic


# -- .env and credentials


def test_dotenv_parser_reads_the_usual_forms() -> None:
    text = "\n".join([
        "# a comment",
        "",
        "OPENAI_API_KEY=sk-plain  # trailing comment",
        "export OPENAI_BASE_URL=http://127.0.0.1:8000/v1",
        'QUOTED="a value # not a comment"',
        "SINGLE='kept as is \\n'",
        'ESCAPED="line\\nnext \\"q\\""',
        "EMPTY=",
    ])
    values = parse_dotenv(text)
    assert values == {
        "OPENAI_API_KEY": "sk-plain",
        "OPENAI_BASE_URL": "http://127.0.0.1:8000/v1",
        "QUOTED": "a value # not a comment",
        "SINGLE": "kept as is \\n",
        "ESCAPED": 'line\nnext "q"',
        "EMPTY": "",
    }


@pytest.mark.parametrize("line", ["just words sk-secret-value", "1BAD=x", 'KEY="unterminated sk-secret-value',
                                  "KEY='x' trailing"])
def test_dotenv_parser_names_the_line_never_its_content(line: str) -> None:
    with pytest.raises(UserError) as info:
        parse_dotenv(f"OK=1\n{line}\n", source=".env")
    message = str(info.value)
    assert message.startswith(".env line 2 ") and "secret" not in message and "trailing" not in message


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("OPENAI_API_KEY=from-file\nOPENAI_ORG_ID=org-file\n")
    env = read_environment({"OPENAI_API_KEY": "from-env"}, dotenv)
    assert env["OPENAI_API_KEY"] == "from-env" and env["OPENAI_ORG_ID"] == "org-file"


def test_missing_key_is_one_line_naming_the_variable() -> None:
    with pytest.raises(UserError, match=r"^no OpenAI API key: set OPENAI_API_KEY in the environment or in \./\.env$"):
        resolve_credentials(OpenAIConfig(), {})
    with pytest.raises(UserError, match="AZURE_OPENAI_API_KEY"):
        resolve_credentials(OpenAIConfig(api="azure", azure_endpoint="https://x", api_version="2024-10-21"), {})
    with pytest.raises(UserError, match="OPENAI_API_VERSION"):
        resolve_credentials(OpenAIConfig(api="azure", azure_endpoint="https://x"), {"AZURE_OPENAI_API_KEY": "k"})
    with pytest.raises(UserError, match="AZURE_OPENAI_ENDPOINT"):
        resolve_credentials(OpenAIConfig(api="azure", api_version="v"), {"AZURE_OPENAI_API_KEY": "k"})


def test_self_hosted_server_needs_no_key() -> None:
    creds = resolve_credentials(OpenAIConfig(base_url="http://127.0.0.1:8000/v1"), {})
    assert creds.api_key.get_secret_value() == NO_KEY_PLACEHOLDER and not creds.is_openai
    with pytest.raises(UserError):  # but OpenAI itself does
        resolve_credentials(OpenAIConfig(base_url="https://api.openai.com/v1"), {})


def test_describing_needs_no_key_but_the_first_call_does() -> None:
    backend = OpenAIBackend(MODEL, OpenAIConfig(n_epochs="auto"), MemoryState(), show_progress=False, environ={},
                            dotenv=NO_DOTENV)
    info = backend.describe()  # what `run --dry-run` needs
    assert info.billed and info.base_model == MODEL and info.min_training_examples == 10
    assert info.training_epochs == 3 and info.max_concurrent_jobs == 6
    with pytest.raises(UserError, match="set OPENAI_API_KEY"):
        backend.chat(arithmetic(1))
    local = OpenAIBackend("llama3", OpenAIConfig(base_url="http://127.0.0.1:11434/v1"), MemoryState(), environ={},
                          dotenv=NO_DOTENV)
    assert not local.describe().billed


def test_key_never_in_repr_or_dump() -> None:
    secret = "sk-proj-abcdefghijklmnop123456"
    creds = resolve_credentials(OpenAIConfig(), {"OPENAI_API_KEY": secret, "OPENAI_ORG_ID": "org-1"})
    assert creds.organization == "org-1"
    for text in (repr(creds), str(creds), creds.model_dump_json(), json.dumps(creds.model_dump(mode="json"))):
        assert secret not in text


def test_scrubber_removes_the_key_and_key_shaped_strings() -> None:
    scrub = Scrubber(["my-very-secret-key"]).scrub
    text = ("bad key my-very-secret-key; Incorrect API key provided: sk-abc***wxyz; header Authorization: "
            "Bearer tok123; {'api-key': 'azure123'}")
    out = scrub(text)
    for secret in ("my-very-secret-key", "abc***wxyz", "tok123", "azure123"):
        assert secret not in out
    assert "Bearer ***" in out and "sk-***" in out


# -- retries


def test_retry_after_headers() -> None:
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "500", "retry-after": "9"}) == 0.5  # the precise one wins
    assert parse_retry_after({"retry-after": "Wed, 25 Nov 2026 16:00:10 GMT"}, now=1795622400.0) == 10.0
    assert parse_retry_after({"retry-after": "Wed, 25 Nov 2026 16:00:10 GMT"}, now=1795622500.0) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after-ms": "nan?", "retry-after": "2"}) == 2.0
    assert parse_retry_after({}) is None


def _status_error(cls: type[openai.APIStatusError], status: int, code: str | None = None,
                  headers: dict[str, str] | None = None) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    body = {"message": "m", "code": code}
    return cls("m", response=httpx2.Response(status, headers=headers, request=request), body=body)


def test_which_errors_are_retried() -> None:
    request = httpx2.Request("POST", "http://127.0.0.1/v1/chat/completions")
    assert OPENAI_ERRORS.is_retryable(openai.APIConnectionError(request=request))
    assert OPENAI_ERRORS.is_retryable(openai.APITimeoutError(request=request))
    assert OPENAI_ERRORS.is_retryable(_status_error(openai.RateLimitError, 429, "rate_limit_exceeded"))
    assert OPENAI_ERRORS.is_retryable(_status_error(openai.InternalServerError, 500))
    assert OPENAI_ERRORS.is_retryable(_status_error(openai.InternalServerError, 503))
    assert not OPENAI_ERRORS.is_retryable(_status_error(openai.RateLimitError, 429, "daily_rate_limit_exceeded"))
    assert not OPENAI_ERRORS.is_retryable(_status_error(openai.RateLimitError, 429, "insufficient_quota"))
    for cls, status in ((openai.BadRequestError, 400), (openai.AuthenticationError, 401),
                        (openai.NotFoundError, 404)):
        assert not OPENAI_ERRORS.is_retryable(_status_error(cls, status))


def test_backoff_honours_retry_after_else_grows_with_jitter() -> None:
    low, high = Backoff(initial=1.0, maximum=8.0, rand=lambda: 0.0), Backoff(initial=1.0, maximum=8.0,
                                                                             rand=lambda: 1.0)
    assert [low.delay(n, None) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [high.delay(n, None) for n in (1, 2, 3, 4, 5, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    told = _status_error(openai.RateLimitError, 429, headers={"retry-after-ms": "1500"})
    assert low.delay(1, told) == 1.5 and high.delay(7, told) == 1.5
    huge = _status_error(openai.RateLimitError, 429, headers={"retry-after": "100000"})
    assert low.delay(1, huge) == low.max_retry_after


# -- rate limiter


def test_token_bucket_math() -> None:
    bucket = TokenBucket(600, now=0.0)  # 10 per second, 600 at once
    assert bucket.wait_time(600, 0.0) == 0.0
    bucket.take(600, 0.0)
    assert bucket.wait_time(100, 0.0) == pytest.approx(10.0)
    assert bucket.wait_time(100, 4.0) == pytest.approx(6.0)  # 40 refilled by then
    assert bucket.wait_time(5000, 60.0) == 0.0  # oversized: a full bucket is enough ...
    bucket.take(5000, 60.0)
    assert bucket.level == -4400  # ... and the debt is paid back in time
    bucket.give_back(5000, 60.0)
    assert bucket.level == 600  # never above capacity


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def _start_times(limiter: RateLimiter, clock: FakeClock, costs: list[int]) -> list[float]:
    async def one(cost: int) -> float:
        async with limiter.slot(cost):
            return clock.now

    async def main() -> list[float]:
        return list(await asyncio.gather(*(one(c) for c in costs)))

    return asyncio.run(main())


def test_limiter_requests_per_minute() -> None:
    clock = FakeClock()
    limiter = RateLimiter(100, requests_per_minute=60, clock=clock, sleep=clock.sleep)
    starts = _start_times(limiter, clock, [0] * 63)
    assert starts[:60] == [0.0] * 60  # a full minute's budget at once, then one per second
    assert starts[60:] == pytest.approx([1.0, 2.0, 3.0])


def test_limiter_tokens_per_minute_and_settle() -> None:
    clock = FakeClock()
    limiter = RateLimiter(100, tokens_per_minute=600, clock=clock, sleep=clock.sleep)
    starts = _start_times(limiter, clock, [100] * 8)
    assert starts == pytest.approx([0, 0, 0, 0, 0, 0, 10, 20])
    limiter.settle(100, 40)  # used less than estimated: the difference comes back
    assert limiter.tokens is not None and limiter.tokens.level == pytest.approx(0 + 60)


def test_limiter_pause_and_concurrency() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, clock=clock, sleep=clock.sleep)
    limiter.pause(5.0)
    assert _start_times(limiter, clock, [0]) == [5.0]

    async def hold() -> None:
        async with limiter.slot(0):
            await asyncio.sleep(0.001)

    async def main() -> None:
        await asyncio.gather(*(hold() for _ in range(10)))

    asyncio.run(main())
    asyncio.run(main())  # a second event loop: the limiter rebinds its primitives
    assert limiter.max_in_flight == 2 and limiter.in_flight == 0


def test_request_token_estimate() -> None:
    assert estimate_request_tokens(["abcd" * 10, "xy"], 100) == (10 + 4) + (1 + 4) + 3 + 100


# -- payloads


def test_chat_body_maps_base_and_drops_training_fields() -> None:
    request = ChatRequest(key="k", messages=(ChatMessage(role="user", content="hi"),
                                             ChatMessage(role="assistant", content="yo", weight=0)), seed=None)
    params = chat_body(request, MODEL).params()
    assert params == {"model": MODEL, "messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}],
                      "max_tokens": 256, "temperature": 0.7, "top_p": 0.9}
    assert "seed" in chat_body(request.model_copy(update={"seed": 3}), MODEL).params()


def test_completion_payload_reads_usage_and_cached_tokens() -> None:
    body = {"choices": [{"message": {"content": "The answer is 7."}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 16}}}
    result = CompletionPayload.model_validate(body).to_result("k", billing="batch")
    assert result.text == "The answer is 7." and result.finish_reason == "length" and result.billing == "batch"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.cached_tokens) == (20, 5, 16)
    empty = CompletionPayload.model_validate({"choices": [{"message": {"content": None}}]}).to_result("k")
    assert empty.text == "" and empty.usage.prompt_tokens == 0


def test_batch_input_is_deterministic() -> None:
    from backends.openai_batch import BatchLine

    line = BatchLine(custom_id="a", body=ChatBody(model=MODEL, messages=[], max_tokens=1, temperature=0, top_p=1))
    data, sha = batch_input([line])
    assert json.loads(data) == {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": MODEL, "messages": [], "max_tokens": 1, "temperature": 0.0,
                                         "top_p": 1.0}}
    assert batch_input([line])[1] == sha and len(sha) == 64


# -- training files


def _example(answer: str = "4", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": answer}], **extra}


def write_training_file(path: Path, examples: list[Any] | None = None, count: int = 12) -> Path:
    rows = examples if examples is not None else [_example(str(i)) for i in range(count)]
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_good_file_passes(tmp_path: Path) -> None:
    check = validate_training_file(write_training_file(tmp_path / "t.jsonl"))
    assert check.examples == 12 and check.tokens > 0 and len(check.sha256) == 64
    assert check.counter == CharEstimate.name


def _msg(**message: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "q"}, message]}


RULES: list[tuple[Any, str]] = [
    ("not json", "line 3: not valid JSON (Expecting value at column 1)"),
    ("", "line 3: empty line (every line must be one JSON example)"),
    ([1, 2], "line 3: not a JSON object"),
    ({"prompt": "x", "messages": []}, "line 3: unknown key 'prompt' (allowed: messages, tools, parallel_tool_calls, "
                                      "functions)"),
    ({"messages": []}, "line 3: `messages` must be a non-empty list"),
    ({"tools": []}, "line 3: `messages` must be a non-empty list"),
    ({"messages": ["hi"]}, "line 3, message 1: a message must be a JSON object"),
    (_msg(role="robot", content="x"), "line 3, message 2: role must be one of system, user, assistant, tool, "
                                      "function, got 'robot'"),
    (_msg(role="assistant", content="x", score=1), "line 3, message 2: unknown message key 'score' (allowed: role, "
                                                   "content, name, weight, tool_calls, function_call)"),
    (_msg(role="assistant", content=""), "line 3, message 2: content must be a non-empty string"),
    (_msg(role="assistant", content=5), "line 3, message 2: content must be a non-empty string"),
    (_msg(role="assistant"), "line 3, message 2: content must be a non-empty string"),
    ({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
     "line 3, message 1: weight is only allowed on assistant messages"),
    (_msg(role="assistant", content="a", weight=0.5), "line 3, message 2: weight must be 0 or 1, got 0.5"),
    (_msg(role="assistant", content="a", weight=True), "line 3, message 2: weight must be 0 or 1, got true"),
    (_msg(role="assistant", content="a", weight=0), "line 3: no assistant message to learn from (need one with "
                                                    "weight 1 or no weight)"),
    ({"messages": [{"role": "user", "content": "q"}]}, "line 3: no assistant message to learn from (need one with "
                                                       "weight 1 or no weight)"),
]


@pytest.mark.parametrize(("bad", "message"), RULES)
def test_each_rule_names_line_and_rule(tmp_path: Path, bad: Any, message: str) -> None:
    path = write_training_file(tmp_path / "t.jsonl", [_example(), _example(), bad] + [_example()] * 10)
    with pytest.raises(UserError) as info:
        validate_training_file(path)
    assert str(info.value) == f"training file {path}, {message}"


def test_tool_calls_may_replace_content_and_weight_zero_is_fine(tmp_path: Path) -> None:
    call = {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                 "function": {"name": "f", "arguments": "{}"}}]}
    row = {"messages": [{"role": "user", "content": "q"}, call, {"role": "tool", "content": "1"},
                        {"role": "assistant", "content": "wrong", "weight": 0},
                        {"role": "assistant", "content": "right", "weight": 1}], "tools": []}
    assert validate_training_file(write_training_file(tmp_path / "t.jsonl", [row] * 10)).examples == 10


def test_too_few_examples_and_token_limit(tmp_path: Path) -> None:
    path = write_training_file(tmp_path / "t.jsonl", count=9)
    with pytest.raises(UserError, match=r"has 9 examples; OpenAI needs at least 10$"):
        validate_training_file(path)
    long = write_training_file(tmp_path / "long.jsonl", [_example("x" * 3000)] + [_example()] * 10)
    with pytest.raises(UserError) as info:
        validate_training_file(long, max_example_tokens=1000)
    assert str(info.value) == (f"training file {long}, line 1: about 1019 tokens (estimate (1 token per 3 "
                               "characters)), over the limit of 1000 tokens per example")
    assert validate_training_file(long).examples == 11  # the default limit is 65,536


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"messages": "\xff"}\n')
    with pytest.raises(UserError, match="is not UTF-8"):
        validate_training_file(path)


def test_token_counter_is_tiktoken_and_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the token counter tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent-tiktoken-cache")  # nothing cached to fall back on
    counter = load_token_counter()
    assert counter.name == "tiktoken cl100k_base (offline)"
    # cl100k_base's own counts, not the 1-per-3-characters estimate (which gives 4 and 20 here)
    assert counter.count("hello world") == 2
    assert counter.count("What is the result of 3+4? Make sure to state your answer.") == 17


def test_suffix_sanitizing() -> None:
    assert sanitize_suffix("run-1_a2") == "run-1_a2"
    assert sanitize_suffix("run 1/agent:2 critic") == "run-1-agent-2-critic"
    assert sanitize_suffix("::") == "maft"
    long = sanitize_suffix("x" * 100)
    assert len(long) == 64 and long.startswith("x" * 55 + "-")
    assert sanitize_suffix("x" * 100) != sanitize_suffix("x" * 101)
    assert len(maft_key("any key at all")) == 32


def test_job_status_mapping() -> None:
    assert [job_status(s) for s in ("validating_files", "queued", "running", "succeeded", "failed", "cancelled",
                                    "paused", "something_new")] == [
        "queued", "queued", "running", "succeeded", "failed", "cancelled", "running", "running"]


# ================================================================ against the fake server


FAST = Backoff(initial=0.01, maximum=0.05)


def make_backend(fake: FakeOpenAI, state: MemoryState | None = None, *, key: str | None = None,
                 **settings: Any) -> OpenAIBackend:
    config = OpenAIConfig.model_validate({"base_url": fake.base_url, "poll_interval": 0.05, **settings})
    backend = OpenAIBackend(MODEL, config, state if state is not None else MemoryState(), show_progress=False,
                            environ={"OPENAI_API_KEY": key or fake.api_key}, dotenv=NO_DOTENV, backoff=FAST)
    backend.batch_poll_initial = 0.01
    return backend


def arithmetic(n: int, model: str = BASE_MODEL_ID, prefix: str = "q") -> list[ChatRequest]:
    return [ChatRequest(key=f"{prefix}{i}", model=model, seed=i,
                        messages=(ChatMessage(role="user", content=QUESTION.format(a=i, b=i + 1)),))
            for i in range(n)]


def answer_of(result: ChatResult) -> int:
    return int(result.text.rstrip(".").split()[-1])


def track_in_flight(fake: FakeOpenAI) -> Callable[[], int]:
    """Wrap the fake's chat handler to record the most chat requests it ever served at once."""
    original = fake._chat
    lock, now, most = threading.Lock(), [0], [0]

    def counted(call: Any) -> Any:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            return original(call)
        finally:
            with lock:
                now[0] -= 1

    fake._chat = counted  # type: ignore[method-assign]
    return lambda: most[0]


@pytest.mark.fake_openai(base_accuracy=1.0, chat_latency=0.05)
def test_concurrent_chat_respects_the_limit(fake_openai: FakeOpenAI) -> None:
    most = track_in_flight(fake_openai)
    backend = make_backend(fake_openai, concurrency=3)
    seen: list[str] = []
    started = time.monotonic()
    results = backend.chat(arithmetic(12), on_result=lambda r: seen.append(r.key))
    elapsed = time.monotonic() - started
    assert [r.key for r in results] == [f"q{i}" for i in range(12)]
    assert [answer_of(r) for r in results] == [2 * i + 1 for i in range(12)]
    assert sorted(seen) == sorted(r.key for r in results)
    assert most() == 3 and backend.limiter.max_in_flight == 3
    assert elapsed >= 4 * 0.05  # 12 requests, 3 at a time
    assert fake_openai.counts["POST /v1/chat/completions"] == 12
    usage = fake_openai.usage[MODEL]
    assert sum(r.usage.prompt_tokens for r in results) == usage["prompt_tokens"]
    assert sum(r.usage.completion_tokens for r in results) == usage["completion_tokens"]


@pytest.mark.fake_openai(base_accuracy=1.0)
def test_retries_on_429_500_and_dropped_connections(fake_openai: FakeOpenAI) -> None:
    path = "POST /v1/chat/completions"
    fake_openai.inject(path, "429", times=1, retry_after=0.3)
    fake_openai.inject(path, "500", times=2)
    fake_openai.inject(path, "503", times=1)
    fake_openai.inject(path, "drop", times=2)
    backend = make_backend(fake_openai, concurrency=1)  # one at a time: the 429 is the first request's
    started = time.monotonic()
    results = backend.chat(arithmetic(5))
    assert time.monotonic() - started >= 0.3  # Retry-After was honoured
    assert [answer_of(r) for r in results] == [1, 3, 5, 7, 9]
    assert fake_openai.counts[path] == 5 + 6
    assert all(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0 for r in results)
    assert fake_openai.usage[MODEL]["requests"] == 5  # failed attempts were not billed


@pytest.mark.fake_openai(base_accuracy=1.0)
def test_timeouts_are_retried(fake_openai: FakeOpenAI) -> None:
    fake_openai.inject("POST /v1/chat/completions", "slow", times=2, delay=1.0)
    results = make_backend(fake_openai, timeout=0.25, concurrency=1).chat(arithmetic(2))
    assert [answer_of(r) for r in results] == [1, 3]
    assert fake_openai.counts["POST /v1/chat/completions"] == 4


def test_cached_tokens_are_reported(fake_openai: FakeOpenAI) -> None:
    system = ChatMessage(role="system", content="You are a careful calculator. " * 8)
    requests = [ChatRequest(key=f"c{i}", messages=(system, ChatMessage(role="user", content=QUESTION.format(a=i, b=1))))
                for i in range(3)]
    results = make_backend(fake_openai, concurrency=1).chat(requests)
    assert results[0].usage.cached_tokens == 0 and results[2].usage.cached_tokens > 0


def test_a_request_past_its_quick_retries_is_put_back_not_failed(fake_openai: FakeOpenAI) -> None:
    fake_openai.inject("POST /v1/chat/completions", "500", times=10)
    backend = make_backend(fake_openai, max_retries=2)
    results = backend.chat(arithmetic(1, prefix="only-"))
    assert [answer_of(r) for r in results] == [1]
    assert fake_openai.counts["POST /v1/chat/completions"] == 11
    assert backend.retry_pressure() == "retrying 0 · 5xx 10"


def test_a_provider_silent_past_give_up_after_is_a_clear_error(fake_openai: FakeOpenAI) -> None:
    fake_openai.inject("POST /v1/chat/completions", "500", times=10_000)
    backend = make_backend(fake_openai, max_retries=2, give_up_after=0.3)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as info:
        backend.chat(arithmetic(1, prefix="only-"))
    assert 0.3 <= time.monotonic() - started < 5
    message = str(info.value)
    assert message.startswith(f"the provider at {fake_openai.base_url} has answered nothing for 0.3 s (chat "
                              "request 'only-0': ")
    assert "last status 500" in message
    assert fake_openai.counts["POST /v1/chat/completions"] > 3  # tried past its quick retries


def test_bad_key_is_a_user_error_without_the_key(fake_openai: FakeOpenAI) -> None:
    wrong = "sk-wrong-secret-0123456789"
    backend = make_backend(fake_openai, key=wrong)
    with pytest.raises(UserError) as info:
        backend.chat(arithmetic(3))
    message = str(info.value)
    assert "rejected the API key (401)" in message and "OPENAI_API_KEY" in message
    assert wrong not in message and "6789" not in message
    assert fake_openai.counts["POST /v1/chat/completions"] <= 3  # no retries of a 401


def test_unknown_model_is_a_user_error(fake_openai: FakeOpenAI) -> None:
    with pytest.raises(UserError, match=r"^model gpt-9-turbo is not available on this server: The model "):
        make_backend(fake_openai).chat(arithmetic(2, model="gpt-9-turbo"))


def test_azure_client_through_the_fake(fake_openai: FakeOpenAI) -> None:
    config = OpenAIConfig(api="azure", azure_endpoint=fake_openai.azure_endpoint, api_version="2024-10-21")
    backend = OpenAIBackend(MODEL, config, MemoryState(), show_progress=False, dotenv=NO_DOTENV, backoff=FAST,
                            environ={"AZURE_OPENAI_API_KEY": fake_openai.api_key})
    results = backend.chat(arithmetic(3))
    assert len(results) == 3 and all("The answer is" in r.text for r in results)
    assert fake_openai.counts["POST /openai/deployments/{deployment}/chat/completions"] == 3
    assert backend.describe().name == "azure-openai" and backend.describe().billed


# -- finetuning


def _spec(path: Path, key: str, suffix: str = "agent1-generator", base: str = BASE_MODEL_ID) -> FinetuneSpec:
    return FinetuneSpec(key=key, base_model=base, training_file=path, suffix=suffix, seed=7)


def _poll_to_end(backend: OpenAIBackend, ref: JobRef, limit: int = 50) -> tuple[Any, list[str]]:
    messages: list[str] = []
    for _ in range(limit):
        state = backend.poll(ref)
        messages += [e.message for e in state.events]
        if state.status in ("succeeded", "failed", "cancelled"):
            return state, messages
    raise AssertionError("job did not end")


def test_finetune_flow(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    data = write_training_file(tmp_path / "gen.jsonl")
    state = MemoryState()
    backend = make_backend(fake_openai, state)
    refs = [backend.start_finetune(_spec(data, "run/1/a1/gen")),
            backend.start_finetune(_spec(data, "run/1/a2/gen", suffix="agent2-generator"))]
    assert fake_openai.counts["POST /v1/files"] == 1  # one upload for the shared content
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 2
    job = fake_openai.jobs[refs[0].provider_job_id]
    assert job["metadata"]["maft_key"] == maft_key("run/1/a1/gen") and job["model"] == MODEL
    assert job["user_provided_suffix"] == "agent1-generator" and job["seed"] == 7
    assert job["hyperparameters"]["n_epochs"] == 2 and job["hyperparameters"]["batch_size"] == 1
    final, messages = _poll_to_end(backend, refs[0])
    assert final.status == "succeeded" and final.model_id is not None and final.model_id.startswith(f"ft:{MODEL}:")
    assert final.trained_tokens and final.trained_tokens > 0 and final.train_loss is not None
    server_events = [e["message"] for e in fake_openai._job_state[refs[0].provider_job_id].events]
    assert messages == server_events  # every event once, oldest first
    assert backend.poll(refs[0]).events == []  # nothing new
    # the finetuned model answers chat, and a continued finetune starts from it
    assert backend.chat(arithmetic(1, model=final.model_id))[0].text
    cont = backend.start_finetune(_spec(data, "run/2/a1/gen", base=final.model_id))
    assert fake_openai.jobs[cont.provider_job_id]["model"] == final.model_id
    assert fake_openai.api_key not in json.dumps(state._data)


def test_crash_between_create_and_store_makes_no_second_job(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    data = write_training_file(tmp_path / "gen.jsonl")
    state = MemoryState()
    first = make_backend(fake_openai, state).start_finetune(_spec(data, "k1"))
    assert state.get("job:k1") is not None
    state.put("job:k1", {})  # as if the process died before storing the job id
    again = make_backend(fake_openai, state).start_finetune(_spec(data, "k1"))
    assert again.provider_job_id == first.provider_job_id
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 1
    assert fake_openai.counts["POST /v1/files"] == 1
    assert (state.get("job:k1") or {})["job_id"] == first.provider_job_id
    # a stored id is used directly; a job deleted on the server is created again
    assert make_backend(fake_openai, state).start_finetune(_spec(data, "k1")) == first
    del fake_openai.jobs[first.provider_job_id]
    third = make_backend(fake_openai, state).start_finetune(_spec(data, "k1"))
    assert third.provider_job_id != first.provider_job_id


def test_a_lost_create_answer_is_found_not_repeated(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    """The server creates the job but the connection drops before the answer: the retry finds it."""
    data = write_training_file(tmp_path / "gen.jsonl")
    original = fake_openai._create_job

    def create_then_drop(call: Any) -> Any:
        original(call)
        from tests.fake_openai import Reply

        return Reply(drop=True)

    fake_openai._create_job = create_then_drop  # type: ignore[method-assign]
    ref = make_backend(fake_openai).start_finetune(_spec(data, "k-lost"))
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 1 and list(fake_openai.jobs) == [ref.provider_job_id]


def test_failed_job_reports_its_error(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    fake_openai.fail_jobs("doomed", code="invalid_training_file", message="The training file is cursed.")
    backend = make_backend(fake_openai)
    ref = backend.start_finetune(_spec(write_training_file(tmp_path / "t.jsonl"), "kf", suffix="doomed-critic"))
    final, _ = _poll_to_end(backend, ref)
    assert final.status == "failed" and final.model_id is None
    assert final.error == "invalid_training_file: The training file is cursed."


def test_invalid_file_is_rejected_before_upload(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    bad = write_training_file(tmp_path / "bad.jsonl", [_example()] * 4 + [{"messages": [{"role": "user"}]}] +
                              [_example()] * 8)
    with pytest.raises(UserError, match=r"line 5, message 1: content must be a non-empty string"):
        make_backend(fake_openai).start_finetune(_spec(bad, "kb"))
    assert fake_openai.counts["POST /v1/files"] == 0 and fake_openai.counts["POST /v1/fine_tuning/jobs"] == 0


@pytest.mark.fake_openai(finetuning=False)
def test_chat_only_server_is_reported_clearly(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    backend = make_backend(fake_openai)
    assert backend.chat(arithmetic(1))[0].text
    with pytest.raises(UserError) as info:
        backend.start_finetune(_spec(write_training_file(tmp_path / "t.jsonl"), "k"))
    assert str(info.value) == (f"this server ({fake_openai.base_url}) has no finetuning API: use it for chat only, "
                               "or point --base-url at OpenAI/Azure")


@pytest.mark.fake_openai(daily_job_limit=1)
def test_daily_job_limit_is_a_user_error(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    backend = make_backend(fake_openai)
    data = write_training_file(tmp_path / "t.jsonl")
    backend.start_finetune(_spec(data, "d1"))
    with pytest.raises(UserError, match=r"^OpenAI's daily limit on finetuning jobs is reached: run `orchestrator"):
        backend.start_finetune(_spec(data, "d2"))
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 2  # not retried


def test_cancel(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    backend = make_backend(fake_openai)
    ref = backend.start_finetune(_spec(write_training_file(tmp_path / "t.jsonl"), "kc"))
    backend.cancel(ref)
    assert backend.poll(ref).status == "cancelled"
    backend.cancel(ref)  # already ended: nothing to do, no error


# -- jobs run through orchestrator.finetune against the fake


def _job_store(tmp_path: Path) -> tuple[Any, Any]:
    """A store with run "r" and the plan of one job on a valid training file."""
    from orchestrator.finetune import FinetunePlan
    from orchestrator.store import JobRow, RunRow, Store

    store = Store(tmp_path / "m.db")
    store.save_run(RunRow(id="r", config="{}", backend="openai", model=MODEL, task="arithmetic:easy"))
    key = "r/iteration-1/agent-1/generator"
    job = JobRow(key=key, run_id="r", iteration=1, agent=0, role="generator", backend="openai", base_model_id="base")
    return store, FinetunePlan(job=job, spec=_spec(write_training_file(tmp_path / "t.jsonl"), key))


def _no_sleep(_: float) -> None:
    pass


@pytest.mark.fake_openai(job_polls_per_state=2)
def test_every_provider_status_change_is_stored_as_an_event(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    from orchestrator.finetune import run_jobs
    from orchestrator.store import StoreState

    store, plan = _job_store(tmp_path)
    backend = make_backend(fake_openai, StoreState(store, "openai"))  # type: ignore[arg-type]
    done = run_jobs([plan], backend, store, poll_interval=0, sleep=_no_sleep)
    job = done[plan.job.key]
    assert job.status == "succeeded" and job.provider_status == "succeeded"
    assert store.get_job(plan.job.key).provider_status == "succeeded"  # type: ignore[union-attr]
    # validating_files and queued are both "queued" to us; each change of the provider's is an event of its own
    changes = [e.message for e in store.get_job_events(plan.job.key) if e.level == "status"]
    assert changes == [
        "status queued (provider: validating_files)",
        "status queued (provider: validating_files -> queued)",
        "status queued -> running (provider: queued -> running)",
        "status running -> succeeded (provider: running -> succeeded)",
    ]


def test_a_stored_job_the_provider_no_longer_knows_is_started_again(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    from orchestrator.costs import Ledger, Pricing, load_prices
    from orchestrator.finetune import run_jobs
    from orchestrator.store import StoreState

    store, plan = _job_store(tmp_path)
    key = plan.job.key
    backend = make_backend(fake_openai, StoreState(store, "openai"))  # type: ignore[arg-type]
    # an earlier session started the job and stored it as running; then the provider lost it
    first = backend.start_finetune(plan.spec)
    store.save_job(plan.job.model_copy(update={"provider_job_id": first.provider_job_id, "status": "running"}))
    del fake_openai.jobs[first.provider_job_id]
    ledger = Ledger(store, "r", Pricing(load_prices(), MODEL))
    done = run_jobs([plan], backend, store, ledger=ledger, poll_interval=0, sleep=_no_sleep)  # no RunStopped
    job = done[key]
    assert job.status == "succeeded" and job.attempt == 2 and job.model_id
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 2  # exactly one new job
    (second,) = [j for j in fake_openai.jobs if j != first.provider_job_id]
    assert job.provider_job_id == second and fake_openai.jobs[second]["status"] == "succeeded"
    warnings = [e.message for e in store.get_job_events(key) if e.level == "warning"]
    assert warnings == [f"the provider no longer knows job {first.provider_job_id} (404): starting it again as "
                        "attempt 2"]
    bills = {u.ref: u for u in store.get_usage("r")}
    assert bills[key].trained_tokens == 0 and bills[key].estimated == 0  # the lost job billed nothing
    assert bills[f"{key}#attempt-2"].trained_tokens == fake_openai.jobs[second]["trained_tokens"]


def test_a_job_lost_twice_in_one_run_stops_it(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    from foundation.errors import RunStopped
    from orchestrator.finetune import run_jobs
    from tests.fake_openai import not_found

    def always_gone(call: Any) -> Any:
        raise not_found("fine-tuning job", call.params[0], param="fine_tuning_job_id")

    fake_openai._get_job = always_gone  # type: ignore[method-assign]
    store, plan = _job_store(tmp_path)
    with pytest.raises(RunStopped, match="no longer exists"):
        run_jobs([plan], make_backend(fake_openai), store, poll_interval=0, sleep=_no_sleep)
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 2  # one restart, then it stops: never a loop
    job = store.get_job(plan.job.key)
    assert job is not None and job.status == "failed" and job.attempt == 2


# -- batch


@pytest.mark.fake_openai(base_accuracy=1.0)
def test_batch_chat_resubmits_only_what_an_expired_batch_missed(fake_openai: FakeOpenAI) -> None:
    state = MemoryState()
    backend = make_backend(fake_openai, state, batch=True)
    fake_openai.expire_batch(None, after_lines=2)
    seen: list[str] = []
    results = backend.chat(arithmetic(6), on_result=lambda r: seen.append(r.key))
    assert [answer_of(r) for r in results] == [1, 3, 5, 7, 9, 11]
    assert all(r.billing == "batch" for r in results) and sorted(seen) == sorted(r.key for r in results)
    assert fake_openai.counts["POST /v1/batches"] == 2
    first, second = fake_openai.batches.values()
    assert first["status"] == "expired" and second["status"] == "completed"
    resent = fake_openai.file_contents[second["input_file_id"]].decode().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in resent) == ["q2", "q3", "q4", "q5"]
    usage = fake_openai.usage[MODEL]
    assert usage["requests"] == 0 and usage["batch_prompt_tokens"] == sum(r.usage.prompt_tokens for r in results)
    assert fake_openai.api_key not in json.dumps(state._data)

    # a resumed run asking again re-attaches to the finished batches: nothing new is paid for
    again = make_backend(fake_openai, state, batch=True).chat(arithmetic(6))
    assert [r.text for r in again] == [r.text for r in results]
    assert fake_openai.counts["POST /v1/batches"] == 2


def test_batch_created_just_before_a_crash_is_found(fake_openai: FakeOpenAI) -> None:
    state = MemoryState()
    results = make_backend(fake_openai, state, batch=True).chat(arithmetic(3))
    batch_keys = [k for k in state._data if k.startswith("batch:")]
    assert len(batch_keys) == 1
    record = state._data[batch_keys[0]]
    state.put(batch_keys[0], {"status": "creating", "input_file_id": record["input_file_id"],
                              "requests": record["requests"]})
    for i in range(3):
        state.put(f"batchreq:q{i}", {})  # the crash came before the request records were written
    again = make_backend(fake_openai, state, batch=True).chat(arithmetic(3))
    assert [r.text for r in again] == [r.text for r in results]
    assert fake_openai.counts["POST /v1/batches"] == 1 and fake_openai.counts["POST /v1/files"] == 1


def test_batch_gives_up_after_bounded_resubmissions(fake_openai: FakeOpenAI) -> None:
    backend = make_backend(fake_openai, batch=True)
    backend.batches.max_resubmissions = 1
    original = fake_openai._create_batch

    def always_expiring(call: Any) -> Any:
        fake_openai.expire_batch(None, after_lines=0)
        return original(call)

    fake_openai._create_batch = always_expiring  # type: ignore[method-assign]
    with pytest.raises(HostedRequestError, match=r"batch chat \(2 of 2 requests, first 'q0'\) failed after 2 "):
        backend.chat(arithmetic(2))
    assert fake_openai.counts["POST /v1/batches"] == 2


def test_events_are_read_across_pages(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    backend = make_backend(fake_openai)
    backend.jobs.events_page_size = 3  # the fake's jobs log about 25 events: many pages per poll
    ref = backend.start_finetune(_spec(write_training_file(tmp_path / "t.jsonl", count=40), "kp"))
    final, messages = _poll_to_end(backend, ref)
    assert final.status == "succeeded"
    assert messages == [e["message"] for e in fake_openai._job_state[ref.provider_job_id].events]
    assert len(messages) > 10 and fake_openai.counts["GET /v1/fine_tuning/jobs/{id}/events"] > len(messages) / 3


def test_a_job_for_other_data_is_not_reattached(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    state = MemoryState()
    first = make_backend(fake_openai, state).start_finetune(_spec(write_training_file(tmp_path / "a.jsonl"), "k"))
    state.put("job:k", {})
    other = write_training_file(tmp_path / "b.jsonl", [_example("other")] * 12)
    second = make_backend(fake_openai, state).start_finetune(_spec(other, "k"))
    assert second.provider_job_id != first.provider_job_id


def test_batch_crash_after_create_before_storing_its_id(fake_openai: FakeOpenAI) -> None:
    """Requests point at their input, the input's record says `creating`: the batch is found by metadata."""
    state = MemoryState()
    results = make_backend(fake_openai, state, batch=True).chat(arithmetic(4))
    (batch_key,) = [k for k in state._data if k.startswith("batch:")]
    record = dict(state._data[batch_key], status="creating", batch_id=None)
    state.put(batch_key, record)
    again = make_backend(fake_openai, state, batch=True).chat(arithmetic(4))
    assert [r.text for r in again] == [r.text for r in results]
    assert fake_openai.counts["POST /v1/batches"] == 1 and fake_openai.counts["POST /v1/files"] == 1
    assert (state.get(batch_key) or {})["batch_id"] == next(iter(fake_openai.batches))


def test_resumed_batch_keeps_partial_output_of_an_expired_batch(fake_openai: FakeOpenAI) -> None:
    """A run that died while its batch ran: on resume the batch has expired; its answers are kept."""
    state = MemoryState()
    backend = make_backend(fake_openai, state, batch=True)
    fake_openai.expire_batch(None, after_lines=3)
    backend.batches._wait = lambda batch_id: (_ for _ in ()).throw(KeyboardInterrupt())  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        backend.chat(arithmetic(5))
    results = make_backend(fake_openai, state, batch=True).chat(arithmetic(5))
    assert len(results) == 5 and fake_openai.counts["POST /v1/batches"] == 2
    second = list(fake_openai.batches.values())[1]
    resent = fake_openai.file_contents[second["input_file_id"]].decode().splitlines()
    assert len(resent) == 2


def test_batch_request_refused_for_good_stops_after_the_others_are_delivered(fake_openai: FakeOpenAI) -> None:
    seen: list[str] = []
    requests = arithmetic(3) + arithmetic(1, model="gpt-9-turbo", prefix="bad")
    with pytest.raises(UserError, match=r"^the model of batch request 'bad0' is not available on this server: "):
        make_backend(fake_openai, batch=True).chat(requests, on_result=lambda r: seen.append(r.key))
    assert sorted(seen) == ["q0", "q1", "q2"] and fake_openai.counts["POST /v1/batches"] == 1
