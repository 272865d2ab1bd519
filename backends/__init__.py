"""Providers behind the `backends.base.Backend` interface, and the registry: the one place that names them.

Each backend is a settings module (light: pydantic only) and a backend module (its SDK or torch), and one line
below. The run config's `backend` choice and its `[name]` sections, the CLI's `--backend` choice and help, the
report and `create_backend` all read the registry, so adding a backend touches nothing else. Importing this
package imports only the settings modules: `--help` and config loading never load an SDK or torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.base import Backend, BackendState, TrainingParams
from backends.cluster_settings import ClusterConfig
from backends.local_settings import LocalConfig
from backends.openai_settings import OpenAIConfig
from backends.settings import BackendSettings, BackendSetup
from backends.together_settings import TogetherConfig
from backends.vllm_settings import VLLMConfig


@dataclass(frozen=True)
class BackendEntry:
    """One backend: its name (the `--backend` value and its config section `[name]`), its settings model, where
    its Backend class lives ("module:Class", imported only when a backend is made) and a line of help.

    `create_backend` builds the class with `from_setup(setup)` when it has one (a backend that needs more than
    the hosted ones do: a work folder, the run's training), else as `Class(model, settings, state,
    show_progress=...)`."""

    name: str
    settings: type[BackendSettings]
    backend: str
    help: str
    runs_bundled_model: bool = False  # False: a run must name a model it serves (the default one is local-only)

    def backend_class(self) -> Any:
        module, _, attribute = self.backend.partition(":")
        return getattr(importlib.import_module(module), attribute)


REGISTRY: dict[str, BackendEntry] = {entry.name: entry for entry in (
    BackendEntry("local", LocalConfig, "backends.local_cluster:RayLocalBackend", "transformers + PEFT LoRA on this "
                 "machine (GPU in bf16 when present, else CPU)", runs_bundled_model=True),
    BackendEntry("openai", OpenAIConfig, "backends.openai:OpenAIBackend", "OpenAI, Azure OpenAI or an "
                 "OpenAI-compatible server (key from OPENAI_API_KEY or .env)"),
    BackendEntry("together", TogetherConfig, "backends.together:TogetherBackend", "Together AI's LoRA finetuning "
                 "and serverless inference (key from TOGETHER_API_KEY or .env)"),
    BackendEntry("vllm", VLLMConfig, "backends.vllm:VLLMBackend", "a vLLM server (started in .venv-vllm, or "
                 "[vllm] base_url) serving every agent's LoRA adapter; finetuning as on local",
                 runs_bundled_model=True),
)}
DEFAULT_BACKEND = "local"  # the default job's: it needs no key and no download


def backend_names() -> tuple[str, ...]:
    """Every registered backend, in the registry's order (the order of the config sections and the help)."""
    return tuple(REGISTRY)


def backend_entries() -> tuple[BackendEntry, ...]:
    return tuple(REGISTRY.values())


def backend_entry(name: str) -> BackendEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(REGISTRY)}") from None


def backends_help() -> str:
    """`name: what it is` for each backend, for the CLI's `--backend` help."""
    return "; ".join(f"{entry.name}: {entry.help}" for entry in REGISTRY.values())


def create_backend(
    name: str,
    model: str,
    settings: BackendSettings | None = None,
    *,
    workdir: Path,
    state: BackendState,
    show_progress: bool = True,
    training: TrainingParams | None = None,
    cluster: ClusterConfig | None = None,
) -> Backend:
    """The backend `name` with its settings (None: their defaults). Its module is imported only now, so `--help`
    and `status` never load torch or an SDK."""
    entry = backend_entry(name)
    settings = entry.settings() if settings is None else settings
    if not isinstance(settings, entry.settings):
        raise TypeError(f"the {name} backend takes {entry.settings.__name__}, not {type(settings).__name__}")
    setup = BackendSetup(model=model, settings=settings, workdir=Path(workdir), state=state,
                         show_progress=show_progress, training=training or TrainingParams(),
                         cluster=cluster or ClusterConfig())
    cls = entry.backend_class()
    from_setup = getattr(cls, "from_setup", None)
    backend: Backend = from_setup(setup) if from_setup is not None else cls(
        model, settings, state, show_progress=show_progress)
    return backend
