"""The terminal's tables, drawn with rich from the plain dicts of `orchestrator.report.data` (so a table and
`--json` cannot disagree): runs, a run's status, its jobs, accuracy and the paper's Table 1, the debates' flip
rates, finetuning data, the dry run's estimate and the cost ledger."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from orchestrator.report.data import EVENTS_SHOWN
from orchestrator.report.labels import (
    METHOD_LABELS,
    ONE_ANSWER,
    acc_text,
    answers_once,
    kept_row,
    pct,
    society_label,
    society_method,
    society_name,
    table_rank,
    usd,
)
from orchestrator.societies import BASE, MAFT


def runs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="runs")
    for col in ("run", "status", "task", "backend", "model", "iterations", "updated"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], r["status"], r["task"], r["backend"], r["model"],
                      f"{r['iterations_done']}/{r['iterations']}", r["updated_at"] or "")
    return table


def accuracy_table(evaluations: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("society")
    table.add_column("method")
    table.add_column("accuracy", justify="right")
    table.add_column("n", justify="right")
    table.add_column("no answer", justify="right")
    shown = [e for e in evaluations if kept_row(e["society"], e["method"])]  # a student's one answer, once
    for e in shown:
        table.add_row(society_label(e["society"], e["iteration"]), society_method(e["society"], e["method"]),
                      f"{acc_text(e['accuracy'], e['stderr'])} %", str(e["n"]), no_answer_text(e))
    notes = []
    if any(e.get("answers") for e in shown):
        notes.append("single agent: all N agents' round-1 answers (no answer: of them), s.e. over problems")
    if any(answers_once(e["society"]) for e in shown):
        notes.append(f"{ONE_ANSWER}: one agent, one round (single agent = majority = debate)")
    if any(e.get("truncated") for e in evaluations):
        notes.append("(k cut): k of the no-answers because a reply stopped at max_tokens")
    table.caption = "; ".join(notes) or None
    return table


def flips_table(flips: list[dict[str, Any]], title: str) -> Table:
    """Per evaluation debate of two rounds or more: how many agents' answers the debate corrected, and how many
    it talked out of a right one (a debate helps where the first is larger)."""
    table = Table(title=title, caption="answers: each agent's round 1 vs its final round, per held-out problem; "
                                       "unreadable or cut = not right")
    table.add_column("society")
    for col in ("answers", "wrong → right", "right → wrong"):
        table.add_column(col, justify="right")
    for f in flips:
        table.add_row(society_label(f["society"], f["iteration"]), str(f["answers"]),
                      f"{f['wrong_to_right']} ({pct(f['wrong_to_right_rate'])} %)",
                      f"{f['right_to_wrong']} ({pct(f['right_to_wrong_rate'])} %)")
    return table


def no_answer_text(e: dict[str, Any]) -> str:
    """How many got no answer, and how many of those because a reply was cut at max_tokens: "3 (2 cut)"; a row
    that grades several answers per problem (the single agent) says of how many: "5/72 (2 cut)"."""
    cut = e.get("truncated") or 0
    graded = f"{e['unparseable']}/{e['answers']}" if e.get("answers") else str(e["unparseable"])
    return f"{graded} ({cut} cut)" if cut else graded


def truncation_table(debates: list[dict[str, Any]]) -> Table:
    """Per debate: replies, and those cut at max_tokens (a cut answer neither votes nor trains)."""
    table = Table(title="replies cut at max_tokens, per debate")
    for col in ("debate", "answers", "answers cut", "summaries", "summaries cut"):
        table.add_column(col, justify="left" if col == "debate" else "right")
    for d in debates:
        table.add_row(d["debate"], str(d["answers"]), str(d["answers_cut"]), str(d["summaries"] or ""),
                      str(d["summaries_cut"]) if d["summaries"] else "")
    return table


def datasets_table(datasets: list[dict[str, Any]]) -> Table:
    table = Table(title="finetuning data per agent and role")
    societies = any(d.get("society", MAFT) != MAFT for d in datasets)  # baselines too: say whose data
    too_long = any(d.get("n_too_long") for d in datasets)  # a column only when something was dropped
    table.caption = ("critic sets mix D^C− (wrong, then corrected) and D^C+ (right throughout): used/available; "
                     + ("too long: dropped as longer than max_length, never trained on cut" if too_long else
                        "no example was longer than max_length"))
    pairs = any(d.get("n_pairs") is not None for d in datasets)  # a preference objective: its pairs per kind
    if pairs:
        table.caption += ("; pairs: DPO pairs (generator; critics: correction / anti-sycophancy), weight: their "
                          "summed vote margins")
    columns = ("society",) * societies + ("iteration", "agent", "role", "examples", "D^C−", "D^C+") + (
        "too long",) * too_long + ("pairs", "correction", "anti-syc.", "weight") * pairs + ("sha256",)
    for col in columns:
        table.add_column(col, justify="left" if col in ("society", "role", "sha256") else "right")
    for d in datasets:
        critic = d["role"] == "critic"
        table.add_row(
            *[society_name(d["society"])] * societies,
            str(d["iteration"]), str(d["agent"] + 1), d["role"], str(d["n_examples"]),
            f"{d['n_critic_neg']}/{d['n_critic_neg_available']}" if critic else "",
            f"{d['n_critic_pos']}/{d['n_critic_pos_available']}" if critic else "",
            *[str(d.get("n_too_long", 0))] * too_long,
            *(_pair_cells(d) if pairs else ()),
            d["sha256"][:12],
        )
    return table


def _pair_cells(d: dict[str, Any]) -> tuple[str, ...]:
    if d.get("n_pairs") is None:
        return ("",) * 4
    critic = d["role"] == "critic"
    return (str(d["n_pairs"]), str(d.get("n_pairs_correction") or 0) if critic else "",
            str(d.get("n_pairs_anti_sycophancy") or 0) if critic else "", f"{d.get('pairs_weight') or 0:.2f}")


def agents_table(agents: list[dict[str, Any]]) -> Table:
    table = Table(title="agents")
    for col in ("iteration", "agent", "role"):
        table.add_column(col)
    table.add_column("model id", overflow="fold")
    for a in agents:
        table.add_row(str(a["iteration"]), str(a["agent"] + 1), a["role"], a["model_id"])
    return table


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(title="finetuning jobs")
    for col in ("iteration", "agent", "role", "status", "elapsed", "loss", "tokens"):
        table.add_column(col, no_wrap=True)
    table.add_column(f"last {EVENTS_SHOWN} events", overflow="fold")
    for j in jobs:
        loss = f"{j['train_loss']:.3f}" if j["train_loss"] is not None else ""
        status = j["status"]
        if j.get("provider_status") and j["provider_status"] != status:
            status += f" ({j['provider_status']})"  # the provider's own word: validating_files, paused, ...
        lines = [f"error: {j['error']}"] if j["error"] else []
        lines += [e["message"] for e in j["events"][-EVENTS_SHOWN:]]
        table.add_row(str(j["iteration"]), str(j["agent"] + 1), j["role"], status, f"{j['elapsed_s']:.0f} s",
                      loss, str(j["trained_tokens"] or ""), "\n".join(lines))
    return table


def estimate_table(lines: list[Any], title: str) -> Table:
    """The dry run: per stage and iteration, tokens and dollars expected and at most."""
    table = Table(title=title, caption="expected: answers at half their max_tokens; at most: every answer at "
                                       "max_tokens and every example kept for training")
    for col in ("iter", "stage", "calls", "prompt", "completion", "trained", "expected", "at most"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for e in lines:
        table.add_row(str(e.iteration), e.stage, f"{e.calls:,}", _tokens(e.prompt_tokens),
                      _tokens(e.completion_tokens), _tokens(e.trained_tokens), usd(e.expected_usd),
                      usd(e.at_most_usd))
    table.add_section()
    table.add_row("", "total", f"{sum(e.calls for e in lines):,}", _tokens(sum(e.prompt_tokens for e in lines)),
                  _tokens(sum(e.completion_tokens for e in lines)), _tokens(sum(e.trained_tokens for e in lines)),
                  usd(sum(e.expected_usd for e in lines)), usd(sum(e.at_most_usd for e in lines)))
    return table


def _tokens(n: int) -> str:
    """Token counts at a glance: 939k, 1.63M."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.0f}k" if n >= 10_000 else f"{n:,}"


def cost_tables(summary: dict[str, Any], run_id: str) -> list[Table]:
    """`orchestrator cost`: one table per grouping, each adding up to the run's total."""
    tables = []
    for key, label in (("stage", "stage"), ("iteration", "iteration"), ("agent", "agent"), ("role", "role")):
        table = Table(title=f"cost of run {run_id} by {label}")
        for col in (label, "calls", "prompt tokens", "cached", "completion tokens", "trained tokens", "cost"):
            table.add_column(col, justify="left" if col == label else "right")
        for g in summary[f"by_{key}"]:
            value = g[key]
            shown = "—" if value is None else (str(value + 1) if key == "agent" else str(value))
            table.add_row(shown, f"{g['calls']:,}", f"{g['prompt_tokens']:,}", f"{g['cached_tokens']:,}",
                          f"{g['completion_tokens']:,}", f"{g['trained_tokens']:,}", f"${g['cost_usd']:.4f}")
        tables.append(table)
    training = summary.get("training") or {}
    if training.get("jobs"):
        table = Table(title=f"finetuning of run {run_id}: estimated before each job vs billed")
        for col in ("jobs", "estimated tokens", "estimated", "billed jobs", "billed tokens", "billed"):
            table.add_column(col, justify="right")
        table.add_row(f"{training['jobs']:,}", f"{training['estimated_tokens']:,}",
                      f"${training['estimated_usd']:.4f}", f"{training['billed_jobs']:,}",
                      f"{training['billed_tokens']:,}", f"${training['billed_usd']:.4f}")
        tables.append(table)
    return tables


def status_view(data: dict[str, Any]) -> Group:
    """One run's progress line, its agents and its jobs, as one renderable (also for `status --watch`)."""
    r, p = data["run"], data["progress"]
    line = Text.from_markup(
        f"run [bold]{r['id']}[/]: {r['status']}, {r['iterations_done']}/{data['config']['iterations']} iterations "
        f"done, {p['responses_stored']}/{p['responses_expected']} responses stored" + _students_text(p)
        + (f" · last error: {r['error']}" if r["error"] else "")
    )
    parts: list[Any] = [line, agents_table(data["agents"])]
    if data.get("debates"):
        parts.append(truncation_table(data["debates"]))
    if data["jobs"]:
        parts.append(jobs_table(data["jobs"]))
    return Group(*parts)


def _students_text(progress: dict[str, Any]) -> str:
    """The students' responses beside the society's, never in its count: "(+ 58/58 for the distilled student and
    the society soup)"."""
    students = progress.get("students")
    if not students:
        return ""
    names = [society_name(s) for s in students["societies"]]
    who = " and the ".join(names) if names else "the students"
    return f" (+ {students['stored']}/{students['expected']} for the {who})"


def comparison_rows(evaluations: list[dict[str, Any]]) -> tuple[list[str], list[tuple[str, dict[str, dict]]]]:
    """The paper's Table 1: the base model alone, by majority vote and by debate, then every finetuned society
    (at its last iteration) by debate, a student by its one answer; one column per task the run was evaluated on."""
    tasks = list(dict.fromkeys(e["task"] for e in evaluations))
    rows: list[tuple[str, dict[str, dict]]] = []
    for method in METHOD_LABELS:
        cells = {e["task"]: e for e in evaluations if e["society"] == BASE and e["method"] == method}
        if cells:
            rows.append((f"base · {METHOD_LABELS[method]}", cells))
    finetuned = [s for s in dict.fromkeys(e["society"] for e in evaluations) if s != BASE]
    for society in sorted(finetuned, key=table_rank):
        cells = {}
        for task in tasks:
            mine = [e for e in evaluations if e["society"] == society and e["task"] == task and e["method"] == "debate"]
            if mine:
                cells[task] = max(mine, key=lambda e: e["iteration"])
        label = society_name(society)
        last = max(c["iteration"] for c in cells.values())
        rows.append((f"{label} · {society_method(society, 'debate')}, iteration {last}", cells))
    return tasks, rows


def comparison_table(evaluations: list[dict[str, Any]], title: str) -> Table:
    tasks, rows = comparison_rows(evaluations)
    table = Table(title=title, caption="accuracy ± standard error on the held-out problems (n in each cell's task)")
    table.add_column("method")
    for task in tasks:
        table.add_column(task, justify="right")
    best = {t: max((c[t]["accuracy"] for _, c in rows if t in c), default=None) for t in tasks}
    for label, cells in rows:
        shown = []
        for task in tasks:
            cell = cells.get(task)
            if cell is None:
                shown.append("")
                continue
            text = acc_text(cell["accuracy"], cell["stderr"])
            shown.append(f"[bold]{text}[/]" if cell["accuracy"] == best[task] else text)
        table.add_row(label, *shown)
    return table
