"""GPU check of the local engine: a model of realistic shape with random weights (nothing to download), 3 LoRA
adapters, 256 sampled chats in bfloat16, and a LoRA finetune; prints what bench/RESULTS.md records.

Rows, all on the same model and adapters in one run: `LocalBackend.chat` (the refill engine, adapters gathered
into mixed batches), the same engine with merged adapters (one adapter's rows at a time), today's static-chunk
path, an unbatched-by-adapter baseline (one `generate` per adapter over all of that adapter's prompts, as plain
transformers + PEFT would be used) and a naive loop (one `generate` per prompt, on a few chats). A random model
never says end-of-turn, so each request's max_tokens is drawn from answer lengths SmolLM2 gave on GSM8K (ragged,
as real answers are); useful tokens are each request's own tokens. The compute bound is (prompt + generated
tokens) x 2 x parameters / this run's bf16 matmul rate; training's is 6 x parameters per trained token.

Needs on the GPU machine, beyond its image: this checkout's transformers, peft and pydantic (bench/gpu_wheels.sh
downloads them into .whl). Then, as one `run` of the device tool with `carry: [".whl"]`:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 && python3 bench/gpu_check.py \
        | tee $OUT/gpu_check.txt

It finishes in about 3 minutes on one H200. `--smoke` runs the same code on a tiny model on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peft
import torch
import transformers
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from backends.base import ChatMessage, ChatRequest, ChatResult, FinetuneSpec, TrainingParams, Usage
from backends.local import LocalBackend
from backends.local_generate import generate_chats
from bench.local_generation import load_average, make_adapters
from tests.tiny_model import CHATML_TEMPLATE

# Completion lengths of SmolLM2-135M's sampled answers to 48 GSM8K questions (max_tokens 320), in tokens.
ANSWER_LENGTHS = (4, 4, 7, 9, 11, 12, 12, 13, 14, 20, 21, 25, 25, 26, 27, 28, 29, 32, 54, 54, 60, 64, 70, 82, 120,
                  198, 212, 228, 266) + (320,) * 19
SHAPES = {  # Llama-3.2-1B's and Qwen2-0.5B's shapes (Llama layers either way), and a tiny one for --smoke
    "llama-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8},
    "qwen2-0.5b": {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2},
    "tiny": {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_model(folder: Path, shape: str, device: str) -> Path:
    """Save a random model of `shape` and a word-level tokenizer covering its whole vocabulary to `folder`."""
    dims = SHAPES[shape]
    words = [*SPECIALS, "user", "assistant", "system", *(f"w{i}" for i in range(dims["vocab_size"] - 6))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="w0", chat_template=CHATML_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS)})
    # A Llama config even for Qwen2's shape: with model_type qwen2, AutoTokenizer would rebuild the tokenizer
    # as Qwen2's byte-level BPE and drop these words.
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)  # peaked next-token distributions, like a trained model's
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def make_requests(count: int, adapters: list[Path], vocab: int, max_tokens: int, seed: int) -> list[ChatRequest]:
    """Prompts of 60-250 random words, each asked of every adapter in turn; ragged max_tokens."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        words = " ".join(f"w{rng.randrange(vocab - 6)}" for _ in range(rng.randint(60, 250)))
        length = max(1, min(max_tokens, round(rng.choice(ANSWER_LENGTHS) * max_tokens / 320)))
        requests.append(ChatRequest(key=f"g{i}", model=str(adapters[i % len(adapters)]),
                                    messages=(ChatMessage(role="user", content=words),), max_tokens=length,
                                    temperature=0.7, top_p=0.9, seed=seed + i))
    return requests


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, size: int) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    for _ in range(3):
        a @ b
    sync()
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * size**3 * 10 / (time.perf_counter() - started) / 1e9


def timed(run: Callable[[], list[ChatResult]]) -> tuple[list[ChatResult], float]:
    sync()
    started = time.perf_counter()
    results = run()
    sync()
    return results, time.perf_counter() - started


def per_adapter_generate(backend: LocalBackend, requests: list[ChatRequest]) -> list[ChatResult]:
    """Plain transformers + PEFT: one batched `generate` per adapter, max_new_tokens = the group's longest;
    each row's useful tokens are its own max_tokens (what it would have stopped at)."""
    pool = backend.pool
    model = pool.model
    assert isinstance(model, PeftModel)
    tokenizer = pool.loaded.tokenizer
    results: dict[str, ChatResult] = {}
    with torch.inference_mode():
        for adapter in sorted({r.model for r in requests}):
            group = [r for r in requests if r.model == adapter]
            model.set_adapter(pool.name_for(adapter))
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": r.messages[0].content}],
                                                   add_generation_prompt=True, tokenize=False) for r in group]
            inputs = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
            inputs = inputs.to(pool.loaded.device)
            torch.manual_seed(0)
            output = model.generate(**inputs, max_new_tokens=max(r.max_tokens for r in group), do_sample=True,
                                    temperature=0.7, top_p=0.9)
            new = output[:, inputs["input_ids"].shape[1] :].tolist()
            eos = tokenizer.eos_token_id
            for r, mask, tokens in zip(group, inputs["attention_mask"], new, strict=True):
                own = tokens[: r.max_tokens]
                used = own.index(eos) + 1 if eos in own else len(own)
                usage = Usage(prompt_tokens=int(mask.sum()), completion_tokens=used)
                results[r.key] = ChatResult(key=r.key, text="", finish_reason="length", usage=usage)
    return [results[r.key] for r in requests]


def naive(backend: LocalBackend, requests: list[ChatRequest]) -> list[ChatResult]:
    """One `generate` per prompt, that prompt's adapter active."""
    return [per_adapter_generate(backend, [r])[0] for r in requests]


def train(backend: LocalBackend, folder: Path, examples: int, vocab: int) -> dict[str, float]:
    rng = random.Random(1)
    lines = []
    for _ in range(examples):
        question = " ".join(f"w{rng.randrange(vocab - 6)}" for _ in range(rng.randint(60, 200)))
        answer = " ".join(f"w{rng.randrange(vocab - 6)}" for _ in range(rng.randint(20, 200)))
        lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]}))
    data = folder / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = TrainingParams(epochs=1, batch_size=8, learning_rate=1e-4, lora_rank=8, max_length=1024)
    spec = FinetuneSpec(key="gpu-check/train", base_model="base", training_file=data, suffix="t", params=params)
    state = backend.poll(backend.start_finetune(spec))
    assert state.status == "succeeded", state.error
    record = json.loads((backend.adapter_path(spec.key) / "job.json").read_text())
    return {"tokens": float(record["trained_tokens"]), "seconds": float(record["train_seconds"]),
            "steps": float(record["steps"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--chats", type=int, default=256)
    parser.add_argument("--slots", type=int, default=256, help="the engine's batch size")
    parser.add_argument("--max-tokens", type=int, default=320)
    parser.add_argument("--naive-chats", type=int, default=6)
    parser.add_argument("--train-examples", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script runs")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    if args.smoke:
        args.shape, args.chats, args.slots, args.max_tokens = "tiny", 12, 8, 16
        args.naive_chats, args.train_examples = 2, 8
    elif not torch.cuda.is_available():
        raise SystemExit("no GPU: run it on a lent GPU machine (see the docstring), or with --smoke")
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device {device}: {gpu}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"load average {load_average()}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rate = matmul_rate(dtype, 8192 if device == "cuda" else 1024)
    print(f"matmul rate ({dtype}): {rate / 1e3:.1f} TFLOP/s")

    with tempfile.TemporaryDirectory(prefix="maft-gpu-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        model_dir = build_model(folder / "model", args.shape, device)
        adapters = make_adapters(str(model_dir), folder, 3, 8, 0.02, 0)
        backend = LocalBackend(str(model_dir), workdir=folder / "work", device="auto", batch_size=args.slots,
                               show_progress=False)
        loaded = backend.pool.loaded
        params = sum(p.numel() for p in loaded.model.parameters())
        flops = 2 * params
        print(f"model {args.shape}: {params / 1e6:.0f} M parameters, {flops / 1e9:.2f} GFLOP per token, weights "
              f"{loaded.dtype}, generation {loaded.generation_dtype}; 3 LoRA adapters r=8 on q/k/v/o; "
              f"set up in {time.perf_counter() - started:.0f} s")
        vocab = SHAPES[args.shape]["vocab_size"]
        requests = make_requests(args.chats, adapters, vocab, args.max_tokens, seed=0)
        backend.chat(requests[:6])  # warm-up: adapters loaded, kernels compiled
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        rows: list[tuple[str, list[ChatResult], float]] = []
        pool = backend.pool
        rows.append(("LocalBackend.chat (refill, gathered)", *timed(lambda: backend.chat(requests))))
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        rows.append(("refill, merged per adapter", *timed(
            lambda: generate_chats(pool, requests, batch_size=args.slots, adapters="merged"))))
        rows.append(("static chunks (today's path)", *timed(
            lambda: generate_chats(pool, requests, batch_size=args.slots, engine="static"))))
        rows.append(("generate per adapter (unbatched by adapter)", *timed(
            lambda: per_adapter_generate(backend, requests))))
        sample = requests[:: max(1, len(requests) // args.naive_chats)][: args.naive_chats]
        rows.append((f"naive generate loop ({len(sample)} chats)", *timed(lambda: naive(backend, sample))))

        print(f"\n{len(requests)} chats, max_tokens {args.max_tokens} (ragged), temperature 0.7, top_p 0.9, "
              f"{args.slots} slots; peak GPU memory of the engine {peak:.1f} GiB")
        print(f"{'path':46} {'tokens':>8} {'prompt':>8} {'s':>7} {'tok/s':>8} {'bound':>6}")
        rates = {}
        for label, results, seconds in rows:
            tokens = sum(r.usage.completion_tokens for r in results)
            prompt = sum(r.usage.prompt_tokens for r in results)
            rates[label] = tokens / seconds
            share = (tokens + prompt) * flops / (rate * 1e9) / seconds
            print(f"{label:46} {tokens:8d} {prompt:8d} {seconds:7.1f} {tokens / seconds:8.0f} {share:6.3f}")
        engine = rates[rows[0][0]]
        for label, _, _ in rows[1:]:
            print(f"speed-up: LocalBackend.chat / {label} = {engine / rates[label]:.2f}x")

        trained = train(backend, folder, args.train_examples, vocab)
        per_s = trained["tokens"] / trained["seconds"]
        bound = rate * 1e9 / (6 * params)
        print(f"\nLoRA training ({args.train_examples} examples, batch 8, 1 epoch, {trained['steps']:.0f} steps): "
              f"{trained['tokens']:.0f} tokens in {trained['seconds']:.1f} s = {per_s:.0f} trained tok/s; bound "
              f"6 x params per token = {bound:.0f} tok/s; share {per_s / bound:.3f}")
        backend.close()


if __name__ == "__main__":
    main()
