"""Run identities, the backends' settings and the backend registry.

The identity hash names a run and decides whether a command resumes it, so the hashes of configs written by
earlier versions are pinned here: a change that moves them would leave every old database unresumable.
"""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.config import RunConfig

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
        "together", "diversity"]
