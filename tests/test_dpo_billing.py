"""A preference job's bill: SFT tokens at the SFT rate, DPO tokens at the DPO rate, even for a re-attached job.

Together bills sft-then-dpo as two jobs, the SFT stage's tokens and the DPO stage's, each at its own price, and
says what it charged for each (`total_price`). A run killed (SIGKILL, at a crash point) while a job runs is resumed
by a new process that re-attaches to the job; its ledger line must still be both stages' charges, as a job watched
from start to end is. (How our table prices the stages when a provider says nothing: tests/test_hosted_dpo.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundation import crashpoints
from orchestrator.costs import PROVIDER_BILL
from orchestrator.store import Store
from tests.fake_together import DPO_PRICE_FACTOR, LLAMA_8B, MODELS, NANODOLLARS, FakeTogether
from tests.test_hosted_dpo import together_config

REPO = Path(__file__).resolve().parents[1]
SFT_RATE, DPO_RATE = 1.0, 3.0  # dollars per 1M trained tokens


def cli(tmp_path: Path, fake: FakeTogether, *args: str,
        crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (crashpoints.ENV_VAR, crashpoints.RAISE_VAR)}
    env.update(TOGETHER_API_KEY=fake.api_key, MAFT_PRICES=str(tmp_path / "prices.toml"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", COLUMNS="400",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if crash_at is not None:
        env[crashpoints.ENV_VAR] = crash_at
    return subprocess.run([sys.executable, "-m", "orchestrator", "run", "--db", str(tmp_path / "m.db"),
                           "--workdir", str(tmp_path / "w"), "--quiet", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.fake_together(base_accuracy=0.7)
def test_a_reattached_sft_then_dpo_job_bills_each_stage_at_its_own_rate(tmp_path: Path,
                                                                       fake_together: FakeTogether) -> None:
    (tmp_path / "prices.toml").write_text(
        f'[models."{LLAMA_8B}"]\nfamily = "together"\ninput = 0.18\noutput = 0.18\ntraining = {SFT_RATE}\n'
        f'training_full = {SFT_RATE}\ntraining_dpo = {DPO_RATE}\ntraining_dpo_full = {DPO_RATE}\nsource = "test"\n',
        encoding="utf-8")
    (tmp_path / "run.toml").write_text(together_config(fake_together, "sft-then-dpo"), encoding="utf-8")
    # killed right after the first job's first poll is stored: its SFT stage runs on, our row says "queued"
    killed = cli(tmp_path, fake_together, "--config", str(tmp_path / "run.toml"), "--name", "r",
                 crash_at="finetune.polled")
    assert killed.returncode == -9, killed.stdout + killed.stderr
    store = Store(tmp_path / "m.db")
    (started,) = [j for j in store.get_jobs("r") if j.provider_job_id]
    store.close()
    assert started.status == "queued"
    resumed = cli(tmp_path, fake_together, "--resume", "r")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    store = Store(tmp_path / "m.db")
    jobs = {j.key: j for j in store.get_jobs("r") if j.status != "skipped"}
    assert jobs[started.key].attempt == 1 and jobs[started.key].provider_job_id == started.provider_job_id
    remote = list(fake_together.jobs.values())
    by_id = {j["id"]: j for j in remote}
    stages = {key: [by_id[job.provider_job_id]] for key, job in jobs.items()}
    for job in remote:  # a DPO stage belongs to the job whose SFT stage it continues
        if job["training_method"]["method"] == "dpo" and job.get("from_checkpoint"):
            key = next(k for k, stage in stages.items() if stage[0]["id"] == job["from_checkpoint"])
            stages[key].append(job)
    assert len(stages[started.key]) == 2  # the re-attached job is an sft-then-dpo job: both stages ran

    bills = {u.ref: u for u in store.get_usage("r") if u.billing == "training" and not u.estimated}
    assert set(bills) == set(jobs)
    for key, ran in stages.items():
        sft = sum(j["token_count"] for j in ran if j["training_method"]["method"] == "sft")
        dpo = sum(j["token_count"] for j in ran if j["training_method"]["method"] == "dpo")
        assert bills[key].trained_tokens == sft + dpo > 0
        # Together's own charge for both stages (their total_price), each at its rate: the fake's, not our table's
        charged = sum(j["total_price"] for j in ran) / NANODOLLARS
        fake_rate = MODELS[LLAMA_8B].lora_price
        assert charged == pytest.approx((sft + dpo * DPO_PRICE_FACTOR) * fake_rate / 1e6)  # type: ignore[operator]
        assert bills[key].cost_usd == pytest.approx(charged, rel=1e-12, abs=0), key
        assert bills[key].price_source == PROVIDER_BILL
    both = [key for key, ran in stages.items() if len(ran) == 2]
    assert started.key in both and len(both) > 1  # re-attached and watched from the start, both priced so
    store.close()
