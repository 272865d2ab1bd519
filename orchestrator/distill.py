"""Distilling a finetuned society into one student model that answers in a single pass (issue 15).

A debate of N agents over M rounds costs N·(2M−1) generations per problem; the student costs one. Its data is
the society's consensus, never the ground truth: for each training problem (never a held-out one) whose debate
by the iteration-L society has a strict majority ŷ (`preference.has_strict_majority`), every round-1 and
final-round chain whose readable answer is ŷ, deduplicated by text. Each becomes a single-pass example: the
task's round-1 prompt for the question, then the chain, so the student learns to give in one answer what the
society reached by debating (a final-round chain was written after reading the others; it is learned here
without them, which is the point).

With the DPO objective, each such chain (chosen) is paired with every distinct readable chain of another answer
(rejected) on the same problem, in the same single-pass context, weighted by the vote margin
v(ŷ) − v(rejected's answer) as the society's own pairs are (`preference`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from backends.base import BASE_MODEL_ID, AveragesAdapters, BackendInfo, ChatMessage
from foundation.errors import UserError
from orchestrator.baselines import PipelineSteps
from orchestrator.config import objective_problem
from orchestrator.debate import AgentTranscript, DebateOutcome, Society
from orchestrator.evaluate import evaluate
from orchestrator.names import DebateName, JobKey
from orchestrator.preference import Equivalent, PreferencePair, has_strict_majority, share
from orchestrator.societies import BASE, DISTILL, MAFT, SOCIETIES, SOUP, STUDENTS
from orchestrator.store import DatasetRow, Store
from orchestrator.tasks import Problem
from orchestrator.training_data import Example, fit
from orchestrator.voting import agrees

ROLE = "student"


def _readable(transcript: AgentTranscript, index: int) -> str | None:
    """Round index's readable answer (index −1: the final round): None when unparseable or cut at max_tokens."""
    i = index % len(transcript.answers)
    cut = i < len(transcript.cut) and transcript.cut[i]
    return None if cut else transcript.answers[i]


def _chains(outcome: DebateOutcome) -> list[tuple[str, str | None, int | None]]:
    """Every agent's round-1 chain, then its final-round one (M ≥ 2), with its readable answer and, for round 1,
    its length in tokens (the single-pass example is exactly round 1's conversation; a final-round chain in the
    round-1 prompt's context has no stored length, and the local trainer measures it)."""
    chains: list[tuple[str, str | None, int | None]] = []
    for transcript in outcome.agents:
        chains.append((transcript.messages[1].content, _readable(transcript, 0),
                       transcript.tokens[0] if transcript.tokens else None))
        if len(transcript.answers) > 1:
            chains.append((transcript.messages[-1].content, _readable(transcript, -1), None))
    return chains


def _prompt(outcome: DebateOutcome) -> ChatMessage:
    """The task's round-1 prompt for the question: the same for every agent, so agent 0's is taken."""
    return outcome.agents[0].messages[0].model_copy(update={"weight": None})


def _training(outcomes: Sequence[DebateOutcome], held_out: Collection[str],
              equivalent: Equivalent) -> list[DebateOutcome]:
    """The debates that give data: training problems only, with a strict majority."""
    return [o for o in outcomes if o.problem.id not in held_out and has_strict_majority(o, equivalent)]


def distillation_examples(outcomes: Sequence[DebateOutcome], held_out: Collection[str],
                          equivalent: Equivalent) -> list[Example]:
    """The student's SFT set, in problem order, each problem's chains in agent then round order, each distinct
    chain once. `held_out`: the evaluation problems' ids, dropped even if their debates are passed in."""
    examples: list[Example] = []
    for outcome in _training(outcomes, held_out, equivalent):
        seen: set[str] = set()
        for text, answer, tokens in _chains(outcome):
            if text in seen or not agrees(answer, outcome.vote.final, equivalent):
                continue
            seen.add(text)
            examples.append(Example(messages=[_prompt(outcome), ChatMessage(role="assistant", content=text)],
                                    problem_id=outcome.problem.id, tokens=tokens))
    return examples


def distillation_pairs(outcomes: Sequence[DebateOutcome], held_out: Collection[str],
                       equivalent: Equivalent) -> list[PreferencePair]:
    """The student's DPO pairs: each distinct chain of ŷ against each distinct readable chain of another answer,
    in the round-1 prompt's context, weighted by the vote margin. An unreadable chain is never a side."""
    pairs: list[PreferencePair] = []
    for outcome in _training(outcomes, held_out, equivalent):
        final = outcome.vote.final
        finals = [t.answers[-1] for t in outcome.agents]
        top = share(final, finals, equivalent)
        chosen: dict[str, None] = {}
        rejected: dict[str, str] = {}
        for text, answer, _ in _chains(outcome):
            if answer is None:
                continue
            if agrees(answer, final, equivalent):
                chosen.setdefault(text, None)
            elif text not in chosen:
                rejected.setdefault(text, answer)
        for good in chosen:
            for bad, answer in rejected.items():
                pairs.append(PreferencePair(
                    messages=[_prompt(outcome)], chosen=good, rejected=bad,
                    weight=top - share(answer, finals, equivalent), kind="generator", agent=0, role="generator",
                    problem_id=outcome.problem.id, round=1,
                ))
    return pairs


# -- the flow ------------------------------------------------------------------------------------------------------


class DistillRequest(BaseModel):
    """`orchestrator distill` (and `run --distill`): which iteration's society teaches (None: the last one done)."""

    model_config = ConfigDict(frozen=True)

    iteration: int | None = Field(None, ge=1)
    objective: Literal["sft", "dpo"] = "sft"  # dpo: chains of ŷ against chains of other answers (`distillation_pairs`)
    # the student's base model when it is not the run's: a smaller model on disk (local), another of the provider's
    # models (hosted); where the backend has `other_models`
    model: str | None = None


def student_key(run_id: str, level: int) -> str:
    """The student's one job of iteration L."""
    return str(JobKey(run_id=run_id, society=DISTILL, iteration=level, role=ROLE))


def stored_student_root(store: Store, run_id: str, level: int) -> str | None:
    """The base model of iteration L's student, or of its job still under way; None: there is neither."""
    agents = store.get_agents(run_id, level, DISTILL)
    if agents:
        return agents[0].parent_model_id
    job = store.get_job(student_key(run_id, level))
    return job.base_model_id if job is not None and job.status not in ("failed", "cancelled") else None


def check_student(store: Store, run_id: str, request: DistillRequest, info: BackendInfo) -> None:
    """Refuse, before the run is touched, a --model the backend cannot train, or one that differs from the base
    model of the student iteration L already has (one student per iteration: it would be shown under the wrong
    name)."""
    wanted = request.model
    if wanted is None:
        return
    if not info.other_models:
        raise UserError(f"the {info.name} backend serves only the run's base model: distil into it (omit --model)")
    level = request.iteration or store.require_run(run_id).iterations_done
    had = stored_student_root(store, run_id, level)
    if had is not None and had != wanted:
        named = "the run's base model" if had == BASE_MODEL_ID else had
        raise UserError(f"iteration {level} of run {run_id} already has a student distilled into {named}: omit "
                        "--model to see it, or distil another iteration (--iteration)")


class Distillation:
    """One student distilled from the iteration-L society, recorded as society `distill` at iteration L and
    evaluated as it would be used: one agent, one round, one answer per held-out problem. Driven through the
    pipeline's own steps (as the baselines are), so its debates, file, job, ledger lines and resume are theirs."""

    def __init__(self, pipeline: PipelineSteps, request: DistillRequest) -> None:
        self.p = pipeline
        self.request = request

    def level(self) -> int:
        done = self.p.run_row.iterations_done
        level = self.request.iteration or done
        if level < 1 or level > done:
            raise UserError(f"run {self.p.run_row.id} has {done} finished iteration(s): distil one of 1..{done}"
                            if done else f"run {self.p.run_row.id} has no finished iteration to distil")
        return level

    def run(self, train: list[Problem], held_out: list[Problem]) -> None:
        p, level = self.p, self.level()
        if (problem := objective_problem(self.request.objective, p.info)) is not None:
            raise UserError(problem.replace("[training] objective", "distill --objective"))
        teacher = p.stored_society(MAFT, level)
        if teacher is None:
            raise UserError(f"run {p.run_row.id} has no stored society for iteration {level}")
        root = self.student_root(level)
        student = p.stored_society(DISTILL, level)
        if student is None:
            p.console.rule(f"[bold]{DISTILL}: the iteration-{level} society's consensus into one model")
            outcomes = self.teacher_debate(level, teacher, train)
            examples = distillation_examples(outcomes, {pr.id for pr in held_out}, p.task.equivalent)
            dataset = self._dataset(level, examples)
            if self.request.objective == "dpo":
                pairs = distillation_pairs(outcomes, {pr.id for pr in held_out}, p.task.equivalent)
                dataset = p.with_pairs(dataset, pairs)
                p.store.save_datasets([dataset])
            trained = p.finetune(DISTILL, level, [dataset], {(0, ROLE): root}, key=self._key, restart=False,
                                 objective=self.request.objective,
                                 root_model=None if root == BASE_MODEL_ID else root)
            model, job = trained.get((0, ROLE), (root, ""))
            n = p.config.agents
            student = Society.uniform(n, model)
            jobs = {(i, role): (model, job) for i in range(n) for role in ("generator", "critic")} if job else None
            p.save_society(DISTILL, level, student, Society.uniform(n, root), jobs)
        p.console.rule(f"[bold]{DISTILL}: the student answers each held-out problem once")
        name = str(DebateName(stage="eval", iteration=level, society=DISTILL))
        outcomes = p.debate(name, held_out, Society.uniform(1, student.generators[0]), level, p.settings(rounds=1))
        for row in evaluate(p.run_row.id, DISTILL, level, outcomes, p.task, p.config.seed):
            p.store.save_evaluation(row)
        if isinstance(p.backend, AveragesAdapters):  # adapters on disk (the local backend's)
            self.soup(p.backend, level, teacher, held_out)

    def student_root(self, level: int) -> str:
        """The model the student starts from (`BASE_MODEL_ID`: the run's): --model (which `check_student` has let
        through), else the one a student of iteration L (or its unfinished job) already has."""
        p = self.p
        return self.request.model or stored_student_root(p.store, p.run_row.id, level) or BASE_MODEL_ID

    def soup(self, backend: AveragesAdapters, level: int, teacher: Society, held_out: list[Problem]) -> None:
        """The zero-training baseline: the iteration-L generators' adapters averaged (`AveragesAdapters`), society
        `soup` at iteration L, evaluated as the student is. Skipped, and said, where a generator kept the base
        model (it has no adapter to average)."""
        p = self.p
        if any(g == BASE_MODEL_ID for g in teacher.generators):
            p.console.print(f"{SOUP}: a generator of iteration {level} kept the base model; no soup to make")
            return
        soup = p.stored_society(SOUP, level)
        if soup is None:
            path = backend.average_adapters(teacher.generators, p.workdir / "soup" / f"iteration-{level}")
            soup = p.save_society(SOUP, level, Society.uniform(p.config.agents, str(path)), teacher)
        p.console.rule(f"[bold]{SOUP}: the averaged generators answer each held-out problem once")
        name = str(DebateName(stage="eval", iteration=level, society=SOUP))
        outcomes = p.debate(name, held_out, Society.uniform(1, soup.generators[0]), level, p.settings(rounds=1))
        for row in evaluate(p.run_row.id, SOUP, level, outcomes, p.task, p.config.seed):
            p.store.save_evaluation(row)

    def teacher_debate(self, level: int, teacher: Society, train: list[Problem]) -> list[DebateOutcome]:
        """The iteration-L society's debate on the training problems: iteration L + 1's training debate is exactly
        that, so where it is stored it is read back (for free); otherwise a debate of its own, `distill/train-L`,
        whose responses are stored like any other's, so distilling again asks nothing."""
        p = self.p
        following = str(DebateName(stage="train", iteration=level + 1))
        if level < p.run_row.iterations_done:
            return p.debate(following, train, teacher, level + 1)
        return p.debate(str(DebateName(stage="train", iteration=level, society=DISTILL)), train, teacher, level)

    def _key(self, run_id: str, iteration: int, agent: int, role: str) -> str:
        return student_key(run_id, iteration)

    def _dataset(self, level: int, examples: list[Example]) -> DatasetRow:
        p = self.p
        path = p.dataset_path(DISTILL, level, 0, ROLE)
        examples, too_long = fit(examples, p.max_length)
        row = DatasetRow(run_id=p.run_row.id, society=DISTILL, iteration=level, agent=0, role=ROLE, path=str(path),
                         sha256="", n_examples=len(examples), n_generation=len(examples),
                         problem_ids=json.dumps([e.problem_id for e in examples]), n_too_long=too_long)
        row = p.write_dataset(examples, row, accumulate=False)
        p.store.save_datasets([row])
        return row


# -- what answering costs --------------------------------------------------------------------------------------------


class AnsweringCost(BaseModel):
    """One way of answering the held-out problems, its accuracy and its price per problem: what the student buys
    is the society's accuracy (or most of it) at one generation instead of N·(2M−1) plus summaries."""

    label: str
    society: str
    iteration: int
    accuracy: float
    stderr: float
    generations: float  # per problem, summaries included
    tokens: float  # prompt + completion, per problem
    usd: float  # per problem; 0 where nothing was billed (local)


def answering_costs(store: Store, run_id: str, task: str) -> list[AnsweringCost]:
    """Every evaluated society's debate on `task`'s held-out problems, and the single agent of the base and of each
    multiagent iteration (one round-1 answer: its accuracy row, its share of the debate's round-1 cost), from the
    stored responses and the ledger. Empty when the run has no student (nothing to compare)."""
    rows = [e for e in store.get_evaluations(run_id) if e.task == task]
    if not any(e.society in STUDENTS for e in rows):
        return []
    usd: dict[str, float] = {}
    for line in store.get_usage(run_id):
        if line.debate is not None:
            usd[line.debate] = usd.get(line.debate, 0.0) + line.cost_usd
    out: list[AnsweringCost] = []
    for e in sorted(rows, key=lambda e: (SOCIETIES[e.society].paper_rank if e.society in SOCIETIES else 99,
                                         e.iteration)):
        single = e.method == "single" and e.society in (BASE, MAFT)
        if e.method != "debate" and not single:
            continue
        name = str(DebateName(stage="eval", iteration=e.iteration, society=MAFT if e.society == BASE else e.society))
        everything = list(store.get_responses(run_id, name).values())
        responses = everything
        problems = len({r.problem_id for r in responses}) or 1
        agents = len({r.agent for r in responses}) or 1
        if single:
            first = [r for r in responses if r.round == 1 and r.kind == "answer"]
            responses, share = first, 1 / agents
        else:
            share = 1.0
        # a single agent's dollars: the debate's, in the share its round-1 answers took of the debate's calls
        spent = usd.get(name, 0.0) * (len(responses) / max(1, len(everything)) if single else 1.0)
        who = SOCIETIES[e.society].label if e.society in SOCIETIES else e.society
        label = f"{who}, single agent" if single else (who if e.society in STUDENTS else f"{who}, debate")
        out.append(AnsweringCost(
            label=label, society=e.society, iteration=e.iteration, accuracy=e.accuracy, stderr=e.stderr,
            generations=len(responses) * share / problems,
            tokens=sum(r.prompt_tokens + r.completion_tokens for r in responses) * share / problems,
            usd=spent * share / problems,
        ))
    return out


def answering_cost_table(costs: Sequence[AnsweringCost], title: str) -> Table:
    table = Table(title=title)
    for col in ("society", "iter", "accuracy", "generations / problem", "tokens / problem", "$ / problem"):
        table.add_column(col, justify="left" if col == "society" else "right")
    for c in costs:
        table.add_row(c.label, str(c.iteration), f"{c.accuracy:.3f} ± {c.stderr:.3f}", f"{c.generations:.2f}",
                      f"{c.tokens:,.0f}", f"{c.usd:.6f}" if c.usd else "—")
    return table
