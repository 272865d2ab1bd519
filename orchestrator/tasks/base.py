"""What every task provides: problems (train and eval disjoint by construction), answer parsing and grading."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TaskDefaults(BaseModel):
    """What a run of a task uses where its config says nothing: sampling, and lengths sized for its answers.

    The paper's tasks get the paper's sampling (temperature 1, top_p 0.9, as its code) and `max_tokens` that
    fit their answers (256 for arithmetic, 512 for GSM8K and MATH): a cut answer counts as no answer, so a limit
    sized for a tiny demo would throw most of a capable model's answers away. `max_length` (the local trainer's
    longest example) is sized from the token counts of the longest critic conversation such a run can make: two
    rounds in summary mode, every reply at its limit, a question at the 99th percentile of the task's packaged
    problems, counted with SmolLM2's tokenizer (README, "Task defaults"); longer examples are dropped, never
    cut, and counted in the dataset table.
    """

    model_config = ConfigDict(frozen=True)

    temperature: float
    top_p: float
    max_tokens: int
    summary_max_tokens: int
    max_length: int

    def generation(self) -> dict[str, Any]:
        return self.model_dump(exclude={"max_length"})


def paper_defaults(max_tokens: int, max_length: int) -> TaskDefaults:
    return TaskDefaults(temperature=1.0, top_p=0.9, max_tokens=max_tokens, summary_max_tokens=max_tokens,
                        max_length=max_length)


# The small CPU demo (the default job): short answers to a+b, kept exactly as it has always run.
DEMO_DEFAULTS = TaskDefaults(temperature=0.7, top_p=0.9, max_tokens=96, summary_max_tokens=128, max_length=512)


class Problem(BaseModel):
    """One problem. `id` is stable across runs and machines, so the store can say which problems a run used."""

    model_config = ConfigDict(frozen=True)

    id: str
    question: str
    answer: str  # the ground-truth final answer, as a string the task's grader understands; "" when it has none
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def graded(self) -> bool:
        """A question put to a society without an answer (`orchestrator ask`, `solve`) is never graded."""
        return self.answer != ""


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
        return predicted is not None and problem.graded and self.equivalent(problem.answer, predicted)
