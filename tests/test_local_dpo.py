"""The weighted DPO + NLL objective of the local trainer (backends/local_dpo.py), on hand-made numbers and on the
tiny random Llama: the loss is the formula, the reference is the adapter the stage starts from, training widens
the chosen-vs-rejected margin, and SFT through the objective is exactly SFT."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.base import ChatMessage, FinetuneSpec, TrainingParams
from backends.local import LocalBackend
from backends.local_dpo import dpo_loss, encode_pair, sequence_logprobs, train_adapter
from backends.local_train import IGNORE_INDEX, train_lora
from backends.preference_data import DpoParams, PreferenceLine
from foundation.errors import UserError
from tests.tiny_model import build_tiny_model

PAIRS = [
    PreferenceLine(messages=[ChatMessage(role="user", content="What is the result of 12+7?")],
                   chosen="The answer is 19.", rejected="The answer is 42.", weight=1.0),
    PreferenceLine(messages=[ChatMessage(role="user", content="What is the result of 12+7?"),
                             ChatMessage(role="assistant", content="The result is 3."),
                             ChatMessage(role="user", content="Examine each these solutions as additional advice.")],
                   chosen="The answer is 19.", rejected="The result is 3.", weight=1 / 3),
    PreferenceLine(messages=[ChatMessage(role="user", content="Can you solve the following math problem?")],
                   chosen="The result is 3.", rejected="The answer is 7. The answer is 7.", weight=2 / 3),
]
SFT = [[{"role": "user", "content": "What is the result of 12+7?"}, {"role": "assistant", "content": "It is 19."}],
       [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is 42."}]]


# -- the formula -----------------------------------------------------------------------------------------------------


def by_hand(pc: float, pr: float, rc: float, rr: float, n: int, w: float, beta: float, alpha: float) -> float:
    delta = beta * ((pc - rc) - (pr - rr))
    return w * (math.log(1 + math.exp(-delta)) + alpha * (-pc / n))


@pytest.mark.parametrize(("beta", "alpha"), [(0.1, 1.0), (0.5, 0.0), (2.0, 0.25)])
def test_the_loss_is_the_hand_computed_formula(beta: float, alpha: float) -> None:
    pc, pr, rc, rr = [-10.0, -20.0, -3.0], [-12.0, -15.0, -9.0], [-11.0, -19.0, -3.5], [-11.0, -16.0, -8.0]
    n, w = [5, 4, 2], [1.0, 1 / 3, 2 / 3]
    terms = dpo_loss(*(torch.tensor(x) for x in (pc, pr, rc, rr)), torch.tensor(n), torch.tensor(w),
                     beta=beta, nll_weight=alpha)
    expected = sum(by_hand(*args, beta, alpha) for args in zip(pc, pr, rc, rr, n, w, strict=True)) / 3
    assert float(terms.loss) == pytest.approx(expected, rel=1e-6)
    margins = [(a - c) - (b - d) for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]  # 2, -2, 1.5
    assert float(terms.margin) == pytest.approx(sum(margins) / 3)
    assert float(terms.accuracy) == pytest.approx(2 / 3)


def test_weights_scale_each_pair() -> None:
    args = [torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -1.5]),
            torch.tensor([-1.5, -1.5]), torch.tensor([1, 1])]
    one = dpo_loss(*args, torch.tensor([1.0, 0.0]), beta=0.1, nll_weight=1.0).loss
    other = dpo_loss(*args, torch.tensor([0.0, 1.0]), beta=0.1, nll_weight=1.0).loss
    both = dpo_loss(*args, torch.tensor([1.0, 1.0]), beta=0.1, nll_weight=1.0).loss
    assert float(one) == pytest.approx(by_hand(-1, -2, -1.5, -1.5, 1, 1.0, 0.1, 1.0) / 2)
    assert float(one + other) == pytest.approx(float(both))
    assert float(one) != pytest.approx(float(other))


# -- on the tiny model -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def backend(tiny_dir: Path, tmp_path: Path) -> Iterator[LocalBackend]:
    local = LocalBackend(str(tiny_dir), workdir=tmp_path, device="cpu", show_progress=False)
    yield local
    local.close()


def write_files(tmp_path: Path) -> tuple[Path, Path]:
    prefs, sft = tmp_path / "pairs.jsonl", tmp_path / "sft.jsonl"
    prefs.write_text("".join(p.to_json() + "\n" for p in PAIRS), encoding="utf-8")
    sft.write_text("".join(json.dumps({"messages": m}) + "\n" for m in SFT), encoding="utf-8")
    return prefs, sft


def spec(training_file: Path, epochs: int = 1, learning_rate: float = 1e-2) -> FinetuneSpec:
    params = TrainingParams(epochs=epochs, batch_size=8, learning_rate=learning_rate, lora_rank=4, lora_dropout=0.0)
    return FinetuneSpec(key="dpo", base_model="base", training_file=training_file, suffix="d", params=params, seed=3)


def base_scores(model: torch.nn.Module, tiny_dir: Path) -> list[tuple[float, float, int]]:
    """(log p(chosen), log p(rejected), chosen tokens) per pair, one pair at a time: no padding involved."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    out = []
    with torch.no_grad():
        for pair in PAIRS:
            encoded = encode_pair(tokenizer, pair, 512)
            sides = []
            for side in (encoded.chosen, encoded.rejected):
                ids = torch.tensor([side.input_ids])
                sums, counts = sequence_logprobs(model, ids, torch.tensor([side.labels]), torch.ones_like(ids))
                sides.append((float(sums[0]), int(counts[0])))
            out.append((sides[0][0], sides[1][0], sides[0][1]))
    return out


def test_sequence_logprobs_score_only_the_answer_and_ignore_padding(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    encoded = encode_pair(tokenizer, PAIRS[1], 512)
    chosen = encoded.chosen
    # the critic's own earlier answer is context: only the final answer (and its end-of-turn) is scored
    learned = [t for t in chosen.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "The answer is 19.<|im_end|>"
    with torch.no_grad():
        logits = model(torch.tensor([chosen.input_ids])).logits[0].log_softmax(-1)
    expected = sum(float(logits[i - 1, t]) for i, t in enumerate(chosen.labels) if t != IGNORE_INDEX)
    short = encode_pair(tokenizer, PAIRS[0], 512).chosen
    width = len(chosen.input_ids)
    ids = torch.tensor([chosen.input_ids, short.input_ids + [0] * (width - len(short.input_ids))])
    labels = torch.tensor([chosen.labels, short.labels + [IGNORE_INDEX] * (width - len(short.labels))])
    mask = torch.tensor([[1] * width, [1] * len(short.input_ids) + [0] * (width - len(short.input_ids))])
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, ids, labels, mask)
        alone, _ = sequence_logprobs(model, torch.tensor([short.input_ids]), torch.tensor([short.labels]),
                                     torch.ones(1, len(short.input_ids), dtype=torch.long))
    assert float(sums[0]) == pytest.approx(expected, rel=1e-5)
    assert int(counts[0]) == len(learned)
    assert float(sums[1]) == pytest.approx(float(alone[0]), rel=1e-5)


def test_the_first_dpo_step_is_log2_plus_nll_under_the_base_model(tiny_dir: Path, backend: LocalBackend,
                                                                    tmp_path: Path) -> None:
    """A fresh LoRA is the base model (B = 0), and so is the reference: Δ = 0 for every pair at the first step."""
    prefs, _ = write_files(tmp_path)
    scores = base_scores(backend.pool.loaded.model, tiny_dir)
    dpo = DpoParams(beta=0.1, nll_weight=0.5)
    out = tmp_path / "out"
    out.mkdir()
    outcome = train_adapter(backend.pool, spec(prefs), out, adapter_name="dpo_first", init_from=None,
                            on_event=lambda m: None, show_progress=False, objective="dpo", preference_file=prefs,
                            dpo=dpo)
    expected = sum(p.weight * (math.log(2) + 0.5 * (-pc / n)) for p, (pc, _, n) in zip(PAIRS, scores, strict=True))
    assert outcome.steps == 1 and outcome.examples == 3
    assert outcome.step_losses[0] == pytest.approx(expected / 3, rel=1e-4)
    assert (out / "adapter_config.json").is_file()


def test_dpo_training_raises_the_chosen_over_rejected_margin(tiny_dir: Path, backend: LocalBackend,
                                                             tmp_path: Path) -> None:
    prefs, _ = write_files(tmp_path)
    before = base_scores(backend.pool.loaded.model, tiny_dir)
    out = tmp_path / "out"
    out.mkdir()
    events: list[str] = []
    outcome = train_adapter(backend.pool, spec(prefs, epochs=8), out, adapter_name="dpo_train", init_from=None,
                            on_event=events.append, show_progress=False, objective="dpo", preference_file=prefs)
    model = backend.pool.model
    after = base_scores(model, tiny_dir)  # the trained adapter is the active one
    for (bc, br, _), (ac, ar, _) in zip(before, after, strict=True):
        assert ac - ar > bc - br + 0.5  # each pair's margin widened, by a clear amount
    assert outcome.stats["dpo_reward_accuracy"] == 1.0 and outcome.stats["dpo_margin"] > 0.5
    assert outcome.step_losses[-1] < outcome.step_losses[0]
    assert any("dpo margin" in e for e in events)
    with model.disable_adapter():  # the base model itself was never touched
        untouched = base_scores(model, tiny_dir)
    assert [x for row in untouched for x in row] == pytest.approx([x for row in before for x in row], rel=1e-5)


def test_sft_then_dpo_uses_the_sft_adapter_as_the_reference(tiny_dir: Path, backend: LocalBackend,
                                                            tmp_path: Path) -> None:
    prefs, sft = write_files(tmp_path)
    run = spec(sft, epochs=2)
    for name in ("sft_only", "sft_dpo"):
        (tmp_path / name).mkdir()
    sft_only = train_adapter(backend.pool, run, tmp_path / "sft_only", adapter_name="sft_only", init_from=None,
                             on_event=lambda m: None, show_progress=False)
    scores = base_scores(backend.pool.model, tiny_dir)  # under the SFT'd adapter (the active one)
    backend.pool.forget("sft_only")
    both = train_adapter(backend.pool, run, tmp_path / "sft_dpo", adapter_name="sft_dpo", init_from=None,
                         on_event=lambda m: None, show_progress=False, objective="sft-then-dpo",
                         preference_file=prefs)
    assert both.step_losses[: sft_only.steps] == pytest.approx(sft_only.step_losses)  # the same SFT stage first
    first_dpo = both.step_losses[sft_only.steps]
    expected = sum(p.weight * (math.log(2) - pc / n) for p, (pc, _, n) in zip(PAIRS, scores, strict=True)) / 3
    assert first_dpo == pytest.approx(expected, rel=1e-4)  # Δ = 0 against the SFT'd adapter, not the base
    assert both.stats["sft_examples"] == 2 and both.stats["dpo_pairs"] == 3
    assert both.steps == sft_only.steps + 2


def test_sft_through_the_objective_is_train_lora(tiny_dir: Path, backend: LocalBackend, tmp_path: Path) -> None:
    _, sft = write_files(tmp_path)
    losses = []
    for name, train in (("plain", train_lora), ("objective", train_adapter)):
        (tmp_path / name).mkdir()
        outcome = train(backend.pool, spec(sft, epochs=2), tmp_path / name, adapter_name=name, init_from=None,
                        on_event=lambda m: None, show_progress=False)
        backend.pool.forget(name)
        losses.append(outcome.step_losses)
        assert outcome.stats == {}
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_dpo_needs_a_preference_file(backend: LocalBackend, tmp_path: Path) -> None:
    _, sft = write_files(tmp_path)
    with pytest.raises(UserError, match="preference file"):
        train_adapter(backend.pool, spec(sft), tmp_path, adapter_name="none", init_from=None,
                      on_event=lambda m: None, show_progress=False, objective="dpo")
