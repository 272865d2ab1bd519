"""A run with a distilled student and a society soup, as status, eval --task, the reports and the dry run show it
(issue 15's leftovers). The run is the scripted backend's; the soup (made only by the local backend) is put in by
the pipeline's own steps, exactly as `Distillation.soup` stores and evaluates it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.config import RunConfig
from orchestrator.debate import Society
from orchestrator.distill import DistillRequest
from orchestrator.evaluate import evaluate
from orchestrator.names import DebateName
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.societies import DISTILL, SOUP
from orchestrator.store import DebateTruncation, Store
from tests.fakes import ScriptedBackend

# 3 agents × 2 rounds with summaries: 6 answers and 3 summaries per problem and debate
CONFIG = RunConfig(train_size=12, eval_size=8, seed=2, iterations=1)
PER_PROBLEM = 9
SOUP_MODEL = "soup-of-iteration-1"


@dataclass
class StudentRun:
    db: Path
    store: Store
    pipeline: Pipeline
    backend: ScriptedBackend


def _pipeline(store: Store, backend: ScriptedBackend, workdir: Path, run_id: str = "r") -> Pipeline:
    row = open_run(store, CONFIG, run_id, must_exist=False)
    return Pipeline(config=CONFIG, run=row, store=store, backend=backend, workdir=workdir,
                    console=Console(quiet=True), show_progress=False, poll_interval=0)


def _add_soup(pipeline: Pipeline) -> None:
    """What `Distillation.soup` stores on the local backend, with a model id for the averaged adapter."""
    _, held_out = pipeline.problems()
    teacher = pipeline.stored_society("maft", 1)
    assert teacher is not None
    pipeline.save_society(SOUP, 1, Society.uniform(CONFIG.agents, SOUP_MODEL), teacher)
    name = str(DebateName(stage="eval", iteration=1, society=SOUP))
    outcomes = pipeline.debate(name, held_out, Society.uniform(1, SOUP_MODEL), 1, pipeline.settings(rounds=1))
    for row in evaluate("r", SOUP, 1, outcomes, pipeline.task, CONFIG.seed):
        pipeline.store.save_evaluation(row)


def make_student_run(tmp_path: Path, soup: bool = True) -> StudentRun:
    store = Store(tmp_path / "m.db")
    backend = ScriptedBackend()
    pipeline = _pipeline(store, backend, tmp_path / "w")
    pipeline.run()
    pipeline.run_more(distill=DistillRequest())
    if soup:
        _add_soup(pipeline)
    return StudentRun(db=tmp_path / "m.db", store=store, pipeline=pipeline, backend=backend)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StudentRun]:
    """Read-only for the tests that take it."""
    made = make_student_run(tmp_path_factory.mktemp("student-run"))
    yield made
    made.store.close()


# -- A: status ---------------------------------------------------------------------------------------------------


def test_status_counts_the_students_responses_apart_from_the_society_s(student_run):
    from orchestrator.report.data import status_data
    from orchestrator.report.terminal import status_view

    store = student_run.store
    data = status_data(store, store.require_run("r"))
    society = PER_PROBLEM * (2 * CONFIG.eval_size + CONFIG.train_size)  # eval-0, eval-1, train-1
    teacher = PER_PROBLEM * CONFIG.train_size  # distill/train-1: no iteration 2 to read the debate back from
    students = teacher + 2 * CONFIG.eval_size  # the student and the soup: one answer per held-out problem
    assert store.count_responses("r") == society + students  # what status showed as 376/252 before
    assert data["progress"] == {"responses_stored": society, "responses_expected": society,
                                "students": {"stored": students, "expected": students,
                                             "societies": [DISTILL, SOUP]}}
    console = Console(width=300, record=True)
    console.print(status_view(data))
    line = console.export_text().splitlines()[0]
    assert (f"252/252 responses stored (+ {students}/{students} for the distilled student and the society soup)"
            in line)


def test_a_student_is_expected_from_its_teacher_s_debate_its_agents_or_its_own_debates():
    from orchestrator.report.data import student_progress

    def debate(name: str, answers: int, summaries: int = 0) -> DebateTruncation:
        return DebateTruncation(debate=name, answers=answers, answers_cut=0, summaries=summaries, summaries_cut=0)

    society = [debate("eval-0", 48, 24), debate("train-1", 72, 36), debate("star/eval-1", 48, 24)]
    assert student_progress(CONFIG, society, [("maft", 0), ("maft", 1), ("star", 1)]) is None
    # the teacher's debate half done, nothing else yet: the student's answers are already expected
    begun = student_progress(CONFIG, [*society, debate("distill/train-1", 30, 10)], [("maft", 1)])
    assert begun == {"stored": 40, "expected": PER_PROBLEM * 12 + 8, "societies": [DISTILL]}
    # an earlier iteration's student, taught from train-2 (read back, not stored under distill), and its soup
    # agents stored before its debate began; one student also evaluated zero-shot on another task
    own = [debate("distill/eval-1", 8), debate("transfer/gsm8k/distill/eval-1", 3)]
    later = student_progress(CONFIG, [*society, *own], [("maft", 2), (DISTILL, 1), (SOUP, 1)])
    assert later == {"stored": 11, "expected": 3 * 8, "societies": [DISTILL, SOUP]}


# -- B: zero-shot transfer ---------------------------------------------------------------------------------------


def test_zero_shot_transfer_asks_each_student_once_per_problem_and_the_society_by_debate(tmp_path):
    made = make_student_run(tmp_path)
    store, backend = made.store, made.backend
    student = made.pipeline.stored_society(DISTILL, 1)
    assert student is not None
    asked = len(backend.requests)
    made.pipeline.run_more(transfer=("arithmetic:medium",))
    transfer = "transfer/arithmetic:medium"
    for society, model in ((DISTILL, student.generators[0]), (SOUP, SOUP_MODEL)):
        requests = [r for r in backend.requests[asked:] if r.key.startswith(f"r/{transfer}/{society}/eval-1/")]
        assert len(requests) == CONFIG.eval_size and {r.model for r in requests} == {model}
        responses = store.get_responses("r", f"{transfer}/{society}/eval-1").values()
        assert sorted((r.round, r.agent, r.kind) for r in responses) == [(1, 0, "answer")] * CONFIG.eval_size
        rows = {e.method: e for e in store.get_evaluations("r")
                if (e.society, e.task) == (society, "arithmetic:medium")}
        assert set(rows) == {"single", "majority", "debate"}
        assert {(e.iteration, e.n) for e in rows.values()} == {(1, CONFIG.eval_size)}
        assert rows["single"].answers == CONFIG.eval_size  # one agent: one round-1 answer per problem
        assert rows["single"].accuracy == rows["debate"].accuracy == rows["majority"].accuracy
    # no diversity for a student; the society is still measured and debates as on its own task
    assert {d.society for d in store.get_diversity("r") if d.task == "arithmetic:medium"} == {"base", "maft"}
    assert len(store.get_responses("r", f"{transfer}/eval-1")) == PER_PROBLEM * CONFIG.eval_size
    assert store.get_run("r").status == "finished"
    made.store.close()


# -- C: the cost-per-problem table in the report files ---------------------------------------------------------------


def test_the_report_files_carry_the_cost_per_problem_table_of_a_run_with_a_student(student_run, tmp_path):
    from orchestrator.distill import answering_costs
    from orchestrator.report.labels import acc_text
    from orchestrator.report.model import build_report
    from orchestrator.report.write import write_report

    costs = answering_costs(student_run.store, "r", "arithmetic:easy")
    assert [c.label for c in costs] == ["base, debate", "base, single agent", "multiagent FT, debate",
                                        "multiagent FT, single agent", "distilled student", "society soup"]
    lines = build_report(student_run.store, "r").answering
    assert [(a.label, a.iteration, a.accuracy, a.generations, a.tokens, a.usd) for a in lines] == [
        (c.label, c.iteration, acc_text(c.accuracy, c.stderr), f"{c.generations:.2f}", f"{c.tokens:,.0f}", "—")
        for c in costs]
    assert [a.generations for a in lines] == ["9.00", "1.00", "9.00", "1.00", "1.00", "1.00"]  # 6 answers, 3 summaries
    files = write_report(student_run.store, "r", tmp_path)
    md = files.markdown.read_text()
    start = md.index("## Accuracy and cost per held-out problem")
    section = md[start:md.index("\n## ", start)]  # to the next section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [f"| {a.label} | {a.iteration} | {a.accuracy} | {a.generations} | {a.tokens} | — |" for a in lines]
    page = files.html.read_text()
    begin = page.index('<section id="answering">')
    table = page[begin:page.index("</section>", begin)]
    assert table.count("<tr><td>") == 6 and "<tr><td>distilled student</td><td class=\"num\">1</td>" in table
    assert '<a href="#answering">' in page


def test_a_run_without_a_student_has_no_cost_per_problem_table(tmp_path):
    from orchestrator.report.model import build_report
    from orchestrator.report.write import write_report
    from tests.golden_store import RUN, build_store

    store = build_store(tmp_path / "golden.db")
    assert build_report(store, RUN).answering == []
    files = write_report(store, RUN, tmp_path / "out")
    assert "cost per held-out problem" not in files.markdown.read_text()
    assert 'id="answering"' not in files.html.read_text() and "#answering" not in files.html.read_text()
    store.close()


# -- D: a student answers once: one row, and no diversity ------------------------------------------------------------


def _debate_row(store: Store, society: str, task: str = "arithmetic:easy"):
    (row,) = [e for e in store.get_evaluations("r") if (e.society, e.method, e.task) == (society, "debate", task)]
    return row


def test_the_comparison_shows_each_student_once_as_its_one_answer(student_run):
    from orchestrator.report.comparison import build_comparison
    from orchestrator.report.labels import acc_text

    store = student_run.store
    comparison = build_comparison(store.get_evaluations("r"), "arithmetic:easy")
    assert [(r.society, r.method_label, r.rowspan) for r in comparison.rows if r.society in (DISTILL, SOUP)] == [
        (DISTILL, "one answer", 1), (SOUP, "one answer", 1)]
    assert [(r.society, r.method_label) for r in comparison.rows if r.society == "maft"] == [
        ("maft", "single agent"), ("maft", "majority vote"), ("maft", "debate")]
    for row in comparison.rows:
        if row.society in (DISTILL, SOUP):
            debate = _debate_row(store, row.society)
            assert row.cells["arithmetic:easy"].text == acc_text(debate.accuracy, debate.stderr)
    assert any(n.startswith("One answer (distilled student and society soup)") for n in comparison.notes)


def test_the_terminal_tables_show_each_student_once(student_run):
    from orchestrator.report.data import report_data
    from orchestrator.report.terminal import accuracy_table, comparison_rows, comparison_table

    store = student_run.store
    evaluations = report_data(store, store.require_run("r"))["evaluations"]
    assert sum(e["society"] == DISTILL for e in evaluations) == 3  # --json keeps every stored row
    console = Console(width=200, record=True)
    console.print(accuracy_table(evaluations, "accuracy"))
    console.print(comparison_table(evaluations, "comparison"))
    text = console.export_text()
    cells = [[c.strip() for c in line.split("│") if c.strip()] for line in text.splitlines()]
    student = [row for row in cells if row and "distilled student" in row[0]]
    assert [row[0] for row in student] == ["distilled student, iteration 1",
                                           "distilled student · one answer, iteration 1"]
    assert student[0][1] == "one answer"
    assert sum("society soup" in line for line in text.splitlines()) == 2
    assert sum("multiagent FT, iteration 1" in line for line in text.splitlines()) == 3
    _, rows = comparison_rows(evaluations)
    assert [label for label, _ in rows][-2:] == ["distilled student · one answer, iteration 1",
                                                 "society soup · one answer, iteration 1"]


def test_diversity_is_not_defined_for_a_student(student_run):
    from orchestrator.report.model import build_report
    from orchestrator.report.samples import eval_debate_names
    from orchestrator.report.series import diversity_groups

    store = student_run.store
    assert {d.society for d in store.get_diversity("r")} == {"base", "maft"}  # nothing measured for them
    report = build_report(store, "r")
    students = [(label, values) for label, values in report.diversity.rows if "student" in label or "soup" in label]
    assert report.diversity.iterations == [0, 1]
    assert students == [("distilled student · one answer: not defined", ["", "—"]),
                        ("society soup · one answer: not defined", ["", "—"])]
    # without stored metrics the table falls back on each evaluation debate's consensus: never a student's 1.0
    debates = {name: store.get_debates("r", name) for name in eval_debate_names(store, "r")}
    assert {"distill/eval-1", "soup/eval-1"} <= set(debates)
    groups, _ = diversity_groups([], debates)
    assert {society for society, _, _ in groups} == {"base", "maft"}
    # the accuracy series (plot and numbers): one line per student, named for its one answer
    assert [label for label, _ in report.accuracy.rows if "student" in label or "soup" in label] == [
        "distilled student · one answer", "society soup · one answer"]


# -- E: the dry run of `run --distill` ---------------------------------------------------------------------------


def _billed_student_run(tmp_path: Path, iterations: int) -> Store:
    """A priced scripted run of `iterations`, then its last society distilled, with the ledger on."""
    from orchestrator.costs import Ledger, Pricing, load_prices
    from tests.test_costs import MINI, BilledBackend

    config = RunConfig(train_size=12, eval_size=5, iterations=iterations)
    store = Store(tmp_path / "m.db")
    row = open_run(store, config, "r", must_exist=False)
    Pipeline(config=config, run=row, store=store, backend=BilledBackend(), workdir=tmp_path / "w",
             console=Console(quiet=True), show_progress=False, poll_interval=0,
             ledger=Ledger(store, "r", Pricing(load_prices(), MINI))).run(distill=DistillRequest())
    return store


@pytest.mark.parametrize("iterations", [1, 2])
def test_the_dry_run_of_run_distill_counts_the_teacher_s_debate_the_student_s_job_and_its_answers(
        tmp_path, iterations):
    from orchestrator.costs import Pricing, load_prices
    from orchestrator.estimate import estimate_run
    from orchestrator.tasks import get_task
    from tests.test_costs import MINI, BilledBackend

    config = RunConfig(train_size=12, eval_size=5, iterations=iterations)
    info = BilledBackend().describe()
    pricing = Pricing(load_prices(), MINI)
    plain = estimate_run(config, get_task(config.task), pricing, info)
    lines = estimate_run(config, get_task(config.task), pricing, info, distill=True)
    student = {line.stage: line for line in lines if line.stage.startswith("distill · ")}
    assert [line for line in lines if not line.stage.startswith("distill · ")] == plain  # the society's unchanged
    assert set(student) == {"distill · debate", "distill · training", "distill · evaluation"}
    assert {line.iteration for line in student.values()} == {iterations}  # the last iteration's society teaches
    store = _billed_student_run(tmp_path, iterations)
    L = iterations
    # exactly the calls the run makes: the teacher's debate on the training problems, one answer per held-out one
    assert student["distill · debate"].calls == len(store.get_responses("r", f"distill/train-{L}")) == 12 * PER_PROBLEM
    assert student["distill · evaluation"].calls == len(store.get_responses("r", f"distill/eval-{L}")) == 5
    assert student["distill · training"].calls == 0
    assert sum(line.calls for line in lines) == store.count_responses("r")
    # the student's set at most: every agent's round-1 and final chain of each problem, after the round-1 prompt;
    # filler answers are all as long, so that is twice what the generators of iteration L train on
    generators = [r for r in estimate_rows(config, info) if r.role == "generator" and r.iteration == L]
    assert student["distill · training"].trained_tokens == 2 * sum(r.trained_tokens for r in generators) > 0
    for line in student.values():
        assert 0 < line.expected_usd < line.at_most_usd
    store.close()


def estimate_rows(config: RunConfig, info):
    """The society's training lines of the expected simulation (what the estimate's lines add up)."""
    from orchestrator.costs import Pricing, load_prices
    from orchestrator.estimate import _simulate
    from orchestrator.tasks import get_task
    from tests.test_costs import MINI

    rows, _ = _simulate(config, get_task(config.task), Pricing(load_prices(), MINI), info, 0.5)
    return [r for r in rows if r.stage == "training"]


def test_the_dry_run_of_run_distill_keeps_the_baselines_lines_and_adds_the_soup_on_the_local_backend():
    from backends.base import BackendInfo
    from orchestrator.costs import Pricing, load_prices
    from orchestrator.estimate import estimate_run
    from orchestrator.tasks import get_task
    from tests.test_costs import MINI, BilledBackend

    config = RunConfig(train_size=6, eval_size=4)
    task = get_task(config.task)
    info = BilledBackend().describe()
    pricing = Pricing(load_prices(), MINI)
    star = estimate_run(config, task, pricing, info, ("star",))
    both = estimate_run(config, task, pricing, info, ("star",), distill=True)
    assert [line for line in both if not line.stage.startswith("distill")] == star  # no student row in STaR's share
    local = estimate_run(config, task, pricing, BackendInfo(name="local", base_model="tiny"), distill=True)
    soup = [line for line in local if line.stage.startswith("soup")]
    assert [(line.stage, line.iteration, line.calls) for line in soup] == [("soup · evaluation", 1, 4)]
    assert "soup" not in {line.stage.split(" · ")[0] for line in both}  # a hosted backend makes no soup


def test_orchestrator_run_distill_dry_run_prints_the_student_s_lines(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    monkeypatch.chdir(tmp_path)
    args = ["run", "--dry-run", "--train-size", "5", "--eval-size", "4", "--db", str(tmp_path / "m.db")]
    plain = CliRunner().invoke(cli, args, env={"COLUMNS": "200"})
    distilled = CliRunner().invoke(cli, [*args, "--distill"], env={"COLUMNS": "200"})
    assert plain.exit_code == 0 and distilled.exit_code == 0, distilled.output
    assert "distill · debate" not in plain.output
    for stage in ("distill · debate", "distill · training", "distill · evaluation", "soup · evaluation"):
        assert stage in distilled.output
    assert not (tmp_path / "m.db").exists()  # a dry run writes nothing
