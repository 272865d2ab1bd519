"""`orchestrator report`'s files: one self-contained HTML page, its Markdown twin and the PNG plots it links.

Everything comes from the store, read-only, so a report can be rebuilt at any time, also while a run is still
going. The HTML file carries its CSS and its plots (inline SVG) inside it: it opens offline, survives being mailed,
and prints. Model output and questions are untrusted text: the HTML template escapes every value (Jinja2
autoescape, nothing marked safe but our own SVG), and the Markdown puts model text in code blocks and
entity-escapes everything it shows inline, so neither file can run or inject anything a model wrote.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from orchestrator.report.html import render_html
from orchestrator.report.markdown import render_markdown
from orchestrator.report.model import build_report
from orchestrator.store import Store


class ReportFiles(BaseModel):
    """What `write_report` wrote, and the lines worth printing in the terminal."""

    html: Path
    markdown: Path
    plots: list[Path] = []  # PNG files next to the Markdown file, which links them
    summary: list[str]


def _slug(text: str) -> str:
    """A file name from a run id (which `--name` lets users choose freely)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


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
