"""Providers behind the `backends.base.Backend` interface, and the one place that maps a name to a provider."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from backends.base import Backend, BackendState

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


def create_backend(config: RunConfig, workdir: Path, *, state: BackendState, show_progress: bool = True) -> Backend:
    """The backend a run asked for. Imports lazily so `--help` and `status` never load torch."""
    if config.backend == "local":
        from backends.local import LocalBackend

        return LocalBackend(
            model=config.model,
            workdir=workdir,
            device=config.local.device,
            dtype=config.local.dtype,
            batch_size=config.local.batch_size,
            show_progress=show_progress,
            training_epochs=config.training.epochs,
        )
    if config.backend == "openai":
        from backends.openai import OpenAIBackend

        return OpenAIBackend(config.model, config.openai, state, show_progress=show_progress)
    if config.backend == "together":
        from backends.together import TogetherBackend

        return TogetherBackend(config.model, config.together, state, show_progress=show_progress)
    raise ValueError(f"unknown backend {config.backend!r}")
