"""Useful tokens/s of LocalBackend.chat (batched, multi-adapter, early exit) vs a naive generate() loop.

Both sides answer the same easy-arithmetic chats with the same adapters, greedy, same max new tokens; a row's
useful tokens are the ones it generated up to and including its end-of-turn token. The naive loop is what one
would write first: one `generate` call per prompt, with that prompt's adapter set active.

    python bench/local_generation.py                  # bundled SmolLM2-135M-Instruct, 48 prompts, 3 adapters
    python bench/local_generation.py --model DIR --prompts 96 --max-tokens 128 --naive-prompts 24
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from backends.base import ChatMessage, ChatRequest, ChatResult
from backends.local import LocalBackend
from backends.local_model import DEFAULT_MODEL, load_model

QUESTION = "What is the result of {a}+{b}? Make sure to state your answer at the end of the response."


@dataclass
class Timing:
    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def make_requests(
    count: int, adapters: list[Path], max_tokens: int, temperature: float, seed: int
) -> list[ChatRequest]:
    rng = random.Random(seed)
    return [
        ChatRequest(
            key=f"q{i}",
            model=str(adapters[i % len(adapters)]),
            messages=(ChatMessage(role="user", content=QUESTION.format(a=rng.randint(0, 20), b=rng.randint(0, 20))),),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=0.9,
            seed=seed + i,
        )
        for i in range(count)
    ]


def make_adapters(model: str, folder: Path, count: int, rank: int, std: float, seed: int) -> list[Path]:
    """Random LoRA adapters (B drawn from N(0, std), not PEFT's zeros) so each agent's answers really differ
    from the base model's and from each other's, while staying coherent enough to end on their own."""
    base = load_model(model, device="cpu").model
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    torch.manual_seed(seed)
    peft = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, count):
        peft.add_adapter(f"a{i}", config)
    paths = []
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    for i in range(count):
        peft.save_pretrained(str(folder), selected_adapters=[f"a{i}"])
        paths.append(folder / f"a{i}")
    return paths


def run_batched(backend: LocalBackend, requests: list[ChatRequest]) -> tuple[Timing, list[ChatResult]]:
    started = time.perf_counter()
    results = backend.chat(requests)
    seconds = time.perf_counter() - started
    return Timing(sum(r.usage.completion_tokens for r in results), seconds), results


def run_naive(backend: LocalBackend, requests: list[ChatRequest]) -> tuple[Timing, list[str]]:
    """One `generate` per prompt on the backend's own PeftModel, so both sides use identical weights."""
    pool = backend.pool
    model = pool.model
    assert isinstance(model, PeftModel)
    tokenizer = pool.loaded.tokenizer
    texts, tokens = [], 0
    started = time.perf_counter()
    with torch.inference_mode():
        for request in requests:
            model.set_adapter(pool.name_for(request.model))
            turns = [{"role": m.role, "content": m.content} for m in request.messages]
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(pool.loaded.device)
            output = model.generate(**inputs, **_sampling(request))
            new = output[0, inputs["input_ids"].shape[1] :]
            tokens += len(new)
            texts.append(str(tokenizer.decode(new, skip_special_tokens=True)))
    return Timing(tokens, time.perf_counter() - started), texts


def _sampling(request: ChatRequest) -> dict[str, object]:
    if request.temperature <= 0:
        return {"max_new_tokens": request.max_tokens, "do_sample": False}
    torch.manual_seed(request.seed or 0)
    return {
        "max_new_tokens": request.max_tokens,
        "do_sample": True,
        "temperature": request.temperature,
        "top_p": request.top_p,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--naive-prompts", type=int, default=None, help="time the naive loop on the first N")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapter-std", type=float, default=0.3)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (outputs comparable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="maft-bench-") as tmp:
        adapters = make_adapters(args.model, Path(tmp), args.adapters, args.rank, args.adapter_std, args.seed)
        requests = make_requests(args.prompts, adapters, args.max_tokens, args.temperature, args.seed)
        backend = LocalBackend(
            args.model, workdir=Path(tmp), device=args.device, batch_size=args.batch_size, show_progress=False
        )
        backend.chat(requests[: args.adapters])  # load model and adapters outside the timings
        batched, results = run_batched(backend, requests)
        naive, naive_texts = run_naive(backend, requests[: args.naive_prompts or len(requests)])

    same = sum(r.text == t for r, t in zip(results, naive_texts, strict=False))
    stopped = sum(r.finish_reason == "stop" for r in results)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"transformers {transformers.__version__}, device {backend.pool.loaded.device}, model {args.model}")
    mode = f"temperature {args.temperature}, top_p 0.9" if args.temperature > 0 else "greedy"
    print(f"{args.prompts} prompts, {args.adapters} adapters, max {args.max_tokens} new tokens, {mode}")
    print(
        f"stopped before max_tokens: {stopped}/{len(results)}; naive and batched texts equal: {same}/{len(naive_texts)}"
    )
    print(f"batched LocalBackend.chat: {batched.tokens} tokens in {batched.seconds:.1f} s = {batched.rate:.1f} tok/s")
    print(f"naive generate loop:       {naive.tokens} tokens in {naive.seconds:.1f} s = {naive.rate:.1f} tok/s")
    print(f"speed-up: {batched.rate / naive.rate:.2f}x")


if __name__ == "__main__":
    main()
