"""The two rules every task shares: which split a problem belongs to, and how n problems are drawn.

Splitting by a hash of the problem's own text (not by position or by a seeded shuffle) makes train and eval
disjoint by construction and keeps the eval set the same whatever the training size or seed: the research
code once evaluated on its training set, and this is what stops that from happening again.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from foundation.errors import UserError
from orchestrator.tasks.base import Problem

EVAL_PERCENT = 20  # share of a generated or user-supplied pool that is held out for evaluation


def is_eval(key: str, percent: int = EVAL_PERCENT) -> bool:
    """Whether the problem with this text is held out; sha256, so it is the same on every machine and
    Python version (the built-in `hash` of a str is salted per process)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def check_count(n: int, available: int, task: str, split: str) -> None:
    """Refuse impossible requests up front with the number that would work."""
    if n < 0:
        raise UserError(f"cannot draw {n} {split} problems from task '{task}': ask for 0 or more")
    if n > available:
        raise UserError(f"task '{task}' has only {available} {split} problems: ask for at most {available}")


def draw(pool: Sequence[Problem], n: int, seed: int, task: str, split: str) -> list[Problem]:
    """n problems without replacement, in a seeded order.

    A full seeded shuffle followed by a prefix (rather than `random.sample`) means that with one seed the
    first 100 problems are the same whether 100 or 500 are asked for, so a small pilot run is a subset of
    the full one.
    """
    check_count(n, len(pool), task, split)
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order[:n]]
