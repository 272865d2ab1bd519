"""The report's Markdown twin of the HTML page, for GitHub and plain editors, from `templates/report.md.j2`.

Model text and questions are untrusted: they go into fenced code blocks whose fence is longer than any backtick
run inside, and whatever is shown inline is HTML-escaped with every Markdown character as an entity; the
template (without autoescape, as Markdown is not HTML) passes each such value through one of the two filters.
"""

from __future__ import annotations

import html
import re

import jinja2

from orchestrator.report.html import TEMPLATES
from orchestrator.report.labels import mark, usd
from orchestrator.report.model import Report

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


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(md=md_inline, code=md_code, mark=mark)
    return env


def render_markdown(report: Report, plot_files: dict[str, str]) -> str:
    """The Markdown file; `plot_files` names the PNG file of each plot, beside it."""
    return _environment().get_template("report.md.j2").render(r=report, plots=plot_files, usd=usd)
