"""How close `OpenAIBackend.chat` comes to the concurrency bound against a server with fixed latency.

A debate of P arithmetic problems × N agents × 2 rounds, sent as the debate sends it: round 1 (P·N answers) in
one call, then the P·N summaries in one call, then the P·N critic answers in one call. The server is the fake
OpenAI server of the test suite on 127.0.0.1, answering every chat request after `--latency` seconds. With C
requests in flight, no client can finish R requests faster than R × latency ÷ C: the ratio of wall time to that
bound is the overhead of the SDK, the limiter, asyncio and the loopback HTTP server together.

    python bench/openai_concurrency.py                       # 500 problems × 3 agents × 2 rounds, 200 ms, C=16
    python bench/openai_concurrency.py --problems 100 --concurrency 64
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import random
import sys
import time
from pathlib import Path
from types import ModuleType

from backends.base import ChatMessage, ChatRequest, ChatResult, MemoryState
from backends.openai import OpenAIBackend
from backends.openai_settings import OpenAIConfig

MODEL = "gpt-4.1-mini-2025-04-14"
QUESTION = ("What is the result of {a}+{b}*{c}+{d}-{e}*{f}? Make sure to state your answer at the end of the "
            "response.")
SUMMARY = "Here are a list of opinions from different agents: {opinions} Write a summary of the different opinions."
CRITIC = ("These are the solutions to the problem from other agents: {summary} Using the reasoning from other agents "
          "as additional advice, can you give an updated response? Make sure to state your answer at the end.")


def load_fake() -> ModuleType:
    """tests/ is not installed: import the fake server from the checkout (it imports its siblings as `tests.*`)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("tests.fake_openai")


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def timed(backend: OpenAIBackend, label: str, requests: list[ChatRequest], latency: float,
          concurrency: int) -> tuple[list[ChatResult], float, float]:
    started = time.perf_counter()
    done = [0]
    results = backend.chat(requests, on_result=lambda r: done.__setitem__(0, done[0] + 1))
    wall = time.perf_counter() - started
    bound = len(requests) * latency / concurrency
    assert done[0] == len(requests) == len(results)
    print(f"  {label:<16} {len(requests):>5} requests  {wall:7.2f} s  bound {bound:6.2f} s  ratio {wall / bound:.3f}")
    return results, wall, bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=OpenAIConfig().concurrency)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    fake_module = load_fake()
    rng = random.Random(args.seed)
    problems = [QUESTION.format(**{k: rng.randint(0, 29) for k in "abcdef"}) for _ in range(args.problems)]
    with fake_module.FakeOpenAI(chat_latency=args.latency, seed=args.seed) as fake:
        settings = OpenAIConfig(base_url=fake.base_url, concurrency=args.concurrency)
        backend = OpenAIBackend(MODEL, settings, MemoryState(), show_progress=False,
                                environ={"OPENAI_API_KEY": fake.api_key}, dotenv=Path(os.devnull))
        print(f"{args.problems} problems × {args.agents} agents × 2 rounds; latency {args.latency * 1000:.0f} ms; "
              f"concurrency {args.concurrency}; python {platform.python_version()}, {os.cpu_count()} CPUs")
        walls: list[float] = []
        bounds: list[float] = []

        round1 = [ChatRequest(key=f"r1/{p}/{a}", messages=(user(q),), seed=a, max_tokens=96)
                  for p, q in enumerate(problems) for a in range(args.agents)]
        answers, wall, bound = timed(backend, "round 1", round1, args.latency, args.concurrency)
        walls.append(wall)
        bounds.append(bound)
        by_key = {r.key: r.text for r in answers}

        summaries_in = [
            ChatRequest(key=f"sum/{p}/{a}", max_tokens=128, messages=(user(SUMMARY.format(opinions=" ".join(
                f"```{by_key[f'r1/{p}/{o}']}```" for o in range(args.agents) if o != a))),))
            for p in range(len(problems)) for a in range(args.agents)]
        summaries, wall, bound = timed(backend, "summaries", summaries_in, args.latency, args.concurrency)
        walls.append(wall)
        bounds.append(bound)
        summary_of = {r.key: r.text for r in summaries}

        round2 = [
            ChatRequest(key=f"r2/{p}/{a}", seed=a, max_tokens=96, messages=(
                user(q), ChatMessage(role="assistant", content=by_key[f"r1/{p}/{a}"]),
                user(CRITIC.format(summary=summary_of[f"sum/{p}/{a}"]))))
            for p, q in enumerate(problems) for a in range(args.agents)]
        _, wall, bound = timed(backend, "round 2 (critic)", round2, args.latency, args.concurrency)
        walls.append(wall)
        bounds.append(bound)

        total, bound_total = sum(walls), sum(bounds)
        served = fake.counts["POST /v1/chat/completions"]
        print(f"  {'total':<16} {served:>5} requests  {total:7.2f} s  bound {bound_total:6.2f} s  "
              f"ratio {total / bound_total:.3f}  ({served / total:.1f} requests/s; most in flight "
              f"{backend.limiter.max_in_flight})")
        backend.close()


if __name__ == "__main__":
    main()
