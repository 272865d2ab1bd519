"""The names the store keys things by (debates, finetuning jobs and their attempts), built and read in one place.

These strings are primary keys of rows already on disk: a run resumes by finding its debates and jobs under the
names it gave them, so the spelling here must never change. Everything that composes or takes apart such a name
goes through these types, so no module guesses at the format with its own prefix test or regex.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.societies import MAFT, PREFIXED

DebateStage = Literal["train", "eval", "rationale", "ask", "solve", "serve"]
USE_STAGES = ("ask", "solve", "serve")  # a finished society put to the user's own questions (ask / solve / serve)

# [transfer/TASK/][SOCIETY/]STAGE-ITERATION; the society is one of PREFIXED (baselines, students), so a task
# named by a path with "/" in it (a JSONL file) is read whole rather than split into a task and a society
_DEBATE = re.compile(
    r"(?:transfer/(?P<transfer>.+?)/)?(?:(?P<society>" + "|".join(map(re.escape, PREFIXED)) + r")/)?"
    r"(?P<stage>train|eval|rationale)-(?P<iteration>\d+)"
)
# [SOCIETY/]ask-ITERATION/INPUT, [SOCIETY/]solve-ITERATION/INPUT: INPUT is a digest of what was asked and how
_USE = re.compile(
    r"(?:(?P<society>" + "|".join(map(re.escape, PREFIXED)) + r")/)?"
    r"(?P<stage>ask|solve|serve)-(?P<iteration>\d+)/(?P<input>[0-9a-f]{16})"
)


class DebateName(BaseModel):
    """One debate of a run: which society debated, at what stage and iteration, and on which other task.

    `eval-0` is the base society's evaluation, `train-k` / `eval-k` the multiagent society's iteration k,
    `SOCIETY/…` an ablation's or baseline's (`star/rationale-k`: STaR's hinted retries), and
    `transfer/TASK/[SOCIETY/]eval-k` a society evaluated zero-shot on another task, and `ask-k/INPUT` /
    `solve-k/INPUT` the society of iteration k (0: the base) answering the user's own questions, INPUT a digest
    of the question or file and the rounds, so asking the same again finds its stored answers.
    """

    model_config = ConfigDict(frozen=True)

    stage: DebateStage
    iteration: int = Field(ge=0)
    society: str = MAFT
    transfer: str | None = None  # the other task's name, for a zero-shot transfer evaluation
    input: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")  # ask and solve only: what was asked

    @model_validator(mode="after")
    def _input_names_a_use(self) -> DebateName:
        if (self.input is not None) != (self.stage in USE_STAGES) or (self.is_use and self.transfer is not None):
            raise ValueError("ask and solve debates, and only they, carry an input digest (and never a transfer)")
        return self

    @property
    def is_evaluation(self) -> bool:
        """Held-out problems, answered to be graded (the cost ledger's stage "evaluation"); the rest make data."""
        return self.stage == "eval"

    @property
    def is_use(self) -> bool:
        """The user's own questions (`ask`, `solve`): never graded, never data, paid for under their own stage."""
        return self.stage in USE_STAGES

    @classmethod
    def parse(cls, name: str) -> DebateName | None:
        """The name's parts; None for a name no part of the pipeline composes."""
        match = _DEBATE.fullmatch(name)
        if match is not None:
            return cls.model_validate({"stage": match["stage"], "iteration": int(match["iteration"]),
                                       "society": match["society"] or MAFT, "transfer": match["transfer"]})
        use = _USE.fullmatch(name)
        if use is None:
            return None
        return cls.model_validate({"stage": use["stage"], "iteration": int(use["iteration"]),
                                   "society": use["society"] or MAFT, "input": use["input"]})

    def __str__(self) -> str:
        where = f"transfer/{self.transfer}/" if self.transfer is not None else ""
        who = "" if self.society == MAFT else f"{self.society}/"
        what = f"/{self.input}" if self.input is not None else ""
        return f"{where}{who}{self.stage}-{self.iteration}{what}"


class JobKey(BaseModel):
    """A finetuning job's key, unique in the store and sent to the provider as the job's idempotency key.

    `RUN/[SOCIETY/]iteration-k/agent-a/ROLE` for a society's agents (agent counted from 1), and
    `RUN/SOCIETY/iteration-k/ROLE` for a single-model baseline's one model (`agent` None).
    """

    model_config = ConfigDict(frozen=True)

    run_id: str
    iteration: int = Field(ge=0)
    role: str
    society: str = MAFT
    agent: int | None = Field(None, ge=0)  # counted from 0 here, from 1 in the key

    def __str__(self) -> str:
        who = "" if self.society == MAFT else f"{self.society}/"
        agent = "" if self.agent is None else f"agent-{self.agent + 1}/"
        return f"{self.run_id}/{who}iteration-{self.iteration}/{agent}{self.role}"


def attempt_key(key: str, attempt: int) -> str:
    """The idempotency key of an attempt: the first keeps the job key, retries get their own."""
    return key if attempt == 1 else f"{key}#attempt-{attempt}"
