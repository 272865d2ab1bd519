"""Accuracy of a society on the held-out problems, read off one evaluation debate.

One debate gives three methods at once: a single agent (every agent's round-1 answer, each an independent
sample of the base society's model: averaged over all N of them), the majority vote of the N independent
round-1 answers, and the debate's final majority. Ground truth is looked at only here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence

from rich.console import Console

from backends.base import Backend, SupportsScoring
from foundation.errors import UserError
from orchestrator.config import DiversityConfig
from orchestrator.costs import Ledger
from orchestrator.debate import AgentTranscript, DebateOutcome, Society, readable_answer, truncated
from orchestrator.diversity import (
    CRITIC_NLL,
    MINILM_MAX_TOKENS,
    BackendEmbedder,
    Embedder,
    MiniLMEmbedder,
    consensus,
    critic_nll,
    embedding_dissimilarity,
    minilm_dir,
)
from orchestrator.store import DiversityRow, EvaluationRow, ResponseRow
from orchestrator.tasks import Task
from orchestrator.voting import majority_vote

MATCHED_MAJORITY = "majority-matched"  # the compute-matched majority vote's method (`orchestrator.matched`)


def accuracy(correct: int, n: int) -> tuple[float, float]:
    """Accuracy and its standard error sqrt(p(1 − p) / n)."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    return p, math.sqrt(p * (1 - p) / n)


def mean_share(shares: Sequence[float]) -> tuple[float, float]:
    """The mean of per-problem shares correct and its standard error over problems, sqrt(mean((s − p)²) / n).

    The N answers to one problem are not independent of each other (they share its difficulty), so the problems
    are the units: the standard error is that of a mean of n per-problem values, not of N·n coin flips, which
    would understate it. With the population variance (divisor n, not n − 1) a single answer per problem gives
    exactly `accuracy`'s sqrt(p(1 − p) / n), so the rows of a table are on one footing.
    """
    n = len(shares)
    if n == 0:
        return 0.0, 0.0
    p = math.fsum(shares) / n
    return p, math.sqrt(math.fsum((s - p) ** 2 for s in shares) / n / n)


def _single(run_id: str, society: str, iteration: int, outcomes: Sequence[DebateOutcome],
            task: Task) -> EvaluationRow:
    """A single agent's accuracy, from all N round-1 answers: the same quantity as one agent's, with less noise."""
    shares, correct, answers, unparseable, cut = [], 0, 0, 0, 0
    for o in outcomes:
        right = [task.is_correct(a.answers[0], o.problem) for a in o.agents]
        shares.append(sum(right) / len(right))
        correct += sum(right)
        answers += len(right)
        unparseable += sum(a.answers[0] is None for a in o.agents)
        cut += sum(_cut(a, 0) for a in o.agents)
    acc, se = mean_share(shares)
    return EvaluationRow(run_id=run_id, task=task.name, society=society, iteration=iteration, method="single",
                         n=len(outcomes), answers=answers, correct=correct, accuracy=acc, stderr=se,
                         unparseable=unparseable, truncated=cut)


def _row(run_id: str, society: str, iteration: int, method: str, answers: Sequence[str | None],
         cut: Sequence[bool], outcomes: Sequence[DebateOutcome], task: Task) -> EvaluationRow:
    correct = sum(task.is_correct(a, o.problem) for a, o in zip(answers, outcomes, strict=True))
    acc, se = accuracy(correct, len(outcomes))
    return EvaluationRow(
        run_id=run_id,
        task=task.name,
        society=society,
        iteration=iteration,
        method=method,
        n=len(outcomes),
        correct=correct,
        accuracy=acc,
        stderr=se,
        unparseable=sum(a is None for a in answers),
        truncated=sum(a is None and c for a, c in zip(answers, cut, strict=True)),
    )


def evaluate(
    run_id: str, society: str, iteration: int, outcomes: Sequence[DebateOutcome], task: Task, seed: int
) -> list[EvaluationRow]:
    """The three rows; each counts its unanswered problems (the single agent: its unanswered round-1 answers)
    and, of those, how many are unanswered because a reply was cut at max_tokens (for a vote: at least one of
    its voters was cut)."""
    majority = [
        majority_vote(
            [a.answers[0] for a in o.agents], task.equivalent, random.Random(f"{seed}:majority:{o.problem.id}")
        ).final
        for o in outcomes
    ]
    final = [o.vote.final for o in outcomes]
    return [
        _single(run_id, society, iteration, outcomes, task),
        _row(run_id, society, iteration, "majority", majority,
             [any(_cut(a, 0) for a in o.agents) for o in outcomes], outcomes, task),
        _row(run_id, society, iteration, "debate", final, [any(_cut(a, -1) for a in o.agents) for o in outcomes],
             outcomes, task),
    ]


def matched_majority_row(run_id: str, society: str, iteration: int, outcomes: Sequence[DebateOutcome],
                         extra: Sequence[Sequence[ResponseRow]], task: Task, seed: int) -> EvaluationRow:
    """The compute-matched majority vote (`orchestrator.matched`): per problem, its N round-1 answers and the
    `extra` round-1 samples vote (a cut reply votes for nothing); unanswered counts as for the plain majority."""
    answers, cut = [], []
    for o, more in zip(outcomes, extra, strict=True):
        votes = [a.answers[0] for a in o.agents] + [readable_answer(r) for r in more]
        rng = random.Random(f"{seed}:{MATCHED_MAJORITY}:{o.problem.id}")
        answers.append(majority_vote(votes, task.equivalent, rng).final)
        cut.append(any(_cut(a, 0) for a in o.agents) or any(truncated(r) for r in more))
    return _row(run_id, society, iteration, MATCHED_MAJORITY, answers, cut, outcomes, task)


def _cut(transcript: AgentTranscript, round_index: int) -> bool:
    return bool(transcript.cut) and transcript.cut[round_index]


class DiversityMeter:
    """The diversity measures of one run's evaluations, each computed where it can be: consensus always, the
    embedding measure when its model is installed (or the provider embeds), the critics' NLL where the backend
    can score text. What cannot be measured is said once, not failed on.

    A provider's embeddings are paid: with a `ledger`, each measurement is checked against the budget before
    its texts are sent and writes one ledger line after (stage "diversity", billing "embedding"). One line per
    measurement rather than per request: the backend sends its own chunks and sums their usage, and the
    measurement (task, society, iteration, model) is what a later session can name again, so measuring it
    again replaces its line instead of adding one. MiniLM runs here for free and writes nothing."""

    def __init__(self, settings: DiversityConfig, backend: Backend, run_id: str, console: Console,
                 ledger: Ledger | None = None) -> None:
        self.settings = settings
        self.backend = backend
        self.run_id = run_id
        self.console = console
        self.ledger = ledger
        self._embedder: Embedder | None = None
        self._said: set[str] = set()

    def measure(self, society: str, iteration: int, outcomes: Sequence[DebateOutcome], models: Society,
                task: Task, done: Collection[str] = ()) -> list[DiversityRow]:
        """The metrics not in `done` (those stored by an earlier session: measured again, a provider's
        embeddings would be paid twice and the critics scored again for nothing)."""

        def row(metric: str, value: float, detail: str) -> DiversityRow:
            return DiversityRow(run_id=self.run_id, task=task.name, society=society, iteration=iteration,
                                metric=metric, value=value, n=len(outcomes), detail=detail)

        rows = []
        if "consensus" not in done:
            rows.append(row("consensus", consensus(outcomes, task.equivalent),
                            "round-1 answers agreeing with their majority"))
        embedder = None if "embedding_dissimilarity" in done else self._get_embedder(task, society, iteration)
        if embedder is not None:
            rows.append(row("embedding_dissimilarity", embedding_dissimilarity(outcomes, embedder),
                            f"1 - mean pairwise cosine of round-1 responses ({self._embedding_name()})"))
        # The paper's measure, under its own name: rows of the round-1 variant measured before ("critic_nll")
        # keep theirs, so a resumed run measures this one rather than taking the old value for it.
        if (CRITIC_NLL not in done and self.settings.critic_nll and isinstance(self.backend, SupportsScoring)
                and len(models.critics) > 1):
            rows.append(row(CRITIC_NLL, critic_nll(outcomes, self.backend, models.critics),
                            "mean NLL per token of the other agents' final-round responses, each in its own "
                            "conversation, under each critic"))
        return rows

    def _embedding_name(self) -> str:
        if self.settings.embeddings == "minilm":
            return f"all-MiniLM-L6-v2, first {MINILM_MAX_TOKENS} tokens"
        return f"provider: {self.settings.embedding_model or self.backend.describe().embedding_model or 'default'}"

    def _get_embedder(self, task: Task, society: str, iteration: int) -> Embedder | None:
        if self.settings.embeddings == "off":
            return None
        try:
            if self.settings.embeddings == "provider":  # one per measurement: its bill is this measurement's
                return self._provider_embedder(task, society, iteration)
            if self._embedder is None:
                minilm_dir()  # raises when the model package is not installed
                self._embedder = MiniLMEmbedder()
        except UserError as exc:
            self._say(f"embedding diversity not measured: {exc}")
            return None
        return self._embedder

    def _provider_embedder(self, task: Task, society: str, iteration: int) -> BackendEmbedder:
        ledger = self.ledger
        if ledger is None:
            return BackendEmbedder(self.backend, self.settings.embedding_model)
        model = self.settings.embedding_model or self.backend.describe().embedding_model or "default"
        ref = f"{self.run_id}/diversity/{task.name}/{society}/iteration-{iteration}/{model}"

        def before(texts: Sequence[str]) -> None:
            what = f"embedding {len(texts)} responses of {society} (iteration {iteration}) with {model}"
            ledger.check_embedding(model, texts, what)

        return BackendEmbedder(self.backend, self.settings.embedding_model, before=before,
                               on_usage=lambda result: ledger.record_embedding(result, ref, iteration))

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            self.console.print(f"[yellow]{message}")
