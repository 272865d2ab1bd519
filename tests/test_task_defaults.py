"""Each task brings its own defaults for what a config leaves out: the paper's sampling and answer-sized limits for
the paper's tasks, the demo's short settings for the default job, which must not change at all."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.config import RunConfig, build_config
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.store import Store
from orchestrator.tasks import task_defaults
from tests.fakes import ScriptedBackend

REPO = Path(__file__).resolve().parents[1]


def test_task_defaults_leave_the_default_jobs_settings_as_they_were():
    config = RunConfig()
    # the README's run arithmetic-easy-local-1a87921c: the same identity from every setting but `[local]`, whose
    # `dtype` (the local engine's generation precision, a separate change) is now part of it too
    fields = {**config.identity_fields(), "local": {}}
    assert hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8] == "1a87921c"
    assert config.generation.model_dump() == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 96,
                                              "summary_max_tokens": 128}
    assert config.training.max_length == 512


@pytest.mark.parametrize(("spec", "max_tokens", "max_length"), [
    ("arithmetic", 256, 1024), ("gsm8k", 512, 2048), ("math", 512, 3072), ("math:all", 512, 3072),
    ("my/problems.jsonl", 512, 3072),
])
def test_a_paper_task_without_generation_settings_samples_as_the_paper(spec, max_tokens, max_length):
    config = build_config({"task": spec}, {}, "test")
    assert config.generation.model_dump() == {"temperature": 1.0, "top_p": 0.9, "max_tokens": max_tokens,
                                              "summary_max_tokens": max_tokens}
    assert config.training.max_length == max_length
    assert RunConfig.model_validate_json(config.model_dump_json()) == config  # a stored config resumes as it was


def test_what_the_config_gives_wins_and_the_task_fills_the_rest():
    config = build_config({"task": "gsm8k", "generation": {"temperature": 0.3}, "training": {"epochs": 1}},
                          {}, "test")
    assert config.generation.model_dump() == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 512,
                                              "summary_max_tokens": 512}
    assert (config.training.epochs, config.training.max_length) == (1, 2048)
    explicit = build_config({"task": "gsm8k", "generation": {"max_tokens": 96}, "training": {"max_length": 700}},
                            {}, "test")
    assert (explicit.generation.max_tokens, explicit.training.max_length) == (96, 700)
    # the task named by a flag decides, as the run will
    flagged = build_config({"generation": {"top_p": 0.5}}, {"task": "gsm8k"}, "test")
    assert (flagged.generation.max_tokens, flagged.generation.top_p) == (512, 0.5)
    assert task_defaults("arithmetic:medium") == task_defaults("arithmetic:easy")


def test_a_gsm8k_run_without_generation_settings_asks_with_the_tasks_defaults(tmp_path):
    config = RunConfig(task="gsm8k", agents=2, rounds=2, train_size=2, eval_size=2)
    backend = ScriptedBackend()
    store = Store(tmp_path / "m.db")
    run = open_run(store, config, "r", must_exist=False)
    Pipeline(config=config, run=run, store=store, backend=backend, workdir=tmp_path / "work",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run()
    assert backend.requests
    assert {(r.temperature, r.top_p, r.max_tokens) for r in backend.requests} == {(1.0, 0.9, 512)}
    assert all(s.params.max_length == 2048 for s in backend.specs)


def dry_run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--dry-run", "--train-size", "3",
                           "--eval-size", "2", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_dry_run_uses_the_same_defaults(tmp_path):
    (tmp_path / "paper.toml").write_text('task = "gsm8k"\n[generation]\ntemperature = 1.0\ntop_p = 0.9\n'
                                         "max_tokens = 512\nsummary_max_tokens = 512\n")
    (tmp_path / "demo.toml").write_text('task = "gsm8k"\n[generation]\nmax_tokens = 96\nsummary_max_tokens = 128\n')
    silent = dry_run(tmp_path, "--task", "gsm8k")
    assert silent == dry_run(tmp_path, "--config", "paper.toml")
    assert silent != dry_run(tmp_path, "--config", "demo.toml")
