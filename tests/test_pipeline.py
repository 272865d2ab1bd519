"""The whole loop on a scripted backend: what the store holds, resume without repeated work, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from foundation.errors import RunStopped, UserError
from orchestrator.config import RunConfig
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.store import Store
from tests.fakes import Crash, ScriptedBackend

SMALL = dict(task="arithmetic:easy", agents=3, rounds=2, train_size=12, eval_size=10, seed=3)


def run_once(tmp_path, backend, db="m.db", name="r", **overrides):
    config = RunConfig(**{**SMALL, **overrides})
    store = Store(tmp_path / db)
    try:
        run = open_run(store, config, name, must_exist=False)
        Pipeline(config=config, run=run, store=store, backend=backend, workdir=tmp_path / "work" / name,
                 console=Console(quiet=True), show_progress=False, poll_interval=0).run()
    finally:
        store.close()
    return Store(tmp_path / db)


def evaluations(store, run="r"):
    return [(e.iteration, e.method, e.correct, e.n) for e in store.get_evaluations(run)]


def test_two_iterations_fill_the_store(tmp_path):
    backend = ScriptedBackend()
    store = run_once(tmp_path, backend, iterations=2)
    agents = store.get_agents("r")
    assert len(agents) == 3 * 2 * 3  # iterations 0..2, 3 agents, 2 roles
    it1 = {(a.agent, a.role): a for a in store.get_agents("r", 1)}
    it2 = {(a.agent, a.role): a for a in store.get_agents("r", 2)}
    assert all(a.model_id.startswith("ft(base)") for a in it1.values())
    # strategy continue: iteration 2 trains from iteration 1's model of the same agent and role
    for slot, a in it2.items():
        assert a.parent_model_id == it1[slot].model_id
        assert a.model_id.startswith(f"ft({it1[slot].model_id})")
    assert len({a.model_id for a in it1.values()}) == 6  # 2N distinct models
    jobs = store.get_jobs("r")
    assert len(jobs) == 12 and all(j.status == "succeeded" for j in jobs)
    datasets = store.get_datasets("r")
    assert len(datasets) == 12
    for d in datasets:
        lines = Path(d.path).read_text().splitlines()
        assert len(lines) == d.n_examples == len(json.loads(d.problem_ids))
    assert {e[:2] for e in evaluations(store)} == {(i, m) for i in range(3) for m in ("single", "majority", "debate")}
    # every problem the run used is recorded, and train and eval never overlap
    train = {p.problem_id for p in store.get_problems("r", "train")}
    held_out = {p.problem_id for p in store.get_problems("r", "eval")}
    assert len(train) == 12 and len(held_out) == 10 and not train & held_out
    assert store.get_run("r").status == "finished"


def test_generators_and_critics_train_on_their_own_files(tmp_path):
    backend = ScriptedBackend()
    store = run_once(tmp_path, backend)
    files = {s.key: s.training_file for s in backend.specs}
    assert len(set(files.values())) == len(files) == 6
    for d in store.get_datasets("r", 1):
        assert str(files[f"r/iteration-1/agent-{d.agent + 1}/{d.role}"]) == d.path


def test_restart_strategy_trains_every_iteration_from_the_base_model(tmp_path):
    backend = ScriptedBackend()
    run_once(tmp_path, backend, iterations=2, strategy="restart")
    assert {s.base_model for s in backend.specs} == {"base"}


def test_a_crash_mid_debate_resumes_without_asking_twice(tmp_path):
    reference = ScriptedBackend()
    ref_store = run_once(tmp_path, reference, db="ref.db")
    total = len(reference.requests)

    first = ScriptedBackend(crash_after=total // 2)
    with pytest.raises(Crash):
        run_once(tmp_path, first)
    second = ScriptedBackend()
    store = run_once(tmp_path, second)
    asked = [r.key for r in first.requests] + [r.key for r in second.requests]
    assert len(asked) == len(set(asked)) == total
    assert evaluations(store) == evaluations(ref_store)
    assert len(second.specs) == 6


def test_a_finished_run_rerun_does_nothing_and_can_be_extended(tmp_path):
    run_once(tmp_path, ScriptedBackend())
    again = ScriptedBackend()
    run_once(tmp_path, again)
    assert again.requests == [] and again.specs == []
    more = ScriptedBackend()
    store = run_once(tmp_path, more, iterations=2)
    assert len(more.specs) == 6 and {s.key.split("/")[1] for s in more.specs} == {"iteration-2"}
    assert store.get_run("r").iterations_done == 2


def test_a_failed_job_stops_cleanly_and_resume_redoes_only_that_job(tmp_path):
    failing = ScriptedBackend(fail_keys=["agent-2/critic"])
    with pytest.raises(RunStopped, match="agent 2 critic"):
        run_once(tmp_path, failing)
    store = Store(tmp_path / "m.db")
    statuses = {(j.agent, j.role): j.status for j in store.get_jobs("r")}
    assert statuses[(1, "critic")] == "failed"
    assert sum(s == "succeeded" for s in statuses.values()) == 5
    assert store.get_run("r").status == "failed"
    store.close()
    fixed = ScriptedBackend()
    store = run_once(tmp_path, fixed)
    assert [s.key for s in fixed.specs] == ["r/iteration-1/agent-2/critic#attempt-2"]
    assert store.get_job("r/iteration-1/agent-2/critic").attempt == 2
    assert store.get_run("r").status == "finished"


def test_a_different_config_under_the_same_name_is_refused(tmp_path):
    run_once(tmp_path, ScriptedBackend())
    with pytest.raises(UserError, match="agents differ"):
        run_once(tmp_path, ScriptedBackend(), agents=4)


def test_critics_see_only_the_other_agents_previous_round(tmp_path):
    backend = ScriptedBackend()
    run_once(tmp_path, backend, rounds=3, train_size=2, eval_size=2)
    store = Store(tmp_path / "m.db")
    rows = list(store.get_responses("r", "train-1").values())
    text = {(r.problem_id, r.round, r.agent): r.text for r in rows if r.kind == "answer"}
    for r in rows:
        if r.kind != "summary":
            continue
        prompt = json.loads(r.messages)[0]["content"]
        others = [text[(r.problem_id, r.round - 1, k)] for k in range(3) if k != r.agent]
        assert all(o in prompt for o in others)
        assert prompt.count("One agent response") == 2
        own = text[(r.problem_id, r.round - 1, r.agent)]
        if own not in others:
            assert own not in prompt
        if r.round == 3:  # never the answers of two rounds ago
            for k in range(3):
                older = text[(r.problem_id, 1, k)]
                if older not in {text[(r.problem_id, 2, j)] for j in range(3)}:
                    assert older not in prompt


def test_sets_smaller_than_the_provider_minimum_are_skipped_and_the_models_kept(tmp_path):
    from backends.base import BackendInfo

    class Picky(ScriptedBackend):
        def describe(self) -> BackendInfo:
            return BackendInfo(name="picky", base_model="m", min_training_examples=1000)

    backend = Picky()
    store = run_once(tmp_path, backend)
    assert backend.specs == []
    jobs = store.get_jobs("r")
    assert len(jobs) == 6 and {j.status for j in jobs} == {"skipped"}
    assert all("needs at least 1000" in (j.error or "") for j in jobs)
    assert {a.model_id for a in store.get_agents("r", 1)} == {"base"}
    assert store.get_run("r").status == "finished"


def test_every_job_status_change_is_stored_as_an_event(tmp_path):
    store = run_once(tmp_path, ScriptedBackend())
    job = store.get_jobs("r")[0]
    changes = [e.message for e in store.get_job_events(job.key) if e.level == "status"]
    assert changes == ["status queued -> running", "status running -> succeeded"]


def test_an_identical_request_anywhere_in_the_run_is_answered_from_the_store(tmp_path):
    from orchestrator.config import GenerationConfig
    from orchestrator.debate import DebateRunner, DebateSettings, Society
    from orchestrator.tasks import get_task

    task = get_task("arithmetic:easy")
    problems = task.eval_problems(4, 0)
    store = Store(tmp_path / "d.db")
    from orchestrator.store import RunRow

    store.save_run(RunRow(id="r", config="{}", backend="scripted", model="m", task=task.name))
    settings = DebateSettings(rounds=2, summarize=True, generation=GenerationConfig(), seed=0)
    backend = ScriptedBackend()

    def debate(name: str, society: Society):
        return DebateRunner(run_id="r", name=name, task=task, backend=backend, store=store,
                            settings=settings).run(problems, society)

    first = debate("eval-0", Society.base(3))
    asked = len(backend.requests)
    again = debate("ablation/eval-0", Society.base(3))
    assert len(backend.requests) == asked  # nothing asked twice
    assert [o.vote.final for o in again] == [o.vote.final for o in first]
    other = debate("other/eval-0", Society(generators=["ft(base)-x"] * 3, critics=["base"] * 3))
    assert len(backend.requests) > asked and len(other) == 4  # a different model is a different request
    assert len(store.get_responses("r", "ablation/eval-0")) == len(store.get_responses("r", "eval-0"))


def test_every_model_of_a_run_trains_with_its_own_seed() -> None:
    from orchestrator.pipeline import job_seed

    seeds = [job_seed(7, it, agent, role) for it in (1, 2, 3) for agent in range(5) for role in ("generator", "critic")]
    assert len(set(seeds)) == len(seeds)
    assert job_seed(7, 1, 0, "generator") != job_seed(8, 1, 0, "generator")


def test_the_concurrent_job_limit_queues_the_rest(tmp_path):
    import threading

    from backends.base import FinetuneSpec, JobState
    from orchestrator.finetune import FinetunePlan, run_jobs
    from orchestrator.store import JobRow, RunRow

    class SlowJobs(ScriptedBackend):
        """Each job runs for three polls; counts the jobs started and not yet ended."""

        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()
            self.active = self.most = 0
            self.seen: dict[str, int] = {}

        def start_finetune(self, spec):
            with self.lock:
                self.active += 1
                self.most = max(self.most, self.active)
            return super().start_finetune(spec)

        def poll(self, job):
            with self.lock:
                self.seen[job.key] = self.seen.get(job.key, 0) + 1
                if self.seen[job.key] < 3:
                    return JobState(status="running")
                self.active -= 1
            return JobState(status="succeeded", model_id=f"ft-{job.key}", trained_tokens=10)

    store = Store(tmp_path / "m.db")
    store.save_run(RunRow(id="r", config="{}", backend="scripted", model="m", task="arithmetic:easy"))
    data = tmp_path / "t.jsonl"
    data.write_text("{}\n")
    plans = [FinetunePlan(job=JobRow(key=f"r/job-{i}", run_id="r", iteration=1, agent=i, role="generator",
                                     backend="scripted", base_model_id="base"),
                          spec=FinetuneSpec(key=f"r/job-{i}", base_model="base", training_file=data, suffix=f"j{i}"))
             for i in range(5)]
    backend = SlowJobs()
    done = run_jobs(plans, backend, store, max_active=2, poll_interval=0, sleep=lambda _: None)
    assert backend.most == 2 and backend.active == 0  # never more than 2 at once, and the limit was used
    assert len(backend.specs) == 5 and {j.status for j in done.values()} == {"succeeded"}
    assert {j.key: j.model_id for j in store.get_jobs("r")} == {f"r/job-{i}": f"ft-r/job-{i}" for i in range(5)}
