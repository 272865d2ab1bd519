"""Multiagent debate over many problems at once, one round at a time, resumable response by response.

Round 1: each generator answers the task prompt. Round m > 1: for agent n, the *other* agents' answers of round
m − 1 (never the current round: a bug of the research code) are summarized by the base model (or concatenated),
and critic n answers in its own conversation. All requests of a round go to the backend together, so a local
backend can batch every agent through one forward pass and a hosted one can run them concurrently.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence

from pydantic import BaseModel, Field
from rich.progress import Progress

import prompts
from backends.base import BASE_MODEL_ID, Backend, ChatMessage, ChatRequest, ChatResult
from foundation.crashpoints import crashpoint
from orchestrator.config import GenerationConfig
from orchestrator.costs import Ledger
from orchestrator.interrupts import never
from orchestrator.store import DebateRow, ResponseRow, Store
from orchestrator.tasks import Problem, Task
from orchestrator.voting import Vote, majority_vote


class Society(BaseModel):
    """The model id of each agent's generator and critic."""

    generators: list[str]
    critics: list[str]

    @classmethod
    def base(cls, agents: int) -> Society:
        return cls.uniform(agents, BASE_MODEL_ID)

    @classmethod
    def uniform(cls, agents: int, model: str) -> Society:
        """Every generator and critic the same model (the base society, or a single-model baseline's)."""
        return cls(generators=[model] * agents, critics=[model] * agents)

    def model(self, agent: int, role: str) -> str:
        return (self.generators if role == "generator" else self.critics)[agent]

    def replaced(self, models: dict[tuple[int, str], tuple[str, str]]) -> Society:
        """This society with the models trained for some (agent, role) slots swapped in."""
        def pick(agent: int, role: str) -> str:
            return models[(agent, role)][0] if (agent, role) in models else self.model(agent, role)

        n = range(len(self.generators))
        return Society(generators=[pick(i, "generator") for i in n], critics=[pick(i, "critic") for i in n])


class DebateSettings(BaseModel):
    rounds: int
    summarize: bool
    generation: GenerationConfig
    seed: int


class AgentTranscript(BaseModel):
    """Agent n's whole conversation on one problem: user and assistant turns alternate, one pair per round."""

    messages: list[ChatMessage]
    answers: list[str | None]  # the readable answer of each round (None: unparseable, or cut at max_tokens)
    cut: list[bool] = Field(default_factory=list)  # each round's reply stopped at max_tokens
    tokens: list[int] = Field(default_factory=list)  # each round's conversation through its reply, in tokens


class DebateOutcome(BaseModel):
    problem: Problem
    agents: list[AgentTranscript]
    vote: Vote


class _Pending(BaseModel):
    request: ChatRequest
    problem_id: str
    round: int
    agent: int
    kind: str  # answer | summary


def truncated(row: ResponseRow) -> bool:
    """The reply stopped at `max_tokens` (finish reason "length"): it was cut mid-answer."""
    return row.finish_reason == "length"


def readable_answer(row: ResponseRow) -> str | None:
    """The answer a response counts with: none when it was cut at `max_tokens`.

    The stored `answer` is what the text's extractor reads, kept as it was (history is never rewritten); for
    arithmetic and GSM8K that falls back to the last number, which in a cut reply is a number out of half-finished
    reasoning. So a cut reply neither votes nor becomes a training target, and is graded as no answer, decided
    here at read time: a fresh row and a stored or reused one give the same outcome, so a resumed run ends
    exactly like an uninterrupted one.
    """
    return None if truncated(row) else row.answer


def request_seed(seed: int, slot: str) -> int:
    """A per-request seed from the run's seed and the request's place (problem, round, agent, kind), not from the
    run's or the debate's name: equal configs sample equally, and the same question put to the same model in
    another debate of the run (a baseline, an ablation) is the same request, answered once."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{slot}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def request_hash(request: ChatRequest) -> str:
    """What makes two requests the same: model, conversation, sampling and seed (not our key)."""
    return hashlib.sha256(request.model_dump_json(exclude={"key"}).encode()).hexdigest()


class DebateRunner:
    """Runs one named debate (e.g. "train-1", "eval-0") and stores every response the moment it arrives."""

    def __init__(
        self,
        *,
        run_id: str,
        name: str,
        task: Task,
        backend: Backend,
        store: Store,
        settings: DebateSettings,
        progress: Progress | None = None,
        iteration: int | None = None,
        ledger: Ledger | None = None,
        reuse: bool = True,
        checkpoint: Callable[[], None] = never,
    ) -> None:
        self.run_id = run_id
        self.name = name
        self.task = task
        self.backend = backend
        self.store = store
        self.settings = settings
        self.progress = progress
        self.iteration = iteration
        self.ledger = ledger
        self.reuse = reuse
        self.checkpoint = checkpoint

    # public ----------------------------------------------------------------------------------------------

    def run(self, problems: Sequence[Problem], society: Society) -> list[DebateOutcome]:
        n_agents = len(society.generators)
        stored = self.store.get_responses(self.run_id, self.name)
        transcripts = {(p.id, n): AgentTranscript(messages=[], answers=[]) for p in problems for n in range(n_agents)}
        for rnd in range(1, self.settings.rounds + 1):
            if rnd == 1:
                pending = [self._round1(p, n, society) for p in problems for n in range(n_agents)]
            else:
                summaries: dict[tuple[str, int], str] = {}
                if self.settings.summarize:
                    asks = [self._summary(p, n, rnd, transcripts, n_agents) for p in problems for n in range(n_agents)]
                    done = self._execute(asks, stored, f"round {rnd} summaries")
                    summaries = {(a.problem_id, a.agent): done[a.request.key].text for a in asks}
                pending = [
                    self._critic(p, n, rnd, transcripts, summaries, society) for p in problems for n in range(n_agents)
                ]
            done = self._execute(pending, stored, f"round {rnd} answers")
            for item in pending:
                row = done[item.request.key]
                transcript = transcripts[(item.problem_id, item.agent)]
                transcript.messages = [*item.request.messages, ChatMessage(role="assistant", content=row.text)]
                transcript.answers.append(readable_answer(row))
                transcript.cut.append(truncated(row))
                transcript.tokens.append(row.prompt_tokens + row.completion_tokens)
        return self._vote(problems, transcripts, n_agents)

    def ask(self, items: Sequence[tuple[Problem, str, list[ChatMessage]]], kind: str, what: str) -> list[ResponseRow]:
        """Single questions outside a debate (e.g. STaR's rationalizations): (problem, model, messages) each,
        stored, reused and costed like debate answers."""
        return self.ask_as([(problem, 0, model, messages, kind) for problem, model, messages in items], what)

    def ask_as(self, items: Sequence[tuple[Problem, int, str, list[ChatMessage], str]],
               what: str) -> list[ResponseRow]:
        """As `ask`, each as its own agent and kind, (problem, agent, model, messages, kind), keyed
        `{problem}/r1/a{agent}/{kind}` and sampled by this runner's settings (e.g. DPO's extra round-1 samples of
        agent n at temperature 1, kinds extra0, extra1, ...)."""
        stored = self.store.get_responses(self.run_id, self.name)
        pending = [
            _Pending(request=self._request(self._key(problem.id, 1, agent, kind), model, messages,
                                           self.settings.generation.max_tokens),
                     problem_id=problem.id, round=1, agent=agent, kind=kind)
            for problem, agent, model, messages, kind in items
        ]
        done = self._execute(pending, stored, what)
        return [done[p.request.key] for p in pending]

    # requests --------------------------------------------------------------------------------------------

    def _key(self, problem_id: str, rnd: int, agent: int, kind: str) -> str:
        return f"{problem_id}/r{rnd}/a{agent}/{kind}"

    def _request(self, slot: str, model: str, messages: list[ChatMessage], max_tokens: int) -> ChatRequest:
        gen = self.settings.generation
        return ChatRequest(
            key=f"{self.run_id}/{self.name}/{slot}",
            model=model,
            messages=tuple(messages),
            max_tokens=max_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            seed=request_seed(self.settings.seed, slot),
        )

    def _round1(self, problem: Problem, agent: int, society: Society) -> _Pending:
        text = prompts.render(f"{self.task.family}/round1.txt", question=problem.question)
        key = self._key(problem.id, 1, agent, "answer")
        request = self._request(
            key, society.generators[agent], [ChatMessage(role="user", content=text)],
            self.settings.generation.max_tokens,
        )
        return _Pending(request=request, problem_id=problem.id, round=1, agent=agent, kind="answer")

    def _others(self, problem: Problem, agent: int, transcripts: dict[tuple[str, int], AgentTranscript],
                n_agents: int, item: str) -> str:
        """The other agents' answers of the previous round, each rendered with the `item` template, as one block:
        the summarizer's items (`response_item.txt`) or the task's own for concatenation (`concat_item.txt`:
        the sources word them differently per task)."""
        return "".join(
            prompts.render(item, response=transcripts[(problem.id, k)].messages[-1].content)
            for k in range(n_agents)
            if k != agent
        )

    def _summary(self, problem: Problem, agent: int, rnd: int, transcripts: dict[tuple[str, int], AgentTranscript],
                 n_agents: int) -> _Pending:
        others = self._others(problem, agent, transcripts, n_agents, "response_item.txt")
        text = prompts.render("summarize.txt", responses=others)
        key = self._key(problem.id, rnd, agent, "summary")
        request = self._request(
            key, BASE_MODEL_ID, [ChatMessage(role="user", content=text)], self.settings.generation.summary_max_tokens
        )
        return _Pending(request=request, problem_id=problem.id, round=rnd, agent=agent, kind="summary")

    def _critic(self, problem: Problem, agent: int, rnd: int, transcripts: dict[tuple[str, int], AgentTranscript],
                summaries: dict[tuple[str, int], str], society: Society) -> _Pending:
        family = self.task.family
        if self.settings.summarize:
            text = prompts.render(
                f"{family}/critic_summary.txt", summary=summaries[(problem.id, agent)], question=problem.question
            )
        else:
            text = prompts.render(
                f"{family}/critic_concat.txt",
                responses=self._others(problem, agent, transcripts, len(society.generators),
                                       f"{family}/concat_item.txt"),
                question=problem.question,
            )
        history = transcripts[(problem.id, agent)].messages
        key = self._key(problem.id, rnd, agent, "answer")
        request = self._request(
            key, society.critics[agent], [*history, ChatMessage(role="user", content=text)],
            self.settings.generation.max_tokens,
        )
        return _Pending(request=request, problem_id=problem.id, round=rnd, agent=agent, kind="answer")

    # execution -------------------------------------------------------------------------------------------

    def _execute(self, pending: list[_Pending], stored: dict[str, ResponseRow], what: str) -> dict[str, ResponseRow]:
        """Ask the backend for what is not stored yet; store each answer as it arrives."""
        by_key = {p.request.key: p for p in pending}
        if self.reuse:
            self._reuse([p for p in pending if p.request.key not in stored], stored)
        missing = [p.request for p in pending if p.request.key not in stored]
        if missing and self.ledger is not None:
            self.ledger.check_chat(missing, f"{self.name} {what} ({len(missing)} requests)")
        if missing:
            task_id = (
                self.progress.add_task(f"{self.name} · {what}", total=len(missing)) if self.progress else None
            )

            def keep(result: ChatResult) -> None:
                item = by_key[result.key]
                row = ResponseRow(
                    request_hash=request_hash(item.request),
                    key=result.key,
                    run_id=self.run_id,
                    debate=self.name,
                    problem_id=item.problem_id,
                    round=item.round,
                    agent=item.agent,
                    kind=item.kind,
                    model_id=item.request.model,
                    messages=json.dumps([m.model_dump(exclude_none=True) for m in item.request.messages]),
                    text=result.text,
                    answer=self.task.extract_answer(result.text) if item.kind != "summary" else None,
                    finish_reason=result.finish_reason,
                    prompt_tokens=result.usage.prompt_tokens,
                    completion_tokens=result.usage.completion_tokens,
                    cached_tokens=result.usage.cached_tokens,
                )
                usage = self.ledger.chat_line(row, result, self.iteration) if self.ledger is not None else None
                self.store.save_response(row, usage)
                crashpoint(f"debate.{self.name}.stored")  # e.g. debate.train-1.stored#20
                stored[row.key] = row
                if self.progress is not None and task_id is not None:
                    self.progress.advance(task_id)
                self.checkpoint()  # a safe point: this answer is stored

            self.backend.chat(missing, on_result=keep)
        return {key: stored[key] for key in by_key}

    def _reuse(self, pending: list[_Pending], stored: dict[str, ResponseRow]) -> None:
        """Answer from the store what was already asked, word for word, elsewhere in the run: free, and the
        same answer (a debate of the base society on the same problems, a baseline's first samples)."""
        for item in pending:
            digest = request_hash(item.request)
            earlier = self.store.find_response(self.run_id, digest)
            if earlier is None:
                continue
            row = earlier.model_copy(update={
                "key": item.request.key, "debate": self.name, "problem_id": item.problem_id, "round": item.round,
                "agent": item.agent, "kind": item.kind, "created_at": time.time(),
            })
            self.store.save_response(row)  # no ledger line: nothing was paid for it
            stored[row.key] = row

    # voting ----------------------------------------------------------------------------------------------

    def _vote(self, problems: Sequence[Problem], transcripts: dict[tuple[str, int], AgentTranscript],
              n_agents: int) -> list[DebateOutcome]:
        outcomes: list[DebateOutcome] = []
        rows: list[DebateRow] = []
        for problem in problems:
            agents = [transcripts[(problem.id, n)] for n in range(n_agents)]
            finals = [a.answers[-1] for a in agents]
            # Seeded by problem, not by debate name: the same answers always give the same majority.
            rng = random.Random(f"{self.settings.seed}:vote:{problem.id}")
            vote = majority_vote(finals, self.task.equivalent, rng)
            outcomes.append(DebateOutcome(problem=problem, agents=agents, vote=vote))
            rows.append(
                DebateRow(
                    run_id=self.run_id,
                    debate=self.name,
                    problem_id=problem.id,
                    final_answer=vote.final,
                    correct=int(self.task.is_correct(vote.final, problem)) if problem.graded else None,
                    votes=json.dumps(finals),
                    consensus=vote.consensus,
                )
            )
        self.store.save_debates(rows)
        return outcomes
