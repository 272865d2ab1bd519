"""Tokens/s of a debate stage through the vllm backend against the local backend's in-process engine, on the same
requests and machine: each easy-arithmetic problem asked of every agent, agent i with random LoRA adapter i
(`local_generation.make_adapters`), sampled at temperature 0.7, max_tokens 96. Also the server's start time.

    python bench/vllm_chat.py                      # needs .venv-vllm (scripts/setup-vllm)
    python bench/vllm_chat.py --problems 32 --agents 3 --dtype bfloat16

vLLM spawns processes: this file's work runs only under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py` from a checkout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--dtype", default="bfloat16", help="vLLM's --dtype (the local engine runs float32 on CPU)")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                        help="a further `vllm serve` flag ([vllm] server_args), e.g. "
                             "--server-arg=--no-enable-chunked-prefill")
    args = parser.parse_args()

    from backends.base import MemoryState, TrainingParams
    from backends.local import LocalBackend
    from backends.local_model import DEFAULT_MODEL
    from backends.vllm import VLLMBackend
    from backends.vllm_settings import VLLMConfig
    from bench.local_generation import Workload, load_average, make_adapters, make_requests, timed

    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    adapters = make_adapters(DEFAULT_MODEL, work / "adapters", args.agents, rank=8, std=0.02, seed=0)
    workload = Workload("short", "arithmetic:easy", args.problems, args.max_tokens)
    requests = make_requests(workload, adapters, temperature=0.7, seed=0)
    print(f"{platform.node()} · {os.cpu_count()} CPUs · {len(requests)} chats · {args.agents} adapters mixed · "
          f"max_tokens {args.max_tokens} · load {load_average()}")
    rows = []
    if not args.skip_local:
        local = LocalBackend(DEFAULT_MODEL, workdir=work, show_progress=False)
        local.chat(requests[:1])  # load the model and the first adapter outside the timing
        timing, _ = timed("local engine (float32)", lambda: local.chat(requests))
        rows.append(timing)
        local.close()
    settings = VLLMConfig(max_loras=max(4, args.agents), max_lora_rank=8, dtype=args.dtype, max_model_len=2048,
                          concurrency=256, server_args=args.server_arg)
    backend = VLLMBackend(DEFAULT_MODEL, settings, MemoryState(), workdir=work, show_progress=True,
                          training=TrainingParams(lora_rank=8))
    try:
        backend.check_server(finetuning=True)
        assert backend.server is not None
        print(f"vLLM server ready in {backend.server.started_in:.1f} s")
        warm = [r.model_copy(update={"key": f"warm-{i}"}) for i, r in enumerate(requests[: args.agents])]
        backend.chat(warm)  # load the adapters outside the timing
        timing, _ = timed(f"vLLM CPU ({args.dtype})", lambda: backend.chat(requests))
        rows.append(timing)
    finally:
        backend.close()
    for row in rows:
        print(f"{row.label:28} {row.tokens:6d} tokens {row.seconds:7.1f} s {row.rate:7.1f} tok/s  load {row.load}")
    if len(rows) == 2:
        print(f"vLLM / local: {rows[1].rate / rows[0].rate:.2f}x")


if __name__ == "__main__":
    main()
