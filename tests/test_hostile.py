"""Hostile input and hostile conditions, as a user meets them through the CLI: each one a clear one-line message
(checked word for word where it matters), exit status 2, nothing stored lost; secrets never written anywhere;
Ctrl-C and a second process handled; the store under many concurrent writers."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.locks import RunLock
from orchestrator.store import ResponseRow, RunRow, Store, StoreState, UsageRow
from tests.fake_openai import FakeOpenAI
from tests.fake_together import LLAMA_8B, FakeTogether

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
# never taken from the environment the tests run in: each test sets what it needs
PROVIDER_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT",
                      "OPENAI_API_VERSION", "TOGETHER_API_KEY", "TOGETHER_BASE_URL", "MAFT_DB")


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in PROVIDER_VARIABLES}
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


def run_status(db: Path, run_id: str) -> str | None:
    con = sqlite3.connect(db)
    try:
        row = con.execute("select status from runs where id = ?", [run_id]).fetchone()
    finally:
        con.close()
    return row[0] if row else None


def test_a_missing_key_says_where_to_set_it_and_fails_no_run(tmp_path):
    # OpenAI itself (no --base-url): the key is looked for before the run is marked running or anything is asked
    line = one_line_error(cli("run", "--backend", "openai", "--model", MINI, "--quiet", "--name", "o", cwd=tmp_path))
    assert line == "error: no OpenAI API key: set OPENAI_API_KEY in the environment or in ./.env"
    together = one_line_error(cli("run", "--backend", "together", "--model", "Qwen/Qwen2.5-7B-Instruct", "--quiet",
                                  "--name", "t", cwd=tmp_path))
    assert together == "error: no Together API key: set TOGETHER_API_KEY in the environment or in ./.env"
    (tmp_path / "azure.toml").write_text(f'backend = "openai"\nmodel = "{MINI}"\n[openai]\napi = "azure"\n'
                                         'azure_endpoint = "https://example.invalid"\napi_version = "2024-10-21"\n')
    azure = one_line_error(cli("run", "--config", "azure.toml", "--quiet", "--name", "a", cwd=tmp_path))
    assert azure == "error: no Azure OpenAI API key: set AZURE_OPENAI_API_KEY in the environment or in ./.env"
    # bad input, refused before the run is recorded: nothing failed, and the same command starts it once the key
    # is set
    assert [run_status(tmp_path / "maft.db", name) for name in "ota"] == [None] * 3


def test_an_invalid_key_is_refused_without_leaking_it(tmp_path, fake_openai):
    write_config(tmp_path, fake_openai)
    wrong = "sk-wrong-0123456789abcdefSECRET"
    proc = cli("run", "--config", "run.toml", "--quiet", cwd=tmp_path, env={"OPENAI_API_KEY": wrong})
    line = one_line_error(proc)
    # the fake, like OpenAI, shows a masked key; the scrubber masks even that
    assert line == (f"error: the server at {fake_openai.base_url} rejected the API key (401): check OPENAI_API_KEY "
                    "in the environment or ./.env (Incorrect API key provided: sk-***. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.)")
    assert wrong not in proc.stdout + proc.stderr
    assert wrong.encode() not in b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_an_unknown_model_is_named(tmp_path, fake_openai):
    (tmp_path / "run.toml").write_text(TOML.format(base_url=fake_openai.base_url).replace(MINI, "gpt-9-imaginary"))
    line = one_line_error(cli("run", "--config", "run.toml", "--quiet", cwd=tmp_path,
                              env={"OPENAI_API_KEY": fake_openai.api_key}))
    assert line == ("error: model gpt-9-imaginary is not available on this server: The model `gpt-9-imaginary` does "
                    f"not exist or you do not have access to it. (server {fake_openai.base_url}; check the model "
                    "name or --base-url)")
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 0
    assert fake_openai.counts["POST /v1/chat/completions"] == 0  # found before the first debate
    runs = sqlite3.connect(tmp_path / "maft.db").execute("select count(*) from runs").fetchone()[0]
    assert runs == 0  # and no run recorded


# -- data files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "expected"), [
    (None, "error: task file '{path}' does not exist: give the path of a .jsonl file with one problem per line"),
    ("", "error: task file '{path}' is empty: add one JSON object per line with 'question' and 'answer'"),
    ('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": \n',
     "error: task file '{path}' line 2 is not valid JSON (Expecting value): write one JSON object per line"),
    ('{"question": "1+1", "answer": "2"}\n\n["2+2", "4"]\n',
     "error: task file '{path}' line 3 is not a JSON object: write one object per line, e.g. "
     '{{"question": "...", "answer": "..."}}'),
])
@pytest.mark.parametrize("command", ["--dry-run", "--quiet"])
def test_a_bad_dataset_file_is_named_with_its_line(tmp_path, content, expected, command):
    data = tmp_path / "mine.jsonl"
    if content is not None:
        data.write_text(content)
    line = one_line_error(cli("run", "--task", str(data), command, cwd=tmp_path))
    assert line == expected.format(path=data)
    assert not (tmp_path / "maft-runs").exists()  # refused before anything was written


@pytest.mark.parametrize(("args", "toml", "expected"), [
    (("--agents", "0"), "",
     "error: invalid config value for 'agents': Input should be greater than or equal to 1 (got 0) "
     "(command-line flags): fix it and run again"),
    (("--critic-mix", "1.5"), "",
     "error: invalid config value for 'critic_mix': Input should be less than or equal to 1 (got 1.5) "
     "(command-line flags): fix it and run again"),
    ((), "[training]\nepochs = -1\n",
     "error: invalid config value for 'training.epochs': Input should be greater than or equal to 1 (got -1) "
     "(run.toml): fix it and run again"),
    ((), "agents = 3\nroundz = 2\n",
     "error: config key 'roundz' does not exist (run.toml): see `orchestrator run --help` for the valid keys"),
    ((), "[openai]\nbatchh = true\n",
     "error: config key 'openai.batchh' does not exist (run.toml): see `orchestrator run --help` for the valid keys"),
])
def test_a_bad_config_value_or_key_is_named(tmp_path, args, toml, expected):
    if toml:
        (tmp_path / "run.toml").write_text(toml)
        args = ("--config", "run.toml", *args)
    assert one_line_error(cli("run", *args, "--quiet", cwd=tmp_path)) == expected
    con = sqlite3.connect(tmp_path / "maft.db")
    assert con.execute("select count(*) from runs").fetchone()[0] == 0  # nothing recorded
    con.close()


def test_sets_below_the_providers_minimum_are_said_and_skipped(tmp_path, fake_openai):
    # not an error: the run goes on, that agent keeps its model, and a line says so (exit 0)
    (tmp_path / "run.toml").write_text(TOML.format(base_url=fake_openai.base_url).replace("train_size = 30",
                                                                                          "train_size = 6"))
    proc = cli("run", "--config", "run.toml", "--quiet", "--name", "small", cwd=tmp_path,
               env={"OPENAI_API_KEY": fake_openai.api_key})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    store = Store(tmp_path / "maft.db")
    datasets = store.get_datasets("small", 1)
    jobs = {(j.agent, j.role): j for j in store.get_jobs("small")}
    store.close()
    assert len(datasets) == 6 and all(0 < d.n_examples < 10 for d in datasets)
    said = [line.strip() for line in proc.stdout.splitlines() if "it keeps its model" in line]
    assert sorted(said) == sorted(f"maft agent {d.agent + 1} {d.role}: {d.n_examples} examples, the openai backend "
                                  "needs at least 10; it keeps its model" for d in datasets)
    assert all(jobs[(d.agent, d.role)].status == "skipped" for d in datasets)
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


def test_the_database_filling_up_stops_with_a_resumable_message_and_loses_nothing(tmp_path, monkeypatch, capsys):
    """SQLite's own SQLITE_FULL, raised by SQLite itself: after 20 stored responses the store's connection may not
    grow the file any more (`PRAGMA max_page_count`), as if the disk were full."""
    from orchestrator import cli as cli_module
    from tests.fakes import ScriptedBackend

    db = tmp_path / "m.db"
    argv = ["orchestrator", "run", "--name", "full", "--db", str(db), "--train-size", "12", "--eval-size", "4",
            "--quiet"]
    original = Store.save_response
    saved: list[str] = []

    def filling_up(self, row, usage=None):
        original(self, row, usage)
        saved.append(row.key)
        if len(saved) == 20:
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
            self.db.execute(f"PRAGMA max_page_count = {pages}")

    monkeypatch.setattr("backends.create_backend", lambda *a, **k: ScriptedBackend())
    monkeypatch.setattr(Store, "save_response", filling_up)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        cli_module.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip() == (f"error: disk full while writing {db}: everything finished before is stored; free some "
                           f"space, then `orchestrator run --resume full --db {db}`")
    con = sqlite3.connect(db)
    kept = dict(con.execute("select key, text from responses where run_id = 'full'").fetchall())
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert len(saved) > 20 and set(saved) <= set(kept)  # every write that returned is there

    # space freed: the resume finishes, asking again nothing that was stored
    monkeypatch.setattr(Store, "save_response", original)
    backend = ScriptedBackend()
    monkeypatch.setattr("backends.create_backend", lambda *a, **k: backend)
    monkeypatch.setattr(sys, "argv", ["orchestrator", "run", "--resume", "full", "--db", str(db), "--quiet"])
    cli_module.main()
    store = Store(db)
    assert store.get_run("full").status == "finished"
    assert not {r.key for r in backend.requests} & set(kept)
    final = {r: store.db.execute("select text from responses where key = ?", [r]).fetchone()[0] for r in kept}
    store.close()
    assert final == kept


def test_a_second_process_on_the_same_run_is_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path / "maft.db", "busy"):
        line = one_line_error(cli("run", "--name", "busy", "--quiet", cwd=tmp_path))
    holder = f"process {os.getpid()} on {re.escape(socket.gethostname())} since [0-9-]{{10}} [0-9:]{{8}}"
    assert re.fullmatch(f"error: run 'busy' is already running \\({holder}\\): wait for it to finish, or stop it, "
                        "then run again", line), line


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    Store(tmp_path / "maft.db").close()
    con = sqlite3.connect(tmp_path / "maft.db")
    con.execute("insert into _migrations values ('m999_future', 0)")
    con.commit()
    con.close()
    expected = (f"error: database {tmp_path / 'maft.db'} was written by a newer maft-orchestrator (migration "
                "m999_future): upgrade with `pip install -U maft-orchestrator` or use another --db")
    assert one_line_error(cli("status", cwd=tmp_path)) == expected
    assert one_line_error(cli("run", "--name", "x", "--quiet", cwd=tmp_path)) == expected
    con = sqlite3.connect(tmp_path / "maft.db")
    assert con.execute("select count(*) from runs").fetchone()[0] == 0  # refused, not misread or written
    con.close()


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


@pytest.mark.fake_openai(chat_latency=0.02, base_accuracy=0.8)
def test_a_second_ctrl_c_stops_at_once_and_says_how_to_resume(tmp_path, fake_openai):
    write_config(tmp_path, fake_openai, "concurrency = 2\n")
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_VARIABLES}
    env |= {"OPENAI_API_KEY": fake_openai.api_key, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", "--config", "run.toml", "--name", "c2",
                             "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    chats = "POST /v1/chat/completions"
    deadline = time.monotonic() + 60
    while fake_openai.counts[chats] < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    # from now on each answer takes a minute: the safe point after the requests in flight is far away
    fake_openai.chat_latency = 60
    slow_from = fake_openai.counts[chats]
    while fake_openai.counts[chats] < slow_from + 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # both slots now wait on a slow answer
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    said = next((line for line in iter(proc.stderr.readline, "") if line.strip()), "")
    assert said == "stopping at the next safe point (Ctrl-C again to stop at once)\n"
    asked_at = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - asked_at < 20  # at once: it did not wait for the answers in flight
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    assert out.strip().splitlines()[-1] == ("stopped at once: everything finished so far is stored; continue with "
                                            "`orchestrator run --resume c2`")
    db = sqlite3.connect(tmp_path / "maft.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("select status from runs where id = 'c2'").fetchone()[0] == "interrupted"
    stored = db.execute("select count(*) from responses").fetchone()[0]
    db.close()
    assert stored >= 5
    fake_openai.chat_latency = 0
    again = cli("run", "--resume", "c2", "--quiet", cwd=tmp_path, env={"OPENAI_API_KEY": fake_openai.api_key})
    assert again.returncode == 0, again.stderr[-2000:]
    assert run_status(tmp_path / "maft.db", "c2") == "finished"


# -- secrets -----------------------------------------------------------------------------------------------------


PROVIDERS = {
    # provider: (fake server, variable of the key, the config of a run against it)
    "openai": (FakeOpenAI, "OPENAI_API_KEY", lambda fake: TOML.format(base_url=fake.base_url)),
    "azure": (FakeOpenAI, "AZURE_OPENAI_API_KEY", lambda fake: TOML.replace('base_url = "{base_url}"', (
        f'api = "azure"\nazure_endpoint = "{fake.azure_endpoint}"\napi_version = "2024-10-21"'))),
    "together": (FakeTogether, "TOGETHER_API_KEY", lambda fake: TOML.replace('"openai"', '"together"').replace(
        MINI, LLAMA_8B).replace("[openai]", "[together]").format(base_url=fake.base_url)),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_a_planted_key_reaches_no_file_and_no_output(tmp_path, provider):
    """A run with a failed job (an error path), its resume, every view of it (--json too), and a run refused for a
    wrong key: the key is in no output, in no file under the project (database, datasets, reports, lock files)."""
    fake_server, variable, toml = PROVIDERS[provider]
    secret = "sk-planted-" + "7f3c9a1e5b2d4c6a8e0f" * 2
    with fake_server(base_accuracy=0.8) as fake:
        fake.api_key = secret
        fake.fail_jobs("a3-g", message=f"refused on purpose for {secret}")  # a server that echoes the key
        (tmp_path / "run.toml").write_text(toml(fake))
        env = {variable: secret}
        outputs = [cli("run", "--config", "run.toml", "--name", "s", cwd=tmp_path, env=env)]
        fake.clear_failures()
        outputs.append(cli("run", "--resume", "s", cwd=tmp_path, env=env))
        for args in (("status", "s", "--json"), ("report", "s", "--json"), ("report", "s"), ("cost", "s", "--json"),
                     ("jobs", "list", "s", "--json"), ("status", "s"), ("status", "--json")):
            outputs.append(cli(*args, cwd=tmp_path, env=env))
        refused = cli("run", "--config", "run.toml", "--name", "s2", cwd=tmp_path, env={variable: secret + "-wrong"})
        outputs.append(refused)
    if provider == "azure":  # Azure's own paths (and its api-key header) were taken
        assert any(route.startswith("POST /openai/") for route in fake.counts), fake.counts
    assert outputs[0].returncode == 1, outputs[0].stderr[-2000:]
    assert "refused on purpose" in outputs[0].stdout  # the failed job was named: that error path was taken
    assert all(proc.returncode == 0 for proc in outputs[1:-1]), [p.stderr[-500:] for p in outputs]
    assert f"rejected the API key (401): check {variable} in the environment or ./.env" in one_line_error(refused)
    for proc in outputs:
        assert "Traceback" not in proc.stdout + proc.stderr
        assert secret not in proc.stdout + proc.stderr, proc.args
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".html" for p in files) and any(p.suffix == ".jsonl" for p in files)
    assert any(p.name == "maft.db" for p in files)
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


def test_hundreds_of_async_writers_never_see_database_is_locked(tmp_path):
    """The hosted chat path under load: hundreds of asyncio tasks at once. Each stores an answer on the event loop's
    thread (as the chat runner's `on_result` does) and one from a worker thread through a connection of its own
    (`asyncio.to_thread`, as the backends' StoreState writes from polling threads), all started together."""
    n = 300
    path = tmp_path / "async.db"
    store = Store(path)
    store.save_run(RunRow(id="r", config="{}", backend="x", model="m", task="t"))
    state = StoreState(store, "openai")
    together = threading.Barrier(n, timeout=120)

    def rows(key: str) -> tuple[ResponseRow, UsageRow]:
        return (ResponseRow(key=key, run_id="r", debate="d", problem_id=key, round=1, agent=0, kind="answer",
                            model_id="m", messages="[]", text=f"answer {key}"),
                UsageRow(run_id="r", stage="debate", model="m", ref=key, billing="standard", cost_usd=0.001))

    def in_a_thread(i: int) -> None:
        together.wait()  # every worker thread writes at the same moment
        mine = Store(path)
        try:
            mine.save_response(*rows(f"thread-{i}"))
        finally:
            mine.close()
        state.put(f"job:{i}", {"job_id": f"ftjob-{i}"})

    async def writer(i: int) -> None:
        await asyncio.to_thread(in_a_thread, i)
        store.save_response(*rows(f"loop-{i}"))

    async def main() -> list[BaseException | None]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=n))
        return await asyncio.gather(*(writer(i) for i in range(n)), return_exceptions=True)

    errors = [r for r in asyncio.run(main()) if r is not None]
    assert errors == []  # no "database is locked", nor anything else
    assert store.count_responses("r") == 2 * n and len(store.get_usage("r")) == 2 * n
    assert store.total_cost("r") == pytest.approx(0.002 * n)
    keys = {r[0] for r in store.db.execute("select key from responses")}
    assert keys == {f"{where}-{i}" for where in ("thread", "loop") for i in range(n)}
    assert all(state.get(f"job:{i}") == {"job_id": f"ftjob-{i}"} for i in range(n))
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()
