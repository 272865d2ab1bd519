"""The debate's flip rates in the report files, the terminal and `--json` (issue 14): round-1 against final-round
answers, counted by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from orchestrator.config import RunConfig
from orchestrator.report.flips import flip_lines
from orchestrator.store import DebateRow, ProblemRow, ResponseRow, RunRow, Store

# (problem, truth): per agent, (round-1 answer, round-2 answer, round-2 cut at max_tokens)
DEBATE = {
    ("p1", "4"): [("4", "4", False), ("3", "4", False), ("4", "5", False)],  # a1 wrong->right, a2 right->wrong
    ("p2", "7"): [("1", "7", False), ("7", "7", False), ("7", "7", True)],  # a0 wrong->right; a2 cut: right->wrong
    ("p3", "2"): [(None, "2", False), ("2", "2", False), ("9", "9", False)],  # a0 unreadable->right
}


def _store(tmp_path) -> Store:
    store = Store(tmp_path / "m.db")
    store.save_run(RunRow(id="r", config=RunConfig().model_dump_json(), backend="local", model="m",
                          task="arithmetic:easy"))
    store.save_problems([ProblemRow(run_id="r", split="eval", position=i, problem_id=pid, question=pid, answer=truth)
                         for i, (pid, truth) in enumerate(DEBATE)])
    for (pid, _), agents in DEBATE.items():
        for agent, (first, final, cut) in enumerate(agents):
            for rnd, answer in ((1, first), (2, final)):
                text = "no idea" if answer is None else f"The answer is {answer}."
                store.save_response(ResponseRow(
                    key=f"{pid}/{agent}/{rnd}", run_id="r", debate="eval-1", problem_id=pid, round=rnd,
                    agent=agent, kind="answer", model_id="m", messages="[]", text=text, answer=answer,
                    finish_reason="length" if rnd == 2 and cut else "stop"))
    store.save_debates([DebateRow(run_id="r", debate="eval-1", problem_id=pid, final_answer=truth, correct=1,
                                  votes="[]", consensus=1.0) for pid, truth in DEBATE])
    # a student answers once: nothing to flip, no line
    store.save_response(ResponseRow(key="s", run_id="r", debate="distill/eval-1", problem_id="p1", round=1, agent=0,
                                    kind="answer", model_id="s", messages="[]", text="4", answer="4"))
    return store


def test_flip_rates_count_each_agent_s_round_1_answer_against_its_final_one(tmp_path):
    store = _store(tmp_path)
    (line,) = flip_lines(store, "r", ["eval-1", "distill/eval-1", "train-1"], "arithmetic:easy")
    assert (line.debate, line.iteration, line.answers) == ("eval-1", 1, 9)
    assert (line.wrong_to_right, line.right_to_wrong) == (3, 2)
    assert (line.wrong_to_right_pct, line.right_to_wrong_pct) == ("33.3", "22.2")


def test_the_report_files_show_the_flip_rates(tmp_path):
    from orchestrator.report.html import render_html
    from orchestrator.report.markdown import render_markdown
    from orchestrator.report.model import build_report

    report = build_report(_store(tmp_path), "r")
    assert [(f.society, f.answers) for f in report.flips] == [("multiagent FT, iteration 1", 9)]
    markdown = render_markdown(report, {})
    assert "## Flip rates" in markdown and "| multiagent FT, iteration 1 | 9 | 33.3 | 22.2 |" in markdown
    html = render_html(report)
    assert '<section id="flips">' in html and '<td class="num">33.3</td>' in html


def _report(db, *args: str) -> str:
    """`orchestrator report` as a user runs it: the console script's module in a fresh process, wide enough that
    rich wraps no row."""
    env = {**os.environ, "COLUMNS": "160"}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "report", "r", "--db", str(db), *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _with_base_debate(tmp_path) -> Store:
    """The built store plus a base-society debate `eval-0` in which every agent keeps its round-1 answer (no flips):
    a second row, which must come first, as the base society does in the accuracy table."""
    store = _store(tmp_path)
    for row in store.get_responses("r", "eval-1").values():
        keep = store.get_responses("r", "eval-1")[f"{row.problem_id}/{row.agent}/1"]
        store.save_response(row.model_copy(update={"key": f"base/{row.key}", "debate": "eval-0", "text": keep.text,
                                                   "answer": keep.answer, "finish_reason": "stop"}))
    store.save_debates([d.model_copy(update={"debate": "eval-0"}) for d in store.get_debates("r", "eval-1")])
    return store


def test_the_terminal_and_json_show_the_hand_counted_flip_rates(tmp_path):
    store = _with_base_debate(tmp_path)
    db = store.path
    store.close()
    data = json.loads(_report(db, "--json"))
    assert [(f["debate"], f["society"], f["iteration"], f["answers"], f["wrong_to_right"], f["right_to_wrong"])
            for f in data["flips"]] == [("eval-0", "base", 0, 9, 0, 0), ("eval-1", "maft", 1, 9, 3, 2)]
    assert (data["flips"][1]["wrong_to_right_rate"], data["flips"][1]["right_to_wrong_rate"]) == (3 / 9, 2 / 9)

    out = _report(db, "--out", str(tmp_path / "reports"))
    table = out.split("debate flip rates")[1]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.startswith("│")]
    assert rows == [["base", "9", "0 (0.0 %)", "0 (0.0 %)"],
                    ["multiagent FT, iteration 1", "9", "3 (33.3 %)", "2 (22.2 %)"]]
