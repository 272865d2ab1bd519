"""`[training] objective` dpo end to end: extra samples asked once, per-agent pair files, jobs that train on them.

The scripted backend answers arithmetic readably (so debates have majorities and pairs exist) and answers each
request from its seed, so extra samples differ from the debate's answers. The expected pair counts are recounted
here from the stored responses and votes, not by `orchestrator.preference`. One test trains for real: the local
backend's job runner on the tiny random model, with chat still scripted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from rich.console import Console

from backends.base import BackendInfo, FinetuneSpec, JobRef, JobState
from backends.local import LocalBackend
from orchestrator.config import RunConfig
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.report.terminal import datasets_table
from orchestrator.store import Store
from orchestrator.tasks import get_task
from tests.fakes import Crash, ScriptedBackend
from tests.tiny_model import build_tiny_model

SMALL = dict(task="arithmetic:easy", agents=3, rounds=2, train_size=12, eval_size=4, seed=3)
DPO = dict(training={"objective": "dpo", "beta": 0.2}, preference={"extra_samples": 2})


def run_once(tmp_path: Path, backend: ScriptedBackend, db: str = "m.db", name: str = "r", **overrides: object) -> Store:
    config = RunConfig.model_validate({**SMALL, **overrides})
    store = Store(tmp_path / db)
    try:
        run = open_run(store, config, name, must_exist=False)
        Pipeline(config=config, run=run, store=store, backend=backend, workdir=tmp_path / "work" / name,
                 console=Console(quiet=True), show_progress=False, poll_interval=0).run()
    finally:
        store.close()
    return Store(tmp_path / db)


def extra_keys(backend: ScriptedBackend) -> list[str]:
    return [r.key for r in backend.requests if "/extra" in r.key]


def expected_counts(store: Store, run: str = "r", agents: int = 3) -> dict[tuple[int, str], int]:
    """Pairs per (agent, kind), recounted from the stored training debate: strict majority only; a generator
    pair when the agent's round-1 answer agrees and some disagreeing answer (its extra samples, other agents'
    round 1) exists; a critic pair per round that flips towards or away from the majority."""
    equivalent = get_task(SMALL["task"]).equivalent  # type: ignore[arg-type]
    responses = store.get_responses(run, "train-1").values()
    answer = {(r.problem_id, r.round, r.agent, r.kind): r.answer for r in responses}
    counts = {(n, kind): 0 for n in range(agents) for kind in ("generator", "correction", "anti-sycophancy")}
    for debate in store.get_debates(run, "train-1"):
        final, votes = debate.final_answer, json.loads(debate.votes)
        if final is None or sum(v is not None and equivalent(v, final) for v in votes) * 2 <= agents:
            continue
        def agrees(a: str | None, final: str = final) -> bool:
            return a is not None and equivalent(a, final)

        first = {n: answer[(debate.problem_id, 1, n, "answer")] for n in range(agents)}
        for n in range(agents):
            if agrees(first[n]):
                extras = [a for (p, rnd, k, kind), a in answer.items()
                          if p == debate.problem_id and k == n and kind.startswith("extra")]
                others = [first[k] for k in range(agents) if k != n]
                if any(a is not None and not agrees(a) for a in extras + others):
                    counts[(n, "generator")] += 1
            for rnd in range(2, SMALL["rounds"] + 1):  # type: ignore[operator]
                before, now = answer[(debate.problem_id, rnd - 1, n, "answer")], answer[(debate.problem_id, rnd, n,
                                                                                          "answer")]
                if before is None or now is None or agrees(before) == agrees(now):
                    continue
                counts[(n, "correction" if agrees(now) else "anti-sycophancy")] += 1
    return counts


def test_objective_dpo_asks_extra_samples_only_where_usable_and_writes_the_pairs(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    store = run_once(tmp_path, backend, **DPO)
    extras = [r for r in backend.requests if "/extra" in r.key]
    assert extras and all(r.temperature == 1.0 for r in extras)
    assert {r.key.rsplit("/", 1)[1] for r in extras} == {"extra0", "extra1"}
    # only for agents whose round-1 answer agrees with a strict majority (the pairs' chosen side)
    debates = {d.problem_id: d for d in store.get_debates("r", "train-1")}
    responses = store.get_responses("r", "train-1")
    for r in extras:
        row = responses[r.key]
        debate = debates[row.problem_id]
        assert sum(v == debate.final_answer for v in json.loads(debate.votes)) >= 2
        own = responses[f"r/train-1/{row.problem_id}/r1/a{row.agent}/answer"]
        assert own.answer == debate.final_answer and row.kind.startswith("extra")
    assert len(extras) < 2 * 3 * SMALL["train_size"]  # type: ignore[operator]  # not every agent of every problem

    expected = expected_counts(store)
    assert expected[(0, "generator")] + expected[(1, "generator")] + expected[(2, "generator")] > 0
    rows = store.get_datasets("r", 1)
    assert len(rows) == 6
    for d in rows:
        assert d.pairs_path is not None and d.n_pairs is not None
        data = Path(d.pairs_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == d.pairs_sha256
        lines = [json.loads(line) for line in data.decode().splitlines()]
        assert len(lines) == d.n_pairs
        if d.role == "generator":
            assert d.n_pairs == d.n_pairs_generator == expected[(d.agent, "generator")]
            for line in lines:  # chosen is always the agent's own round-1 answer
                own = responses[f"r/train-1/{line['problem_id']}/r1/a{d.agent}/answer"]
                assert line["chosen"] == own.text and line["agent"] == d.agent
        else:
            assert d.n_pairs_correction == expected[(d.agent, "correction")]
            assert d.n_pairs_anti_sycophancy == expected[(d.agent, "anti-sycophancy")]
            assert d.n_pairs == d.n_pairs_correction + d.n_pairs_anti_sycophancy
        assert all(0 < line["weight"] <= 1 for line in lines)
        assert Path(d.path).exists()  # the SFT file is still written (and counted), the DPO job does not read it
    # every job with pairs trains on its own pair file by DPO, with the run's beta; a slot without pairs keeps
    # its model
    specs = {s.key: s for s in backend.specs}
    for d in rows:
        key = f"r/iteration-1/agent-{d.agent + 1}/{d.role}"
        job = store.get_job(key)
        assert job is not None
        if d.n_pairs:
            spec = specs[key]
            assert spec.objective == "dpo" and str(spec.preference_file) == d.pairs_path
            assert spec.dpo is not None and spec.dpo.beta == 0.2 and spec.dpo.nll_weight == 1.0
            assert job.dataset_sha256 == d.pairs_sha256
        else:
            assert key not in specs and job.status == "skipped" and job.error == "no preference pairs"
    assert store.get_run("r").status == "finished"
    # the dataset table shows the pairs per kind
    table = datasets_table([d.model_dump() for d in rows])
    assert [c.header for c in table.columns][-5:] == ["pairs", "correction", "anti-syc.", "weight", "sha256"]


def test_a_resumed_dpo_run_asks_no_extra_sample_twice_and_a_finished_one_asks_nothing(tmp_path: Path) -> None:
    reference = ScriptedBackend()
    ref_store = run_once(tmp_path, reference, db="ref.db", **DPO)
    first_extra = next(i for i, r in enumerate(reference.requests) if "/extra" in r.key)
    total_extras = len(extra_keys(reference))
    assert total_extras >= 2

    first = ScriptedBackend(crash_after=first_extra + total_extras // 2)  # dies halfway through the extras
    with pytest.raises(Crash):
        run_once(tmp_path, first, **DPO)
    second = ScriptedBackend()
    store = run_once(tmp_path, second, **DPO)
    asked = [r.key for r in first.requests] + [r.key for r in second.requests]
    assert len(asked) == len(set(asked)) == len(reference.requests)
    assert 0 < len(extra_keys(second)) < total_extras
    again = ScriptedBackend()
    run_once(tmp_path, again, **DPO)
    assert again.requests == [] and again.specs == []
    # the same pairs as the uninterrupted run
    assert [d.pairs_sha256 for d in store.get_datasets("r", 1)] == [d.pairs_sha256 for d in
                                                                    ref_store.get_datasets("r", 1)]


def test_objective_sft_is_todays_run(tmp_path: Path) -> None:
    plain = ScriptedBackend()
    plain_store = run_once(tmp_path, plain, db="plain.db")
    sft = ScriptedBackend()
    store = run_once(tmp_path, sft, training={"objective": "sft"}, preference={"extra_samples": 4})
    assert extra_keys(sft) == [] and [r.key for r in sft.requests] == [r.key for r in plain.requests]
    assert all(s.objective == "sft" and s.preference_file is None for s in sft.specs)
    rows = store.get_datasets("r")
    assert all(d.n_pairs is None and d.pairs_path is None for d in rows)
    assert [d.sha256 for d in rows] == [d.sha256 for d in plain_store.get_datasets("r")]
    assert "n_pairs" not in rows[0].model_dump()  # the report's rows of an SFT run are as before
    # a default-valued new setting changes no run's identity, and its stored config reads as before
    config = RunConfig.model_validate({**SMALL, "training": {"epochs": 3, "objective": "sft", "beta": 0.1},
                                       "preference": {"extra_samples": 4}})
    assert config.identity() == RunConfig.model_validate({**SMALL, "training": {"epochs": 3}}).identity()
    assert "objective" not in config.model_dump_json() and "preference" not in config.model_dump_json()
    dpo = RunConfig.model_validate({**SMALL, **DPO})
    assert dpo.identity() != config.identity()
    assert RunConfig.model_validate_json(dpo.model_dump_json()) == dpo


def test_a_preference_objective_on_a_backend_without_it_is_refused() -> None:
    # by the backend's capability (BackendInfo.objectives), checked by `run` before the run is recorded
    # (tests/test_hosted_dpo.py drives the CLI): the config itself is valid on any backend
    from orchestrator.config import objective_problem

    RunConfig.model_validate({**SMALL, "backend": "openai", "model": "gpt-4.1-mini-2025-04-14",
                              "training": {"objective": "dpo"}})
    problem = objective_problem("dpo", BackendInfo(name="openai", base_model="m", objectives=("sft", "sft-then-dpo")))
    assert problem is not None and '"sft" or "sft-then-dpo"' in problem
    assert objective_problem("dpo", BackendInfo(name="local", base_model="m",
                                                objectives=("sft", "dpo", "sft-then-dpo"))) is None


class ScriptedChatLocalTraining(ScriptedBackend):
    """Chat as scripted (readable answers, so there are pairs); finetuning by the real local backend."""

    name = "local"

    def __init__(self, local: LocalBackend) -> None:
        super().__init__()
        self.local = local

    def describe(self) -> BackendInfo:
        return self.local.describe()

    def start_finetune(self, spec: FinetuneSpec) -> JobRef:
        self.specs.append(spec)
        return self.local.start_finetune(spec)

    def poll(self, job: JobRef) -> JobState:
        return self.local.poll(job)


@pytest.mark.parametrize("objective", ["dpo", "sft-then-dpo"])
def test_a_preference_run_trains_its_adapters_by_dpo_on_the_local_backend(tmp_path: Path, objective: str) -> None:
    model = build_tiny_model(tmp_path / "tiny")
    local = LocalBackend(str(model), workdir=tmp_path / "work" / "r", device="cpu", show_progress=False)
    backend = ScriptedChatLocalTraining(local)
    training = {"objective": objective, "epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "lora_rank": 4,
                "max_length": 256}
    store = run_once(tmp_path, backend, train_size=6, eval_size=2, training=training,
                     preference={"extra_samples": 1})
    jobs = [j for j in store.get_jobs("r") if j.status == "succeeded" and j.iteration == 1]
    datasets = {(d.agent, d.role): d for d in store.get_datasets("r", 1)}
    assert [j for j in jobs if datasets[(j.agent, j.role)].n_pairs], "no slot had pairs: the debate should give some"
    both = 0
    for job in jobs:
        dataset = datasets[(job.agent, job.role)]
        record = json.loads((local.adapter_path(job.key) / "job.json").read_text())
        if objective == "sft-then-dpo" and not dataset.n_pairs:  # SFT data only: plain SFT
            assert record["objective"] == "sft" and "dpo_pairs" not in record["stats"]
            continue
        assert record["objective"] == (objective if dataset.n_examples else "dpo")
        assert record["stats"]["dpo_pairs"] == dataset.n_pairs
        if record["objective"] == "sft-then-dpo":
            both += 1
            assert record["stats"]["sft_examples"] == dataset.n_examples
            assert record["examples"] == dataset.n_examples + dataset.n_pairs
        assert 0.0 <= record["stats"]["dpo_reward_accuracy"] <= 1.0
        events = [e.message for e in store.get_job_events(job.key)]
        assert any(m.startswith("loaded ") and "preference pairs" in m for m in events)
        assert any(m.startswith("dpo margin") for m in events)
        assert (local.adapter_path(job.key) / "adapter_model.safetensors").exists()
    assert both or objective == "dpo"  # sft-then-dpo: one job ran both stages on some slot
    assert store.get_run("r").status == "finished"
