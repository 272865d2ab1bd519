"""The local backend's settings (`[local]`): light, so reading a config never loads torch."""

from __future__ import annotations

from typing import Literal

from backends.settings import BackendSettings, operational

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # bundled with the package: the default job runs without a download


class LocalConfig(BackendSettings):
    """Settings only the local backend reads."""

    device: Literal["auto", "cpu", "cuda"] = operational("auto")
    # Generation's dtype (auto: bfloat16 on CUDA, float32 on CPU). Part of the run's identity: it changes the
    # answers, and in bfloat16 an answer also depends on its batch mates.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    batch_size: int = operational(48, ge=1, le=4096)
