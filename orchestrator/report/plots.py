"""The report's plots: matplotlib figures drawn without pyplot, kept as inline SVG (for the HTML page) and PNG
(for the Markdown file), with the same bytes for the same run."""

from __future__ import annotations

import io
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from orchestrator.report.labels import (
    METHOD_COLORS,
    METRIC_LABELS,
    SOCIETY_COLORS,
    SOCIETY_LINES,
    SOCIETY_MARKERS,
    method_rank,
    society_name,
)
from orchestrator.report.series import Series
from orchestrator.societies import BASE
from orchestrator.store import UsageRow

EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


PLOT_RC: dict[Any, Any] = {
    "svg.fonttype": "none",  # text stays text in the SVG: small, sharp, selectable, searchable
    "svg.hashsalt": "maft-report",  # stable ids, so the same run gives the same file
    "font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "legend.frameon": False,
}


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
    methods = sorted({s.key for s in series}, key=method_rank)
    for ax, task in zip(axes, tasks, strict=True):
        for s in (s for s in series if s.task == task):
            offset = (methods.index(s.key) - (len(methods) - 1) / 2) * 0.05  # error bars side by side
            ax.errorbar([p.iteration + offset for p in s.points], [p.value for p in s.points],
                        yerr=[p.stderr for p in s.points], color=_color(s.key, METHOD_COLORS, extra),
                        linestyle=SOCIETY_LINES.get(s.society, "none" if s.society == BASE else "-"),
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
                    linestyle=SOCIETY_LINES.get(s.society, "none" if s.society == BASE else "-"),
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
