"""Packed training batches (`PackingCollator`) on the tiny random Llama: fewer tokens computed, the same step.

Packing changes how a step's examples are laid out, not which examples a step holds, so the loss and the
gradients must be the padded batch's; each assertion would fail if examples leaked into each other (a missing
block-diagonal mask, a label crossing from one example into the next) or if padding were still computed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from backends.base import ChatMessage, FinetuneSpec, TrainingParams
from backends.local import LocalBackend
from backends.local_train import IGNORE_INDEX, PackingCollator, RightPadCollator, encode_example, train_lora
from tests.tiny_model import build_tiny_model

QUESTIONS = ("Hi", "What is 17+25?", "Can you solve the following math problem? What is 12*7+3? " * 3, "abc",
             "Here are a list of opinions from different agents: one agent response: 7.")
ANSWERS = ("It is 4.", "The answer is 42.", "Step one, then step two. The answer is 87. " * 2, "x", "7")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def features(tiny_dir: Path) -> list[dict[str, list[int]]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    out = []
    for q, a in zip(QUESTIONS, ANSWERS, strict=True):
        messages = [ChatMessage(role="user", content=q), ChatMessage(role="assistant", content=a)]
        example = encode_example(tokenizer, messages, max_length=512)
        out.append({"input_ids": example.input_ids, "labels": example.labels})
    # learned from its first token on: a padded row never uses that first label (nothing comes before it), and a
    # packed row must not either, or it would learn it from the end of the example packed before it
    out.append({"input_ids": out[1]["input_ids"][-6:], "labels": out[1]["input_ids"][-6:]})
    return out


def loss_and_grads(tiny_dir: Path, batch: dict[str, object]) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(model, config)
    loss = peft(**batch).loss
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in peft.parameters() if p.requires_grad and p.grad is not None]


def test_a_packed_step_has_the_padded_steps_loss_and_gradients(tiny_dir: Path) -> None:
    feats = features(tiny_dir)
    padded = RightPadCollator(pad_id=0)(feats)
    packed = PackingCollator(pad_id=0)(feats)

    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]  # no row longer than the padded ones
    assert packed["input_ids"].numel() < padded["input_ids"].numel() // 2  # most of the padding is gone
    learned = [label for f in feats for label in f["labels"][1:] if label != IGNORE_INDEX]
    assert sorted(int(x) for x in packed["labels"].flatten() if x != IGNORE_INDEX) == sorted(learned)
    loss_padded, grads_padded = loss_and_grads(tiny_dir, padded)
    loss_packed, grads_packed = loss_and_grads(tiny_dir, packed)
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    assert len(grads_packed) == len(grads_padded) > 0
    for a, b in zip(grads_packed, grads_padded, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_training_packed_follows_the_padded_runs_losses(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")
    params = TrainingParams(epochs=1, batch_size=4, learning_rate=1e-2, lora_rank=4, lora_dropout=0.0)
    spec = FinetuneSpec(key="pack", base_model="base", training_file=data, suffix="p", params=params)
    backend = LocalBackend(str(tiny_dir), workdir=tmp_path, device="cpu", show_progress=False)
    losses = []
    for packed in (False, True):
        out = tmp_path / f"out-{packed}"
        out.mkdir()
        outcome = train_lora(backend.pool, spec, out, adapter_name=f"pack_{packed}", init_from=None,
                             on_event=lambda message: None, show_progress=False, packed=packed)
        backend.pool.forget(f"pack_{packed}")
        losses.append(outcome.step_losses)
    assert len(losses[0]) == len(losses[1]) == 5
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    backend.close()
