"""The report, byte for byte: terminal output, HTML, Markdown and JSON of a fixed store against committed files.

What people see from `orchestrator report` (and `status`, `cost`, which share its tables) must not change by
accident, for instance when its code is reorganised. The store is `tests/golden_store.py`, written row by row with
fixed timestamps; the commands run in-process under a fixed clock (`time.time`), in UTC, at 140 columns, with
matplotlib's default settings, from a temporary folder given as relative paths, so nothing printed depends on
the machine, the date or where the test runs (a test asserts that no absolute path leaks into any file).

Plots are compared only where they can be: their SVG (inline in the HTML) and PNG bytes depend on the matplotlib
version and its font, recorded in `environment.json`. Elsewhere every inline SVG is compared as a placeholder
and the PNG hashes are skipped; everything else is always compared exactly.

After an intended change: `MAFT_UPDATE_GOLDEN=1 pytest tests/test_report_golden.py`, then read the diff.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pytest
from click.testing import CliRunner
from matplotlib import font_manager

from orchestrator.cli import cli
from tests.golden_store import EMPTY, NOW, RUN, build_store

GOLDEN = Path(__file__).parent / "golden" / "report"
UPDATE = os.environ.get("MAFT_UPDATE_GOLDEN") == "1"
COMMANDS = {  # golden file -> the command whose standard output it holds
    "report.txt": ["report", RUN, "--db", "maft.db", "--out", "out"],
    "report.json": ["report", RUN, "--db", "maft.db", "--json"],
    "report-iteration-1.txt": ["report", RUN, "--db", "maft.db", "--out", "out-iteration-1", "--iteration", "1"],
    "empty-run.txt": ["report", EMPTY, "--db", "maft.db", "--out", "out-empty"],
    "status.txt": ["status", "--db", "maft.db"],
    "status-run.txt": ["status", RUN, "--db", "maft.db"],
    "status-run.json": ["status", RUN, "--db", "maft.db", "--json"],
    "cost.txt": ["cost", RUN, "--db", "maft.db"],
}
FILES = {  # golden file -> the file the report wrote
    "report.html": "out/golden-run.html",
    "report.md": "out/golden-run.md",
    "report-iteration-1.md": "out-iteration-1/golden-run.md",
    "empty-run.html": "out-empty/empty-run.html",
    "empty-run.md": "out-empty/empty-run.md",
}
SVG = re.compile(r"<svg\b.*?</svg>", re.S)
# Environment variables that change how rich draws a table (width, colour, terminal detection).
RICH_VARIABLES = ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERM",
                  "COLORTERM", "JUPYTER_COLUMNS", "JUPYTER_LINES", "MAFT_DB", "MAFT_DEBUG")


def plot_environment() -> dict[str, str]:
    """What the plots' bytes depend on besides our code."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        font = font_manager.findfont(font_manager.FontProperties(family=matplotlib.rcParams["font.family"]))
    return {"matplotlib": matplotlib.__version__, "font": Path(font).name}


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], dict[str, str], Path]]:
    """Every golden output, made once: (texts by golden name, PNG sha256 by path, the folder)."""
    folder = tmp_path_factory.mktemp("golden")
    texts: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as mp, matplotlib.rc_context():
        matplotlib.rcdefaults()  # the user's matplotlibrc must not reach the plots
        mp.chdir(folder)
        mp.setattr(time, "time", lambda: NOW)
        for name in RICH_VARIABLES:
            mp.delenv(name, raising=False)
        mp.setenv("COLUMNS", "140")
        mp.setenv("TZ", "UTC")
        time.tzset()
        try:
            build_store(folder / "maft.db").close()
            for name, args in COMMANDS.items():
                result = CliRunner().invoke(cli, args, catch_exceptions=False)
                assert result.exit_code == 0, result.output
                texts[name] = result.stdout
        finally:
            mp.undo()
            time.tzset()
    for name, path in FILES.items():
        texts[name] = (folder / path).read_text(encoding="utf-8")
    pngs = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("out*/*.png"))}
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (GOLDEN / name).write_text(text, encoding="utf-8")
        (GOLDEN / "plots.json").write_text(json.dumps(pngs, indent=2) + "\n", encoding="utf-8")
        (GOLDEN / "environment.json").write_text(json.dumps(plot_environment(), indent=2) + "\n", encoding="utf-8")
    yield texts, pngs, folder


def _without_plots(text: str) -> str:
    return SVG.sub("<svg><!-- a plot: compared only in test_plots_are_byte_identical --></svg>", text)


def _same(name: str, got: str, want: str) -> None:
    if got == want:
        return
    diff = list(difflib.unified_diff(want.splitlines(), got.splitlines(), f"golden/{name}", "now", lineterm="", n=2))
    shown = "\n".join(diff[:80]) + (f"\n... {len(diff) - 80} more diff lines" if len(diff) > 80 else "")
    pytest.fail(f"{name} differs from its golden file (after an intended change: MAFT_UPDATE_GOLDEN=1):\n{shown}",
                pytrace=False)


@pytest.mark.parametrize("name", [*COMMANDS, *FILES])
def test_output_is_byte_identical_to_its_golden_file(produced, name):
    texts, _, _ = produced
    want = (GOLDEN / name).read_text(encoding="utf-8")
    _same(name, _without_plots(texts[name]), _without_plots(want))


def test_plots_are_byte_identical(produced):
    texts, pngs, _ = produced
    recorded = json.loads((GOLDEN / "environment.json").read_text(encoding="utf-8"))
    if recorded != plot_environment():
        pytest.skip(f"plots were recorded with {recorded}, this is {plot_environment()}: their bytes may differ")
    for name in FILES:
        _same(name, texts[name], (GOLDEN / name).read_text(encoding="utf-8"))
    assert pngs == json.loads((GOLDEN / "plots.json").read_text(encoding="utf-8"))


def test_the_fixed_store_reaches_every_part_of_the_report(produced):
    """Guards the fixture: a golden file is only as good as what it shows."""
    texts, pngs, folder = produced
    page, markdown = texts["report.html"], texts["report.md"]
    for section in ("accuracy", "diversity", "cost"):
        assert "<svg" in page.split(f'<section id="{section}">')[1].split("</section>")[0], section
    for society in ("STaR", "single-agent FT", "multiagent FT, no summary", "multiagent FT"):
        assert society in page.split('<table class="comparison">')[1], society
    assert "zero-shot transfer" in page and "(1 cut)" in page and "it. 2*" in texts["report-iteration-1.md"]
    kinds = re.findall(r'<article class="debate" data-kind="(\w+)"', page)
    assert kinds.count("correction") == 3 and kinds.count("disagreement") == 3
    assert "too long" in texts["report.txt"] and "&lt;script&gt;" in page and "````text" in markdown
    assert "failed" in page and "running (validating_files)" in texts["status-run.txt"]
    assert "earlier definition" in page and "all-MiniLM-L6-v2" in page
    assert len(pngs) == 6  # accuracy, diversity and cost plots, for the report and for --iteration 1
    for name, text in texts.items():
        assert str(folder) not in text and str(folder.resolve()) not in text, name
