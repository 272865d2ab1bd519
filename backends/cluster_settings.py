"""The `[cluster]` section: where the local backend's finetunes run when not in this process (light: no Ray).

A run's whole section is operational (it changes where jobs train, not what they learn), so moving a run onto a
cluster, or off it, resumes the same run. Ray itself is imported only by `backends.local_cluster`, and only when
an address is set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# "ray://head:10001" (Ray Client) or "head:6379" (the GCS of a cluster this machine is part of)
_REMOTE = re.compile(r"^(ray://)?[A-Za-z0-9][A-Za-z0-9.-]*:[0-9]{1,5}$")


class ClusterConfig(BaseModel):
    """Ray settings for the local backend's finetunes (and, with `generation_workers`, its generation). With no
    address, everything runs in this process as before."""

    model_config = ConfigDict(extra="forbid")

    # None: in this process; "local": a Ray cluster started in this process; "auto": the one `ray start` made on
    # this machine; "ray://host:port" or "host:port": a remote one
    address: Literal["local", "auto"] | str | None = None
    # a folder every node sees, for the adapters, their job records and the jobs' data files; None: the run's work
    # folder (right for "local"; on several machines that folder must then be shared)
    storage: Path | None = None
    cpus_per_job: int = Field(1, ge=1, le=1024)  # also each job's torch threads
    # "auto": 1 when this machine's device resolves to CUDA, else 0 (a driver without a GPU asks none: set it)
    gpus_per_job: float | Literal["auto"] = "auto"
    # for "local" only: the resources of the cluster it starts (None: Ray counts this machine's)
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    # 0: debates and evaluations generate in this process; K >= 1: on K Ray actors, each asking a job's CPUs and
    # GPUs and holding its own copy of the model (`backends.local_cluster_chat`)
    generation_workers: int = Field(0, ge=0, le=1024)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value in ("local", "auto") or _REMOTE.match(value):
            return value
        raise ValueError(f"[cluster] address must be 'local', 'auto' or 'ray://host:port', got {value!r}")

    @field_validator("gpus_per_job")
    @classmethod
    def _gpus(cls, value: float | str) -> float | str:
        if isinstance(value, (int, float)) and not 0 <= value <= 64:
            raise ValueError(f"[cluster] gpus_per_job must be 'auto' or from 0 to 64, got {value!r}")
        return value

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def gpus(self, device: str) -> float:
        """What each job asks for, `device` being what this machine's device setting resolves to."""
        if self.gpus_per_job == "auto":
            return 1.0 if device == "cuda" else 0.0
        return float(self.gpus_per_job)
