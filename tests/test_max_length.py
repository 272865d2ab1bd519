"""Training targets are never cut by max_length: an example longer than the trainer's limit is dropped and
counted (in its dataset row, from the stored token counts; and again by the local trainer, token by token)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub

from rich.console import Console

from backends.base import ChatMessage, FinetuneSpec, TrainingParams
from orchestrator.config import RunConfig
from orchestrator.debate import AgentTranscript, DebateOutcome
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.report.data import report_data
from orchestrator.report.terminal import datasets_table
from orchestrator.store import Store
from orchestrator.tasks import Problem
from orchestrator.training_data import build_agent_data
from orchestrator.voting import Vote
from tests.fakes import ScriptedBackend


def eq(a: str, b: str) -> bool:
    return float(a) == float(b)


def outcome(pid: str, answers: list[list[str]], tokens: list[int]) -> DebateOutcome:
    """Three agents, two rounds; every agent's conversation is `tokens[0]` tokens long through round 1 and
    `tokens[1]` through round 2, as the backend counted them."""
    agents = []
    for said in answers:
        messages = []
        for r, a in enumerate(said, start=1):
            messages += [ChatMessage(role="user", content=f"{pid} round {r}"),
                         ChatMessage(role="assistant", content=f"{pid}: {a}")]
        agents.append(AgentTranscript(messages=messages, answers=said, cut=[False, False], tokens=tokens))
    return DebateOutcome(problem=Problem(id=pid, question=pid, answer="0"), agents=agents,
                         vote=Vote(final="1", support=3, voters=3, consensus=1.0))


def test_examples_longer_than_max_length_are_dropped_and_counted_before_the_mix():
    # agent 0: p1 kept right (C+, critic 300 tokens), p2 corrected (C−, critic 900 tokens), p3 corrected (C−, 300)
    debates = [outcome("p1", [["1", "1"]] * 3, [100, 300]), outcome("p2", [["2", "1"]] * 3, [100, 900]),
               outcome("p3", [["2", "1"]] * 3, [600, 300])]
    data = build_agent_data(debates, 0, eq, w=0.5, rng=random.Random(0), max_length=512)
    assert [e.problem_id for e in data.generator] == ["p1"] and data.generator_too_long == 0
    assert (data.critic_neg_available, data.critic_pos_available, data.critic_too_long) == (1, 1, 1)
    assert [e.problem_id for e in data.critic] == ["p1", "p3"]  # the mix of what fits: 1 + 1 at w = 0.5
    short = build_agent_data(debates, 0, eq, w=0.5, rng=random.Random(0), max_length=50)
    assert (short.generator, short.generator_too_long, short.critic, short.critic_too_long) == ([], 1, [], 3)
    unlimited = build_agent_data(debates, 0, eq, w=0.5, rng=random.Random(0))
    assert (unlimited.critic_neg_available, unlimited.critic_too_long) == (2, 0)


class CountingBackend(ScriptedBackend):
    """The scripted agents, with usage counted as a chat API counts it: the whole conversation is the prompt."""

    def chat(self, requests, on_result=None):
        out = []
        for request in requests:
            (result,) = super().chat([request])
            prompt = sum(len(m.content) for m in request.messages)
            result = result.model_copy(update={"usage": result.usage.model_copy(update={"prompt_tokens": prompt})})
            if on_result:
                on_result(result)
            out.append(result)
        return out


def run(tmp_path: Path, max_length: int, backend: str = "local"):
    config = RunConfig(task="arithmetic:easy", agents=3, rounds=2, train_size=12, eval_size=4, seed=3,
                       training=TrainingParams(max_length=max_length), **({} if backend == "local" else {
                           "backend": backend, "model": "gpt-4.1-mini-2025-04-14"}))
    store = Store(tmp_path / f"{max_length}-{backend}.db")
    run_row = open_run(store, config, "r", must_exist=False)
    Pipeline(config=config, run=run_row, store=store, backend=CountingBackend(), workdir=tmp_path / str(max_length),
             console=Console(quiet=True), show_progress=False, poll_interval=0).run()
    return store


def test_a_run_drops_critic_conversations_longer_than_max_length_and_shows_the_count(tmp_path):
    roomy = run(tmp_path, 4096)
    tight = run(tmp_path, 200)  # round-1 conversations (~90 characters) fit; critic conversations do not
    for store in (roomy, tight):
        for d in store.get_datasets("r"):
            lines = Path(d.path).read_text().splitlines()
            assert len(lines) == d.n_examples
    roomy_sets = {(d.agent, d.role): d for d in roomy.get_datasets("r")}
    for d in tight.get_datasets("r"):
        same = roomy_sets[(d.agent, d.role)]
        if d.role == "generator":
            assert (d.n_examples, d.n_too_long) == (same.n_examples, 0) and d.n_examples > 0
        else:
            assert d.n_examples == 0 and d.n_too_long == same.n_critic_neg_available + same.n_critic_pos_available > 0
            assert same.n_too_long == 0
    console = Console(width=200, record=True)
    console.print(datasets_table(report_data(tight, tight.require_run("r"))["datasets"]))
    assert "too long" in console.export_text()


def test_hosted_backends_take_whole_conversations(tmp_path):
    # max_length is the local trainer's limit: a hosted provider's file keeps every critic conversation
    store = run(tmp_path, 200, backend="openai")
    critics = [d for d in store.get_datasets("r") if d.role == "critic"]
    assert all(d.n_too_long == 0 for d in critics) and sum(d.n_examples for d in critics) > 0


def test_the_local_trainer_drops_an_example_past_max_length_and_never_cuts_it(tmp_path):
    from transformers import AutoTokenizer

    from backends.local import LocalBackend
    from backends.local_train import encode_example
    from tests.tiny_model import build_tiny_model

    tiny = build_tiny_model(tmp_path / "tiny")
    short = [ChatMessage(role="user", content="What is 17+25?"), ChatMessage(role="assistant", content="42.")]
    long_critic = [ChatMessage(role="user", content="What is 17+25? " * 8),
                   ChatMessage(role="assistant", content="It is 41, since 17+25 is " * 6, weight=0),
                   ChatMessage(role="user", content="Others said 42. Your answer?"),
                   ChatMessage(role="assistant", content="It is 42.")]
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    short_len = len(encode_example(tokenizer, short, 4096).input_ids)
    whole = encode_example(tokenizer, long_critic, 4096)
    learned = [i for i, label in enumerate(whole.labels) if label != -100]
    max_length = learned[-1] - 1  # right-truncated, the critic's final answer would lose its last tokens only
    assert short_len <= max_length and learned[0] < max_length
    data = tmp_path / "data.jsonl"
    rows = [short] * 4 + [long_critic]
    data.write_text("".join(json.dumps({"messages": [m.model_dump(exclude_none=True) for m in r]}) + "\n"
                            for r in rows))
    params = TrainingParams(epochs=1, batch_size=2, learning_rate=1e-3, max_length=max_length)
    spec = FinetuneSpec(key="r/i1/a0/critic", base_model="base", training_file=data, suffix="c0", params=params)
    backend = LocalBackend(str(tiny), workdir=tmp_path / "work", device="cpu", batch_size=4, show_progress=False)
    try:
        state = backend.poll(backend.start_finetune(spec))
    finally:
        backend.close()
    assert state.status == "succeeded", state.error
    messages = [e.message for e in state.events]
    assert any(m.startswith("loaded 4 examples") for m in messages), messages
    assert any(m.startswith(f"dropped 1 examples whose learned answer ends past max_length {max_length}")
               for m in messages), messages
    assert state.trained_tokens == 4 * short_len  # the long example was not trained on, cut or whole
