"""Preference objectives on the hosted backends, through the CLI, against the fake servers (real HTTP, official SDKs).

What a user of a paid API must be able to trust: objective dpo on Together makes DPO jobs on the pair files it
was given (beta, the NLL term as rpo_alpha); sft-then-dpo on OpenAI makes an SFT job and then a DPO job on its
model, and on Together one from the SFT job's checkpoint, and a run resumed between the two stages pays for
neither twice; a pair file the provider would refuse is refused first, with the provider's rule; a backend
without the objective is refused before anything is recorded, in one line.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from orchestrator.cli import cli as command
from orchestrator.costs import PROVIDER_BILL
from orchestrator.store import Store
from tests.fake_openai import FakeOpenAI
from tests.fake_together import DPO_PRICE_FACTOR, LLAMA_8B, MODELS, NANODOLLARS, FakeTogether

MINI = "gpt-4.1-mini-2025-04-14"


def orchestrator(tmp_path: Path, env: dict[str, str], config: str, *args: str) -> Result:
    (tmp_path / "run.toml").write_text(config, encoding="utf-8")
    return CliRunner().invoke(command, ["run", "--config", str(tmp_path / "run.toml"), "--db", str(tmp_path / "m.db"),
                                        "--workdir", str(tmp_path / "w"), "--quiet", "--name", "r", *args], env=env)


def together_config(fake: FakeTogether, objective: str) -> str:
    return f"""backend = "together"
model = "{LLAMA_8B}"
agents = 3
rounds = 2
train_size = 12
eval_size = 4
seed = 1
critic_mix = 0.0
[training]
objective = "{objective}"
beta = 0.2
nll_weight = 0.5
[preference]
extra_samples = 1
[together]
base_url = "{fake.base_url}"
poll_interval = 0.01
n_epochs = 1
"""


def lines(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.mark.fake_together(base_accuracy=0.7)
def test_objective_dpo_on_together_makes_dpo_jobs_on_the_pairs_it_counts(tmp_path: Path,
                                                                      fake_together: FakeTogether) -> None:
    result = orchestrator(tmp_path, {"TOGETHER_API_KEY": fake_together.api_key},
                          together_config(fake_together, "dpo"))
    assert result.exit_code == 0, result.output
    store = Store(tmp_path / "m.db")
    datasets = store.get_datasets("r", 1)
    sent = [d for d in datasets if d.n_pairs]
    assert sent
    for d in datasets:
        pairs = lines(str(d.pairs_path))
        assert len(pairs) == d.n_pairs  # the counts in the dataset table are what is sent
        for pair in pairs:  # Together's format: no weights, each output one assistant message
            assert set(pair) == {"input", "preferred_output", "non_preferred_output"}
            assert [m["role"] for m in pair["preferred_output"]] == ["assistant"]
    jobs = list(fake_together.jobs.values())
    assert len(jobs) == len(sent)  # one job per slot with pairs; the others keep their models
    for job in jobs:
        assert job["training_method"]["method"] == "dpo" and job["status"] == "completed"
        assert job["training_method"]["dpo_beta"] == 0.2 and job["training_method"]["rpo_alpha"] == 0.5
        uploaded = fake_together.file_contents[job["training_file"]].decode()
        assert json.loads(uploaded.splitlines()[0]).keys() == {"input", "preferred_output", "non_preferred_output"}
    assert {j.status for j in store.get_jobs("r") if j.status != "skipped"} == {"succeeded"}
    trained = [u for u in store.get_usage("r") if u.billing == "training" and not u.estimated]
    assert sum(u.trained_tokens for u in trained) == fake_together.usage[LLAMA_8B]["trained_tokens"] > 0
    # the bill is Together's own price of each job (its total_price, at its DPO rate), not our table's SFT rate
    charged = sum(job["total_price"] for job in jobs) / NANODOLLARS
    table_rate = sum(u.trained_tokens for u in trained) * MODELS[LLAMA_8B].lora_price / 1e6  # type: ignore[operator]
    assert sum(u.cost_usd for u in trained) == pytest.approx(charged)
    assert charged == pytest.approx(DPO_PRICE_FACTOR * table_rate)
    assert {u.price_source for u in trained} == {PROVIDER_BILL}
    store.close()


def test_together_refuses_a_malformed_pair_file_with_its_rule(tmp_path: Path) -> None:
    from backends.hosted.preference_files import validate_preference_file
    from backends.together_finetune import TOGETHER_PREFERENCE_RULES
    from foundation.errors import UserError

    good = {"input": {"messages": [{"role": "user", "content": "2+2?"}]},
            "preferred_output": [{"role": "assistant", "content": "4"}],
            "non_preferred_output": [{"role": "assistant", "content": "5"}]}
    bad = {**good, "non_preferred_output": [{"role": "assistant", "content": "5"}, {"role": "assistant",
                                                                                   "content": "6"}]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 2: non_preferred_output must contain exactly one message from the "
                                        "assistant role"):
        validate_preference_file(path, TOGETHER_PREFERENCE_RULES)


def test_a_backend_without_the_objective_is_refused_before_the_run_is_recorded(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text(f'backend = "openai"\nmodel = "{MINI}"\n[training]\nobjective = "dpo"\n')
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}  # refused before a key is even looked for
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--config", "run.toml", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        'error: [training] objective "dpo" does not run on the openai backend: use objective "sft" or '
        '"sft-then-dpo" there, or a backend that trains it (local and vllm train all three)']
    db = sqlite3.connect(tmp_path / "maft.db")
    assert db.execute("select count(*) from runs").fetchone()[0] == 0


def openai_config(fake: FakeOpenAI) -> str:
    return f"""backend = "openai"
model = "{MINI}"
agents = 3
rounds = 2
train_size = 30
eval_size = 4
seed = 1
critic_mix = 0.0
[training]
objective = "sft-then-dpo"
beta = 0.2
[preference]
extra_samples = 1
[openai]
base_url = "{fake.base_url}"
poll_interval = 0.01
n_epochs = 1
"""


class Crash(BaseException):
    """Stands in for the process dying (a BaseException, so that no retry layer takes it for a fault)."""


@pytest.mark.fake_together(base_accuracy=0.7)
def test_sft_then_dpo_on_together_resumed_between_the_stages_starts_neither_twice(
        tmp_path: Path, fake_together: FakeTogether, monkeypatch: pytest.MonkeyPatch) -> None:
    from backends.together_finetune import TogetherJobs

    original = TogetherJobs._create
    crashed: list[str] = []

    def dying_create(self: TogetherJobs, params: dict[str, Any], key: str) -> str:
        job_id = original(self, params, key)
        if key.endswith("/dpo") and not crashed:  # the DPO stage exists on the server; our record has no id
            crashed.append(key)
            raise Crash()
        return job_id

    env = {"TOGETHER_API_KEY": fake_together.api_key}
    monkeypatch.setattr(TogetherJobs, "_create", dying_create)
    with pytest.raises(Crash):
        orchestrator(tmp_path, env, together_config(fake_together, "sft-then-dpo"))
    assert crashed
    monkeypatch.setattr(TogetherJobs, "_create", original)
    resumed = CliRunner().invoke(command, ["run", "--resume", "r", "--db", str(tmp_path / "m.db"), "--workdir",
                                           str(tmp_path / "w"), "--quiet"], env=env)
    assert resumed.exit_code == 0, resumed.output
    store = Store(tmp_path / "m.db")
    both = [d for d in store.get_datasets("r", 1) if d.n_pairs and d.n_examples]
    assert both
    jobs = list(fake_together.jobs.values())
    sft = {j["id"]: j for j in jobs if j["training_method"]["method"] == "sft"}
    dpo = [j for j in jobs if j["training_method"]["method"] == "dpo"]
    assert len(dpo) == len(both) and len(sft) >= len(both)  # one DPO stage per slot with both: none twice
    assert all(j["status"] == "completed" and j["from_checkpoint"] in sft for j in dpo)
    assert len({j["from_checkpoint"] for j in dpo}) == len(dpo)  # each from its own SFT job
    models = {a.model_id for a in store.get_agents("r", 1)}
    assert {j["model_output_name"] for j in dpo} <= models  # the agents are the DPO stage's models
    trained = [u for u in store.get_usage("r") if u.billing == "training" and not u.estimated]
    assert sum(u.trained_tokens for u in trained) == fake_together.usage[LLAMA_8B]["trained_tokens"]  # both stages
    store.close()


@pytest.mark.fake_openai(base_accuracy=0.6, finetune_bonus=0.1)
def test_sft_then_dpo_on_openai_makes_a_dpo_job_on_each_sft_model(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    result = orchestrator(tmp_path, {"OPENAI_API_KEY": fake_openai.api_key}, openai_config(fake_openai))
    assert result.exit_code == 0, result.output
    store = Store(tmp_path / "m.db")
    datasets = {(d.agent, d.role): d for d in store.get_datasets("r", 1)}
    for d in datasets.values():  # only one-turn pairs are sent: the critics' pairs are dropped, and counted so
        assert len(lines(str(d.pairs_path))) == d.n_pairs
        assert d.role == "generator" or d.n_pairs == 0
        for pair in lines(str(d.pairs_path)):
            assert [m["role"] for m in pair["input"]["messages"]] == ["user"]
    jobs = list(fake_openai.jobs.values())
    dpo = [j for j in jobs if j["method"]["type"] == "dpo"]
    sft = {j["fine_tuned_model"]: j for j in jobs if j["method"]["type"] == "supervised"}
    both = [d for d in datasets.values() if d.n_pairs >= 10 and d.n_examples >= 10]
    assert both and len(dpo) == len(both)
    for job in dpo:  # on the SFT job's model, with the run's beta (OpenAI nests the hyperparameters)
        assert job["model"] in sft and job["status"] == "succeeded"
        assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    agents = {a.model_id for a in store.get_agents("r", 1)}
    assert {j["fine_tuned_model"] for j in dpo} <= agents
    trained = [u for u in store.get_usage("r") if u.billing == "training" and not u.estimated]
    assert sum(u.trained_tokens for u in trained) == fake_openai.usage[MINI]["trained_tokens"]  # both stages
    store.close()


def write_files(tmp_path: Path, n: int = 12, turns: int = 1) -> tuple[Path, Path]:
    sft, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i}+1?"},
                                                    {"role": "assistant", "content": f"It is {i + 1}."}]}) + "\n"
                           for i in range(n)), encoding="utf-8")
    prompt = [{"role": "user", "content": "Check again."}, {"role": "assistant", "content": "Sure."}] * (turns - 1)
    pairs.write_text("".join(json.dumps({
        "input": {"messages": [*prompt, {"role": "user", "content": f"What is {i}+1?"}]},
        "preferred_output": [{"role": "assistant", "content": f"It is {i + 1}."}],
        "non_preferred_output": [{"role": "assistant", "content": f"It is {i + 2}."}]}) + "\n"
        for i in range(n)), encoding="utf-8")
    return sft, pairs


def poll_to_end(backend: Any, ref: Any) -> Any:
    for _ in range(100):
        state = backend.poll(ref)
        if state.status in ("succeeded", "failed", "cancelled"):
            return state
    raise AssertionError("the job never ended")


@pytest.mark.parametrize("api", ["openai", "azure"])
def test_openai_and_azure_take_sft_then_dpo_each_in_its_own_shape(tmp_path: Path, fake_openai: FakeOpenAI,
                                                                 api: str) -> None:
    from backends.base import DpoParams, FinetuneSpec, MemoryState
    from backends.openai import OpenAIBackend
    from backends.openai_settings import OpenAIConfig

    settings = (OpenAIConfig(api="azure", azure_endpoint=fake_openai.azure_endpoint, api_version="2024-10-21")
                if api == "azure" else OpenAIConfig(base_url=fake_openai.base_url))
    variable = "AZURE_OPENAI_API_KEY" if api == "azure" else "OPENAI_API_KEY"
    backend = OpenAIBackend(MINI, settings, MemoryState(), show_progress=False, dotenv=tmp_path / "none",
                            environ={variable: fake_openai.api_key})
    sft, pairs = write_files(tmp_path)
    spec = FinetuneSpec(key="k", base_model="base", training_file=sft, suffix="a1-g", objective="sft-then-dpo",
                        preference_file=pairs, dpo=DpoParams(beta=0.3))
    ref = backend.start_finetune(spec)
    state = poll_to_end(backend, ref)
    assert state.status == "succeeded", state.error
    first, second = fake_openai.jobs[ref.provider_job_id], fake_openai.jobs[list(fake_openai.jobs)[-1]]
    assert first["method"]["type"] == "supervised" and second["method"]["type"] == "dpo"
    assert second["model"] == first["fine_tuned_model"] and state.model_id == second["fine_tuned_model"]
    assert second["method"]["dpo"]["hyperparameters"]["beta"] == 0.3
    assert state.trained_tokens == first["trained_tokens"] + second["trained_tokens"]
    assert len(fake_openai.jobs) == 2 and backend.poll(ref).model_id == state.model_id  # no third job
    backend.close()


def test_openai_refuses_a_pair_file_with_more_than_one_turn_before_uploading(tmp_path: Path,
                                                                           fake_openai: FakeOpenAI) -> None:
    from backends.base import FinetuneSpec, MemoryState
    from backends.openai import OpenAIBackend
    from backends.openai_settings import OpenAIConfig
    from foundation.errors import UserError

    backend = OpenAIBackend(MINI, OpenAIConfig(base_url=fake_openai.base_url), MemoryState(), show_progress=False,
                            dotenv=tmp_path / "none", environ={"OPENAI_API_KEY": fake_openai.api_key})
    sft, pairs = write_files(tmp_path, turns=2)
    spec = FinetuneSpec(key="k", base_model="base", training_file=sft, suffix="a1-c", objective="sft-then-dpo",
                        preference_file=pairs)
    with pytest.raises(UserError, match="line 1: OpenAI trains only on one-turn conversations: input.messages has "
                                        "2 user messages"):
        backend.start_finetune(spec)
    assert fake_openai.counts["POST /v1/files"] == 0 and not fake_openai.jobs  # nothing uploaded, no SFT job paid
    backend.close()


@pytest.mark.fake_together()
def test_the_fake_together_fails_a_dpo_job_on_a_malformed_pair_file_with_togethers_words(
        tmp_path: Path, fake_together: FakeTogether) -> None:
    import together

    _, pairs = write_files(tmp_path, n=2)
    bad = json.loads(pairs.read_text().splitlines()[0])
    bad["preferred_output"].append({"role": "assistant", "content": "or 3"})
    pairs.write_text(json.dumps(bad) + "\n")
    client = together.Together(base_url=fake_together.base_url, api_key=fake_together.api_key, max_retries=0)
    file_id = client.files.upload(pairs, purpose="fine-tune", check=False).id
    job = client.fine_tuning.create(training_file=file_id, model=LLAMA_8B, training_method="dpo", dpo_beta=0.1)
    for _ in range(5):
        status = client.fine_tuning.retrieve(job.id).status
    assert status == "error"
    message = fake_together.job_events(job.id)[-1]["message"]
    assert message.endswith("Invalid format on line 1 of the input file: `preferred_output` must contain exactly one "
                            "message from the assistant role.")


def test_the_dpo_stage_is_estimated_budgeted_and_priced_at_its_own_rate(tmp_path: Path) -> None:
    from backends import create_backend
    from backends.base import FinetuneSpec, MemoryState
    from foundation.errors import RunStopped
    from orchestrator.config import RunConfig
    from orchestrator.costs import Ledger, Pricing, load_prices
    from orchestrator.estimate import estimate_run
    from orchestrator.store import JobRow, RunRow
    from orchestrator.tasks import get_task

    prices = tmp_path / "prices.toml"
    prices.write_text(f'[models."{LLAMA_8B}"]\nfamily = "together"\ninput = 0.18\noutput = 0.18\ntraining = 1.0\n'
                      'training_dpo = 3.0\nsource = "test"\n', encoding="utf-8")
    table = load_prices(prices)
    pricing = Pricing(table, LLAMA_8B, family="together")
    assert pricing.training("base", 1_000_000, dpo_tokens=250_000) == pytest.approx(0.75 + 0.75)

    def training(objective: str) -> tuple[int, float]:
        config = RunConfig.model_validate({"backend": "together", "model": LLAMA_8B, "train_size": 6,
                                           "eval_size": 2, "training": {"objective": objective}})
        backend = create_backend("together", LLAMA_8B, config.together, workdir=tmp_path, state=MemoryState(),
                                 show_progress=False, training=config.training)
        info = backend.describe()
        lines = estimate_run(config, get_task(config.task), Pricing(table, LLAMA_8B, family="together"), info)
        (line,) = [e for e in lines if e.stage == "training"]
        return line.trained_tokens, line.expected_usd

    sft, both, dpo = training("sft"), training("sft-then-dpo"), training("dpo")
    assert both[0] == sft[0] + dpo[0] and dpo[0] > 0  # the DPO stage's pair files are counted
    assert dpo[1] == pytest.approx(dpo[0] * 3.0 / 1e6) and sft[1] == pytest.approx(sft[0] * 1.0 / 1e6)

    # --max-cost: a job is checked on every file it trains on, at their rates
    sft_file, pairs = write_files(tmp_path, n=200)
    store = Store(tmp_path / "m.db")
    store.save_run(RunRow(id="r", config="{}", backend="together", model=LLAMA_8B, task="arithmetic"))
    ledger = Ledger(store, "r", pricing, max_cost=0.01)
    spec = FinetuneSpec(key="k", base_model="base", training_file=sft_file, suffix="s")
    ledger.check_training(spec, 1, "the SFT job")  # about $0.005: within the budget
    with pytest.raises(RunStopped, match="budget: the DPO job"):
        ledger.check_training(spec.model_copy(update={"objective": "dpo", "preference_file": pairs}), 1, "the DPO job")
    job = JobRow(key="k", run_id="r", iteration=1, agent=0, role="generator", backend="together", base_model_id="base",
                 trained_tokens=10_000)
    ledger.record_training_estimate(job, spec.model_copy(update={"objective": "sft-then-dpo",
                                                                "preference_file": pairs}), 1)
    ledger.record_training(job)  # the bill splits the provider's count as the estimate did
    (bill,) = [u for u in store.get_usage("r") if u.billing == "training"]
    assert 10_000 * 1.0 / 1e6 < bill.cost_usd < 10_000 * 3.0 / 1e6
    store.close()
