"""The `orchestrator` command. Subcommands read like sentences: run, status, report."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import BaseModel, ConfigDict
from rich.console import Console

from backends import DEFAULT_BACKEND, backend_names, backends_help
from backends.base import MemoryState
from backends.local_settings import DEFAULT_MODEL
from foundation.crashpoints import crashpoint
from foundation.errors import RunStopped, UserError
from orchestrator.config import RunConfig, baselines_problem, build_config, read_toml
from orchestrator.costs import Ledger, run_pricing
from orchestrator.distill import DistillRequest
from orchestrator.evaluate import MATCHED_MAJORITY
from orchestrator.failures import CommandContext, debug_requested, finish
from orchestrator.interrupts import GracefulStop, StopRequested
from orchestrator.locks import RunLock
from orchestrator.matched import MATCHED_HELP
from orchestrator.societies import BASELINES, PAPER_BASELINES, baselines_help
from orchestrator.store import Store, StoreState
from orchestrator.tasks import TASK_SPECS_HELP, get_task

DB_HELP = "SQLite file that tracks every run (default: ./maft.db, or $MAFT_DB)."



# what --baselines takes: the societies, and the compute-matched majority vote of every evaluated one
BASELINE_CHOICES = (*BASELINES, MATCHED_MAJORITY)


def parse_baselines(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    names = PAPER_BASELINES if text.strip() == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BASELINE_CHOICES]
    if unknown:
        raise UserError(f"baseline '{unknown[0]}' is unknown: use {', '.join(BASELINE_CHOICES)} or all (the "
                        "paper's baselines and ablations)")
    return names


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
@click.option("--debug", is_flag=True, help="Show the traceback of a failure instead of one line (also "
              "MAFT_DEBUG=1). Without it, the traceback goes to the errors.log the line names.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Multiagent finetuning (Subramaniam et al., ICLR 2025): a society of N agents debates training problems,
    each agent's generator and critic are finetuned on its own share of the debate, and the finetuned society
    is evaluated on held-out problems. Every step is tracked in SQLite; any run can be watched and resumed.

    Exit status: 0 done; 1 stopped, resumable (the line says how); 2 bad input (nothing started or spent);
    130 interrupted."""
    context = ctx.ensure_object(CommandContext)
    context.debug = context.debug or debug


def _enter(command: str, db: str | None, run_id: str | None = None, *, folder: Path | None = None,
           resume: str | None = None) -> None:
    """Tell the command's ending where its failures are logged (the run's folder, else maft-runs beside the
    database) and how to resume."""
    context = click.get_current_context().find_object(CommandContext) or CommandContext()
    runs = _db_path(db).resolve().parent / "maft-runs"
    context.at(folder or (runs / run_id if run_id else runs), resume)
    crashpoint(f"cli.{command}")  # tests inject an unexpected failure here


@cli.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML file with run settings (top-level keys as the flags below, plus [generation], "
                   "[training] and [local] tables). Flags override it.")
@click.option("--backend", type=click.Choice(list(backend_names())),
              help=f"Who runs the models. {backends_help()}. [default: {DEFAULT_BACKEND}]")
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
@click.option("--strategy", type=click.Choice(["continue", "restart", "accumulate"]),
              help="continue: finetune each agent's previous model further on the iteration's data; restart: "
                   "finetune the base model on the iteration's data; accumulate: finetune the base model on all of "
                   "that agent's data from iterations 1..L. [default: continue]")
@click.option("--summarize/--concatenate", default=None,
              help="Critics see a summary of the other agents' answers written by the base model (default), "
                   "or the answers concatenated (the paper's 'no summary' ablation).")
@click.option("--critic-mix", type=float, help="w: share of corrected examples (wrong in round 1, right at the end) "
              "in each critic's data; the rest were right throughout. [default: 0.5]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="local backend: where to run. "
              "[default: auto]")
@click.option("--name", help="Run name. Re-running the same name resumes it. [default: derived from the config, so "
              "re-running the same command resumes]")
@click.option("--resume", "resume", metavar="RUN", help="Continue a stored run with its stored configuration: "
              "--iterations may be raised, and settings of how it runs (--device, --batch, --base-url) changed.")
@click.option("--db", help=DB_HELP)
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Where datasets and adapters are written. [default: maft-runs/RUN beside the database]")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--base-url", help="Hosted backends: the API's address, e.g. an OpenAI-compatible server (vLLM, "
              "llama.cpp, Ollama, a proxy). [default: $OPENAI_BASE_URL / $TOGETHER_BASE_URL, else the provider]")
@click.option("--batch/--no-batch", default=None, help="openai backend: send debate rounds through the Batch API "
              "(half price, can take hours). [default: no]")
@click.option("--dry-run", is_flag=True, help="Print the tokens and cost of the whole planned run (expected and at "
              "most) and exit, spending nothing and writing nothing.")
@click.option("--max-cost", type=float, metavar="USD", help="Refuse to start any step whose upper-bound cost "
              "would take the run past this many dollars; the run stops cleanly and can be resumed.")
@click.option("--prices", type=click.Path(path_type=Path), help="TOML file of prices that replace the packaged "
              "table model by model (see orchestrator/prices.toml). [default: $MAFT_PRICES]")
@click.option("--baselines", metavar="LIST", help=f"After the run, also train and evaluate these, comma-separated: "
              f"{', '.join(BASELINE_CHOICES)}, or all (the paper's baselines and ablations). "
              f"{baselines_help({MATCHED_MAJORITY: MATCHED_HELP})}")
@click.option("--distill", "distill", is_flag=True, help="After the last iteration, distil its society into one "
              "model that answers in a single pass (as `orchestrator distill` does).")
def run(config_file: Path | None, backend: str | None, model: str | None, task: str | None, agents: int | None,
        rounds: int | None, iterations: int | None, train_size: int | None, eval_size: int | None,
        seed: int | None, strategy: str | None, summarize: bool | None, critic_mix: float | None,
        device: str | None, name: str | None, resume: str | None, db: str | None, workdir: Path | None,
        quiet: bool, base_url: str | None, batch: bool | None, dry_run: bool, max_cost: float | None,
        prices: Path | None, baselines: str | None, distill: bool) -> None:
    """Run (or resume) the whole loop: debate → per-agent data → 2N finetunes → evaluation, L times.

    With no options it runs a small job on the bundled SmolLM2-135M-Instruct on CPU: 3 agents, 2 rounds,
    1 iteration, 24 easy arithmetic problems to train on and 24 to evaluate on.
    """
    _enter("run", db, resume or name)
    flags: dict[str, Any] = {
        "backend": backend, "model": model, "task": task, "agents": agents, "rounds": rounds,
        "iterations": iterations, "train_size": train_size, "eval_size": eval_size, "seed": seed,
        "strategy": strategy, "summarize": summarize, "critic_mix": critic_mix,
        "local": {"device": device} if device else None,
        "openai": {k: v for k, v in (("base_url", base_url), ("batch", batch)) if v is not None} or None,
        "together": {"base_url": base_url} if base_url else None,
    }
    if max_cost is not None and max_cost < 0:
        raise UserError(f"--max-cost must be 0 or more dollars, got {max_cost}")
    chosen = parse_baselines(baselines)
    if dry_run and not resume:
        file_values = read_toml(config_file) if config_file else {}
        config = build_config(file_values, flags, str(config_file) if config_file else "command-line flags")
        _dry_run(config, prices, chosen, distill)
        return
    from orchestrator.pipeline import stored_config

    store = _open_store(db, must_exist=resume is not None)
    try:
        if resume:
            base = stored_config(store, resume).model_dump(mode="json")
            config = build_config(base, flags, f"run {resume} with your flags")
            run_id = resume
            if dry_run:
                _dry_run(config, prices, chosen, distill)
                return
        else:
            file_values = read_toml(config_file) if config_file else {}
            config = build_config(file_values, flags, str(config_file) if config_file else "command-line flags")
            run_id = name or config.default_name()
        _run(store, config, RunRequest(run_id=run_id, must_exist=resume is not None, db=db, workdir=workdir,
                                       quiet=quiet, max_cost=max_cost, prices=prices, baselines=chosen,
                                       distill=DistillRequest() if distill else None))
    finally:
        store.close()


def _dry_run(config: RunConfig, prices: Path | None, baselines: tuple[str, ...] = (), distill: bool = False) -> None:
    from backends import create_backend
    from orchestrator.estimate import estimate_run
    from orchestrator.report.terminal import estimate_table

    task = get_task(config.task)
    backend = create_backend(config.backend, config.model, config.backend_settings(),
                             workdir=Path("maft-runs") / "dry-run", state=MemoryState(), show_progress=False,
                             training=config.training)
    info = backend.describe()  # describing never loads a model or calls the network
    if (problem := baselines_problem(baselines, config.training.objective, info)) is not None:
        raise UserError(problem)
    lines = estimate_run(config, task, run_pricing(info, prices), info, baselines, distill=distill)
    Console().print(estimate_table(lines, f"dry run · {config.backend} · {config.model} · {config.task} · "
                                          f"{config.agents} agents × {config.rounds} rounds × "
                                          f"{config.iterations} iteration(s)"))


class RunRequest(BaseModel):
    """What `run` and `eval` ask of one run beside its configuration: which run, where its files and prices are,
    the spending limit, and which extra societies and tasks; one typed object instead of a dozen arguments."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    must_exist: bool  # a resume or `eval`: the run is in the store already
    db: str | None = None  # as the user gave it, for the resume command we print
    workdir: Path | None = None
    quiet: bool = False
    max_cost: float | None = None
    prices: Path | None = None
    baselines: tuple[str, ...] = ()
    transfer: tuple[str, ...] = ()  # other tasks to evaluate every society on, zero-shot (`eval --task`)
    more_only: bool = False  # `eval`: only the baselines and transfer evaluations, no iterations
    distill: DistillRequest | None = None  # `distill`, `run --distill`: a student of a finetuned society


def _run(store: Store, config: RunConfig, request: RunRequest) -> None:
    """Run (or resume) a run; with `more_only`, only its baselines and transfer evaluations (`eval`). One process
    per run: the lock is held from here to the end."""
    for spec in request.transfer:
        get_task(spec)  # a bad task spec fails before anything runs
    with RunLock(store.path, request.run_id), GracefulStop() as stop:
        _run_locked(store, config, request, stop, Console())


def _run_locked(store: Store, config: RunConfig, request: RunRequest, stop: GracefulStop, console: Console) -> None:
    from backends import create_backend
    from backends.base import ChecksServer, ChecksSociety, NeedsCredentials
    from orchestrator.config import objective_problem
    from orchestrator.pipeline import Pipeline, open_run
    from orchestrator.report.data import report_data
    from orchestrator.report.terminal import accuracy_table, comparison_table, datasets_table

    run_id, db, max_cost, more_only = request.run_id, request.db, request.max_cost, request.more_only
    work = request.workdir or store.path.resolve().parent / "maft-runs" / run_id
    backend_obj = create_backend(config.backend, config.model, config.backend_settings(), workdir=work,
                                 state=StoreState(store, config.backend), show_progress=not request.quiet,
                                 training=config.training, cluster=config.cluster)
    try:
        # Bad input (an unpriced model under --max-cost, a missing API key) is refused before the run is
        # recorded: nothing is left behind but the message.
        info = backend_obj.describe()
        pricing = run_pricing(info, request.prices, max_cost=max_cost, console=console)
        if (problem := objective_problem(config.training.objective, info)) is not None:  # no such method: asks nobody
            raise UserError(problem)
        if (problem := baselines_problem(request.baselines, config.training.objective, info)) is not None:
            raise UserError(problem)
        if isinstance(backend_obj, NeedsCredentials):
            backend_obj.check_credentials()
        if isinstance(backend_obj, ChecksServer):  # a chat-only server, an unknown model: said before any spend
            backend_obj.check_server(finetuning=not more_only or bool(request.baselines))
        if isinstance(backend_obj, ChecksSociety):  # a society that would not fit the server's model slots
            backend_obj.check_society(config.agents)
        run_row = open_run(store, config, run_id, must_exist=request.must_exist)
    except BaseException:
        backend_obj.close()
        raise
    resume_cmd = f"orchestrator run --resume {run_id}{_db_flag(db)}"
    _enter("run.started", db, folder=work, resume=resume_cmd)
    ledger = Ledger(store, run_id, pricing, max_cost=max_cost,
                    batch=config.backend == "openai" and config.openai.batch)
    console.print(f"run [bold]{run_id}[/] · {config.backend} ({info.device or 'remote'}) · {config.model} · "
                  f"{config.task} · {config.agents} agents × {config.rounds} rounds × {config.iterations} "
                  f"iteration(s) · temperature {config.generation.temperature:g}, top_p {config.generation.top_p:g}, "
                  f"max_tokens {config.generation.max_tokens} · db {store.path} · files {work}")
    # once per command, before anything is trained: iterations left to do, baselines, or a student ask for jobs
    trains = ((not more_only and run_row.iterations_done < config.iterations) or bool(request.baselines)
              or request.distill is not None)
    if info.finetuning_notice and trains:
        console.print(f"warning: {info.finetuning_notice}", style="yellow", soft_wrap=True, markup=False,
                      highlight=False)
    started = time.monotonic()
    try:
        pipeline = Pipeline(config=config, run=run_row, store=store, backend=backend_obj, workdir=work,
                            console=console, show_progress=not request.quiet, ledger=ledger,
                            poll_interval=_poll_interval(config), checkpoint=stop.check)
        if more_only:
            pipeline.run_more(request.baselines, request.transfer, request.distill)
        else:
            pipeline.run(request.baselines, request.distill)
    except (KeyboardInterrupt, StopRequested, RunStopped) as exc:
        _stopped(exc, console, "everything finished so far is stored", resume_cmd)
    except (OSError, sqlite3.OperationalError) as exc:
        if not _disk_full(exc):
            raise
        target = getattr(exc, "filename", None) or store.path
        raise UserError(f"disk full while writing {target}: everything finished before is stored; free some space, "
                        f"then `{resume_cmd}`") from None
    finally:
        backend_obj.close()
    data = report_data(store, run_row, flips=False)
    console.print(datasets_table(data["datasets"]))
    console.print(accuracy_table(data["evaluations"], f"held-out accuracy · {config.task} · run {run_id}"))
    if len({(e["society"], e["task"]) for e in data["evaluations"]}) > 2:
        console.print(comparison_table(data["evaluations"], f"comparison · run {run_id}"))
    if request.distill is not None:
        _print_answering_costs(console, store, run_id, config.task)
    spent = store.total_cost(run_id)
    console.print(f"finished in {time.monotonic() - started:.0f} s" + (f" · ${spent:.4f} spent" if spent else "")
                  + f" · `orchestrator report {run_id}{_db_flag(db)}` shows it again")


def _print_answering_costs(console: Console, store: Store, run_id: str, task: str) -> None:
    """A run with a distilled student: what each way of answering costs per held-out problem, beside its accuracy."""
    from orchestrator.distill import answering_cost_table, answering_costs

    costs = answering_costs(store, run_id, task)
    if costs:
        console.print(answering_cost_table(costs, f"accuracy and cost per held-out problem · run {run_id}"))


def _stopped(exc: BaseException, console: Console, kept: str, resume: str) -> NoReturn:
    """How every command that runs paid work ends when stopped: Ctrl-C or a safe-point stop exit 130, a budget or
    a failed job (RunStopped) exits 1, each with what is kept and the command that continues."""
    if isinstance(exc, RunStopped):
        console.print(f"[red]stopped: {exc}; then `{resume}`", soft_wrap=True)
        sys.exit(1)
    where = "at a safe point" if isinstance(exc, StopRequested) else "at once"
    # soft_wrap: the resume command must stay on one line, whatever the terminal's width
    console.print(f"[yellow]stopped {where}: {kept}; continue with `{resume}`", soft_wrap=True)
    sys.exit(130)


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC from a file write, or SQLite's own "database or disk is full"."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


def _poll_interval(config: RunConfig) -> float:
    """Hosted jobs take minutes to hours: their section says how often to look. Local jobs are done at once."""
    section = getattr(config, config.backend)
    return float(getattr(section, "poll_interval", 5.0))


def _db_flag(db: str | None) -> str:
    return f" --db {db}" if db else ""


@cli.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
@click.option("--watch", is_flag=True, help="Keep the view of RUN up to date until the run stops (Ctrl-C to leave).")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
def status(run_id: str | None, db: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """Show all runs, or one run: its progress, its agents and their model ids per iteration, its jobs with their
    state, elapsed time, trained tokens and last event."""
    from rich.live import Live

    from orchestrator.locks import is_held
    from orchestrator.report.data import runs_data, status_data
    from orchestrator.report.terminal import runs_table, status_view

    _enter("status", db, run_id)
    store = _open_store(db, must_exist=True)
    try:
        if run_id is None:
            rows = runs_data(store)
            _print_json(rows) if as_json else Console().print(runs_table(rows))
            return
        run_row = store.require_run(run_id)
        if as_json:
            _print_json(status_data(store, run_row))
            return
        if not watch:
            Console().print(status_view(status_data(store, run_row)))
            return
        killed = False
        with Live(status_view(status_data(store, run_row)), refresh_per_second=4) as live:
            while (run_row := store.require_run(run_id)).status == "running":
                # The status is written before the lock is let go, so "running" read *after* finding the lock
                # free means that no process will ever finish this run: it was killed (SIGKILL, power loss).
                if not is_held(store.path, run_id) and store.require_run(run_id).status == "running":
                    killed = True
                    break
                time.sleep(interval)
                live.update(status_view(status_data(store, run_row)))
            live.update(status_view(status_data(store, run_row)))
        if killed:
            Console().print(f"[yellow]run {run_id} is not running: it says \"running\" but no process holds it (it "
                            f"was killed); continue it with `orchestrator run --resume {run_id}{_db_flag(db)}`",
                            soft_wrap=True)
    finally:
        store.close()


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables and files.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Folder for the HTML and Markdown report "
              "and its plots. [default: maft-reports beside the database]")
@click.option("--iteration", type=int, help="Show finetuned societies at this iteration in the comparison "
              "(default: each at its last).")
def report(run_id: str, db: str | None, as_json: bool, out_dir: Path | None, iteration: int | None) -> None:
    """Write RUN's report: one self-contained HTML file and a Markdown file with the configuration, dataset sizes
    per agent and role, the comparison table (the layout of the paper's Table 1), plots of accuracy, diversity
    and cost per iteration, and sample debates; print the dataset sizes, the accuracy tables and a short
    summary."""
    from orchestrator.report.data import report_data
    from orchestrator.report.terminal import accuracy_table, comparison_table, datasets_table, flips_table
    from orchestrator.report.write import write_report

    _enter("report", db, run_id)
    store = _open_store(db, must_exist=True)
    try:
        run_row = store.require_run(run_id)
        data = report_data(store, run_row)
        if as_json:
            _print_json(data)
            return
        console = Console()
        if data["datasets"]:
            console.print(datasets_table(data["datasets"]))
        title = f"held-out accuracy · {data['config']['task']} · run {run_id}"
        console.print(accuracy_table(data["evaluations"], title))
        console.print(comparison_table(data["evaluations"], f"comparison · run {run_id}"))
        if data["flips"]:
            console.print(flips_table(data["flips"], f"debate flip rates · {data['config']['task']} · run {run_id}"))
        _print_answering_costs(console, store, run_id, data["config"]["task"])
        files = write_report(store, run_id, out_dir or store.path.resolve().parent / "maft-reports",
                             iteration=iteration)
        for line in files.summary:
            console.print(line, highlight=False)
        console.print(f"report: {files.html}\n        {files.markdown}", highlight=False)
    finally:
        store.close()


def main() -> None:
    """The console script: whatever ends a command ends in one line and an exit status (see `failures`), never
    a traceback unless --debug or MAFT_DEBUG=1 asks for one."""
    args = _debug_first(sys.argv[1:])
    context = CommandContext(debug=debug_requested(os.environ))
    try:
        cli.main(args=args, prog_name="orchestrator", standalone_mode=False, obj=context)
    except click.ClickException as exc:  # a usage error: click's own lines name the option
        exc.show()
        sys.exit(2)
    except (Exception, KeyboardInterrupt, click.exceptions.Abort) as exc:
        if context.debug and not isinstance(exc, UserError | KeyboardInterrupt | click.exceptions.Abort):
            raise
        sys.exit(finish(exc, context, args))


def _debug_first(args: list[str]) -> list[str]:
    """`--debug` belongs to the group, but users type it anywhere (`orchestrator run --debug`): move it first."""
    if "--debug" not in args[1:]:
        return args
    return ["--debug", *(a for a in args if a != "--debug")]


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of tables.")
def cost(run_id: str, db: str | None, as_json: bool) -> None:
    """What a run has cost: the ledger summed by stage, iteration, agent and role, with the price sources.

    Every response and every finetune wrote its line when it happened; a job still running shows its estimate
    until the provider reports its trained tokens.
    """
    from orchestrator.costs import cost_summary
    from orchestrator.report.terminal import cost_tables

    _enter("cost", db, run_id)
    store = _open_store(db, must_exist=True)
    try:
        store.require_run(run_id)
        summary = cost_summary(store.get_usage(run_id))
        if as_json:
            _print_json(summary)
            return
        console = Console()
        for table in cost_tables(summary, run_id):
            console.print(table)
        estimated = f" (of which ${summary['estimated_usd']:.4f} estimated)" if summary["estimated_usd"] else ""
        console.print(f"total ${summary['total_usd']:.4f}{estimated}")
        for source in summary["sources"]:
            console.print(f"  price source: {source}")
    finally:
        store.close()


@cli.group()
def jobs() -> None:
    """Finetuning jobs of a run: list them, or cancel the ones still running."""


@jobs.command("list")
@click.argument("run_id", metavar="RUN")
@click.option("--db", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def jobs_list(run_id: str, db: str | None, as_json: bool) -> None:
    """Every job of RUN with its provider id, state, elapsed time, trained tokens and last event."""
    from orchestrator.report.data import status_data
    from orchestrator.report.terminal import jobs_table

    _enter("jobs-list", db, run_id)
    store = _open_store(db, must_exist=True)
    try:
        data = status_data(store, store.require_run(run_id))["jobs"]
        _print_json(data) if as_json else Console().print(jobs_table(data))
    finally:
        store.close()


@jobs.command("cancel")
@click.argument("run_id", metavar="RUN")
@click.option("--db", help=DB_HELP)
def jobs_cancel(run_id: str, db: str | None) -> None:
    """Ask the provider to cancel RUN's jobs that have not ended; `run --resume RUN` later starts them again.

    Each job is then polled and stored as the provider reports it: one that had already ended while no run
    watched it keeps how it ended (a succeeded job its model, which no resume pays for again)."""
    from backends import create_backend
    from backends.base import TERMINAL_STATUSES
    from orchestrator.finetune import job_ref, refresh_job
    from orchestrator.pipeline import stored_config

    _enter("jobs-cancel", db, run_id)
    store = _open_store(db, must_exist=True)
    try:
        config = stored_config(store, run_id)
        open_jobs = [j for j in store.get_jobs(run_id) if j.status not in TERMINAL_STATUSES | {"skipped"}
                     and j.provider_job_id]
        if not open_jobs:
            click.echo(f"run {run_id} has no job to cancel")
            return
        work = store.path.resolve().parent / "maft-runs" / run_id
        backend = create_backend(config.backend, config.model, config.backend_settings(), workdir=work,
                                 state=StoreState(store, config.backend), show_progress=False,
                                 training=config.training)
        try:
            ledger = Ledger(store, run_id, run_pricing(backend.describe(), None))
            for job in open_jobs:
                backend.cancel(job_ref(job))  # a job that had already ended is left as it is
                state = refresh_job(job, backend, store, ledger)  # what did happen, stored as a run stores it
                which = f"{job.provider_job_id} (agent {job.agent + 1} {job.role}, iteration {job.iteration})"
                if job.status == "cancelled":
                    click.echo(f"cancelled {which}")
                elif job.status == "succeeded":
                    click.echo(f"{which} had already succeeded: kept, with model {job.model_id}")
                elif state.missing:
                    click.echo(f"{which} is unknown to the provider: marked failed; `run --resume` starts it again")
                elif job.status == "failed":
                    click.echo(f"{which} had already failed: {job.error or 'no error given'}")
                else:
                    click.echo(f"asked to cancel {which}; the provider still reports it "
                               f"{job.provider_status or job.status}; run `orchestrator jobs cancel {run_id}"
                               f"{_db_flag(db)}` again later to record how it ended")
        finally:
            backend.close()
    finally:
        store.close()


@cli.command("eval")
@click.argument("run_id", metavar="RUN")
@click.option("--baselines", metavar="LIST", help=f"Train and evaluate these on RUN's problems, comma-separated: "
              f"{', '.join(BASELINE_CHOICES)}, or all (the paper's baselines and ablations). "
              f"{baselines_help({MATCHED_MAJORITY: MATCHED_HELP})}")
@click.option("--task", "tasks", multiple=True, metavar="TASK",
              help=f"Zero-shot transfer: evaluate every society of RUN (base, each iteration, each baseline) on "
                   f"this task's held-out problems; repeatable. {TASK_SPECS_HELP}")
@click.option("--db", help=DB_HELP)
@click.option("--workdir", type=click.Path(path_type=Path), help="Where datasets and adapters are written. "
              "[default: maft-runs/RUN beside the database]")
@click.option("--max-cost", type=float, metavar="USD", help="Budget for the run as a whole (what it already spent "
              "counts); steps that could pass it are not started.")
@click.option("--prices", type=click.Path(path_type=Path), help="TOML file of prices replacing the packaged ones.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_command(run_id: str, baselines: str | None, tasks: tuple[str, ...], db: str | None, workdir: Path | None,
                 max_cost: float | None, prices: Path | None, quiet: bool) -> None:
    """Evaluate more for a stored run: the paper's baselines and ablations, and zero-shot transfer to other
    tasks. Every response already stored is reused, and nothing finished is redone."""
    from orchestrator.pipeline import stored_config

    _enter("eval", db, run_id)
    chosen = parse_baselines(baselines)
    if not chosen and not tasks:
        raise UserError("nothing to evaluate: give --baselines and/or --task")
    store = _open_store(db, must_exist=True)
    try:
        config = stored_config(store, run_id)
        _run(store, config, RunRequest(run_id=run_id, must_exist=True, db=db, workdir=workdir, quiet=quiet,
                                       max_cost=max_cost, prices=prices, baselines=chosen, transfer=tasks,
                                       more_only=True))
    finally:
        store.close()


@cli.command("distill")
@click.argument("run_id", metavar="RUN")
@click.option("--iteration", type=click.IntRange(min=1), help="Which iteration's society teaches. [default: the "
              "last one the run has trained]")
@click.option("--objective", type=click.Choice(["sft", "dpo"]), default="sft", show_default=True,
              help="sft: learn the majority's chains; dpo: prefer them to chains of other answers, weighted by "
                   "the vote margin (backends that train DPO: local, vllm, together).")
@click.option("--model", "student", metavar="STUDENT", help="The student's base model, when not the run's: on the "
              "local backend a smaller model on disk (a directory saved with save_pretrained, or a .gguf file), on a "
              "hosted one another model the provider finetunes. One student per iteration. [default: the run's "
              "base model]")
@click.option("--db", help=DB_HELP)
@click.option("--workdir", type=click.Path(path_type=Path), help="Where datasets and adapters are written. "
              "[default: maft-runs/RUN beside the database]")
@click.option("--max-cost", type=float, metavar="USD", help="Budget for the run as a whole (what it already spent "
              "counts); steps that could pass it are not started.")
@click.option("--prices", type=click.Path(path_type=Path), help="TOML file of prices replacing the packaged ones.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def distill_command(run_id: str, iteration: int | None, objective: str, student: str | None, db: str | None,
                    workdir: Path | None, max_cost: float | None, prices: Path | None, quiet: bool) -> None:
    """Distil a finetuned society into one student model that answers each problem in a single pass: the base
    model finetuned on every distinct chain of the society's strict-majority answers on the training problems
    (no ground truth), then evaluated answering each held-out problem once. Stored as society `distill`."""
    from orchestrator.pipeline import stored_config

    _enter("distill", db, run_id)
    store = _open_store(db, must_exist=True)
    try:
        config = stored_config(store, run_id)
        done = store.require_run(run_id).iterations_done
        if not done or (iteration or done) > done:  # said before the run is touched: its status stays as it is
            raise UserError(f"run {run_id} has {done} finished iteration(s): nothing to distil" if not done else
                            f"--iteration {iteration}: run {run_id} has {done} finished iteration(s)")
        _run(store, config, RunRequest(run_id=run_id, must_exist=True, db=db, workdir=workdir, quiet=quiet,
                                       max_cost=max_cost, prices=prices, more_only=True,
                                       distill=DistillRequest.model_validate({"iteration": iteration,
                                                                              "objective": objective,
                                                                              "model": _model_spec(student)})))
    finally:
        store.close()


def _model_spec(model: str | None) -> str | None:
    """A model on disk by its absolute path (the store outlives the directory it was named from); a provider's
    model name as it is."""
    if model is None:
        return None
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


_SOCIETY_HELP = ("Which society answers: base, or an iteration number of the multiagent society. [default: the last "
                 "iteration the run has trained]")
_USE_MAX_COST_HELP = ("Budget for the run as a whole, as `run` and `eval` hold it (what it already spent counts): a "
                      "debate round that could pass it is not started.")


def _use(command: str, options: Any, db: str | None, resume: str, work: Any) -> None:
    """`ask`, `solve` and `serve`: open the run and its society (lock, backend, ledger), call `work(pipeline, chosen,
    rounds, console)`, and end as `run` ends: a budget stop is exit 1, Ctrl-C 130, each with the command that
    continues. (`options` is a `use.UseOptions`; typed loosely so that `--help` imports nothing heavy.)"""
    from orchestrator.pipeline import stored_config
    from orchestrator.use import choose_society, open_society, rounds_for

    run_id = options.run_id
    _enter(command, db, run_id, resume=resume)
    store = _open_store(db, must_exist=True)
    console = Console()
    try:
        config = stored_config(store, run_id)
        rounds = rounds_for(config, options.rounds)
        # one `ask`, `solve` or `serve` of a run at a time: two at once would pay for the same replies twice
        with RunLock(store.path, f"{run_id}.use"), GracefulStop() as stop, \
                open_society(store, config, options, console, stop.check) as pipeline:
            chosen = choose_society(pipeline, options.society)
            try:
                work(pipeline, chosen, rounds, console)
            except (KeyboardInterrupt, StopRequested, RunStopped) as exc:
                _stopped(exc, console, "every reply so far is stored", resume)
    finally:
        store.close()


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("question")
@click.option("--society", metavar="base|N", help=_SOCIETY_HELP)
@click.option("--rounds", type=int, help="M: debate rounds. [default: the run's]")
@click.option("--db", help=DB_HELP)
@click.option("--workdir", type=click.Path(path_type=Path), help="The run's folder, where a local run keeps its "
              "adapters. [default: maft-runs/RUN beside the database]")
@click.option("--max-cost", type=float, metavar="USD", help=_USE_MAX_COST_HELP)
@click.option("--prices", type=click.Path(path_type=Path), help="TOML file of prices replacing the packaged ones.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def ask(run_id: str, question: str, society: str | None, rounds: int | None, db: str | None, workdir: Path | None,
        max_cost: float | None, prices: Path | None, quiet: bool) -> None:
    """Put QUESTION to RUN's society and show the debate: each round's answer and reply per agent, the vote with
    its counts and agreement, the final answer last. It costs N agents × M rounds generations (plus N summaries
    per later round), recorded in the cost ledger under stage "ask"; the same question again is answered from
    the store, free."""
    import shlex

    from orchestrator.use import UseOptions, debate_view, usage_of
    from orchestrator.use import ask as ask_question

    options = UseOptions(run_id=run_id, society=society, rounds=rounds, workdir=workdir, max_cost=max_cost,
                         prices=prices, quiet=quiet)

    def work(pipeline: Any, chosen: Any, m: int, console: Console) -> None:
        console.print(f"run [bold]{run_id}[/] · {chosen.label} · {pipeline.config.agents} agents × {m} rounds · "
                      f"{pipeline.config.backend} · {pipeline.config.model}", highlight=False)
        name, outcome = ask_question(pipeline, question, chosen, m)
        console.print(debate_view(outcome, chosen, pipeline.task.equivalent))
        generations, tokens, cost = usage_of(pipeline.store, run_id, name)
        console.print(f"{generations} generations · {tokens:,} tokens · ${cost:.4f} (stage ask)", style="dim",
                      highlight=False)

    _use("ask", options, db, f"orchestrator ask {run_id} {shlex.quote(question)}{_db_flag(db)}", work)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True,
              help='JSONL file of questions, one object a line: {"question": ..., "id": ...} (id optional: the line '
                   "number).")
@click.option("--output", "output_path", type=click.Path(path_type=Path), required=True,
              help="JSONL file of answers, one a line in input order: id, answer, votes (answer → count), agreement "
                   "(the winning share) and society. Written whole at the end.")
@click.option("--society", metavar="base|N", help=_SOCIETY_HELP)
@click.option("--rounds", type=int, help="M: debate rounds. [default: the run's]")
@click.option("--db", help=DB_HELP)
@click.option("--workdir", type=click.Path(path_type=Path), help="The run's folder, where a local run keeps its "
              "adapters. [default: maft-runs/RUN beside the database]")
@click.option("--max-cost", type=float, metavar="USD", help=_USE_MAX_COST_HELP)
@click.option("--prices", type=click.Path(path_type=Path), help="TOML file of prices replacing the packaged ones.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def solve(run_id: str, input_path: Path, output_path: Path, society: str | None, rounds: int | None,
          db: str | None, workdir: Path | None, max_cost: float | None, prices: Path | None, quiet: bool) -> None:
    """Answer every question of a JSONL file with one debate of RUN's society each, and write the answers.

    Resumable: every reply is stored as it arrives, so the same command after a crash or Ctrl-C asks only what is
    missing. Each question costs what `ask` costs, under stage "solve" in the cost ledger."""
    import shlex

    from orchestrator.use import UseOptions, read_questions, same_file, usage_of
    from orchestrator.use import solve as solve_file

    data, questions = read_questions(input_path)  # a broken file fails before anything is opened
    if same_file(input_path, output_path):
        raise UserError(f"--output {output_path} is the input file: give another path for the answers")
    options = UseOptions(run_id=run_id, society=society, rounds=rounds, workdir=workdir, max_cost=max_cost,
                         prices=prices, quiet=quiet)

    def work(pipeline: Any, chosen: Any, m: int, console: Console) -> None:
        console.print(f"run [bold]{run_id}[/] · {chosen.label} · {len(questions)} questions · "
                      f"{pipeline.config.agents} agents × {m} rounds", highlight=False)
        name = solve_file(pipeline, questions, data, chosen, m, output_path)
        generations, tokens, cost = usage_of(pipeline.store, run_id, name)
        console.print(f"{len(questions)} answers in {output_path} · {generations} generations · {tokens:,} tokens · "
                      f"${cost:.4f} (stage solve)", highlight=False, soft_wrap=True)

    resume = (f"orchestrator solve {run_id} --input {shlex.quote(str(input_path))} --output "
              f"{shlex.quote(str(output_path))}{_db_flag(db)}")
    _use("solve", options, db, resume, work)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--to", "to", type=click.Path(path_type=Path), required=True, help="A new (or empty) folder to write "
              "the society to.")
@click.option("--society", metavar="base|N", help=_SOCIETY_HELP)
@click.option("--format", "fmt", type=click.Choice(["peft", "merged"]), default="peft", show_default=True,
              help="Local backend: peft writes each agent's LoRA adapter folder; merged writes each as a full model "
                   "in safetensors (transformers and vLLM load it without PEFT).")
@click.option("--db", help=DB_HELP)
def export(run_id: str, to: Path, society: str | None, fmt: str, db: str | None) -> None:
    """Write RUN's society to a folder: on the local backend each agent's generator and critic (adapter or merged
    model) with a model card, on hosted backends the finetuned model ids; and a society.json manifest."""
    from typing import cast

    from orchestrator.export import ExportFormat, export_society
    from orchestrator.pipeline import stored_config
    from orchestrator.use import chosen_from_store

    _enter("export", db, run_id)
    store = _open_store(db, must_exist=True)
    try:
        config = stored_config(store, run_id)
        chosen = chosen_from_store(store, config, run_id, society)
        manifest = export_society(store, config, chosen, to, cast(ExportFormat, fmt))
        what = ("model ids" if manifest.format is None else
                f"{sum(a.trained for a in manifest.agents)} trained {fmt} models")
        click.echo(f"exported {manifest.society} ({what}, {len(manifest.agents)} agent roles) to {to}; "
                   f"manifest {to / 'society.json'}")
    finally:
        store.close()


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: loopback by default; 0.0.0.0 lets other machines in (give --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: one the system chooses, printed at start).")
@click.option("--api-key", envvar="MAFT_API_KEY", metavar="KEY",
              help="Clients must send 'Authorization: Bearer KEY' (env MAFT_API_KEY). [default: no key asked]")
@click.option("--rounds", type=int, help="M: debate rounds. [default: the run's]")
@click.option("--batch-window", type=click.FloatRange(0, 60), default=0.05, show_default=True, metavar="SECONDS",
              help="How long a first question waits for others to share its debate (the local engine batches them).")
@click.option("--db", help=DB_HELP)
@click.option("--workdir", type=click.Path(path_type=Path), help="The run's folder, where a local run keeps its "
              "adapters. [default: maft-runs/RUN beside the database]")
@click.option("--max-cost", type=float, metavar="USD", help=_USE_MAX_COST_HELP + " A request that would pass it "
              "gets HTTP 429 (insufficient_quota); the server keeps serving.")
@click.option("--prices", type=click.Path(path_type=Path), help="TOML file of prices replacing the packaged ones.")
def serve(run_id: str, host: str, port: int, api_key: str | None, rounds: int | None, batch_window: float,
          db: str | None, workdir: Path | None, max_cost: float | None, prices: Path | None) -> None:
    """Serve RUN's societies as an OpenAI-compatible API: point any OpenAI client's base_url at
    http://HOST:PORT/v1.

    GET /v1/models lists RUN (the last trained iteration), RUN@base, RUN@1, ...; POST /v1/chat/completions debates
    the last user message with that society and answers with the chain of an agent that holds the majority's
    answer, usage summing every token of the debate, and the votes and agreement in an extra `maft` field.
    Questions that arrive together are debated together. Each costs what `ask` costs, under stage "serve" in the
    cost ledger; a question asked before is answered from the store, free. Ctrl-C stops."""
    from orchestrator.serve import Debates, Listening, create_app, served_societies
    from orchestrator.use import UseOptions

    if api_key is not None and not api_key.strip():
        raise UserError("--api-key (or MAFT_API_KEY) is empty: give the key clients must send, or leave it unset")
    options = UseOptions(run_id=run_id, rounds=rounds, workdir=workdir, max_cost=max_cost, prices=prices, quiet=True)

    def work(pipeline: Any, chosen: Any, m: int, console: Console) -> None:
        debates = Debates(served_societies(pipeline.store, pipeline), m, window=batch_window)
        with Listening(create_app(debates, api_key), host, port) as http:
            shown = f"[{host}]" if ":" in host else host
            console.print(f"serving run [bold]{run_id}[/] ({', '.join(debates.societies)}) · "
                          f"{pipeline.config.agents} agents × {m} rounds · {pipeline.config.backend} on "
                          f"http://{shown}:{http.port}/v1 · Ctrl-C stops", highlight=False, soft_wrap=True)
            if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
                console.print(f"[yellow]warning: {host} is reachable from other machines and no --api-key is set: "
                              "anyone who reaches it spends this run's budget", soft_wrap=True)
            sys.stdout.flush()
            try:
                debates.serve_forever(pipeline, http.alive)
            except StopRequested:  # Ctrl-C: how a server is meant to stop
                console.print("stopped serving; every reply is stored", highlight=False)

    _use("serve", options, db, f"orchestrator serve {run_id}{_db_flag(db)}", work)
