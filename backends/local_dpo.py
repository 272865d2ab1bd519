"""DPO + NLL for our LoRA trainer, weighted per pair, and the objective that picks SFT, DPO or SFT then DPO.

The loss, per pair i with weight w_i, chosen answer c and rejected answer r given prompt x:

    Δ_i = β · [(log πθ(c|x) − log π_ref(c|x)) − (log πθ(r|x) − log π_ref(r|x))]
    L   = mean_i  w_i · ( −log σ(Δ_i)  +  α · (−log πθ(c|x)) / |c| )

DPO (Rafailov et al., arXiv 2305.18290) plus Iterative RPO's length-normalised NLL on the chosen side (Pang et
al., arXiv 2404.19733: without it DPO fell below SFT on GSM8K), each pair scaled by its vote margin as in ScPO
(Prasad et al., arXiv 2411.04109). Log-probabilities are sums over the answer's tokens, its end-of-turn included
(the tokens SFT would learn, from `local_train.encode_example`); |c| is how many there are. β = `beta`, α =
`nll_weight`.

The reference π_ref is the model at the start of the stage: the adapter as it is when DPO begins (a fresh LoRA
has B = 0, so that is the base model; a continued adapter, or the one SFT just trained, is itself). Its
log-probabilities are computed once, before the first step, under `torch.no_grad` and in eval mode, and kept as
two numbers per pair. That needs no second model and no frozen copy of the adapter in memory (TRL's PEFT route
copies the adapter into a "ref" one and runs a second forward every step), and it is exact: the reference never
changes during the stage, so scoring it once gives the same numbers every step would have recomputed.

Why not TRL's DPOTrainer: TRL 1.x has no per-pair weights (its `use_weighting` is WPO's, not ours), and it is
one more heavy dependency beside the `Trainer` SFT already uses; here DPO is a `compute_loss` on the same
`Trainer`, with the same arguments, callbacks, seeds and adapter handling as SFT.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase, PrinterCallback, Trainer, set_seed

from backends.base import ChatMessage, DpoParams, FinetuneSpec, Objective
from backends.local_pool import AdapterPool
from backends.local_train import (
    IGNORE_INDEX,
    EncodedExample,
    EventSink,
    LossProgress,
    TrainOutcome,
    _pad_id,
    _save_adapter,
    _training_args,
    encode_example,
    lora_config,
    train_lora,
)
from backends.preference_data import PreferenceLine, read_preference_file
from foundation.errors import UserError


@dataclass(frozen=True)
class DpoTerms:
    """The batch's loss and what it is made of (means over the batch, unweighted, for logs)."""

    loss: torch.Tensor
    dpo: torch.Tensor  # −log σ(Δ)
    nll: torch.Tensor  # −log πθ(c)/|c|
    margin: torch.Tensor  # Δ / β: the policy's log-ratio margin over the reference
    accuracy: torch.Tensor  # share of pairs with Δ > 0


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    weights: torch.Tensor,
    *,
    beta: float,
    nll_weight: float,
) -> DpoTerms:
    """The weighted DPO + NLL loss of a batch from summed answer log-probabilities (one value per pair)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    dpo = -torch.nn.functional.logsigmoid(beta * margin)
    nll = -policy_chosen / chosen_tokens.clamp(min=1)
    loss = (weights * (dpo + nll_weight * nll)).mean()
    return DpoTerms(loss=loss, dpo=dpo.mean(), nll=nll.mean(), margin=margin.mean(),
                    accuracy=(margin > 0).float().mean())


def sequence_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are.

    The softmax is taken only at labelled positions (the answer), not over the whole sequence's vocabulary.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    chosen_logits = logits[mask].float()
    token_logprobs = chosen_logits.log_softmax(-1).gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(input_ids.shape[0], device=logits.device, dtype=token_logprobs.dtype)
    return sums.index_add(0, rows, token_logprobs), mask.sum(dim=1)


@dataclass(frozen=True)
class EncodedPair:
    chosen: EncodedExample
    rejected: EncodedExample
    weight: float

    @property
    def too_long(self) -> bool:
        return self.chosen.too_long or self.rejected.too_long


def encode_pair(tokenizer: PreTrainedTokenizerBase, pair: PreferenceLine, max_length: int) -> EncodedPair:
    """The prompt followed by each answer, each learned exactly where SFT would learn it (earlier assistant turns
    of a critic's context are context only)."""
    prompt = [m.model_copy(update={"weight": 0}) if m.role == "assistant" else m for m in pair.messages]

    def encoded(answer: str) -> EncodedExample:
        return encode_example(tokenizer, [*prompt, ChatMessage(role="assistant", content=answer)], max_length)

    return EncodedPair(chosen=encoded(pair.chosen), rejected=encoded(pair.rejected), weight=pair.weight)


class _Pairs(torch.utils.data.Dataset[dict[str, Any]]):
    """Encoded pairs and, once computed, their reference log-probabilities."""

    def __init__(self, pairs: Sequence[EncodedPair]) -> None:
        self.pairs = list(pairs)
        self.ref_chosen = [0.0] * len(self.pairs)
        self.ref_rejected = [0.0] * len(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        return {"chosen": pair.chosen, "rejected": pair.rejected, "weight": pair.weight,
                "ref_chosen": self.ref_chosen[index], "ref_rejected": self.ref_rejected[index]}


@dataclass(frozen=True)
class PairCollator:
    """A step's pairs as one right-padded batch: the chosen rows first, then the rejected rows in the same order,
    so one forward pass scores both sides. The key is `pair_labels`, not `labels`: the Trainer would otherwise
    count label tokens for a loss it does not compute."""

    pad_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: list[EncodedExample] = [f["chosen"] for f in features] + [f["rejected"] for f in features]
        width = max(len(r.input_ids) for r in rows)

        def pad(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (width - len(values))

        return {
            "input_ids": torch.tensor([pad(r.input_ids, self.pad_id) for r in rows]),
            "pair_labels": torch.tensor([pad(r.labels, IGNORE_INDEX) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r.input_ids), 0) for r in rows]),
            "weight": torch.tensor([float(f["weight"]) for f in features]),
            "ref_chosen": torch.tensor([float(f["ref_chosen"]) for f in features]),
            "ref_rejected": torch.tensor([float(f["ref_rejected"]) for f in features]),
        }


class DpoTrainer(Trainer):
    """transformers' Trainer with the weighted DPO + NLL loss in place of the causal-LM loss."""

    def __init__(self, *args: Any, dpo: DpoParams, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dpo = dpo

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        sums, counts = sequence_logprobs(model, inputs["input_ids"], inputs["pair_labels"], inputs["attention_mask"])
        half = inputs["weight"].shape[0]
        terms = dpo_loss(sums[:half], sums[half:], inputs["ref_chosen"], inputs["ref_rejected"], counts[:half],
                         inputs["weight"], beta=self.dpo.beta, nll_weight=self.dpo.nll_weight)
        return (terms.loss, {"margin": terms.margin}) if return_outputs else terms.loss


def score_pairs(trainer: Trainer, dataset: _Pairs, batch_size: int, pad_id: int) -> tuple[list[float], list[float]]:
    """Every pair's summed chosen and rejected log-probabilities under the model as it is now, without gradients
    and in eval mode (no dropout), under the same autocast as the training steps."""
    model = trainer.model
    assert model is not None
    was_training = model.training
    model.eval()
    device = trainer.args.device
    collate = PairCollator(pad_id=pad_id)
    chosen: list[float] = []
    rejected: list[float] = []
    try:
        with torch.no_grad(), trainer.accelerator.autocast():
            for start in range(0, len(dataset), batch_size):
                batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                sums, _ = sequence_logprobs(model, batch["input_ids"].to(device), batch["pair_labels"].to(device),
                                            batch["attention_mask"].to(device))
                half = batch["weight"].shape[0]
                chosen += [float(x) for x in sums[:half]]
                rejected += [float(x) for x in sums[half:]]
    finally:
        model.train(was_training)
    return chosen, rejected


def train_dpo_stage(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: FinetuneSpec,
    preference_file: Path,
    dpo: DpoParams,
    out_dir: Path,
    device: torch.device,
    *,
    on_event: EventSink,
    show_progress: bool,
) -> TrainOutcome:
    """One DPO stage on the active (trainable) adapter of `model`; the reference is that adapter as it is now."""
    started = time.perf_counter()
    lines = read_preference_file(preference_file)
    max_length = spec.params.max_length
    encoded = [encode_pair(tokenizer, line, max_length) for line in lines]
    pairs = [p for p in encoded if not p.too_long and p.chosen.learned_tokens and p.rejected.learned_tokens]
    on_event(f"loaded {len(pairs)} preference pairs from {preference_file}")
    if len(pairs) < len(encoded):
        on_event(f"dropped {len(encoded) - len(pairs)} pairs whose answers end past max_length {max_length} "
                 "(never cut): raise [training] max_length to keep them")
    if not pairs:
        raise UserError(f"{preference_file} has no pair that fits in max_length {max_length}: raise [training] "
                        "max_length")
    dataset = _Pairs(pairs)
    pad_id = _pad_id(tokenizer)
    args = _training_args(spec, out_dir / "trainer", device)
    if dpo.learning_rate is not None:
        args.learning_rate = dpo.learning_rate
    callback = LossProgress(f"dpo {spec.suffix or spec.key}", on_event, show_progress)
    trainer = DpoTrainer(model=model, args=args, train_dataset=dataset, data_collator=PairCollator(pad_id=pad_id),
                         callbacks=[callback], dpo=dpo)
    trainer.remove_callback(PrinterCallback)
    dataset.ref_chosen, dataset.ref_rejected = score_pairs(trainer, dataset, spec.params.batch_size, pad_id)
    output = trainer.train()
    after_chosen, after_rejected = score_pairs(trainer, dataset, spec.params.batch_size, pad_id)
    margins = [(ac - rc) - (ar - rr) for ac, rc, ar, rr in
               zip(after_chosen, dataset.ref_chosen, after_rejected, dataset.ref_rejected, strict=True)]
    stats = {
        "dpo_pairs": float(len(pairs)),
        "dpo_margin": sum(margins) / len(margins),  # mean log-ratio margin over the reference, after training
        "dpo_reward_accuracy": sum(m > 0 for m in margins) / len(margins),
        "dpo_chosen_logp_change": sum(a - r for a, r in zip(after_chosen, dataset.ref_chosen, strict=True))
        / len(pairs),  # should not fall: DPO on math can push both sides down
    }
    on_event(f"dpo margin {stats['dpo_margin']:.4f}, reward accuracy {stats['dpo_reward_accuracy']:.3f}, "
             f"chosen log-prob change {stats['dpo_chosen_logp_change']:+.4f}")
    tokens = sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    return TrainOutcome(
        examples=len(pairs),
        skipped=len(encoded) - len(pairs),
        steps=int(output.global_step),
        seconds=time.perf_counter() - started,
        trained_tokens=tokens * spec.params.epochs,
        train_loss=callback.epoch_losses[-1] if callback.epoch_losses else None,
        step_losses=callback.step_losses,
        stats=stats,
    )


def train_adapter(
    pool: AdapterPool,
    spec: FinetuneSpec,
    out_dir: Path,
    *,
    adapter_name: str,
    init_from: Path | None,
    on_event: EventSink,
    show_progress: bool = True,
    packed: bool = True,
    objective: Objective = "sft",
    preference_file: Path | None = None,
    dpo: DpoParams | None = None,
) -> TrainOutcome:
    """Train adapter `adapter_name` by `objective` and save it to `out_dir` (it stays loaded after):

    - "sft": exactly `local_train.train_lora` on `spec.training_file`;
    - "dpo": DPO + NLL on `preference_file`, from a fresh adapter or `init_from`, whichever it starts as being
      the reference;
    - "sft-then-dpo": SFT on `spec.training_file`, then DPO on `preference_file` with the SFT'd adapter as the
      reference, in one job (the saved adapter is the final one).
    """
    if objective == "sft":
        return train_lora(pool, spec, out_dir, adapter_name=adapter_name, init_from=init_from, on_event=on_event,
                          show_progress=show_progress, packed=packed)
    if preference_file is None:
        raise UserError(f"objective {objective!r} needs a preference file: build the preference dataset first")
    params = dpo or DpoParams()
    tokenizer, device = pool.loaded.tokenizer, pool.loaded.device
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if objective == "sft-then-dpo":
            first = train_lora(pool, spec, out_dir, adapter_name=adapter_name, init_from=init_from,
                               on_event=on_event, show_progress=show_progress, packed=packed)
            model = pool.model
            assert isinstance(model, PeftModel)
            model.set_adapter(adapter_name)
            model.train()
        else:
            set_seed(spec.seed)  # as train_lora: before the adapter exists (LoRA's A is drawn from the global RNG)
            model = pool.add_trainable(adapter_name, lora=lora_config(spec.params), init_from=init_from)
        second = train_dpo_stage(model, tokenizer, spec, preference_file, params, out_dir, device,
                                 on_event=on_event, show_progress=show_progress)
    model.eval()
    _save_adapter(model, adapter_name, out_dir)
    on_event("saved adapter")
    if objective == "dpo":
        return second
    return replace(
        second,
        examples=first.examples + second.examples,
        skipped=first.skipped + second.skipped,
        steps=first.steps + second.steps,
        seconds=first.seconds + second.seconds,
        trained_tokens=first.trained_tokens + second.trained_tokens,
        step_losses=first.step_losses + second.step_losses,
        stats={"sft_examples": float(first.examples), "sft_steps": float(first.steps),
               **({"sft_train_loss": first.train_loss} if first.train_loss is not None else {}), **second.stats},
    )
