"""OpenAI is closing self-serve finetuning: a command that will finetune on it says so, once, before it pays.

Azure OpenAI is another service (its finetuning stays), and a command with nothing to train (a finished run
resumed) starts no job: neither says it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from backends.openai_finetune import SELF_SERVE_NOTICE
from orchestrator.cli import cli as command
from tests.fake_openai import FakeOpenAI

MINI = "gpt-4.1-mini-2025-04-14"
WARNING = f"warning: {SELF_SERVE_NOTICE}"


def config(section: str) -> str:
    return f"""backend = "openai"
model = "{MINI}"
agents = 2
rounds = 2
train_size = 30
eval_size = 4
seed = 1
critic_mix = 0.0
[openai]
{section}
poll_interval = 0.01
n_epochs = 1
"""


def invoke(tmp_path: Path, env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(command, [*args, "--db", str(tmp_path / "m.db"), "--workdir", str(tmp_path / "w"),
                                        "--quiet"], env={**env, "COLUMNS": "400"})


@pytest.mark.fake_openai(base_accuracy=0.8)
def test_a_run_that_finetunes_on_openai_warns_once_and_a_finished_one_resumed_does_not(
        tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    (tmp_path / "run.toml").write_text(config(f'base_url = "{fake_openai.base_url}"'), encoding="utf-8")
    env = {"OPENAI_API_KEY": fake_openai.api_key}
    result = invoke(tmp_path, env, "run", "--config", str(tmp_path / "run.toml"), "--name", "r")
    assert result.exit_code == 0, result.output
    assert fake_openai.jobs  # it finetuned
    assert [line for line in result.output.splitlines() if "self-serve" in line] == [WARNING]
    again = invoke(tmp_path, env, "run", "--resume", "r")
    assert again.exit_code == 0, again.output
    assert "self-serve" not in again.output  # nothing left to train


@pytest.mark.fake_openai(base_accuracy=0.8)
def test_a_run_that_finetunes_on_azure_openai_does_not_warn(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    section = f'api = "azure"\nazure_endpoint = "{fake_openai.azure_endpoint}"\napi_version = "2024-10-21"'
    (tmp_path / "run.toml").write_text(config(section), encoding="utf-8")
    result = invoke(tmp_path, {"AZURE_OPENAI_API_KEY": fake_openai.api_key}, "run", "--config",
                    str(tmp_path / "run.toml"), "--name", "a")
    assert result.exit_code == 0, result.output
    assert fake_openai.jobs and "self-serve" not in result.output
