"""Preference pairs built from hand-made debates, checked pair by pair and weight by weight (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.base import ChatMessage
from backends.preference_data import HostedPreferenceLine, PreferenceLine, read_preference_file
from foundation.errors import UserError
from orchestrator.debate import AgentTranscript, DebateOutcome
from orchestrator.preference import (
    ExtraSample,
    PreferencePair,
    build_agent_pairs,
    by_slot,
    count_pairs,
    default_min_margin,
    extra_sample_slots,
    has_strict_majority,
    keep_margin,
    write_hosted_jsonl,
    write_local_jsonl,
)
from orchestrator.tasks import Problem
from orchestrator.voting import Vote


def eq(a: str, b: str) -> bool:
    return float(a) == float(b)


def text(pid: str, agent: int, answer: str | None, rnd: int) -> str:
    return f"{pid} a{agent} says {answer} r{rnd}"


def transcript(pid: str, agent: int, answers: list[str | None], cut: list[bool] | None = None) -> AgentTranscript:
    messages = []
    for r, a in enumerate(answers, start=1):
        messages.append(ChatMessage(role="user", content=f"{pid} a{agent} prompt r{r}"))
        messages.append(ChatMessage(role="assistant", content=text(pid, agent, a, r)))
    return AgentTranscript(messages=messages, answers=answers, cut=cut or [False] * len(answers))


def outcome(pid: str, per_agent: list[list[str | None]], final: str | None,
            cut: dict[int, list[bool]] | None = None) -> DebateOutcome:
    cut = cut or {}
    return DebateOutcome(
        problem=Problem(id=pid, question=pid, answer="0"),  # ground truth "0": never right, never looked at
        agents=[transcript(pid, n, a, cut.get(n)) for n, a in enumerate(per_agent)],
        vote=Vote(final=final, support=0, voters=0, consensus=0.0),  # support deliberately wrong: shares are recounted
    )


# N = 3, M = 2.
# p1: unanimous final 1; agent 1 corrects 2 -> 1.
# p2: 2-to-1 final 3; agent 1 flips 3 -> 4 (anti-sycophancy), agent 2 corrects 4 -> 3.
# p3: no strict majority (5, 6, unreadable): no pairs at all.
# p4: unanimous final 8; agent 0's round-1 reply (7) was cut at max_tokens, agent 2 corrects 9 -> 8.
# p5: 2-of-3 final 10; agent 0's round-1 reply agrees but was cut, agent 2's final reply was cut (no answer).
DEBATES = [
    outcome("p1", [["1", "1"], ["2", "1"], ["1", "1"]], "1"),
    outcome("p2", [["3", "3"], ["3", "4"], ["4", "3"]], "3"),
    outcome("p3", [["5", "5"], ["6", "6"], ["7", None]], "5"),
    outcome("p4", [["7", "8"], ["8", "8"], ["9", "8"]], "8", cut={0: [True, False]}),
    outcome("p5", [["10", "10"], ["11", "10"], ["10", None]], "10", cut={0: [True, False], 2: [False, True]}),
]


def summary(pairs: list[PreferencePair]) -> list[tuple[str, str, str, str, float]]:
    return [(p.problem_id, p.kind, p.chosen, p.rejected, round(p.weight, 6)) for p in pairs]


def test_agent_0_pairs():
    pairs = build_agent_pairs(DEBATES, 0, eq)
    assert summary(pairs) == [
        ("p1", "generator", text("p1", 0, "1", 1), text("p1", 1, "2", 1), 1.0),  # 3/3 - share(2)=0
        ("p2", "generator", text("p2", 0, "3", 1), text("p2", 2, "4", 1), round(1 / 3, 6)),  # 2/3 - 1/3
        # p4: its cut round-1 reply is neither chosen, nor the old answer of a correction
        # p5: its round-1 reply agrees but was cut: never a chosen side
    ]
    assert all(p.role == "generator" and p.agent == 0 and p.round == 1 for p in pairs)
    assert pairs[0].messages == [ChatMessage(role="user", content="p1 a0 prompt r1")]


def test_agent_1_pairs():
    pairs = build_agent_pairs(DEBATES, 1, eq)
    assert summary(pairs) == [
        ("p1", "correction", text("p1", 1, "1", 2), text("p1", 1, "2", 1), 1.0),
        ("p2", "generator", text("p2", 1, "3", 1), text("p2", 2, "4", 1), round(1 / 3, 6)),
        ("p2", "anti-sycophancy", text("p2", 1, "3", 1), text("p2", 1, "4", 2), round(1 / 3, 6)),
        # p4: agent 0's disagreeing 7 was cut, so the rejected side is agent 2's 9 (share 0 either way)
        ("p4", "generator", text("p4", 1, "8", 1), text("p4", 2, "9", 1), 1.0),
        # p5: the only disagreeing round-1 answer is its own 11, which it then corrected
        ("p5", "correction", text("p5", 1, "10", 2), text("p5", 1, "11", 1), round(2 / 3, 6)),  # 2/3 - 0
    ]
    critic = pairs[0]
    assert critic.role == "critic" and critic.round == 2
    # the critic's own context: its round-1 conversation and round 2's prompt, ending with the user turn
    assert [(m.role, m.content) for m in critic.messages] == [
        ("user", "p1 a1 prompt r1"), ("assistant", text("p1", 1, "2", 1)), ("user", "p1 a1 prompt r2")]


def test_agent_2_pairs():
    pairs = build_agent_pairs(DEBATES, 2, eq)
    assert summary(pairs) == [
        ("p1", "generator", text("p1", 2, "1", 1), text("p1", 1, "2", 1), 1.0),
        ("p2", "correction", text("p2", 2, "3", 2), text("p2", 2, "4", 1), round(1 / 3, 6)),
        ("p4", "correction", text("p4", 2, "8", 2), text("p4", 2, "9", 1), 1.0),
        # p5 generator: its own 10 agrees; rejected = agent 1's 11 (agent 0's agreeing 10 was cut anyway)
        ("p5", "generator", text("p5", 2, "10", 1), text("p5", 1, "11", 1), round(2 / 3, 6)),
        # p5 critic: its final reply was cut (no answer): no anti-sycophancy pair with a cut reply as the flip
    ]


def test_another_agents_answer_is_never_chosen_and_cut_replies_are_never_a_side():
    cut_texts = {text("p4", 0, "7", 1), text("p5", 0, "10", 1), text("p5", 2, None, 2)}
    for agent in range(3):
        for pair in build_agent_pairs(DEBATES, agent, eq):
            assert pair.chosen.startswith(f"{pair.problem_id} a{agent} ")
            assert pair.chosen not in cut_texts and pair.rejected not in cut_texts


def test_no_pairs_without_a_strict_majority():
    assert not has_strict_majority(DEBATES[2], eq)
    # four agents split 2-2 (or 2 and two unreadable): half is not a strict majority
    half = outcome("q", [["5", "5"], ["5", "5"], ["6", "6"], ["6", None]], "5")
    unreadable = outcome("u", [["5", "5"], ["5", "5"], ["6", None], ["6", None]], "5")
    three = outcome("t", [["5", "5"], ["5", "5"], ["5", "5"], ["6", "6"]], "5")
    for debate in (half, unreadable):
        assert not has_strict_majority(debate, eq)
        assert all(build_agent_pairs([debate], n, eq) == [] for n in range(4))
    assert has_strict_majority(three, eq)
    assert [round(p.weight, 6) for p in build_agent_pairs([three], 0, eq)] == [0.5]  # 3/4 - 1/4
    assert all(p.problem_id != "p3" for n in range(3) for p in build_agent_pairs(DEBATES, n, eq))


def test_own_extra_samples_are_preferred_as_rejected_the_least_voted_first():
    extra = {("p2", 0): [ExtraSample(text="x3", answer="3"), ExtraSample(text="x4", answer="4"),
                         ExtraSample(text="cut", answer=None), ExtraSample(text="x5", answer="5"),
                         ExtraSample(text="x5b", answer="5.0")]}
    pairs = build_agent_pairs(DEBATES, 0, eq, extra=extra)
    p2 = next(p for p in pairs if p.problem_id == "p2")
    assert (p2.rejected, round(p2.weight, 6)) == ("x5", round(2 / 3, 6))  # share(5) = 0 beats share(4) = 1/3
    # only agreeing or unreadable samples: back to the other agents' answers
    fallback = {("p2", 0): [ExtraSample(text="x3", answer="3"), ExtraSample(text="cut", answer=None)]}
    p2 = next(p for p in build_agent_pairs(DEBATES, 0, eq, extra=fallback) if p.problem_id == "p2")
    assert p2.rejected == text("p2", 2, "4", 1)
    # another agent's samples are not agent 0's
    other = {("p2", 1): [ExtraSample(text="x5", answer="5")]}
    p2 = next(p for p in build_agent_pairs(DEBATES, 0, eq, extra=other) if p.problem_id == "p2")
    assert p2.rejected == text("p2", 2, "4", 1)


def test_extra_samples_are_asked_only_where_they_can_be_used():
    # p3 has no strict majority; cut or disagreeing round-1 answers give no generator pair to complete
    assert extra_sample_slots(DEBATES, eq) == [("p1", 0), ("p1", 2), ("p2", 0), ("p2", 1), ("p4", 1), ("p5", 2)]


def test_min_margin_filter():
    pairs = [p for n in range(3) for p in build_agent_pairs(DEBATES, n, eq)]
    assert default_min_margin(3) == pytest.approx(1 / 3)
    assert keep_margin(pairs, default_min_margin(3)) == pairs  # a 2-to-1 split is kept (2/3 - 1/3 is not < 1/3)
    wide = keep_margin(pairs, 0.5)
    assert len(wide) == len(pairs) - 4 and all(p.problem_id != "p2" for p in wide)
    unanimous = keep_margin(pairs, 0.9)
    assert len(unanimous) == len(wide) - 2 and all(p.weight == 1.0 for p in unanimous)


def test_counts_per_agent_role_and_kind():
    pairs = [p for n in range(3) for p in build_agent_pairs(DEBATES, n, eq)]
    counts = {(c.agent, c.kind): (c.role, c.pairs, round(c.weight, 6)) for c in count_pairs(pairs, 3)}
    assert len(counts) == 9  # every agent and kind, zeros included
    assert counts[(0, "generator")] == ("generator", 2, round(4 / 3, 6))
    assert counts[(0, "correction")] == ("critic", 0, 0.0)
    assert counts[(1, "correction")] == ("critic", 2, round(5 / 3, 6))
    assert counts[(1, "anti-sycophancy")] == ("critic", 1, round(1 / 3, 6))
    assert counts[(2, "generator")] == ("generator", 2, round(5 / 3, 6))
    assert counts[(2, "correction")] == ("critic", 2, round(4 / 3, 6))
    assert sum(c.pairs for c in count_pairs(pairs, 3)) == len(pairs)
    slots = by_slot(pairs)
    assert {k: len(v) for k, v in slots.items()} == {(0, "generator"): 2, (1, "critic"): 3, (1, "generator"): 2,
                                                     (2, "generator"): 2, (2, "critic"): 2}
    assert all(p.role == role and p.agent == agent for (agent, role), ps in slots.items() for p in ps)


def test_local_jsonl_round_trips_through_the_trainers_reader(tmp_path: Path):
    pairs = build_agent_pairs(DEBATES, 1, eq)
    path = tmp_path / "pairs.jsonl"
    digest = write_local_jsonl(path, pairs)
    assert len(digest) == 64
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {
        "messages": [{"role": "user", "content": "p1 a1 prompt r1"},
                     {"role": "assistant", "content": text("p1", 1, "2", 1)},
                     {"role": "user", "content": "p1 a1 prompt r2"}],
        "chosen": text("p1", 1, "1", 2), "rejected": text("p1", 1, "2", 1), "weight": 1.0,
        "kind": "correction", "agent": 1, "role": "critic", "problem_id": "p1",
    }
    read = read_preference_file(path)
    assert [(r.chosen, r.rejected, r.weight) for r in read] == [(p.chosen, p.rejected, p.weight) for p in pairs]


def test_hosted_jsonl_is_openais_preference_format(tmp_path: Path):
    pairs = build_agent_pairs(DEBATES, 1, eq)
    path = tmp_path / "hosted.jsonl"
    write_hosted_jsonl(path, pairs)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first == {
        "input": {"messages": [{"role": "user", "content": "p1 a1 prompt r1"},
                               {"role": "assistant", "content": text("p1", 1, "2", 1)},
                               {"role": "user", "content": "p1 a1 prompt r2"}]},
        "preferred_output": [{"role": "assistant", "content": text("p1", 1, "1", 2)}],
        "non_preferred_output": [{"role": "assistant", "content": text("p1", 1, "2", 1)}],
    }
    assert "weight" not in path.read_text(encoding="utf-8")
    for line in path.read_text(encoding="utf-8").splitlines():
        HostedPreferenceLine.model_validate(json.loads(line))


def test_malformed_lines_are_refused():
    prompt = [{"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="exactly one"):
        HostedPreferenceLine.model_validate({"input": {"messages": prompt},
                                             "preferred_output": [{"role": "user", "content": "a"}],
                                             "non_preferred_output": [{"role": "assistant", "content": "b"}]})
    with pytest.raises(ValueError, match="ends with a user turn"):
        PreferenceLine.model_validate({"messages": [*prompt, {"role": "assistant", "content": "a"}],
                                       "chosen": "a", "rejected": "b"})
    with pytest.raises(ValueError):
        PreferenceLine.model_validate({"messages": prompt, "chosen": "a", "rejected": "b", "weight": 0})


def test_a_bad_line_is_named_by_number(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    good = PreferenceLine(messages=[ChatMessage(role="user", content="q")], chosen="a", rejected="b").to_json()
    path.write_text(good + "\n" + '{"messages": []}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        read_preference_file(path)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="no pairs"):
        read_preference_file(tmp_path / "empty.jsonl")
