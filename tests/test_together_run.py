"""Whole runs on the together backend against the fake Together server (real HTTP on loopback, official SDK).

What a user of a paid API must be able to trust: a 2-iteration run completes with 2N jobs an iteration, each
iteration-2 job continuing its agent's iteration-1 checkpoint; the cost ledger matches what the provider counted;
a crash between creating a job and storing its id costs no second job.
"""

from __future__ import annotations

import pytest
from rich.console import Console

from backends.together import TogetherBackend
from backends.together_settings import TogetherConfig
from orchestrator.config import RunConfig
from orchestrator.costs import Ledger, Pricing, load_prices
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.store import Store, StoreState
from tests.fake_together import LLAMA_8B, FakeTogether

N = 3


class Crash(Exception):
    """Stands in for the process dying."""


def config(fake: FakeTogether, **overrides) -> RunConfig:
    settings = TogetherConfig(base_url=fake.base_url, poll_interval=0.01, n_epochs=1, concurrency=8)
    values = dict(backend="together", model=LLAMA_8B, task="arithmetic:easy", agents=N, rounds=2, train_size=30,
                  eval_size=20, seed=1, critic_mix=0.0, together=settings)
    return RunConfig(**{**values, **overrides})


def run(tmp_path, fake: FakeTogether, cfg: RunConfig, name: str = "r") -> Store:
    store = Store(tmp_path / "m.db")
    try:
        row = open_run(store, cfg, name, must_exist=False)
        backend = TogetherBackend(cfg.model, cfg.together, StoreState(store, "together"), show_progress=False,
                                  environ={"TOGETHER_API_KEY": fake.api_key})
        ledger = Ledger(store, name, Pricing(load_prices(), cfg.model, full_finetune=not cfg.together.lora))
        try:
            Pipeline(config=cfg, run=row, store=store, backend=backend, workdir=tmp_path / "w",
                     console=Console(quiet=True), show_progress=False, poll_interval=0.01, ledger=ledger).run()
        finally:
            backend.close()
    finally:
        store.close()
    return Store(tmp_path / "m.db")


@pytest.mark.fake_together(base_accuracy=0.8)
def test_two_iterations_end_to_end(tmp_path, fake_together):
    store = run(tmp_path, fake_together, config(fake_together, iterations=2))
    assert store.get_run("r").status == "finished"
    jobs = store.get_jobs("r")
    assert len(jobs) == 2 * N * 2 and {j.status for j in jobs} == {"succeeded"}
    assert fake_together.counts["POST /v1/fine-tunes"] == 2 * N * 2
    it1 = {(a.agent, a.role): a.model_id for a in store.get_agents("r", 1)}
    it2 = {(a.agent, a.role): a for a in store.get_agents("r", 2)}
    assert len(set(it1.values())) == 2 * N and all(m.startswith("fake-user/") for m in it1.values())
    job_of = {j.model_id: j.provider_job_id for j in jobs}
    # strategy continue: each iteration-2 job started from the checkpoint of the same agent's iteration-1 job
    for slot, agent in it2.items():
        assert agent.parent_model_id == it1[slot]
        remote = fake_together.jobs[next(j.provider_job_id for j in jobs if j.key == agent.job_key)]
        assert remote["from_checkpoint"] == job_of[it1[slot]] and remote["model"] == LLAMA_8B
    events = store.get_job_events(jobs[0].key)
    assert events and len({(e.created_at, e.message) for e in events}) == len(events)
    accuracy = {(e.iteration, e.method): e.accuracy for e in store.get_evaluations("r")}
    assert accuracy[(2, "single")] > accuracy[(0, "single")]  # the fake makes finetuned models better
    # the cost ledger holds what the provider counted
    usage = store.get_usage("r")
    chat = [u for u in usage if u.billing == "standard"]
    server = fake_together.usage
    assert sum(u.prompt_tokens for u in chat) == sum(m["prompt_tokens"] for m in server.values())
    assert sum(u.completion_tokens for u in chat) == sum(m["completion_tokens"] for m in server.values())
    trained = [u for u in usage if u.billing == "training"]
    assert sum(u.trained_tokens for u in trained) == sum(m["trained_tokens"] for m in server.values()) > 0
    assert all(u.estimated == 0 for u in trained) and store.total_cost("r") > 0


@pytest.mark.fake_together(base_accuracy=0.8)
def test_a_crash_between_creating_a_job_and_storing_its_id_pays_for_no_second_job(
        tmp_path, fake_together, monkeypatch):
    cfg = config(fake_together)
    original = Store.save_job
    crashed = []

    def dying_save(self, job, events=()):
        if job.provider_job_id and not crashed and job.agent == 1 and job.role == "critic":
            crashed.append(job.key)
            # the job exists on the server; wipe the backend's own memory of it too, as if it never got there
            self.db.execute("delete from backend_state where key like 'together:job%'")
            self.db.conn.commit()
            raise Crash()
        return original(self, job, events)

    monkeypatch.setattr(Store, "save_job", dying_save)
    with pytest.raises(Crash):
        run(tmp_path, fake_together, cfg)
    created_before = fake_together.counts["POST /v1/fine-tunes"]
    monkeypatch.setattr(Store, "save_job", original)
    store = run(tmp_path, fake_together, cfg)
    assert crashed and store.get_run("r").status == "finished"
    assert fake_together.counts["POST /v1/fine-tunes"] == 2 * N >= created_before
    assert len(fake_together.jobs) == 2 * N
    assert {j.status for j in store.get_jobs("r")} == {"succeeded"}
