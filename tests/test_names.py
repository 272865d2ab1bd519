"""The store's names of debates and jobs: spelled exactly as runs already on disk spell them, and read back."""

from __future__ import annotations

import pytest

from orchestrator.names import DebateName, JobKey, attempt_key


@pytest.mark.parametrize(("name", "parts"), [
    ("eval-0", {"stage": "eval", "iteration": 0}),
    ("train-2", {"stage": "train", "iteration": 2}),
    ("star/eval-1", {"stage": "eval", "iteration": 1, "society": "star"}),
    ("star/rationale-3", {"stage": "rationale", "iteration": 3, "society": "star"}),
    ("no-critic/train-1", {"stage": "train", "iteration": 1, "society": "no-critic"}),
    ("transfer/gsm8k/eval-1", {"stage": "eval", "iteration": 1, "transfer": "gsm8k"}),
    ("transfer/arithmetic:medium/majority-ft/eval-2",
     {"stage": "eval", "iteration": 2, "society": "majority-ft", "transfer": "arithmetic:medium"}),

    # a JSONL task is named by its path: the "/" in it is the task's, not a society's
    ("transfer/data/x.jsonl/eval-1", {"stage": "eval", "iteration": 1, "transfer": "data/x.jsonl"}),
    ("transfer/data/x.jsonl/star/eval-1", {"stage": "eval", "iteration": 1, "society": "star",
                                          "transfer": "data/x.jsonl"}),
    # the user's own questions put to a society (`ask`, `solve`): the input's digest names the debate
    ("ask-0/0123456789abcdef", {"stage": "ask", "iteration": 0, "input": "0123456789abcdef"}),
    ("solve-2/fedcba9876543210", {"stage": "solve", "iteration": 2, "input": "fedcba9876543210"}),
])
def test_debate_names_are_composed_and_parsed_back_byte_for_byte(name, parts):
    composed = DebateName(**parts)
    assert str(composed) == name
    assert DebateName.parse(name) == composed


@pytest.mark.parametrize("name", ["rationale", "star/eval", "eval-x", "transfer/eval-1/", "a/b/eval-1", "",
                                  "ask-1", "solve-1/xyz", "eval-1/0123456789abcdef",
                                  "transfer/gsm8k/ask-1/0123456789abcdef"])
def test_names_no_part_of_the_pipeline_composes_parse_to_none(name):
    assert DebateName.parse(name) is None


def test_only_held_out_debates_are_evaluations():
    assert [DebateName.parse(n).is_evaluation for n in ("eval-0", "transfer/gsm8k/star/eval-1", "star/train-1",
                                                         "star/rationale-1")] == [True, True, False, False]


def test_ask_and_solve_debates_are_their_own_ledger_stage_and_always_carry_their_input():
    from orchestrator.costs import _stage

    assert [_stage(n) for n in ("ask-1/0123456789abcdef", "solve-0/0123456789abcdef", "eval-1", "train-1")] == \
        ["ask", "solve", "evaluation", "debate"]
    assert not DebateName.parse("solve-1/0123456789abcdef").is_evaluation
    with pytest.raises(ValueError):
        DebateName(stage="solve", iteration=1)  # no input: two files would share one debate
    with pytest.raises(ValueError):
        DebateName(stage="eval", iteration=1, input="0123456789abcdef")


def test_job_keys_keep_the_stored_spelling():
    assert str(JobKey(run_id="r", iteration=1, agent=0, role="generator")) == "r/iteration-1/agent-1/generator"
    assert str(JobKey(run_id="r", society="no-critic", iteration=2, agent=2, role="critic")) == \
        "r/no-critic/iteration-2/agent-3/critic"
    assert str(JobKey(run_id="r", society="star", iteration=1, role="single")) == "r/star/iteration-1/single"
    assert attempt_key("r/iteration-1/agent-1/critic", 1) == "r/iteration-1/agent-1/critic"
    assert attempt_key("r/iteration-1/agent-1/critic", 3) == "r/iteration-1/agent-1/critic#attempt-3"
