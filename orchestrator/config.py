"""Run configuration: one pydantic model, filled from a TOML file and CLI flags, validated before any work.

Only what changes the *result* of a run lives here; where things are written (`--db`, the work folder) and the
run's name are invocation settings. The run identity hash leaves out `iterations`, so the same command with a
larger `--iterations` extends a finished run instead of starting a new one.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from backends.base import TrainingParams
from foundation.errors import UserError
from orchestrator.tasks import task_defaults

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class GenerationConfig(BaseModel):
    """Sampling for every agent and the summarizer. In a run config, what `[generation]` leaves out comes from
    the task (`orchestrator.tasks.task_defaults`: the paper's temperature 1, top_p 0.9 and answer-sized
    `max_tokens` for its tasks; these class defaults, the demo's, for the default job's easy arithmetic)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(96, ge=1, le=32768)
    summary_max_tokens: int = Field(128, ge=1, le=32768)


class DiversityConfig(BaseModel):
    """Which diversity measures each evaluation computes (consensus always; it costs nothing)."""

    model_config = ConfigDict(extra="forbid")

    embeddings: Literal["minilm", "provider", "off"] = "minilm"  # provider: the backend's embedding endpoint
    embedding_model: str | None = None  # with "provider": which of its models (None: its default)
    critic_nll: bool = True  # where the backend can score text (local): the held-out critics' NLL


class LocalConfig(BaseModel):
    """Settings only the local backend reads."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Generation's dtype (auto: bfloat16 on CUDA, float32 on CPU). Part of the run's identity: it changes the
    # answers, and in bfloat16 an answer also depends on its batch mates.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    batch_size: int = Field(48, ge=1, le=4096)


class OpenAIConfig(BaseModel):
    """Settings only the openai backend reads (OpenAI, Azure OpenAI, or any OpenAI-compatible server).

    Secrets never live here: the API key comes from OPENAI_API_KEY / AZURE_OPENAI_API_KEY in the environment
    or `.env`. Finetuning hyper-parameters default to the paper's (2 epochs, batch 1, multiplier 1).
    """

    model_config = ConfigDict(extra="forbid")

    api: Literal["openai", "azure"] = "openai"
    base_url: str | None = None  # else OPENAI_BASE_URL, else the provider's default
    azure_endpoint: str | None = None  # else AZURE_OPENAI_ENDPOINT
    api_version: str | None = None  # Azure only; else OPENAI_API_VERSION
    concurrency: int = Field(16, ge=1, le=1024)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_retries: int = Field(6, ge=0, le=50)  # quick retries of a transient fault, before it is put back
    give_up_after: float = Field(900.0, gt=0)  # seconds the provider may answer nothing before a stage stops
    backoff_initial: float = Field(1.0, gt=0)  # seconds before the first retry (doubling to backoff_max)
    backoff_max: float = Field(60.0, gt=0)  # and between the tries of a request put back
    timeout: float = Field(120.0, gt=0)
    batch: bool = False  # debate rounds through the Batch API (half price, slower)
    n_epochs: int | Literal["auto"] = 2
    batch_size: int | Literal["auto"] = 1
    learning_rate_multiplier: float | Literal["auto"] = 1.0
    poll_interval: float = Field(30.0, gt=0)
    max_concurrent_jobs: int = Field(6, ge=1, le=256)
    billed: bool | Literal["auto"] = Field(
        "auto", description="Whether calls cost money per token, so --max-cost and --dry-run price them. auto: "
        "yes for api.openai.com and Azure; for any other base URL (a proxy, vLLM, Ollama) exactly when the price "
        "table (or --prices) has the model. true / false force it.")


class TogetherConfig(BaseModel):
    """Settings only the together backend reads. The key comes from TOGETHER_API_KEY (environment or `.env`)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = None  # else TOGETHER_BASE_URL, else the SDK's default
    concurrency: int = Field(16, ge=1, le=1024)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_retries: int = Field(6, ge=0, le=50)  # as in [openai]
    give_up_after: float = Field(900.0, gt=0)
    backoff_initial: float = Field(1.0, gt=0)
    backoff_max: float = Field(60.0, gt=0)
    timeout: float = Field(120.0, gt=0)
    lora: bool = True  # False: full finetuning (dearer; its models need a dedicated endpoint to answer)
    # True: you will deploy finetuned models on dedicated endpoints when the run stops to ask (needed for full
    # finetuning, whose models Together never serves serverless)
    dedicated_endpoints: bool = False
    n_epochs: int = Field(2, ge=1, le=100)
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    batch_size: int | Literal["max"] = "max"
    lora_r: int = Field(8, ge=1, le=1024)
    lora_alpha: int = Field(16, ge=1, le=4096)
    poll_interval: float = Field(30.0, gt=0)
    max_concurrent_jobs: int = Field(6, ge=1, le=256)


# Fields that change how a run is carried out but not what it computes: they may differ on resume.
_OPERATIONAL: dict[str, Any] = {
    "iterations": True,
    "diversity": True,  # measured after the fact: it changes no answer and no model
    "local": {"device", "batch_size"},
    "openai": {"concurrency", "requests_per_minute", "tokens_per_minute", "max_retries", "give_up_after",
               "backoff_initial", "backoff_max", "timeout", "batch", "poll_interval", "max_concurrent_jobs",
               "base_url", "azure_endpoint", "api_version", "billed"},
    "together": {"concurrency", "requests_per_minute", "tokens_per_minute", "max_retries", "give_up_after",
                 "backoff_initial", "backoff_max", "timeout", "poll_interval", "max_concurrent_jobs", "base_url",
                 "dedicated_endpoints"},
}
BACKENDS = ("local", "openai", "together")


def _default_training(max_length: int = 512) -> TrainingParams:
    # Small sets of short answers: a few more epochs and a higher rate than the paper's 7B settings.
    return TrainingParams(epochs=3, batch_size=8, learning_rate=3e-4, max_length=max_length)


class RunConfig(BaseModel):
    """Everything that decides what a run computes. Defaults are the small CPU job of `orchestrator run`."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["local", "openai", "together"] = "local"
    model: str = DEFAULT_MODEL
    task: str = "arithmetic:easy"
    agents: int = Field(3, ge=1, le=64)
    rounds: int = Field(2, ge=1, le=16)
    iterations: int = Field(1, ge=1, le=100)
    train_size: int = Field(24, ge=1)
    eval_size: int = Field(24, ge=1)
    seed: int = 0
    # continue: the previous model on this iteration's data; restart: the base model on it; accumulate: the base
    # model on all of that agent's data from iterations 1..ℓ (METHOD.md §4)
    strategy: Literal["continue", "restart", "accumulate"] = "continue"
    summarize: bool = True
    critic_mix: float = Field(0.5, ge=0.0, le=1.0, description="w: share of corrected examples in critic data")
    critic_train_all_turns: bool = False
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    training: TrainingParams = Field(default_factory=_default_training)
    local: LocalConfig = Field(default_factory=LocalConfig)
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)
    together: TogetherConfig = Field(default_factory=TogetherConfig)
    diversity: DiversityConfig = Field(default_factory=DiversityConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """What the config leaves out of `[generation]` and `[training] max_length` comes from its task, so a
        GSM8K run without a `[generation]` table samples as the paper did with room for its answers instead of
        the demo's 96 tokens. A stored config holds every value, so resuming never changes one."""
        if not isinstance(data, dict):
            return data
        defaults = task_defaults(str(data.get("task", cls.model_fields["task"].default)))
        out = dict(data)
        generation = data.get("generation")
        if generation is None or isinstance(generation, dict):
            out["generation"] = {**defaults.generation(), **(generation or {})}
        training = data.get("training")
        if training is None:
            out["training"] = _default_training(defaults.max_length)
        elif isinstance(training, dict) and "max_length" not in training:
            out["training"] = {**training, "max_length": defaults.max_length}
        return out

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.rounds > 1 and self.agents < 2:
            raise ValueError("a debate with rounds > 1 needs at least 2 agents (set agents >= 2 or rounds = 1)")
        if self.backend != "local" and self.model == DEFAULT_MODEL:
            raise ValueError(f"the {self.backend} backend needs a model it serves: pass --model, e.g. "
                             "gpt-4.1-mini-2025-04-14 (the bundled SmolLM2 runs only on the local backend)")
        if self.backend == "together" and not self.together.lora and not self.together.dedicated_endpoints:
            # Known before anything is paid: every model it trains would stop the next debate until deployed.
            raise ValueError("full finetuning on Together ([together] lora = false) makes models that answer only "
                             "on a dedicated endpoint, which this tool does not create: keep lora = true, or set "
                             "[together] dedicated_endpoints = true and deploy each model when the run stops for it")
        return self

    def identity_fields(self) -> dict[str, Any]:
        """What decides the results: everything but `iterations` (a run may be extended) and how it is run."""
        others = {name: True for name in BACKENDS if name != self.backend}  # unused backends' settings
        return self.model_dump(mode="json", exclude=_OPERATIONAL | others)

    def identity(self) -> str:
        return hashlib.sha256(json.dumps(self.identity_fields(), sort_keys=True).encode()).hexdigest()[:8]

    def default_name(self) -> str:
        slug = "".join(c if c.isalnum() else "-" for c in Path(self.task).name.lower()).strip("-")
        return f"{slug}-{self.backend}-{self.identity()}"


def _describe_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if not where:  # a rule across fields: its message already says what to change
        return f"{first['msg'].removeprefix('Value error, ')} ({source})"
    if first["type"] == "extra_forbidden":
        return f"config key '{where}' does not exist ({source}): see `orchestrator run --help` for the valid keys"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"invalid config value for '{where}': {first['msg']}{shown} ({source}): fix it and run again"


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path given to --config")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}; fix that line") from None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any], source: str) -> RunConfig:
    """File values, then flags on top (flags given as None are not set)."""
    flags = {k: v for k, v in flag_values.items() if v is not None}
    try:
        return RunConfig.model_validate(_merge(file_values, flags))
    except ValidationError as exc:
        raise UserError(_describe_error(exc, source)) from None


def config_from_json(text: str) -> RunConfig:
    return RunConfig.model_validate_json(text)
