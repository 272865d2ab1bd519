"""Trained tokens/s of the local LoRA trainer, right-padded batches vs packed ones, beside the compute bound.

The same job twice (same examples, same seed, so the same steps): GSM8K training questions with the task's
round-1 prompt, each answered with its official worked solution, LoRA r=8 on q/k/v/o, batch 8. Trained tokens are
the examples' real tokens (padding excluded); the bound is this run's matmul rate / (6 x parameters) per trained
token (LoRA skips the frozen weights' gradients, so about 4 x is the real work: the share printed is against 6 x).

    python bench/local_training.py                    # bundled SmolLM2-135M-Instruct, 48 examples, 1 epoch
    python bench/local_training.py --smoke            # a tiny random model (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import prompts
from backends.base import FinetuneSpec, TrainingParams
from backends.local import LocalBackend
from backends.local_model import DEFAULT_MODEL
from backends.local_train import train_lora
from bench.local_generation import load_average, matmul_rate
from orchestrator.tasks import get_task


def write_data(path: Path, count: int, seed: int) -> None:
    task = get_task("gsm8k")
    lines = []
    for problem in task.train_problems(count, seed):
        question = prompts.render("gsm8k/round1.txt", question=problem.question)
        answer = str(problem.meta["solution"]).replace("####", "The answer is")
        lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    with tempfile.TemporaryDirectory(prefix="maft-train-bench-") as tmp:
        folder = Path(tmp)
        model = args.model
        if args.smoke:
            from tests.tiny_model import build_tiny_model

            model, args.examples = str(build_tiny_model(folder / "tiny")), 8
        print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load_average()}, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        rate = matmul_rate(torch.float32)
        data = folder / "train.jsonl"
        write_data(data, args.examples, seed=0)
        backend = LocalBackend(model, workdir=folder, device="auto", show_progress=False)
        params = sum(p.numel() for p in backend.pool.loaded.model.parameters())
        bound = rate * 1e9 / (6 * params)
        print(f"matmul float32 {rate:.0f} GFLOP/s; {params / 1e6:.1f} M parameters; bound {bound:.0f} trained tok/s "
              f"(6 x parameters per token)")
        spec = FinetuneSpec(key="bench", base_model="base", training_file=data, suffix="b",
                            params=TrainingParams(epochs=args.epochs, batch_size=args.batch_size, learning_rate=1e-4,
                                                  lora_rank=8, max_length=2048))
        rates = {}
        for packed in (False, True, False, True):  # twice each, interleaved: the machine's load drifts
            out = folder / f"out-{packed}-{len(rates)}"
            out.mkdir()
            outcome = train_lora(backend.pool, spec, out, adapter_name=f"bench_{packed}", init_from=None,
                                 on_event=lambda message: None, show_progress=False, packed=packed)
            backend.pool.forget(f"bench_{packed}")
            label = "packed" if packed else "right-padded"
            per_s = outcome.trained_tokens / outcome.seconds
            rates.setdefault(label, []).append(per_s)
            print(f"{label:13} {outcome.examples} examples, {outcome.steps} steps, {outcome.trained_tokens} tokens in "
                  f"{outcome.seconds:.1f} s = {per_s:.0f} trained tok/s ({per_s / bound:.3f} of the bound); final "
                  f"loss {outcome.step_losses[-1]:.4f}; load {load_average()}")
        best = {label: max(values) for label, values in rates.items()}
        print(f"speed-up: packed / right-padded = {best['packed'] / best['right-padded']:.2f}x (best of two each)")


if __name__ == "__main__":
    main()
