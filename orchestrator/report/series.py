"""Accuracy and diversity per iteration: the lines of the plots and the numbers tables beside them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from orchestrator.report.labels import (
    METHOD_LABELS,
    ONE_ANSWER,
    answers_once,
    kept_row,
    method_rank,
    parse_eval_debate,
    society_name,
    society_rank,
)
from orchestrator.societies import BASE, MAFT
from orchestrator.store import DebateRow, DiversityRow, EvaluationRow


@dataclass
class Point:
    iteration: int
    value: float
    stderr: float = 0.0


Groups = dict[tuple[str, str, str], list[Point]]  # (society, method or metric, task) -> points by iteration


@dataclass
class Series:
    """One line in a plot, or one row of the numbers table beside it."""

    society: str
    key: str  # a method (accuracy) or a metric (diversity)
    task: str
    points: list[Point]

    @property
    def label(self) -> str:
        if answers_once(self.society) and self.key in METHOD_LABELS:
            return f"{society_name(self.society)} · {ONE_ANSWER}"
        key = METHOD_LABELS.get(self.key) or self.key.replace("_", " ")
        return f"{society_name(self.society)} · {key}"


def _ordered(groups: Groups) -> list[tuple[tuple[str, str, str], list[Point]]]:
    return sorted(groups.items(), key=lambda kv: (kv[0][2], society_rank(kv[0][0]), method_rank(kv[0][1])))


def accuracy_groups(evals: Sequence[EvaluationRow]) -> Groups:
    """Accuracy per (society, method, task); a student's one answer once, as its debate row."""
    groups: Groups = defaultdict(list)
    for e in sorted(evals, key=lambda e: e.iteration):
        if kept_row(e.society, e.method):
            groups[(e.society, e.method, e.task)].append(Point(e.iteration, 100 * e.accuracy, 100 * e.stderr))
    return groups


def table_series(groups: Groups) -> list[Series]:
    """Every society's own values, for the numbers tables."""
    return [Series(society, key, task, points) for (society, key, task), points in _ordered(groups)]


def line_series(groups: Groups) -> list[Series]:
    """For plots: a finetuned society's line starts at the base society's value, since every society is the
    base model at iteration 0; base values that start a line are not drawn again on their own."""
    out = []
    finetuned_keys = {(k, t) for s, k, t in groups if s != BASE}
    for (society, key, task), points in _ordered(groups):
        if society == BASE:
            if (key, task) not in finetuned_keys:
                out.append(Series(society, key, task, points))
            continue
        base = groups.get((BASE, key, task), [])
        start = [p for p in base if p.iteration < points[0].iteration][-1:]
        out.append(Series(society, key, task, start + points))
    return out


def diversity_groups(rows: Sequence[DiversityRow], debates: dict[str, list[DebateRow]]) -> tuple[Groups, str]:
    """The diversity table's metrics; without any, final-round consensus from the debates (what every run has).
    Never a student's: one agent answering once has no diversity (its consensus would read a meaningless 1)."""
    groups: Groups = defaultdict(list)
    rows = [r for r in rows if not answers_once(r.society)]
    if rows:
        for r in sorted(rows, key=lambda r: r.iteration):
            groups[(r.society, r.metric, r.task)].append(Point(r.iteration, r.value))
        return groups, diversity_definitions(rows)
    for name, debate_rows in debates.items():
        parsed = parse_eval_debate(name)
        if parsed is None or not debate_rows or answers_once(parsed[0]):
            continue
        society, it = parsed
        mean = sum(d.consensus for d in debate_rows) / len(debate_rows)
        groups[(society, "final_consensus", "")].append(Point(it, mean))
    for points in groups.values():
        points.sort(key=lambda p: p.iteration)
    note = ("No diversity metrics are stored for this run yet: shown is the final-round consensus of each "
            "evaluation debate (share of agents agreeing with the final answer), from the debates table.")
    return groups, note if groups else ""


def diversity_definitions(rows: Sequence[DiversityRow]) -> str:
    """What the stored metrics measure, where that differs from the paper's figures: the embedding model, and
    which responses the critics' NLL scored."""
    metrics = {r.metric for r in rows}
    notes = []
    embedded = {r.detail or "" for r in rows if r.metric == "embedding_dissimilarity"}
    if any("minilm" in d.lower() for d in embedded):
        notes.append("Embedding dissimilarity is measured with all-MiniLM-L6-v2 (texts truncated at 256 tokens), "
                     "not the paper's T5-3B encoder: its values are not comparable to the paper's figures.")
    elif embedded:
        notes.append("Embedding dissimilarity is measured with the provider's embedding model ("
                     + "; ".join(sorted(embedded)) + "), not the paper's T5-3B encoder: its values are not "
                     "comparable to the paper's figures.")
    if "critic_nll_final" in metrics:
        notes.append("Critic NLL follows the paper: each critic scores the other agents' final-round responses, "
                     "each in its own conversation (mean NLL per token; higher = more surprising = more diverse).")
    if "critic_nll" in metrics:
        notes.append("\"critic NLL (earlier definition)\" was measured by an earlier version on the other agents' "
                     "round-1 answers; it is not the paper's measure.")
    return " ".join(notes)


def consensus_change(series: Sequence[Series], main_task: str | None) -> tuple[float, float, Series] | None:
    """Consensus at iteration 0 and at the last iteration of the multiagent society (or of any finetuned one)."""
    candidates = [s for s in series if s.key in ("consensus", "final_consensus") and s.society != BASE
                  and s.task in (main_task, "") and len(s.points) >= 2 and s.points[0].iteration == 0]
    if not candidates:
        return None
    chosen = next((s for s in candidates if s.society == MAFT), candidates[0])
    return chosen.points[0].value, chosen.points[-1].value, chosen


@dataclass
class NumbersTable:
    """The values behind a plot, for readers who want numbers (and for the Markdown file)."""

    iterations: list[int]
    rows: list[tuple[str, list[str]]]


def numbers_table(series: Sequence[Series], fmt: Callable[[Point], str], with_task: bool) -> NumbersTable:
    iterations = sorted({p.iteration for s in series for p in s.points})
    rows = []
    for s in series:
        at = {p.iteration: fmt(p) for p in s.points}
        label = f"{s.label} · {s.task}" if with_task and s.task else s.label
        rows.append((label, [at.get(i, "") for i in iterations]))
    return NumbersTable(iterations=iterations, rows=rows)


def undefined_diversity(table: NumbersTable, evals: Sequence[EvaluationRow]) -> NumbersTable:
    """`table` with a row per student saying its diversity is not defined: "—" at each iteration it was evaluated
    at, rather than a number or a zero a reader would compare with the societies'. Unchanged without students or
    without any diversity to set them beside."""
    students = sorted({e.society for e in evals if answers_once(e.society)}, key=society_rank)
    if not students or not table.rows:
        return table
    rows = list(table.rows)
    for society in students:
        evaluated = {e.iteration for e in evals if e.society == society}
        values = ["—" if i in evaluated else "" for i in table.iterations]
        if "—" in values:
            rows.append((f"{society_name(society)} · {ONE_ANSWER}: not defined", values))
    return NumbersTable(iterations=table.iterations, rows=rows)
