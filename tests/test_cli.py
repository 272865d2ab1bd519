"""The command line as a user meets it: help, one-line errors with exit status 2, status and report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rich.console import Console

from orchestrator.config import RunConfig
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.store import Store
from tests.fakes import ScriptedBackend


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_explains_every_run_option():
    proc = cli("run", "--help")
    assert proc.returncode == 0
    for option in ("--backend", "--model", "--task", "--agents", "--rounds", "--iterations", "--train-size",
                   "--eval-size", "--seed", "--name", "--db", "--config", "--resume", "--strategy"):
        assert option in proc.stdout
    for command in ("status", "report"):
        sub = cli(command, "--help")
        assert sub.returncode == 0 and "--json" in sub.stdout


def test_an_unknown_task_is_a_one_line_error(tmp_path):
    assert_one_line_error(cli("run", "--task", "arithmetc", "--db", str(tmp_path / "x.db")), "arithmetc", "use one of")


def test_invalid_values_and_unknown_config_keys(tmp_path):
    db = str(tmp_path / "x.db")
    assert_one_line_error(cli("run", "--agents", "0", "--db", db), "agents", "greater than or equal to 1")
    assert_one_line_error(cli("run", "--agents", "1", "--db", db), "at least 2 agents")
    assert_one_line_error(cli("run", "--backend", "openai", "--dry-run"), "needs a model it serves", "--model")
    bad = tmp_path / "bad.toml"
    bad.write_text("agents = 3\nroundz = 2\n")
    assert_one_line_error(cli("run", "--config", str(bad), "--db", db), "roundz", "does not exist")
    nested = tmp_path / "nested.toml"
    nested.write_text("[training]\nepochs = -1\n")
    assert_one_line_error(cli("run", "--config", str(nested), "--db", db), "training.epochs")
    assert_one_line_error(cli("run", "--config", str(tmp_path / "missing.toml"), "--db", db), "does not exist")
    broken = tmp_path / "broken.toml"
    broken.write_text("agents = \n")
    assert_one_line_error(cli("run", "--config", str(broken), "--db", db), "not valid TOML")


def test_full_finetuning_on_together_is_refused_before_anything_is_spent(tmp_path):
    db = str(tmp_path / "x.db")
    full = tmp_path / "full.toml"
    full.write_text('backend = "together"\nmodel = "Qwen/Qwen2.5-7B-Instruct"\n[together]\nlora = false\n')
    assert_one_line_error(cli("run", "--config", str(full), "--db", db), "dedicated endpoint",
                          "dedicated_endpoints = true")
    full.write_text(full.read_text() + "dedicated_endpoints = true\n")
    accepted = cli("run", "--config", str(full), "--db", db, "--dry-run")
    assert accepted.returncode == 0, accepted.stderr


def test_status_and_report_need_an_existing_database_and_run(tmp_path):
    assert_one_line_error(cli("status", "--db", str(tmp_path / "none.db")), "does not exist")
    Store(tmp_path / "empty.db").close()
    assert_one_line_error(cli("report", "nope", "--db", str(tmp_path / "empty.db")), "'nope'", "lists runs")
    assert_one_line_error(cli("run", "--resume", "nope", "--db", str(tmp_path / "empty.db")), "'nope'")


def test_status_and_report_of_a_finished_run(tmp_path):
    config = RunConfig(train_size=12, eval_size=5)
    store = Store(tmp_path / "m.db")
    run = open_run(store, config, "demo", must_exist=False)
    Pipeline(config=config, run=run, store=store, backend=ScriptedBackend(), workdir=tmp_path / "w",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run()
    store.close()
    db = str(tmp_path / "m.db")

    runs = json.loads(cli("status", "--json", "--db", db).stdout)
    assert [r["id"] for r in runs] == ["demo"] and runs[0]["status"] == "finished"

    status = json.loads(cli("status", "demo", "--json", "--db", db).stdout)
    assert status["progress"]["responses_stored"] == status["progress"]["responses_expected"]
    assert len(status["agents"]) == 12 and len(status["jobs"]) == 6
    assert {j["status"] for j in status["jobs"]} == {"succeeded"}

    report = json.loads(cli("report", "demo", "--json", "--db", db).stdout)
    assert {(e["iteration"], e["method"]) for e in report["evaluations"]} == {
        (i, m) for i in (0, 1) for m in ("single", "majority", "debate")
    }
    assert len(report["datasets"]) == 6

    assert {(d["society"], d["metric"]) for d in report["diversity"]} >= {("base", "consensus"), ("maft", "consensus")}
    table = cli("report", "demo", "--db", db, "--out", str(tmp_path / "reports"))
    assert table.returncode == 0 and "multiagent FT, iteration 1" in table.stdout and "±" in table.stdout
    assert (tmp_path / "reports" / "demo.html").is_file() and (tmp_path / "reports" / "demo.md").is_file()
    assert "best on arithmetic:easy" in table.stdout
    assert "finetuning data per agent and role" in table.stdout  # dataset sizes, in the terminal too
    for d in report["datasets"]:
        assert d["sha256"][:12] in table.stdout
    text = cli("status", "demo", "--db", db)
    assert text.returncode == 0 and "finished" in text.stdout and "succeeded" in text.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    proc = cli("run", "--dry-run", "--train-size", "5", "--eval-size", "4", "--iterations", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "dry run" in proc.stdout and "total" in proc.stdout
    assert not list(tmp_path.iterdir())  # no database, no run folder


UNPRICED = ("--backend", "together", "--model", "acme/mystery-model", "--train-size", "5", "--eval-size", "4")


def test_a_billed_model_without_a_price_is_refused_under_max_cost_and_warned_about_in_a_dry_run(tmp_path):
    refused = cli("run", *UNPRICED, "--max-cost", "5", "--db", str(tmp_path / "m.db"), cwd=tmp_path)
    assert_one_line_error(refused, "--max-cost", "acme/mystery-model", "price table 2025-08-01", "--prices FILE",
                          '[models."acme/mystery-model"] input=… output=… training=… source=…')
    dry = cli("run", *UNPRICED, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    warnings = [line for line in dry.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "acme/mystery-model" in warnings[0] and "counted as $0" in warnings[0]
    assert "--prices FILE" in warnings[0] and "dry run" in dry.stdout
    sized = cli("run", *UNPRICED[:3], "acme/mystery-8B", *UNPRICED[4:], "--dry-run", cwd=tmp_path)
    assert sized.returncode == 0 and "warning" not in sized.stderr  # priced by Together's 8B tier


def test_cost_and_jobs_commands_read_the_ledger(tmp_path):
    from orchestrator.costs import Ledger, Pricing, load_prices

    config = RunConfig(train_size=12, eval_size=5)
    store = Store(tmp_path / "m.db")
    run = open_run(store, config, "demo", must_exist=False)
    ledger = Ledger(store, "demo", Pricing(load_prices(), "gpt-4.1-mini-2025-04-14"))
    Pipeline(config=config, run=run, store=store, backend=ScriptedBackend(), workdir=tmp_path / "w",
             console=Console(quiet=True), show_progress=False, poll_interval=0, ledger=ledger).run()
    total = store.total_cost("demo")
    store.close()
    db = str(tmp_path / "m.db")
    summary = json.loads(cli("cost", "demo", "--json", "--db", db).stdout)
    assert summary["total_usd"] == total > 0
    training = summary["training"]  # each job's estimate, kept beside its bill
    assert training["jobs"] == training["billed_jobs"] == 6 and training["billed_tokens"] == 600
    assert training["estimated_tokens"] > 0 and training["estimated_usd"] > 0
    text = cli("cost", "demo", "--db", db)
    assert text.returncode == 0 and f"${total:.4f}" in text.stdout and "by stage" in text.stdout
    assert "estimated before each job vs billed" in text.stdout
    jobs = json.loads(cli("jobs", "list", "demo", "--json", "--db", db).stdout)
    assert len(jobs) == 6 and {j["status"] for j in jobs} == {"succeeded"}
    nothing = cli("jobs", "cancel", "demo", "--db", db)
    assert nothing.returncode == 0 and "no job to cancel" in nothing.stdout


# -- status and jobs cancel, in process through click's CliRunner on a real SQLite store


def invoke(*args: str, env: dict[str, str] | None = None):
    from click.testing import CliRunner

    from orchestrator.cli import cli as command

    result = CliRunner().invoke(command, list(args), env={"COLUMNS": "200", **(env or {})}, catch_exceptions=False)
    return result


def store_with_a_job(tmp_path, *, events: int, run_status: str = "running"):
    """Run "r" holding one running job created 10 minutes ago, last written 9 minutes ago, with `events` events."""
    import time

    from orchestrator.store import JobEventRow, JobRow, RunRow

    db = tmp_path / "m.db"
    store = Store(db)
    store.save_run(RunRow(id="r", config=RunConfig().model_dump_json(), status=run_status, backend="openai",
                          model="m", task="arithmetic:easy"))
    created = time.time() - 600
    job = JobRow(key="r/iteration-1/agent-1/generator", run_id="r", iteration=1, agent=0, role="generator",
                 backend="openai", base_model_id="base", provider_job_id="ftjob-1", status="running",
                 provider_status="running", created_at=created)
    store.save_job(job, [JobEventRow(job_key=job.key, created_at=created + i, message=f"event {i}")
                         for i in range(events)])
    store.db["jobs"].update(job.key, {"updated_at": created + 60})
    store.close()
    return db


def test_status_shows_the_last_events_and_the_time_a_running_job_has_taken(tmp_path):
    db = str(store_with_a_job(tmp_path, events=60))
    data = json.loads(invoke("status", "r", "--json", "--db", db).output)
    (job,) = data["jobs"]
    assert job["elapsed_s"] >= 600  # up to now, not to when the row was last written (60 s)
    assert job["events_total"] == 60 and len(job["events"]) == 50  # the newest 50, oldest first
    assert [e["message"] for e in job["events"]][-3:] == ["event 57", "event 58", "event 59"]
    assert job["events"][0]["message"] == "event 10" and job["last_event"] == "event 59"
    table = invoke("status", "r", "--db", db)
    assert table.exit_code == 0
    assert all(f"event {i}" in table.output for i in (57, 58, 59)) and "event 56" not in table.output
    listed = invoke("jobs", "list", "r", "--db", db).output
    assert "event 57" in listed and "event 59" in listed and "event 56" not in listed


def test_status_watch_stops_when_no_process_holds_a_running_run(tmp_path):
    db = str(store_with_a_job(tmp_path, events=1))  # says "running", but no process holds its lock: killed
    result = invoke("status", "r", "--watch", "--interval", "0.01", "--db", db)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "run r is not running" in text and f"orchestrator run --resume r --db {db}" in text


def test_status_watch_follows_a_live_run_until_it_ends(tmp_path):
    import threading
    import time

    from orchestrator.locks import RunLock

    path = store_with_a_job(tmp_path, events=1)
    lock = RunLock(path, "r").__enter__()  # a live run holds the lock

    def finish_later() -> None:
        time.sleep(0.5)
        store = Store(path)
        run = store.require_run("r")
        run.status = "finished"
        store.save_run(run)
        store.close()
        lock.__exit__(None, None, None)

    worker = threading.Thread(target=finish_later)
    worker.start()
    started = time.monotonic()
    result = invoke("status", "r", "--watch", "--interval", "0.02", "--db", str(path))
    worker.join()
    assert result.exit_code == 0 and time.monotonic() - started >= 0.4  # it watched until the run finished
    assert "not running" not in result.output and "finished" in result.output


OPENAI_MODEL = "gpt-4.1-mini-2025-04-14"


def openai_run_stopped_after_one_job(tmp_path, fake):
    """An openai run on the fake, stopped (as by Ctrl-C) right after it started its first finetuning job."""
    from backends.openai import OpenAIBackend
    from backends.openai_settings import OpenAIConfig
    from orchestrator.costs import Ledger, Pricing, load_prices
    from orchestrator.interrupts import StopRequested
    from orchestrator.store import StoreState

    config = RunConfig(backend="openai", model=OPENAI_MODEL, task="arithmetic:easy", agents=2, rounds=2,
                       train_size=12, eval_size=4, seed=1, critic_mix=0.0,
                       openai=OpenAIConfig(base_url=fake.base_url, poll_interval=0.01, n_epochs=1))
    store = Store(tmp_path / "m.db")
    backend = OpenAIBackend(OPENAI_MODEL, config.openai, StoreState(store, "openai"), show_progress=False,
                            environ={"OPENAI_API_KEY": fake.api_key})
    started = []
    start = backend.start_finetune
    backend.start_finetune = lambda spec: started.append(start(spec)) or started[-1]  # type: ignore[method-assign]

    def stop_once_a_job_started() -> None:
        if started:
            raise StopRequested("stopped at a safe point")

    run = open_run(store, config, "r", must_exist=False)
    with pytest.raises(StopRequested):
        Pipeline(config=config, run=run, store=store, backend=backend, workdir=tmp_path / "w",
                 console=Console(quiet=True), show_progress=False, poll_interval=0.01,
                 ledger=Ledger(store, "r", Pricing(load_prices(), OPENAI_MODEL)),
                 checkpoint=stop_once_a_job_started).run()
    backend.close()
    store.close()
    (ref,) = started
    return config, ref.provider_job_id


def advance(fake, job_id: str, until: str) -> None:
    """Let the job move on at the provider while no run watches it (any GET moves it one state)."""
    import openai

    client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key)
    for _ in range(10):
        if client.fine_tuning.jobs.retrieve(job_id).status == until:
            return
    raise AssertionError(f"job {job_id} never reached {until}")


@pytest.mark.fake_openai(base_accuracy=1.0)  # every agent agrees: every set has 12 examples
def test_jobs_cancel_keeps_a_job_that_had_already_succeeded(tmp_path, fake_openai, monkeypatch):
    from backends.openai import OpenAIBackend
    from orchestrator.costs import Ledger, Pricing, load_prices
    from orchestrator.store import StoreState

    monkeypatch.chdir(tmp_path)  # no ./.env
    config, job_id = openai_run_stopped_after_one_job(tmp_path, fake_openai)
    advance(fake_openai, job_id, "succeeded")  # it finished while no run polled it
    db = str(tmp_path / "m.db")
    result = invoke("jobs", "cancel", "r", "--db", db, env={"OPENAI_API_KEY": fake_openai.api_key})
    assert result.exit_code == 0, result.output
    assert f"{job_id} (agent 1 generator, iteration 1) had already succeeded: kept" in result.output
    store = Store(tmp_path / "m.db")
    (job,) = [j for j in store.get_jobs("r") if j.provider_job_id == job_id]
    assert job.status == job.provider_status == "succeeded" and job.finished_at is not None
    assert job.model_id == fake_openai.jobs[job_id]["fine_tuned_model"]
    bill = next(u for u in store.get_usage("r") if u.ref == job.key)  # the bill, as a run records it
    assert bill.estimated == 0 and bill.trained_tokens == fake_openai.jobs[job_id]["trained_tokens"]
    messages = [e.message for e in store.get_job_events(job.key)]
    assert any(m.startswith("New fine-tuned model created") for m in messages)
    # the resumed run pays for no second job for it
    created = fake_openai.counts["POST /v1/fine_tuning/jobs"]
    backend = OpenAIBackend(OPENAI_MODEL, config.openai, StoreState(store, "openai"), show_progress=False,
                            environ={"OPENAI_API_KEY": fake_openai.api_key})
    Pipeline(config=config, run=open_run(store, config, "r", must_exist=True), store=store, backend=backend,
             workdir=tmp_path / "w", console=Console(quiet=True), show_progress=False, poll_interval=0.01,
             ledger=Ledger(store, "r", Pricing(load_prices(), OPENAI_MODEL))).run()
    backend.close()
    assert store.get_run("r").status == "finished"
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == created + 3  # only the other 3 of 2N = 4
    again = store.get_job(job.key)
    assert again.attempt == 1 and again.provider_job_id == job_id and again.model_id == job.model_id
    store.close()


@pytest.mark.fake_openai(base_accuracy=1.0)  # every agent agrees: every set has 12 examples
def test_jobs_cancel_cancels_a_running_job(tmp_path, fake_openai, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, job_id = openai_run_stopped_after_one_job(tmp_path, fake_openai)
    advance(fake_openai, job_id, "running")
    db = str(tmp_path / "m.db")
    result = invoke("jobs", "cancel", "r", "--db", db, env={"OPENAI_API_KEY": fake_openai.api_key})
    assert result.exit_code == 0, result.output
    assert f"cancelled {job_id} (agent 1 generator, iteration 1)" in result.output
    assert fake_openai.jobs[job_id]["status"] == "cancelled"
    store = Store(tmp_path / "m.db")
    (job,) = [j for j in store.get_jobs("r") if j.provider_job_id == job_id]
    assert job.status == job.provider_status == "cancelled" and job.model_id is None
    assert "Fine-tuning job cancelled" in [e.message for e in store.get_job_events(job.key)]
    changes = [e.message for e in store.get_job_events(job.key) if e.level == "status"]
    assert changes[-1] == "status queued -> cancelled (provider: queued -> cancelled)"  # last polled: queued
    store.close()
    assert "no job to cancel" in invoke("jobs", "cancel", "r", "--db", db).output
