"""`orchestrator run --dry-run`: the tokens and cost of a whole planned run, before anything is spent.

Rather than a second model of the prompts, the real debate code runs against a stand-in backend that answers
every request with filler of a chosen length, in an in-memory store, with the real price table. Answers at
half their `max_tokens` give the expected figure; answers at the full `max_tokens` (and every example kept for
training) give the upper bound. With `run --distill` the student's lines follow the last iteration's, simulated
the same way: the teacher's debate, the student's finetune and its one answer per held-out problem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from backends.base import BackendInfo, ChatRequest, ChatResult, FinetuneSpec, JobRef, JobState, Objective, Usage
from orchestrator.config import RunConfig
from orchestrator.costs import Ledger, Pricing, estimate_tokens, request_prompt_tokens
from orchestrator.debate import DebateOutcome, DebateRunner, DebateSettings, Society
from orchestrator.evaluate import MATCHED_MAJORITY
from orchestrator.names import DebateName
from orchestrator.societies import DISTILL, MAJORITY_FT, NO_SUMMARY, SOCIETIES, SOUP, STAR, STUDENTS
from orchestrator.store import RunRow, Store, UsageRow
from orchestrator.tasks import Task

FILLER = "word "  # 5 characters, about 1.25 tokens by the estimate: answers are sized in characters below


class _FillerBackend:
    """Answers everything with filler `fraction × max_tokens` tokens long; trains nothing."""

    name = "dry-run"

    def __init__(self, info: BackendInfo, fraction: float) -> None:
        self.info = info
        self.fraction = fraction

    def describe(self) -> BackendInfo:
        return self.info

    def chat(self, requests: Sequence[ChatRequest], on_result: Any = None) -> list[ChatResult]:
        results = []
        for r in requests:
            tokens = math.ceil(self.fraction * r.max_tokens)
            text = (FILLER * math.ceil(tokens * 4 / len(FILLER)))[: tokens * 4]
            result = ChatResult(key=r.key, text=text,
                                usage=Usage(prompt_tokens=request_prompt_tokens(r), completion_tokens=tokens))
            if on_result is not None:
                on_result(result)
            results.append(result)
        return results

    def start_finetune(self, spec: FinetuneSpec) -> JobRef:
        raise NotImplementedError

    def poll(self, job: JobRef) -> JobState:
        raise NotImplementedError

    def cancel(self, job: JobRef) -> None:
        pass

    def close(self) -> None:
        pass


class EstimateLine(BaseModel):
    stage: str
    iteration: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    trained_tokens: int
    expected_usd: float
    at_most_usd: float


def _simulate(config: RunConfig, task: Task, pricing: Pricing, info: BackendInfo, fraction: float,
              distill: bool = False) -> tuple[list[UsageRow], list[UsageRow]]:
    """The society's ledger lines, and (`distill`) the student's, apart: `_student` shows where they come from."""
    store = Store(Path(":memory:"))
    run = RunRow(id="dry-run", config=config.model_dump_json(), backend=config.backend, model=config.model,
                 task=config.task)
    store.save_run(run)
    ledger = Ledger(store, run.id, pricing, batch=config.openai.batch and config.backend == "openai")
    backend = _FillerBackend(info, fraction)
    settings = DebateSettings(rounds=config.rounds, summarize=config.summarize, generation=config.generation,
                              seed=config.seed)
    train = task.train_problems(config.train_size, config.seed)
    held_out = task.eval_problems(config.eval_size, config.seed)

    def debate(name: str, iteration: int, problems: list[Any], society: Society,
               rounds: int | None = None) -> list[DebateOutcome]:
        # No reuse of identical requests: filler answers would make every summary look the same, and an
        # estimate that counts each request once is the safe side of what a run can reuse.
        runner = DebateRunner(run_id=run.id, name=name, task=task, backend=backend, store=store,
                              settings=settings.model_copy(update={"rounds": rounds}) if rounds else settings,
                              iteration=iteration, ledger=ledger, reuse=False)
        return runner.run(problems, society)

    society = Society.base(config.agents)
    debate("eval-0", 0, held_out, society)
    lines: list[UsageRow] = []
    for iteration in range(1, config.iterations + 1):
        outcomes = debate(f"train-{iteration}", iteration, train, society)
        if config.training.objective != "sft" and config.preference.extra_samples:
            # the extra round-1 samples of a preference objective, at most every agent of every problem
            runner = DebateRunner(run_id=run.id, name=f"train-{iteration}", task=task, backend=backend, store=store,
                                  settings=settings, iteration=iteration, ledger=ledger, reuse=False)
            runner.ask_as([(o.problem, agent, society.generators[agent], o.agents[agent].messages[:1], f"extra{k}")
                           for o in outcomes for agent in range(config.agents)
                           for k in range(config.preference.extra_samples)], "extra samples")
        society = _train(outcomes, society, iteration, config, pricing, info, lines, run.id)
        debate(f"eval-{iteration}", iteration, held_out, society)
    student: list[UsageRow] = []
    if distill:
        level = config.iterations  # `run --distill` distils the last society: no iteration L + 1 debate to read
        teacher = debate(str(DebateName(stage="train", iteration=level, society=DISTILL)), level, train, society)
        tokens = info.training_epochs * _student_tokens(teacher)
        student.append(UsageRow(run_id=run.id, stage="training", iteration=level, agent=0, role="student",
                                model="base", ref=f"{DISTILL}/{level}/student", billing="training",
                                trained_tokens=tokens, cost_usd=pricing.training("base", tokens)))
        once = [(DISTILL, f"ft:{info.base_model}:dry-run:student-{level}")]
        if info.name == "local":  # the soup of the generators' adapters, evaluated as the student is
            once.append((SOUP, f"ft:{info.base_model}:dry-run:soup-{level}"))
        for name, model in once:
            debate(str(DebateName(stage="eval", iteration=level, society=name)), level, held_out,
                   Society.uniform(1, model), rounds=1)
    usage = store.get_usage(run.id)
    store.close()
    mine = [r for r in usage if _student(r) is not None]
    return [r for r in usage if _student(r) is None] + lines, mine + student


def _student(row: UsageRow) -> str | None:
    """The student society a ledger line belongs to (its debates carry the society's name), else None."""
    parsed = DebateName.parse(row.debate) if row.debate else None
    return parsed.society if parsed is not None and parsed.society in STUDENTS else None


def _student_tokens(teacher: list[DebateOutcome]) -> int:
    """At most what the student trains on in one epoch: every agent's round-1 and final chain of every training
    problem (2N per problem, as if every one agreed with a strict majority and none repeated another), each after
    the round-1 prompt, the single-pass example `distill.distillation_examples` makes of it."""
    total = 0
    for outcome in teacher:
        for transcript in outcome.agents:
            prompt = estimate_tokens(transcript.messages[0].content)
            chains = [transcript.messages[1]] + ([transcript.messages[-1]] if len(transcript.messages) > 2 else [])
            total += sum(prompt + estimate_tokens(m.content) for m in chains)
    return total


def _pair_tokens(outcomes: list[DebateOutcome], agent: int, role: str, info: BackendInfo) -> int:
    """At most what agent n's pairs for one role hold: a generator pair per problem (round-1 prompt, chosen and
    rejected answer), a critic pair per later round (its conversation so far and two answers); none for critics on
    a one-turn-only provider (OpenAI), which is sent none."""
    if role == "critic" and info.one_turn_pairs:
        return 0
    total = 0
    for outcome in outcomes:
        messages = outcome.agents[agent].messages
        rounds = [0] if role == "generator" else range(1, len(messages) // 2)
        for index in rounds:
            context = messages[: 2 * index + 1]
            answer = estimate_tokens(messages[2 * index + 1].content)
            total += sum(estimate_tokens(m.content) for m in context) + 2 * answer
    return total


def _train(outcomes: list[DebateOutcome], society: Society, iteration: int, config: RunConfig, pricing: Pricing,
           info: BackendInfo, lines: list[UsageRow], run_id: str) -> Society:
    """Every example kept: generators learn round 1, critics the whole conversation; under a preference objective
    the pair files too (`_pair_tokens`), instead of (dpo) or after (sft-then-dpo) the SFT files, at the DPO rate."""
    objective = config.training.objective
    new = Society(generators=[], critics=[])
    for agent in range(config.agents):
        for role, models in (("generator", society.generators), ("critic", society.critics)):
            dpo = 0
            if role == "critic" and config.rounds == 1:
                tokens = 0  # critics never speak, so they get no data
            else:
                turns = 2 if role == "generator" else None  # generators learn round 1, critics all of it
                text = (m.content for o in outcomes for m in o.agents[agent].messages[:turns])
                tokens = info.training_epochs * sum(estimate_tokens(t) for t in text)
                if objective != "sft":
                    dpo = info.training_epochs * _pair_tokens(outcomes, agent, role, info)
                    tokens = dpo + (0 if objective == "dpo" else tokens)
            if config.strategy == "accumulate":  # all of this agent's data so far: the last line's plus this
                tokens += sum(r.trained_tokens for r in lines
                              if (r.iteration, r.agent, r.role) == (iteration - 1, agent, role))
            start = models[agent] if config.strategy == "continue" else "base"
            lines.append(UsageRow(run_id=run_id, stage="training", iteration=iteration, agent=agent, role=role,
                                  model=start, ref=f"{iteration}/{agent}/{role}", billing="training",
                                  trained_tokens=tokens, cost_usd=pricing.training(start, tokens, dpo)))
            finetuned = f"ft:{info.base_model}:dry-run:{role}-{agent}-{iteration}"
            (new.generators if role == "generator" else new.critics).append(finetuned)
    return new


def _aggregate(rows: list[UsageRow], ceiling: list[UsageRow]) -> dict[tuple[str, int], EstimateLine]:
    out: dict[tuple[str, int], EstimateLine] = {}
    for row, top in zip(rows, ceiling, strict=True):
        key = (row.stage, row.iteration or 0)
        line = out.setdefault(key, EstimateLine(stage=key[0], iteration=key[1], calls=0, prompt_tokens=0,
                                                completion_tokens=0, trained_tokens=0, expected_usd=0.0,
                                                at_most_usd=0.0))
        line.calls += 1 if row.billing != "training" else 0  # a finetune is no call, whatever its stage's name
        line.prompt_tokens += row.prompt_tokens
        line.completion_tokens += row.completion_tokens
        line.trained_tokens += row.trained_tokens
        line.expected_usd += row.cost_usd
        line.at_most_usd += top.cost_usd
    return out


def _training_share(rows: list[UsageRow], baseline: str, iteration: int) -> float:
    """The share of the society's training tokens a baseline trains on: STaR one generator's data, majority FT
    and no-critic the generators', single-agent FT and no-summary everything."""
    roles = SOCIETIES[baseline].trained_roles

    def kept(row: UsageRow) -> bool:
        if roles == "first-generator":
            return row.agent == 0 and row.role == "generator"
        return row.role == "generator" if roles == "generators" else True

    mine = [r for r in rows if r.stage == "training" and r.iteration == iteration]
    total = sum(r.trained_tokens for r in mine)
    return sum(r.trained_tokens for r in mine if kept(r)) / total if total else 0.0


def _calls_per_problem(config: RunConfig) -> int:
    """A debate's requests per problem: N answers a round, and N summaries in each later round when summarizing."""
    n, m = config.agents, config.rounds
    return n * m + (n * (m - 1) if config.summarize else 0)


def _baseline_lines(society: dict[tuple[str, int], EstimateLine], rows: list[UsageRow], config: RunConfig,
                    baseline: str) -> list[EstimateLine]:
    """A baseline's cost, scaled from the society's own lines (approximate, on the safe side).

    Each baseline is evaluated like the society (one evaluation debate per iteration). At iteration 1 its
    debate is the base society's, answered from the store for free, except STaR's (one answer and at most one
    rationalization per problem) and no-summary's critic rounds; later iterations debate with its own models.
    """
    n, per_problem = config.agents, _calls_per_problem(config)
    later = {STAR: 2 / per_problem, MAJORITY_FT: n / per_problem}.get(baseline, 1.0)
    first = {STAR: 2 / per_problem, NO_SUMMARY: 1 - n / per_problem}.get(baseline, 0.0)
    lines = []
    for (stage, iteration), line in society.items():
        if iteration == 0:
            continue
        share = {"evaluation": 1.0, "debate": first if iteration == 1 else later,
                 "training": _training_share(rows, baseline, iteration)}[stage]
        if share > 0:
            lines.append(EstimateLine(
                stage=f"{baseline} · {stage}", iteration=iteration, calls=round(line.calls * share),
                prompt_tokens=round(line.prompt_tokens * share),
                completion_tokens=round(line.completion_tokens * share),
                trained_tokens=round(line.trained_tokens * share), expected_usd=line.expected_usd * share,
                at_most_usd=line.at_most_usd * share))
    return lines


def _matched_lines(lines: list[EstimateLine], config: RunConfig) -> list[EstimateLine]:
    """The compute-matched majority vote: N (M - 1) more round-1 answers per held-out problem for each society's
    evaluation (a student's aside), a share of its evaluation line (a round-1 answer is about as long as a
    critic's), summed per iteration."""
    share = config.agents * (config.rounds - 1) / _calls_per_problem(config)
    students = tuple(f"{s} · " for s in STUDENTS)
    out: dict[int, EstimateLine] = {}
    for line in lines:
        if not line.stage.endswith("evaluation") or line.stage.startswith(students) or share == 0:
            continue
        total = out.setdefault(line.iteration, EstimateLine(
            stage=f"{MATCHED_MAJORITY} · evaluation", iteration=line.iteration, calls=0, prompt_tokens=0,
            completion_tokens=0, trained_tokens=0, expected_usd=0.0, at_most_usd=0.0))
        total.calls += round(line.calls * share)
        total.prompt_tokens += round(line.prompt_tokens * share)
        total.completion_tokens += round(line.completion_tokens * share)
        total.expected_usd += line.expected_usd * share
        total.at_most_usd += line.at_most_usd * share
    return list(out.values())


def _objective_lines(society: dict[tuple[str, int], EstimateLine], config: RunConfig, task: Task, pricing: Pricing,
                     info: BackendInfo, baseline: str, objective: Objective) -> list[EstimateLine]:
    """An objective variant's cost: the run simulated again under that objective (its pair files, its extra
    samples), every iteration's lines but the base evaluation; its first training debate is the base society's,
    answered from the store, so only what that objective adds to it (the extra samples) is counted."""
    variant = config.model_copy(update={"training": config.training.model_copy(update={"objective": objective})})
    expected, _ = _simulate(variant, task, pricing, info, 0.5)
    at_most, _ = _simulate(variant, task, pricing, info, 1.0)
    lines = []
    for (stage, iteration), line in _aggregate(expected, at_most).items():
        if iteration == 0:
            continue
        if (stage, iteration) == ("debate", 1) and (shared := society.get(("debate", 1))) is not None:
            line = EstimateLine(stage=stage, iteration=iteration, calls=line.calls - shared.calls,
                                prompt_tokens=line.prompt_tokens - shared.prompt_tokens,
                                completion_tokens=line.completion_tokens - shared.completion_tokens,
                                trained_tokens=0, expected_usd=max(0.0, line.expected_usd - shared.expected_usd),
                                at_most_usd=max(0.0, line.at_most_usd - shared.at_most_usd))
            if line.calls <= 0:
                continue
        lines.append(line.model_copy(update={"stage": f"{baseline} · {stage}"}))
    return lines


def _student_lines(expected: list[UsageRow], at_most: list[UsageRow]) -> list[EstimateLine]:
    """`run --distill`'s own lines, by society and stage: the teacher's debate on the training problems
    ("distill · debate"), the student's one finetune, and one answer per held-out problem by the student (and,
    on the local backend, by the soup)."""
    def named(rows: list[UsageRow]) -> list[UsageRow]:
        return [r.model_copy(update={"stage": f"{_student(r) or DISTILL} · {r.stage}"}) for r in rows]

    return list(_aggregate(named(expected), named(at_most)).values())


def estimate_run(config: RunConfig, task: Task, pricing: Pricing, info: BackendInfo,
                 baselines: Sequence[str] = (), *, distill: bool = False) -> list[EstimateLine]:
    """Every line of the planned run; with `distill` (`run --distill`) the student's too."""
    expected, expected_student = _simulate(config, task, pricing, info, 0.5, distill)
    at_most, at_most_student = _simulate(config, task, pricing, info, 1.0, distill)
    society = _aggregate(expected, at_most)
    lines = list(society.values()) + _student_lines(expected_student, at_most_student)
    for baseline in baselines:
        objective = SOCIETIES[baseline].objective if baseline in SOCIETIES else None
        if baseline == MATCHED_MAJORITY:
            continue
        if objective is None:
            lines += _baseline_lines(society, at_most, config, baseline)
        else:
            lines += _objective_lines(society, config, task, pricing, info, baseline, objective)
    if MATCHED_MAJORITY in baselines:  # every society evaluated above, the baselines' included
        lines += _matched_lines(lines, config)
    order = {"debate": 0, "training": 1, "evaluation": 2}
    return sorted(lines, key=lambda e: (e.iteration, e.stage not in order, order.get(e.stage, 3), e.stage))
