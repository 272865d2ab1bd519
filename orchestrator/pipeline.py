"""One run, iteration by iteration: debate → per-agent data → 2N finetunes → evaluation.

Every step writes the store before the next begins, and every step first reads what is already stored, so
running the same run again (after a crash, Ctrl-C or a failed job) redoes nothing that finished: no stored
response is generated again and no finished job is started again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from backends.base import BASE_MODEL_ID, Backend, FinetuneSpec
from orchestrator.config import RunConfig
from orchestrator.costs import Ledger
from orchestrator.debate import DebateOutcome, DebateRunner, DebateSettings, Society
from orchestrator.errors import UserError
from orchestrator.evaluate import evaluate
from orchestrator.finetune import FinetunePlan, run_jobs
from orchestrator.store import AgentRow, DatasetRow, JobRow, ProblemRow, RunRow, Store
from orchestrator.tasks import Problem, Task, get_task
from orchestrator.training_data import build_agent_data, write_jsonl

ROLES = ("generator", "critic")


def open_run(store: Store, config: RunConfig, run_id: str, *, must_exist: bool) -> RunRow:
    """Create the run, or check that the stored one computes the same thing (only `iterations` may grow)."""
    run = store.require_run(run_id) if must_exist else store.get_run(run_id)
    if run is None:
        # Bad task specs and impossible sizes fail here, before the run is recorded.
        task = get_task(config.task)
        task.train_problems(config.train_size, config.seed)
        task.eval_problems(config.eval_size, config.seed)
        run = RunRow(id=run_id, config=config.model_dump_json(), backend=config.backend, model=config.model,
                     task=config.task)
        store.save_run(run)
        return run
    stored = RunConfig.model_validate_json(run.config)
    if stored.identity() != config.identity():
        new = config.identity_fields()
        diff = sorted(k for k, v in stored.identity_fields().items() if new.get(k) != v)
        raise UserError(
            f"run '{run_id}' already exists with a different configuration ({', '.join(diff)} differ): "
            f"use another --name, or `orchestrator run --resume {run_id}` to continue it as it was"
        )
    if stored != config:  # only iterations and operational settings can differ here
        run.config = config.model_dump_json()
        store.save_run(run)
    return run


def stored_config(store: Store, run_id: str) -> RunConfig:
    return RunConfig.model_validate_json(store.require_run(run_id).config)


class Pipeline:
    def __init__(
        self,
        *,
        config: RunConfig,
        run: RunRow,
        store: Store,
        backend: Backend,
        workdir: Path,
        console: Console,
        show_progress: bool = True,
        poll_interval: float = 5.0,
        ledger: Ledger | None = None,
    ) -> None:
        self.config = config
        self.run_row = run
        self.store = store
        self.backend = backend
        self.workdir = workdir
        self.console = console
        self.show_progress = show_progress
        self.poll_interval = poll_interval
        self.ledger = ledger
        self.info = backend.describe()
        self.task: Task = get_task(config.task)
        self.settings = DebateSettings(
            rounds=config.rounds, summarize=config.summarize, generation=config.generation, seed=config.seed
        )

    # the whole run ---------------------------------------------------------------------------------------

    def run(self) -> None:
        self._set_status("running")
        try:
            train, held_out = self._problems()
            society = self._society(0) or self._save_society(0, Society.base(self.config.agents), None)
            self.console.rule("[bold]baseline: the base society on the held-out problems")
            self._evaluate(0, self._debate("eval-0", held_out, society))
            for iteration in range(1, self.config.iterations + 1):
                society = self._iteration(iteration, society, train, held_out)
        except BaseException as exc:
            self._set_status("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", str(exc) or None)
            raise
        self._set_status("finished")

    def _iteration(self, iteration: int, previous: Society, train: list[Problem], held_out: list[Problem]) -> Society:
        total = self.config.iterations
        finished = self._society(iteration)
        if finished is None:
            self.console.rule(f"[bold]iteration {iteration}/{total}: debate on {len(train)} training problems")
            outcomes = self._debate(f"train-{iteration}", train, previous)
            datasets = self._datasets(iteration, outcomes)
            self.console.rule(f"[bold]iteration {iteration}/{total}: finetuning {2 * self.config.agents} models")
            finished = self._finetune(iteration, previous, datasets)
        self.console.rule(f"[bold]iteration {iteration}/{total}: the finetuned society on the held-out problems")
        self._evaluate(iteration, self._debate(f"eval-{iteration}", held_out, finished))
        self.run_row.iterations_done = max(self.run_row.iterations_done, iteration)
        self.store.save_run(self.run_row)
        return finished

    # steps -----------------------------------------------------------------------------------------------

    def _set_status(self, status: str, error: str | None = None) -> None:
        self.run_row.status = status
        self.run_row.error = error
        self.store.save_run(self.run_row)

    def _problems(self) -> tuple[list[Problem], list[Problem]]:
        """Draw the problems once and record their ids; later sessions read the same ones back."""
        run_id = self.run_row.id
        splits: dict[str, list[Problem]] = {}
        for split, size in (("train", self.config.train_size), ("eval", self.config.eval_size)):
            rows = self.store.get_problems(run_id, split)
            if rows:
                splits[split] = [Problem(id=r.problem_id, question=r.question, answer=r.answer) for r in rows]
                continue
            draw = self.task.train_problems if split == "train" else self.task.eval_problems
            problems = draw(size, self.config.seed)
            self.store.save_problems(
                [ProblemRow(run_id=run_id, split=split, position=i, problem_id=p.id, question=p.question,
                            answer=p.answer) for i, p in enumerate(problems)]
            )
            splits[split] = problems
        overlap = {p.id for p in splits["train"]} & {p.id for p in splits["eval"]}
        if overlap:  # the tasks guarantee this; a user's JSONL with duplicate ids could still break it
            first = sorted(overlap)[0]
            raise UserError(f"train and eval problems overlap ({first}, ...): give each problem a unique id")
        return splits["train"], splits["eval"]

    def _society(self, iteration: int) -> Society | None:
        rows = self.store.get_agents(self.run_row.id, iteration)
        if len(rows) != 2 * self.config.agents:
            return None
        by = {(r.agent, r.role): r.model_id for r in rows}
        n = range(self.config.agents)
        return Society(generators=[by[(i, "generator")] for i in n], critics=[by[(i, "critic")] for i in n])

    def _save_society(self, iteration: int, society: Society, parent: Society | None,
                      jobs: dict[tuple[int, str], str] | None = None) -> Society:
        rows = []
        for i in range(self.config.agents):
            for role, models, parents in (("generator", society.generators, parent.generators if parent else None),
                                          ("critic", society.critics, parent.critics if parent else None)):
                rows.append(AgentRow(run_id=self.run_row.id, iteration=iteration, agent=i, role=role,
                                     model_id=models[i], parent_model_id=parents[i] if parents else None,
                                     job_key=(jobs or {}).get((i, role))))
        self.store.save_agents(rows)
        return society

    @contextmanager
    def _progress(self) -> Iterator[Progress | None]:
        if not self.show_progress:
            yield None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=self.console) as progress:
            yield progress

    def _debate(self, name: str, problems: list[Problem], society: Society) -> list[DebateOutcome]:
        iteration = int(name.rsplit("-", 1)[1])
        with self._progress() as progress:
            runner = DebateRunner(run_id=self.run_row.id, name=name, task=self.task, backend=self.backend,
                                  store=self.store, settings=self.settings, progress=progress,
                                  iteration=iteration, ledger=self.ledger)
            return runner.run(problems, society)

    def _datasets(self, iteration: int, outcomes: list[DebateOutcome]) -> list[DatasetRow]:
        """Build and record every agent's sets; deterministic, so rebuilding after a crash gives the same files."""
        rows: list[DatasetRow] = []
        folder = self.workdir / "datasets" / f"iteration-{iteration}"
        for agent in range(self.config.agents):
            rng = random.Random(f"{self.config.seed}:critic-mix:{iteration}:{agent}")
            data = build_agent_data(outcomes, agent, self.task.equivalent, w=self.config.critic_mix, rng=rng,
                                    all_turns=self.config.critic_train_all_turns)
            for role, examples in (("generator", data.generator), ("critic", data.critic)):
                path = folder / f"agent-{agent + 1}-{role}.jsonl"
                sha = write_jsonl(path, examples)
                rows.append(DatasetRow(
                    run_id=self.run_row.id, iteration=iteration, agent=agent, role=role, path=str(path), sha256=sha,
                    n_examples=len(examples),
                    n_generation=len(examples) if role == "generator" else 0,
                    n_critic_neg=data.critic_neg_used if role == "critic" else 0,
                    n_critic_pos=data.critic_pos_used if role == "critic" else 0,
                    n_critic_neg_available=data.critic_neg_available if role == "critic" else 0,
                    n_critic_pos_available=data.critic_pos_available if role == "critic" else 0,
                    problem_ids=json.dumps([e.problem_id for e in examples]),
                ))
        self.store.save_datasets(rows)
        return rows

    def _finetune(self, iteration: int, previous: Society, datasets: list[DatasetRow]) -> Society:
        plans: list[FinetunePlan] = []
        models = {(i, "generator"): previous.generators[i] for i in range(self.config.agents)}
        models |= {(i, "critic"): previous.critics[i] for i in range(self.config.agents)}
        jobs: dict[tuple[int, str], str] = {}
        for ds in datasets:
            key = f"{self.run_row.id}/iteration-{iteration}/agent-{ds.agent + 1}/{ds.role}"
            start_from = models[(ds.agent, ds.role)] if self.config.strategy == "continue" else BASE_MODEL_ID
            job = JobRow(key=key, run_id=self.run_row.id, iteration=iteration, agent=ds.agent, role=ds.role,
                         backend=self.config.backend, base_model_id=start_from, dataset_sha256=ds.sha256)
            if ds.n_examples < max(1, self.info.min_training_examples):
                # Too little agreed with the majority: this model stays as it was rather than training on
                # nothing, or on a file the provider would refuse.
                why = (f"{ds.n_examples} examples, the {self.info.name} backend needs at least "
                       f"{self.info.min_training_examples}" if ds.n_examples else "no training examples")
                if self.store.get_job(key) is None:
                    self.store.save_job(job.model_copy(update={"status": "skipped", "error": why}))
                self.console.print(f"agent {ds.agent + 1} {ds.role}: {why}; it keeps its model")
                continue
            jobs[(ds.agent, ds.role)] = key
            suffix = f"{self.run_row.id[:18]}-i{iteration}-a{ds.agent + 1}-{ds.role[0]}"
            spec = FinetuneSpec(key=key, base_model=start_from, training_file=Path(ds.path), suffix=suffix,
                                params=self.config.training, seed=self.config.seed + iteration)
            plans.append(FinetunePlan(job=job, spec=spec, epochs_estimate=self.info.training_epochs))
        results = run_jobs(plans, self.backend, self.store, ledger=self.ledger,
                           max_active=self.info.max_concurrent_jobs, poll_interval=self.poll_interval)
        for slot, key in jobs.items():
            model_id = results[key].model_id
            if model_id is None:  # a backend bug; never silently keep the old model
                raise RuntimeError(f"job {key} succeeded without a model id")
            models[slot] = model_id
        n = range(self.config.agents)
        society = Society(generators=[models[(i, "generator")] for i in n], critics=[models[(i, "critic")] for i in n])
        return self._save_society(iteration, society, previous, jobs)

    def _evaluate(self, iteration: int, outcomes: list[DebateOutcome]) -> None:
        society = "base" if iteration == 0 else "maft"
        for row in evaluate(self.run_row.id, society, iteration, outcomes, self.task, self.config.seed):
            self.store.save_evaluation(row)
