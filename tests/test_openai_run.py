"""Whole runs on the openai backend against the fake OpenAI server (real HTTP on loopback, official SDK).

What a user of a paid API must be able to trust: a 2-iteration run completes, a crash between creating a job and
storing its id costs no second job, the cost report matches what the provider counted, a failed job stops the
run cleanly and a resume continues it, and a chat-only server is reported for what it is.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from rich.console import Console

from backends.openai import OpenAIBackend
from backends.openai_settings import OpenAIConfig
from foundation.errors import RunStopped
from orchestrator.config import RunConfig
from orchestrator.costs import Ledger, Pricing, load_prices
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.store import Store, StoreState
from tests.fake_openai import FakeOpenAI

MINI = "gpt-4.1-mini-2025-04-14"
N = 3


class Crash(Exception):
    """Stands in for the process dying."""


def config(fake: FakeOpenAI, **overrides) -> RunConfig:
    settings = OpenAIConfig(base_url=fake.base_url, poll_interval=0.01, n_epochs=1, concurrency=8)
    values = dict(backend="openai", model=MINI, task="arithmetic:easy", agents=N, rounds=2, train_size=30,
                  eval_size=20, seed=1, critic_mix=0.0, openai=settings)
    return RunConfig(**{**values, **overrides})


def run(tmp_path, fake: FakeOpenAI, cfg: RunConfig, name: str = "r", max_cost: float | None = None) -> Store:
    store = Store(tmp_path / "m.db")
    try:
        row = open_run(store, cfg, name, must_exist=False)
        backend = OpenAIBackend(cfg.model, cfg.openai, StoreState(store, "openai"), show_progress=False,
                                environ={"OPENAI_API_KEY": fake.api_key})
        ledger = Ledger(store, name, Pricing(load_prices(), MINI), max_cost=max_cost)
        try:
            Pipeline(config=cfg, run=row, store=store, backend=backend, workdir=tmp_path / "w",
                     console=Console(quiet=True), show_progress=False, poll_interval=0.01, ledger=ledger).run()
        finally:
            backend.close()
    finally:
        store.close()
    return Store(tmp_path / "m.db")


@pytest.mark.fake_openai(base_accuracy=0.8, finetune_bonus=0.1)
def test_two_iterations_end_to_end(tmp_path, fake_openai):
    store = run(tmp_path, fake_openai, config(fake_openai, iterations=2))
    assert store.get_run("r").status == "finished"
    jobs = store.get_jobs("r")
    assert len(jobs) == 2 * N * 2 and {j.status for j in jobs} == {"succeeded"}
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 2 * N * 2
    it1 = {(a.agent, a.role): a.model_id for a in store.get_agents("r", 1)}
    it2 = {(a.agent, a.role): a for a in store.get_agents("r", 2)}
    assert all(m.startswith(f"ft:{MINI}:") for m in it1.values()) and len(set(it1.values())) == 2 * N
    # strategy continue: each iteration-2 job started from the same agent's iteration-1 model
    for slot, agent in it2.items():
        assert agent.parent_model_id == it1[slot]
        job = fake_openai.jobs[next(j.provider_job_id for j in jobs if j.key == agent.job_key)]
        assert job["model"] == it1[slot]
    events = store.get_job_events(jobs[0].key)
    assert events and len({(e.created_at, e.message) for e in events}) == len(events)
    accuracy = {(e.iteration, e.method): e.accuracy for e in store.get_evaluations("r")}
    assert accuracy[(2, "single")] > accuracy[(0, "single")]  # the fake makes finetuned models better


@pytest.mark.fake_openai(base_accuracy=0.8)
def test_the_cost_ledger_matches_what_the_provider_counted(tmp_path, fake_openai):
    store = run(tmp_path, fake_openai, config(fake_openai))
    usage = store.get_usage("r")
    chat = [u for u in usage if u.billing == "standard"]
    server = fake_openai.usage
    assert sum(u.prompt_tokens for u in chat) == sum(m["prompt_tokens"] for m in server.values())
    assert sum(u.completion_tokens for u in chat) == sum(m["completion_tokens"] for m in server.values())
    assert sum(u.cached_tokens for u in chat) == sum(m["cached_tokens"] for m in server.values())
    assert len(chat) == sum(m["requests"] for m in server.values())
    trained = [u for u in usage if u.billing == "training"]
    assert sum(u.trained_tokens for u in trained) == sum(m.get("trained_tokens", 0) for m in server.values())
    assert all(u.estimated == 0 for u in trained)
    pricing = Pricing(load_prices(), MINI)
    expected = sum(pricing.chat(u.model, u.prompt_tokens, u.cached_tokens, u.completion_tokens) for u in chat)
    expected += sum(pricing.training(u.model, u.trained_tokens) for u in trained)
    assert store.total_cost("r") == pytest.approx(expected)


@pytest.mark.fake_openai(base_accuracy=0.8)
def test_a_crash_between_creating_a_job_and_storing_its_id_pays_for_no_second_job(tmp_path, fake_openai, monkeypatch):
    cfg = config(fake_openai)
    original = Store.save_job
    crashed = []

    def dying_save(self, job, events=()):
        if job.provider_job_id and not crashed and job.agent == 1 and job.role == "critic":
            crashed.append(job.key)
            # the job exists on the server; wipe the backend's own memory of it too, as if it never got there
            self.db.execute("delete from backend_state where key like 'openai:job%'")
            self.db.conn.commit()
            raise Crash()
        return original(self, job, events)

    monkeypatch.setattr(Store, "save_job", dying_save)
    with pytest.raises(Crash):
        run(tmp_path, fake_openai, cfg)
    created_before = fake_openai.counts["POST /v1/fine_tuning/jobs"]
    monkeypatch.setattr(Store, "save_job", original)
    store = run(tmp_path, fake_openai, cfg)
    assert crashed and store.get_run("r").status == "finished"
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 2 * N >= created_before
    assert len(fake_openai.jobs) == 2 * N
    assert {j.status for j in store.get_jobs("r")} == {"succeeded"}


@pytest.mark.fake_openai(base_accuracy=0.8)
def test_a_failed_job_stops_the_iteration_and_resume_continues(tmp_path, fake_openai):
    cfg = config(fake_openai)
    fake_openai.fail_jobs("a2-c", code="invalid_training_file", message="the file was refused on purpose")
    with pytest.raises(RunStopped, match="refused on purpose"):
        run(tmp_path, fake_openai, cfg)
    store = Store(tmp_path / "m.db")
    statuses = sorted(j.status for j in store.get_jobs("r"))
    assert statuses.count("failed") == 1 and statuses.count("succeeded") == 2 * N - 1
    responses = store.count_responses("r")
    store.close()
    fake_openai.clear_failures()  # the cause is fixed
    store = run(tmp_path, fake_openai, cfg)
    assert store.get_run("r").status == "finished"
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 2 * N + 1  # only the failed one again
    assert store.count_responses("r") > responses  # the evaluation that the failure had stopped
    retried = [j for j in store.get_jobs("r") if j.attempt == 2]
    assert len(retried) == 1 and retried[0].status == "succeeded"


def orchestrator(fake: FakeOpenAI, cwd, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_KEY": fake.api_key}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.fake_openai(finetuning=False, base_accuracy=0.8)
def test_a_chat_only_server_is_refused_before_any_debate(tmp_path, fake_openai):
    proc = orchestrator(fake_openai, tmp_path, "run", "--backend", "openai", "--model", MINI, "--base-url",
                        fake_openai.base_url, "--train-size", "30", "--eval-size", "4", "--critic-mix", "0",
                        "--quiet", "--name", "chat-only")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip() == (f"error: this server ({fake_openai.base_url}) has no finetuning API: use it for "
                                   "chat only, or point --base-url at OpenAI/Azure")
    assert fake_openai.api_key not in proc.stdout + proc.stderr
    assert fake_openai.counts["POST /v1/chat/completions"] == 0  # nothing was asked, nothing spent
    assert fake_openai.counts["GET /v1/fine_tuning/jobs"] == 1  # one cheap call found out
    db = sqlite3.connect(tmp_path / "maft.db")
    assert db.execute("select count(*) from runs").fetchone()[0] == 0  # and no run was recorded


@pytest.mark.fake_openai(base_accuracy=0.8)
def test_eval_runs_against_a_chat_only_server_but_a_baseline_that_trains_is_refused(tmp_path, fake_openai):
    first = orchestrator(fake_openai, tmp_path, "run", "--backend", "openai", "--model", MINI, "--base-url",
                         fake_openai.base_url, "--train-size", "10", "--eval-size", "4", "--critic-mix", "0",
                         "--quiet", "--name", "r")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    fake_openai.finetuning = False  # the same server, now serving chat only
    chats = fake_openai.counts["POST /v1/chat/completions"]
    refused = orchestrator(fake_openai, tmp_path, "eval", "r", "--baselines", "star", "--quiet")
    assert refused.returncode == 2 and "no finetuning API" in refused.stderr
    assert fake_openai.counts["POST /v1/chat/completions"] == chats
    transfer = orchestrator(fake_openai, tmp_path, "eval", "r", "--task", "arithmetic", "--quiet")
    assert transfer.returncode == 0, transfer.stdout[-2000:] + transfer.stderr[-2000:]
    assert "Traceback" not in transfer.stdout + transfer.stderr
    assert fake_openai.counts["POST /v1/chat/completions"] > chats


@pytest.mark.fake_openai(base_accuracy=0.8, finetune_bonus=0.1)
def test_baselines_and_provider_embeddings_on_the_openai_backend(tmp_path, fake_openai):
    from orchestrator.config import DiversityConfig

    cfg = config(fake_openai, diversity=DiversityConfig(embeddings="provider"))
    store = Store(tmp_path / "m.db")
    row = open_run(store, cfg, "r", must_exist=False)
    backend = OpenAIBackend(cfg.model, cfg.openai, StoreState(store, "openai"), show_progress=False,
                            environ={"OPENAI_API_KEY": fake_openai.api_key})
    Pipeline(config=cfg, run=row, store=store, backend=backend, workdir=tmp_path / "w", console=Console(quiet=True),
             show_progress=False, poll_interval=0.01).run(("star", "majority-ft"))
    societies = {(e.society, e.iteration) for e in store.get_evaluations("r")}
    assert {("star", 1), ("majority-ft", 1), ("maft", 1), ("base", 0)} <= societies
    single = [j for j in store.get_jobs("r") if j.society in ("star", "majority-ft")]
    assert len(single) == 2 and {j.status for j in single} == {"succeeded"}
    assert fake_openai.counts["POST /v1/fine_tuning/jobs"] == 2 * N + 2
    dissimilarity = [d for d in store.get_diversity("r") if d.metric == "embedding_dissimilarity"]
    assert dissimilarity and all(0 <= d.value <= 1 for d in dissimilarity) and "provider" in dissimilarity[0].detail
    assert fake_openai.usage["text-embedding-3-small"]["embedding_tokens"] > 0


@pytest.mark.fake_openai(base_accuracy=0.8)
def test_provider_embeddings_are_in_the_ledger_as_the_provider_counted_them_once(tmp_path, fake_openai):
    import json

    from click.testing import CliRunner

    from orchestrator.cli import cli as command
    from orchestrator.config import DiversityConfig

    cfg = config(fake_openai, diversity=DiversityConfig(embeddings="provider"))
    store = run(tmp_path, fake_openai, cfg, max_cost=100.0)  # the budget is checked before each measurement
    lines = [u for u in store.get_usage("r") if u.billing == "embedding"]
    counted = fake_openai.usage["text-embedding-3-small"]["embedding_tokens"]
    assert counted > 0 and sum(u.prompt_tokens for u in lines) == counted  # the provider's count, not an estimate
    assert {(u.stage, u.model) for u in lines} == {("diversity", "text-embedding-3-small")}
    assert sorted(u.iteration for u in lines) == [0, 1]  # one line per measurement: the base society, iteration 1
    assert all(u.cost_usd > 0 and u.cost_usd == pytest.approx(u.prompt_tokens * 0.02 / 1e6) for u in lines)
    result = CliRunner().invoke(command, ["cost", "r", "--json", "--db", str(tmp_path / "m.db")],
                                catch_exceptions=False)
    summary = json.loads(result.output)
    (diversity,) = [g for g in summary["by_stage"] if g["stage"] == "diversity"]
    assert diversity["prompt_tokens"] == counted and diversity["calls"] == len(lines)
    assert summary["total_usd"] == pytest.approx(store.total_cost("r"))
    assert any("(embeddings)" in source for source in summary["sources"])
    store.close()
    # run again: every answer and every diversity measure comes from the store, so nothing is embedded (or paid)
    # twice
    asked = fake_openai.counts["POST /v1/embeddings"]
    store = run(tmp_path, fake_openai, cfg)
    assert fake_openai.counts["POST /v1/embeddings"] == asked
    again = [u for u in store.get_usage("r") if u.billing == "embedding"]
    assert sorted((u.ref, u.prompt_tokens) for u in again) == sorted((u.ref, u.prompt_tokens) for u in lines)
    store.close()
