"""Training sets built from hand-made debates, checked example by example (METHOD.md §3)."""

import json
import random

from backends.base import ChatMessage
from orchestrator.debate import AgentTranscript, DebateOutcome
from orchestrator.tasks import Problem
from orchestrator.training_data import build_agent_data, mix_sizes, write_jsonl
from orchestrator.voting import Vote


def eq(a: str, b: str) -> bool:
    return float(a) == float(b)


def transcript(pid: str, answers: list[str | None]) -> AgentTranscript:
    messages = []
    for r, a in enumerate(answers, start=1):
        messages.append(ChatMessage(role="user", content=f"{pid} prompt round {r}"))
        messages.append(ChatMessage(role="assistant", content=f"{pid} says {a} in round {r}"))
    return AgentTranscript(messages=messages, answers=answers)


def outcome(pid: str, per_agent: list[list[str | None]], final: str | None) -> DebateOutcome:
    return DebateOutcome(
        problem=Problem(id=pid, question=pid, answer="0"),
        agents=[transcript(pid, a) for a in per_agent],
        vote=Vote(final=final, support=0, voters=0, consensus=0.0),
    )


# agent 0's story per problem: p1 right-right (C+), p2 wrong-right (C−), p3 right-wrong (G only),
# p4 wrong-wrong (nothing), p5 unreadable-right (C−), p6 no consensus (nothing)
DEBATES = [
    outcome("p1", [["1", "1"], ["2", "1"], ["1", "1"]], "1"),
    outcome("p2", [["9", "2"], ["2", "2"], ["2", "2"]], "2"),
    outcome("p3", [["3", "4"], ["3", "3"], ["3", "3"]], "3"),
    outcome("p4", [["8", "8"], ["4", "4"], ["4", "4"]], "4"),
    outcome("p5", [[None, "5"], ["5", "5"], ["5", "5"]], "5"),
    outcome("p6", [[None, None], [None, None], [None, None]], None),
]


def ids(examples):
    return [e.problem_id for e in examples]


def test_generator_set_is_round1_answers_that_agree_with_the_majority():
    data = build_agent_data(DEBATES, 0, eq, w=0.5, rng=random.Random(0))
    assert ids(data.generator) == ["p1", "p3"]
    first = data.generator[0].messages
    assert [m.role for m in first] == ["user", "assistant"]
    assert first[1].content == "p1 says 1 in round 1"


def test_critic_subsets_and_availability():
    data = build_agent_data(DEBATES, 0, eq, w=0.5, rng=random.Random(0))
    assert data.critic_neg_available == 2  # p2, p5
    assert data.critic_pos_available == 1  # p1
    assert (data.critic_neg_used, data.critic_pos_used) == (1, 1)
    chosen = ids(data.critic)
    assert "p1" in chosen and len(chosen) == 2 and set(chosen) <= {"p1", "p2", "p5"}


def test_each_agent_gets_only_its_own_data():
    agent1 = build_agent_data(DEBATES, 1, eq, w=0.5, rng=random.Random(0))
    # agent 1: p1 wrong-right (C−), p2 right-right, p3 right-right, p4 right-right, p5 right-right
    assert ids(agent1.generator) == ["p2", "p3", "p4", "p5"]
    assert agent1.critic_neg_available == 1 and agent1.critic_pos_available == 4
    assert all("says" in e.messages[1].content for e in agent1.generator)
    assert all(e.messages[1].content.startswith(e.problem_id) for e in agent1.generator)


def test_critic_examples_learn_only_the_final_answer_unless_asked():
    data = build_agent_data(DEBATES, 0, eq, w=1.0, rng=random.Random(0))
    assert ids(data.critic) == ["p2", "p5"]
    weights = [m.weight for m in data.critic[0].messages]
    assert weights == [None, 0, None, 1]
    everything = build_agent_data(DEBATES, 0, eq, w=1.0, rng=random.Random(0), all_turns=True)
    assert [m.weight for m in everything.critic[0].messages] == [None, 1, None, 1]


def test_mix_sizes_respects_w_and_never_fails_on_an_empty_side():
    assert mix_sizes(2, 10, 0.5) == (2, 2)
    assert mix_sizes(10, 2, 0.5) == (2, 2)
    assert mix_sizes(3, 30, 0.25) == (3, 9)
    assert mix_sizes(6, 6, 2 / 3) == (6, 3)
    assert mix_sizes(0, 7, 0.5) == (0, 7)
    assert mix_sizes(4, 0, 0.5) == (4, 0)
    assert mix_sizes(0, 0, 0.5) == (0, 0)
    assert mix_sizes(5, 5, 0.0) == (0, 5)
    assert mix_sizes(5, 5, 1.0) == (5, 0)


def test_critic_mix_with_one_side_empty_keeps_the_other_whole():
    all_right = [outcome(f"q{i}", [["1", "1"], ["1", "1"]], "1") for i in range(5)]
    data = build_agent_data(all_right, 0, eq, w=0.5, rng=random.Random(0))
    assert len(data.critic) == 5 and data.critic_neg_used == 0


def test_sampling_is_seeded():
    many = [outcome(f"q{i}", [["1" if i % 3 else "2", "1"], ["1", "1"]], "1") for i in range(30)]
    a = ids(build_agent_data(many, 0, eq, w=0.5, rng=random.Random(7)).critic)
    b = ids(build_agent_data(many, 0, eq, w=0.5, rng=random.Random(7)).critic)
    c = ids(build_agent_data(many, 0, eq, w=0.5, rng=random.Random(8)).critic)
    assert a == b and a != c


def test_single_round_debates_give_no_critic_data():
    one_round = [outcome("r1", [["1"], ["1"]], "1")]
    data = build_agent_data(one_round, 0, eq, w=0.5, rng=random.Random(0))
    assert ids(data.generator) == ["r1"] and data.critic == []


def test_jsonl_is_openai_chat_format_with_sha(tmp_path):
    data = build_agent_data(DEBATES, 0, eq, w=1.0, rng=random.Random(0))
    path = tmp_path / "a" / "critic.jsonl"
    sha = write_jsonl(path, data.critic)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert set(lines[0]) == {"messages"}
    assert lines[0]["messages"][0] == {"role": "user", "content": "p2 prompt round 1"}
    assert lines[0]["messages"][1]["weight"] == 0 and lines[0]["messages"][3]["weight"] == 1
    import hashlib

    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(path.parent.glob("*.tmp"))
