"""One run as a report people want to read: a self-contained HTML file, its Markdown twin, a few terminal lines.

Everything comes from the store, read-only, so a report can be rebuilt at any time, also while a run is still
going. The HTML file carries its CSS and its plots (inline SVG) inside it: it opens offline, survives being mailed,
and prints. Model output and questions are untrusted text: the HTML template escapes every value (Jinja2
autoescape, nothing marked safe but our own SVG), and the Markdown puts model text in code blocks and
entity-escapes everything it shows inline, so neither file can run or inject anything a model wrote.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
from markupsafe import Markup
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydantic import BaseModel

from orchestrator.costs import cost_summary
from orchestrator.debate import readable_answer, truncated
from orchestrator.report import METHOD_LABELS, SOCIETY_LABELS, acc_text, method_order, usd
from orchestrator.store import (
    DatasetRow,
    DebateRow,
    DiversityRow,
    EvaluationRow,
    JobRow,
    ProblemRow,
    ResponseRow,
    RunRow,
    Store,
    UsageRow,
)

TEMPLATES = Path(__file__).parent / "templates"
# Paper's Table 1 order: baselines first, then ours and its ablations; unknown societies follow by name.
SOCIETY_ORDER = ("base", "star", "majority-ft", "single-ft", "maft", "no-summary", "no-critic")
METRIC_LABELS = {
    "consensus": "consensus (share of agents agreeing with the majority)",
    "embedding_dissimilarity": "embedding dissimilarity (1 − mean pairwise cosine)",
    "critic_nll_final": "critic NLL of the other critics' final answers",
    "critic_nll": "critic NLL of the other agents' round-1 answers (earlier definition)",
    "final_consensus": "final-round consensus (debates table)",
}
METHOD_COLORS = {"single": "#1f77b4", "majority": "#ff7f0e", "debate": "#2ca02c"}
SOCIETY_COLORS = {"base": "#7f7f7f", "maft": "#1f77b4", "star": "#d62728", "majority-ft": "#9467bd",
                  "single-ft": "#8c564b", "no-summary": "#e377c2", "no-critic": "#17becf"}
SOCIETY_LINES: dict[str, Any] = {"maft": "-", "star": "--", "majority-ft": ":", "single-ft": "-.",
                                 "no-summary": (0, (5, 1)), "no-critic": (0, (3, 1, 1, 1))}
SOCIETY_MARKERS = {"base": "o", "maft": "o", "star": "s", "majority-ft": "^", "single-ft": "v", "no-summary": "D",
                   "no-critic": "P"}
EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
SAMPLES_PER_KIND = 3
LONG_TEXT_CHARS = 240  # model text longer than this (or than a few lines) starts collapsed
PLOT_RC: dict[Any, Any] = {
    "svg.fonttype": "none",  # text stays text in the SVG: small, sharp, selectable, searchable
    "svg.hashsalt": "maft-report",  # stable ids, so the same run gives the same file
    "font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "legend.frameon": False,
}


class ReportFiles(BaseModel):
    """What `write_report` wrote, and the lines worth printing in the terminal."""

    html: Path
    markdown: Path
    plots: list[Path] = []  # PNG files next to the Markdown file, which links them
    summary: list[str]


# small formatting helpers ----------------------------------------------------------------------------------


def society_name(society: str) -> str:
    return SOCIETY_LABELS.get(society, society)


def method_name(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _society_rank(society: str) -> tuple[int, str]:
    return (SOCIETY_ORDER.index(society) if society in SOCIETY_ORDER else len(SOCIETY_ORDER), society)


def _method_rank(method: str) -> tuple[int, str]:
    return method_order(method), method


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "—"


def _slug(text: str) -> str:
    """A file name from a run id (which `--name` lets users choose freely)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


# the run and its configuration -----------------------------------------------------------------------------


@dataclass
class RunInfo:
    id: str
    status: str
    backend: str
    model: str
    task: str
    iterations_done: int
    iterations: int
    agents: int
    rounds: int
    created: str
    updated: str
    error: str | None


def run_info(run: RunRow, config: dict[str, Any]) -> RunInfo:
    return RunInfo(id=run.id, status=run.status, backend=run.backend, model=run.model, task=run.task,
                   iterations_done=run.iterations_done, iterations=int(config.get("iterations", run.iterations_done)),
                   agents=int(config.get("agents", 0)), rounds=int(config.get("rounds", 0)),
                   created=_when(run.created_at), updated=_when(run.updated_at), error=run.error)


def config_items(config: dict[str, Any]) -> list[tuple[str, str]]:
    """The RunConfig as dotted keys. Read as plain JSON rather than RunConfig, so an old run whose config has keys
    this version lacks still reports; the settings sections of backends the run did not use are left out."""
    backend = config.get("backend")
    backend_sections = {"local", "openai", "together"}
    items: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            items.append((prefix.rstrip("."), _setting_text(value)))

    for key, value in config.items():
        if key in backend_sections and key != backend and isinstance(value, dict):
            continue
        walk(f"{key}.", value)
    return items


def _setting_text(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ", ".join(str(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


# finetuning data -------------------------------------------------------------------------------------------


@dataclass
class DatasetLine:
    society: str
    iteration: int
    agent: int  # 1-based, as people count
    role: str
    examples: int
    critic_neg: str  # used/available, critics only
    critic_pos: str
    job: str
    loss: str
    too_long: int  # dropped as longer than max_length (never trained on cut)
    sha: str


def _society_of(row: DatasetRow | JobRow) -> str:
    """Rows written before societies were recorded per set belong to multiagent FT."""
    return str(getattr(row, "society", None) or "maft")


def dataset_lines(datasets: Sequence[DatasetRow], jobs: Sequence[JobRow]) -> list[DatasetLine]:
    """Each agent's and role's set next to the job that trained on it (its latest attempt)."""
    latest: dict[tuple[str, int, int, str], JobRow] = {}
    for job in jobs:
        slot = (_society_of(job), job.iteration, job.agent, job.role)
        if slot not in latest or job.attempt >= latest[slot].attempt:
            latest[slot] = job
    lines = []
    for d in sorted(datasets, key=lambda d: (_society_rank(_society_of(d)), d.iteration, d.agent, d.role)):
        critic = d.role == "critic"
        trained = latest.get((_society_of(d), d.iteration, d.agent, d.role))
        lines.append(DatasetLine(
            society=society_name(_society_of(d)), iteration=d.iteration, agent=d.agent + 1, role=d.role,
            examples=d.n_examples,
            critic_neg=f"{d.n_critic_neg}/{d.n_critic_neg_available}" if critic else "",
            critic_pos=f"{d.n_critic_pos}/{d.n_critic_pos_available}" if critic else "",
            too_long=d.n_too_long,
            job=trained.status if trained else "—",
            loss=f"{trained.train_loss:.3f}" if trained and trained.train_loss is not None else "",
            sha=d.sha256[:12],
        ))
    return lines


# the comparison table (the paper's Table 1) ----------------------------------------------------------------


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
        return "" if self.society == "base" else f"iteration {self.iteration}"

    @property
    def method_label(self) -> str:
        return method_name(self.method)


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
    """Rows = society × method, columns = tasks. A finetuned society is shown at `iteration` when it has one,
    else at its last, because that is the claim a reader checks first; every iteration is in the plot."""
    tasks = sorted({e.task for e in evals}, key=lambda t: (t != main_task, t))
    by_key: dict[tuple[str, str], dict[str, dict[int, EvaluationRow]]] = defaultdict(lambda: defaultdict(dict))
    society_iterations: dict[str, set[int]] = defaultdict(set)
    for e in evals:
        by_key[(e.society, e.method)][e.task][e.iteration] = e
        society_iterations[e.society].add(e.iteration)
    shown = {s: (iteration if iteration is not None and iteration in its and s != "base" else max(its))
             for s, its in society_iterations.items()}
    rows = []
    for society, method in sorted(by_key, key=lambda k: (_society_rank(k[0]), _method_rank(k[1]))):
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
    finetuned = [s for s in sorted(shown, key=_society_rank) if s != "base"]
    if finetuned:
        which = "the chosen iteration where they have it" if iteration is not None else "their last iteration"
        listed = ", ".join(f"{society_name(s)} {shown[s]}" for s in finetuned)
        notes.append(f"Finetuned societies are shown at {which} ({listed}); the accuracy plot and the table "
                     "below it show every iteration.")
    if any(c.other_iteration for r in rows for c in r.cells.values()):
        notes.append("* this task was evaluated at another iteration than the row's: the cell names it.")
    return notes


# accuracy and diversity per iteration ----------------------------------------------------------------------


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
        key = METHOD_LABELS.get(self.key) or self.key.replace("_", " ")
        return f"{society_name(self.society)} · {key}"


def _ordered(groups: Groups) -> list[tuple[tuple[str, str, str], list[Point]]]:
    return sorted(groups.items(), key=lambda kv: (kv[0][2], _society_rank(kv[0][0]), _method_rank(kv[0][1])))


def accuracy_groups(evals: Sequence[EvaluationRow]) -> Groups:
    groups: Groups = defaultdict(list)
    for e in sorted(evals, key=lambda e: e.iteration):
        groups[(e.society, e.method, e.task)].append(Point(e.iteration, 100 * e.accuracy, 100 * e.stderr))
    return groups


def table_series(groups: Groups) -> list[Series]:
    """Every society's own values, for the numbers tables."""
    return [Series(society, key, task, points) for (society, key, task), points in _ordered(groups)]


def line_series(groups: Groups) -> list[Series]:
    """For plots: a finetuned society's line starts at the base society's value, since every society is the
    base model at iteration 0; base values that start a line are not drawn again on their own."""
    out = []
    finetuned_keys = {(k, t) for s, k, t in groups if s != "base"}
    for (society, key, task), points in _ordered(groups):
        if society == "base":
            if (key, task) not in finetuned_keys:
                out.append(Series(society, key, task, points))
            continue
        base = groups.get(("base", key, task), [])
        start = [p for p in base if p.iteration < points[0].iteration][-1:]
        out.append(Series(society, key, task, start + points))
    return out


def diversity_groups(rows: Sequence[DiversityRow], debates: dict[str, list[DebateRow]]) -> tuple[Groups, str]:
    """The diversity table's metrics; without any, final-round consensus from the debates (what every run has)."""
    groups: Groups = defaultdict(list)
    if rows:
        for r in sorted(rows, key=lambda r: r.iteration):
            groups[(r.society, r.metric, r.task)].append(Point(r.iteration, r.value))
        return groups, diversity_definitions(rows)
    for name, debate_rows in debates.items():
        parsed = parse_eval_debate(name)
        if parsed is None or not debate_rows:
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


EVAL_DEBATE = re.compile(r"(?:(?P<society>[^/]+)/)?eval-(?P<iteration>\d+)")


def parse_eval_debate(name: str) -> tuple[str, int] | None:
    """(society, iteration) of an evaluation debate: `eval-0` is the base society, `eval-k` multiagent FT after
    k iterations, `SOCIETY/eval-k` another finetuned society (an ablation or a baseline)."""
    match = EVAL_DEBATE.fullmatch(name)
    if match is None:
        return None
    iteration = int(match["iteration"])
    return match["society"] or ("base" if iteration == 0 else "maft"), iteration


def consensus_change(series: Sequence[Series], main_task: str | None) -> tuple[float, float, Series] | None:
    """Consensus at iteration 0 and at the last iteration of the multiagent society (or of any finetuned one)."""
    candidates = [s for s in series if s.key in ("consensus", "final_consensus") and s.society != "base"
                  and s.task in (main_task, "") and len(s.points) >= 2 and s.points[0].iteration == 0]
    if not candidates:
        return None
    chosen = next((s for s in candidates if s.society == "maft"), candidates[0])
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


# costs -----------------------------------------------------------------------------------------------------


@dataclass
class CostView:
    total: float
    estimated: float
    calls: int
    tokens: int
    by_stage: list[dict[str, Any]]
    sources: list[str]
    note: str


def cost_view(usage: Sequence[UsageRow], backend: str) -> CostView:
    summary = cost_summary(usage)
    tokens = sum(r.prompt_tokens + r.completion_tokens + r.trained_tokens for r in usage)
    note = ""
    if not usage:
        note = "The cost ledger of this run is empty."
    elif summary["total_usd"] == 0:
        note = (f"Nothing was billed (the {backend} backend charges nothing per token): the ledger holds "
                f"{len(usage):,} calls and {tokens:,} tokens, so there is no cost plot.")
    return CostView(total=summary["total_usd"], estimated=summary["estimated_usd"], calls=len(usage), tokens=tokens,
                    by_stage=summary["by_stage"], sources=summary["sources"], note=note)


# plots -----------------------------------------------------------------------------------------------------


@dataclass
class Plot:
    name: str
    title: str
    alt: str
    svg: str
    png: bytes


def _figure(panels: int, height: float = 3.4) -> tuple[Figure, list[Axes]]:
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=({1: 7.5, 2: 11.5}.get(cols, 13.0), height * rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without pyplot: no window, no global state, safe beside a user's own plots
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _plain(text: str) -> str:
    """Matplotlib reads $...$ as math: labels come from user-chosen names (a task file, a society)."""
    return text.replace("$", r"\$")


def _legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend for all panels, below them, so it never covers a line."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(3, len(seen)))


def _integer_iterations(ax: Axes, iterations: Iterable[int]) -> None:
    ticks = sorted(set(iterations))
    ax.set_xticks(ticks)
    if ticks:
        ax.set_xlim(min(ticks) - 0.3, max(ticks) + 0.3)
    ax.set_xlabel("iteration (0 = base model)")


def _color(key: str, palette: dict[str, str], extra: dict[str, str]) -> str:
    if key in palette:
        return palette[key]
    return extra.setdefault(key, EXTRA_COLORS[len(extra) % len(EXTRA_COLORS)])


def accuracy_plot(series: Sequence[Series], tasks: Sequence[str], main_task: str | None) -> Plot | None:
    if not series:
        return None
    fig, axes = _figure(len(tasks))
    extra: dict[str, str] = {}
    methods = sorted({s.key for s in series}, key=_method_rank)
    for ax, task in zip(axes, tasks, strict=True):
        for s in (s for s in series if s.task == task):
            offset = (methods.index(s.key) - (len(methods) - 1) / 2) * 0.05  # error bars side by side
            ax.errorbar([p.iteration + offset for p in s.points], [p.value for p in s.points],
                        yerr=[p.stderr for p in s.points], color=_color(s.key, METHOD_COLORS, extra),
                        linestyle=SOCIETY_LINES.get(s.society, "none" if s.society == "base" else "-"),
                        marker=SOCIETY_MARKERS.get(s.society, "o"), markersize=5, capsize=3, linewidth=1.6,
                        elinewidth=0.9, label=_plain(s.label))
        _integer_iterations(ax, [p.iteration for s in series if s.task == task for p in s.points])
        ax.set_ylabel("accuracy (%)")
        ax.set_title(_plain(task + (" (zero-shot transfer)" if main_task and task != main_task else "")))
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, 0), min(high, 100))
    _legend(fig, axes)
    return _render(fig, "accuracy", "Accuracy per iteration",
                   "Held-out accuracy per iteration for each society and method, with ± one standard error.")


def diversity_plot(series: Sequence[Series]) -> Plot | None:
    metrics = sorted({s.key for s in series}, key=lambda m: (m not in METRIC_LABELS, m))
    if not metrics:
        return None
    fig, axes = _figure(len(metrics), height=3.0)
    extra: dict[str, str] = {}
    tasks = {s.task for s in series}
    for ax, metric in zip(axes, metrics, strict=True):
        for s in (s for s in series if s.key == metric):
            label = society_name(s.society) + (f" · {s.task}" if len(tasks) > 1 else "")
            ax.plot([p.iteration for p in s.points], [p.value for p in s.points],
                    color=_color(s.society, SOCIETY_COLORS, extra), marker=SOCIETY_MARKERS.get(s.society, "o"),
                    linestyle=SOCIETY_LINES.get(s.society, "none" if s.society == "base" else "-"),
                    linewidth=1.6, markersize=5, label=_plain(label))
        _integer_iterations(ax, [p.iteration for s in series if s.key == metric for p in s.points])
        ax.set_title(_plain(METRIC_LABELS.get(metric, metric)), fontsize=10)
        ax.set_ylabel(_plain(metric.replace("_", " ")))
    _legend(fig, axes)
    return _render(fig, "diversity", "Diversity per iteration",
                   "Diversity of each society's agents per iteration, one panel per metric.")


def cost_plot(usage: Sequence[UsageRow]) -> Plot | None:
    if sum(r.cost_usd for r in usage) <= 0:
        return None
    fig, axes = _figure(2, height=3.2)
    _stacked(axes[0], usage, "stage", "cost by iteration and stage")
    _stacked(axes[1], usage, "role", "cost by iteration and role")
    axes[0].set_ylabel("US dollars")
    return _render(fig, "cost", "Cost per iteration",
                   "Dollars spent per iteration, stacked by stage and by role.")


def _stacked(ax: Axes, usage: Sequence[UsageRow], key: str, title: str) -> None:
    """One bar per iteration ("—": lines with no iteration), stacked by `key`; each part labelled in the legend."""
    iterations = sorted({r.iteration for r in usage}, key=lambda i: (i is None, i or 0))
    parts = sorted({str(getattr(r, key) or "—") for r in usage})
    totals: dict[tuple[Any, str], float] = defaultdict(float)
    for r in usage:
        totals[(r.iteration, str(getattr(r, key) or "—"))] += r.cost_usd
    xs = list(range(len(iterations)))
    bottom = [0.0] * len(xs)
    palette = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")
    for i, part in enumerate(parts):
        heights = [totals[(it, part)] for it in iterations]
        ax.bar(xs, heights, bottom=bottom, color=palette[i % len(palette)], label=_plain(part), width=0.6)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(xs, ["—" if it is None else str(it) for it in iterations])
    ax.set_xlabel("iteration")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)  # beside the bars, never over one


def _render(fig: Figure, name: str, title: str, alt: str) -> Plot:
    svg_buffer, png_buffer = io.StringIO(), io.BytesIO()
    fig.savefig(svg_buffer, format="svg", metadata={"Date": None})
    fig.savefig(png_buffer, format="png", dpi=110)
    return Plot(name=name, title=title, alt=alt, svg=_scoped_svg(svg_buffer.getvalue(), name),
                png=png_buffer.getvalue())


def _scoped_svg(svg: str, prefix: str) -> str:
    """Inline SVGs share one id space in a page: prefix every id (and reference) with the plot's name, drop the
    XML prologue and the metadata block (the text already falls back to any sans-serif font the reader has)."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r'(xlink:href|href)="#([^"]+)"', rf'\1="#{prefix}-\2"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", svg)
    return svg


# sample debates --------------------------------------------------------------------------------------------


@dataclass
class Turn:
    round: int
    text: str
    answer: str | None
    correct: bool | None  # None: grading was not possible
    summary: str | None = None  # what this agent's critic was shown before answering this round
    cut: bool = False  # the reply stopped at max_tokens: it counts as no answer

    @property
    def long(self) -> bool:
        return _is_long(self.text)

    @property
    def preview(self) -> str:
        return _preview(self.text)


@dataclass
class AgentView:
    agent: int  # 1-based
    turns: list[Turn]
    corrected: bool = False


@dataclass
class Sample:
    kind: str  # disagreement | correction
    reason: str
    debate: str
    society: str
    problem_id: str
    question: str
    truth: str
    final: str | None
    final_correct: bool | None
    votes: list[str | None]
    consensus: float
    agents: list[AgentView]

    @property
    def long_question(self) -> bool:
        return _is_long(self.question)


def _is_long(text: str) -> bool:
    return len(text) > LONG_TEXT_CHARS or text.count("\n") > 4


def _preview(text: str, limit: int = 110) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


Grader = Callable[[str | None, str], bool | None]


def _exact(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def make_grader(task_spec: str) -> tuple[Grader, Callable[[str, str], bool]]:
    """The task's own grader when the task still loads (a user .jsonl may be gone), else exact match."""
    try:
        from orchestrator.tasks import Problem, get_task

        task = get_task(task_spec)
    except Exception:  # any failure just means a plainer grader
        return (lambda a, truth: None if a is None else a.strip() == truth.strip()), _exact

    def grade(answer: str | None, truth: str) -> bool | None:
        return task.is_correct(answer, Problem(id="-", question="", answer=truth))

    return grade, task.equivalent


def eval_debate_names(store: Store, run_id: str) -> list[str]:
    """Evaluation debates, latest iteration first (the finetuned society is what a reader came to see), then
    multiagent FT before other societies."""
    rows = store.db.execute("select distinct debate from debates where run_id = ?", [run_id]).fetchall()
    parsed = {r[0]: p for r in rows if (p := parse_eval_debate(r[0])) is not None}
    return sorted(parsed, key=lambda n: (-parsed[n][1], parsed[n][0] != "maft", n))


def debate_society(name: str) -> str:
    parsed = parse_eval_debate(name)
    if parsed is None:
        return name
    society, iteration = parsed
    return "base society" if society == "base" else f"{society_name(society)}, iteration {iteration}"


def pick_samples(store: Store, run_id: str, names: Sequence[str], debates: dict[str, list[DebateRow]],
                 task_spec: str) -> list[Sample]:
    """Up to a few problems where a critic corrected itself, then a few where the agents disagreed in round 1;
    each problem once (the same question in two debates would teach the reader nothing new)."""
    grade, same = make_grader(task_spec)
    problems = {p.problem_id: p for p in store.get_problems(run_id, "eval")}
    order = {pid: p.position for pid, p in problems.items()}
    corrections: list[Sample] = []
    disagreements: list[Sample] = []
    shown: set[str] = set()
    for name in names:
        if len(corrections) >= SAMPLES_PER_KIND and len(disagreements) >= SAMPLES_PER_KIND:
            break
        responses = _index_responses(store.get_responses(run_id, name).values())
        for row in sorted(debates.get(name, []), key=lambda d: order.get(d.problem_id, 1 << 30)):
            problem = problems.get(row.problem_id)
            if problem is None or row.problem_id not in responses or row.problem_id in shown:
                continue
            sample = _sample(name, row, problem, responses[row.problem_id], grade, same)
            kept = {"correction": corrections, "disagreement": disagreements}.get(sample.kind)
            if kept is not None and len(kept) < SAMPLES_PER_KIND:
                kept.append(sample)
                shown.add(row.problem_id)
    return corrections + disagreements


def _index_responses(rows: Iterable[ResponseRow]) -> dict[str, dict[tuple[int, int, str], ResponseRow]]:
    out: dict[str, dict[tuple[int, int, str], ResponseRow]] = defaultdict(dict)
    for r in rows:
        out[r.problem_id][(r.round, r.agent, r.kind)] = r
    return out


def _sample(name: str, row: DebateRow, problem: ProblemRow, responses: dict[tuple[int, int, str], ResponseRow],
            grade: Grader, same: Callable[[str, str], bool]) -> Sample:
    agents_n = 1 + max(a for _, a, _ in responses)
    last = max(r for r, _, _ in responses)
    agents = [_agent_view(n, last, responses, problem.answer, grade) for n in range(agents_n)]
    first = [a.turns[0].answer if a.turns else None for a in agents]
    disagreed = any(a is None for a in first) or any(not same(first[0] or "", a or "") for a in first[1:])
    corrected = [a.agent for a in agents if a.corrected]
    if corrected:
        kind, reason = "correction", _correction_reason(corrected)
    elif disagreed:
        kind, reason = "disagreement", "the agents disagreed in round 1"
    else:
        kind, reason = "agreement", "the agents agreed"
    return Sample(kind=kind, reason=reason, debate=name, society=debate_society(name), problem_id=problem.problem_id,
                  question=problem.question, truth=problem.answer, final=row.final_answer,
                  final_correct=None if row.correct is None else bool(row.correct), votes=_votes(row.votes),
                  consensus=row.consensus, agents=agents)


def _correction_reason(agents: Sequence[int]) -> str:
    who = ", ".join(str(a) for a in agents)
    plural = "s" if len(agents) > 1 else ""
    return f"agent{plural} {who}: wrong or unreadable in round 1, right at the end"


def _agent_view(agent: int, last: int, responses: dict[tuple[int, int, str], ResponseRow], truth: str,
                grade: Grader) -> AgentView:
    turns = []
    for rnd in range(1, last + 1):
        answer = responses.get((rnd, agent, "answer"))
        if answer is None:
            continue
        summary = responses.get((rnd, agent, "summary"))
        readable = readable_answer(answer)
        turns.append(Turn(round=rnd, text=answer.text, answer=readable, correct=grade(readable, truth),
                          summary=summary.text if summary else None, cut=truncated(answer)))
    corrected = len(turns) > 1 and turns[0].correct is False and turns[-1].correct is True
    return AgentView(agent=agent + 1, turns=turns, corrected=corrected)


def _votes(text: str) -> list[str | None]:
    try:
        votes = json.loads(text)
    except ValueError:
        return []
    return [None if v is None else str(v) for v in votes] if isinstance(votes, list) else []


# the report as a whole -------------------------------------------------------------------------------------


@dataclass
class Headline:
    label: str
    value: str
    detail: str


@dataclass
class Report:
    run: RunInfo
    generated: str
    config: list[tuple[str, str]]
    datasets: list[DatasetLine]
    comparison: Comparison
    accuracy: NumbersTable
    diversity: NumbersTable
    diversity_note: str
    cost: CostView
    samples: list[Sample]
    headlines: list[Headline]
    summary: list[str]
    plots: dict[str, Plot] = field(default_factory=dict)
    plot_notes: dict[str, str] = field(default_factory=dict)


def build_report(store: Store, run_id: str, iteration: int | None = None) -> Report:
    """Everything the two files show, computed once, so HTML and Markdown cannot disagree on a number."""
    run = store.require_run(run_id)
    config = json.loads(run.config)
    info = run_info(run, config)
    evals = store.get_evaluations(run_id)
    main_task = _main_task(run.task, evals)
    comparison = build_comparison(evals, main_task, iteration)
    names = eval_debate_names(store, run_id)
    debates = {name: store.get_debates(run_id, name) for name in names}
    acc_groups = accuracy_groups(evals)
    div_groups, div_note = diversity_groups(store.get_diversity(run_id), debates)
    acc, div = line_series(acc_groups), line_series(div_groups)
    usage = store.get_usage(run_id)
    cost = cost_view(usage, run.backend)
    report = Report(
        run=info, generated=_when(time.time()), config=config_items(config),
        datasets=dataset_lines(store.get_datasets(run_id), store.get_jobs(run_id)), comparison=comparison,
        accuracy=numbers_table(table_series(acc_groups), lambda p: f"{p.value:.1f} ± {p.stderr:.1f}",
                               with_task=len({s.task for s in acc}) > 1),
        diversity=numbers_table(table_series(div_groups), lambda p: f"{p.value:.3f}",
                                with_task=len({s.task for s in div}) > 1),
        diversity_note=div_note, cost=cost, samples=pick_samples(store, run_id, names, debates, run.task),
        headlines=[], summary=[],
    )
    consensus = consensus_change(div, main_task)
    report.headlines = headlines(comparison, consensus, cost)
    report.summary = summary_lines(info, comparison, consensus, cost)
    _add_plots(report, acc, div, usage, comparison)
    return report


def _main_task(spec: str, evals: Sequence[EvaluationRow]) -> str:
    """The task the run trained on, as evaluations name it (`math` is stored as its normalised name)."""
    names = {e.task for e in evals}
    if spec in names or not names:
        return spec
    try:
        from orchestrator.tasks import get_task

        name = get_task(spec).name
    except Exception:  # a user task file that is gone: use the base society's task
        name = spec
    if name in names:
        return name
    base = sorted(e.task for e in evals if e.society == "base")
    return base[0] if base else sorted(names)[0]


def _add_plots(report: Report, acc: Sequence[Series], div: Sequence[Series], usage: Sequence[UsageRow],
               comparison: Comparison) -> None:
    with matplotlib.rc_context(PLOT_RC):  # our style for these figures only, whatever the user's matplotlibrc
        made = {
            "accuracy": accuracy_plot(acc, comparison.tasks, comparison.main_task),
            "diversity": diversity_plot(div),
            "cost": cost_plot(usage),
        }
    missing = {
        "accuracy": "No evaluations are stored for this run yet.",
        "diversity": "No diversity metrics and no evaluation debates are stored for this run yet.",
        "cost": report.cost.note or "Nothing was billed.",
    }
    for name, plot in made.items():
        if plot is None:
            report.plot_notes[name] = missing[name]
        else:
            report.plots[name] = plot


def _best_cell(comparison: Comparison) -> tuple[ComparisonRow, Cell] | None:
    task = comparison.main_task
    found = [(r, r.cells[task]) for r in comparison.rows if task in r.cells]
    return max(found, key=lambda rc: rc[1].accuracy) if found else None


def _base_cell(comparison: Comparison, method: str) -> Cell | None:
    task = comparison.main_task or ""
    return next((r.cells[task] for r in comparison.rows
                 if r.society == "base" and r.method == method and task in r.cells), None)


def _row_name(row: ComparisonRow) -> str:
    suffix = f", iteration {row.iteration}" if row.society != "base" else ""
    return f"{row.society_label}{suffix} · {row.method_label}"


def headlines(comparison: Comparison, consensus: tuple[float, float, Series] | None, cost: CostView) -> list[Headline]:
    """The cards at the top of the HTML report: the numbers a reader looks for first."""
    out = []
    best = _best_cell(comparison)
    if best:
        row, cell = best
        out.append(Headline("best on " + (comparison.main_task or "its task"), f"{cell.text} %", _row_name(row)))
    base = _base_cell(comparison, "single")
    if base:
        out.append(Headline("base model, single agent", f"{base.text} %", base.detail))
    if consensus:
        start, end, series = consensus
        out.append(Headline("consensus", f"{start:.2f} → {end:.2f}",
                            f"base → {society_name(series.society)}, iteration {series.points[-1].iteration}"))
    out.append(Headline("cost", usd(cost.total),
                        f"{cost.calls:,} ledger lines · {cost.tokens:,} tokens"
                        + (f" · {usd(cost.estimated)} estimated" if cost.estimated else "")))
    return out


def summary_lines(info: RunInfo, comparison: Comparison, consensus: tuple[float, float, Series] | None,
                  cost: CostView) -> list[str]:
    """3-6 lines for the terminal: what ran, the best result against the base model, consensus, cost."""
    lines = [f"run {info.id}: {info.status}, {info.iterations_done}/{info.iterations} iteration(s) · {info.task} · "
             f"{info.backend} {info.model} · {info.agents} agents × {info.rounds} rounds"]
    best = _best_cell(comparison)
    if best is None:
        lines.append("no evaluations stored yet")
    else:
        row, cell = best
        line = f"best on {comparison.main_task}: {_row_name(row)} {cell.text} % (n={cell.n})"
        base = _base_cell(comparison, "single")
        if base is not None:
            delta = 100 * (cell.accuracy - base.accuracy)
            line += f" vs base single agent {base.text} % ({delta:+.1f} points)"
        lines.append(line)
    if consensus:
        start, end, series = consensus
        lines.append(f"consensus: {start:.2f} → {end:.2f} (base → {society_name(series.society)}, "
                     f"iteration {series.points[-1].iteration})")
    if cost.total > 0:
        lines.append(f"cost: {usd(cost.total)}" + (f" ({usd(cost.estimated)} of it estimated)" if cost.estimated
                                                   else ""))
    else:
        lines.append(f"cost: nothing billed ({info.backend} backend; {cost.tokens:,} tokens in the ledger)")
    return lines


# writing ---------------------------------------------------------------------------------------------------


def write_report(store: Store, run_id: str, out_dir: Path, *, iteration: int | None = None) -> ReportFiles:
    """Write `<run>.html` (self-contained), `<run>.md` and its PNG plots into `out_dir`; read the store only.

    `iteration` shows finetuned societies at that iteration in the comparison table instead of their last."""
    report = build_report(store, run_id, iteration)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _slug(run_id)
    plots = []
    for plot in report.plots.values():
        path = out_dir / f"{stem}-{plot.name}.png"
        path.write_bytes(plot.png)
        plots.append(path)
    html_path = out_dir / f"{stem}.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(render_markdown(report, {p.stem.removeprefix(f"{stem}-"): p.name for p in plots}),
                       encoding="utf-8")
    return ReportFiles(html=html_path, markdown=md_path, plots=plots, summary=report.summary)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["mark"] = _mark
    return env


def _mark(correct: bool | None) -> str:
    return {True: "✓", False: "✗"}.get(correct, "") if correct is not None else ""


def render_html(report: Report) -> str:
    """The HTML page. Only our own SVG is marked safe; every other value goes through autoescape."""
    svgs = {name: Markup(plot.svg) for name, plot in report.plots.items()}  # generated by matplotlib, not by a model
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    return _environment().get_template("report.html.j2").render(r=report, svgs=svgs, css=Markup(css), usd=usd)


# Markdown --------------------------------------------------------------------------------------------------

# Characters that would start emphasis, code, links, tables, strikethrough or math on GitHub; `<>&` are HTML-escaped.
_MD_SPECIAL = str.maketrans({c: f"&#{ord(c)};" for c in "\\`*_[]|~$"})


def md_inline(text: str | None) -> str:
    """Untrusted text in running Markdown: HTML-escaped, every Markdown character an entity, one line."""
    if text is None:
        return "—"
    return html.escape(" ".join(text.split()), quote=True).translate(_MD_SPECIAL)


def md_code(text: str) -> str:
    """Untrusted text as a fenced block: longer fences than any backtick run inside, so it cannot break out."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    right = right or [False] * len(headers)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: Report, plot_files: dict[str, str]) -> str:
    parts = [_md_header(report), _md_comparison(report.comparison), _md_accuracy(report, plot_files),
             _md_diversity(report, plot_files), _md_datasets(report), _md_cost(report, plot_files),
             _md_samples(report), _md_config(report)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _md_header(report: Report) -> str:
    r = report.run
    lines = [f"# MAFT report · {md_inline(r.id)}", "",
             f"{md_inline(r.status)} · {r.iterations_done}/{r.iterations} iteration(s) · task {md_inline(r.task)} · "
             f"{md_inline(r.backend)} {md_inline(r.model)} · {r.agents} agents × {r.rounds} rounds · "
             f"created {r.created} · updated {r.updated} · report generated {report.generated}"]
    if r.error:
        lines += ["", f"**Error:** {md_inline(r.error)}"]
    lines += [""] + [f"- {md_inline(line)}" for line in report.summary]
    return "\n".join(lines)


def _md_cell(cell: Cell | None) -> str:
    if cell is None:
        return "—"
    value = f"**{cell.text}**" if cell.best else cell.text
    note = f"it. {cell.iteration}* · " if cell.other_iteration else ""
    return f"{value}<br><sub>{note}{cell.graded} · {cell.unanswered}</sub>"


def _md_comparison(c: Comparison) -> str:
    if not c.rows:
        return "## Comparison\n\nNo evaluations are stored for this run yet."
    headers = ["society", "method"] + [md_inline(t) + (" (zero-shot transfer)" if c.transfer(t) else "")
                                       for t in c.tasks]
    rows = [[md_inline(r.society_label + (f", {r.iteration_label}" if r.iteration_label else "")),
             md_inline(r.method_label)] + [_md_cell(r.cells.get(t)) for t in c.tasks] for r in c.rows]
    notes = "\n".join(f"- {md_inline(n)}" for n in c.notes)
    return (f"## Comparison (held-out accuracy, %)\n\n{md_table(headers, rows, [False, False] + [True] * len(c.tasks))}"
            f"\n\n{notes}")


def _md_numbers(table: NumbersTable) -> str:
    headers = [""] + [f"it. {i}" for i in table.iterations]
    return md_table(headers, ([md_inline(label)] + values for label, values in table.rows),
                    [False] + [True] * len(table.iterations))


def _md_plot(name: str, title: str, plot_files: dict[str, str]) -> str:
    return f"![{title}]({plot_files[name]})" if name in plot_files else ""


def _md_accuracy(report: Report, plot_files: dict[str, str]) -> str:
    if not report.accuracy.rows:
        return ""
    return "\n\n".join(p for p in ["## Accuracy per iteration", _md_plot("accuracy", "accuracy per iteration",
                                                                         plot_files),
                                   _md_numbers(report.accuracy)] if p)


def _md_diversity(report: Report, plot_files: dict[str, str]) -> str:
    if not report.diversity.rows:
        return "## Diversity\n\n" + md_inline(report.plot_notes.get("diversity", ""))
    parts = ["## Diversity", _md_plot("diversity", "diversity per iteration", plot_files),
             md_inline(report.diversity_note), _md_numbers(report.diversity)]
    return "\n\n".join(p for p in parts if p)


def _md_datasets(report: Report) -> str:
    if not report.datasets:
        return "## Finetuning data\n\nNo finetuning sets are stored for this run yet."
    headers = ["society", "iteration", "agent", "role", "examples", "D^C− used/avail.", "D^C+ used/avail.",
               "too long", "job", "loss", "sha256"]
    rows = ([md_inline(d.society), str(d.iteration), str(d.agent), d.role, str(d.examples), d.critic_neg,
             d.critic_pos, str(d.too_long), md_inline(d.job), d.loss, f"`{d.sha}`"] for d in report.datasets)
    return ("## Finetuning data per agent and role\n\n"
            + md_table(headers, rows, [False, True, True, False, True, True, True, True, False, True, False])
            + "\n\nCritic sets mix D^C− (wrong or unreadable in round 1, then agreeing with the majority) and D^C+ "
              "(agreeing throughout): used/available. Too long: examples dropped as longer than the trainer's "
              "max_length, which would have cut the answer they teach.")


def _md_cost(report: Report, plot_files: dict[str, str]) -> str:
    c = report.cost
    lines = ["## Cost", "", f"Total **{usd(c.total)}**" + (f" ({usd(c.estimated)} estimated)" if c.estimated else "")
             + f" · {c.calls:,} ledger lines · {c.tokens:,} tokens"]
    if c.note:
        lines += ["", md_inline(c.note)]
    if plot := _md_plot("cost", "cost per iteration", plot_files):
        lines += ["", plot]
    if c.by_stage:
        rows = ([md_inline(str(s["stage"])), f"{s['calls']:,}", f"{s['prompt_tokens']:,}",
                 f"{s['completion_tokens']:,}", f"{s['trained_tokens']:,}", usd(s["cost_usd"])] for s in c.by_stage)
        lines += ["", md_table(["stage", "calls", "prompt tokens", "completion tokens", "trained tokens", "cost"], rows,
                               [False, True, True, True, True, True])]
    if c.sources:
        lines += ["", "Prices: " + "; ".join(md_inline(s) for s in c.sources)]
    return "\n".join(lines)


def _md_samples(report: Report) -> str:
    if not report.samples:
        return "## Sample debates\n\nNo evaluation debate has a disagreement or a correction to show."
    return "## Sample debates\n\n" + "\n\n".join(_md_sample(s) for s in report.samples)


def _md_answer(answer: str | None, correct: bool | None) -> str:
    return f"{md_inline(answer) if answer is not None else 'unreadable'} {_mark(correct)}".strip()


def _md_sample(s: Sample) -> str:
    votes = ", ".join(md_inline(v) if v is not None else "unreadable" for v in s.votes)
    lines = [f"### {md_inline(s.reason)}", "",
             f"{md_inline(s.society)} (debate {md_inline(s.debate)}) · problem {md_inline(s.problem_id)}", "",
             "**Question**", "", md_code(s.question), "",
             f"Ground truth **{md_inline(s.truth)}** · final answer **{_md_answer(s.final, s.final_correct)}** · "
             f"votes: {votes} · consensus {s.consensus:.2f}"]
    for agent in s.agents:
        answers = " → ".join(f"round {t.round}: {_md_answer(t.answer, t.correct)}{' (cut at max_tokens)' * t.cut}"
                             for t in agent.turns)
        lines += ["", f"**Agent {agent.agent}**{' (corrected)' if agent.corrected else ''}: {answers}"]
        for t in agent.turns:
            if t.summary is not None:
                lines += ["", _md_details(f"summary agent {agent.agent}'s critic saw before round {t.round}",
                                          t.summary)]
            title = f"agent {agent.agent}, round {t.round}"
            lines += ["", _md_details(title, t.text) if t.long else f"*{title}:*\n\n{md_code(t.text)}"]
    return "\n".join(lines)


def _md_details(title: str, text: str) -> str:
    """Collapsed on GitHub; the blank lines let the code block inside render."""
    return f"<details><summary>{html.escape(title, quote=False)}</summary>\n\n{md_code(text)}\n\n</details>"


def _md_config(report: Report) -> str:
    rows = ([f"`{md_inline(k)}`", md_inline(v)] for k, v in report.config)
    return "## Configuration\n\n" + md_table(["setting", "value"], rows)
