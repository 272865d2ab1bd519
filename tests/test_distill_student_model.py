"""`distill --model STUDENT`: a student on another base model than the run's (issue 15): a smaller model on disk on
the local backend, another of the provider's models on a hosted one; refused where the backend serves one model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.distill import DistillRequest
from tests.test_distill import _distilled_with, openai_student, tiny_local_run, together_student


def test_a_student_of_another_model_is_refused_where_the_backend_serves_only_the_run_s(tmp_path):
    from foundation.errors import UserError
    from tests.fakes import ScriptedBackend

    backend = ScriptedBackend()
    with pytest.raises(UserError, match="the scripted backend serves only the run's base model: distil into it"):
        _distilled_with(tmp_path, backend, DistillRequest(model="smaller"))
    assert not [s for s in backend.specs if "/distill/" in s.key]  # refused before any training


def test_a_student_on_a_smaller_local_model_trains_and_answers_on_that_model(tmp_path):
    """A tiny local run on model A, then `distill --model B` (B: narrower, other weights): the student's adapter is
    trained on B (its shapes are B's: it could not load onto A) and answers on B; the store names B as its parent.
    Asking again without --model evaluates what is there; another --model is refused, exit 2, nothing touched."""
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from foundation.errors import UserError
    from orchestrator.cli import cli
    from orchestrator.store import Store
    from tests.tiny_model import build_tiny_model

    model = tiny_local_run(tmp_path)
    small = build_tiny_model(tmp_path / "small", hidden_size=32, num_heads=2, seed=3)
    args = ["distill", "tiny", "--db", str(tmp_path / "m.db"), "--workdir", str(tmp_path / "w"), "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--model", str(small)], terminal_width=200)
    assert result.exit_code == 0, result.output
    store = Store(tmp_path / "m.db")
    (job,) = [j for j in store.get_jobs("tiny") if j.society == "distill"]
    assert job.status == "succeeded" and job.base_model_id == str(small.resolve())
    adapter = Path(job.model_id or "")
    record = json.loads((adapter / "job.json").read_text())
    assert record["spec"]["root_model"] == str(small.resolve())
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert {w.shape[1] for k, w in weights.items() if k.endswith("q_proj.lora_A.weight")} == {32}  # B's width
    agents = store.get_agents("tiny", 1, "distill")
    assert {a.model_id for a in agents} == {job.model_id} and {a.parent_model_id for a in agents} == {str(small)}
    held_out = {p.problem_id for p in store.get_problems("tiny", "eval")}
    answers = store.get_responses("tiny", "distill/eval-1")
    assert len(answers) == len(held_out) and {r.model_id for r in answers.values()} == {job.model_id}
    assert {e.society for e in store.get_evaluations("tiny")} >= {"distill", "soup"}  # the soup stays on A
    store.close()
    again = CliRunner().invoke(cli, args, terminal_width=200)
    assert again.exit_code == 0, again.output
    other = CliRunner().invoke(cli, [*args, "--model", str(model)], terminal_width=200)
    assert isinstance(other.exception, UserError), other.output  # exit 2 from the console script
    assert f"already has a student distilled into {small}: omit --model to see it" in str(other.exception)
    store = Store(tmp_path / "m.db")
    assert len([j for j in store.get_jobs("tiny") if j.society == "distill"]) == 1
    assert len(store.get_responses("tiny", "distill/eval-1")) == len(held_out)
    assert store.get_run("tiny").status == "finished"
    store.close()


@pytest.mark.fake_openai(base_accuracy=0.8, finetune_bonus=0.1)
def test_a_student_of_another_openai_model_is_finetuned_from_it_and_billed_at_its_price(tmp_path, fake_openai):
    from orchestrator.costs import load_prices
    from tests.test_openai_run import MINI

    nano = "gpt-4.1-nano-2025-04-14"
    store = openai_student(tmp_path, fake_openai, DistillRequest(model=nano))
    (job,) = [j for j in store.get_jobs("r") if j.society == "distill"]
    assert job.status == "succeeded" and job.base_model_id == nano
    (created,) = [j for j in fake_openai.jobs.values() if j["fine_tuned_model"] == job.model_id]
    assert created["model"] == nano
    usage = {u.ref: u for u in store.get_usage("r") if u.stage == "training"}
    society_job = next(j for j in store.get_jobs("r") if j.society == "maft")
    per_token = {k: u.cost_usd / u.trained_tokens for k, u in usage.items() if u.trained_tokens}
    prices = load_prices()
    ratio = prices.lookup(nano, "openai")[1].training / prices.lookup(MINI, "openai")[1].training
    assert per_token[job.key] == pytest.approx(per_token[society_job.key] * ratio)


@pytest.mark.fake_together(base_accuracy=0.8)
def test_a_student_of_another_together_model_is_a_job_on_that_model(tmp_path, fake_together):
    from tests.fake_together import LLAMA_8B, QWEN_7B

    store = together_student(tmp_path, fake_together, DistillRequest(model=QWEN_7B))
    (job,) = [j for j in store.get_jobs("r") if j.society == "distill"]
    assert job.status == "succeeded" and job.base_model_id == QWEN_7B
    models = {j["model"] for j in fake_together.jobs.values()}
    assert QWEN_7B in models and LLAMA_8B in models  # the society's jobs on the run's model
    answers = store.get_responses("r", "distill/eval-1")
    assert answers and {r.model_id for r in answers.values()} == {job.model_id}
