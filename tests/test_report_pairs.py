"""The report files show a preference run's pair counts beside its datasets, as the terminal table does.

A run with objective dpo or sft-then-dpo records per set its DPO pairs (the critics' split into corrections and
anti-sycophancy pairs) and their summed vote-margin weight; the Markdown and HTML reports show those columns for
such a run only (a run without pairs keeps its table as it was: tests/test_report_golden.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.report.write import write_report
from orchestrator.store import Store
from tests.golden_store import RUN, build_store


def with_pairs(store: Store) -> None:
    """Pairs for the multiagent society's iteration-1 sets (a generator and a critic per agent)."""
    rows = [d for d in store.get_datasets(RUN, 1) if d.society == "maft"]
    assert rows
    store.save_datasets([d.model_copy(update={
        "n_pairs": 7 + i, "n_pairs_generator": 0 if d.role == "critic" else 7 + i,
        "n_pairs_correction": 4 if d.role == "critic" else 0,
        "n_pairs_anti_sycophancy": 3 + i if d.role == "critic" else 0, "pairs_weight": 2.5 + i})
        for i, d in enumerate(rows)])


def markdown_rows(text: str) -> list[list[str]]:
    section = text[text.index("## Finetuning data per agent and role"):]
    section = section[:section.index("\n\n", section.index("|"))]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]


def test_a_run_with_pairs_shows_them_in_the_markdown_and_html_reports(tmp_path: Path) -> None:
    store = build_store(tmp_path / "golden.db")
    with_pairs(store)
    datasets = {(d.society, d.iteration, d.agent, d.role): d for d in store.get_datasets(RUN)}
    files = write_report(store, RUN, tmp_path / "out")

    header, _, *rows = markdown_rows(files.markdown.read_text())
    assert header[8:12] == ["pairs", "correction", "anti-syc.", "weight"] and header[-1] == "sha256"
    seen = 0
    for row in rows:
        society = "maft" if row[0] == "multiagent FT" else row[0]
        d = datasets.get((society, int(row[1]), int(row[2]) - 1, row[3]))
        if d is None or d.n_pairs is None:
            assert row[8:12] == ["", "", "", ""], row
            continue
        seen += 1
        critic = d.role == "critic"
        assert row[8:12] == [str(d.n_pairs), str(d.n_pairs_correction) if critic else "",
                             str(d.n_pairs_anti_sycophancy) if critic else "", f"{d.pairs_weight:.2f}"], row
    assert seen == sum(d.n_pairs is not None for d in datasets.values()) == 6
    assert "Pairs: DPO pairs" in files.markdown.read_text()

    page = files.html.read_text()
    table = page[page.index('<section id="data">'):page.index("</section>", page.index('<section id="data">'))]
    assert '<th class="num">pairs</th><th class="num">correction</th><th class="num">anti-syc.</th>' in table
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr><td>.*?</tr>", table, re.S)]
    assert len(cells) == len(rows)
    for md, html in zip(rows, cells, strict=True):
        assert html[8:12] == md[8:12]  # the HTML table says what the Markdown one does
    assert "Pairs: DPO pairs" in table
    store.close()


def test_a_run_without_pairs_has_no_pair_columns(tmp_path: Path) -> None:
    store = build_store(tmp_path / "golden.db")
    files = write_report(store, RUN, tmp_path / "out")
    header = markdown_rows(files.markdown.read_text())[0]
    assert "pairs" not in header and "weight" not in header
    assert ">pairs<" not in files.html.read_text() and "Pairs: DPO pairs" not in files.html.read_text()
    store.close()
