"""Per-agent finetuning sets from one iteration's debates. Ground truth is never looked at.

- D^G_n: agent n's round-1 conversation when its round-1 answer agrees with the debate's majority ŷ.
- D^C−_n: its whole conversation when round 1 disagreed (or was unreadable) and round M agrees (corrected).
- D^C+_n: its whole conversation when both round 1 and round M agree (kept right).
- D^C_n = w·D^C− + (1−w)·D^C+: the largest subset whose share of D^C− is w, sampled with a seeded RNG; when one
  side is empty the other is taken whole rather than training the critic on nothing.

Critic examples learn only the final answer (`weight: 0` on earlier assistant turns) unless `all_turns`, the
research code's behaviour, is asked for. A reply cut at max_tokens is unreadable (its parsed answer is None, see
`debate.readable_answer`), so it never agrees with ŷ: it is never a generator example nor a critic's final
answer, and with `all_turns` it stays unlearned context.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from backends.base import ChatMessage
from orchestrator.debate import DebateOutcome
from orchestrator.voting import agrees


class Example(BaseModel):
    """One line of an OpenAI chat-finetuning JSONL file."""

    messages: list[ChatMessage]
    problem_id: str = Field(exclude=True)
    # its length in the backend's tokens, through its last learned token, from the stored token counts of the
    # reply it ends with (None: not known, e.g. a rationale asked with a hint it is learned without)
    tokens: int | None = Field(None, exclude=True)

    def to_json(self) -> str:
        return json.dumps({"messages": [m.model_dump(exclude_none=True) for m in self.messages]}, ensure_ascii=False)


class AgentData(BaseModel):
    generator: list[Example]
    critic: list[Example]
    critic_neg_available: int
    critic_pos_available: int
    critic_neg_used: int
    critic_pos_used: int
    generator_too_long: int = 0  # dropped: longer than max_length (a cut target is never trained on)
    critic_too_long: int = 0  # dropped before the mix: the critic sets are mixed from what fits


def generator_example(outcome: DebateOutcome, agent: int) -> Example:
    """Agent n's round-1 prompt and answer."""
    transcript = outcome.agents[agent]
    first_turns = transcript.messages[:2]  # the round-1 prompt and answer
    return Example(messages=list(first_turns), problem_id=outcome.problem.id,
                   tokens=transcript.tokens[0] if transcript.tokens else None)


def _critic_example(outcome: DebateOutcome, agent: int, all_turns: bool) -> Example:
    """The whole conversation; only its final answer is learned, or with `all_turns` every answer that was not
    cut at max_tokens (a cut reply stays as context: learning it would teach the model to stop mid-solution)."""
    transcript = outcome.agents[agent]
    messages = transcript.messages
    last = len(messages) - 1
    cut = transcript.cut or [False] * len(transcript.answers)

    def learned(i: int) -> bool:
        return i == last or (all_turns and not cut[i // 2])  # message i is round i // 2's reply

    weighted = [
        m.model_copy(update={"weight": 1 if learned(i) else 0}) if m.role == "assistant" else m
        for i, m in enumerate(messages)
    ]
    return Example(messages=weighted, problem_id=outcome.problem.id,
                   tokens=transcript.tokens[-1] if transcript.tokens else None)


def fit(examples: Sequence[Example], max_length: int | None) -> tuple[list[Example], int]:
    """The examples that fit in `max_length` tokens, and how many did not. A trainer that cut the rest on the
    right would cut exactly what is learned (a critic's final answer ends its example), so they are dropped and
    counted instead. None: no limit (hosted providers take whole conversations). An example of unknown length
    is kept: the local trainer measures it again and drops it there if it must."""
    if max_length is None:
        return list(examples), 0
    kept = [e for e in examples if e.tokens is None or e.tokens <= max_length]
    return kept, len(examples) - len(kept)


def mix_sizes(available_neg: int, available_pos: int, w: float) -> tuple[int, int]:
    """How many corrected and kept-right examples to take so that the corrected share is w.

    The scarcer side (relative to its share) limits the total; the other side is subsampled to match.
    """
    if available_neg == 0 or available_pos == 0:
        return available_neg, available_pos
    limits = [available_neg / w if w > 0 else math.inf, available_pos / (1 - w) if w < 1 else math.inf]
    total = math.floor(min(limits) + 1e-9)
    neg = min(available_neg, round(w * total))
    return neg, min(available_pos, total - neg)


def _sample(items: list[Example], k: int, rng: random.Random) -> list[Example]:
    """k items, in their original (problem) order so files are stable and readable."""
    chosen = sorted(rng.sample(range(len(items)), k))
    return [items[i] for i in chosen]


def build_agent_data(
    outcomes: Sequence[DebateOutcome],
    agent: int,
    equivalent: Callable[[str, str], bool],
    *,
    w: float,
    rng: random.Random,
    all_turns: bool = False,
    max_length: int | None = None,
) -> AgentData:
    """Agent n's sets; examples longer than `max_length` tokens are dropped (and counted) before the critic
    mix, so the mix is made of what can be trained on."""
    generator: list[Example] = []
    corrected: list[Example] = []
    kept: list[Example] = []
    for outcome in outcomes:
        final = outcome.vote.final
        answers = outcome.agents[agent].answers
        first_ok = agrees(answers[0], final, equivalent)
        if first_ok:
            generator.append(generator_example(outcome, agent))
        if len(answers) < 2 or not agrees(answers[-1], final, equivalent):
            continue
        (kept if first_ok else corrected).append(_critic_example(outcome, agent, all_turns))
    generator, generator_too_long = fit(generator, max_length)
    corrected, neg_too_long = fit(corrected, max_length)
    kept, pos_too_long = fit(kept, max_length)
    n_neg, n_pos = mix_sizes(len(corrected), len(kept), w)
    order = {o.problem.id: i for i, o in enumerate(outcomes)}
    critic = sorted(_sample(corrected, n_neg, rng) + _sample(kept, n_pos, rng), key=lambda e: order[e.problem_id])
    return AgentData(
        generator=generator,
        critic=critic,
        critic_neg_available=len(corrected),
        critic_pos_available=len(kept),
        critic_neg_used=n_neg,
        critic_pos_used=n_pos,
        generator_too_long=generator_too_long,
        critic_too_long=neg_too_long + pos_too_long,
    )


def agreeing_examples(
    outcomes: Sequence[DebateOutcome], equivalent: Callable[[str, str], bool], *, all_turns: bool = False
) -> list[Example]:
    """Every answer of every agent that agrees with its debate's majority, for one model (single-agent FT):
    round-1 answers as generator examples, whole conversations whose final answer agrees as critic examples."""
    examples: list[Example] = []
    for outcome in outcomes:
        for agent, transcript in enumerate(outcome.agents):
            if agrees(transcript.answers[0], outcome.vote.final, equivalent):
                examples.append(generator_example(outcome, agent))
            if len(transcript.answers) > 1 and agrees(transcript.answers[-1], outcome.vote.final, equivalent):
                examples.append(_critic_example(outcome, agent, all_turns))
    return examples


def write_jsonl(path: Path, examples: Sequence[Example], prefix: bytes = b"") -> str:
    """Write atomically (a crash never leaves half a file under the final name), after `prefix` (lines of an
    earlier file); return the sha256."""
    return write_atomically(path, prefix + "".join(e.to_json() + "\n" for e in examples).encode("utf-8"))


def write_atomically(path: Path, data: bytes) -> str:
    """Write `data` under a temporary name, fsync, then rename: a crash never leaves half a file under the final
    name. Returns the sha256 the dataset rows record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()
