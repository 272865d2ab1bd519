"""A reply cut at max_tokens (finish reason "length") is unreadable everywhere: it does not vote, it is never a
training target, it is graded as no answer, and status and report say how many were cut (METHOD.md §3)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from rich.console import Console

from backends.base import ChatResult, Usage
from orchestrator.config import GenerationConfig, RunConfig
from orchestrator.debate import DebateRunner, DebateSettings, Society
from orchestrator.evaluate import evaluate
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.report.data import report_data, status_data
from orchestrator.report.terminal import accuracy_table, status_view
from orchestrator.store import RunRow, Store
from orchestrator.tasks import Problem, get_task
from orchestrator.training_data import build_agent_data
from tests.fakes import ScriptedBackend

TASK = get_task("arithmetic:easy")
CUT = "because first I add"  # how every cut reply in these tests ends: mid-sentence


class CuttingBackend(ScriptedBackend):
    """The scripted agents, except that the replies `cut(request)` picks stop at max_tokens, mid-reasoning, after
    saying a number: the last-number fallback would read it as an answer."""

    def __init__(self, cut, say=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cut = cut
        self.say = say or {}

    def chat(self, requests, on_result=None):
        out = []
        for request in requests:
            (result,) = super().chat([request])
            if self.cut(request):
                said = self.say.get(request.key, re.findall(r"\d+", result.text)[-1:] or ["7"])[-1]
                result = ChatResult(key=request.key, text=f"I think it is {said} {CUT}", finish_reason="length",
                                    usage=Usage(prompt_tokens=10, completion_tokens=request.max_tokens))
            elif request.key in self.say:
                result = result.model_copy(update={"text": f"I think it is {self.say[request.key]}."})
            if on_result:
                on_result(result)
            out.append(result)
        return out


def debate(tmp_path: Path, backend, problems, rounds=2):
    store = Store(tmp_path / "m.db")
    store.save_run(RunRow(id="r", config="{}", backend="scripted", model="m", task=TASK.name))
    settings = DebateSettings(rounds=rounds, summarize=True, generation=GenerationConfig(), seed=0)
    runner = DebateRunner(run_id="r", name="train-1", task=TASK, backend=backend, store=store, settings=settings)
    return store, runner.run(problems, Society.base(3))


PROBLEM = Problem(id="arithmetic:easy/2+3", question="2+3", answer="5")


def key(rnd: int, agent: int) -> str:
    return f"r/train-1/{PROBLEM.id}/r{rnd}/a{agent}/answer"


def test_cut_replies_do_not_vote_even_when_they_are_the_majority(tmp_path):
    # final round: agents 1 and 2 were cut after saying 7, agent 3 finished with 5; counted, 7 would win 2-1
    say = {key(2, 0): "7", key(2, 1): "7", key(2, 2): "5"}
    backend = CuttingBackend(cut=lambda r: r.key in (key(2, 0), key(2, 1)), say=say)
    store, (outcome,) = debate(tmp_path, backend, [PROBLEM])
    assert outcome.vote.final == "5" and outcome.vote.voters == 1
    assert [a.answers[-1] for a in outcome.agents] == [None, None, "5"]
    assert [a.cut for a in outcome.agents] == [[False, True], [False, True], [False, False]]
    # the stored rows keep what their text says: history is not rewritten, the vote reads them as cut
    stored = store.get_responses("r", "train-1")
    assert stored[key(2, 0)].answer == "7" and stored[key(2, 0)].finish_reason == "length"
    assert json.loads(store.get_debates("r", "train-1")[0].votes) == [None, None, "5"]


def test_a_cut_reply_is_never_a_training_target(tmp_path):
    # agent 1 is cut in round 1 after the right number, then answers right: no generator example from the cut
    # reply, and a corrected critic example whose cut turn is context only, even when every turn is learned
    say = {key(1, 0): "5", key(1, 1): "5", key(1, 2): "5", key(2, 0): "5", key(2, 1): "5", key(2, 2): "5"}
    backend = CuttingBackend(cut=lambda r: r.key == key(1, 0), say=say)
    _, outcomes = debate(tmp_path, backend, [PROBLEM])
    for all_turns in (False, True):
        data = build_agent_data(outcomes, 0, TASK.equivalent, w=0.5, rng=random.Random(0), all_turns=all_turns)
        assert data.generator == []
        assert (data.critic_neg_available, data.critic_pos_available) == (1, 0)
        (example,) = data.critic
        weights = [(m.content.endswith(CUT), m.weight) for m in example.messages if m.role == "assistant"]
        assert weights == [(True, 0), (False, 1)]
    other = build_agent_data(outcomes, 1, TASK.equivalent, w=0.5, rng=random.Random(0), all_turns=True)
    assert len(other.generator) == 1 and [m.weight for m in other.critic[0].messages if m.role == "assistant"] == [1, 1]


def test_evaluation_counts_cut_replies_as_no_answer_and_says_so(tmp_path):
    say = {key(1, 0): "5", key(1, 1): "5", key(1, 2): "5", key(2, 0): "5", key(2, 1): "5", key(2, 2): "5"}
    everyone_cut_at_the_end = CuttingBackend(cut=lambda r: r.key == key(1, 0) or "/r2/" in r.key, say=say)
    _, outcomes = debate(tmp_path, everyone_cut_at_the_end, [PROBLEM])
    rows = {r.method: r for r in evaluate("r", "base", 0, outcomes, TASK, seed=0)}
    single = rows["single"]  # all three round-1 answers: agent 1's was cut
    assert (single.answers, single.correct, single.unparseable, single.truncated) == (3, 2, 1, 1)
    assert (rows["majority"].correct, rows["majority"].unparseable, rows["majority"].truncated) == (1, 0, 0)
    assert (rows["debate"].correct, rows["debate"].unparseable, rows["debate"].truncated) == (0, 1, 1)
    table = accuracy_table([r.model_dump() for r in rows.values()], "t")
    console = Console(width=200, record=True)
    console.print(table)
    shown = console.export_text()
    assert "1/3 (1 cut)" in shown and "1 (1 cut)" in shown


def test_no_cut_reply_votes_or_trains_in_a_whole_run_and_status_counts_them(tmp_path):
    def cut(request) -> bool:  # about a third of the answers, and some summaries
        return request.seed is not None and request.seed % 3 == 0

    backend = CuttingBackend(cut=cut)
    config = RunConfig(task="arithmetic:easy", agents=3, rounds=2, train_size=12, eval_size=6, seed=3,
                       critic_train_all_turns=True)
    store = Store(tmp_path / "m.db")
    run = open_run(store, config, "r", must_exist=False)
    Pipeline(config=config, run=run, store=store, backend=backend, workdir=tmp_path / "work",
             console=Console(quiet=True), show_progress=False, poll_interval=0).run()
    responses = [r for r in store.get_responses("r", "train-1").values()]
    cut_answers = [r for r in responses if r.finish_reason == "length" and r.kind == "answer"]
    assert cut_answers and all(r.answer is not None for r in cut_answers)  # their text reads as a number
    for debate_row in store.get_debates("r", "train-1"):
        assert debate_row.final_answer is None or not debate_row.final_answer.endswith(CUT)
    learned = []
    for dataset in store.get_datasets("r"):
        for line in Path(dataset.path).read_text().splitlines():
            messages = json.loads(line)["messages"]
            learned += [m["content"] for m in messages if m["role"] == "assistant" and m.get("weight", 1) == 1]
    assert learned and not any(text.endswith(CUT) for text in learned)
    # status names every debate with its cut replies; the report's rows count them per method
    data = status_data(store, store.require_run("r"))
    by_debate = {d["debate"]: d for d in data["debates"]}
    train = by_debate["train-1"]
    assert train["answers"] == 72 and train["answers_cut"] == sum(
        1 for r in responses if r.kind == "answer" and r.finish_reason == "length")
    assert train["summaries"] == 36 and train["summaries_cut"] > 0
    console = Console(width=200, record=True)
    console.print(status_view(data))
    assert "replies cut at max_tokens" in console.export_text()
    assert any(e["truncated"] for e in report_data(store, store.require_run("r"))["evaluations"])
