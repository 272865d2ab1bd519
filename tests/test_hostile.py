"""Hostile input and hostile conditions, as a user meets them through the CLI: each one a clear one-line message
(checked word for word where it matters), exit status 2, nothing stored lost; secrets never written anywhere;
Ctrl-C and a second process handled; the store under many concurrent writers."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.locks import RunLock
from orchestrator.store import ResponseRow, RunRow, Store, StoreState, UsageRow
from tests.fake_openai import FakeOpenAI

MINI = "gpt-4.1-mini-2025-04-14"
TOML = """
backend = "openai"
model = "gpt-4.1-mini-2025-04-14"
task = "arithmetic:easy"
train_size = 30
eval_size = 6
critic_mix = 0.0
[openai]
base_url = "{base_url}"
poll_interval = 0.01
"""


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "TOGETHER_API_KEY")}
    full |= {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"} | (env or {})
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def write_config(tmp_path: Path, fake: FakeOpenAI, extra: str = "") -> None:
    (tmp_path / "run.toml").write_text(TOML.format(base_url=fake.base_url) + extra)


# -- keys and models ---------------------------------------------------------------------------------------------


def test_a_missing_key_says_where_to_set_it(tmp_path):
    # OpenAI itself (no --base-url): the key is looked for before any request could be made
    line = one_line_error(cli("run", "--backend", "openai", "--model", MINI, "--quiet", cwd=tmp_path))
    assert line == "error: no OpenAI API key: set OPENAI_API_KEY in the environment or in ./.env"
    together = one_line_error(cli("run", "--backend", "together", "--model", "Qwen/Qwen2.5-7B-Instruct", "--quiet",
                                  "--name", "t", cwd=tmp_path))
    assert together == "error: no Together API key: set TOGETHER_API_KEY in the environment or in ./.env"


def test_an_invalid_key_is_refused_without_leaking_it(tmp_path, fake_openai):
    write_config(tmp_path, fake_openai)
    wrong = "sk-wrong-0123456789abcdefSECRET"
    proc = cli("run", "--config", "run.toml", "--quiet", cwd=tmp_path, env={"OPENAI_API_KEY": wrong})
    line = one_line_error(proc)
    assert "rejected the API key (401): check OPENAI_API_KEY in the environment or ./.env" in line
    assert wrong not in proc.stdout + proc.stderr
    assert wrong.encode() not in b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_an_unknown_model_is_named(tmp_path, fake_openai):
    (tmp_path / "run.toml").write_text(TOML.format(base_url=fake_openai.base_url).replace(MINI, "gpt-9-imaginary"))
    line = one_line_error(cli("run", "--config", "run.toml", "--quiet", cwd=tmp_path,
                              env={"OPENAI_API_KEY": fake_openai.api_key}))
    assert "gpt-9-imaginary" in line and "not available" in line


# -- data files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "expected"), [
    (None, "does not exist"),
    ("", "is empty"),
    ('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": \n', "line 2"),
])
def test_a_bad_dataset_file_is_named_with_its_line(tmp_path, content, expected):
    data = tmp_path / "mine.jsonl"
    if content is not None:
        data.write_text(content)
    line = one_line_error(cli("run", "--task", str(data), "--dry-run", cwd=tmp_path))
    assert str(data) in line and expected in line


def test_sets_below_the_providers_minimum_are_said_and_skipped(tmp_path, fake_openai):
    (tmp_path / "run.toml").write_text(TOML.format(base_url=fake_openai.base_url).replace("train_size = 30",
                                                                                          "train_size = 6"))
    proc = cli("run", "--config", "run.toml", "--quiet", "--name", "small", cwd=tmp_path,
               env={"OPENAI_API_KEY": fake_openai.api_key})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "the openai backend needs at least 10; it keeps its model" in proc.stdout
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 0


# -- the machine -------------------------------------------------------------------------------------------------


def test_disk_full_while_writing_stops_with_a_resumable_message(tmp_path, monkeypatch, capsys):
    from orchestrator import cli as cli_module
    from orchestrator import pipeline as pipeline_module
    from tests.fakes import ScriptedBackend

    def full_disk(path, examples):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("backends.create_backend", lambda *a, **k: ScriptedBackend())
    monkeypatch.setattr(pipeline_module, "write_jsonl", full_disk)
    monkeypatch.setattr(sys, "argv", ["orchestrator", "run", "--name", "full", "--db", str(tmp_path / "m.db"),
                                      "--train-size", "12", "--eval-size", "4", "--quiet"])
    with pytest.raises(SystemExit) as stop:
        cli_module.main()
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: disk full while writing ") and "agent-1-generator.jsonl" in line
    assert line.endswith("then `orchestrator run --resume full --db " + str(tmp_path / "m.db") + "`")
    store = Store(tmp_path / "m.db")
    assert store.count_responses("full") > 0  # the debate it had paid for is kept


def test_a_second_process_on_the_same_run_is_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path / "maft.db", "busy"):
        line = one_line_error(cli("run", "--name", "busy", "--quiet", cwd=tmp_path))
    assert line.startswith(f"error: run 'busy' is already running (process {os.getpid()} on ")
    assert line.endswith("wait for it to finish, or stop it, then run again")


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    Store(tmp_path / "maft.db").close()
    con = sqlite3.connect(tmp_path / "maft.db")
    con.execute("insert into _migrations values ('m999_future', 0)")
    con.commit()
    con.close()
    line = one_line_error(cli("status", cwd=tmp_path))
    assert "was written by a newer maft-orchestrator (migration m999_future)" in line


@pytest.mark.fake_openai(chat_latency=0.05, base_accuracy=0.8)
def test_ctrl_c_stops_at_a_safe_point_and_says_how_to_resume(tmp_path, fake_openai):
    write_config(tmp_path, fake_openai, "concurrency = 2\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env |= {"OPENAI_API_KEY": fake_openai.api_key, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "--config", "run.toml", "--name", "c",
                             "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while fake_openai.counts["POST /v1/chat/completions"] < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "stopping at the next safe point" in err
    assert "stopped at a safe point: everything finished so far is stored; continue with " \
           "`orchestrator run --resume c`" in out
    db = sqlite3.connect(tmp_path / "maft.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("select status from runs where id = 'c'").fetchone()[0] == "interrupted"
    stored = db.execute("select count(*) from responses").fetchone()[0]
    db.close()
    assert stored >= 5
    again = cli("run", "--resume", "c", "--quiet", cwd=tmp_path, env={"OPENAI_API_KEY": fake_openai.api_key})
    assert again.returncode == 0, again.stderr[-2000:]


# -- secrets -----------------------------------------------------------------------------------------------------


def test_a_planted_key_reaches_no_file_and_no_output(tmp_path):
    secret = "sk-planted-" + "7f3c9a1e5b2d4c6a8e0f" * 2
    with FakeOpenAI(base_accuracy=0.8) as fake:
        fake.api_key = secret
        fake.fail_jobs("a3-g", message="refused on purpose")  # an error path too
        write_config(tmp_path, fake)
        env = {"OPENAI_API_KEY": secret}
        outputs = [cli("run", "--config", "run.toml", "--name", "s", cwd=tmp_path, env=env)]
        fake.clear_failures()
        outputs.append(cli("run", "--resume", "s", cwd=tmp_path, env=env))
        for args in (("status", "s", "--json"), ("report", "s", "--json"), ("report", "s"), ("cost", "s", "--json"),
                     ("jobs", "list", "s", "--json"), ("status", "s")):
            outputs.append(cli(*args, cwd=tmp_path, env=env))
        outputs.append(cli("run", "--resume", "s", cwd=tmp_path, env={"OPENAI_API_KEY": secret + "-wrong"}))
    assert outputs[0].returncode == 1 and outputs[1].returncode == 0
    for proc in outputs:
        assert secret not in proc.stdout + proc.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".html" for p in files) and any(p.name == "maft.db" for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


# -- the store under load ----------------------------------------------------------------------------------------


def test_hundreds_of_concurrent_writers_never_see_database_is_locked(tmp_path):
    path = tmp_path / "busy.db"
    store = Store(path)
    store.save_run(RunRow(id="r", config="{}", backend="x", model="m", task="t"))
    state = StoreState(store, "openai")
    errors: list[BaseException] = []
    start = threading.Barrier(200)

    def writer(i: int) -> None:
        try:
            start.wait()
            mine = Store(path)
            row = ResponseRow(key=f"k{i}", run_id="r", debate="d", problem_id=f"p{i}", round=1, agent=0,
                              kind="answer", model_id="m", messages="[]", text=f"answer {i}")
            mine.save_response(row, UsageRow(run_id="r", stage="debate", model="m", ref=f"k{i}",
                                              billing="standard", cost_usd=0.001))
            state.put(f"job:{i}", {"job_id": f"ftjob-{i}"})
            mine.close()
        except BaseException as exc:  # noqa: BLE001 - collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count_responses("r") == 200 and len(store.get_usage("r")) == 200
    assert store.total_cost("r") == pytest.approx(0.2)
    assert all(state.get(f"job:{i}") == {"job_id": f"ftjob-{i}"} for i in range(200))
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert json.loads(store.db.execute("select value from backend_state limit 1").fetchone()[0])
