"""`--baselines` beside the run's own objective (issue 14): the multiagent society trained by another objective
(maft-sft, maft-dpo, maft-sft-dpo) on its own debates, and the compute-matched majority vote (N x M round-1
samples per held-out problem) of every evaluated society, counted here from the stored responses."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from backends.base import BackendInfo, ChatMessage
from orchestrator.cli import parse_baselines
from orchestrator.config import RunConfig, baselines_problem
from orchestrator.debate import AgentTranscript, DebateOutcome
from orchestrator.evaluate import MATCHED_MAJORITY, matched_majority_row
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.societies import OBJECTIVES, PAPER_BASELINES, SOCIETIES
from orchestrator.store import ResponseRow, Store
from orchestrator.tasks import Problem, get_task
from orchestrator.voting import Vote, majority_vote
from tests.fakes import ScriptedBackend
from tests.test_cli import assert_one_line_error

TASK = get_task("arithmetic:easy")
SMALL = dict(task="arithmetic:easy", agents=3, rounds=2, train_size=12, eval_size=4, seed=3)


def _outcome(pid: str, truth: str, first: list[str | None]) -> DebateOutcome:
    problem = Problem(id=pid, question=pid.split("/")[1], answer=truth)
    agents = [AgentTranscript(messages=[ChatMessage(role="user", content="q"), ChatMessage(role="assistant",
                                                                                          content=f"{a}")],
                              answers=[a]) for a in first]
    return DebateOutcome(problem=problem, agents=agents, vote=Vote(final=None, support=0, voters=0, consensus=0.0))


def _row(answer: str | None, finish: str = "stop") -> ResponseRow:
    return ResponseRow(key="k", run_id="r", debate="eval-0", problem_id="p", round=1, agent=0, kind="matched1",
                       model_id="m", messages="[]", text=f"The answer is {answer}.", answer=answer,
                       finish_reason=finish)


def test_the_matched_vote_counts_every_sample_and_no_cut_one() -> None:
    outcomes = [
        _outcome("arithmetic:easy/2+3", "5", ["6", "6", "5"]),  # round 1 says 6; with three more 5s, 5 wins 4-2
        _outcome("arithmetic:easy/4+6", "10", ["10", "10", "11"]),  # 10 by 2-1; the extras say 11 x3: 11 wins 4-2
        _outcome("arithmetic:easy/7+8", "15", ["14", "15", None]),  # the extras' 15s are cut: 14 vs 15 tie at 1-1
    ]
    extra = [[_row("5"), _row("5"), _row("5")], [_row("11"), _row("11"), _row("11")],
             [_row("15", "length"), _row("15", "length"), _row(None)]]
    row = matched_majority_row("r", "base", 0, outcomes, extra, TASK, seed=7)
    tie = majority_vote(["14", "15", None, None, None, None], TASK.equivalent,
                        random.Random(f"7:{MATCHED_MAJORITY}:arithmetic:easy/7+8"))
    assert tie.tied
    assert row.method == MATCHED_MAJORITY and row.n == 3
    assert row.correct == 1 + (tie.final == "15")
    assert row.unparseable == 0 and row.truncated == 0


def test_the_registry_and_the_flags() -> None:
    assert {name: SOCIETIES[name].objective for name in OBJECTIVES} == {
        "maft-sft": "sft", "maft-dpo": "dpo", "maft-sft-dpo": "sft-then-dpo"}
    assert parse_baselines("all") == PAPER_BASELINES and not set(OBJECTIVES) & set(PAPER_BASELINES)
    assert parse_baselines("maft-dpo, majority-matched") == ("maft-dpo", MATCHED_MAJORITY)
    local = BackendInfo(name="local", base_model="m", objectives=("sft", "dpo", "sft-then-dpo"))
    openai = BackendInfo(name="openai", base_model="m", objectives=("sft", "sft-then-dpo"))
    assert baselines_problem(("maft-dpo", "star", MATCHED_MAJORITY), "sft", local) is None
    same = baselines_problem(("maft-sft",), "sft", local)
    assert same is not None and "as this run does already" in same and "maft-dpo, maft-sft-dpo" in same
    alone = baselines_problem(("maft-dpo",), "sft", openai)
    assert alone is not None and alone.startswith("baseline maft-dpo: ") and "openai" in alone


def _run(tmp_path: Path, backend: ScriptedBackend, baselines: tuple[str, ...], more: bool = False) -> Store:
    config = RunConfig.model_validate({**SMALL, "preference": {"extra_samples": 2}})
    store = Store(tmp_path / "m.db")
    try:
        run = open_run(store, config, "r", must_exist=more)
        pipeline = Pipeline(config=config, run=run, store=store, backend=backend, workdir=tmp_path / "work",
                            console=Console(quiet=True), show_progress=False, poll_interval=0)
        pipeline.run_more(baselines) if more else pipeline.run(baselines)
    finally:
        store.close()
    return Store(tmp_path / "m.db")


def test_a_dpo_variant_and_the_matched_vote_beside_an_sft_run(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    store = _run(tmp_path, backend, ("maft-dpo", MATCHED_MAJORITY))
    # the run's society trains by SFT; the variant by DPO on pair files from its own training debate
    by_key = {s.key: s for s in backend.specs}
    maft = [s for k, s in by_key.items() if k.startswith("r/iteration-1/")]
    dpo = [s for k, s in by_key.items() if k.startswith("r/maft-dpo/iteration-1/")]
    assert maft and all(s.objective == "sft" and s.preference_file is None for s in maft)
    assert dpo and all(s.objective == "dpo" and s.preference_file is not None for s in dpo)
    assert all("maft-dpo" in str(s.preference_file) for s in dpo)
    assert any("/maft-dpo/train-1/" in r.key and "/extra" in r.key for r in backend.requests)
    assert not any("/train-1/" in r.key and "/extra" in r.key and "/maft-dpo/" not in r.key
                   for r in backend.requests)  # the SFT society asks no extra samples
    # its first training debate is the base society's, answered from the store
    assert not any(r.key.startswith("r/maft-dpo/train-1/") and r.key.endswith("/answer") for r in backend.requests)

    rows = {(e.society, e.iteration, e.method): e for e in store.get_evaluations("r")}
    for society, iteration in (("base", 0), ("maft", 1), ("maft-dpo", 1)):
        assert (society, iteration, "debate") in rows
        matched = rows[(society, iteration, MATCHED_MAJORITY)]
        debate = "eval-0" if society == "base" else f"{'' if society == 'maft' else society + '/'}eval-1"
        responses = list(store.get_responses("r", debate).values())
        extra = [r for r in responses if r.kind == "matched1"]
        assert len(extra) == SMALL["eval_size"] * SMALL["agents"]  # type: ignore[operator]  # N (M - 1) each
        truth = {p.problem_id: p.answer for p in store.get_problems("r", "eval")}
        correct = 0
        for pid in truth:
            votes = [r.answer for r in responses if r.problem_id == pid and r.round == 1
                     and r.kind in ("answer", "matched1")]
            assert len(votes) == 6  # N x M
            final = majority_vote(votes, TASK.equivalent, random.Random(f"3:{MATCHED_MAJORITY}:{pid}")).final
            correct += final is not None and TASK.equivalent(final, truth[pid])
        assert matched.correct == correct and matched.n == SMALL["eval_size"]
    assert store.get_run("r").status == "finished"

    # asked again: everything is in the store, nothing is asked or trained twice
    again = ScriptedBackend()
    _run(tmp_path, again, ("maft-dpo", MATCHED_MAJORITY), more=True)
    assert again.requests == [] and again.specs == []


def test_the_cli_refuses_the_runs_own_objective_and_the_dry_run_counts_the_new_lines(tmp_path: Path) -> None:
    refused = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--baselines", "maft-sft", "--db",
                              str(tmp_path / "m.db")], capture_output=True, text=True, timeout=120)
    assert_one_line_error(refused, "maft-sft", "as this run does already")
    assert not (tmp_path / "m.db").exists() or Store(tmp_path / "m.db").list_runs() == []  # nothing recorded
    dry = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--dry-run", "--baselines",
                          f"maft-dpo,{MATCHED_MAJORITY}"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert dry.returncode == 0, dry.stderr
    assert "maft-dpo · training" in dry.stdout and "maft-dpo · evaluation" in dry.stdout
    assert f"{MATCHED_MAJORITY} · evaluation" in dry.stdout
