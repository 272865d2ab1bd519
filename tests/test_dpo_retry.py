"""sft-then-dpo on a hosted provider when its DPO stage fails: the retry pays for the DPO stage only.

On Together and OpenAI "sft-then-dpo" is two provider jobs under one key. A failed job is retried on the next
resume as a new attempt, and an attempt whose SFT stage had succeeded must start its DPO stage from that SFT
job's result rather than train (and pay for) the SFT stage again; the ledger must count the SFT stage once.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from backends.together_finetune import key_marker
from orchestrator.cli import cli as command
from orchestrator.store import Store
from tests.fake_openai import FakeOpenAI
from tests.fake_together import LLAMA_8B, FakeTogether
from tests.test_hosted_dpo import MINI, orchestrator, poll_to_end, together_config, write_files

SLOTS = [(agent, role) for agent in range(1, 4) for role in ("generator", "critic")]


def slot_of(job: dict[str, Any]) -> str:
    """A Together job's slot: its suffix without the key's marker (the same for every attempt and stage)."""
    return str(job["suffix"]).rsplit("-", 1)[0]


@pytest.mark.fake_together(base_accuracy=0.7)
def test_a_failed_dpo_stage_on_together_is_retried_from_the_sft_stage_it_already_paid_for(
        tmp_path: Path, fake_together: FakeTogether) -> None:
    for agent, role in SLOTS:  # the first attempt's DPO stages fail; a retry's DPO stage has a key of its own
        fake_together.fail_jobs(f"-{key_marker(f'r/iteration-1/agent-{agent}/{role}/dpo')}")
    env = {"TOGETHER_API_KEY": fake_together.api_key}
    first = orchestrator(tmp_path, env, together_config(fake_together, "sft-then-dpo"))
    assert first.exit_code == 1, first.output
    assert "DPO stage" in first.output
    resumed = CliRunner().invoke(command, ["run", "--resume", "r", "--db", str(tmp_path / "m.db"), "--workdir",
                                           str(tmp_path / "w"), "--quiet"], env=env)
    assert resumed.exit_code == 0, resumed.output

    jobs = list(fake_together.jobs.values())
    sft = [j for j in jobs if j["training_method"]["method"] == "sft"]
    dpo = [j for j in jobs if j["training_method"]["method"] == "dpo"]
    both = {slot_of(j) for j in dpo}
    assert both  # some slots train both stages
    assert set(collections.Counter(slot_of(j) for j in sft).values()) == {1}  # one SFT job per agent and role
    assert collections.Counter(slot_of(j) for j in dpo) == {s: 2 for s in both}  # the failed DPO stage, then one
    by_id = {j["id"]: j for j in jobs}
    for job in dpo:  # both DPO stages of a slot from its one SFT job's checkpoint
        assert by_id[job["from_checkpoint"]]["training_method"]["method"] == "sft"
        assert slot_of(by_id[job["from_checkpoint"]]) == slot_of(job)
    assert sorted(j["status"] for j in dpo) == ["completed"] * len(both) + ["error"] * len(both)

    store = Store(tmp_path / "m.db")
    rows = {j.key: j for j in store.get_jobs("r") if j.status != "skipped"}
    retried = [j for j in rows.values() if j.attempt == 2]
    assert len(retried) == len(both) and {j.status for j in rows.values()} == {"succeeded"}
    # the ledger: each slot's attempts together billed what the provider trained, its SFT stage once
    billed = collections.Counter[str]()
    for line in store.get_usage("r"):
        if line.billing == "training" and not line.estimated:
            billed[line.ref.split("#")[0]] += line.trained_tokens
    trained = collections.Counter[str]()
    for job in jobs:
        trained[slot_of(job)] += job.get("token_count") or 0 if job["status"] == "completed" else 0
    assert sum(billed.values()) == sum(trained.values()) == fake_together.usage[LLAMA_8B]["trained_tokens"]
    assert sorted(billed.values()) == sorted(trained.values())
    store.close()


def test_a_failed_dpo_stage_on_openai_is_retried_from_the_sft_model_it_already_paid_for(
        tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    from backends.base import FinetuneSpec, MemoryState
    from backends.openai import OpenAIBackend
    from backends.openai_settings import OpenAIConfig

    backend = OpenAIBackend(MINI, OpenAIConfig(base_url=fake_openai.base_url), MemoryState(), show_progress=False,
                            dotenv=tmp_path / "none", environ={"OPENAI_API_KEY": fake_openai.api_key})
    sft_file, pairs = write_files(tmp_path)
    spec = FinetuneSpec(key="k", base_model="base", training_file=sft_file, suffix="a1-g", objective="sft-then-dpo",
                        preference_file=pairs)
    ref = backend.start_finetune(spec)
    for _ in range(100):  # until the DPO stage is started on the SFT model
        if len(fake_openai.jobs) == 2:
            break
        backend.poll(ref)
    fake_openai.fail_jobs("a1-g", message="the DPO stage crashed on purpose")  # at the DPO job's next step
    failed = poll_to_end(backend, ref)
    assert failed.status == "failed" and "crashed on purpose" in str(failed.error)
    (sft,) = [j for j in fake_openai.jobs.values() if j["method"]["type"] == "supervised"]
    assert failed.trained_tokens == sft["trained_tokens"] > 0  # the SFT stage was paid for: billed
    assert failed.dpo_tokens == 0  # at the SFT rate: the failed DPO stage reported none
    fake_openai.clear_failures()

    retry = spec.model_copy(update={"key": "k#attempt-2", "retry_of": "k"})
    ref2 = backend.start_finetune(retry)
    done = poll_to_end(backend, ref2)
    assert done.status == "succeeded", done.error
    supervised = [j for j in fake_openai.jobs.values() if j["method"]["type"] == "supervised"]
    dpo = [j for j in fake_openai.jobs.values() if j["method"]["type"] == "dpo"]
    assert len(supervised) == 1 and len(dpo) == 2  # no second SFT job; a second DPO job on the same SFT model
    assert dpo[1]["model"] == sft["fine_tuned_model"] and done.model_id == dpo[1]["fine_tuned_model"]
    assert done.trained_tokens == dpo[1]["trained_tokens"] > 0  # this attempt bills its DPO stage only
    assert done.dpo_tokens == done.trained_tokens  # all at the DPO rate
    backend.close()
