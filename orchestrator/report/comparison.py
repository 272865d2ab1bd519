"""The comparison table, the layout of the paper's Table 1: rows society × method, columns tasks, each cell an
accuracy with its standard error, the best of each column marked."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from orchestrator.report.labels import (
    acc_text,
    answers_once,
    kept_row,
    method_rank,
    society_method,
    society_name,
    society_rank,
)
from orchestrator.societies import BASE
from orchestrator.store import EvaluationRow


@dataclass
class Cell:
    task: str
    accuracy: float
    stderr: float
    n: int
    correct: int
    unparseable: int
    iteration: int
    other_iteration: bool = False  # this task's cell comes from another iteration than the row's
    best: bool = False
    truncated: int = 0  # of the unanswered: a reply was cut at max_tokens
    answers: int | None = None  # answers graded, where not one per problem (the single agent: N per problem)

    @property
    def graded(self) -> str:
        """correct/graded: answers for the single agent (N per problem), else problems."""
        return f"{self.correct}/{self.answers or self.n}"

    @property
    def text(self) -> str:
        return acc_text(self.accuracy, self.stderr)

    @property
    def unanswered(self) -> str:
        return f"{self.unparseable} unanswered" + (f" ({self.truncated} cut)" if self.truncated else "")

    @property
    def detail(self) -> str:
        return f"{self.graded} correct · {self.unanswered}"


@dataclass
class ComparisonRow:
    society: str
    method: str
    iteration: int
    cells: dict[str, Cell]
    rowspan: int = 0  # > 0 on the first row of a society's group

    @property
    def society_label(self) -> str:
        return society_name(self.society)

    @property
    def iteration_label(self) -> str:
        return "" if self.society == BASE else f"iteration {self.iteration}"

    @property
    def method_label(self) -> str:
        return society_method(self.society, self.method)


@dataclass
class Comparison:
    tasks: list[str]
    main_task: str | None
    rows: list[ComparisonRow]
    notes: list[str]

    def transfer(self, task: str) -> bool:
        return self.main_task is not None and task != self.main_task


def build_comparison(evals: Sequence[EvaluationRow], main_task: str | None,
                     iteration: int | None = None) -> Comparison:
    """Rows = society × method, columns = tasks (a student's one row: it answers once). A finetuned society is
    shown at `iteration` when it has one, else at its last, because that is the claim a reader checks first; every
    iteration is in the plot."""
    tasks = sorted({e.task for e in evals}, key=lambda t: (t != main_task, t))
    by_key: dict[tuple[str, str], dict[str, dict[int, EvaluationRow]]] = defaultdict(lambda: defaultdict(dict))
    society_iterations: dict[str, set[int]] = defaultdict(set)
    for e in evals:
        if kept_row(e.society, e.method):
            by_key[(e.society, e.method)][e.task][e.iteration] = e
        society_iterations[e.society].add(e.iteration)
    shown = {s: (iteration if iteration is not None and iteration in its and s != BASE else max(its))
             for s, its in society_iterations.items()}
    rows = []
    for society, method in sorted(by_key, key=lambda k: (society_rank(k[0]), method_rank(k[1]))):
        target = shown[society]
        cells = {task: _cell(task, per_iteration, target) for task, per_iteration in by_key[(society, method)].items()}
        rows.append(ComparisonRow(society=society, method=method, iteration=target, cells=cells))
    _mark_groups(rows)
    _mark_best(rows, tasks)
    return Comparison(tasks=tasks, main_task=main_task, rows=rows, notes=_comparison_notes(rows, shown, iteration))


def _cell(task: str, per_iteration: dict[int, EvaluationRow], target: int) -> Cell:
    e = per_iteration.get(target) or per_iteration[max(per_iteration)]
    return Cell(task=task, accuracy=e.accuracy, stderr=e.stderr, n=e.n, correct=e.correct,
                unparseable=e.unparseable, iteration=e.iteration, other_iteration=e.iteration != target,
                truncated=e.truncated, answers=e.answers)


def _mark_groups(rows: list[ComparisonRow]) -> None:
    for i, row in enumerate(rows):
        if i == 0 or rows[i - 1].society != row.society:
            row.rowspan = sum(1 for r in rows[i:] if r.society == row.society)


def _mark_best(rows: Sequence[ComparisonRow], tasks: Iterable[str]) -> None:
    """Bold the best accuracy of each column (every tied cell), when there is something to compare."""
    for task in tasks:
        cells = [r.cells[task] for r in rows if task in r.cells]
        if len(cells) < 2:
            continue
        top = max(c.accuracy for c in cells)
        for c in cells:
            c.best = math.isclose(c.accuracy, top, abs_tol=1e-12)


def _comparison_notes(rows: Sequence[ComparisonRow], shown: dict[str, int], iteration: int | None) -> list[str]:
    notes = ["Accuracy in % ± one standard error, √(p(1−p)/n); under each value: correct/n and unanswered "
             "(no readable answer; \"k cut\": k of them because a reply stopped at max_tokens, which counts as no "
             "answer). Single agent: every agent's round-1 answer is graded (correct/answers), the accuracy is the "
             "mean over problems of the share right, and its standard error is over problems, "
             "√(Σ(sᵢ − p)²/n)/√n, as the N answers to one problem are not independent. Bold: the best value in its "
             "column."]
    finetuned = [s for s in sorted(shown, key=society_rank) if s != BASE]
    if finetuned:
        which = "the chosen iteration where they have it" if iteration is not None else "their last iteration"
        listed = ", ".join(f"{society_name(s)} {shown[s]}" for s in finetuned)
        notes.append(f"Finetuned societies are shown at {which} ({listed}); the accuracy plot and the table "
                     "below it show every iteration.")
    students = [society_name(s) for s in sorted(shown, key=society_rank) if answers_once(s)]
    if students:
        notes.append(f"One answer ({' and '.join(students)}): one agent answers each problem once, so its single "
                     "agent, majority vote and debate are that same answer, shown once.")
    if any(c.other_iteration for r in rows for c in r.cells.values()):
        notes.append("* this task was evaluated at another iteration than the row's: the cell names it.")
    return notes
