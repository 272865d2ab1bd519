"""The `orchestrator` command. Subcommands read like sentences: run, status, report."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from orchestrator.config import DEFAULT_MODEL, build_config, read_toml
from orchestrator.errors import UserError
from orchestrator.finetune import RunStopped
from orchestrator.store import Store
from orchestrator.tasks import TASK_SPECS_HELP

DB_HELP = "SQLite file that tracks every run (default: ./maft.db, or $MAFT_DB)."


def _db_path(db: str | None) -> Path:
    return Path(db or os.environ.get("MAFT_DB") or "maft.db")


def _open_store(db: str | None, *, must_exist: bool) -> Store:
    path = _db_path(db)
    if must_exist and not path.exists():
        raise UserError(f"database {path} does not exist: run `orchestrator run` first or pass --db")
    return Store(path)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="maft-orchestrator")
def cli() -> None:
    """Multiagent finetuning (Subramaniam et al., ICLR 2025): a society of N agents debates training problems,
    each agent's generator and critic are finetuned on its own share of the debate, and the finetuned society
    is evaluated on held-out problems. Every step is tracked in SQLite; any run can be watched and resumed."""


@cli.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML file with run settings (top-level keys as the flags below, plus [generation], "
                   "[training] and [local] tables). Flags override it.")
@click.option("--backend", type=click.Choice(["local"]), help="Who runs the models. local: transformers + PEFT "
              "LoRA on this machine (GPU in bf16 when present, else CPU). [default: local]")
@click.option("--model", help=f"Base model: the bundled {DEFAULT_MODEL} (default), a local folder or .gguf "
              "file, or a Hugging Face id already in the local cache (nothing is downloaded).")
@click.option("--task", help=f"Problems to train and evaluate on. {TASK_SPECS_HELP} [default: arithmetic:easy]")
@click.option("--agents", type=int, help="N: agents in the society (each has a generator and a critic). [default: 3]")
@click.option("--rounds", type=int, help="M: debate rounds; round 1 by generators, later rounds by critics. "
              "[default: 2]")
@click.option("--iterations", type=int, help="L: rounds of finetuning. Raising it on a finished run extends it. "
              "[default: 1]")
@click.option("--train-size", type=int, help="Training problems debated each iteration. [default: 24]")
@click.option("--eval-size", type=int, help="Held-out problems for evaluation (disjoint from training). "
              "[default: 24]")
@click.option("--seed", type=int, help="Seed for problem choice, sampling, tie-breaking and data mixing. [default: 0]")
@click.option("--strategy", type=click.Choice(["continue", "restart"]),
              help="continue: finetune each agent's previous model further; restart: finetune the base model "
                   "on each iteration's data. [default: continue]")
@click.option("--summarize/--concatenate", default=None,
              help="Critics see a summary of the other agents' answers written by the base model (default), "
                   "or the answers concatenated (the paper's 'no summary' ablation).")
@click.option("--critic-mix", type=float, help="w: share of corrected examples (wrong in round 1, right at the end) "
              "in each critic's data; the rest were right throughout. [default: 0.5]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="local backend: where to run. "
              "[default: auto]")
@click.option("--name", help="Run name. Re-running the same name resumes it. [default: derived from the config, so "
              "re-running the same command resumes]")
@click.option("--resume", "resume", metavar="RUN", help="Continue a stored run with its stored configuration "
              "(only --iterations may be raised).")
@click.option("--db", help=DB_HELP)
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Where datasets and adapters are written. [default: maft-runs/RUN beside the database]")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(config_file: Path | None, backend: str | None, model: str | None, task: str | None, agents: int | None,
        rounds: int | None, iterations: int | None, train_size: int | None, eval_size: int | None,
        seed: int | None, strategy: str | None, summarize: bool | None, critic_mix: float | None,
        device: str | None, name: str | None, resume: str | None, db: str | None, workdir: Path | None,
        quiet: bool) -> None:
    """Run (or resume) the whole loop: debate → per-agent data → 2N finetunes → evaluation, L times.

    With no options it runs a small job on the bundled SmolLM2-135M-Instruct on CPU: 3 agents, 2 rounds,
    1 iteration, 24 easy arithmetic problems to train on and 24 to evaluate on.
    """
    from backends import create_backend
    from orchestrator.pipeline import Pipeline, open_run, stored_config
    from orchestrator.report import accuracy_table, datasets_table, report_data

    console = Console()
    flags: dict[str, Any] = {
        "backend": backend, "model": model, "task": task, "agents": agents, "rounds": rounds,
        "iterations": iterations, "train_size": train_size, "eval_size": eval_size, "seed": seed,
        "strategy": strategy, "summarize": summarize, "critic_mix": critic_mix,
        "local": {"device": device} if device else None,
    }
    store = _open_store(db, must_exist=resume is not None)
    try:
        if resume:
            base = stored_config(store, resume).model_dump(mode="json")
            config = build_config(base, flags, f"run {resume} with your flags")
            run_id = resume
        else:
            file_values = read_toml(config_file) if config_file else {}
            config = build_config(file_values, flags, str(config_file) if config_file else "command-line flags")
            run_id = name or config.default_name()
        run_row = open_run(store, config, run_id, must_exist=resume is not None)
        work = workdir or store.path.resolve().parent / "maft-runs" / run_id
        backend_obj = create_backend(config, work, show_progress=not quiet)
        info = backend_obj.describe()
        console.print(f"run [bold]{run_id}[/] · {config.backend} ({info.device or 'remote'}) · {config.model} · "
                      f"{config.task} · {config.agents} agents × {config.rounds} rounds × {config.iterations} "
                      f"iteration(s) · db {store.path} · files {work}")
        started = time.monotonic()
        try:
            Pipeline(config=config, run=run_row, store=store, backend=backend_obj, workdir=work, console=console,
                     show_progress=not quiet).run()
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted: everything finished so far is stored; continue with "
                          f"`orchestrator run --resume {run_id}{_db_flag(db)}`")
            sys.exit(130)
        except RunStopped as exc:
            resume_cmd = f"orchestrator run --resume {run_id}{_db_flag(db)}"
            console.print(f"[red]stopped: {exc}; fix the cause, then `{resume_cmd}`")
            sys.exit(1)
        finally:
            backend_obj.close()
        data = report_data(store, run_row)
        console.print(datasets_table(data["datasets"]))
        console.print(accuracy_table(data["evaluations"], f"held-out accuracy · {config.task} · run {run_id}"))
        console.print(f"finished in {time.monotonic() - started:.0f} s · `orchestrator report {run_id}"
                      f"{_db_flag(db)}` shows it again")
    finally:
        store.close()


def _db_flag(db: str | None) -> str:
    return f" --db {db}" if db else ""


@cli.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
def status(run_id: str | None, db: str | None, as_json: bool) -> None:
    """Show all runs, or one run: its progress, its agents and their model ids per iteration, its jobs."""
    from orchestrator.report import agents_table, jobs_table, runs_data, runs_table, status_data

    store = _open_store(db, must_exist=True)
    try:
        if run_id is None:
            rows = runs_data(store)
            _print_json(rows) if as_json else Console().print(runs_table(rows))
            return
        run_row = store.require_run(run_id)
        data = status_data(store, run_row)
        if as_json:
            _print_json(data)
            return
        console = Console()
        r, p = data["run"], data["progress"]
        console.print(f"run [bold]{r['id']}[/]: {r['status']}, {r['iterations_done']}/{data['config']['iterations']} "
                      f"iterations done, {p['responses_stored']}/{p['responses_expected']} responses stored"
                      + (f" · last error: {r['error']}" if r["error"] else ""))
        console.print(agents_table(data["agents"]))
        if data["jobs"]:
            console.print(jobs_table(data["jobs"]))
    finally:
        store.close()


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
def report(run_id: str, db: str | None, as_json: bool) -> None:
    """Show a run's held-out accuracy (± standard error, n, unanswered) and its dataset sizes per agent and role."""
    from orchestrator.report import accuracy_table, datasets_table, report_data

    store = _open_store(db, must_exist=True)
    try:
        run_row = store.require_run(run_id)
        data = report_data(store, run_row)
        if as_json:
            _print_json(data)
            return
        console = Console()
        console.print(datasets_table(data["datasets"]))
        title = f"held-out accuracy · {data['config']['task']} · run {run_id}"
        console.print(accuracy_table(data["evaluations"], title))
    finally:
        store.close()


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
