"""A compute-matched majority vote (`--baselines majority-matched`): does the debate beat simply sampling as many
answers and voting?

A debate of N agents over M rounds asks N·M answers per problem (and N·(M − 1) summaries); the plain majority
vote beside it uses only the N round-1 answers. So each evaluated society's generators answer every held-out
problem M − 1 more times, with the round-1 prompt and the run's own sampling, and the N·M round-1 answers (the
debate's N plus these) vote. The extra answers are stored in the evaluation debate under kinds `matched1`,
`matched2`, ... (`{problem}/r1/a{n}/matched{k}`), so a resumed run asks none of them twice and the debate's
own rows are untouched. Students answer once and are left out; so is every society of a one-round run, whose
majority vote is already matched.
"""

from __future__ import annotations

from typing import Protocol

from rich.console import Console

from orchestrator.config import RunConfig
from orchestrator.debate import DebateOutcome, DebateRunner, DebateSettings, Society
from orchestrator.evaluate import MATCHED_MAJORITY, matched_majority_row
from orchestrator.names import DebateName
from orchestrator.societies import MAFT, SOCIETIES
from orchestrator.store import ResponseRow, RunRow, Store
from orchestrator.tasks import Problem, Task

MATCHED_HELP = "a majority vote of as many round-1 samples per problem as the debate has answers (N x M)"


class EvaluatedRun(Protocol):
    """What the matched vote needs of the run's pipeline (orchestrator.pipeline.Pipeline)."""

    config: RunConfig
    console: Console
    store: Store
    run_row: RunRow
    task: Task

    def society_settings(self, society: str) -> DebateSettings: ...

    def stored_society(self, society: str, iteration: int) -> Society | None: ...

    def runner(self, name: str, iteration: int, settings: DebateSettings | None = None) -> DebateRunner: ...

    def debate(self, name: str, problems: list[Problem], society: Society, iteration: int,
               settings: DebateSettings | None = None) -> list[DebateOutcome]: ...


def run_matched_majority(p: EvaluatedRun, held_out: list[Problem]) -> None:
    """The matched vote of every society of the run evaluated so far on its own task (students aside)."""
    if p.config.rounds < 2:
        p.console.print(f"{MATCHED_MAJORITY}: a one-round debate has N answers, as the majority vote does: "
                        "nothing to add")
        return
    for name, iteration in p.store.societies(p.run_row.id):
        if name in SOCIETIES and SOCIETIES[name].kind == "student":
            continue
        society = p.stored_society(name, iteration)
        if society is None:
            continue
        evaluated = "base" if iteration == 0 and name == MAFT else name
        debate = str(DebateName(stage="eval", iteration=iteration, society=name))
        settings = p.society_settings(name)
        p.console.rule(f"[bold]compute-matched majority vote: {evaluated}, iteration {iteration}")
        outcomes = p.debate(debate, held_out, society, iteration, settings)  # stored: answered from the store
        extra = extra_samples(p, debate, iteration, settings, outcomes, society)
        p.store.save_evaluation(matched_majority_row(p.run_row.id, evaluated, iteration, outcomes, extra, p.task,
                                                     p.config.seed))


def extra_samples(p: EvaluatedRun, debate: str, iteration: int, settings: DebateSettings,
                  outcomes: list[DebateOutcome], society: Society) -> list[list[ResponseRow]]:
    """Per problem, the M − 1 further round-1 answers of each of its N agents, asked as that agent."""
    extra_kinds = [f"matched{k}" for k in range(1, p.config.rounds)]
    items = [(o.problem, agent, society.generators[agent], o.agents[agent].messages[:1], kind)
             for o in outcomes for agent in range(len(o.agents)) for kind in extra_kinds]
    rows = p.runner(debate, iteration, settings).ask_as(items, f"{len(items)} extra round-1 samples")
    per_problem = len(items) // max(1, len(outcomes))
    return [rows[i * per_problem:(i + 1) * per_problem] for i in range(len(outcomes))]
