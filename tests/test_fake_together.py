"""The fake Together AI server, exercised only through the official `together` SDK, so backend tests can trust it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import together
from together.lib import FileTypeError

from tests.fake_http import GSM8K_DIR
from tests.fake_together import LLAMA_8B, LLAMA_8B_TURBO, LLAMA_70B, QWEN_7B, FakeTogether


def client(fake: FakeTogether, **options: Any) -> together.Together:
    return together.Together(base_url=fake.base_url, api_key=fake.api_key, **({"max_retries": 0} | options))


def arithmetic(i: int) -> tuple[Any, int]:
    """The i-th arithmetic problem as chat messages (typed Any: the SDK wants its TypedDicts), with its value."""
    a, b, c, d, e, f = (i * k % 30 for k in (1, 7, 11, 13, 17, 19))
    prompt = (f"What is the result of {a}+{b}*{c}+{d}-{e}*{f}? "
              "Make sure to state your answer at the end of the response.")
    return [{"role": "user", "content": prompt}], a + b * c + d - e * f


def right(c: together.Together, model: str, i: int) -> bool:
    """Whether `model` answers the i-th arithmetic problem right."""
    messages, value = arithmetic(i)
    reply = c.chat.completions.create(model=model, messages=messages)
    message = reply.choices[0].message
    match = re.search(r"The answer is (-?\d+)\.", message.content or "" if message else "")
    assert match, reply
    return int(match.group(1)) == value


def critic_line(i: int) -> dict[str, Any]:
    """A critic example as the orchestrator writes it: only the final answer is learned (weight 0 before)."""
    return {"messages": [
        {"role": "user", "content": f"What is the result of {i}+1?"},
        {"role": "assistant", "content": f"The answer is {i + 2}.", "weight": 0},
        {"role": "user", "content": "Here are the other agents' answers. Update your answer."},
        {"role": "assistant", "content": f"The answer is {i + 1}.", "weight": 1},
    ]}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def upload(c: together.Together, tmp_path: Path, rows: list[Any] | None = None, **options: Any) -> str:
    rows = rows if rows is not None else [critic_line(i) for i in range(6)]
    return c.files.upload(write_jsonl(tmp_path / "train.jsonl", rows), purpose="fine-tune", **options).id


def finetune(c: together.Together, file_id: str, **options: Any) -> Any:
    return c.fine_tuning.create(training_file=file_id, train_on_inputs="auto", **options)


def poll(c: together.Together, job_id: str, limit: int = 20) -> list[str]:
    """Statuses seen while polling a job until it ends."""
    seen: list[str] = []
    for _ in range(limit):
        seen.append(str(c.fine_tuning.retrieve(job_id).status))
        if seen[-1] in ("completed", "error", "cancelled", "user_error"):
            return seen
    raise AssertionError(f"job never ended: {seen}")


def trained_model(c: together.Together, tmp_path: Path, **options: Any) -> str:
    job = finetune(c, upload(c, tmp_path), **options)
    assert poll(c, job.id)[-1] == "completed"
    return str(c.fine_tuning.retrieve(job.id).x_model_output_name)


# ---------------------------------------------------------------- chat


@pytest.mark.fake_together(accuracy={LLAMA_8B: 1.0, QWEN_7B: 0.0})
def test_chat_answers_right_or_wrong_by_the_models_accuracy(fake_together):
    c = client(fake_together)
    assert all(right(c, LLAMA_8B, i) for i in range(15))
    assert not any(right(c, QWEN_7B, i) for i in range(15))
    share = sum(right(c, LLAMA_8B_TURBO, i) for i in range(60)) / 60  # base_accuracy 0.5
    assert 0.3 < share < 0.7


def test_chat_is_shaped_as_together_answers_and_billed(fake_together):
    c = client(fake_together)
    messages = arithmetic(3)[0]
    cut = c.chat.completions.create(model=LLAMA_8B, messages=messages, n=2, max_tokens=5)
    assert cut.object == "chat.completion" and cut.model == LLAMA_8B and cut.prompt == []
    assert [choice.finish_reason for choice in cut.choices] == ["length", "length"]
    assert cut.usage is not None and cut.usage.completion_tokens == 10
    assert cut.usage.total_tokens == cut.usage.prompt_tokens + 10
    whole = c.chat.completions.create(model=LLAMA_8B, messages=messages)
    assert whole.choices[0].finish_reason == "eos" and whole.usage is not None
    assert fake_together.usage[LLAMA_8B] == {
        "prompt_tokens": 2 * cut.usage.prompt_tokens, "completion_tokens": 10 + whole.usage.completion_tokens,
        "requests": 2, "trained_tokens": 0}


@pytest.mark.fake_together(accuracy={QWEN_7B: 1.0})
def test_gsm8k_questions_are_answered_from_the_shipped_data(fake_together):
    row = json.loads((GSM8K_DIR / "test.jsonl").read_text().splitlines()[0])
    prompt = (f"Can you solve the following math problem? {row['question']} Explain your reasoning. Your final "
              "answer should be a single numerical number, in the form \\boxed{answer}, at the end of your response.")
    reply = client(fake_together).chat.completions.create(model=QWEN_7B, messages=[{"role": "user", "content": prompt}])
    gold = row["answer"].rpartition("####")[2].strip().replace(",", "")
    expected = f"Reasoning: I worked through the problem step by step. The answer is \\boxed{{{gold}}}"
    assert reply.choices[0].message is not None and reply.choices[0].message.content == expected


def test_unknown_model_wrong_key_and_a_v1_base_url_are_refused(fake_together):
    with pytest.raises(together.NotFoundError, match="Unable to access model nobody/nothing"):
        client(fake_together).chat.completions.create(model="nobody/nothing", messages=[{"role": "user",
                                                                                        "content": "hi"}])
    wrong = together.Together(base_url=fake_together.base_url, api_key="tg-wrong", max_retries=0)
    with pytest.raises(together.AuthenticationError, match="Invalid API key"):
        wrong.chat.completions.create(model=LLAMA_8B, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(together.AuthenticationError):
        wrong.fine_tuning.list()
    doubled = together.Together(base_url=fake_together.openai_base_url, api_key=fake_together.api_key, max_retries=0)
    with pytest.raises(together.NotFoundError, match="without /v1"):
        doubled.fine_tuning.list()


# ---------------------------------------------------------------- files


def test_upload_is_a_presigned_put_then_preprocess_and_accepts_message_weights(fake_together, tmp_path):
    c = client(fake_together)
    file_id = upload(c, tmp_path)
    assert [k for k in fake_together.counts if "files" in k or "storage" in k] == [
        "POST /v1/files", "PUT /fake-storage/{id}", "POST /v1/files/{id}/preprocess"]
    file = c.files.retrieve(file_id)
    assert (file.filename, file.purpose, file.file_type, file.processing_status) == (
        "train.jsonl", "fine-tune", "jsonl", "COMPLETED")
    assert file.validation_report is not None and file.validation_report.dataset_has_message_weights
    assert [f.id for f in c.files.list().data] == [file_id]
    assert c.files.content(file_id).read() == (tmp_path / "train.jsonl").read_bytes()
    assert c.files.delete(file_id).deleted
    with pytest.raises(together.NotFoundError):
        c.files.retrieve(file_id)


def test_the_sdk_checks_files_locally_before_uploading(fake_together, tmp_path):
    with pytest.raises(FileTypeError, match="Each line must be a JSON object"):
        client(fake_together).files.upload(write_jsonl(tmp_path / "bad.jsonl", ["[1, 2]"]))
    assert not fake_together.counts


def test_a_presigned_url_with_a_wrong_signature_is_refused(fake_together, tmp_path):
    c = client(fake_together)
    upload(c, tmp_path)
    url = f"{fake_together.origin}/fake-storage/{next(iter(fake_together.files))}?X-Amz-Signature=forged"
    assert httpx.put(url, content=b"evil").status_code == 403


# ---------------------------------------------------------------- fine-tuning


@pytest.mark.fake_together(base_accuracy=0.0, finetune_bonus=1.0)
def test_a_lora_job_runs_through_every_state_and_its_model_answers_better(fake_together, tmp_path):
    c = client(fake_together)
    file_id = upload(c, tmp_path)
    job = finetune(c, file_id, model=LLAMA_8B, suffix="agent1-gen", n_epochs=2, lora=True, lora_r=16)
    assert job.status == "pending" and job.training_type.lora_r == 16 and job.training_type.lora_alpha == 32
    assert job.output_name and re.fullmatch(r"fake-user/Meta-Llama-3\.1-8B-Instruct-Reference-agent1-gen-[0-9a-f]{8}",
                                            job.output_name)
    with pytest.raises(together.NotFoundError):  # not servable before it is completed
        right(c, job.output_name, 0)
    assert poll(c, job.id) == ["queued", "running", "uploading", "completed"]

    done = c.fine_tuning.retrieve(job.id)
    file_tokens = sum(len(m["content"]) // 4 + (len(m["content"]) % 4 > 0)
                      for i in range(6) for m in critic_line(i)["messages"])
    assert done.token_count == 2 * file_tokens == fake_together.usage[LLAMA_8B]["trained_tokens"]
    assert done.total_price == round(2 * file_tokens * 0.48 / 1e6 * 1e9)
    types = [e.type for e in c.fine_tuning.list_events(job.id).data]
    assert types[0] == "job_pending" and "warning" in types and "training_start" in types
    assert types[-3:] == ["model_uploading", "model_upload_complete", "job_complete"]
    assert [cp.path for cp in c.fine_tuning.list_checkpoints(job.id).data] == [job.output_name]
    assert not any(right(c, LLAMA_8B, i) for i in range(10))
    assert all(right(c, job.output_name, i) for i in range(10))
    assert fake_together.counts["GET /v1/fine-tunes/models/limits"] == 1
    assert fake_together.counts["POST /v1/fine-tunes/estimate-price"] == 1


def test_weights_make_together_train_on_inputs_and_the_job_says_so(fake_together, tmp_path):
    c = client(fake_together)
    job = finetune(c, upload(c, tmp_path), model=QWEN_7B)
    poll(c, job.id)
    done = c.fine_tuning.retrieve(job.id)
    assert done.train_on_inputs is True
    warning = next(e for e in done.events or [] if e.type == "warning")
    assert "train_on_inputs" in warning.message


@pytest.mark.fake_together(job_polls_per_state=3)
def test_a_full_finetune_completes_but_needs_a_dedicated_endpoint(fake_together, tmp_path):
    c = client(fake_together)
    job = finetune(c, upload(c, tmp_path), model=LLAMA_8B, lora=False, batch_size=8)
    assert job.training_type.type == "Full" and job.batch_size == 8
    assert poll(c, job.id, limit=20) == ["pending"] * 2 + ["queued"] * 3 + ["running"] * 3 + ["uploading"] * 3 + [
        "completed"]
    with pytest.raises(together.BadRequestError, match="non-serverless model"):
        right(c, str(job.output_name), 0)


@pytest.mark.fake_together(serverless_full_finetunes=True)
def test_full_finetunes_can_be_made_serverless(fake_together, tmp_path):
    c = client(fake_together)
    model = trained_model(c, tmp_path, model=LLAMA_8B, lora=False)
    assert c.chat.completions.create(model=model, messages=arithmetic(0)[0]).model == model


def test_a_70b_finetune_needs_a_dedicated_endpoint_and_is_not_listed(fake_together, tmp_path):
    c = client(fake_together)
    small, big = trained_model(c, tmp_path, model=LLAMA_8B), trained_model(c, tmp_path, model=LLAMA_70B)
    with pytest.raises(together.BadRequestError) as caught:
        right(c, big, 0)
    assert caught.value.body["error"]["message"] == (  # type: ignore[index]
        f"Unable to access non-serverless model {big}. Please visit https://api.together.ai/models/{big} "
        "to create and start a new dedicated endpoint for the model.")
    models = c.get("/v1/models", cast_to=list[dict[str, Any]])  # a plain JSON list; the SDK has no call for it
    listed = [m["id"] for m in models]
    assert small in listed and LLAMA_70B in listed and LLAMA_8B_TURBO in listed and big not in listed


@pytest.mark.fake_together(base_accuracy=0.5, finetune_bonus=0.25)
def test_from_checkpoint_chains_one_finetune_deeper(fake_together, tmp_path):
    c = client(fake_together)
    file_id = upload(c, tmp_path)
    first = finetune(c, file_id, model=LLAMA_8B, suffix="it1", n_checkpoints=2, n_epochs=4, batch_size=8)
    poll(c, first.id)
    steps = [cp.step for cp in c.fine_tuning.list_checkpoints(first.id).data]
    assert sorted(steps) == [2, 4]
    second = finetune(c, file_id, from_checkpoint=first.id, suffix="it2")
    assert second.model == LLAMA_8B and second.training_type.type == "Lora"  # inherited
    poll(c, second.id)
    third = finetune(c, file_id, from_checkpoint=f"{second.output_name}:1", suffix="it3")
    poll(c, third.id)
    assert fake_together.accuracy_of(str(first.output_name)) == 0.75
    assert fake_together.accuracy_of(str(second.output_name)) == 1.0
    assert fake_together.accuracy_of(str(third.output_name)) == 1.0  # capped
    assert str(third.output_name).startswith("fake-user/Meta-Llama-3.1-8B-Instruct-Reference-it3-")
    with pytest.raises(together.BadRequestError, match="no checkpoint at step 3"):
        finetune(c, file_id, from_checkpoint=f"{first.id}:3")


def test_unknown_checkpoints_models_and_unfinished_parents_are_400(fake_together, tmp_path):
    c = client(fake_together)
    file_id = upload(c, tmp_path)
    with pytest.raises(together.BadRequestError, match="not found"):
        finetune(c, file_id, from_checkpoint="ft-00000000-0000-0000-0000-000000000000")
    with pytest.raises(together.BadRequestError, match="not supported for fine-tuning"):
        finetune(c, file_id, model="meta-llama/Llama-9-1T")
    with pytest.raises(together.BadRequestError, match="not supported for fine-tuning"):
        finetune(c, file_id, model=LLAMA_8B_TURBO)
    running = finetune(c, file_id, model=LLAMA_8B)
    with pytest.raises(together.BadRequestError, match="its status is pending"):
        finetune(c, file_id, from_checkpoint=running.id)
    assert len(fake_together.jobs) == 1


def test_an_injected_failure_ends_the_job_in_error_until_cleared(fake_together, tmp_path):
    c = client(fake_together)
    file_id = upload(c, tmp_path)
    fake_together.fail_jobs("agent2", message="CUDA error: an illegal memory access was encountered")
    failed = finetune(c, file_id, model=LLAMA_8B, suffix="agent2-critic")
    other = finetune(c, file_id, model=LLAMA_8B, suffix="agent3-critic")
    assert poll(c, failed.id) == ["error"] and poll(c, other.id)[-1] == "completed"
    last = c.fine_tuning.list_events(failed.id).data[-1]
    assert (last.type, last.level, last.message) == ("job_error", "error",
                                                     "CUDA error: an illegal memory access was encountered")
    fake_together.clear_failures()
    assert poll(c, finetune(c, file_id, model=LLAMA_8B, suffix="agent2-critic").id)[-1] == "completed"


@pytest.mark.parametrize(("line", "problem"), [
    ({"text": "plain text"}, "only the conversational format"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}, "weight"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}, "alternates"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
])
def test_a_bad_training_file_ends_the_job_in_error_naming_the_line(fake_together, tmp_path, line, problem):
    c = client(fake_together)
    file_id = upload(c, tmp_path, [critic_line(0), line, critic_line(1)], check=False)
    assert c.files.retrieve(file_id).processing_status == "INVALID_FORMAT"
    job = finetune(c, file_id, model=LLAMA_8B)
    assert poll(c, job.id) == ["error"]
    message = c.fine_tuning.list_events(job.id).data[-1].message
    assert "line 2" in message and problem in message, message


def test_cancel_requests_then_cancels_and_an_ended_job_cannot_be(fake_together, tmp_path):
    c = client(fake_together)
    file_id = upload(c, tmp_path)
    job = finetune(c, file_id, model=LLAMA_8B)
    c.fine_tuning.retrieve(job.id)
    assert c.fine_tuning.cancel(job.id).status == "cancel_requested"
    assert poll(c, job.id) == ["cancelled"]
    assert [e.type for e in c.fine_tuning.list_events(job.id).data][-2:] == ["cancel_requested", "job_stopped"]
    with pytest.raises(together.BadRequestError, match="cannot be cancelled"):
        c.fine_tuning.cancel(job.id)
    assert [j.id for j in c.fine_tuning.list().data] == [job.id]


# ---------------------------------------------------------------- faults


def test_faults_surface_as_the_sdks_exceptions(fake_together, tmp_path):
    c = client(fake_together)
    fake_together.inject(r"POST /v1/chat/completions", "429", retry_after=2)
    with pytest.raises(together.RateLimitError) as caught:
        right(c, LLAMA_8B, 0)
    assert caught.value.response.headers["retry-after"] == "2"
    fake_together.inject(r"GET /v1/fine-tunes$", "500")
    with pytest.raises(together.InternalServerError):
        c.fine_tuning.list()
    fake_together.inject(r"GET /v1/fine-tunes$", "drop")
    with pytest.raises(together.APIConnectionError):
        c.fine_tuning.list()
    fake_together.inject(r"POST /v1/chat/completions", "drop_after")
    with pytest.raises(together.APIConnectionError):
        right(c, LLAMA_8B, 0)
    assert fake_together.usage[LLAMA_8B]["requests"] == 1  # the dropped answer was still billed


def test_a_storm_faults_every_endpoint_until_it_is_calmed(fake_together, tmp_path):
    c = client(fake_together)
    fake_together.storm(1.0, ("500",))
    with pytest.raises(together.InternalServerError):
        c.fine_tuning.list()
    with pytest.raises(together.InternalServerError):
        right(c, LLAMA_8B, 0)
    fake_together.storm(0)
    assert c.fine_tuning.list().data == []


def test_only_retrieving_a_job_moves_it_on(fake_together, tmp_path):
    c = client(fake_together)
    job = finetune(c, upload(c, tmp_path), model=LLAMA_8B)
    c.fine_tuning.list()
    c.fine_tuning.list_events(job.id)
    c.fine_tuning.list_checkpoints(job.id)
    assert fake_together.jobs[job.id]["status"] == "pending"
    assert c.fine_tuning.retrieve(job.id).status == "queued"


def test_the_sdk_retries_after_the_servers_retry_after(fake_together):
    fake_together.inject(r"POST /v1/chat/completions", "429", times=2, retry_after=0.01)
    retrying = client(fake_together, max_retries=2)
    reply = retrying.chat.completions.create(model=LLAMA_8B, messages=arithmetic(0)[0])
    assert reply.choices and fake_together.counts["POST /v1/chat/completions"] == 3
    assert fake_together.usage[LLAMA_8B]["requests"] == 1  # faulted requests bill nothing


def test_a_failed_storage_put_is_not_wrapped_by_the_sdk(fake_together, tmp_path):
    c = client(fake_together)
    fake_together.inject(r"PUT /fake-storage/", "500")
    with pytest.raises(together.APIStatusError, match="Error during file upload"):
        upload(c, tmp_path)
    fake_together.inject(r"PUT /fake-storage/", "drop")
    with pytest.raises(Exception) as caught:  # the SDK PUTs with its raw httpx client
        upload(c, tmp_path)
    assert type(caught.value).__module__.startswith("httpx")
