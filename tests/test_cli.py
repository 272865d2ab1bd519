"""The command line as a user meets it: help, one-line errors with exit status 2, status and report."""

from __future__ import annotations

import json
import subprocess
import sys

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
    text = cli("cost", "demo", "--db", db)
    assert text.returncode == 0 and f"${total:.4f}" in text.stdout and "by stage" in text.stdout
    jobs = json.loads(cli("jobs", "list", "demo", "--json", "--db", db).stdout)
    assert len(jobs) == 6 and {j["status"] for j in jobs} == {"succeeded"}
    nothing = cli("jobs", "cancel", "demo", "--db", db)
    assert nothing.returncode == 0 and "no job to cancel" in nothing.stdout
