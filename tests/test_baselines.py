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


def pipeline_for(tmp_path, backend, config: RunConfig) -> tuple[Store, Pipeline]:
    """A new run "r" in tmp_path/m.db, quiet, on `backend`."""
    store = Store(tmp_path / "m.db")
    row = open_run(store, config, "r", must_exist=False)
    return store, Pipeline(config=config, run=row, store=store, backend=backend, workdir=tmp_path / "w",
                           console=Console(quiet=True), show_progress=False, poll_interval=0)


def run(tmp_path, backend, baselines=ALL, **overrides) -> Store:
    store, pipeline = pipeline_for(tmp_path, backend,
                                   RunConfig(**{"train_size": 12, "eval_size": 8, "seed": 2, **overrides}))
    pipeline.run(baselines)
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
    # a problem answered wrong at first and right with the hint is learned from the hinted answer, asked without it
    first = {r.problem_id: r for r in store.get_responses("r", "star/train-1").values()}
    rationalized = {r.problem_id: r.text for r in rationales.values()
                    if r.answer is not None and task.equivalent(r.answer, truth[r.problem_id])}
    assert rationalized, "the scripted model should get some hinted problems right"
    learned = {pid: example for example, pid in zip(examples, json.loads(dataset.problem_ids), strict=True)}
    for pid, text in rationalized.items():
        wrong = first[pid].answer
        assert wrong is None or not task.equivalent(wrong, truth[pid])
        prompt = json.loads(first[pid].messages)[0]  # the plain round-1 prompt, no hint
        assert "correct answer is" not in prompt["content"]
        assert [(m["role"], m["content"]) for m in learned[pid]["messages"]] == [
            ("user", prompt["content"]), ("assistant", text)]
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
    store, pipeline = pipeline_for(tmp_path, backend, RunConfig(train_size=12, eval_size=6, seed=2))
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


def test_zero_shot_transfer_debates_each_society_as_on_its_own_task(tmp_path):
    backend = ScriptedBackend()
    store, pipeline = pipeline_for(tmp_path, backend, RunConfig(train_size=12, eval_size=6, seed=2))
    pipeline.run(("no-summary", "no-critic"))
    asked = len(backend.requests)
    pipeline.run_more(transfer=("arithmetic:medium",))

    def summaries(debate: str) -> int:
        return sum(r.kind == "summary" for r in store.get_responses("r", debate).values())

    transfer = "transfer/arithmetic:medium"
    assert summaries("no-summary/eval-1") == 0 and summaries(f"{transfer}/no-summary/eval-1") == 0
    assert len(store.get_debates("r", f"{transfer}/no-summary/eval-1")) == 6
    for debate in ("eval-1", "no-critic/eval-1"):  # the others summarize there as on their own task
        assert summaries(debate) > 0 and summaries(f"{transfer}/{debate}") > 0
    # the backend was never asked to summarize for the no-summary society on the transfer task
    summarized = [r.key for r in backend.requests[asked:] if r.messages[0].content.startswith("Here are a list")]
    assert summarized and not [k for k in summarized if "/no-summary/" in k]
    critic_turns = [r.messages[2].content for r in backend.requests[asked:]
                    if f"{transfer}/no-summary/" in r.key and len(r.messages) > 2]
    assert critic_turns and all(t.startswith("These are the recent/updated opinions") for t in critic_turns)


def test_single_model_baselines_follow_the_runs_strategy_and_star_always_restarts(tmp_path):
    def starts(strategy: str) -> dict[tuple[str, int], tuple[str, str]]:
        """(society, iteration) -> (the model its job started from, the model of the iteration before)."""
        (tmp_path / strategy).mkdir()
        store = run(tmp_path / strategy, ScriptedBackend(), baselines=("majority-ft", "single-ft", "star"),
                    iterations=2, strategy=strategy)
        out = {}
        for job in store.get_jobs("r"):
            if job.society in ("majority-ft", "single-ft", "star"):
                assert job.status == "succeeded"
                before = store.get_agents("r", job.iteration - 1, job.society) if job.iteration > 1 else []
                out[(job.society, job.iteration)] = (job.base_model_id, before[0].model_id if before else "base")
        assert set(out) == {(s, i) for s in ("majority-ft", "single-ft", "star") for i in (1, 2)}
        return out

    restart = starts("restart")
    assert {start for start, _ in restart.values()} == {"base"}
    keep_going = starts("continue")
    for (society, iteration), (start, previous) in keep_going.items():
        if society == "star":
            assert start == "base"  # STaR's definition: every iteration finetunes the base model afresh
        else:
            assert start == previous  # iteration 2 continues from iteration 1's model
            assert (iteration == 1) == (start == "base")


def test_every_baseline_runs_end_to_end_on_the_local_backend_with_a_tiny_model(tmp_path):
    """The tiny model taught to say "The answer is N." (mostly 7, else 3 or 12): its answers parse and often agree,
    so majority FT and STaR really train a LoRA adapter. Seed 147 draws 1+2 and 2+5 among the 6 training problems,
    so some of the base model's first answers are right by the ground truth, which STaR needs."""
    from backends.base import TrainingParams
    from backends.local import LocalBackend
    from orchestrator.config import GenerationConfig
    from tests.test_crash import build_answering_model

    model = build_answering_model(tmp_path / "tiny")
    config = RunConfig(model=str(model), train_size=6, eval_size=2, seed=147,
                       generation=GenerationConfig(max_tokens=8, summary_max_tokens=8),
                       training=TrainingParams(epochs=1, batch_size=2, learning_rate=1e-3, max_length=256))
    store = Store(tmp_path / "m.db")
    row = open_run(store, config, "tiny", must_exist=False)
    backend = LocalBackend(str(model), workdir=tmp_path / "w", device="cpu", show_progress=False)
    Pipeline(config=config, run=row, store=store, backend=backend, workdir=tmp_path / "w",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run(ALL)
    assert store.get_run("tiny").status == "finished"
    societies = {e.society for e in store.get_evaluations("tiny")}
    assert societies == {"base", "maft", *ALL}
    jobs = store.get_jobs("tiny")
    assert jobs and all(j.status in ("skipped", "succeeded") for j in jobs)
    task = get_task("arithmetic:easy")
    truth = {p.problem_id: p.answer for p in store.get_problems("tiny", "train")}
    for society in ("majority-ft", "star"):
        (job,) = [j for j in jobs if j.society == society]
        assert job.status == "succeeded" and job.base_model_id == "base"
        assert job.train_loss is not None and job.train_loss > 0
        adapter = Path(job.model_id or "")
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
        assert {a.model_id for a in store.get_agents("tiny", 1, society)} == {job.model_id}
        (dataset,) = store.get_datasets("tiny", society=society)
        assert dataset.n_examples > 0 and dataset.sha256 == job.dataset_sha256
        for example, pid in zip(lines(dataset.path), json.loads(dataset.problem_ids), strict=True):
            answer = task.extract_answer(example["messages"][1]["content"])
            assert answer is not None
            if society == "star":
                assert task.equivalent(answer, truth[pid])
    metrics = {d.metric for d in store.get_diversity("tiny")}
    assert {"consensus", "critic_nll_final"} <= metrics


def test_orchestrator_eval_adds_a_baseline_and_a_transfer_task_to_a_finished_run(tmp_path):
    """`orchestrator run`, then `orchestrator eval RUN --baselines majority-ft --task arithmetic:medium`, from the
    command line (click's runner, in-process) on the tiny answering model and a real SQLite file."""
    import sqlite3

    from click.testing import CliRunner

    from orchestrator.cli import cli
    from tests.test_crash import build_answering_model

    model = build_answering_model(tmp_path / "tiny")
    (tmp_path / "run.toml").write_text(f"""
backend = "local"
model = "{model}"
task = "arithmetic:easy"
train_size = 6
eval_size = 2
seed = 147

[generation]
max_tokens = 8
summary_max_tokens = 8

[training]
epochs = 1
batch_size = 2
learning_rate = 1e-3
max_length = 256

[local]
device = "cpu"

[diversity]
embeddings = "off"
critic_nll = false
""")
    db = str(tmp_path / "m.db")
    runner = CliRunner()
    ran = runner.invoke(cli, ["run", "--config", str(tmp_path / "run.toml"), "--name", "tiny", "--db", db, "--quiet"])
    assert ran.exit_code == 0, ran.output + repr(ran.exception)
    evaluated = runner.invoke(cli, ["eval", "tiny", "--baselines", "majority-ft", "--task", "arithmetic:medium",
                                    "--db", db, "--quiet"])
    assert evaluated.exit_code == 0, evaluated.output + repr(evaluated.exception)
    assert "held-out accuracy" in evaluated.output

    conn = sqlite3.connect(db)
    rows = conn.execute("select task, society, iteration, method, n from evaluations where run_id = 'tiny'").fetchall()
    (status,) = conn.execute("select status from runs where id = 'tiny'").fetchone()
    (job,) = conn.execute("select status, model_id from jobs where run_id = 'tiny' and society = 'majority-ft'")
    conn.close()
    methods = {"single", "majority", "debate"}
    found = {(t, s, i): set() for t, s, i, _, _ in rows}
    for t, s, i, method, _ in rows:
        found[(t, s, i)].add(method)
    assert found == {
        ("arithmetic:easy", "base", 0): methods,
        ("arithmetic:easy", "maft", 1): methods,
        ("arithmetic:easy", "majority-ft", 1): methods,  # the baseline, on the run's own held-out problems
        ("arithmetic:medium", "base", 0): methods,  # zero-shot transfer: every society on the other task
        ("arithmetic:medium", "maft", 1): methods,
        ("arithmetic:medium", "majority-ft", 1): methods,
    }
    assert all(n == 2 for *_, n in rows)
    assert status == "finished"
    assert job[0] == "succeeded" and (Path(job[1]) / "adapter_config.json").is_file()
