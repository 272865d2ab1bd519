"""Generated arithmetic (Du et al. 2023): expressions such as `3+4*5+6-7*8`, graded by exact value.

Each expression is assigned to train or eval by a hash of its text, so the two sets can never share a problem
and the eval set does not move when the training size changes. Small variants enumerate every expression;
the paper's six-operand variant (30**6 expressions) is sampled from its pool by rejection instead.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from foundation.errors import UserError
from orchestrator.tasks.answers import extract_numeric_answer, numeric_equivalent
from orchestrator.tasks.base import DEMO_DEFAULTS, Problem, Task, TaskDefaults, paper_defaults
from orchestrator.tasks.sampling import check_count, draw, is_eval

# Above this many expressions a variant is sampled rather than enumerated (memory and start-up time).
_ENUMERATE_LIMIT = 200_000
# A sampled variant's pools hold hundreds of millions of expressions; this cap only guards against typos
# such as n=10**9 that would otherwise loop for a very long time.
_SAMPLED_MAX = 100_000


@dataclass(frozen=True)
class _Variant:
    template: str  # str.format pattern over the operands
    arity: int
    low: int
    high: int
    value: Callable[[tuple[int, ...]], int]

    @property
    def size(self) -> int:
        return (self.high - self.low + 1) ** self.arity

    def expression(self, operands: tuple[int, ...]) -> str:
        return self.template.format(*operands)


VARIANTS: Mapping[str, _Variant] = MappingProxyType(
    {
        # The paper's task, values 0-29 (Du et al.'s prompt: "What is the result of a+b*c+d-e*f?").
        "arithmetic": _Variant(
            "{}+{}*{}+{}-{}*{}", 6, 0, 29, lambda v: v[0] + v[1] * v[2] + v[3] - v[4] * v[5]
        ),
        # Easier variants for small local models, where the paper's task is out of reach.
        "arithmetic:easy": _Variant("{}+{}", 2, 0, 20, lambda v: v[0] + v[1]),
        "arithmetic:medium": _Variant("{}+{}*{}", 3, 0, 10, lambda v: v[0] + v[1] * v[2]),
    }
)


# The paper's task answers in a few lines of arithmetic (256 tokens, as the README's Table 1 recipe); the easier
# variants exist for small local models and keep the demo's short settings.
DEFAULTS: Mapping[str, TaskDefaults] = MappingProxyType({
    "arithmetic": paper_defaults(max_tokens=256, max_length=1024),
    "arithmetic:easy": DEMO_DEFAULTS,
    "arithmetic:medium": DEMO_DEFAULTS,
})


class ArithmeticTask(Task):
    """One arithmetic variant; answers are integers, so grading is exact numeric equality."""

    family = "arithmetic"

    def __init__(self, name: str = "arithmetic") -> None:
        if name not in VARIANTS:
            raise ValueError(f"unknown arithmetic variant {name!r}")  # get_task validates user specs
        self.name = name
        self._variant = VARIANTS[name]
        self._pools: dict[bool, list[Problem]] = {}  # enumerated variants only, built on first use

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        return self._problems(n, seed, held_out=False)

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        return self._problems(n, seed, held_out=True)

    def extract_answer(self, text: str) -> str | None:
        return extract_numeric_answer(text)

    def equivalent(self, a: str, b: str) -> bool:
        return numeric_equivalent(a, b)

    def _problems(self, n: int, seed: int, held_out: bool) -> list[Problem]:
        split = "eval" if held_out else "train"
        if self._variant.size <= _ENUMERATE_LIMIT:
            return draw(self._pool(held_out), n, seed, self.name, split)
        if n > _SAMPLED_MAX:
            raise UserError(
                f"task '{self.name}' draws at most {_SAMPLED_MAX} {split} problems: ask for at most that"
            )
        check_count(n, _SAMPLED_MAX, self.name, split)  # negative n
        rng = random.Random(seed)
        seen: set[str] = set()
        out: list[Problem] = []
        v = self._variant
        while len(out) < n:
            operands = tuple(rng.randint(v.low, v.high) for _ in range(v.arity))
            expr = v.expression(operands)
            if expr in seen or is_eval(expr) != held_out:
                continue
            seen.add(expr)
            out.append(self._problem(operands))
        return out

    def _pool(self, held_out: bool) -> list[Problem]:
        if held_out not in self._pools:
            v = self._variant
            self._pools[held_out] = [
                self._problem(ops)
                for ops in itertools.product(range(v.low, v.high + 1), repeat=v.arity)
                if is_eval(v.expression(ops)) == held_out
            ]
        return self._pools[held_out]

    def _problem(self, operands: tuple[int, ...]) -> Problem:
        expr = self._variant.expression(operands)
        return Problem(id=f"{self.name}/{expr}", question=expr, answer=str(self._variant.value(operands)))
