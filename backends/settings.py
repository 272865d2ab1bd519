"""What every backend's settings model shares, and the mark on the settings a resume may change.

A run's identity hash decides whether a command resumes a stored run or starts a new one. Settings that change
*how* a run is carried out but not *what* it computes (concurrency, timeouts, which device) must stay out of it,
or raising a rate limit would silently start the run again under a new name. Each such field says so itself,
`operational(...)` in place of `Field(...)`, so a new setting cannot be left off a list kept somewhere else.

Light on purpose: config loading and `--help` import this, never an SDK or torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from backends.base import BackendState, TrainingParams
from backends.cluster_settings import ClusterConfig


def operational(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """`Field(default, **kwargs)` for a setting that changes how a run is carried out, not what it computes: it
    stays out of the run's identity, so a resume may change it."""
    return Field(default, json_schema_extra={"operational": True}, **kwargs)


def is_operational(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and extra.get("operational") is True


def operational_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The operational fields of `model` as an `exclude` for `model_dump`: True for a marked field, the nested
    exclusion for a field whose type is itself a model with marked fields (at any depth)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if is_operational(info):
            out[name] = True
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            inner = operational_fields(info.annotation)
            if inner:
                out[name] = inner
    return out


class BackendSettings(BaseModel):
    """The base of every backend's settings model (its `[name]` section of a run config)."""

    model_config = ConfigDict(extra="forbid")

    def problem(self) -> str | None:
        """What makes these settings unusable for a run on their backend (None: nothing). Asked only of the
        section of the backend a run uses: the sections of the others may hold anything valid."""
        return None


SettingsT = TypeVar("SettingsT", bound=BackendSettings)


@dataclass(frozen=True)
class BackendSetup(Generic[SettingsT]):
    """Everything a backend is built from: the run's choices it needs, never the app's whole run config."""

    model: str
    settings: SettingsT
    workdir: Path  # where it may keep files (adapters, job records)
    state: BackendState  # durable key-value state (the provider's ids of uploaded files and started jobs)
    show_progress: bool = True
    training: TrainingParams = field(default_factory=TrainingParams)  # the run's finetuning (estimates read it)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # where the local backend's finetunes run
