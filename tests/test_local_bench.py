"""The local benches run end to end on a tiny random model (`--smoke`): a bench that breaks unnoticed is one
nobody can re-measure, and bench/gpu_check.py only ever runs on a lent GPU machine. Their numbers are read by
people (bench/RESULTS.md), not checked here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_local_generation_bench_prints_every_row_and_check() -> None:
    out = run("local_generation.py", "--smoke")
    for row in ("engine (refill", "static (today's path", "engine-bf16 (refill", "naive (generate loop"):
        assert out.count(row) == 2, row  # in both workloads
    assert "speed-up: engine / static" in out and "naive and batched texts equal: 9/9" in out
    assert "float32: sampled texts alone and in one batch equal: 12/12" in out
    assert "matmul 512^2: float32" in out and "load average" in out


def test_gpu_check_runs_on_the_cpu_with_a_tiny_model() -> None:
    out = run("gpu_check.py", "--smoke")
    for row in ("LocalBackend.chat (refill, gathered)", "refill, merged per adapter", "static chunks",
                "generate per adapter", "naive generate loop", "trained tok/s"):
        assert row in out, row


def test_local_training_bench_compares_padded_and_packed() -> None:
    out = run("local_training.py", "--smoke")
    lines = out.splitlines()
    rows = [line.split()[0] for line in lines if line.startswith(("right-padded", "packed"))]
    assert rows == ["right-padded", "packed"] * 2
    assert "speed-up: packed / right-padded" in out
