"""The report's Markdown twin of the HTML page, for GitHub and plain editors.

Model text and questions are untrusted: they go into fenced code blocks whose fence is longer than any backtick
run inside, and whatever is shown inline is HTML-escaped with every Markdown character as an entity.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence

from orchestrator.report.comparison import Cell, Comparison
from orchestrator.report.labels import mark, usd
from orchestrator.report.model import Report
from orchestrator.report.samples import Sample
from orchestrator.report.series import NumbersTable

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
    return f"{md_inline(answer) if answer is not None else 'unreadable'} {mark(correct)}".strip()


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
