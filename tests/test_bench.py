"""The bench scripts still run as their docstrings say (`python bench/X.py`), on a tiny workload: a benchmark that
breaks unnoticed is one nobody can re-measure. The numbers themselves are checked by reading them, not here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_openai_concurrency_bench_runs() -> None:
    out = bench("openai_concurrency.py", "--problems", "4", "--latency", "0.01")
    assert "total               36 requests" in out and "ratio" in out  # 4 problems × 3 agents × 3 stages


@pytest.mark.slow
def test_local_generation_bench_runs() -> None:
    out = bench("local_generation.py", "--workload", "short", "--prompts", "3", "--max-tokens", "8",
                "--naive-prompts", "3", "--accuracy-problems", "3", "--no-bf16")
    assert "naive and batched texts equal: 3/3" in out and "speed-up:" in out


def test_cluster_finetune_bench_runs() -> None:
    pytest.importorskip("ray", reason="needs the [cluster] extra: scripts/setup --dev installs it")
    out = bench("cluster_finetune.py", "--smoke")
    assert out.count("  alone bench/") == 4 and "4 at once on K = 2" in out and "wall / (sum / K) = " in out
