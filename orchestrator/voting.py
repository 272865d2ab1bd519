"""Majority vote over parsed answers, with the task's grader deciding which answers are the same.

Unparseable answers do not vote. Ties are broken uniformly at random with a seeded RNG (the paper's rule):
never by string order or position, which would bias the data towards whichever agent happens to come first.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from pydantic import BaseModel


class Vote(BaseModel):
    final: str | None  # None: nobody gave a readable answer (no consensus)
    support: int  # how many agents gave an answer equivalent to `final`
    voters: int  # how many answers were readable
    consensus: float  # support / number of agents (unreadable answers count as disagreeing)
    tied: bool = False


def majority_vote(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool], rng: random.Random
) -> Vote:
    classes: list[list[str]] = []
    for answer in answers:
        if answer is None:
            continue
        for members in classes:
            if equivalent(members[0], answer):
                members.append(answer)
                break
        else:
            classes.append([answer])
    if not classes:
        return Vote(final=None, support=0, voters=0, consensus=0.0)
    best = max(len(c) for c in classes)
    leaders = [c for c in classes if len(c) == best]
    winner = leaders[0] if len(leaders) == 1 else rng.choice(leaders)
    return Vote(
        final=winner[0],
        support=best,
        voters=sum(len(c) for c in classes),
        consensus=best / len(answers),
        tied=len(leaders) > 1,
    )


def agrees(answer: str | None, final: str | None, equivalent: Callable[[str, str], bool]) -> bool:
    """y ≡ ŷ; an unreadable answer, or no majority at all, never agrees."""
    return answer is not None and final is not None and equivalent(answer, final)
