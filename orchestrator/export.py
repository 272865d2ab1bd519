"""`orchestrator export`: a run's society taken out of the tool, to be served elsewhere.

On the local backend each agent's generator and critic is a LoRA adapter on one base model; `peft` copies each
adapter folder as PEFT saved it (what `PeftModel.from_pretrained` and vLLM's `--lora-modules` load), `merged`
folds each adapter into a copy of the base model and saves a full model in safetensors (what
`AutoModelForCausalLM.from_pretrained` and vLLM load with no PEFT at all). A slot the run never trained (its set
was too small, or the base society) is the base model: `peft` names it "base" in the manifest, `merged` writes the
base model once, as `base/`. Each folder gets a short model card; `society.json` lists every agent and role with
its folder (or, on a hosted backend, its finetuned model id) and the run's debate settings.

Everything is written under a staging folder beside DIR and renamed to DIR at the end, so a killed export never
leaves a DIR that looks complete.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from backends.base import BASE_MODEL_ID
from foundation.errors import UserError
from orchestrator.config import RunConfig
from orchestrator.pipeline import ROLES
from orchestrator.store import Store
from orchestrator.use import Chosen

ExportFormat = Literal["peft", "merged"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class ExportedAgent(BaseModel):
    agent: int  # counted from 1, as the job keys and the README count them
    role: str
    model_id: str  # as the run stored it: an adapter folder, a hosted finetuned id, or "base"
    folder: str | None = None  # relative to the manifest; None on hosted backends
    trained: bool
    job_key: str | None = None
    dataset_sha256: str | None = None


class Manifest(BaseModel):
    """`society.json`: what was exported, from which run, and how the society debates."""

    run_id: str
    society: str  # RUN@base or RUN@N
    iteration: int
    backend: str
    base_model: str
    format: ExportFormat | None  # None: a hosted backend's manifest of model ids
    task: str
    agents_n: int
    rounds: int
    summarize: bool
    generation: dict[str, Any]
    seed: int
    agents: list[ExportedAgent]


def _accuracy_table(store: Store, run_id: str, task: str) -> str:
    rows = sorted((e for e in store.get_evaluations(run_id) if e.task == task),
                  key=lambda e: (e.iteration, e.society, e.method))
    if not rows:
        return "No evaluation is stored for this run.\n"
    lines = ["| society | iteration | method | accuracy | n |", "|---|---|---|---|---|"]
    lines += [f"| {e.society} | {e.iteration} | {e.method} | {100 * e.accuracy:.1f} ± {100 * e.stderr:.1f} % | {e.n} |"
              for e in rows]
    return "\n".join(lines) + "\n"


def _card(manifest: Manifest, agent: ExportedAgent | None, accuracy: str, fmt: ExportFormat) -> str:
    what = (f"Agent {agent.agent} {agent.role}" if agent is not None else "The base model")
    kind = "a LoRA adapter (PEFT)" if fmt == "peft" else "a full model, the LoRA adapter merged in (safetensors)"
    lines = [f"# {manifest.society}: {what.lower() if agent is None else what}", "",
             f"{what} of the multiagent finetuning run `{manifest.run_id}` (society `{manifest.society}`), as "
             f"{kind}.", "",
             f"- base model: `{manifest.base_model}`",
             f"- iteration: {manifest.iteration}",
             f"- task: `{manifest.task}`; the society debates with {manifest.agents_n} agents × {manifest.rounds} "
             f"rounds ({'summaries' if manifest.summarize else 'concatenated answers'})"]
    if agent is not None:
        lines += [f"- agent: {agent.agent}, role: {agent.role}",
                  f"- training data sha256: `{agent.dataset_sha256 or 'none (not trained)'}`",
                  f"- job: `{agent.job_key or 'none'}`"]
    lines += ["", f"## Held-out accuracy of run {manifest.run_id}", "", accuracy]
    return "\n".join(lines)


def _agents(store: Store, config: RunConfig, chosen: Chosen) -> list[ExportedAgent]:
    rows = {(r.agent, r.role): r for r in store.get_agents(chosen.run_id, chosen.iteration)}
    out = []
    for agent in range(config.agents):
        for role in ROLES:
            model_id = chosen.society.model(agent, role)
            row = rows.get((agent, role))
            job = store.get_job(row.job_key) if row is not None and row.job_key else None
            out.append(ExportedAgent(agent=agent + 1, role=role, model_id=model_id, trained=model_id != BASE_MODEL_ID,
                                     job_key=job.key if job else None,
                                     dataset_sha256=job.dataset_sha256 if job else None))
    return out


def export_society(store: Store, config: RunConfig, chosen: Chosen, to: Path, fmt: ExportFormat) -> Manifest:
    """Write the society under `to` (which must not exist, or be empty); its manifest."""
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise UserError(f"--to {to} already exists and is not an empty folder: give a new folder")
    agents = _agents(store, config, chosen)
    local = config.backend == "local"
    manifest = Manifest(run_id=chosen.run_id, society=chosen.name, iteration=chosen.iteration,
                        backend=config.backend, base_model=config.model, format=fmt if local else None,
                        task=config.task, agents_n=config.agents, rounds=config.rounds, summarize=config.summarize,
                        generation=config.generation.model_dump(mode="json"), seed=config.seed, agents=agents)
    staging = to.with_name(f".{to.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # a killed export's leftovers
    staging.mkdir(parents=True)
    if local:
        accuracy = _accuracy_table(store, chosen.run_id, config.task)
        if fmt == "peft":
            _write_peft(manifest, staging, accuracy)
        else:
            _write_merged(manifest, config, staging, accuracy)
    (staging / "society.json").write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    if to.exists():
        to.rmdir()  # empty, checked above
    to.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(to)
    return manifest


def _folder(agent: ExportedAgent) -> str:
    return f"agent-{agent.agent}-{agent.role}"


def _write_peft(manifest: Manifest, staging: Path, accuracy: str) -> None:
    from backends.local_pool import adapter_dir

    for agent in manifest.agents:
        if not agent.trained:
            continue
        source = adapter_dir(agent.model_id)
        target = staging / _folder(agent)
        target.mkdir()
        for name in ADAPTER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
        (target / "README.md").write_text(_card(manifest, agent, accuracy, "peft"), encoding="utf-8")
        agent.folder = _folder(agent)


def _write_merged(manifest: Manifest, config: RunConfig, staging: Path, accuracy: str) -> None:
    """Each adapter merged into its own copy of the base model, in float32 on the CPU: the exported weights do
    not depend on the machine, and merging in bf16 would round them."""
    from peft import PeftModel

    from backends.local_model import load_model
    from backends.local_pool import adapter_dir

    loaded = load_model(config.model, device="cpu", dtype="float32")
    wrote_base = False
    for agent in manifest.agents:
        if not agent.trained:
            if not wrote_base:
                loaded.model.save_pretrained(staging / "base", safe_serialization=True)
                loaded.tokenizer.save_pretrained(staging / "base")
                (staging / "base" / "README.md").write_text(_card(manifest, None, accuracy, "merged"),
                                                            encoding="utf-8")
                wrote_base = True
            agent.folder = "base"
            continue
        merged = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(adapter_dir(agent.model_id)))
        model = merged.merge_and_unload()
        target = staging / _folder(agent)
        model.save_pretrained(target, safe_serialization=True)
        loaded.tokenizer.save_pretrained(target)
        (target / "README.md").write_text(_card(manifest, agent, accuracy, "merged"), encoding="utf-8")
        agent.folder = _folder(agent)
        del merged, model


def read_manifest(path: Path) -> Manifest:
    """A `society.json` written by `export` (for `serve` and `ask` to read later)."""
    try:
        return Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a society manifest written by `orchestrator export` ({exc})") from None
