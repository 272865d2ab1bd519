"""The run report: one self-contained HTML file and a Markdown twin, built from a real (scripted) run.

The run is a real two-iteration pipeline on the scripted backend, plus hand-made rows for what that run does
not produce yet (a STaR society, a zero-shot transfer task, diversity metrics, a billed ledger), so the
comparison table meets several societies and columns. One agent writes a <script> tag in every round-1 answer:
model output is untrusted and must reach the page only escaped.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from backends.base import ChatResult
from orchestrator.config import RunConfig
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.report.comparison import build_comparison
from orchestrator.report.labels import acc_text
from orchestrator.report.markdown import md_code, md_inline
from orchestrator.report.write import ReportFiles, write_report
from orchestrator.store import DiversityRow, EvaluationRow, RunRow, Store, UsageRow
from tests.fakes import ScriptedBackend

PAYLOAD = '<script>alert("pwned")</script>'
RUN = "report-demo"
CHROMIUM = Path("/usr/bin/chromium")


class PlantingBackend(ScriptedBackend):
    """Agent 1 ends each round-1 answer with a script tag (no digits: its parsed answer stays the same)."""

    def chat(self, requests, on_result=None):
        def plant(result: ChatResult) -> None:
            if "/r1/a0/answer" in result.key:
                result = result.model_copy(update={"text": f"{result.text} {PAYLOAD}"})
            if on_result:
                on_result(result)

        return super().chat(requests, on_result=plant)


def _evaluation(society: str, iteration: int, method: str, correct: int, n: int, task: str = "arithmetic:easy",
                unparseable: int = 0) -> EvaluationRow:
    p = correct / n
    return EvaluationRow(run_id=RUN, task=task, society=society, iteration=iteration, method=method, n=n,
                         correct=correct, accuracy=p, stderr=(p * (1 - p) / n) ** 0.5, unparseable=unparseable)


def add_hand_made_rows(store: Store) -> None:
    """A STaR society, a zero-shot transfer task, diversity metrics and a billed ledger."""
    for method, correct in (("single", 5), ("majority", 6), ("debate", 6)):
        store.save_evaluation(_evaluation("star", 1, method, correct, 10, unparseable=1))
    for society, iteration, method, correct in (("base", 0, "single", 21), ("base", 0, "debate", 26),
                                                ("maft", 1, "debate", 29), ("maft", 2, "debate", 31)):
        store.save_evaluation(_evaluation(society, iteration, method, correct, 50, task="gsm8k"))
    rows = []
    for metric, values in (("consensus", {0: 0.62, 1: 0.71, 2: 0.83}),
                           ("embedding_dissimilarity", {0: 0.41, 1: 0.37, 2: 0.33})):
        for iteration, value in values.items():
            detail = "1 - mean pairwise cosine of round-1 responses (all-MiniLM-L6-v2, first 256 tokens)" \
                if metric == "embedding_dissimilarity" else None
            rows.append(DiversityRow(run_id=RUN, task="arithmetic:easy", society="base" if iteration == 0 else "maft",
                                     iteration=iteration, metric=metric, value=value, n=10, detail=detail))
    store.save_diversity(rows)
    ledger = [("evaluation", 0, "generator", 0.012, 0), ("debate", 1, "generator", 0.031, 0),
              ("debate", 1, "summarizer", 0.008, 0), ("training", 1, "critic", 0.42, 0),
              ("training", 2, "generator", 0.38, 1), ("evaluation", 2, "critic", 0.015, 0)]
    store.record_usage([UsageRow(run_id=RUN, stage=stage, iteration=it, role=role, model="gpt-4.1-mini",
                                 ref=f"hand/{i}", billing="training" if stage == "training" else "standard",
                                 prompt_tokens=1000, completion_tokens=200, cost_usd=cost, estimated=est,
                                 price_source="prices.toml 2026-11")
                        for i, (stage, it, role, cost, est) in enumerate(ledger)])


def build_run(folder: Path) -> Store:
    """A finished two-iteration run (about a second on the scripted backend) with the hand-made rows added."""
    config = RunConfig(task="arithmetic:easy", agents=3, rounds=2, iterations=2, train_size=12, eval_size=10, seed=3)
    store = Store(folder / "maft.db")
    run = open_run(store, config, RUN, must_exist=False)
    Pipeline(config=config, run=run, store=store, backend=PlantingBackend(), workdir=folder / "work",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run()
    add_hand_made_rows(store)
    return store


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Store, ReportFiles]:
    folder = tmp_path_factory.mktemp("report")
    store = build_run(folder)
    files = write_report(store, RUN, folder / "out")
    yield store, files
    store.close()


def _cell(page: str, society: str, method: str, task: str) -> str:
    match = re.search(rf'<td class="num[^"]*"[^>]*data-society="{society}" data-method="{method}" '
                      rf'data-task="{re.escape(task)}"[^>]*>(.*?)</td>', page, re.S)
    assert match, f"no cell for {society} {method} {task}"
    return match.group(0)


def _shown(store: Store) -> list[EvaluationRow]:
    """The evaluations the table should show: each society at its last iteration."""
    evals = store.get_evaluations(RUN)
    last = {e.society: max(x.iteration for x in evals if x.society == e.society) for e in evals}
    return [e for e in evals if e.iteration == last[e.society]]


def test_comparison_table_has_every_society_method_and_task_with_its_numbers(built):
    store, files = built
    page = files.html.read_text()
    shown = _shown(store)
    assert {e.society for e in shown} == {"base", "maft", "star"}
    assert {e.task for e in shown} == {"arithmetic:easy", "gsm8k"}
    for e in shown:
        cell = _cell(page, e.society, e.method, e.task)
        assert acc_text(e.accuracy, e.stderr) in cell
        graded = e.answers or e.n  # the single agent grades all N round-1 answers per problem
        assert f"{e.correct}/{graded}" in cell and f"{e.unparseable} unanswered" in cell
        assert f'data-iteration="{e.iteration}"' in cell
    assert "zero-shot transfer" in page.split('id="comparison"')[1].split("</table>")[0]
    table = page.split('<table class="comparison">')[1].split("</table>")[0]
    assert table.index("STaR") < table.index("multiagent FT")  # the paper's order: baselines, then ours


def test_best_cell_of_each_column_is_bold(built):
    store, files = built
    page = files.html.read_text()
    for task in ("arithmetic:easy", "gsm8k"):
        column = [e for e in _shown(store) if e.task == task]
        top = max(e.accuracy for e in column)
        for e in column:
            cell = _cell(page, e.society, e.method, e.task)
            assert ("<strong>" in cell) == (e.accuracy == top), (e.society, e.method, task)


def test_sample_debates_show_questions_answers_and_summaries(built):
    store, files = built
    page = files.html.read_text()
    kinds = re.findall(r'<article class="debate" data-kind="(\w+)" data-problem="([^"]+)"', page)
    assert {k for k, _ in kinds} == {"correction", "disagreement"}
    questions = {p.problem_id: p.question for p in store.get_problems(RUN, "eval")}
    for _, problem_id in kinds:
        assert html.escape(questions[problem_id]) in page
    assert "summary its critic saw before round 2" in page and "summary: the others said" in page
    assert "ground truth" in page and "final answer" in page


def test_model_text_is_escaped(built):
    _, files = built
    page = files.html.read_text()
    assert PAYLOAD not in page
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in page
    assert len(re.findall(r"<script\b", page)) == 1  # only the report's own print helper


def test_the_diversity_plot_names_its_embedding_model_and_that_it_is_not_the_papers(built):
    _, files = built
    body = files.html.read_text().split('<section id="diversity">')[1].split("</section>")[0]
    assert "all-MiniLM-L6-v2 (texts truncated at 256 tokens), not the paper&#39;s T5-3B" in body
    assert "not comparable to the paper" in files.markdown.read_text()


def test_plots_are_inline_and_the_markdown_links_png_files(built):
    _, files = built
    page = files.html.read_text()
    for section in ("accuracy", "diversity", "cost"):
        body = page.split(f'<section id="{section}">')[1].split("</section>")[0]
        assert "<svg" in body, section
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing loaded from anywhere
    assert {p.name for p in files.plots} == {f"{RUN}-accuracy.png", f"{RUN}-diversity.png", f"{RUN}-cost.png"}
    markdown = files.markdown.read_text()
    for plot in files.plots:
        assert plot.read_bytes().startswith(b"\x89PNG") and f"]({plot.name})" in markdown


def test_markdown_has_the_same_numbers_and_keeps_model_text_in_code_blocks(built):
    store, files = built
    markdown = files.markdown.read_text()
    for e in _shown(store):
        assert acc_text(e.accuracy, e.stderr) in markdown
    assert "gsm8k (zero-shot transfer)" in markdown
    fence: str | None = None
    for line in markdown.splitlines():
        if fence is None and (opening := re.match(r"(`{3,})text$", line)):
            fence = opening.group(1)
        elif fence is not None and line == fence:
            fence = None
        elif fence is None:
            assert "<script" not in line, line
    assert PAYLOAD in markdown  # shown, verbatim, inside a code block


def test_summary_names_best_society_against_base_consensus_and_cost(built):
    _, files = built
    assert 3 <= len(files.summary) <= 6
    text = "\n".join(files.summary)
    assert "best on arithmetic:easy" in text and "vs base single agent" in text
    assert "consensus: 0.62 → 0.83" in text
    assert "cost: $0.8660 ($0.3800 of it estimated)" in text


def test_base_and_multiagent_only_with_nothing_billed(tmp_path):
    """The common run: no baselines, no ledger; and, as in runs from before diversity was measured, no diversity
    rows (consensus then comes from the debates)."""
    config = RunConfig(task="arithmetic:easy", agents=3, rounds=2, iterations=1, train_size=8, eval_size=6, seed=1)
    store = Store(tmp_path / "m.db")
    run = open_run(store, config, "plain", must_exist=False)
    Pipeline(config=config, run=run, store=store, backend=ScriptedBackend(), workdir=tmp_path / "work",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run()
    measured = {(d.society, d.iteration, d.metric) for d in store.get_diversity("plain")}
    assert {("base", 0, "consensus"), ("maft", 1, "consensus")} <= measured
    store.db.execute("delete from diversity")
    store.db.conn.commit()
    files = write_report(store, "plain", tmp_path / "out")
    page = files.html.read_text()
    assert {p.name for p in files.plots} == {"plain-accuracy.png", "plain-diversity.png"}
    assert "final-round consensus of each evaluation debate" in page
    assert "The cost ledger of this run is empty." in page
    consensus = [sum(d.consensus for d in store.get_debates("plain", name)) / 6 for name in ("eval-0", "eval-1")]
    assert f"consensus: {consensus[0]:.2f} → {consensus[1]:.2f}" in "\n".join(files.summary)
    assert files.summary[-1].startswith("cost: nothing billed")
    store.close()


def test_an_empty_run_still_reports(tmp_path):
    store = Store(tmp_path / "m.db")
    store.save_run(RunRow(id="empty <run>", config=RunConfig().model_dump_json(), backend="local",
                          model="SmolLM2-135M-Instruct", task="arithmetic:easy"))
    files = write_report(store, "empty <run>", tmp_path / "out")
    page = files.html.read_text()
    assert "No evaluations are stored for this run yet." in page and "empty &lt;run&gt;" in page
    assert "<svg" not in page and files.plots == []
    assert files.html.name == "empty-run.html"
    assert "no evaluations stored yet" in files.summary
    store.close()


def test_finetuned_societies_default_to_their_last_iteration_and_can_be_pinned():
    evals = [_evaluation("base", 0, "debate", 5, 10), _evaluation("maft", 1, "debate", 8, 10),
             _evaluation("maft", 2, "debate", 7, 10), _evaluation("maft", 1, "debate", 30, 50, task="gsm8k")]
    last = build_comparison(evals, "arithmetic:easy")
    maft = next(r for r in last.rows if r.society == "maft")
    assert maft.iteration == 2 and maft.cells["arithmetic:easy"].accuracy == 0.7
    assert maft.cells["gsm8k"].other_iteration and maft.cells["gsm8k"].iteration == 1
    assert any("another iteration" in n for n in last.notes)
    pinned = build_comparison(evals, "arithmetic:easy", iteration=1)
    cell = next(r for r in pinned.rows if r.society == "maft").cells["arithmetic:easy"]
    assert cell.accuracy == 0.8 and cell.best


def test_markdown_escaping_helpers():
    assert md_inline("a|b *c* <i>") == "a&#124;b &#42;c&#42; &lt;i&gt;"
    assert md_code("x ``` y").startswith("````text\n")


# headless Chromium ----------------------------------------------------------------------------------------


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120, check=False)


def test_report_renders_in_headless_chromium(built, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("MAFT_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"{CHROMIUM} is missing and MAFT_REQUIRE_CHROMIUM=1: run .ci/chromium-setup")
        pytest.skip(f"{CHROMIUM} is missing (install it with .ci/chromium-setup)")
    from PIL import Image

    store, files = built
    url = files.html.resolve().as_uri()
    png = tmp_path / "report.png"
    shot = _chromium(f"--screenshot={png}", "--window-size=1280,3000", url, profile=tmp_path / "profile-1")
    assert png.exists(), shot.stderr[-2000:]
    with Image.open(png) as image:
        assert image.size == (1280, 3000)
        rgb = image.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20) or []
        assert len(colors) > 50  # text, tables and plots, not a blank page
        white = sum(count for count, color in colors if min(color) >= 250)
        assert white < 0.97 * 1280 * 3000
    dom = _chromium("--dump-dom", url, profile=tmp_path / "profile-2")
    assert '<table class="comparison">' in dom.stdout, dom.stderr[-2000:]
    e = next(e for e in _shown(store) if e.society == "maft" and e.method == "debate")
    assert acc_text(e.accuracy, e.stderr) in dom.stdout
    assert PAYLOAD not in dom.stdout
