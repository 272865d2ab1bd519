"""The paper's single-model baselines, each iterated like the method and evaluated the same way.

- STaR: one model answers; answers the ground truth marks right are kept, wrong ones are retried with the answer
  as a hint (rationalization) and kept when right; each iteration finetunes the base model afresh on what the
  previous model produced (as in the STaR paper). The only baseline that looks at ground truth.
- majority FT: N independent samples per problem, no debate; every sample that agrees with their majority vote
  is kept; one model is finetuned on all of them.
- single-agent FT: the full debate; every answer that agrees with the debate's majority (round-1 answers and
  critics' final answers alike) goes into one dataset for one model.

majority FT and single-agent FT follow the run's strategy (continue from the previous iteration's model, restart
from the base model on the latest data, or accumulate: the base model on all its data so far), as the multiagent
society does; STaR always restarts on its latest data.

Each finetuned model is evaluated as a society of N copies, so single agent, majority vote and debate accuracy
come out of one evaluation debate, as for the multiagent society. Where a baseline asks exactly what the main
run already asked (the base model's first samples), the store answers for free.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from rich.console import Console

import prompts
from backends.base import BASE_MODEL_ID, Backend, BackendInfo, ChatMessage, Objective
from orchestrator.config import RunConfig
from orchestrator.debate import DebateOutcome, DebateRunner, DebateSettings, Society, readable_answer
from orchestrator.names import DebateName, DebateStage, JobKey
from orchestrator.preference import PreferencePair
from orchestrator.societies import MAJORITY_FT, SINGLE_FT, STAR
from orchestrator.store import DatasetRow, RunRow, Store
from orchestrator.tasks import Problem, Task
from orchestrator.training_data import Example, agreeing_examples, fit, generator_example
from orchestrator.voting import agrees

ROLE = "single"


class PipelineSteps(Protocol):
    """What a baseline needs of the run's pipeline (orchestrator.pipeline.Pipeline): its settings and store, and
    the steps it shares with the multiagent society, so that a baseline debates, finetunes, records and
    evaluates exactly as the society does. The pipeline drives the baselines; they never import it."""

    config: RunConfig
    console: Console
    store: Store
    run_row: RunRow
    task: Task
    backend: Backend
    info: BackendInfo
    workdir: Path

    @property
    def max_length(self) -> int | None: ...

    def settings(self, *, rounds: int | None = None) -> DebateSettings: ...

    def runner(self, name: str, iteration: int) -> DebateRunner: ...

    def debate(self, name: str, problems: list[Problem], society: Society, iteration: int,
               settings: DebateSettings | None = None) -> list[DebateOutcome]: ...

    def dataset_path(self, society: str, iteration: int, agent: int, role: str) -> Path: ...

    def write_dataset(self, examples: Sequence[Example], row: DatasetRow, *,
                      accumulate: bool | None = None) -> DatasetRow: ...

    def with_pairs(self, row: DatasetRow, pairs: Sequence[PreferencePair]) -> DatasetRow: ...

    def finetune(self, society: str, iteration: int, datasets: list[DatasetRow],
                 starts: dict[tuple[int, str], str], *, key: Callable[[str, int, int, str], str],
                 restart: bool | None = None, objective: Objective | None = None, root_model: str | None = None
                 ) -> dict[tuple[int, str], tuple[str, str]]: ...

    def stored_society(self, society: str, iteration: int) -> Society | None: ...

    def save_society(self, name: str, iteration: int, society: Society, parent: Society | None = None,
                     models: dict[tuple[int, str], tuple[str, str]] | None = None) -> Society: ...

    def evaluate(self, society: str, iteration: int, outcomes: list[DebateOutcome], models: Society) -> None: ...


class SingleModelMethod:
    """One model, finetuned L times on data it produced, evaluated as N copies of itself."""

    society = ""
    # True: every iteration trains the base model afresh; None: as the run's strategy says, like the society
    restart: bool | None = None

    def __init__(self, pipeline: PipelineSteps) -> None:
        self.p = pipeline

    def examples(self, iteration: int, model: str, train: list[Problem]) -> list[Example]:
        raise NotImplementedError

    def run(self, train: list[Problem], held_out: list[Problem]) -> None:
        p, n = self.p, self.p.config.agents
        model = BASE_MODEL_ID
        for iteration in range(1, p.config.iterations + 1):
            society = p.stored_society(self.society, iteration)
            if society is None:
                p.console.rule(f"[bold]{self.society}: iteration {iteration}/{p.config.iterations}")
                dataset = self._dataset(iteration, self.examples(iteration, model, train))
                trained = p.finetune(self.society, iteration, [dataset], {(0, ROLE): model}, key=self._key,
                                     restart=self.restart)
                new_model, job = trained.get((0, ROLE), (model, ""))
                society = Society.uniform(n, new_model)
                jobs = {(i, role): (new_model, job) for i in range(n) for role in ("generator", "critic")} if job \
                    else None
                p.save_society(self.society, iteration, society, Society.uniform(n, model), jobs)
            model = society.generators[0]
            outcomes = p.debate(self._debate("eval", iteration), held_out, society, iteration)
            p.evaluate(self.society, iteration, outcomes, society)

    def _key(self, run_id: str, iteration: int, agent: int, role: str) -> str:
        """One model per iteration: its key names no agent."""
        return str(JobKey(run_id=run_id, society=self.society, iteration=iteration, role=role))

    def _debate(self, stage: DebateStage, iteration: int) -> str:
        return str(DebateName(stage=stage, iteration=iteration, society=self.society))

    def _dataset(self, iteration: int, examples: list[Example]) -> DatasetRow:
        p = self.p
        path = p.dataset_path(self.society, iteration, 0, ROLE)
        examples, too_long = fit(examples, p.max_length)
        row = DatasetRow(run_id=p.run_row.id, society=self.society, iteration=iteration, agent=0, role=ROLE,
                         path=str(path), sha256="", n_examples=len(examples),
                         n_generation=len(examples), problem_ids=json.dumps([e.problem_id for e in examples]),
                         n_too_long=too_long)
        # as the society: accumulated under strategy accumulate, except for a method that always restarts on its
        # latest data (STaR)
        row = p.write_dataset(examples, row, accumulate=None if self.restart is None else False)
        p.store.save_datasets([row])
        return row


class MajorityFT(SingleModelMethod):
    society = MAJORITY_FT

    def examples(self, iteration: int, model: str, train: list[Problem]) -> list[Example]:
        p = self.p
        outcomes = p.debate(self._debate("train", iteration), train, Society.uniform(p.config.agents, model),
                            iteration, p.settings(rounds=1))
        return [
            generator_example(o, k)
            for o in outcomes for k, agent in enumerate(o.agents)
            if agrees(agent.answers[0], o.vote.final, p.task.equivalent)
        ]


class SingleAgentFT(SingleModelMethod):
    society = SINGLE_FT

    def examples(self, iteration: int, model: str, train: list[Problem]) -> list[Example]:
        p = self.p
        outcomes: list[DebateOutcome] = p.debate(self._debate("train", iteration), train,
                                                 Society.uniform(p.config.agents, model), iteration)
        return agreeing_examples(outcomes, p.task.equivalent, all_turns=p.config.critic_train_all_turns)


class Star(SingleModelMethod):
    society = STAR
    restart = True

    def examples(self, iteration: int, model: str, train: list[Problem]) -> list[Example]:
        p = self.p
        first = p.debate(self._debate("train", iteration), train, Society.uniform(1, model), iteration,
                         p.settings(rounds=1))
        kept = [generator_example(o, 0) for o in first if p.task.is_correct(o.agents[0].answers[0], o.problem)]
        wrong = [o for o in first if not p.task.is_correct(o.agents[0].answers[0], o.problem)]
        family = p.task.family
        asks = [(o.problem, model, [ChatMessage(role="user", content=prompts.render(
            f"{family}/rationalize.txt", question=o.problem.question, answer=o.problem.answer))]) for o in wrong]
        runner = p.runner(self._debate("rationale", iteration), iteration)
        rationales = runner.ask(asks, "rationale", "rationalizations") if asks else []
        for outcome, row in zip(wrong, rationales, strict=True):
            if p.task.is_correct(readable_answer(row), outcome.problem):  # a cut rationale is no answer
                # learned without the hint: the model must come to the answer on its own next time
                prompt = outcome.agents[0].messages[0]
                kept.append(Example(messages=[prompt, ChatMessage(role="assistant", content=row.text)],
                                    problem_id=outcome.problem.id))
        order = {pr.id: i for i, pr in enumerate(train)}
        return sorted(kept, key=lambda e: order[e.problem_id])


SINGLE_MODEL_METHODS: dict[str, Callable[[PipelineSteps], SingleModelMethod]] = {
    STAR: Star,
    MAJORITY_FT: MajorityFT,
    SINGLE_FT: SingleAgentFT,
}
