"""Accuracy of a society on the held-out problems, read off one evaluation debate.

One debate gives three methods at once: a single agent (agent 1's round-1 answer), the majority vote of the N
independent round-1 answers, and the debate's final majority. Ground truth is looked at only here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from orchestrator.debate import DebateOutcome
from orchestrator.store import EvaluationRow
from orchestrator.tasks import Task
from orchestrator.voting import majority_vote

METHODS = ("single", "majority", "debate")


def accuracy(correct: int, n: int) -> tuple[float, float]:
    """Accuracy and its standard error sqrt(p(1 − p) / n)."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    return p, math.sqrt(p * (1 - p) / n)


def _row(run_id: str, society: str, iteration: int, method: str, answers: Sequence[str | None],
         outcomes: Sequence[DebateOutcome], task: Task) -> EvaluationRow:
    correct = sum(task.is_correct(a, o.problem) for a, o in zip(answers, outcomes, strict=True))
    acc, se = accuracy(correct, len(outcomes))
    return EvaluationRow(
        run_id=run_id,
        task=task.name,
        society=society,
        iteration=iteration,
        method=method,
        n=len(outcomes),
        correct=correct,
        accuracy=acc,
        stderr=se,
        unparseable=sum(a is None for a in answers),
    )


def evaluate(
    run_id: str, society: str, iteration: int, outcomes: Sequence[DebateOutcome], task: Task, seed: int
) -> list[EvaluationRow]:
    single = [o.agents[0].answers[0] for o in outcomes]
    majority = [
        majority_vote(
            [a.answers[0] for a in o.agents], task.equivalent, random.Random(f"{seed}:majority:{o.problem.id}")
        ).final
        for o in outcomes
    ]
    final = [o.vote.final for o in outcomes]
    return [
        _row(run_id, society, iteration, "single", single, outcomes, task),
        _row(run_id, society, iteration, "majority", majority, outcomes, task),
        _row(run_id, society, iteration, "debate", final, outcomes, task),
    ]
