"""Sample debates for the report: problems of the evaluation debates where a critic corrected itself, then
problems where the agents disagreed in round 1, with every agent's answers, graded against the ground truth."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from orchestrator.debate import readable_answer, truncated
from orchestrator.report.labels import debate_society, parse_eval_debate
from orchestrator.societies import MAFT
from orchestrator.store import DebateRow, ProblemRow, ResponseRow, Store

SAMPLES_PER_KIND = 3


LONG_TEXT_CHARS = 240  # model text longer than this (or than a few lines) starts collapsed


@dataclass
class Turn:
    round: int
    text: str
    answer: str | None
    correct: bool | None  # None: grading was not possible
    summary: str | None = None  # what this agent's critic was shown before answering this round
    cut: bool = False  # the reply stopped at max_tokens: it counts as no answer

    @property
    def long(self) -> bool:
        return _is_long(self.text)

    @property
    def preview(self) -> str:
        return _preview(self.text)


@dataclass
class AgentView:
    agent: int  # 1-based
    turns: list[Turn]
    corrected: bool = False


@dataclass
class Sample:
    kind: str  # disagreement | correction
    reason: str
    debate: str
    society: str
    problem_id: str
    question: str
    truth: str
    final: str | None
    final_correct: bool | None
    votes: list[str | None]
    consensus: float
    agents: list[AgentView]

    @property
    def long_question(self) -> bool:
        return _is_long(self.question)


def _is_long(text: str) -> bool:
    return len(text) > LONG_TEXT_CHARS or text.count("\n") > 4


def _preview(text: str, limit: int = 110) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


Grader = Callable[[str | None, str], bool | None]


def _exact(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def make_grader(task_spec: str) -> tuple[Grader, Callable[[str, str], bool]]:
    """The task's own grader when the task still loads (a user .jsonl may be gone), else exact match."""
    try:
        from orchestrator.tasks import Problem, get_task

        task = get_task(task_spec)
    except Exception:  # any failure just means a plainer grader
        return (lambda a, truth: None if a is None else a.strip() == truth.strip()), _exact

    def grade(answer: str | None, truth: str) -> bool | None:
        return task.is_correct(answer, Problem(id="-", question="", answer=truth))

    return grade, task.equivalent


def eval_debate_names(store: Store, run_id: str) -> list[str]:
    """Evaluation debates, latest iteration first (the finetuned society is what a reader came to see), then
    multiagent FT before other societies."""
    parsed = {name: p for name in store.debate_names(run_id) if (p := parse_eval_debate(name)) is not None}
    return sorted(parsed, key=lambda n: (-parsed[n][1], parsed[n][0] != MAFT, n))


def pick_samples(store: Store, run_id: str, names: Sequence[str], debates: dict[str, list[DebateRow]],
                 task_spec: str) -> list[Sample]:
    """Up to a few problems where a critic corrected itself, then a few where the agents disagreed in round 1;
    each problem once (the same question in two debates would teach the reader nothing new)."""
    grade, same = make_grader(task_spec)
    problems = {p.problem_id: p for p in store.get_problems(run_id, "eval")}
    order = {pid: p.position for pid, p in problems.items()}
    corrections: list[Sample] = []
    disagreements: list[Sample] = []
    shown: set[str] = set()
    for name in names:
        if len(corrections) >= SAMPLES_PER_KIND and len(disagreements) >= SAMPLES_PER_KIND:
            break
        responses = index_responses(store.get_responses(run_id, name).values())
        for row in sorted(debates.get(name, []), key=lambda d: order.get(d.problem_id, 1 << 30)):
            problem = problems.get(row.problem_id)
            if problem is None or row.problem_id not in responses or row.problem_id in shown:
                continue
            sample = _sample(name, row, problem, responses[row.problem_id], grade, same)
            kept = {"correction": corrections, "disagreement": disagreements}.get(sample.kind)
            if kept is not None and len(kept) < SAMPLES_PER_KIND:
                kept.append(sample)
                shown.add(row.problem_id)
    return corrections + disagreements


def index_responses(rows: Iterable[ResponseRow]) -> dict[str, dict[tuple[int, int, str], ResponseRow]]:
    out: dict[str, dict[tuple[int, int, str], ResponseRow]] = defaultdict(dict)
    for r in rows:
        out[r.problem_id][(r.round, r.agent, r.kind)] = r
    return out


def _sample(name: str, row: DebateRow, problem: ProblemRow, responses: dict[tuple[int, int, str], ResponseRow],
            grade: Grader, same: Callable[[str, str], bool]) -> Sample:
    agents_n = 1 + max(a for _, a, _ in responses)
    last = max(r for r, _, _ in responses)
    agents = [_agent_view(n, last, responses, problem.answer, grade) for n in range(agents_n)]
    first = [a.turns[0].answer if a.turns else None for a in agents]
    disagreed = any(a is None for a in first) or any(not same(first[0] or "", a or "") for a in first[1:])
    corrected = [a.agent for a in agents if a.corrected]
    if corrected:
        kind, reason = "correction", _correction_reason(corrected)
    elif disagreed:
        kind, reason = "disagreement", "the agents disagreed in round 1"
    else:
        kind, reason = "agreement", "the agents agreed"
    return Sample(kind=kind, reason=reason, debate=name, society=debate_society(name), problem_id=problem.problem_id,
                  question=problem.question, truth=problem.answer, final=row.final_answer,
                  final_correct=None if row.correct is None else bool(row.correct), votes=_votes(row.votes),
                  consensus=row.consensus, agents=agents)


def _correction_reason(agents: Sequence[int]) -> str:
    who = ", ".join(str(a) for a in agents)
    plural = "s" if len(agents) > 1 else ""
    return f"agent{plural} {who}: wrong or unreadable in round 1, right at the end"


def _agent_view(agent: int, last: int, responses: dict[tuple[int, int, str], ResponseRow], truth: str,
                grade: Grader) -> AgentView:
    turns = []
    for rnd in range(1, last + 1):
        answer = responses.get((rnd, agent, "answer"))
        if answer is None:
            continue
        summary = responses.get((rnd, agent, "summary"))
        readable = readable_answer(answer)
        turns.append(Turn(round=rnd, text=answer.text, answer=readable, correct=grade(readable, truth),
                          summary=summary.text if summary else None, cut=truncated(answer)))
    corrected = len(turns) > 1 and turns[0].correct is False and turns[-1].correct is True
    return AgentView(agent=agent + 1, turns=turns, corrected=corrected)


def _votes(text: str) -> list[str | None]:
    try:
        votes = json.loads(text)
    except ValueError:
        return []
    return [None if v is None else str(v) for v in votes] if isinstance(votes, list) else []
