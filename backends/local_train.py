"""LoRA supervised finetuning of one agent on an OpenAI-format chat JSONL, with transformers' Trainer.

The loss covers only the assistant turns the data says to learn (OpenAI's `weight`: missing or 1 = learn, 0 =
context only), which is how a critic learns its final answer without also learning the wrong first answer it
corrected. SmolLM2's chat template has no `{% generation %}` markers, so the mask is built here from rendered
prefixes of the conversation, checked token by token rather than trusted.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import (
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)

from backends.base import ChatMessage, FinetuneSpec, TrainingParams
from backends.local_pool import AdapterPool
from foundation.crashpoints import crashpoint
from foundation.errors import UserError

IGNORE_INDEX = -100  # label value the causal-LM loss skips
EventSink = Callable[[str], None]


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    too_long: bool = False  # a learned token lies past max_length: never trained on, nor cut (see encode_example)

    @property
    def learned_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class TrainOutcome:
    """What a finished training run reports back to the job record."""

    examples: int
    skipped: int
    steps: int
    seconds: float
    trained_tokens: int
    train_loss: float | None
    step_losses: list[float] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)  # a stage's own numbers (DPO's margins), for the job record


def read_training_file(path: Path) -> list[list[ChatMessage]]:
    """Parse the JSONL strictly: a bad line is named by number, so the user can fix the file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read training file {path}: {exc}; check the path and that it is UTF-8") from exc
    conversations = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            conversations.append(_parse_line(path, number, line))
    if not conversations:
        raise UserError(f"training file {path} has no examples: build the dataset before finetuning")
    return conversations


def _parse_line(path: Path, number: int, line: str) -> list[ChatMessage]:
    try:
        record = json.loads(line)
        messages = [ChatMessage.model_validate(m) for m in record["messages"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
        raise UserError(
            f"{path} line {number} is not a chat example ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
            'each line must be {"messages": [{"role": ..., "content": ...}, ...]}'
        ) from exc
    bad_weight = [m.weight for m in messages if m.weight not in (None, 0, 1)]
    if bad_weight:
        raise UserError(f"{path} line {number}: weight must be 0 or 1, got {bad_weight[0]}")
    return messages


def encode_example(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage], max_length: int
) -> EncodedExample:
    """Token ids of the whole conversation and labels that keep only the learned assistant turns.

    A learned span starts after the assistant header (rendered as the generation prompt of the conversation
    so far) and ends with the end-of-turn token, so the model learns to stop; the template's trailing newline
    after it is not learned because generation never gets there.

    A target is never cut: cut on the right, a critic's final answer (its only learned span, at the very end)
    would lose its end and its end-of-turn, teaching the model to stop mid-solution. Only tokens after the last
    learned one are dropped to fit `max_length`; an example whose learned tokens do not all fit comes back whole
    with `too_long` set, for the trainer to drop and count.
    """
    # Leading whitespace carries no meaning after a role header, but it can merge with the template's newline
    # into one token (SmolLM2 has "\n\n"), and then no prefix of the conversation tokenizes as a prefix of the
    # whole: a model's answer starting with a blank line must not break its agent's finetune.
    turns = [{"role": m.role, "content": m.content.lstrip()} for m in messages]
    full = _render_tokens(tokenizer, turns, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    eos = tokenizer.eos_token_id
    for i, message in enumerate(messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        start = _prefix_length(tokenizer, turns[:i], full, generation_prompt=True)
        end = _prefix_length(tokenizer, turns[: i + 1], full, generation_prompt=False)
        if eos is not None and eos in full[start:end]:
            end = start + max(j for j, t in enumerate(full[start:end]) if t == eos) + 1
        labels[start:end] = full[start:end]
    learned_end = max((i + 1 for i, label in enumerate(labels) if label != IGNORE_INDEX), default=0)
    if learned_end > max_length:
        return EncodedExample(input_ids=full, labels=labels, too_long=True)
    return EncodedExample(input_ids=full[:max_length], labels=labels[:max_length])


def _render_tokens(
    tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], generation_prompt: bool
) -> list[int]:
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=generation_prompt, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_length(
    tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]], full: list[int], generation_prompt: bool
) -> int:
    prefix = _render_tokens(tokenizer, turns, generation_prompt)
    if full[: len(prefix)] != prefix:
        raise UserError(
            "cannot build the assistant-only loss mask: the chat template does not render a "
            f"conversation's first {len(turns)} turn(s) as a token prefix of the whole (a template that "
            "rewrites earlier turns, or a turn starting with whitespace that merges across the boundary); "
            "fix the data or the template"
        )
    return len(prefix)


class _Examples(torch.utils.data.Dataset[dict[str, list[int]]]):
    def __init__(self, examples: Sequence[EncodedExample]) -> None:
        self._examples = list(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self._examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


@dataclass(frozen=True)
class RightPadCollator:
    """Right padding for training (positions then start at 0 for every row); pads never count in the loss."""

    pad_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)

        def pad(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (width - len(values))

        return {
            "input_ids": torch.tensor([pad(f["input_ids"], self.pad_id) for f in features]),
            "labels": torch.tensor([pad(f["labels"], IGNORE_INDEX) for f in features]),
            "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
        }


@dataclass(frozen=True)
class PackingCollator:
    """A step's examples packed end to end into as few rows as hold them (first fit, longest first, each row as
    long as the longest example), so the padding a right-padded batch computes is mostly not computed.

    Positions restart at 0 with every example; with no attention mask transformers reads those restarts as
    separate sequences and keeps each example's attention inside itself (a block-diagonal causal mask), and a
    row's tail padding is one more such sequence that nothing attends to. Each example's first label is
    ignored, so no example learns from the one before it: the step's loss is the same mean over the same learned
    tokens as the padded batch's, and a row is never longer than the padded batch's rows.
    """

    pad_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        rows: list[list[dict[str, list[int]]]] = []
        for feature in sorted(features, key=lambda f: -len(f["input_ids"])):
            free = [r for r in rows if sum(len(f["input_ids"]) for f in r) + len(feature["input_ids"]) <= width]
            if free:
                free[0].append(feature)
            else:
                rows.append([feature])
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        positions: list[list[int]] = []
        for row in rows:
            row_ids: list[int] = []
            row_labels: list[int] = []
            row_positions: list[int] = []
            for f in row:
                row_ids += f["input_ids"]
                row_labels += [IGNORE_INDEX, *f["labels"][1:]]
                row_positions += range(len(f["input_ids"]))
            pad = width - len(row_ids)
            ids.append(row_ids + [self.pad_id] * pad)
            labels.append(row_labels + [IGNORE_INDEX] * pad)
            positions.append(row_positions + list(range(pad)))
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(positions),
            "use_cache": False,  # with a cache transformers would not look for packed sequences
        }


class LossProgress(TrainerCallback):
    """Records every step's loss, reports each epoch's mean as an event and drives a rich bar if asked."""

    def __init__(self, label: str, on_event: EventSink, show: bool) -> None:
        self.step_losses: list[float] = []
        self.epoch_losses: list[float] = []
        self._label = label
        self._on_event = on_event
        self._epoch_start = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            disable=not show,
        )
        self._task = self._progress.add_task(label, total=None, loss="-")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._progress.update(self._task, total=state.max_steps)
        self._progress.start()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Any = None,
        **kw: Any,
    ) -> None:
        if logs and "loss" in logs:
            self.step_losses.append(float(logs["loss"]))
            self._progress.update(self._task, loss=f"{self.step_losses[-1]:.4f}")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._progress.update(self._task, completed=state.global_step)
        crashpoint("local.train_step")  # k-th optimizer step of this process: mid-training

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        losses = self.step_losses[self._epoch_start :]
        self._epoch_start = len(self.step_losses)
        if losses:
            self.epoch_losses.append(sum(losses) / len(losses))
            self._on_event(f"epoch {len(self.epoch_losses)} loss {self.epoch_losses[-1]:.4f}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        self._progress.stop()


def train_lora(
    pool: AdapterPool,
    spec: FinetuneSpec,
    out_dir: Path,
    *,
    adapter_name: str,
    init_from: Path | None,
    on_event: EventSink,
    show_progress: bool = True,
    packed: bool = True,
) -> TrainOutcome:
    """Train adapter `adapter_name` on `spec.training_file`, save it to `out_dir`; it stays loaded after.

    `init_from` is a previous adapter to keep training (strategy `continue`), otherwise LoRA starts fresh. The
    adapter is added to the pool's base model, so training never holds a second copy of the base weights.
    `packed=False` right-pads each step's batch instead of packing it (the same steps, more tokens computed).
    """
    started = time.perf_counter()
    tokenizer = pool.loaded.tokenizer
    conversations = read_training_file(spec.training_file)
    max_length = spec.params.max_length
    encoded = [encode_example(tokenizer, c, max_length) for c in conversations]
    examples = [e for e in encoded if e.learned_tokens > 0 and not e.too_long]
    too_long = sum(e.too_long for e in encoded)
    on_event(f"loaded {len(examples)} examples from {spec.training_file}")
    if too_long:
        on_event(f"dropped {too_long} examples whose learned answer ends past max_length {max_length} (never cut): "
                 "raise [training] max_length to keep them")
    if len(examples) + too_long < len(encoded):
        on_event(f"skipped {len(encoded) - len(examples) - too_long} examples with no assistant tokens to learn")
    if not examples:
        raise UserError(f"{spec.training_file} has no assistant turn to learn within max_length {max_length}: check "
                        "the weights, or raise [training] max_length")

    set_seed(spec.seed)  # before the adapter exists: LoRA's A matrices are drawn from the global RNG
    with warnings.catch_warnings():
        # PEFT 0.21 calls transformers' deprecated `is_gradient_checkpointing`: noise, not the user's to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = pool.add_trainable(adapter_name, lora=lora_config(spec.params), init_from=init_from)
        callback = LossProgress(f"train {spec.suffix or spec.key}", on_event, show_progress)
        trainer = Trainer(
            model=model,
            args=_training_args(spec, out_dir / "trainer", pool.loaded.device),
            train_dataset=_Examples(examples),
            data_collator=(PackingCollator if packed else RightPadCollator)(pad_id=_pad_id(tokenizer)),
            callbacks=[callback],
        )
        trainer.remove_callback(PrinterCallback)  # added because tqdm is off; it would print every log dict
        output = trainer.train()
    model.eval()
    _save_adapter(model, adapter_name, out_dir)
    on_event("saved adapter")
    tokens_per_epoch = sum(len(e.input_ids) for e in examples)
    return TrainOutcome(
        examples=len(examples),
        skipped=len(encoded) - len(examples),
        steps=int(output.global_step),
        seconds=time.perf_counter() - started,
        trained_tokens=tokens_per_epoch * spec.params.epochs,
        train_loss=callback.epoch_losses[-1] if callback.epoch_losses else _finite(output.training_loss),
        step_losses=callback.step_losses,
    )


def lora_config(params: TrainingParams) -> LoraConfig:
    return LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        target_modules=list(params.target_modules),
        task_type="CAUSAL_LM",
    )


def _training_args(spec: FinetuneSpec, output_dir: Path, device: torch.device) -> TrainingArguments:
    on_cuda = device.type == "cuda"
    params = spec.params
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=params.batch_size,
        num_train_epochs=params.epochs,
        learning_rate=params.learning_rate,
        seed=spec.seed,
        data_seed=spec.seed,
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        remove_unused_columns=False,
        bf16=on_cuda,
        use_cpu=not on_cuda,
        dataloader_pin_memory=on_cuda,
    )


def _save_adapter(model: PeftModel, adapter_name: str, out_dir: Path) -> None:
    """PEFT saves any adapter not called "default" into a subfolder named after it; lift its files up so the
    adapter directory itself is what PeftModel.from_pretrained expects."""
    staging = out_dir / ".peft"
    model.save_pretrained(str(staging), selected_adapters=[adapter_name])
    for item in (staging / adapter_name).iterdir():
        item.replace(out_dir / item.name)
    shutil.rmtree(staging)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
