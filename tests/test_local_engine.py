"""The refill decode engine on the tiny random Llama: what it must keep from the naive one-prompt loop.

Each test names one guarantee of `backends.local_engine` (refill batching, per-row generators, identical
prompts prefilled once) or of how adapters and precision are applied around it (`local_lora`,
`local_precision`), and would fail if that guarantee broke.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import AutoModelForCausalLM

from backends.base import ChatMessage, ChatRequest, ChatResult, FinetuneSpec, TrainingParams
from backends.local import LocalBackend
from backends.local_engine import Row
from backends.local_generate import generate_chats
from backends.local_lora import gathered_adapters, merged_adapter
from backends.local_model import resolve_device
from backends.local_pool import AdapterPool
from backends.local_step import HFStep
from foundation.errors import UserError
from orchestrator.config import RunConfig
from tests.tiny_model import build_random_adapter, build_tiny_model

QUESTION = "What is 17+25?"
TARGET = "The answer is 42."
PROMPTS = (
    "Hi",
    QUESTION,
    "abc",
    "Can you solve the following math problem? What is 12*7+3? Provide a bullet point summary of your reasoning. "
    "Examine each these solutions as additional advice and give your updated answer. " * 3,
    "What is the result of 3+4*5+6-7*8? Make sure to state your answer at the end of the response.",
    "Here are a list of opinions from different agents: one agent response: 7.",
    "0123456789 + - * / = ( )",
)


def chat(text: str, *, model: str = "base", key: str, **kw: Any) -> ChatRequest:
    fields: dict[str, Any] = {"max_tokens": 12, "temperature": 0.0} | kw
    return ChatRequest(key=key, model=model, messages=(ChatMessage(role="user", content=text),), **fields)


def mixed(models: list[str], prefix: str, **kw: Any) -> list[ChatRequest]:
    """Every prompt once, the models taken in turn."""
    pairs = zip(PROMPTS, models * 2, strict=False)
    return [chat(p, model=m, key=f"{prefix}{i}", **kw) for i, (p, m) in enumerate(pairs)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def backend(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackend]:
    local = LocalBackend(
        str(tiny_dir), workdir=tmp_path_factory.mktemp("work"), device="cpu", dtype="float32", batch_size=3,
        show_progress=False,
    )
    yield local
    local.close()


@pytest.fixture(scope="module")
def models(backend: LocalBackend, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The base model, one adapter trained to answer QUESTION with TARGET and stop, and two random adapters."""
    folder = tmp_path_factory.mktemp("adapters")
    data = folder / "answer42.jsonl"
    example = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": TARGET}]}
    data.write_text((json.dumps(example) + "\n") * 40, encoding="utf-8")
    params = TrainingParams(epochs=1, batch_size=1, learning_rate=1e-2, lora_rank=8, lora_dropout=0.0)
    spec = FinetuneSpec(key="engine/trained", base_model="base", training_file=data, suffix="t", params=params)
    trained = backend.poll(backend.start_finetune(spec)).model_id
    assert trained is not None
    randoms = [str(build_random_adapter(tiny_dir, folder / f"random{i}", seed=10 + i)) for i in range(2)]
    return ["base", trained, *randoms]


def naive_texts(pool: AdapterPool, requests: list[ChatRequest]) -> list[tuple[str, int]]:
    """What one `generate` per prompt gives, greedy, on the adapter the request names: (text, tokens)."""
    model = pool.model
    assert isinstance(model, PeftModel)
    tokenizer = pool.loaded.tokenizer
    out = []
    with torch.inference_mode():
        for request in requests:
            name = pool.name_for(request.model)
            turns = [{"role": m.role, "content": m.content} for m in request.messages]
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            kwargs = {"max_new_tokens": request.max_tokens, "do_sample": False}
            if name == "__base__":
                with model.disable_adapter():
                    output = model.generate(**inputs, **kwargs)
            else:
                model.set_adapter(name)
                output = model.generate(**inputs, **kwargs)
            new = output[0, inputs["input_ids"].shape[1] :]
            out.append((str(tokenizer.decode(new, skip_special_tokens=True)), len(new)))
    return out


class StepSpy:
    """Records, for every forward the engine makes, which rows it ran and how many positions it fed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[list[int], int]] = []
        self.logit_dtypes: set[torch.dtype] = set()
        original = HFStep.logits

        def spy(step: HFStep, rows: list[Row], input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
            self.calls.append(([row.index for row in rows], int(input_ids.shape[1])))
            logits = original(step, rows, input_ids, *args)
            self.logit_dtypes.add(logits.dtype)
            return logits

        monkeypatch.setattr(HFStep, "logits", spy)

    @property
    def decode_steps(self) -> list[list[int]]:
        return [rows for rows, width in self.calls if width == 1]

    @property
    def prefills(self) -> list[list[int]]:
        return [rows for rows, width in self.calls if width > 1]


def base_weights(pool: AdapterPool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pool.loaded.model.named_parameters() if "lora_" not in n}


def assert_pristine(pool: AdapterPool, before: dict[str, torch.Tensor]) -> None:
    after = {n: p.detach() for n, p in pool.loaded.model.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys()
    changed = [n for n in before if after[n].dtype != before[n].dtype or not torch.equal(after[n], before[n])]
    assert changed == []
    lora_layers = [m for m in pool.loaded.model.modules() if isinstance(m, LoraLinear)]
    assert len(lora_layers) == 4 * pool.loaded.model.config.num_hidden_layers  # PEFT's layers are back in place


# -- refill batching -------------------------------------------------------------------------------------------


def test_refill_gives_the_naive_loops_greedy_texts_on_a_ragged_queue(
    backend: LocalBackend, models: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Very different prompt lengths and stops, 14 prompts through 3 slots: every text is the naive loop's."""
    lengths = [1, 30, 5, 17, 40]
    requests = [
        chat(PROMPTS[i % len(PROMPTS)], model=models[i % len(models)], key=f"r{i}", max_tokens=lengths[i % 5])
        for i in range(14)
    ]
    requests.append(chat(QUESTION, model=models[1], key="stops", max_tokens=30))
    spy = StepSpy(monkeypatch)
    results = generate_chats(backend.pool, requests, batch_size=3)

    naive = naive_texts(backend.pool, requests)
    assert [(r.text, r.usage.completion_tokens) for r in results] == naive
    assert results[-1].finish_reason == "stop" and results[-1].text == TARGET
    assert {r.finish_reason for r in results} == {"stop", "length"}
    steps = spy.decode_steps
    assert max(len(rows) for rows in steps) <= 3
    joined = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if set(b) - set(a) and set(a) & set(b)]
    assert joined  # rows joined a batch that kept decoding: refilled, not chunk after chunk


def test_a_sampled_row_does_not_depend_on_its_batch_mates(backend: LocalBackend, models: list[str]) -> None:
    def target(seed: int) -> ChatRequest:
        return chat(PROMPTS[4], model=models[2], key=f"t{seed}", temperature=1.0, top_p=0.9, seed=seed, max_tokens=24)

    alone = generate_chats(backend.pool, [target(7)], batch_size=1)[0].text
    crowd = [
        chat(p, model=m, key=f"c{i}", temperature=0.8, seed=i, max_tokens=3 + 5 * i)
        for i, (p, m) in enumerate(zip(PROMPTS, models * 2, strict=False))
    ]
    for batch_size in (2, 4, 16):  # refilled in the middle of the queue, or all at once
        results = generate_chats(backend.pool, [*crowd[:3], target(7), *crowd[3:]], batch_size=batch_size)
        assert results[3].text == alone
    twins = generate_chats(backend.pool, [target(8), target(7), target(9)], batch_size=3)
    assert twins[1].text == alone
    assert len({r.text for r in twins}) > 1  # the seeds matter, so the checks above could fail


def test_identical_prompts_are_prefilled_once_and_sampled_each_on_its_own(
    backend: LocalBackend, models: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    same = [chat(QUESTION, key=f"s{seed}", temperature=1.0, top_p=0.95, seed=seed, max_tokens=10) for seed in range(5)]
    other = chat(PROMPTS[0], model=models[2], key="other", max_tokens=10)
    spy = StepSpy(monkeypatch)
    together = generate_chats(backend.pool, [*same, other], batch_size=8)

    assert [len(rows) for rows in spy.prefills] == [2]  # one row for the five identical prompts, one for the other
    alone = [generate_chats(backend.pool, [r], batch_size=1)[0].text for r in [*same, other]]
    assert [r.text for r in together] == alone
    assert len({r.text for r in together[:5]}) > 1


def test_each_result_reaches_on_result_right_after_its_last_token(
    backend: LocalBackend, models: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = [chat(PROMPTS[i % 3], model=models[i % 4], key=f"o{i}", max_tokens=2 + 7 * i) for i in range(6)]
    spy = StepSpy(monkeypatch)
    forwards_before: dict[str, int] = {}
    results = generate_chats(
        backend.pool, requests, batch_size=2, on_result=lambda r: forwards_before.setdefault(r.key, len(spy.calls))
    )
    assert [r.key for r in results] == [r.key for r in requests]
    for i, result in enumerate(results):  # its k-th forward (the prefill gives token 1) gave its last token
        own = [n for n, (rows, _) in enumerate(spy.calls) if i in rows]
        assert forwards_before[result.key] == own[result.usage.completion_tokens - 1] + 1
    assert list(forwards_before) != [r.key for r in requests]  # handed over in the order they finished


# -- adapters without PEFT in the loop ---------------------------------------------------------------------------


def peft_logits(pool: AdapterPool, requests: list[ChatRequest]) -> tuple[torch.Tensor, list[Row]]:
    """Next-token logits of each request's prompt alone through PEFT's own forward (the reference)."""
    rows, logits = [], []
    with torch.inference_mode():
        for i, request in enumerate(requests):
            name = pool.name_for(request.model)
            text = pool.loaded.tokenizer.apply_chat_template(
                [{"role": "user", "content": request.messages[0].content}], add_generation_prompt=True, tokenize=False
            )
            ids = pool.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(Row(i, request, list(ids), name, 1, None))
            output = pool.model(input_ids=torch.tensor([ids]), adapter_names=[name])
            logits.append(output.logits[0, -1].float())
    return torch.stack(logits), rows


def step_logits(pool: AdapterPool, rows: list[Row], *, merged: bool) -> torch.Tensor:
    from backends.local_cache import RowCache

    model = pool.loaded.model
    out = []
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor([row.prompt])
            mask = torch.ones(1, 1, len(row.prompt), len(row.prompt), dtype=torch.bool).tril()
            positions = torch.arange(len(row.prompt))[None]
            if merged:
                with merged_adapter(model, None if row.adapter == "__base__" else row.adapter):
                    step = HFStep(model, rows=None, master=None, base_row="__base__")
                    out.append(step.logits([row], ids, mask, positions, RowCache(step.num_layers))[0])
            else:
                names = sorted({r.adapter for r in rows} - {"__base__"})
                with gathered_adapters(model, names, torch.float32) as adapters:
                    step = HFStep(model, rows=adapters, master=None, base_row="__base__")
                    out.append(step.logits([row], ids, mask, positions, RowCache(step.num_layers))[0])
    return torch.stack(out)


def test_gathered_and_merged_adapters_give_pefts_logits(backend: LocalBackend, models: list[str]) -> None:
    requests = mixed(models, "l")
    reference, rows = peft_logits(backend.pool, requests)
    for merged in (False, True):
        assert (step_logits(backend.pool, rows, merged=merged) - reference).abs().max() < 1e-4
    adapted = [i for i, r in enumerate(rows) if r.adapter != "__base__"]
    with torch.inference_mode(), backend.pool.model.disable_adapter():  # the adapters do change the logits
        plain = backend.pool.model(input_ids=torch.tensor([rows[adapted[0]].prompt])).logits[0, -1]
    assert (plain - reference[adapted[0]]).abs().max() > 1e-2


def test_the_fused_decode_step_gives_transformers_logits(backend: LocalBackend, models: list[str]) -> None:
    """`LlamaDecode` (one token per row, fused projections, gathered adapters) against transformers' own forward
    on the same cache, with rows of every adapter and some left padding."""
    from backends.local_cache import RowCache

    pool = backend.pool
    model = pool.loaded.model
    _, rows = peft_logits(pool, mixed(models, "d"))
    names = sorted({r.adapter for r in rows} - {"__base__"})
    config = model.config
    torch.manual_seed(0)
    kv = torch.randn(len(rows), config.num_key_value_heads, 9, config.hidden_size // config.num_attention_heads)
    mask = torch.ones(len(rows), 10, dtype=torch.bool)
    mask[::2, :4] = False
    ids = torch.arange(len(rows))[:, None] + 5
    out = []
    with torch.inference_mode(), gathered_adapters(model, names, torch.float32) as adapters:
        for fast in (False, True):
            step = HFStep(model, rows=adapters, master=None, base_row="__base__", fused=fast)
            cache = RowCache(step.num_layers, room=2)
            for layer in cache.roomy():
                layer.update(kv, kv)
            out.append(step.logits(rows, ids, mask[:, None, None, :], torch.full((len(rows), 1), 9), cache))
            assert (step._fast is not None) == fast
    assert (out[0] - out[1]).abs().max() < 1e-4


def test_merged_adapter_decoding_restores_the_base_weights_bitwise(
    backend: LocalBackend, models: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = backend.pool
    before = base_weights(pool)
    requests = mixed(models, "m", max_tokens=8)
    seen_weights: list[torch.Tensor] = []
    q_proj = pool.loaded.model.model.layers[0].self_attn.q_proj.base_layer

    def during(result: ChatResult) -> None:  # each group decodes on its own merged weight, never on the base one
        seen_weights.append(q_proj.weight.detach().clone())

    merged = generate_chats(pool, requests, batch_size=3, adapters="merged", on_result=during)
    assert_pristine(pool, before)
    adapter_rows = [i for i, r in enumerate(requests) if r.model != "base"]
    assert any(not torch.equal(seen_weights[i], before[_q_name(pool)]) for i in range(len(adapter_rows)))
    gathered = generate_chats(pool, requests, batch_size=3)
    assert [r.text for r in merged] == [r.text for r in gathered]

    def crash(result: ChatResult) -> None:
        raise RuntimeError("stop here")

    for mode in ("merged", "gathered"):  # an error mid-decode (a crash in on_result) restores everything too
        with pytest.raises(RuntimeError, match="stop here"):
            generate_chats(pool, requests, batch_size=3, adapters=mode, on_result=crash)  # type: ignore[arg-type]
        assert_pristine(pool, before)


def _q_name(pool: AdapterPool) -> str:
    q_proj = pool.loaded.model.model.layers[0].self_attn.q_proj.base_layer.weight
    return next(n for n, p in pool.loaded.model.named_parameters() if p is q_proj)


def test_adapters_the_engine_cannot_gather_go_through_peft(
    backend: LocalBackend, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter whose layers scale differently (an alpha pattern) falls back to PEFT's mixed-batch forward."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=4, alpha_pattern={"q_proj": 16}, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), config).save_pretrained(str(tmp_path / "patterned"))
    calls: list[int] = []
    from backends import local_generate

    original = local_generate.decode_static
    def counted(pool: AdapterPool, rows: list[Row], *args: Any, **kwargs: Any) -> None:
        calls.append(len(rows))
        original(pool, rows, *args, **kwargs)

    monkeypatch.setattr(local_generate, "decode_static", counted)
    requests = [chat(PROMPTS[1], model=str(tmp_path / "patterned"), key="patterned", max_tokens=6)]
    result = generate_chats(backend.pool, requests, batch_size=2)[0]
    assert calls == [1]
    assert (result.text, result.usage.completion_tokens) == naive_texts(backend.pool, requests)[0]
    backend.pool.forget(backend.pool.name_for(str(tmp_path / "patterned")))


# -- precision ---------------------------------------------------------------------------------------------------


def test_bfloat16_generation_leaves_the_float32_weights_untouched(
    tiny_dir: Path, tmp_path: Path, models: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    local = LocalBackend(str(tiny_dir), workdir=tmp_path, device="cpu", dtype="bfloat16", show_progress=False)
    pool = local.pool
    requests = mixed(models, "b", max_tokens=6)
    pool.name_for(models[1])  # PEFT in place before the snapshot
    before = base_weights(pool)
    dtypes: set[torch.dtype] = set()
    spy = StepSpy(monkeypatch)
    results = local.chat(requests, on_result=lambda r: dtypes.add(next(pool.loaded.model.parameters()).dtype))

    assert (pool.loaded.dtype, pool.generation_dtype) == (torch.float32, torch.bfloat16)
    assert dtypes == {torch.bfloat16} and spy.logit_dtypes == {torch.float32}
    assert all(r.usage.completion_tokens > 0 for r in results)
    assert_pristine(pool, before)
    local.close()


def test_dtype_is_a_checked_setting_and_part_of_the_run_identity() -> None:
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_device("cpu", "float16")
    assert resolve_device("cpu", "auto")[1:] == (torch.float32, torch.float32)
    assert resolve_device("cpu", "bfloat16")[1:] == (torch.float32, torch.bfloat16)
    base = RunConfig()
    assert RunConfig(local={"dtype": "bfloat16"}).identity() != base.identity()
    assert RunConfig(local={"batch_size": 7}).identity() == base.identity()
