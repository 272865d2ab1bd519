"""The paper's baselines and ablations on the scripted backend: what each trains on, and what it reuses."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from orchestrator.config import RunConfig
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.store import Store
from orchestrator.tasks import get_task
from tests.fakes import ScriptedBackend

ALL = ("star", "majority-ft", "single-ft", "no-summary", "no-critic")


def run(tmp_path, backend, baselines=ALL, **overrides) -> Store:
    config = RunConfig(**{"train_size": 12, "eval_size": 8, "seed": 2, **overrides})
    store = Store(tmp_path / "m.db")
    row = open_run(store, config, "r", must_exist=False)
    Pipeline(config=config, run=row, store=store, backend=backend, workdir=tmp_path / "w",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run(baselines)
    store.close()
    return Store(tmp_path / "m.db")


def lines(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_every_baseline_and_ablation_is_evaluated_at_every_iteration(tmp_path):
    store = run(tmp_path, ScriptedBackend(), iterations=2)
    societies = {(e.society, e.iteration) for e in store.get_evaluations("r")}
    assert societies == {("base", 0)} | {(s, i) for s in ("maft", *ALL) for i in (1, 2)}
    assert {e.method for e in store.get_evaluations("r")} == {"single", "majority", "debate"}
    assert store.get_run("r").status == "finished"


def test_no_critic_keeps_base_critics_and_no_summary_debates_without_summaries(tmp_path):
    store = run(tmp_path, ScriptedBackend(), baselines=("no-critic", "no-summary"))
    critics = {a.model_id for a in store.get_agents("r", 1, "no-critic") if a.role == "critic"}
    generators = {a.model_id for a in store.get_agents("r", 1, "no-critic") if a.role == "generator"}
    assert critics == {"base"} and "base" not in generators
    assert {d.role for d in store.get_datasets("r", society="no-critic")} == {"generator"}
    summaries = [r for r in store.get_responses("r", "no-summary/train-1").values() if r.kind == "summary"]
    assert summaries == []
    assert any(r.kind == "summary" for r in store.get_responses("r", "train-1").values())


def test_majority_ft_reuses_the_first_samples_and_trains_one_model_on_agreeing_answers(tmp_path):
    backend = ScriptedBackend()
    store = run(tmp_path, backend, baselines=("majority-ft",))
    asked = {"/".join(r.key.split("/")[1:3]) for r in backend.requests}
    assert "majority-ft/eval-1" in asked
    assert "majority-ft/train-1" not in asked  # its 3 samples are train-1's round 1, answered from the store
    task = get_task("arithmetic:easy")
    debates = {d.problem_id: d for d in store.get_debates("r", "majority-ft/train-1")}
    (dataset,) = store.get_datasets("r", society="majority-ft")
    for example, pid in zip(lines(dataset.path), json.loads(dataset.problem_ids), strict=True):
        answer = task.extract_answer(example["messages"][1]["content"])
        assert task.equivalent(answer, debates[pid].final_answer)
    models = {a.model_id for a in store.get_agents("r", 1, "majority-ft")}
    assert len(models) == 1 and models != {"base"}


def test_star_keeps_only_ground_truth_correct_answers_and_learns_rationales_without_the_hint(tmp_path):
    store = run(tmp_path, ScriptedBackend(), baselines=("star",))
    task = get_task("arithmetic:easy")
    truth = {p.problem_id: p.answer for p in store.get_problems("r", "train")}
    (dataset,) = store.get_datasets("r", society="star")
    examples = lines(dataset.path)
    assert examples
    for example, pid in zip(examples, json.loads(dataset.problem_ids), strict=True):
        answer = task.extract_answer(example["messages"][1]["content"])
        assert answer is not None and task.equivalent(answer, truth[pid])
        assert "correct answer is" not in example["messages"][0]["content"]
    rationales = store.get_responses("r", "star/rationale-1")
    assert rationales and all("correct answer is" in json.loads(r.messages)[0]["content"]
                              for r in rationales.values())
    (job,) = [j for j in store.get_jobs("r") if j.society == "star"]
    assert job.base_model_id == "base"


def test_single_agent_ft_pools_every_agreeing_answer_of_the_debate(tmp_path):
    store = run(tmp_path, ScriptedBackend(), baselines=("single-ft",))
    (dataset,) = store.get_datasets("r", society="single-ft")
    maft = store.get_datasets("r", 1, society="maft")
    generators = sum(d.n_examples for d in maft if d.role == "generator")
    critics_available = sum(d.n_critic_neg_available + d.n_critic_pos_available for d in maft if d.role == "critic")
    assert dataset.n_examples == generators + critics_available


def test_a_rerun_with_baselines_asks_nothing_again(tmp_path):
    run(tmp_path, ScriptedBackend())
    again = ScriptedBackend()
    run(tmp_path, again)
    assert again.requests == [] and again.specs == []


def test_zero_shot_transfer_evaluates_every_society_on_the_other_tasks_held_out_problems(tmp_path):
    backend = ScriptedBackend()
    config = RunConfig(train_size=12, eval_size=6, seed=2)
    store = Store(tmp_path / "m.db")
    row = open_run(store, config, "r", must_exist=False)
    pipeline = Pipeline(config=config, run=row, store=store, backend=backend, workdir=tmp_path / "w",
                        console=Console(quiet=True), show_progress=False, poll_interval=0)
    pipeline.run(("majority-ft",))
    asked = len(backend.requests)
    pipeline.run_more(transfer=("arithmetic:medium",))
    transfer = [e for e in store.get_evaluations("r") if e.task == "arithmetic:medium"]
    assert {(e.society, e.iteration) for e in transfer} == {("base", 0), ("maft", 1), ("majority-ft", 1)}
    assert all(e.n == 6 for e in transfer)
    medium = store.get_problems("r", "eval@arithmetic:medium")
    assert len(medium) == 6 and all(p.problem_id.startswith("arithmetic:medium/") for p in medium)
    questions = {r.messages[0].content for r in backend.requests[asked:]}
    assert any("*" in q for q in questions)  # the other task's prompts
    assert store.get_run("r").status == "finished"


def test_every_baseline_runs_end_to_end_on_the_local_backend_with_a_tiny_model(tmp_path):
    from backends.local import LocalBackend
    from orchestrator.config import GenerationConfig
    from tests.tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    config = RunConfig(model=str(model), train_size=4, eval_size=3, seed=1,
                       generation=GenerationConfig(max_tokens=8, summary_max_tokens=8))
    store = Store(tmp_path / "m.db")
    row = open_run(store, config, "tiny", must_exist=False)
    backend = LocalBackend(str(model), workdir=tmp_path / "w", device="cpu", show_progress=False)
    Pipeline(config=config, run=row, store=store, backend=backend, workdir=tmp_path / "w",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run(ALL)
    assert store.get_run("tiny").status == "finished"
    societies = {e.society for e in store.get_evaluations("tiny")}
    assert societies == {"base", "maft", *ALL}
    # a random model answers nothing readable, so no set has data: every job is skipped, and said why
    jobs = store.get_jobs("tiny")
    assert jobs and all(j.status in ("skipped", "succeeded") for j in jobs)
    metrics = {d.metric for d in store.get_diversity("tiny")}
    assert {"consensus", "critic_nll"} <= metrics
