"""The fake OpenAI server, exercised only through the official SDK, so backend tests can trust what it says."""

from __future__ import annotations

import io
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.fake_openai import GSM8K_DIR, FakeOpenAI

MINI = "gpt-4o-mini-2024-07-18"
NANO = "gpt-4.1-nano-2025-04-14"


def client(fake: FakeOpenAI, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, **({"max_retries": 0} | options))


def azure_client(fake: FakeOpenAI) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=fake.azure_endpoint, api_version="2024-10-21", api_key=fake.api_key, max_retries=0
    )


def arithmetic(i: int) -> tuple[list[dict[str, str]], int]:
    """The i-th arithmetic problem as chat messages, with its value."""
    a, b, c, d, e, f = (i * k % 30 for k in (1, 7, 11, 13, 17, 19))
    prompt = (f"What is the result of {a}+{b}*{c}+{d}-{e}*{f}? "
              "Make sure to state your answer at the end of the response.")
    return [{"role": "user", "content": prompt}], a + b * c + d - e * f


def stated(text: str | None) -> int:
    match = re.search(r"The answer is (-?\d+)\.", text or "")
    assert match, text
    return int(match.group(1))


def ask(c: openai.OpenAI, model: str, i: int, **params: Any) -> bool:
    """Whether `model` answers the i-th arithmetic problem right."""
    messages, value = arithmetic(i)
    reply = c.chat.completions.create(model=model, messages=messages, **params)  # type: ignore[arg-type]
    return stated(reply.choices[0].message.content) == value


def training_lines(n: int = 10) -> list[str]:
    return [
        json.dumps({"messages": [{"role": "user", "content": f"What is {i}+1?"},
                                 {"role": "assistant", "content": f"The answer is {i + 1}."}]})
        for i in range(n)
    ]


def upload(c: openai.OpenAI, lines: list[str], purpose: str = "fine-tune") -> str:
    data = ("\n".join(lines) + "\n").encode()
    return c.files.create(file=("data.jsonl", io.BytesIO(data)), purpose=purpose).id  # type: ignore[arg-type]


def poll(c: openai.OpenAI, job_id: str, limit: int = 20) -> list[str]:
    """Statuses seen while polling a job until it ends."""
    seen: list[str] = []
    for _ in range(limit):
        seen.append(c.fine_tuning.jobs.retrieve(job_id).status)
        if seen[-1] in ("succeeded", "failed", "cancelled"):
            return seen
    raise AssertionError(f"job never ended: {seen}")


# ---------------------------------------------------------------- chat


@pytest.mark.fake_openai(accuracy={MINI: 1.0, NANO: 0.0})
def test_accuracy_one_answers_all_right_and_zero_all_wrong(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    assert all(ask(c, MINI, i) for i in range(20))
    assert not any(ask(c, NANO, i) for i in range(20))


def test_base_accuracy_is_a_probability(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    right = sum(ask(c, MINI, i) for i in range(200))
    assert 70 <= right <= 130  # 0.5 +- 4 standard errors


def test_same_request_gets_the_same_answer_and_the_seed_changes_it(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    messages, _ = arithmetic(3)

    def answer(seed: int) -> str | None:
        params: dict[str, Any] = {"seed": seed, "temperature": 1.0, "top_p": 0.9, "max_tokens": 100}
        return c.chat.completions.create(model=MINI, messages=messages, **params).choices[0].message.content  # type: ignore[arg-type]

    assert answer(1) == answer(1)
    assert len({answer(seed) for seed in range(10)}) > 1


@pytest.mark.fake_openai(base_accuracy=1.0)
def test_gsm8k_questions_are_looked_up_in_the_shipped_data(fake_openai: FakeOpenAI) -> None:
    row = json.loads((GSM8K_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    prompt = (f"Can you solve the following math problem? {row['question']} Explain your reasoning. Your final answer "
              "should be a single numerical number, in the form \\boxed{answer}, at the end of your response.")
    reply = client(fake_openai).chat.completions.create(model=MINI, messages=[{"role": "user", "content": prompt}])
    assert reply.choices[0].message.content.endswith("\\boxed{18}")  # type: ignore[union-attr]


def test_summaries_name_the_numbers_and_other_prompts_get_no_answer(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    opinions = ("Here are a list of opinions from different agents: \n\n One agent response: ```So 3+4 = 7. The answer "
                "is 7.``` \n\n One agent response: ```The answer is 8.``` \n\n Write a summary ...")
    summary = c.chat.completions.create(model=MINI, messages=[{"role": "user", "content": opinions}])
    assert "7" in summary.choices[0].message.content and "8" in summary.choices[0].message.content  # type: ignore
    other = c.chat.completions.create(model=MINI, messages=[{"role": "user", "content": "Hello?"}])
    assert other.choices[0].message.content == "I am not sure."


def test_usage_counts_tokens_and_a_repeated_first_message_is_cached(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    messages, _ = arithmetic(5)
    messages = [{"role": "system", "content": "You are a careful solver."}, *messages]
    first = c.chat.completions.create(model=MINI, messages=messages)  # type: ignore[arg-type]
    second = c.chat.completions.create(model=MINI, messages=messages, seed=7)  # type: ignore[arg-type]
    expected_prompt = sum(math.ceil(len(m["content"]) / 4) for m in messages)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == expected_prompt
    assert first.usage.completion_tokens == math.ceil(len(first.choices[0].message.content or "") / 4)
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.usage.prompt_tokens_details and second.usage.prompt_tokens_details
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == math.ceil(len(messages[0]["content"]) / 4)
    billed = fake_openai.usage[MINI]
    assert billed["requests"] == 2 and billed["prompt_tokens"] == 2 * expected_prompt
    assert billed["completion_tokens"] == first.usage.completion_tokens + second.usage.completion_tokens
    assert billed["cached_tokens"] == second.usage.prompt_tokens_details.cached_tokens


def test_max_tokens_truncates_and_aliases_resolve(fake_openai: FakeOpenAI) -> None:
    messages, _ = arithmetic(1)
    reply = client(fake_openai).chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=2)  # type: ignore
    assert reply.model == MINI
    assert reply.choices[0].finish_reason == "length" and reply.usage and reply.usage.completion_tokens == 2


def test_unknown_model_is_404_model_not_found(fake_openai: FakeOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(fake_openai).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found"
    assert fake_openai.usage == {}


def test_concurrent_requests_are_all_answered(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: ask(c, MINI, i), range(64)))
    assert len(answers) == 64 and fake_openai.counts["POST /v1/chat/completions"] == 64
    assert fake_openai.usage[MINI]["requests"] == 64


def test_models_are_listed_and_retrieved(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    assert {MINI, NANO, "gpt-4o-mini"} <= {m.id for m in c.models.list()}
    assert c.models.retrieve(MINI).id == MINI
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


# ---------------------------------------------------------------- files and fine-tuning


def test_files_can_be_listed_read_and_deleted(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    lines = training_lines()
    file_id = upload(c, lines)
    file = c.files.retrieve(file_id)
    assert (file.purpose, file.status, file.filename) == ("fine-tune", "processed", "data.jsonl")
    assert c.files.content(file_id).read().decode().splitlines() == lines
    assert [f.id for f in c.files.list(purpose="fine-tune")] == [file_id]
    assert c.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(file_id)


@pytest.mark.fake_openai(base_accuracy=0.25, finetune_bonus=0.75)
def test_a_finetuning_job_runs_to_a_more_accurate_model(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    lines = training_lines()
    job = c.fine_tuning.jobs.create(
        model=MINI,
        training_file=upload(c, lines),
        suffix="run1-agent0-gen",
        seed=3,
        metadata={"run": "r1", "agent": "0"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 1}}},
    )
    assert job.status == "validating_files" and job.metadata == {"run": "r1", "agent": "0"}
    assert poll(c, job.id) == ["queued", "running", "succeeded"]
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.fine_tuned_model and re.fullmatch(rf"ft:{MINI}:fake-org:run1-agent0-gen:\w{{8}}", job.fine_tuned_model)
    file_tokens = sum(math.ceil(len(m["content"]) / 4) for line in lines for m in json.loads(line)["messages"])
    assert job.trained_tokens == 2 * file_tokens == fake_openai.usage[MINI]["trained_tokens"]
    assert job.finished_at and job.hyperparameters.n_epochs == 2 and len(job.result_files) == 1

    first = c.fine_tuning.jobs.list_events(job.id, limit=3)
    assert first.has_more and [e.message for e in first.data][:2] == [
        "The job has successfully completed", f"New fine-tuned model created: {job.fine_tuned_model}"]
    rest = c.fine_tuning.jobs.list_events(job.id, after=first.data[-1].id, limit=100)
    messages = [e.message for e in [*first.data, *rest.data]]
    assert not rest.has_more and messages[-1].startswith("Created fine-tuning job")
    assert "Fine-tuning job started" in messages and any(m.startswith("Step 1/20: training loss=") for m in messages)

    c.fine_tuning.jobs.create(model=MINI, training_file=job.training_file, metadata={"run": "r2"})
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"run": "r1"})] == [job.id]
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"run": "r1", "agent": "1"})] == []
    assert len(c.fine_tuning.jobs.list(limit=1).data) == 1  # newest first, with has_more
    assert c.fine_tuning.jobs.list(limit=1).has_more

    assert sum(ask(c, job.fine_tuned_model, i) for i in range(20)) == 20
    assert sum(ask(c, MINI, i) for i in range(20)) < 15
    assert fake_openai.accuracy_of(job.fine_tuned_model) == 1.0


@pytest.mark.fake_openai(base_accuracy=0.2, finetune_bonus=0.3)
def test_finetuning_a_finetuned_model_keeps_the_root_base_and_adds_a_bonus(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    training_file = upload(c, training_lines())
    first = c.fine_tuning.jobs.create(model=MINI, training_file=training_file, suffix="it1",
                                      hyperparameters={"n_epochs": 1})
    poll(c, first.id)
    parent = c.fine_tuning.jobs.retrieve(first.id).fine_tuned_model
    assert parent is not None
    second = c.fine_tuning.jobs.create(model=parent, training_file=training_file, suffix="it2")
    poll(c, second.id)
    child = c.fine_tuning.jobs.retrieve(second.id).fine_tuned_model
    assert child is not None and child.startswith(f"ft:{MINI}:fake-org:it2:")
    assert fake_openai.accuracy_of(parent) == pytest.approx(0.5)
    assert fake_openai.accuracy_of(child) == pytest.approx(0.8)


@pytest.mark.fake_openai(job_polls_per_state=3)
def test_job_polls_per_state_slows_the_job_down(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    job = c.fine_tuning.jobs.create(model=MINI, training_file=upload(c, training_lines()))
    assert poll(c, job.id) == ["validating_files"] * 2 + ["queued"] * 3 + ["running"] * 3 + ["succeeded"]


def test_fail_jobs_fails_matching_jobs_after_validation(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    fake_openai.fail_jobs("agent2", code="server_error", message="Injected.")
    training_file = upload(c, training_lines())
    bad = c.fine_tuning.jobs.create(model=MINI, training_file=training_file, suffix="run-agent2")
    good = c.fine_tuning.jobs.create(model=MINI, training_file=training_file, suffix="run-agent1")
    assert poll(c, bad.id) == ["failed"]
    assert poll(c, good.id)[-1] == "succeeded"
    error = c.fine_tuning.jobs.retrieve(bad.id).error
    assert error is not None and (error.code, error.message, error.param) == ("server_error", "Injected.", None)


@pytest.mark.parametrize(
    ("lines", "named"),
    [
        (training_lines(9), "at least 10 examples"),
        (training_lines(2) + ["{not json"] + training_lines(8), "Line 3"),
        (training_lines(4) + [json.dumps({"messages": [{"role": "user", "content": "x"}]})] + training_lines(6),
         "Line 5: no assistant message"),
        (training_lines(6) + [json.dumps({"messages": [{"role": "robot", "content": "x"}]})] + training_lines(4),
         "Line 7"),
        (training_lines(1) + [json.dumps({"messages": [{"role": "user", "content": "x"},
                                                       {"role": "assistant", "content": "y", "weight": 0}]})]
         + training_lines(9), "Line 2: no assistant message"),
    ],
)
def test_an_invalid_training_file_fails_the_job_naming_the_line(
    fake_openai: FakeOpenAI, lines: list[str], named: str
) -> None:
    c = client(fake_openai)
    job = c.fine_tuning.jobs.create(model=MINI, training_file=upload(c, lines))
    assert poll(c, job.id) == ["failed"]
    error = c.fine_tuning.jobs.retrieve(job.id).error
    assert error is not None and error.code == "invalid_training_file" and named in error.message


def test_job_creation_checks_model_and_file(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    with pytest.raises(openai.BadRequestError) as caught:
        c.fine_tuning.jobs.create(model="gpt-9", training_file=upload(c, training_lines()))
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.create(model=MINI, training_file="file-missing")
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.create(model=MINI, training_file=upload(c, training_lines(), purpose="batch"))


def test_a_job_can_be_cancelled_once(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    job = c.fine_tuning.jobs.create(model=MINI, training_file=upload(c, training_lines()))
    c.fine_tuning.jobs.retrieve(job.id)
    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert poll(c, job.id) == ["cancelled"]
    with pytest.raises(openai.BadRequestError):
        c.fine_tuning.jobs.cancel(job.id)


@pytest.mark.fake_openai(max_running_jobs=1)
def test_jobs_beyond_max_running_wait_in_the_queue(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    training_file = upload(c, training_lines())
    first, second = (c.fine_tuning.jobs.create(model=MINI, training_file=training_file) for _ in range(2))
    for _ in range(2):
        c.fine_tuning.jobs.retrieve(first.id)
        c.fine_tuning.jobs.retrieve(second.id)
    assert (fake_openai.jobs[first.id]["status"], fake_openai.jobs[second.id]["status"]) == ("running", "queued")
    assert c.fine_tuning.jobs.retrieve(second.id).status == "queued"
    assert c.fine_tuning.jobs.retrieve(first.id).status == "succeeded"
    assert poll(c, second.id) == ["running", "succeeded"]


@pytest.mark.fake_openai(daily_job_limit=2)
def test_the_daily_job_limit_answers_429(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    training_file = upload(c, training_lines())
    for _ in range(2):
        c.fine_tuning.jobs.create(model=MINI, training_file=training_file)
    with pytest.raises(openai.RateLimitError) as caught:
        c.fine_tuning.jobs.create(model=MINI, training_file=training_file)
    assert caught.value.code == "daily_rate_limit_exceeded"
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 3 and len(fake_openai.jobs) == 2


@pytest.mark.fake_openai(finetuning=False)
def test_a_chat_only_server_has_no_files_or_jobs(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    assert ask(c, MINI, 0) in (True, False)
    with pytest.raises(openai.NotFoundError):
        c.files.list()
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.create(model=MINI, training_file="file-x")
    with pytest.raises(openai.NotFoundError):
        c.fine_tuning.jobs.list()


# ---------------------------------------------------------------- faults


def test_an_injected_429_carries_retry_after(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    fake_openai.inject(r"POST /v1/chat/completions", "429", retry_after=2)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(c, MINI, 0)
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.response.headers["retry-after-ms"] == "2000"
    ask(c, MINI, 0)  # one injection, one fault
    assert fake_openai.counts["POST /v1/chat/completions"] == 2
    assert fake_openai.usage[MINI]["requests"] == 1  # faults bill nothing


def test_the_sdk_retries_through_short_429s(fake_openai: FakeOpenAI) -> None:
    fake_openai.inject(r"chat/completions", "429", times=2, retry_after=0.01)
    ask(client(fake_openai, max_retries=2), MINI, 0)
    assert fake_openai.counts["POST /v1/chat/completions"] == 3


@pytest.mark.parametrize(("kind", "status"), [("500", 500), ("503", 503)])
def test_injected_server_errors(fake_openai: FakeOpenAI, kind: str, status: int) -> None:
    fake_openai.inject(r"GET /v1/fine_tuning/jobs", kind)
    with pytest.raises(openai.InternalServerError) as caught:
        client(fake_openai).fine_tuning.jobs.list()
    assert caught.value.status_code == status and caught.value.type == "server_error"


def test_a_dropped_connection_is_a_connection_error(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    fake_openai.inject(r"^POST /v1/chat/completions$", "drop")
    with pytest.raises(openai.APIConnectionError):
        ask(c, MINI, 0)
    ask(c, MINI, 0)


def test_drop_after_does_the_work_but_loses_the_answer(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    training_file = upload(c, training_lines())
    fake_openai.inject(r"^POST /v1/fine_tuning/jobs$", "drop_after")
    with pytest.raises(openai.APIConnectionError):
        c.fine_tuning.jobs.create(model=MINI, training_file=training_file, metadata={"key": "run1/agent0"})
    [job] = c.fine_tuning.jobs.list(metadata={"key": "run1/agent0"})  # the job exists: find it instead of a retry
    assert list(fake_openai.jobs) == [job.id]
    assert fake_openai.job_events(job.id)[0]["message"] == f"Created fine-tuning job: {job.id}"


def test_a_slow_answer_times_out_or_arrives_late(fake_openai: FakeOpenAI) -> None:
    fake_openai.inject(r"chat/completions", "slow", delay=0.5)
    with pytest.raises(openai.APITimeoutError):
        ask(client(fake_openai, timeout=0.1), MINI, 0)
    fake_openai.inject(r"chat/completions", "slow", delay=0.2)
    started = time.monotonic()
    ask(client(fake_openai), MINI, 0)
    assert time.monotonic() - started >= 0.2


def test_a_storm_faults_some_requests_until_turned_off(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    fake_openai.storm(0.5)
    outcomes = []
    for _ in range(40):
        try:
            outcomes.append(type(c.models.retrieve(MINI)).__name__)
        except (openai.APIStatusError, openai.APIConnectionError) as e:
            outcomes.append(type(e).__name__)
    assert {"Model", "RateLimitError", "InternalServerError", "APIConnectionError"} <= set(outcomes)
    fake_openai.storm(0)
    assert all(ask(c, MINI, i) in (True, False) for i in range(10))


def test_the_sdk_rides_out_a_429_storm(fake_openai: FakeOpenAI) -> None:
    fake_openai.storm(0.3, ("429",), retry_after=0.001)
    c = client(fake_openai, max_retries=10)
    for i in range(20):
        ask(c, MINI, i)
    assert fake_openai.counts["POST /v1/chat/completions"] > 20 and fake_openai.usage[MINI]["requests"] == 20


def test_a_wrong_key_is_an_authentication_error(fake_openai: FakeOpenAI) -> None:
    c = openai.OpenAI(base_url=fake_openai.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(c, MINI, 0)
    assert caught.value.code == "invalid_api_key"


def test_an_unknown_route_is_404(fake_openai: FakeOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client(fake_openai).get("/no/such/route", cast_to=object)
    assert fake_openai.counts["GET /v1/no/such/route"] == 1


# ---------------------------------------------------------------- batches


def batch_input(n: int, model: str = MINI) -> list[str]:
    return [
        json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": model, "messages": arithmetic(i)[0], "seed": i}})
        for i in range(n)
    ]


def batch_lines(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    return [json.loads(line) for line in c.files.content(file_id).read().decode().splitlines()] if file_id else []


def test_a_batch_answers_like_the_chat_endpoint_and_bills_as_batch(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    lines = batch_input(5)
    batch = c.batches.create(input_file_id=upload(c, lines, "batch"), endpoint="/v1/chat/completions",
                             completion_window="24h", metadata={"run": "r1"})
    assert batch.status == "validating"
    assert c.batches.retrieve(batch.id).status == "in_progress"
    done = c.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 5, 0)
    outputs = batch_lines(c, done.output_file_id)
    assert [o["custom_id"] for o in outputs] == [f"req-{i}" for i in range(5)]
    for output, line in zip(outputs, lines, strict=True):
        assert output["response"]["status_code"] == 200 and output["error"] is None
        body = ChatCompletion.model_validate(output["response"]["body"])
        direct = c.chat.completions.create(**json.loads(line)["body"])
        assert body.choices[0].message.content == direct.choices[0].message.content
    billed = fake_openai.usage[MINI]
    assert billed["batch_prompt_tokens"] == billed["prompt_tokens"] and billed["requests"] == 5
    assert done.usage and done.usage.input_tokens == billed["batch_prompt_tokens"]
    assert [b.id for b in c.batches.list()] == [batch.id]


def test_an_expired_batch_keeps_its_partial_output(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    fake_openai.expire_batch(None, after_lines=2)
    batch = c.batches.create(input_file_id=upload(c, batch_input(5), "batch"), endpoint="/v1/chat/completions",
                             completion_window="24h")
    c.batches.retrieve(batch.id)
    expired = c.batches.retrieve(batch.id)
    assert expired.status == "expired" and expired.expired_at
    assert [o["custom_id"] for o in batch_lines(c, expired.output_file_id)] == ["req-0", "req-1"]
    errors = batch_lines(c, expired.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [(f"req-{i}", "batch_expired") for i in (2, 3, 4)]
    assert fake_openai.usage[MINI]["batch_completion_tokens"] > 0


def test_a_cancelled_batch_keeps_what_it_had_done(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    batch = c.batches.create(input_file_id=upload(c, batch_input(4), "batch"), endpoint="/v1/chat/completions",
                             completion_window="24h")
    c.batches.retrieve(batch.id)
    assert c.batches.cancel(batch.id).status == "cancelling"
    cancelled = c.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.request_counts and cancelled.request_counts.completed == 2
    assert len(batch_lines(c, cancelled.output_file_id)) == 2


def test_a_batch_with_a_bad_line_fails_and_bad_requests_go_to_the_error_file(fake_openai: FakeOpenAI) -> None:
    c = client(fake_openai)
    for lines, line_number in (([*batch_input(2), "{oops"], 3), ([*batch_input(2), batch_input(1)[0]], 3)):
        bad = c.batches.create(input_file_id=upload(c, lines, "batch"), endpoint="/v1/chat/completions",
                               completion_window="24h")
        failed = c.batches.retrieve(bad.id)
        assert failed.status == "failed" and failed.errors and failed.errors.data
        assert failed.errors.data[0].line == line_number
    unknown_model = json.loads(batch_input(1, "gpt-9")[0]) | {"custom_id": "req-x"}
    mixed = c.batches.create(input_file_id=upload(c, [*batch_input(2), json.dumps(unknown_model)], "batch"),
                             endpoint="/v1/chat/completions", completion_window="24h")
    c.batches.retrieve(mixed.id)
    done = c.batches.retrieve(mixed.id)
    assert done.status == "completed" and done.request_counts
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    [error] = batch_lines(c, done.error_file_id)
    assert error["custom_id"] == "req-x" and error["response"]["status_code"] == 404
    assert error["response"]["body"]["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- Azure


def test_the_azure_client_chats_and_finetunes(fake_openai: FakeOpenAI) -> None:
    fake_openai.set_accuracy(MINI, 1.0)
    az = azure_client(fake_openai)
    messages, value = arithmetic(4)
    reply = az.chat.completions.create(model=MINI, messages=messages)  # type: ignore[arg-type]
    assert stated(reply.choices[0].message.content) == value
    data = io.BytesIO("\n".join(training_lines()).encode())
    file_id = az.files.create(file=("t.jsonl", data), purpose="fine-tune").id
    job = az.fine_tuning.jobs.create(model=MINI, training_file=file_id, suffix="az")
    statuses = [az.fine_tuning.jobs.retrieve(job.id).status for _ in range(3)]
    assert statuses == ["queued", "running", "succeeded"]
    assert len(az.fine_tuning.jobs.list_events(job.id, limit=2).data) == 2
    assert fake_openai.counts["POST /openai/deployments/{deployment}/chat/completions"] == 1
    assert fake_openai.counts["GET /openai/fine_tuning/jobs/{id}"] == 3
