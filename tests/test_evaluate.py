"""Accuracy, its standard error, and the three rows one evaluation debate gives, on hand-made answers."""

from __future__ import annotations

import math
import random

import pytest

from backends.base import ChatMessage
from orchestrator.debate import AgentTranscript, DebateOutcome
from orchestrator.evaluate import accuracy, evaluate
from orchestrator.tasks import Problem, get_task
from orchestrator.voting import Vote, majority_vote

TASK = get_task("arithmetic:easy")


def test_accuracy_and_its_standard_error_on_known_counts():
    p, se = accuracy(3, 4)
    assert p == 0.75
    assert se == pytest.approx(math.sqrt(0.75 * 0.25 / 4)) and se == pytest.approx(0.2165, abs=1e-4)
    assert accuracy(1, 4) == (0.25, pytest.approx(0.2165, abs=1e-4))
    assert accuracy(2, 4) == (0.5, 0.25)
    assert accuracy(4, 4) == (1.0, 0.0) and accuracy(0, 4) == (0.0, 0.0)
    assert accuracy(0, 0) == (0.0, 0.0)  # nothing evaluated: no division by zero


def outcome(pid: str, truth: str, rounds: list[list[str | None]], final: str | None) -> DebateOutcome:
    """A 3-agent debate on one problem; `rounds[m][n]` is agent n's parsed answer in round m + 1."""
    problem = Problem(id=pid, question=pid.split("/")[1], answer=truth)
    agents = []
    for n in range(3):
        said = [r[n] for r in rounds]
        messages: list[ChatMessage] = []
        for m, answer in enumerate(said):
            messages.append(ChatMessage(role="user", content=f"round {m + 1} of {problem.question}"))
            messages.append(ChatMessage(role="assistant", content=f"The answer is {answer}." if answer else "hmm"))
        agents.append(AgentTranscript(messages=messages, answers=said))
    support = sum(a is not None and final is not None and TASK.equivalent(a, final) for a in rounds[-1])
    vote = Vote(final=final, support=support, voters=sum(a is not None for a in rounds[-1]),
                consensus=support / 3)
    return DebateOutcome(problem=problem, agents=agents, vote=vote)


# Four problems; per method, which are right (R), wrong (W) or unparseable (U):
#                       single (every round-1 answer)   majority of round 1   debate (final majority)
# 2+3 = 5                R R W  (share 2/3)              R (5)                 R
# 4+6 = 10               W R R  (2/3: "10.0" ≡ 10)        R ("10.0" ≡ 10)       R
# 7+8 = 15               U W W  (0)                      W (14)                R
# 9+11 = 20              U U U  (0)                      U (nobody readable)   W (21)
OUTCOMES = [
    outcome("arithmetic:easy/2+3", "5", [["5", "5", "6"], ["5", "5", "5"]], "5"),
    outcome("arithmetic:easy/4+6", "10", [["11", "10.0", "10"], ["10", "10", "10"]], "10"),
    outcome("arithmetic:easy/7+8", "15", [[None, "14", "14"], ["15", "15", "14"]], "15"),
    outcome("arithmetic:easy/9+11", "20", [[None, None, None], [None, "21", "21"]], "21"),
]


def test_evaluate_gives_single_agent_majority_and_debate_rows_from_one_debate():
    rows = {r.method: r for r in evaluate("r", "maft", 2, OUTCOMES, TASK, seed=0)}
    assert list(rows) == ["single", "majority", "debate"]
    expected = {  # method: (correct, unparseable)
        "majority": (2, 1),
        "debate": (3, 0),
    }
    for method, (correct, unparseable) in expected.items():
        row = rows[method]
        assert (row.run_id, row.task, row.society, row.iteration) == ("r", "arithmetic:easy", "maft", 2)
        assert row.n == 4 and row.answers is None
        assert row.correct == correct, method
        assert row.unparseable == unparseable, method
        assert row.accuracy == correct / 4
        assert row.stderr == pytest.approx(math.sqrt(correct / 4 * (1 - correct / 4) / 4))
    assert rows["debate"].accuracy == 0.75 and rows["debate"].stderr == pytest.approx(0.2165, abs=1e-4)
    assert rows["majority"].accuracy == 0.5
    # the single agent: every agent's round-1 answer, 4 of 12 right, 4 unreadable; the mean of the shares
    # (2/3, 2/3, 0, 0) is 1/3, each 1/3 from it, so the s.e. over problems is sqrt((1/9) / 4) = 1/6
    single = rows["single"]
    assert (single.n, single.answers, single.correct, single.unparseable) == (4, 12, 4, 4)
    assert single.accuracy == pytest.approx(1 / 3) and single.stderr == pytest.approx(1 / 6)


def test_the_majority_row_breaks_round_one_ties_with_the_seeded_rng():
    # round 1 splits 1-1 (the third agent is unreadable): which of 5 and 6 wins is the seeded coin's call
    tied = [outcome("arithmetic:easy/2+3", "5", [["5", "6", None], ["5", "5", "5"]], "5")]
    pid = tied[0].problem.id
    for seed in range(8):
        (row,) = [r for r in evaluate("r", "base", 0, tied, TASK, seed) if r.method == "majority"]
        vote = majority_vote(["5", "6", None], TASK.equivalent, random.Random(f"{seed}:majority:{pid}"))
        assert vote.tied and row.correct == int(vote.final == "5")
        assert row.unparseable == 0
    winners = {
        majority_vote(["5", "6", None], TASK.equivalent, random.Random(f"{seed}:majority:{pid}")).final
        for seed in range(8)
    }
    assert winners == {"5", "6"}  # the coin is not always the same side: no order bias


def test_evaluate_on_nothing_gives_zero_rows_not_an_error():
    rows = evaluate("r", "maft", 1, [], TASK, seed=0)
    assert [(r.method, r.n, r.correct, r.accuracy, r.stderr) for r in rows] == [
        ("single", 0, 0, 0.0, 0.0), ("majority", 0, 0, 0.0, 0.0), ("debate", 0, 0, 0.0, 0.0)]


def test_single_agent_accuracy_is_one_agents_when_there_is_one_agent():
    # with one answer per problem the averaged row is the plain proportion, its s.e. sqrt(p(1 - p) / n)
    one = [DebateOutcome(problem=o.problem, agents=o.agents[:1], vote=o.vote) for o in OUTCOMES]
    (single,) = [r for r in evaluate("r", "base", 0, one, TASK, seed=0) if r.method == "single"]
    assert (single.correct, single.answers, single.accuracy) == (1, 4, 0.25)
    assert single.stderr == pytest.approx(accuracy(1, 4)[1])
