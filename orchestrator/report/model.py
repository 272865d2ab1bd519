"""The report as data: everything its HTML page and Markdown file show, computed once from the store (read
only), so the two files cannot disagree on a number: the run and its configuration, the finetuning sets, the
comparison table, the series behind the plots, the cost, sample debates, headlines and the terminal summary."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

from orchestrator.costs import cost_summary
from orchestrator.distill import answering_costs
from orchestrator.report.comparison import Cell, Comparison, ComparisonRow, build_comparison
from orchestrator.report.flips import FlipLine, flip_lines
from orchestrator.report.labels import BACKEND_SECTIONS, acc_text, society_name, society_rank, usd, when_minutes
from orchestrator.report.plots import PLOT_RC, Plot, accuracy_plot, cost_plot, diversity_plot
from orchestrator.report.samples import Sample, eval_debate_names, pick_samples
from orchestrator.report.series import (
    NumbersTable,
    Series,
    accuracy_groups,
    consensus_change,
    diversity_groups,
    line_series,
    numbers_table,
    table_series,
    undefined_diversity,
)
from orchestrator.societies import BASE, MAFT
from orchestrator.store import DatasetRow, EvaluationRow, JobRow, RunRow, Store, UsageRow


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
                   created=when_minutes(run.created_at), updated=when_minutes(run.updated_at), error=run.error)


def config_items(config: dict[str, Any]) -> list[tuple[str, str]]:
    """The RunConfig as dotted keys. Read as plain JSON rather than RunConfig, so an old run whose config has keys
    this version lacks still reports; the settings sections of backends the run did not use are left out."""
    backend = config.get("backend")
    items: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            items.append((prefix.rstrip("."), _setting_text(value)))

    for key, value in config.items():
        if key in BACKEND_SECTIONS and key != backend and isinstance(value, dict):
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


@dataclass
class PairCells:
    """A set's DPO pairs as the tables show them: all of them, the critics' corrections and anti-sycophancy
    pairs (blank for a generator), and their summed vote-margin weight."""

    pairs: str
    correction: str
    anti_sycophancy: str
    weight: str


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
    pairs: PairCells | None = None  # a preference objective's pairs; None: this set has none recorded


def _pair_cells(d: DatasetRow) -> PairCells | None:
    if d.n_pairs is None:
        return None
    critic = d.role == "critic"
    return PairCells(pairs=str(d.n_pairs), correction=str(d.n_pairs_correction or 0) if critic else "",
                     anti_sycophancy=str(d.n_pairs_anti_sycophancy or 0) if critic else "",
                     weight=f"{d.pairs_weight or 0:.2f}")


def _society_of(row: DatasetRow | JobRow) -> str:
    """Rows written before societies were recorded per set belong to multiagent FT."""
    return str(getattr(row, "society", None) or MAFT)


def dataset_lines(datasets: Sequence[DatasetRow], jobs: Sequence[JobRow]) -> list[DatasetLine]:
    """Each agent's and role's set next to the job that trained on it (its latest attempt)."""
    latest: dict[tuple[str, int, int, str], JobRow] = {}
    for job in jobs:
        slot = (_society_of(job), job.iteration, job.agent, job.role)
        if slot not in latest or job.attempt >= latest[slot].attempt:
            latest[slot] = job
    lines = []
    for d in sorted(datasets, key=lambda d: (society_rank(_society_of(d)), d.iteration, d.agent, d.role)):
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
            sha=d.sha256[:12], pairs=_pair_cells(d),
        ))
    return lines


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


@dataclass
class AnsweringLine:
    """One way of answering the held-out problems beside what it costs per problem (`distill.answering_costs`)."""

    label: str
    iteration: int
    accuracy: str  # % ± s.e., as the comparison spells it
    generations: str
    tokens: str
    usd: str  # "—" where nothing was billed


def answering_lines(store: Store, run_id: str, task: str) -> list[AnsweringLine]:
    """The cost-per-problem table the terminal prints after a distill, for the files; empty without a student."""
    return [AnsweringLine(label=c.label, iteration=c.iteration, accuracy=acc_text(c.accuracy, c.stderr),
                          generations=f"{c.generations:.2f}", tokens=f"{c.tokens:,.0f}",
                          usd=f"${c.usd:.6f}" if c.usd else "—")
            for c in answering_costs(store, run_id, task)]


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
    answering: list[AnsweringLine] = field(default_factory=list)  # a run with a student: cost per held-out problem
    flips: list[FlipLine] = field(default_factory=list)  # per evaluation debate of 2+ rounds: wrong→right, right→wrong

    @property
    def has_pairs(self) -> bool:
        """A preference run: its dataset tables get the pair columns (blank on sets without pairs)."""
        return any(d.pairs is not None for d in self.datasets)


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
        run=info, generated=when_minutes(time.time()), config=config_items(config),
        datasets=dataset_lines(store.get_datasets(run_id), store.get_jobs(run_id)), comparison=comparison,
        accuracy=numbers_table(table_series(acc_groups), lambda p: f"{p.value:.1f} ± {p.stderr:.1f}",
                               with_task=len({s.task for s in acc}) > 1),
        diversity=undefined_diversity(numbers_table(table_series(div_groups), lambda p: f"{p.value:.3f}",
                                                    with_task=len({s.task for s in div}) > 1), evals),
        diversity_note=div_note, cost=cost, samples=pick_samples(store, run_id, names, debates, run.task),
        headlines=[], summary=[], answering=answering_lines(store, run_id, main_task),
        flips=flip_lines(store, run_id, names, run.task),
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
    base = sorted(e.task for e in evals if e.society == BASE)
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
                 if r.society == BASE and r.method == method and task in r.cells), None)


def _row_name(row: ComparisonRow) -> str:
    suffix = f", iteration {row.iteration}" if row.society != BASE else ""
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
