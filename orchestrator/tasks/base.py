"""What every task provides: problems (train and eval disjoint by construction), answer parsing and grading."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Problem(BaseModel):
    """One problem. `id` is stable across runs and machines, so the store can say which problems a run used."""

    model_config = ConfigDict(frozen=True)

    id: str
    question: str
    answer: str  # the ground-truth final answer, as a string the task's grader understands
    meta: dict[str, Any] = Field(default_factory=dict)


class Task(ABC):
    """A task family plus its variant. `family` picks the prompt folder under `prompts/`."""

    name: str  # the spec the user gave, normalised, e.g. "arithmetic:easy", "math:1-3"
    family: str  # "arithmetic" | "gsm8k" | "math"

    @abstractmethod
    def train_problems(self, n: int, seed: int) -> list[Problem]:
        """`n` training problems chosen with `seed`; never overlaps `eval_problems` for any seeds."""

    @abstractmethod
    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        """`n` held-out problems chosen with `seed`."""

    @abstractmethod
    def extract_answer(self, text: str) -> str | None:
        """The final answer in a model's response, or None when it gave none we can read."""

    @abstractmethod
    def equivalent(self, a: str, b: str) -> bool:
        """Whether two extracted answers mean the same thing (symmetric); used for voting."""

    def is_correct(self, predicted: str | None, problem: Problem) -> bool:
        return predicted is not None and self.equivalent(problem.answer, predicted)
