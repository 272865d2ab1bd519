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

from collections.abc import Collection, Sequence

from backends.base import ChatMessage
from orchestrator.debate import AgentTranscript, DebateOutcome
from orchestrator.preference import Equivalent, PreferencePair, has_strict_majority, share
from orchestrator.training_data import Example
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
