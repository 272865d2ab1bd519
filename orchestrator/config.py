"""Run configuration: one pydantic model, filled from a TOML file and CLI flags, validated before any work.

Only what changes the *result* of a run lives here; where things are written (`--db`, the work folder) and the
run's name are invocation settings. Each backend owns its settings section (`[local]`, `[openai]`, ...; the
registry in `backends` lists them). The run identity hash leaves out every field marked operational
(`backends.settings.operational`): `iterations`, so the same command with a larger `--iterations` extends a
finished run instead of starting a new one, and the settings that change how, not what, a run computes.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from backends import DEFAULT_BACKEND, backend_entries, backend_entry, backend_names
from backends.base import BackendInfo, Objective, TrainingParams
from backends.cluster_settings import ClusterConfig
from backends.local_settings import DEFAULT_MODEL
from backends.settings import BackendSettings, operational, operational_fields
from foundation.added_later import OmitsAddedDefaults, added_later
from foundation.errors import UserError
from orchestrator.societies import OBJECTIVES, SOCIETIES
from orchestrator.tasks import task_defaults


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


class PreferenceConfig(BaseModel):
    """How preference pairs are built when `[training] objective` is not "sft" (`orchestrator.preference`):
    `extra_samples` round-1 samples at temperature 1 per agent whose answer agrees with a strict majority (the
    rejected side of its generator pair, when one disagrees); `min_margin` is the vote margin a pair needs on a
    backend that cannot weight pairs (None: 1/N, a 2-to-1 split for N = 3). The local trainer weights pairs."""

    model_config = ConfigDict(extra="forbid")

    extra_samples: int = Field(4, ge=0, le=64)
    min_margin: float | None = Field(None, gt=0.0, le=1.0)


def objective_problem(objective: Objective, info: BackendInfo) -> str | None:
    """Why a backend cannot train `[training] objective` (None: it can), said from its capability
    (`BackendInfo.objectives`) before the run is recorded, naming what does work."""
    if objective in info.objectives:
        return None
    works = " or ".join(f'"{o}"' for o in info.objectives)
    return (f"[training] objective \"{objective}\" does not run on the {info.name} backend: use objective {works} "
            "there, or a backend that trains it (local and vllm train all three)")


def baselines_problem(baselines: Sequence[str], objective: Objective, info: BackendInfo) -> str | None:
    """Why an objective variant asked for by `--baselines` cannot run beside this run (None: all can): the run's
    own objective (its multiagent society is that variant already), or one the backend cannot train."""
    for name in baselines:
        wanted = SOCIETIES[name].objective if name in SOCIETIES else None
        if wanted is None:
            continue
        if wanted == objective:
            others = ", ".join(n for n in OBJECTIVES if SOCIETIES[n].objective != objective)
            return (f"baseline {name} trains by objective \"{wanted}\", as this run does already (its multiagent "
                    f"society is that variant): drop it from --baselines, or ask for {others}")
        if (problem := objective_problem(wanted, info)) is not None:
            return f"baseline {name}: {problem}"
    return None


def _default_training(max_length: int = 512) -> TrainingParams:
    # Small sets of short answers: a few more epochs and a higher rate than the paper's 7B settings.
    return TrainingParams(epochs=3, batch_size=8, learning_rate=3e-4, max_length=max_length)


# The backend a run uses: one of the registered names (mypy sees a plain str; pydantic checks the Literal).
if TYPE_CHECKING:
    BackendName: TypeAlias = str
else:
    BackendName = Literal[backend_names()]


class _RunChoices(OmitsAddedDefaults):
    """The run's own choices, which come before the backends' sections in a config (see `RunConfig`)."""

    model_config = ConfigDict(extra="forbid")

    backend: BackendName = DEFAULT_BACKEND
    model: str = DEFAULT_MODEL
    task: str = "arithmetic:easy"
    agents: int = Field(3, ge=1, le=64)
    rounds: int = Field(2, ge=1, le=16)
    iterations: int = operational(1, ge=1, le=100)  # a finished run may be extended
    train_size: int = Field(24, ge=1)
    eval_size: int = Field(24, ge=1)
    seed: int = 0
    # continue: the previous model on this iteration's data; restart: the base model on it; accumulate: the base
    # model on all of that agent's data from iterations 1..ℓ, as the paper's iterated finetuning describes
    strategy: Literal["continue", "restart", "accumulate"] = "continue"
    summarize: bool = True
    critic_mix: float = Field(0.5, ge=0.0, le=1.0, description="w: share of corrected examples in critic data")
    critic_train_all_turns: bool = False
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    training: TrainingParams = Field(default_factory=_default_training)


def _backend_sections() -> dict[str, Any]:
    """One field per registered backend, named after it and typed by its settings model: `[local]` in TOML,
    `config.local` in code, validated (and its errors located) as any nested model."""
    taken = set(_RunChoices.model_fields) | {"diversity", "preference"}
    clash = [e.name for e in backend_entries() if e.name in taken]
    if clash:
        raise RuntimeError(f"backend names {clash} are run config fields: a backend needs a name of its own")
    return {e.name: (e.settings, Field(default_factory=e.settings)) for e in backend_entries()}


if TYPE_CHECKING:
    class _WithBackendSections(_RunChoices):
        """The sections are real fields made from the registry, which mypy cannot see: an attribute it does not
        know may be one. `RunConfig.backend_settings()` is the typed way to the section a run uses."""

        def __getattr__(self, name: str) -> Any: ...
else:
    _WithBackendSections = create_model("_WithBackendSections", __base__=_RunChoices, __module__=__name__,
                                        **_backend_sections())


class RunConfig(_WithBackendSections):
    """Everything that decides what a run computes. Defaults are the small CPU job of `orchestrator run`.

    Three layers only to keep the order of the keys a stored config has always had (the report lists them so):
    the run's choices, then one section per registered backend, then `diversity`."""

    diversity: DiversityConfig = operational(default_factory=DiversityConfig)  # measured after the fact
    preference: PreferenceConfig = added_later(default_factory=PreferenceConfig)  # pairs for objective dpo
    # where the local backend finetunes (Ray): operational, and left out of the dump of a run without it
    cluster: ClusterConfig = Field(default_factory=ClusterConfig,
                                   json_schema_extra={"operational": True, "added_later": True})

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
        if not backend_entry(self.backend).runs_bundled_model and self.model == DEFAULT_MODEL:
            raise ValueError(f"the {self.backend} backend needs a model it serves: pass --model, e.g. "
                             "gpt-4.1-mini-2025-04-14 (the bundled SmolLM2 runs only on the local backend)")
        problem = self.backend_settings().problem()
        if problem is not None:
            raise ValueError(problem)
        return self

    def backend_settings(self) -> BackendSettings:
        """The settings section of the backend this run uses."""
        return cast(BackendSettings, getattr(self, self.backend))

    def identity_fields(self) -> dict[str, Any]:
        """What decides the results: every field but those marked operational (at any depth: `iterations`, so a
        run may be extended, and how it is run) and the sections of the backends it does not use."""
        exclude = operational_fields(type(self))
        exclude.update({name: True for name in backend_names() if name != self.backend})
        return self.model_dump(mode="json", exclude=exclude)

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
