"""`orchestrator run` end to end on the bundled SmolLM2-135M-Instruct, on CPU, with a tiny config.

Greedy decoding makes the three agents agree, and concatenation (not a summary) shows each critic answers equal
to its own, so every generator and critic gets data and all 2N adapters are trained; the test then checks what
the store and the files hold, and that a re-run is free: it writes nothing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """
agents = 3
rounds = 2
iterations = 1
train_size = 3
eval_size = 3
summarize = false  # critics see the (identical) answers of the others, so they keep theirs

[generation]
temperature = 0.0
max_tokens = 24
summary_max_tokens = 24

[training]
epochs = 1
batch_size = 4
max_length = 384
"""


def orchestrator(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.mark.slow
def test_the_whole_loop_on_the_bundled_model(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(CONFIG)
    proc = orchestrator("run", "--config", "run.toml", "--name", "e2e", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stdout

    db = sqlite3.connect(tmp_path / "maft.db")
    jobs = db.execute("select role, agent, status, model_id, dataset_sha256 from jobs where run_id='e2e'").fetchall()
    assert len(jobs) == 6 and {j[2] for j in jobs} == {"succeeded"}
    adapters = {j[3] for j in jobs}
    assert len(adapters) == 6
    for path in adapters:
        assert (Path(path) / "adapter_config.json").is_file()
        assert (Path(path) / "adapter_model.safetensors").is_file()
    agents = db.execute("select model_id from agents where run_id='e2e' and iteration=1").fetchall()
    assert {a[0] for a in agents} == adapters

    datasets = db.execute("select role, path, sha256, n_examples from datasets where run_id='e2e'").fetchall()
    assert len(datasets) == 6
    for role, path, sha, n in datasets:
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha
        lines = Path(path).read_text().splitlines()
        assert len(lines) == n > 0
        messages = json.loads(lines[0])["messages"]
        assert len(messages) == (2 if role == "generator" else 4)
    assert {d[2] for d in datasets} == {j[4] for j in jobs}

    evaluations = db.execute("select iteration, method, n from evaluations where run_id='e2e'").fetchall()
    assert {(e[0], e[1]) for e in evaluations} >= {(0, "debate"), (1, "debate"), (0, "single")}
    assert all(e[2] == 3 for e in evaluations)
    diversity = db.execute("select society, iteration, metric, value from diversity where run_id='e2e'").fetchall()
    metrics = {(d[0], d[1], d[2]) for d in diversity}
    for society, iteration in (("base", 0), ("maft", 1)):
        for metric in ("consensus", "embedding_dissimilarity", "critic_nll_final"):
            assert (society, iteration, metric) in metrics
    assert all(d[3] >= 0 for d in diversity)

    # Responses and jobs are upserted by key, so counting rows could not tell a re-run that regenerated
    # everything from one that did nothing: compare when each row was written, and the ledger and the adapters.
    def written(db: sqlite3.Connection) -> tuple[dict, dict, set, dict]:
        responses = dict(db.execute("select key, created_at from responses where run_id='e2e'").fetchall())
        jobs = {r[0]: r[1:] for r in db.execute(
            "select key, status, model_id, created_at, updated_at, finished_at from jobs where run_id='e2e'")}
        ledger = set(db.execute("select id, ref, billing, created_at from usage where run_id='e2e'").fetchall())
        files = {str(f): f.stat().st_mtime_ns for path in adapters for f in Path(path).iterdir()}
        return responses, jobs, ledger, files

    before = written(db)
    db.close()
    assert before[0] and before[1] and before[2] and before[3]

    again = orchestrator("run", "--config", "run.toml", "--name", "e2e", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    db = sqlite3.connect(tmp_path / "maft.db")
    after = written(db)
    db.close()
    assert after[0] == before[0]  # no response generated (or even re-stored) again
    assert after[1] == before[1]  # no job started, polled to a new state or finished again
    assert after[2] == before[2]  # no ledger line added or replaced: nothing generated or trained again
    assert after[3] == before[3]  # no adapter trained again
