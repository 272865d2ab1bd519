"""Run identities, the backends' settings and the backend registry.

The identity hash names a run and decides whether a command resumes it, so the hashes of configs written by
earlier versions are pinned here: a change that moves them would leave every old database unresumable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel, Field, ValidationError

from backends import backend_entry, backend_names, create_backend
from backends.base import MemoryState, TrainingParams
from backends.local_settings import LocalConfig
from backends.openai_settings import OpenAIConfig
from backends.settings import operational, operational_fields
from backends.together_settings import TogetherConfig
from orchestrator.config import RunConfig
from orchestrator.store import Store
from tests.fakes import ScriptedBackend

ROOT = Path(__file__).resolve().parents[1]

OPENAI_MODEL = "gpt-4.1-mini-2025-04-14"
TOGETHER_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"

# (config, its identity as the versions before the backend registry computed it). Each "operational" twin sets
# settings a resume may change, and must keep its plain twin's identity.
PINNED: dict[str, tuple[dict[str, Any], str]] = {
    "default": ({}, "36e4e470"),
    "default, operational": ({"iterations": 4, "diversity": {"embeddings": "off", "critic_nll": False},
                              "local": {"device": "cpu", "batch_size": 7}}, "36e4e470"),
    "local bfloat16": ({"local": {"dtype": "bfloat16"}}, "05c371fc"),
    "local bfloat16, other backends' sections": (
        {"local": {"dtype": "bfloat16", "device": "cpu", "batch_size": 7}, "openai": {"n_epochs": 5},
         "together": {"lora": False}}, "05c371fc"),
    "openai": ({"backend": "openai", "model": OPENAI_MODEL,
                "openai": {"n_epochs": 3, "learning_rate_multiplier": "auto"}}, "6a76c003"),
    "openai, operational": (
        {"backend": "openai", "model": OPENAI_MODEL, "iterations": 4, "diversity": {"embeddings": "off"},
         "local": {"dtype": "bfloat16"},
         "openai": {"n_epochs": 3, "learning_rate_multiplier": "auto", "concurrency": 4, "requests_per_minute": 60,
                    "tokens_per_minute": 9000, "max_retries": 1, "give_up_after": 30.0, "backoff_initial": 0.5,
                    "backoff_max": 2.0, "timeout": 5.0, "batch": True, "poll_interval": 1.0,
                    "max_concurrent_jobs": 2, "base_url": "http://127.0.0.1:9/v1", "azure_endpoint": "https://x",
                    "api_version": "2024-10-21", "billed": False}}, "6a76c003"),
    "azure": ({"backend": "openai", "model": OPENAI_MODEL,
               "openai": {"api": "azure", "azure_endpoint": "https://x", "api_version": "2024-10-21"}}, "27e312c1"),
    "together": ({"backend": "together", "model": TOGETHER_MODEL, "together": {"lora_r": 16, "n_epochs": 3}},
                 "10863f42"),
    "together, operational": (
        {"backend": "together", "model": TOGETHER_MODEL,
         "together": {"lora_r": 16, "n_epochs": 3, "concurrency": 2, "requests_per_minute": 60,
                      "tokens_per_minute": 9000, "max_retries": 1, "give_up_after": 30.0, "backoff_initial": 0.5,
                      "backoff_max": 2.0, "timeout": 5.0, "poll_interval": 1.0, "max_concurrent_jobs": 2,
                      "base_url": "http://h:1", "dedicated_endpoints": True}}, "10863f42"),
    "gsm8k": ({"task": "gsm8k", "train_size": 100, "eval_size": 50, "seed": 2, "strategy": "accumulate"},
              "d3426662"),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_identities_of_existing_configs_are_unchanged(name: str) -> None:
    values, identity = PINNED[name]
    config = RunConfig.model_validate(values)
    assert config.identity() == identity
    slug = "gsm8k" if values.get("task") == "gsm8k" else "arithmetic-easy"
    assert config.default_name() == f"{slug}-{values.get('backend', 'local')}-{identity}"


def test_a_config_dumps_its_keys_in_the_order_stored_configs_have():
    """The report lists a run's settings in this order, and its --json output dumps them so."""
    assert list(RunConfig().model_dump()) == [
        "backend", "model", "task", "agents", "rounds", "iterations", "train_size", "eval_size", "seed", "strategy",
        "summarize", "critic_mix", "critic_train_all_turns", "generation", "training", "local", "openai",
        "together", "vllm", "diversity"]


# -- the operational mark --------------------------------------------------------------------------------------


def test_the_mark_is_found_at_any_depth():
    class Inner(BaseModel):
        kept: int = 1
        pace: int = operational(1)

    class Middle(BaseModel):
        inner: Inner = Field(default_factory=Inner)
        plain: Inner = Field(default_factory=Inner)
        loose: Inner = operational(default_factory=Inner)

    class Outer(BaseModel):
        middle: Middle = Field(default_factory=Middle)
        count: int = 3

    assert operational_fields(Outer) == {"middle": {"inner": {"pace": True}, "plain": {"pace": True},
                                                    "loose": True}}


# A script that runs the CLI as a version of the tool whose registry differs: the registry is read when the run
# config and the CLI are built (at import), so the change is made before they are imported, as a registry line
# would be. Its backends are scripted (tests.fakes), so nothing loads torch or calls a provider.
RUN_CLI = """
import sys
from orchestrator import cli
sys.argv = ["orchestrator", *sys.argv[1:]]
cli.main()
"""

A_NEW_LOCAL_SETTING = """
from dataclasses import replace

from pydantic import Field

import backends
from backends.local_settings import LocalConfig
from backends.settings import operational
from tests.fakes import ScriptedBackend


class Local(LocalConfig):
    prefetch: int = {field}(2, ge=1)  # a setting this version of the local backend adds


backends.REGISTRY["local"] = replace(backends.REGISTRY["local"], settings=Local)
backends.create_backend = lambda *a, **k: ScriptedBackend()
"""


SMALL = "train_size = 12\neval_size = 4\n[diversity]\nembeddings = \"off\"\n"  # a small run, quick to measure


def run_cli_with(setup: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", setup + RUN_CLI, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_an_operational_setting_added_later_keeps_the_identity_and_the_run_resumes(tmp_path, monkeypatch):
    """A run stored by a version without the setting, extended (a resume) by one that has it and sets it."""
    from orchestrator import cli as cli_module

    db = tmp_path / "m.db"
    first = tmp_path / "first.toml"
    first.write_text(SMALL)
    monkeypatch.setattr("backends.create_backend", lambda *a, **k: ScriptedBackend())
    monkeypatch.setattr(sys, "argv", ["orchestrator", "run", "--name", "r", "--config", str(first), "--db", str(db),
                                      "--quiet"])
    cli_module.main()
    config = tmp_path / "later.toml"
    config.write_text(SMALL + "[local]\nprefetch = 9\n")
    again = ("run", "--name", "r", "--config", str(config), "--iterations", "2", "--db", str(db), "--quiet")

    # The same setting left unmarked is part of what a run computes: the stored run is not this one.
    refused = run_cli_with(A_NEW_LOCAL_SETTING.format(field="Field"), *again)
    assert refused.returncode == 2, refused.stderr
    assert "run 'r' already exists with a different configuration (local differ)" in refused.stderr

    resumed = run_cli_with(A_NEW_LOCAL_SETTING.format(field="operational"), *again)
    assert resumed.returncode == 0, resumed.stderr
    store = Store(db)
    try:
        assert [run.id for run in store.list_runs()] == ["r"]
        run = store.require_run("r")
        assert run.status == "finished" and run.iterations_done == 2
        assert json.loads(run.config)["local"]["prefetch"] == 9
        assert {j.iteration for j in store.get_jobs("r")} == {1, 2}
        assert len(store.get_jobs("r")) == 12  # iteration 1's six jobs were found, not started again
    finally:
        store.close()


# -- the registry ------------------------------------------------------------------------------------------------


def test_the_registry_makes_the_run_configs_backend_choice_and_sections():
    names = backend_names()
    assert names == ("local", "openai", "together", "vllm")
    assert get_args(RunConfig.model_fields["backend"].annotation) == names
    fields = list(RunConfig.model_fields)
    assert fields[fields.index("training") + 1 : fields.index("diversity")] == list(names)
    for name in names:
        assert RunConfig.model_fields[name].annotation is backend_entry(name).settings
    with pytest.raises(ValidationError, match="Input should be 'local', 'openai', 'together' or 'vllm'"):
        RunConfig(backend="sglang")
    config = RunConfig(backend="together", model=TOGETHER_MODEL, together={"lora_r": 4})
    assert config.backend_settings() is config.together and config.together.lora_r == 4
    assert set(config.identity_fields()) >= {"together"} and not {"local", "openai"} & set(config.identity_fields())


def test_create_backend_builds_from_the_backends_own_settings(tmp_path):
    local = create_backend("local", "tiny", LocalConfig(device="cpu", batch_size=5), workdir=tmp_path,
                           state=MemoryState(), show_progress=False, training=TrainingParams(epochs=4))
    assert type(local).__name__ == "LocalBackend"
    assert (local.model, local.device, local.batch_size, local.training_epochs) == ("tiny", "cpu", 5, 4)
    assert local.workdir == tmp_path and local.show_progress is False
    hosted = create_backend("openai", OPENAI_MODEL, OpenAIConfig(concurrency=3), workdir=tmp_path,
                            state=MemoryState())
    assert type(hosted).__name__ == "OpenAIBackend" and hosted.settings.concurrency == 3
    assert create_backend("together", TOGETHER_MODEL, workdir=tmp_path, state=MemoryState()).settings == \
        TogetherConfig()
    with pytest.raises(TypeError, match="the openai backend takes OpenAIConfig, not TogetherConfig"):
        create_backend("openai", OPENAI_MODEL, TogetherConfig(), workdir=tmp_path, state=MemoryState())
    with pytest.raises(ValueError, match="unknown backend 'sglang'"):
        create_backend("sglang", "m", workdir=tmp_path, state=MemoryState())


A_NEW_BACKEND = """
import json

import backends
from backends.settings import BackendSettings, operational
from tests.fakes import ScriptedBackend


class DummyConfig(BackendSettings):
    skill: float = 0.5
    pace: int = operational(1)

    def problem(self):
        return "a dummy without skill answers nothing" if self.skill == 0 else None


class DummyBackend(ScriptedBackend):
    def __init__(self, model, settings, state, *, show_progress=True):
        super().__init__()
        print("MADE " + json.dumps([model, type(settings).__name__, settings.model_dump(), type(state).__name__]))


backends.REGISTRY["dummy"] = backends.BackendEntry("dummy", DummyConfig, "__main__:DummyBackend",
                                                   "a scripted stand-in")
"""


def test_one_registry_line_adds_a_backend_to_the_config_the_cli_and_create_backend(tmp_path):
    """The whole of a new backend: its settings and class (in the script here) and the line that registers it."""
    help_text = run_cli_with(A_NEW_BACKEND, "run", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "[local|openai|together|vllm|dummy]" in help_text.stdout
    assert "dummy: a scripted stand-in" in " ".join(help_text.stdout.split())

    config = tmp_path / "dummy.toml"
    config.write_text('backend = "dummy"\nmodel = "m"\n' + SMALL + "[dummy]\nskill = 0.7\npace = 3\n")
    db = tmp_path / "m.db"
    proc = run_cli_with(A_NEW_BACKEND, "run", "--config", str(config), "--name", "d", "--db", str(db), "--quiet")
    assert proc.returncode == 0, proc.stderr
    made = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("MADE ")]
    assert made == [["m", "DummyConfig", {"skill": 0.7, "pace": 3}, "StoreState"]]
    store = Store(db)
    try:
        run = store.require_run("d")
        assert run.backend == "dummy" and run.status == "finished"
        stored = json.loads(run.config)
        assert stored["dummy"] == {"skill": 0.7, "pace": 3}
        assert list(stored)[list(stored).index("vllm") + 1] == "dummy"
    finally:
        store.close()

    # its rules and its operational mark count as a built-in backend's do
    config.write_text(config.read_text().replace("skill = 0.7", "skill = 0"))
    refused = run_cli_with(A_NEW_BACKEND, "run", "--config", str(config), "--db", str(db))
    assert refused.returncode == 2 and "a dummy without skill answers nothing" in refused.stderr
    config.write_text(config.read_text().replace("skill = 0\n", "skill = 0.7\n").replace("pace = 3", "pace = 8"))
    extended = run_cli_with(A_NEW_BACKEND, "run", "--config", str(config), "--name", "d", "--iterations", "2",
                            "--db", str(db), "--quiet")
    assert extended.returncode == 0, extended.stderr
    store = Store(db)
    try:
        assert store.require_run("d").iterations_done == 2
    finally:
        store.close()


REPORT_SETTINGS = """
from orchestrator.config import RunConfig
from orchestrator.report.model import config_items

for config in (RunConfig(), RunConfig(backend="dummy", model="m")):
    print("KEYS " + " ".join(sorted({key.split(".")[0] for key, _ in config_items(config.model_dump(mode="json"))})))
"""


def test_the_report_shows_only_the_sections_of_the_backend_a_run_used_registered_ones_included():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", A_NEW_BACKEND + REPORT_SETTINGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    keys = [line[5:].split() for line in proc.stdout.splitlines() if line.startswith("KEYS ")]
    assert len(keys) == 2
    local, dummy = (set(k) for k in keys)
    assert "local" in local and not {"openai", "together", "dummy"} & local
    assert "dummy" in dummy and not {"local", "openai", "together"} & dummy
