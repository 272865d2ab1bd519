"""Useful tokens/s of LocalBackend.chat on a debate stage's workload: the refill engine, today's static-chunk path
and a naive one-prompt-at-a-time loop, side by side in one run, with this run's matmul rate as the yardstick.

Workloads (each problem asked of every agent, agent i answering with LoRA adapter i, as in a debate's first
round once the agents are finetuned; sampled at temperature 0.7, top_p 0.9):

- long: GSM8K test questions with the task's round-1 prompt, max_tokens 320 (decode dominates);
- short: arithmetic:easy ("What is the result of a+b?"), max_tokens 96 (prefill weighs more).

For each: tokens and seconds, useful tok/s (generated tokens up to and including the end-of-turn token), the
share of the compute bound ((prompt + generated tokens) x 2 x parameters / the matmul rate measured in this run)
and the ratios. Then two checks: greedy texts of the engine equal the naive loop's (float32, short workload),
and whether a row's text depends on its batch mates (alone vs batched) in float32 and in bfloat16. The machine
is shared and its load varies, so every row of a table is measured in the same run, and the load average is
printed beside the numbers.

    python bench/local_generation.py                          # bundled SmolLM2-135M-Instruct, both workloads
    python bench/local_generation.py --workload long --naive-prompts 12
    python bench/local_generation.py --workload long --unfused   # + the engine on transformers' own decode step
    python bench/local_generation.py --smoke                  # a tiny random model, seconds: the script works
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from a checkout

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

import prompts
from backends.base import ChatMessage, ChatRequest, ChatResult
from backends.local import LocalBackend
from backends.local_generate import generate_chats
from backends.local_model import DEFAULT_MODEL, cpu_has_fast_bf16, load_model
from orchestrator.tasks import get_task

QUESTION = "What is the result of {a}+{b}? Make sure to state your answer at the end of the response."


@dataclass(frozen=True)
class Workload:
    name: str
    task: str
    problems: int
    max_tokens: int


@dataclass
class Timing:
    label: str
    tokens: int
    prompt_tokens: int
    seconds: float
    load: str

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a square matmul on this device, the yardstick of the compute bound."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    _sync()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def make_requests(
    workload: Workload, adapters: list[Path] | list[str], temperature: float, seed: int
) -> list[ChatRequest]:
    """Each problem asked of every agent (adapter, or "base"), with the task's round-1 prompt."""
    task = get_task(workload.task)
    problems = task.eval_problems(workload.problems, seed)
    requests = []
    for p, problem in enumerate(problems):
        text = prompts.render(f"{task.family}/round1.txt", question=problem.question)
        for a, adapter in enumerate(adapters):
            requests.append(
                ChatRequest(
                    key=f"{workload.name}-{p}-{a}",
                    model=str(adapter),
                    messages=(ChatMessage(role="user", content=text),),
                    max_tokens=workload.max_tokens,
                    temperature=temperature,
                    top_p=0.9,
                    seed=seed + len(requests),
                )
            )
    return requests


def timed(label: str, run: Callable[[], list[ChatResult]]) -> tuple[Timing, list[ChatResult]]:
    _sync()
    started = time.perf_counter()
    results = run()
    _sync()
    seconds = time.perf_counter() - started
    tokens = sum(r.usage.completion_tokens for r in results)
    prompt_tokens = sum(r.usage.prompt_tokens for r in results)
    return Timing(label, tokens, prompt_tokens, seconds, load_average()), results


def run_naive(backend: LocalBackend, requests: list[ChatRequest]) -> list[ChatResult]:
    """One `generate` per prompt on the backend's own PeftModel (same weights), that prompt's adapter active."""
    from backends.base import Usage

    pool = backend.pool
    model = pool.model
    assert isinstance(model, PeftModel)
    tokenizer = pool.loaded.tokenizer
    results = []
    with torch.inference_mode():
        for request in requests:
            model.set_adapter(pool.name_for(request.model))
            turns = [{"role": m.role, "content": m.content} for m in request.messages]
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(pool.loaded.device)
            output = model.generate(**inputs, **_sampling(request))
            new = output[0, inputs["input_ids"].shape[1] :]
            usage = Usage(prompt_tokens=int(inputs["input_ids"].shape[1]), completion_tokens=len(new))
            decoded = str(tokenizer.decode(new, skip_special_tokens=True))
            results.append(ChatResult(key=request.key, text=decoded, finish_reason="stop", usage=usage))
    return results


def _sampling(request: ChatRequest) -> dict[str, object]:
    if request.temperature <= 0:
        return {"max_new_tokens": request.max_tokens, "do_sample": False}
    torch.manual_seed(request.seed or 0)
    return {"max_new_tokens": request.max_tokens, "do_sample": True, "temperature": request.temperature,
            "top_p": request.top_p}


def accuracy(backend: LocalBackend, problems: int, temperature: float, seed: int, slots: int) -> tuple[int, int]:
    """Answers right out of `problems` held-out arithmetic:easy problems, one base-model answer each."""
    task = get_task("arithmetic:easy")
    items = task.eval_problems(problems, seed)
    requests = make_requests(Workload("acc", "arithmetic:easy", problems, 96), ["base"], temperature, seed)
    results = generate_chats(backend.pool, requests, batch_size=slots)
    right = 0
    for problem, result in zip(items, results, strict=True):
        answer = task.extract_answer(result.text) if result.finish_reason == "stop" else None
        right += answer is not None and task.equivalent(answer, problem.answer)
    return right, len(items)


def spread(requests: list[ChatRequest], count: int | None) -> list[ChatRequest]:
    """`count` requests evenly spread over the list (the naive loop is timed on a sample: it is slow)."""
    if count is None or count >= len(requests):
        return requests
    step = len(requests) / count
    return [requests[int(i * step)] for i in range(count)]


def report(workload: Workload, timings: list[Timing], flops_per_token: float, rates: dict[str, float]) -> None:
    print(f"\n## {workload.name}: {workload.task}, {workload.problems} problems x agents, max_tokens "
          f"{workload.max_tokens}")
    print(f"{'path':34} {'tokens':>7} {'prompt':>7} {'s':>7} {'tok/s':>7} {'bound':>6} {'load':>15}")
    for t in timings:
        rate = rates["bfloat16" if "bf16" in t.label else "float32"]
        share = (t.tokens + t.prompt_tokens) * flops_per_token / (rate * 1e9) / t.seconds
        print(f"{t.label:34} {t.tokens:7d} {t.prompt_tokens:7d} {t.seconds:7.1f} {t.rate:7.1f} {share:6.3f} "
              f"{t.load:>15}")
    by = {t.label.split(" ")[0]: t for t in timings}
    pairs = [("engine", "static"), ("engine", "naive"), ("static", "naive"), ("engine-bf16", "engine"),
             ("engine-bf16", "naive"), ("merged", "engine"),
             ("engine", "unfused")]
    for a, b in pairs:
        if a in by and b in by:
            print(f"speed-up: {a} / {b} = {by[a].rate / by[b].rate:.2f}x")


def measure(
    backend: LocalBackend,
    low: LocalBackend | None,
    requests: list[ChatRequest],
    sample: list[ChatRequest],
    slots: int,
    merged: bool,
    adapters: int,
    unfused: bool = False,
) -> tuple[list[Timing], int]:
    """Every path on the same requests, one after the other; the naive loop on `sample`."""
    for b in (backend, low):
        if b is not None:
            b.chat(requests[:adapters])  # load model and adapters outside the timings
    pool = backend.pool
    engine, results = timed("engine (refill, gathered, fp32)",
                            partial(generate_chats, pool, requests, batch_size=slots))
    timings = [engine]
    if unfused:
        timings.append(timed("unfused (refill, transformers' step, fp32)",
                             partial(generate_chats, pool, requests, batch_size=slots, fused=False))[0])
    timings.append(timed("static (today's path, fp32)",
                         partial(generate_chats, pool, requests, batch_size=slots, engine="static"))[0])
    if merged:
        timings.append(timed("merged (refill, per adapter, fp32)",
                             partial(generate_chats, pool, requests, batch_size=slots, adapters="merged"))[0])
    if low is not None:
        timings.append(timed("engine-bf16 (refill, gathered)",
                             partial(generate_chats, low.pool, requests, batch_size=slots))[0])
    timings.append(timed(f"naive (generate loop, {len(sample)} chats)", partial(run_naive, backend, sample))[0])
    return timings, sum(r.finish_reason == "stop" for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--workload", choices=["long", "short", "both"], default="both")
    parser.add_argument("--prompts", type=int, default=None, help="problems per workload (x adapters chats)")
    parser.add_argument("--naive-prompts", type=int, default=None, help="time the naive loop on N chats")
    parser.add_argument("--max-tokens", type=int, default=None, help="override both workloads' max_tokens")
    parser.add_argument("--batch-size", type=int, default=48, help="slots (the [local] batch_size default)")
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapter-std", type=float, default=0.3)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 rows")
    parser.add_argument("--merged", action="store_true", help="also time merged-adapter decoding")
    parser.add_argument("--unfused", action="store_true",
                        help="also time the engine with transformers' own decode step (before local_llama)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy-problems", type=int, default=90, help="per dtype, for the accuracy check")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and workload (seconds)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress visible in a log file

    long_ = Workload("long", "gsm8k", 32, 320)
    short = Workload("short", "arithmetic:easy", 16, 96)
    naive_default = {"long": 12, "short": 24}
    if args.smoke:
        long_, short = Workload("long", "gsm8k", 3, 24), Workload("short", "arithmetic:easy", 3, 12)
        naive_default = {"long": 3, "short": 9}
        args.accuracy_problems = 6
    workloads = {"long": [long_], "short": [short], "both": [long_, short]}[args.workload]
    if args.prompts is not None:
        workloads = [Workload(w.name, w.task, args.prompts, w.max_tokens) for w in workloads]
    if args.max_tokens is not None:
        workloads = [Workload(w.name, w.task, w.problems, args.max_tokens) for w in workloads]
    bf16 = not args.no_bf16 and (torch.cuda.is_available() or cpu_has_fast_bf16() or args.smoke)

    with tempfile.TemporaryDirectory(prefix="maft-bench-") as tmp:
        model = args.model
        if args.smoke:
            from tests.tiny_model import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny"))
        print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
              f"{transformers.__version__}, bf16 matmul instructions: {cpu_has_fast_bf16()}")
        print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load_average()}")
        # bfloat16 only where its rows run: on a CPU without bf16 matmul instructions (AVX2 only) torch's bf16
        # matmul runs at about 1 GFLOP/s, and timing a 2048^2 one takes minutes
        size = 512 if args.smoke else 2048
        rates = {"float32": matmul_rate(torch.float32, size)}
        if bf16:
            rates["bfloat16"] = matmul_rate(torch.bfloat16, size)
        print(f"matmul {size}^2: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
        adapters = make_adapters(model, Path(tmp), args.adapters, args.rank, args.adapter_std, args.seed)
        backend = LocalBackend(model, workdir=Path(tmp), device="auto", dtype="float32",
                               batch_size=args.batch_size, show_progress=False)
        low = LocalBackend(model, workdir=Path(tmp), device="auto", dtype="bfloat16",
                           batch_size=args.batch_size, show_progress=False) if bf16 else None
        params = sum(p.numel() for p in backend.pool.loaded.model.parameters())
        flops_per_token = 2 * params
        print(f"model {args.model if not args.smoke else 'tiny random Llama'}: {params / 1e6:.1f} M parameters, "
              f"{flops_per_token / 1e9:.3f} GFLOP per token; {args.adapters} LoRA adapters r={args.rank}; "
              f"{args.batch_size} slots; device {backend.pool.loaded.device}")
        print("compute bound: " + ", ".join(f"{k} {v * 1e9 / flops_per_token:.0f} tok/s" for k, v in rates.items()))

        for workload in workloads:
            requests = make_requests(workload, adapters, args.temperature, args.seed)
            sample = spread(requests, args.naive_prompts or naive_default[workload.name])
            timings, stopped = measure(backend, low, requests, sample, args.batch_size, args.merged, args.adapters,
                                     args.unfused)
            print(f"\n{len(requests)} chats; engine: {stopped} stopped before max_tokens")
            report(workload, timings, flops_per_token, rates)

        check_workload = Workload("short", "arithmetic:easy", args.prompts or short.problems, short.max_tokens)
        check = make_requests(check_workload, adapters, 0.0, args.seed)[: args.prompts or None]
        greedy = generate_chats(backend.pool, check, batch_size=args.batch_size)
        naive = run_naive(backend, check)
        same = sum(a.text == b.text for a, b in zip(greedy, naive, strict=True))
        print(f"\ngreedy, float32, {len(check)} short chats: naive and batched texts equal: {same}/{len(check)}")
        mates = make_requests(Workload("mates", "gsm8k", 4, 48), adapters, args.temperature, args.seed + 1)
        for label, b in (("float32", backend), ("bfloat16", low)):
            if b is not None:
                together = generate_chats(b.pool, mates, batch_size=args.batch_size)
                alone = [generate_chats(b.pool, [r], batch_size=1)[0] for r in mates]
                equal = sum(x.text == y.text for x, y in zip(together, alone, strict=True))
                print(f"{label}: sampled texts alone and in one batch equal: {equal}/{len(mates)}")
        for temperature in (0.0, args.temperature):
            line = []
            for label, b in (("float32", backend), ("bfloat16", low)):
                if b is not None:
                    right, total = accuracy(b, args.accuracy_problems, temperature, args.seed, args.batch_size)
                    line.append(f"{label} {right}/{total} = {100 * right / total:.1f} %")
            mode = "greedy" if temperature == 0 else f"temperature {temperature}"
            print(f"accuracy, base model, arithmetic:easy, {mode}: " + ", ".join(line))
        print(f"load average at the end {load_average()}; matmul float32 {matmul_rate(torch.float32, size):.0f} "
              "GFLOP/s")


if __name__ == "__main__":
    main()
