"""The together backend: pure logic first (status mapping, key markers in suffixes, file rules and the upload copy,
dedicated-endpoint detection), then the whole backend against the fake Together server on loopback, only ever
through the official `together` SDK."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import together

from backends.base import (
    BASE_MODEL_ID,
    BackendState,
    ChatMessage,
    ChatRequest,
    FinetuneSpec,
    JobEvent,
    JobRef,
    JobState,
    MemoryState,
)
from backends.hosted.chat_files import validate_chat_file
from backends.hosted.env import Scrubber
from backends.hosted.errors import ProviderUnavailable
from backends.hosted.retry import Backoff
from backends.together import TogetherBackend, endpoint_error, listed_models, needs_endpoint
from backends.together_client import TOGETHER_ERRORS, api_root, resolve_clients
from backends.together_finetune import (
    MAX_SUFFIX_CHARS,
    TOGETHER_RULES,
    carries_marker,
    job_status,
    job_suffix,
    key_marker,
    upload_copy,
)
from backends.together_settings import TogetherConfig
from foundation.errors import UserError
from tests.fake_together import LLAMA_8B, LLAMA_70B, FakeTogether

NO_DOTENV = Path("/nonexistent/.env")
ENDPOINT_WORDS = ("Unable to access non-serverless model me/Meta-Llama-3.1-70B-Instruct-Reference-x-1a2b3c. "
                  "Please visit https://api.together.ai/models/me/x to create and start a new dedicated endpoint for "
                  "the model.")


def _status_error(cls: type[Exception], status: int, message: str = "boom") -> Exception:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    body = {"error": {"message": message, "type": "invalid_request_error"}}
    return cls(message, response=httpx.Response(status, request=request, json=body), body=body)  # type: ignore[call-arg]


# ================================================================ pure logic


@pytest.mark.parametrize(("remote", "ours"), [
    ("pending", "queued"), ("queued", "queued"), ("running", "running"), ("compressing", "running"),
    ("uploading", "running"), ("cancel_requested", "running"), ("completed", "succeeded"), ("error", "failed"),
    ("user_error", "failed"), ("cancelled", "cancelled"), ("paused-for-some-new-reason", "running"), (None, "running"),
])
def test_status_mapping(remote: str | None, ours: str) -> None:
    assert job_status(remote) == ours


def test_the_suffix_carries_the_key_within_togethers_limits() -> None:
    key = "run/iteration-1/agent-2/critic"
    suffix = job_suffix("arithmetic-easy-to-i1-a2-c", key)
    assert suffix == f"arithmetic-easy-to-i1-a2-c-{key_marker(key)}" and len(key_marker(key)) == 8
    long = job_suffix("a very_long:suffix/" * 5, key)
    assert len(long) <= MAX_SUFFIX_CHARS and long.endswith(f"-{key_marker(key)}")
    assert all(c.isalnum() or c == "-" for c in long)
    assert job_suffix("s", key) != job_suffix("s", key + "#attempt-2")  # a retry is a different job
    assert key_marker(key) == key_marker(key)  # stable across processes: it is a hash, not a random id


def test_a_listed_job_is_matched_by_its_marker() -> None:
    marker = key_marker("k")
    assert carries_marker(SimpleNamespace(suffix=f"x-{marker}", x_model_output_name=None), marker)
    assert not carries_marker(SimpleNamespace(suffix=f"x-{marker}0", x_model_output_name=None), marker)
    assert not carries_marker(SimpleNamespace(suffix="x-00000000", x_model_output_name=f"me/m-x-{marker}-1a2b3c"),
                              marker)  # the suffix, when given, decides
    assert carries_marker(SimpleNamespace(suffix=None, x_model_output_name=f"me/m-x-{marker}-1a2b3c"), marker)


def test_base_urls_are_cut_back_to_the_server_root() -> None:
    assert api_root(None) == "https://api.together.ai"
    assert api_root("http://127.0.0.1:9/v1") == api_root("http://127.0.0.1:9/v1/") == "http://127.0.0.1:9"
    assert api_root("https://api.together.xyz") == "https://api.together.xyz"


def test_the_key_comes_from_the_environment_over_dotenv(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^no Together API key: set TOGETHER_API_KEY in the environment or in "):
        resolve_clients(TogetherConfig(), {})
    clients = resolve_clients(TogetherConfig(), {"TOGETHER_API_KEY": "tgp_v1_secretsecret",
                                                 "TOGETHER_BASE_URL": "http://127.0.0.1:9/v1"})
    assert clients.where == "http://127.0.0.1:9/v1" and "secretsecret" not in repr(vars(clients))
    assert resolve_clients(TogetherConfig(base_url="http://h:1"), {"TOGETHER_API_KEY": "k" * 8}).where == "http://h:1/v1"
    dotenv = tmp_path / ".env"
    dotenv.write_text("TOGETHER_API_KEY=from-file\n")
    backend = TogetherBackend(LLAMA_8B, TogetherConfig(), MemoryState(), environ={"TOGETHER_API_KEY": "from-env"},
                              dotenv=dotenv)
    assert backend.clients.scrubber.scrub("from-env") == "***"


def test_describe_needs_no_key() -> None:
    backend = TogetherBackend(LLAMA_8B, TogetherConfig(n_epochs=3, max_concurrent_jobs=4, lora=False), MemoryState(),
                              environ={}, dotenv=NO_DOTENV)
    info = backend.describe()
    assert info.billed and info.training_epochs == 3 and info.max_concurrent_jobs == 4 and info.full_finetune
    assert info.min_training_examples == 1 and info.name == "together" and info.base_model == LLAMA_8B
    assert info.pricing_source and not info.supports_batch


def test_together_errors_are_classified_like_openais() -> None:
    request = httpx.Request("GET", "http://127.0.0.1/v1/fine-tunes")
    assert TOGETHER_ERRORS.is_retryable(together.APIConnectionError(request=request))
    assert TOGETHER_ERRORS.is_retryable(together.APITimeoutError(request=request))
    assert TOGETHER_ERRORS.is_retryable(_status_error(together.RateLimitError, 429))
    assert TOGETHER_ERRORS.is_retryable(_status_error(together.APIStatusError, 429))  # as the upload helper raises
    assert TOGETHER_ERRORS.is_retryable(_status_error(together.InternalServerError, 503))
    assert not TOGETHER_ERRORS.is_retryable(_status_error(together.BadRequestError, 400))
    assert not TOGETHER_ERRORS.is_retryable(_status_error(together.APIStatusError, 402))
    assert TOGETHER_ERRORS.status_of(_status_error(together.NotFoundError, 404)) == "404"
    assert Scrubber([]).scrub("key tgp_v1_abcdefghijkl leaked") == "key tgp_v1_*** leaked"


def test_the_dedicated_endpoint_refusal_is_recognised() -> None:
    assert needs_endpoint(_status_error(together.BadRequestError, 400, ENDPOINT_WORDS))
    assert not needs_endpoint(_status_error(together.BadRequestError, 400, "max_tokens too large"))
    assert not needs_endpoint(_status_error(together.InternalServerError, 500, ENDPOINT_WORDS))
    message = str(endpoint_error("me/m-1"))
    assert message == ("finetuned model me/m-1 needs a dedicated endpoint on Together before it can answer: create "
                       "and start one (https://api.together.ai/models/me/m-1), then `orchestrator run --resume RUN`")


def test_served_models_are_read_from_either_listing_shape() -> None:
    assert listed_models([{"id": "a"}, {"id": "b", "type": "chat"}, {"x": 1}]) == {"a", "b"}
    assert listed_models({"object": "list", "data": [{"id": "c"}]}) == {"c"}
    assert listed_models("nonsense") == set()


def _requests(*models: str) -> list[ChatRequest]:
    return [ChatRequest(key=f"r{i}", model=m, messages=(ChatMessage(role="user", content="1+1?"),))
            for i, m in enumerate(models)]


def test_only_unlisted_finetuned_models_are_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = TogetherBackend(LLAMA_8B, TogetherConfig(), MemoryState(), environ={}, dotenv=NO_DOTENV)
    listings: list[int] = []

    def listed() -> set[str]:
        listings.append(1)
        return {"me/listed"}

    monkeypatch.setattr(backend, "_listed", listed)
    assert backend._probes(_requests(BASE_MODEL_ID, LLAMA_8B, BASE_MODEL_ID)) == [] and not listings  # base only
    probes = backend._probes(_requests("me/listed", "me/a", BASE_MODEL_ID, "me/a", "me/b", "me/listed"))
    assert [(p.key, p.model) for p in probes] == [("r1", "me/a"), ("r4", "me/b")]  # the first request of each
    assert listings == [1] and "me/listed" in backend._servable
    backend._servable.update({"me/a", "me/b"})  # answered once: never checked again
    assert backend._probes(_requests("me/a", "me/b", "me/listed")) == [] and listings == [1]


# -- training files


def _conversation(*turns: tuple[str, str, int | None]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c, **({} if w is None else {"weight": w})} for r, c, w in turns]}


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = _conversation(("user", "1+1?", None), ("assistant", "2", None))
CRITIC = _conversation(("user", "1+1?", None), ("assistant", "3", 0), ("user", "others say 2", None),
                       ("assistant", "2", 1))


@pytest.mark.parametrize(("bad", "message"), [
    (_conversation(("user", "q", None), ("user", "q", None), ("assistant", "a", None)),
     "line 2, message 2: role user where assistant was expected (an optional system message first, then user and "
     "assistant take turns)"),
    (_conversation(("assistant", "a", None), ("user", "q", None), ("assistant", "a", None)),
     "line 2, message 1: role assistant where system or user was expected (an optional system message first, then "
     "user and assistant take turns)"),
    (_conversation(("system", "s", None), ("assistant", "a", None)),
     "line 2, message 2: role assistant where user was expected (an optional system message first, then user and "
     "assistant take turns)"),
    (_conversation(("user", "q", None), ("assistant", "a", 2)), "line 2, message 2: weight must be 0 or 1, got 2"),
    (_conversation(("user", "q", None), ("tool", "a", None)),
     "line 2, message 2: role must be one of system, user, assistant, got 'tool'"),
    ({"messages": [{"role": "user", "content": "q"}], "tools": []}, "line 2: unknown key 'tools' (allowed: messages)"),
    (_conversation(("user", "q", None), ("assistant", "", None)), "line 2, message 2: content must be a non-empty "
                                                                  "string"),
    (_conversation(("user", "q", None), ("assistant", "a", 0)), "line 2: no assistant message to learn from (need one "
                                                                "with weight 1 or no weight)"),
])
def test_togethers_rules_name_line_and_rule(tmp_path: Path, bad: Any, message: str) -> None:
    path = _write(tmp_path / "t.jsonl", [GOOD, bad])
    with pytest.raises(UserError) as info:
        validate_chat_file(path, TOGETHER_RULES)
    assert str(info.value) == f"training file {path}, {message}"


def test_one_example_is_enough_and_weights_may_go_on_any_role(tmp_path: Path) -> None:
    check = validate_chat_file(_write(tmp_path / "t.jsonl", [GOOD]), TOGETHER_RULES)
    assert check.examples == 1 and not check.weighted
    row = _conversation(("system", "be brief", 0), ("user", "q", 1), ("assistant", "a", 1))
    assert validate_chat_file(_write(tmp_path / "w.jsonl", [row]), TOGETHER_RULES).weighted
    with pytest.raises(UserError, match=r"has 0 examples; Together needs at least 1$"):
        validate_chat_file(_write(tmp_path / "e.jsonl", []), TOGETHER_RULES)


def test_the_upload_copy_spells_out_every_weight(tmp_path: Path) -> None:
    plain = _write(tmp_path / "g.jsonl", [GOOD, GOOD])
    assert upload_copy(plain, validate_chat_file(plain, TOGETHER_RULES)) == plain.read_bytes()  # as it is
    critic = _write(tmp_path / "c.jsonl", [_conversation(("system", "s", None), *[(m["role"], m["content"],
                                                                                    m.get("weight"))
                                                                                   for m in CRITIC["messages"]])])
    copy = upload_copy(critic, validate_chat_file(critic, TOGETHER_RULES))
    weights = [(m["role"], m["weight"]) for m in json.loads(copy.decode())["messages"]]
    # system and user turns never learned; the first answer masked as the file says; the final answer learned
    assert weights == [("system", 0), ("user", 0), ("assistant", 0), ("user", 0), ("assistant", 1)]


# ================================================================ the backend against the fake Together server

FAST = Backoff(initial=0.01, maximum=0.05)
QUESTION = "What is the result of {a}+{b}? Make sure to state your answer at the end of the response."


class Crash(Exception):
    """Stands in for the process dying."""


def make_backend(fake: FakeTogether, state: BackendState | None = None, *, model: str = LLAMA_8B,
                 key: str | None = None, **settings: Any) -> TogetherBackend:
    config = TogetherConfig.model_validate({"base_url": fake.base_url, "poll_interval": 0.01, **settings})
    return TogetherBackend(model, config, state if state is not None else MemoryState(), show_progress=False,
                           environ={"TOGETHER_API_KEY": key or fake.api_key}, dotenv=NO_DOTENV, backoff=FAST)


def arithmetic(n: int, model: str = BASE_MODEL_ID, prefix: str = "q") -> list[ChatRequest]:
    return [ChatRequest(key=f"{prefix}{i}", model=model, seed=i,
                        messages=(ChatMessage(role="user", content=QUESTION.format(a=i, b=i + 1)),))
            for i in range(n)]


def training_file(path: Path, rows: int = 6) -> Path:
    return _write(path, [CRITIC if i % 2 else GOOD for i in range(rows)])


def spec(path: Path, key: str = "run/iteration-1/agent-1/critic", base: str = BASE_MODEL_ID,
         suffix: str = "run-i1-a1-c") -> FinetuneSpec:
    return FinetuneSpec(key=key, base_model=base, training_file=path, suffix=suffix, seed=7)


def finish(backend: TogetherBackend, ref: JobRef, limit: int = 50) -> tuple[JobState, list[JobEvent]]:
    """Poll until the job ends; its last state and every event returned on the way."""
    events: list[JobEvent] = []
    for _ in range(limit):
        state = backend.poll(ref)
        events += state.events
        if state.status in ("succeeded", "failed", "cancelled"):
            return state, events
    raise AssertionError(f"job {ref.provider_job_id} did not end after {limit} polls")


@pytest.mark.fake_together(base_accuracy=1.0)
def test_chat_answers_in_order_and_keeps_usage(fake_together: FakeTogether) -> None:
    backend = make_backend(fake_together)
    seen: list[str] = []
    results = backend.chat(arithmetic(12), on_result=lambda r: seen.append(r.key))
    assert [r.key for r in results] == [f"q{i}" for i in range(12)] and sorted(seen) == sorted(r.key for r in results)
    assert all(r.text.rstrip(".").endswith(str(2 * i + 1)) for i, r in enumerate(results))
    server = fake_together.usage[LLAMA_8B]
    assert sum(r.usage.prompt_tokens for r in results) == server["prompt_tokens"] > 0
    assert sum(r.usage.completion_tokens for r in results) == server["completion_tokens"] > 0
    assert fake_together.counts["GET /v1/models"] == 0  # the base model needs no check
    backend.close()


def test_a_wrong_key_is_a_user_error_that_never_shows_the_key(fake_together: FakeTogether) -> None:
    backend = make_backend(fake_together, key="tgp_v1_wrongwrongwrong")
    with pytest.raises(UserError) as info:
        backend.chat(arithmetic(2))
    assert "rejected the API key (401)" in str(info.value) and "TOGETHER_API_KEY" in str(info.value)
    assert "wrongwrong" not in str(info.value)
    with pytest.raises(UserError, match="TOGETHER_API_KEY"):
        TogetherBackend(LLAMA_8B, TogetherConfig(), MemoryState(), environ={}, dotenv=NO_DOTENV).chat(arithmetic(1))


@pytest.mark.fake_together(job_polls_per_state=2)
def test_a_lora_finetune_from_file_to_model(fake_together: FakeTogether, tmp_path: Path) -> None:
    backend = make_backend(fake_together, n_epochs=3, learning_rate=2e-4, lora_r=16, lora_alpha=32)
    path = training_file(tmp_path / "agent-1-critic.jsonl")
    ref = backend.start_finetune(spec(path))
    job = fake_together.jobs[ref.provider_job_id]
    assert job["training_type"] == {"type": "Lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                                    "lora_trainable_modules": "all-linear"}
    assert (job["model"], job["n_epochs"], job["learning_rate"], job["random_seed"]) == (LLAMA_8B, 3, 2e-4, 7)
    assert job["suffix"] == job_suffix("run-i1-a1-c", "run/iteration-1/agent-1/critic")
    assert job["training_method"]["method"] == "sft" and job["from_checkpoint"] is None
    uploaded = [json.loads(line) for line in fake_together.file_contents[job["training_file"]].decode().splitlines()]
    assert all("weight" in m for example in uploaded for m in example["messages"])  # every weight spelled out
    assert [m["weight"] for m in uploaded[1]["messages"]] == [0, 0, 0, 1]
    state, events = finish(backend, ref)
    assert state.status == "succeeded" and state.model_id == job["model_output_name"] and not state.error
    assert state.trained_tokens == job["token_count"] == fake_together.usage[LLAMA_8B]["trained_tokens"] > 0
    assert [e.message for e in events] == [e["message"] for e in fake_together.job_events(ref.provider_job_id)]
    assert [e.created_at for e in events] == sorted(e.created_at for e in events)  # each once, oldest first
    assert backend.poll(ref).events == []  # nothing new: nothing returned again
    # the same data for another key: no second upload; the same key again: no second job
    again = backend.start_finetune(spec(path, key="run/iteration-1/agent-2/critic", suffix="run-i1-a2-c"))
    assert backend.start_finetune(spec(path)).provider_job_id == ref.provider_job_id
    assert fake_together.counts["POST /v1/files"] == 1 and fake_together.counts["POST /v1/fine-tunes"] == 2
    assert fake_together.jobs[again.provider_job_id]["training_file"] == job["training_file"]


def test_a_full_finetune(fake_together: FakeTogether, tmp_path: Path) -> None:
    backend = make_backend(fake_together, lora=False, batch_size=16)
    assert backend.describe().full_finetune
    ref = backend.start_finetune(spec(training_file(tmp_path / "t.jsonl")))
    job = fake_together.jobs[ref.provider_job_id]
    assert job["training_type"] == {"type": "Full"} and job["batch_size"] == 16
    assert finish(backend, ref)[0].status == "succeeded"


def test_continue_trains_from_the_previous_jobs_checkpoint(fake_together: FakeTogether, tmp_path: Path) -> None:
    state = MemoryState()
    backend = make_backend(fake_together, state)
    path = training_file(tmp_path / "t.jsonl")
    first = backend.start_finetune(spec(path))
    model = finish(backend, first)[0].model_id
    assert model is not None
    second = backend.start_finetune(spec(path, key="run/iteration-2/agent-1/critic", base=model, suffix="run-i2-a1-c"))
    job = fake_together.jobs[second.provider_job_id]
    assert job["from_checkpoint"] == first.provider_job_id and job["model"] == LLAMA_8B
    assert finish(backend, second)[0].status == "succeeded"
    # a backend that lost its memory finds the job behind a model name by listing the jobs
    fresh = make_backend(fake_together)
    third = fresh.start_finetune(spec(path, key="run/iteration-2/agent-9/critic", base=model, suffix="x"))
    assert fake_together.jobs[third.provider_job_id]["from_checkpoint"] == first.provider_job_id
    with pytest.raises(UserError, match="cannot continue training fake-user/nobody"):
        fresh.start_finetune(spec(path, key="k", base="fake-user/nobody"))


class DyingState(MemoryState):
    """Dies the moment a job id is about to be stored: the job exists on the server, its id nowhere here."""

    def put(self, key: str, value: dict[str, Any]) -> None:
        if key.startswith("job:") and value.get("job_id"):
            raise Crash()
        super().put(key, value)


def test_a_crash_between_creating_a_job_and_storing_its_id_makes_no_second_job(
        fake_together: FakeTogether, tmp_path: Path) -> None:
    state = DyingState()
    path = training_file(tmp_path / "t.jsonl")
    with pytest.raises(Crash):
        make_backend(fake_together, state).start_finetune(spec(path))
    assert fake_together.counts["POST /v1/fine-tunes"] == 1
    survivor = MemoryState()
    survivor._data = dict(state._data)  # what the crashed process had stored: the intent, not the id
    ref = make_backend(fake_together, survivor).start_finetune(spec(path))
    assert fake_together.counts["POST /v1/fine-tunes"] == 1 and ref.provider_job_id in fake_together.jobs
    assert survivor.get("job:run/iteration-1/agent-1/critic")["job_id"] == ref.provider_job_id  # type: ignore[index]


def test_a_lost_answer_to_the_create_call_makes_no_second_job(fake_together: FakeTogether, tmp_path: Path) -> None:
    fake_together.inject(r"^POST /v1/fine-tunes$", "drop_after")  # created on the server, the answer lost
    ref = make_backend(fake_together).start_finetune(spec(training_file(tmp_path / "t.jsonl")))
    assert fake_together.counts["POST /v1/fine-tunes"] == 1 and list(fake_together.jobs) == [ref.provider_job_id]


def test_a_failed_job_says_what_the_provider_said(fake_together: FakeTogether, tmp_path: Path) -> None:
    fake_together.fail_jobs("a2-c", message="The training run crashed on purpose.")
    backend = make_backend(fake_together)
    ref = backend.start_finetune(spec(training_file(tmp_path / "t.jsonl"), key="k2", suffix="run-i1-a2-c"))
    state, _ = finish(backend, ref)
    assert state.status == "failed" and state.error == "The training run crashed on purpose." and not state.model_id


def test_cancel(fake_together: FakeTogether, tmp_path: Path) -> None:
    backend = make_backend(fake_together)
    ref = backend.start_finetune(spec(training_file(tmp_path / "t.jsonl")))
    backend.cancel(ref)
    assert finish(backend, ref)[0].status == "cancelled"
    backend.cancel(ref)  # already ended: nothing to do, no error


def test_polls_carry_togethers_own_status_and_say_when_a_job_is_gone(fake_together: FakeTogether,
                                                                      tmp_path: Path) -> None:
    backend = make_backend(fake_together)
    ref = backend.start_finetune(spec(training_file(tmp_path / "t.jsonl")))
    seen = []
    for _ in range(10):
        state = backend.poll(ref)
        seen.append((state.provider_status, state.status))
        if state.status == "succeeded":
            break
    # uploading is "running" to us, but the store keeps Together's word for it
    assert seen == [("queued", "queued"), ("running", "running"), ("uploading", "running"),
                    ("completed", "succeeded")]
    assert not state.missing
    del fake_together.jobs[ref.provider_job_id]
    gone = backend.poll(ref)
    assert gone.missing and gone.status == "failed" and gone.provider_status is None


@pytest.mark.fake_together(base_accuracy=1.0)
def test_a_finetune_that_needs_a_dedicated_endpoint_stops_before_the_round(
        fake_together: FakeTogether, tmp_path: Path) -> None:
    backend = make_backend(fake_together, model=LLAMA_70B)
    ref = backend.start_finetune(spec(training_file(tmp_path / "t.jsonl")))
    model = finish(backend, ref)[0].model_id
    assert model is not None
    round_ = arithmetic(6) + arithmetic(6, model=model, prefix="ft")
    with pytest.raises(UserError) as info:
        backend.chat(round_)
    assert str(info.value) == str(endpoint_error(model))
    # one request went alone to find out (refused, so unbilled); the rest of the round was never sent
    assert fake_together.counts["POST /v1/chat/completions"] == 1 and fake_together.counts["GET /v1/models"] == 1
    assert model not in fake_together.usage and fake_together.usage[LLAMA_70B]["requests"] == 0


@pytest.mark.fake_together(base_accuracy=1.0)
def test_a_servable_finetune_is_checked_once_for_free(fake_together: FakeTogether, tmp_path: Path) -> None:
    backend = make_backend(fake_together)
    ref = backend.start_finetune(spec(training_file(tmp_path / "t.jsonl")))
    model = finish(backend, ref)[0].model_id
    assert model is not None
    for _ in range(2):
        results = backend.chat(arithmetic(4) + arithmetic(4, model=model, prefix="ft"))
        assert len(results) == 8
    assert fake_together.counts["GET /v1/models"] == 1 and fake_together.counts["POST /v1/chat/completions"] == 16
    assert fake_together.usage[model]["requests"] == 8


@pytest.mark.fake_together(base_accuracy=1.0)
def test_faults_are_retried_everywhere(fake_together: FakeTogether, tmp_path: Path) -> None:
    fake_together.inject(r"^POST /v1/chat/completions$", "429", times=3, retry_after=0.01)
    fake_together.inject(r"^POST /v1/chat/completions$", "drop", times=2)
    fake_together.inject(r"^POST /v1/files$", "503")
    fake_together.inject(r"^POST /v1/fine-tunes/estimate-price$", "500")
    fake_together.inject(r"^GET /v1/fine-tunes/ft-[^/]+$", "drop", times=2)
    fake_together.inject(r"^GET /v1/fine-tunes/ft-[^/]+/events$", "429", retry_after=0.01)
    backend = make_backend(fake_together)
    assert len(backend.chat(arithmetic(8))) == 8
    ref = backend.start_finetune(spec(training_file(tmp_path / "t.jsonl")))
    assert finish(backend, ref)[0].status == "succeeded" and fake_together.counts["POST /v1/fine-tunes"] == 1


def test_a_provider_silent_past_give_up_after_is_a_clear_error(fake_together: FakeTogether) -> None:
    fake_together.inject(r"^POST /v1/chat/completions$", "500", times=10_000)
    with pytest.raises(ProviderUnavailable, match=r"^the provider at .* has answered nothing for 0\.[2-9] s \(chat "
                       r"request 'q0': \d+ tries, last status 500"):
        make_backend(fake_together, max_retries=2, give_up_after=0.2).chat(arithmetic(1))


def test_upload_faults_are_retried(fake_together: FakeTogether, tmp_path: Path) -> None:
    # the SDK's upload helper re-raises these as a bare APIStatusError: still a 429 and a 503
    fake_together.inject(r"^POST /v1/files$", "429", retry_after=0.01)
    fake_together.inject(r"^PUT /fake-storage/", "503")
    fake_together.inject(r"^POST /v1/files/[^/]+/preprocess$", "drop")
    ref = make_backend(fake_together).start_finetune(spec(training_file(tmp_path / "t.jsonl")))
    assert fake_together.jobs[ref.provider_job_id]["training_file"] in fake_together.file_contents


@pytest.mark.fake_together(base_accuracy=1.0, seed=2)
def test_a_storm_of_faults_still_makes_one_job_per_key(fake_together: FakeTogether, tmp_path: Path) -> None:
    fake_together.storm(0.25, ("429", "500", "503", "drop", "drop_after"), retry_after=0.01)
    backend = make_backend(fake_together, max_retries=10)
    assert len(backend.chat(arithmetic(10))) == 10
    path = training_file(tmp_path / "t.jsonl")
    refs = [backend.start_finetune(spec(path, key=f"k{i}", suffix=f"s{i}")) for i in range(3)]
    assert all(finish(backend, ref)[0].status == "succeeded" for ref in refs)
    assert len(fake_together.jobs) == 3 and len({r.provider_job_id for r in refs}) == 3
