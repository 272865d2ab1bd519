"""MATH (Hendrycks et al. 2021): competition problems with LaTeX answers, graded symbolically.

Train problems come from the 7,500-problem MATH train split and eval problems from MATH-500 (a subset of the
MATH test split), so the two are disjoint by construction. The paper uses levels 1-3; other levels are a
spec away (`math:all`, `math:4`, `math:2-4`).

Grading: equal text, then exact numbers, then math-verify (sympy). math-verify's own timeouts use
SIGALRM, which Python only allows in the main thread: it raises ValueError elsewhere. So timeouts are on in
the main thread and off in worker threads, where answers longer than `MAX_SYMBOLIC_CHARS` are not handed to
sympy at all, to bound the work a pathological answer can cause.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

from foundation.errors import UserError
from orchestrator.tasks.answers import extract_boxed, normalize_text, parse_number
from orchestrator.tasks.base import Problem, Task, paper_defaults
from orchestrator.tasks.sampling import draw

DATA_DIR = Path(__file__).parent / "data" / "math"
DEFAULT_LEVELS = (1, 3)  # the paper's choice
DEFAULTS = paper_defaults(max_tokens=512, max_length=3072)  # MATH questions run long: p99 433 tokens, max 1,234
MAX_SYMBOLIC_CHARS = 400  # longer answers are compared as text only (MATH gold answers are far shorter)
_TIMEOUT_S = 5

_LEVELS = re.compile(r"(\d+)(?:-(\d+))?")


def parse_levels(spec: str) -> tuple[int, int]:
    """`math` -> (1, 3); `math:all` -> (1, 5); `math:4` -> (4, 4); `math:2-4` -> (2, 4)."""
    head, colon, rest = spec.strip().lower().partition(":")
    if head != "math":
        raise ValueError(f"not a MATH spec: {spec!r}")
    if not colon:
        return DEFAULT_LEVELS
    if rest == "all":
        return (1, 5)
    m = _LEVELS.fullmatch(rest)
    if m is not None:
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) else low
        if 1 <= low <= high <= 5:
            return (low, high)
    raise UserError(
        f"task '{spec}' has bad MATH levels: use math (levels 1-3), math:all, math:N or math:A-B "
        "with 1 <= A <= B <= 5"
    )


def levels_name(levels: tuple[int, int]) -> str:
    low, high = levels
    return f"math:{low}" if low == high else f"math:{low}-{high}"


class MathGrader:
    """Symbolic equivalence of two extracted answers, with a per-instance cache of sympy parses (voting
    compares the same few answers many times)."""

    def __init__(self, cache_size: int = 4096) -> None:
        self._parse = functools.lru_cache(maxsize=cache_size)(self._parse_uncached)

    def equivalent(self, a: str, b: str) -> bool:
        if a.strip() == b.strip() or normalize_text(a) == normalize_text(b):
            return True
        x, y = parse_number(a, lenient=False), parse_number(b, lenient=False)
        if x is not None and y is not None:
            return Fraction(x) == Fraction(y)  # exact: 0.333 is not 1/3
        if max(len(a), len(b)) > MAX_SYMBOLIC_CHARS:
            return False
        pa, pb = self._parse(a), self._parse(b)
        if not pa or not pb:
            return False
        # verify() is asymmetric (gold vs prediction); votes need a symmetric relation.
        return _verify(pa, pb) or _verify(pb, pa)

    @staticmethod
    def _parse_uncached(answer: str) -> tuple[Any, ...]:
        from math_verify import parse  # lazy: sympy costs start-up time that other tasks need not pay

        try:
            return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=_timeout()))  # type: ignore[arg-type]
        except Exception:  # a grader must not crash a run; an unparseable answer just matches nothing
            return ()


def _timeout() -> int | None:
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _verify(gold: tuple[Any, ...], pred: tuple[Any, ...]) -> bool:
    from math_verify import verify

    try:
        return bool(verify(list(gold), list(pred), timeout_seconds=_timeout()))
    except Exception:
        return False


class MathTask(Task):
    family = "math"

    def __init__(self, levels: tuple[int, int] = DEFAULT_LEVELS, data_dir: Path = DATA_DIR) -> None:
        self.levels = levels
        self.name = levels_name(levels)
        self._data_dir = data_dir
        self._splits: dict[str, list[Problem]] = {}
        self._grader = MathGrader()

    @classmethod
    def from_spec(cls, spec: str) -> MathTask:
        return cls(parse_levels(spec))

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        return draw(self._load("train.jsonl"), n, seed, self.name, "train")

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        return draw(self._load("test500.jsonl"), n, seed, self.name, "eval")

    def extract_answer(self, text: str) -> str | None:
        return extract_boxed(text)

    def equivalent(self, a: str, b: str) -> bool:
        return self._grader.equivalent(a, b)

    def _load(self, filename: str) -> list[Problem]:
        if filename not in self._splits:
            low, high = self.levels
            problems = []
            with (self._data_dir / filename).open(encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    level = row["level"]
                    # Two train problems have level "?" (null) and two have an empty \boxed{}: skip both.
                    if level is None or not low <= level <= high or not row["answer"].strip():
                        continue
                    problems.append(
                        Problem(
                            id=row["unique_id"],
                            question=row["problem"],
                            answer=row["answer"].strip(),
                            meta={"level": level, "subject": row["subject"], "solution": row["solution"]},
                        )
                    )
            self._splits[filename] = problems
        return self._splits[filename]
