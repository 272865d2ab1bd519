"""One run, iteration by iteration: debate → per-agent data → 2N finetunes → evaluation.

Every step writes the store before the next begins, and every step first reads what is already stored, so
running the same run again (after a crash, Ctrl-C or a failed job) redoes nothing that finished: no stored
response is generated again and no finished job is started again.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from backends.base import BASE_MODEL_ID, Backend, FinetuneSpec, Objective, ReportsRetries
from foundation.crashpoints import crashpoint
from foundation.errors import UserError
from orchestrator.baselines import SINGLE_MODEL_METHODS
from orchestrator.config import RunConfig
from orchestrator.costs import Ledger
from orchestrator.debate import DebateOutcome, DebateRunner, DebateSettings, Society, readable_answer
from orchestrator.distill import Distillation, DistillRequest, check_student
from orchestrator.evaluate import MATCHED_MAJORITY, DiversityMeter, evaluate
from orchestrator.finetune import FinetunePlan, run_jobs
from orchestrator.interrupts import StopRequested, never
from orchestrator.matched import run_matched_majority
from orchestrator.names import DebateName, DebateStage, JobKey
from orchestrator.preference import (
    ExtraSample,
    PreferencePair,
    build_agent_pairs,
    by_slot,
    count_pairs,
    default_min_margin,
    extra_sample_slots,
    keep_margin,
    write_hosted_jsonl,
    write_local_jsonl,
)
from orchestrator.progress import RetryColumn
from orchestrator.societies import MAFT, SOCIETIES, VARIANTS
from orchestrator.store import AgentRow, DatasetRow, JobRow, ProblemRow, RunRow, RunStatus, Store
from orchestrator.tasks import Problem, Task, get_task
from orchestrator.training_data import Example, build_agent_data, write_jsonl

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


class Variant(BaseModel):
    """One way of finetuning a society with debate data: the method itself, one of the paper's ablations, or the
    method trained by another objective (`objective`; None: the run's `[training] objective`)."""

    society: str = MAFT
    summarize: bool = True
    train_critics: bool = True
    objective: Objective | None = None

    def debate(self, stage: DebateStage, iteration: int) -> str:
        return str(DebateName(stage=stage, iteration=iteration, society=self.society))

    def job_key(self, run_id: str, iteration: int, agent: int, role: str) -> str:
        return str(JobKey(run_id=run_id, society=self.society, iteration=iteration, agent=agent, role=role))



def job_seed(seed: int, iteration: int, agent: int, role: str) -> int:
    """Each of the 2N models of an iteration gets its own training seed, so their LoRA initializations and data
    orders differ too: the society's diversity should not hinge on the data alone."""
    return seed + 1000 * iteration + 2 * agent + (role == "critic")


class Pipeline:
    """One run: its problems, its societies, and the steps that debate, build data, finetune and evaluate."""

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
        checkpoint: Callable[[], None] = never,
    ) -> None:
        self.config = config
        self.checkpoint = checkpoint
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
        self.maft = Variant(summarize=config.summarize)
        self._diversity: DiversityMeter | None = None

    def settings(self, *, summarize: bool | None = None, rounds: int | None = None) -> DebateSettings:
        return DebateSettings(rounds=rounds or self.config.rounds,
                              summarize=self.config.summarize if summarize is None else summarize,
                              generation=self.config.generation, seed=self.config.seed)

    def society_settings(self, society: str) -> DebateSettings:
        """How `society` debates, on its own task and on any other: only the no-summary ablation differs from the
        run's settings (it concatenates the other answers instead of summarizing them)."""
        return self.settings(summarize=SOCIETIES[society].summarize if society in SOCIETIES else None)

    # the whole run ---------------------------------------------------------------------------------------

    def run(self, baselines: Sequence[str] = (), distill: DistillRequest | None = None) -> None:
        """The base society's evaluation, L iterations of multiagent finetuning, then any baselines asked for, then
        the last society distilled into one model if asked (`run --distill`)."""
        if distill is not None:
            check_student(self.store, self.run_row.id, distill, self.info)
        with self._status():
            train, held_out = self.problems()
            society = self.stored_society(MAFT, 0) or self.save_society(MAFT, 0, Society.base(self.config.agents))
            self.console.rule("[bold]the base society on the held-out problems")
            self.evaluate("base", 0, self.debate(self.maft.debate("eval", 0), held_out, society, 0), society)
            for iteration in range(1, self.config.iterations + 1):
                society = self._iteration(self.maft, iteration, society, train, held_out)
                self.run_row.iterations_done = max(self.run_row.iterations_done, iteration)
                self.store.save_run(self.run_row)
            self.run_baselines(baselines, train, held_out)
            if distill is not None:
                Distillation(self, distill).run(train, held_out)

    def run_more(self, baselines: Sequence[str] = (), transfer: Sequence[str] = (),
                 distill: DistillRequest | None = None) -> None:
        """`orchestrator eval`: baselines for a run whose iterations are done, and zero-shot transfer: every
        society of the run evaluated on another task's held-out problems."""
        if distill is not None:  # a --model the backend or the run cannot take: refused, the run's status kept
            check_student(self.store, self.run_row.id, distill, self.info)
        with self._status():
            train, held_out = self.problems()
            self.run_baselines(baselines, train, held_out)
            for spec in transfer:
                self.transfer(get_task(spec))
            if distill is not None:  # `orchestrator distill`
                Distillation(self, distill).run(train, held_out)

    def transfer(self, task: Task) -> None:
        """Every stored society on `task`'s held-out problems, each as it is used on its own task: a society by
        its debate, a distilled student or soup by one agent answering once (no diversity: one answer has none)."""
        _, held_out = self.problems(task)
        for name, iteration in self.store.societies(self.run_row.id):
            society = self.stored_society(name, iteration)
            if society is None:
                continue
            evaluated = "base" if iteration == 0 else name
            debate = str(DebateName(stage="eval", iteration=iteration, society=name, transfer=task.name))
            self.console.rule(f"[bold]zero-shot on {task.name}: {evaluated}, iteration {iteration}")
            if name in SOCIETIES and SOCIETIES[name].kind == "student":
                once = Society.uniform(1, society.generators[0])
                outcomes = self.debate(debate, held_out, once, iteration, self.settings(rounds=1), task=task)
                for row in evaluate(self.run_row.id, name, iteration, outcomes, task, self.config.seed):
                    self.store.save_evaluation(row)
                continue
            outcomes = self.debate(debate, held_out, society, iteration, self.society_settings(name), task=task)
            self.evaluate(evaluated, iteration, outcomes, society, task)

    def run_baselines(self, names: Sequence[str], train: list[Problem], held_out: list[Problem]) -> None:
        """The societies asked for, then (`majority-matched`) the compute-matched vote of every society evaluated,
        theirs included."""
        for name in names:
            if name == MATCHED_MAJORITY:
                continue
            if name in VARIANTS:
                spec = SOCIETIES[name]
                variant = Variant(society=name, summarize=self.society_settings(name).summarize,
                                  train_critics=spec.train_critics, objective=spec.objective)
                society = self.stored_society(MAFT, 0) or Society.base(self.config.agents)
                for iteration in range(1, self.config.iterations + 1):
                    society = self._iteration(variant, iteration, society, train, held_out)
            else:
                SINGLE_MODEL_METHODS[name](self).run(train, held_out)
        if MATCHED_MAJORITY in names:
            run_matched_majority(self, held_out)

    @contextmanager
    def _status(self) -> Iterator[None]:
        self._set_status("running")
        try:
            yield
        except BaseException as exc:
            stopped = isinstance(exc, KeyboardInterrupt | StopRequested)
            self._set_status("interrupted" if stopped else "failed", str(exc) or None)
            raise
        crashpoint("pipeline.finishing")  # everything done but the run's status
        self._set_status("finished")

    def _iteration(self, variant: Variant, iteration: int, previous: Society, train: list[Problem],
                   held_out: list[Problem]) -> Society:
        total = self.config.iterations
        label = "" if variant.society == MAFT else f"{variant.society}: "
        settings = self.settings(summarize=variant.summarize)
        finished = self.stored_society(variant.society, iteration)
        if finished is None:
            self.console.rule(f"[bold]{label}iteration {iteration}/{total}: debate on {len(train)} training problems")
            outcomes = self.debate(variant.debate("train", iteration), train, previous, iteration, settings)
            pairs = self._preference_pairs(variant, iteration, outcomes, previous)
            datasets = self._datasets(variant, iteration, outcomes, pairs)
            crashpoint("pipeline.datasets_written")  # files and rows written, no job started
            self.console.rule(f"[bold]{label}iteration {iteration}/{total}: finetuning {len(datasets)} models")
            starts = {(d.agent, d.role): previous.model(d.agent, d.role) for d in datasets}
            models = self.finetune(variant.society, iteration, datasets, starts, key=variant.job_key,
                                   objective=variant.objective)
            society = previous.replaced(models)
            finished = self.save_society(variant.society, iteration, society, previous, models)
        self.console.rule(f"[bold]{label}iteration {iteration}/{total}: the finetuned society on held-out problems")
        outcomes = self.debate(variant.debate("eval", iteration), held_out, finished, iteration, settings)
        self.evaluate(variant.society, iteration, outcomes, finished)
        return finished

    # steps -----------------------------------------------------------------------------------------------

    def _set_status(self, status: RunStatus, error: str | None = None) -> None:
        self.run_row.status = status
        self.run_row.error = error
        self.store.save_run(self.run_row)

    def problems(self, task: Task | None = None) -> tuple[list[Problem], list[Problem]]:
        """Draw the problems once and record their ids; later sessions read the same ones back. With another
        `task` (zero-shot transfer) only its held-out problems are drawn, under the split `eval@TASK`."""
        run_id = self.run_row.id
        task = task or self.task
        transfer = task.name != self.task.name
        wanted = [(f"eval@{task.name}", self.config.eval_size)] if transfer else [
            ("train", self.config.train_size), ("eval", self.config.eval_size)]
        splits: dict[str, list[Problem]] = {"train": []}
        for split, size in wanted:
            rows = self.store.get_problems(run_id, split)
            if rows:
                splits[split] = [Problem(id=r.problem_id, question=r.question, answer=r.answer) for r in rows]
                continue
            draw = task.train_problems if split == "train" else task.eval_problems
            problems = draw(size, self.config.seed)
            self.store.save_problems(
                [ProblemRow(run_id=run_id, split=split, position=i, problem_id=p.id, question=p.question,
                            answer=p.answer) for i, p in enumerate(problems)]
            )
            splits[split] = problems
        held_out = splits[wanted[-1][0]]
        overlap = {p.id for p in splits["train"]} & {p.id for p in held_out}
        if overlap:  # the tasks guarantee this; a user's JSONL with duplicate ids could still break it
            first = sorted(overlap)[0]
            raise UserError(f"train and eval problems overlap ({first}, ...): give each problem a unique id")
        return splits["train"], held_out

    def stored_society(self, society: str, iteration: int) -> Society | None:
        rows = self.store.get_agents(self.run_row.id, iteration, society)
        if len(rows) != 2 * self.config.agents:
            return None
        by = {(r.agent, r.role): r.model_id for r in rows}
        n = range(self.config.agents)
        return Society(generators=[by[(i, "generator")] for i in n], critics=[by[(i, "critic")] for i in n])

    def save_society(self, name: str, iteration: int, society: Society, parent: Society | None = None,
                     models: dict[tuple[int, str], tuple[str, str]] | None = None) -> Society:
        """Record who plays every agent and role; `models` gives the job behind each newly trained model."""
        rows = [
            AgentRow(run_id=self.run_row.id, society=name, iteration=iteration, agent=i, role=role,
                     model_id=society.model(i, role), parent_model_id=parent.model(i, role) if parent else None,
                     job_key=(models or {}).get((i, role), ("", ""))[1] or None)
            for i in range(self.config.agents) for role in ROLES
        ]
        self.store.save_agents(rows)
        return society

    @contextmanager
    def _progress(self) -> Iterator[Progress | None]:
        if not self.show_progress:
            yield None
            return
        columns: tuple[ProgressColumn, ...] = (
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn())
        if isinstance(self.backend, ReportsRetries):  # a storm of 429s shows, instead of a bar that stalls
            columns += (RetryColumn(self.backend),)
        with Progress(*columns, console=self.console) as progress:
            yield progress

    def runner(self, name: str, iteration: int, settings: DebateSettings | None = None,
               progress: Progress | None = None, task: Task | None = None) -> DebateRunner:
        return DebateRunner(run_id=self.run_row.id, name=name, task=task or self.task, backend=self.backend,
                            store=self.store, settings=settings or self.settings(), progress=progress,
                            iteration=iteration, ledger=self.ledger, checkpoint=self.checkpoint)

    def debate(self, name: str, problems: list[Problem], society: Society, iteration: int,
               settings: DebateSettings | None = None, task: Task | None = None) -> list[DebateOutcome]:
        with self._progress() as progress:
            return self.runner(name, iteration, settings, progress, task).run(problems, society)

    @property
    def max_length(self) -> int | None:
        """The longest example a finetune takes, in tokens: longer ones are dropped when the data is built and
        counted in its dataset row, since the trainer would cut them exactly where they are learned. Only the
        local trainer has such a limit (`[training] max_length`); hosted providers take whole conversations
        and check their own limits on the file."""
        return self.config.training.max_length if self.config.backend == "local" else None

    def dataset_path(self, society: str, iteration: int, agent: int, role: str) -> Path:
        where = self.workdir / "datasets" / ("" if society == MAFT else society) / f"iteration-{iteration}"
        return where / f"agent-{agent + 1}-{role}.jsonl"

    def _preference_pairs(self, variant: Variant, iteration: int, outcomes: list[DebateOutcome],
                          society: Society) -> list[PreferencePair] | None:
        """Every agent's preference pairs from the training debate (None under objective sft: none are built).

        First the extra round-1 samples at temperature 1, only where they can become a generator pair's rejected
        side (`extra_sample_slots`), asked as agent n of the training debate and stored like its answers
        (`{problem}/r1/a{n}/extra{k}`), so a resumed run asks none of them twice."""
        if (variant.objective or self.config.training.objective) == "sft":
            return None
        equivalent = self.task.equivalent
        slots = extra_sample_slots(outcomes, equivalent)
        count = self.config.preference.extra_samples
        extra: dict[tuple[str, int], list[ExtraSample]] = {}
        if slots and count:
            by_id = {o.problem.id: o for o in outcomes}
            settings = self.settings(summarize=variant.summarize)
            settings = settings.model_copy(update={
                "generation": settings.generation.model_copy(update={"temperature": 1.0})})
            items = [(by_id[pid].problem, agent, society.generators[agent], by_id[pid].agents[agent].messages[:1],
                      f"extra{k}") for pid, agent in slots for k in range(count)]
            with self._progress() as progress:
                runner = self.runner(variant.debate("train", iteration), iteration, settings, progress)
                rows = runner.ask_as(items, f"{len(items)} extra round-1 samples for preference pairs")
            for (problem, agent, *_), row in zip(items, rows, strict=True):
                extra.setdefault((problem.id, agent), []).append(
                    ExtraSample(text=row.text, answer=readable_answer(row)))
        return [pair for agent in range(self.config.agents)
                for pair in build_agent_pairs(outcomes, agent, equivalent, extra=extra)]

    def pairs_path(self, society: str, iteration: int, agent: int, role: str) -> Path:
        return self.dataset_path(society, iteration, agent, role).with_suffix(".pairs.jsonl")

    def sendable_pairs(self, pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
        """The pairs the backend is given: all of them where it weights pairs (local); else those with at least
        `[preference] min_margin` (default 1/N), and on a one-turn-only provider (OpenAI) only those whose prompt
        has one user turn (generator pairs: a critic's prompt holds its earlier rounds)."""
        if self.info.weighted_pairs:
            return list(pairs)
        kept = keep_margin(pairs, self.config.preference.min_margin or default_min_margin(self.config.agents))
        if self.info.one_turn_pairs:
            kept = [p for p in kept if sum(m.role == "user" for m in p.messages) == 1]
        return kept

    def with_pairs(self, row: DatasetRow, pairs: Sequence[PreferencePair]) -> DatasetRow:
        """`row` with its (agent, role)'s pair file written and counted: our trainer's format, weights included,
        where the backend weights pairs; else the providers' format with only the pairs it is sent, so the counts
        are what is sent."""
        path = self.pairs_path(row.society, row.iteration, row.agent, row.role)
        pairs = self.sendable_pairs(pairs)
        write = write_local_jsonl if self.info.weighted_pairs else write_hosted_jsonl
        counts = {c.kind: c for c in count_pairs(pairs, self.config.agents) if c.agent == row.agent}
        return row.model_copy(update={
            "pairs_path": str(path), "pairs_sha256": write(path, pairs), "n_pairs": len(pairs),
            "n_pairs_generator": counts["generator"].pairs, "n_pairs_correction": counts["correction"].pairs,
            "n_pairs_anti_sycophancy": counts["anti-sycophancy"].pairs,
            "pairs_weight": round(sum(c.weight for c in counts.values()), 9),
        })

    def _datasets(self, variant: Variant, iteration: int, outcomes: list[DebateOutcome],
                  pairs: Sequence[PreferencePair] | None = None) -> list[DatasetRow]:
        """Build and record every agent's sets; deterministic, so rebuilding after a crash gives the same files.
        With `pairs` (a preference objective) each set also gets its (agent, role)'s pair file."""
        rows: list[DatasetRow] = []
        slots: dict[tuple[int, str], list[PreferencePair]] = {slot: v for slot, v in by_slot(pairs or []).items()}
        for agent in range(self.config.agents):
            rng = random.Random(f"{self.config.seed}:critic-mix:{iteration}:{agent}")
            data = build_agent_data(outcomes, agent, self.task.equivalent, w=self.config.critic_mix, rng=rng,
                                    all_turns=self.config.critic_train_all_turns, max_length=self.max_length)
            roles = (("generator", data.generator), ("critic", data.critic))
            for role, examples in roles if variant.train_critics else roles[:1]:
                path = self.dataset_path(variant.society, iteration, agent, role)
                critic = role == "critic"
                row = self.write_dataset(examples, DatasetRow(
                    run_id=self.run_row.id, society=variant.society, iteration=iteration, agent=agent, role=role,
                    path=str(path), sha256="", n_examples=len(examples),
                    n_generation=0 if critic else len(examples),
                    n_critic_neg=data.critic_neg_used if critic else 0,
                    n_critic_pos=data.critic_pos_used if critic else 0,
                    n_critic_neg_available=data.critic_neg_available if critic else 0,
                    n_critic_pos_available=data.critic_pos_available if critic else 0,
                    problem_ids=json.dumps([e.problem_id for e in examples]),
                    n_too_long=data.critic_too_long if critic else data.generator_too_long,
                ))
                rows.append(row if pairs is None else self.with_pairs(row, slots.get((agent, role), [])))
        self.store.save_datasets(rows)
        return rows

    def write_dataset(self, examples: Sequence[Example], row: DatasetRow, *,
                      accumulate: bool | None = None) -> DatasetRow:
        """Write `row`'s file from this iteration's `examples` and return the row with its sha256.

        Under strategy `accumulate` (or with `accumulate=True`) the model restarts from the base each iteration
        on all of this agent's and role's data so far: the file is the previous iteration's file (itself
        cumulative), checked against its recorded sha256, followed by these examples, and the counts add up."""
        accumulate = self.config.strategy == "accumulate" if accumulate is None else accumulate
        previous = None
        if accumulate and row.iteration > 1:
            earlier = self.store.get_datasets(self.run_row.id, row.iteration - 1, row.society)
            previous = next((d for d in earlier if (d.agent, d.role) == (row.agent, row.role)), None)
        if previous is None:
            return row.model_copy(update={"sha256": write_jsonl(Path(row.path), examples)})
        prefix = _read_verified(Path(previous.path), previous.sha256)
        return row.model_copy(update={
            "sha256": write_jsonl(Path(row.path), examples, prefix=prefix),
            "n_examples": previous.n_examples + row.n_examples,
            "n_generation": previous.n_generation + row.n_generation,
            "n_critic_neg": previous.n_critic_neg + row.n_critic_neg,
            "n_critic_pos": previous.n_critic_pos + row.n_critic_pos,
            "n_critic_neg_available": previous.n_critic_neg_available + row.n_critic_neg_available,
            "n_critic_pos_available": previous.n_critic_pos_available + row.n_critic_pos_available,
            "n_too_long": previous.n_too_long + row.n_too_long,
            "problem_ids": json.dumps(json.loads(previous.problem_ids) + json.loads(row.problem_ids)),
        })

    def finetune(self, society: str, iteration: int, datasets: list[DatasetRow],
                 starts: dict[tuple[int, str], str], *, key: Callable[[str, int, int, str], str],
                 restart: bool | None = None, objective: Objective | None = None, root_model: str | None = None
                 ) -> dict[tuple[int, str], tuple[str, str]]:
        """Train a model on each dataset (by `objective`, default the run's `[training] objective`); returns (model
        id, job key) per (agent, role) that was trained.

        A set smaller than the provider accepts is not sent: that model stays as it was. `starts` gives the
        model each one continues from (strategy continue); with restart and accumulate every one starts from the
        base model (accumulate's files hold every iteration's data so far, see `write_dataset`). `root_model`:
        another base model the `starts` are (a student distilled into it), where the backend has `other_models`.
        """
        restart = self.config.strategy in ("restart", "accumulate") if restart is None else restart
        objective_asked = objective or self.config.training.objective
        plans: list[FinetunePlan] = []
        for ds in datasets:
            job_key = key(self.run_row.id, iteration, ds.agent, ds.role)
            start_from = BASE_MODEL_ID if restart else starts[(ds.agent, ds.role)]
            job = JobRow(key=job_key, run_id=self.run_row.id, society=society, iteration=iteration, agent=ds.agent,
                         role=ds.role, backend=self.config.backend, base_model_id=start_from,
                         dataset_sha256=ds.sha256)
            objective, why = self._objective(ds, objective_asked)
            if why is not None:
                # Too little agreed with the majority: this model stays as it was rather than training on
                # nothing, or on a file the provider would refuse.
                if self.store.get_job(job_key) is None:
                    self.store.save_job(job.model_copy(update={"status": "skipped", "error": why}))
                self.console.print(f"{society} agent {ds.agent + 1} {ds.role}: {why}; it keeps its model")
                continue
            label = "" if society == MAFT else f"{society}-"
            suffix = f"{self.run_row.id[:18]}-{label}i{iteration}-a{ds.agent + 1}-{ds.role[0]}"
            seed = job_seed(self.config.seed, iteration, ds.agent, ds.role)
            spec = FinetuneSpec(key=job_key, base_model=start_from, training_file=Path(ds.path), suffix=suffix,
                                params=self.config.training, seed=seed, root_model=root_model)
            if objective != "sft":
                spec = spec.model_copy(update={"objective": objective, "preference_file": Path(str(ds.pairs_path)),
                                               "dpo": self.config.training.dpo()})
                job = job.model_copy(update={"dataset_sha256": _combined_sha(objective, ds)})
            plans.append(FinetunePlan(job=job, spec=spec, epochs_estimate=self.info.training_epochs))
        results = run_jobs(plans, self.backend, self.store, ledger=self.ledger,
                           max_active=self.info.max_concurrent_jobs, poll_interval=self.poll_interval,
                           checkpoint=self.checkpoint)
        trained: dict[tuple[int, str], tuple[str, str]] = {}
        for plan in plans:
            model_id = results[plan.job.key].model_id
            if model_id is None:  # a backend bug; never silently keep the old model
                raise RuntimeError(f"job {plan.job.key} succeeded without a model id")
            trained[(plan.job.agent, plan.job.role)] = (model_id, plan.job.key)
        return trained

    def _objective(self, ds: DatasetRow, asked: Objective) -> tuple[Objective, str | None]:
        """What a set's job learns, and why it is not sent (None: it is). A set without pairs (objective sft, a
        baseline's) trains by SFT; under sft-then-dpo a slot with only one of the two trains by that one (by DPO
        alone only where the backend has it: OpenAI's DPO has no NLL term). A provider's minimum file size
        (`min_training_examples`) holds for the pair file too."""
        least = max(1, self.info.min_training_examples)
        enough_sft = ds.n_examples >= least
        enough_pairs = (ds.n_pairs or 0) >= least
        if ds.n_pairs is None:
            wanted: Objective = "sft"
        elif asked == "sft-then-dpo":
            alone = "dpo" in self.info.objectives
            wanted = "sft-then-dpo" if enough_sft and enough_pairs else "dpo" if enough_pairs and alone else "sft"
        else:
            wanted = asked
        if wanted == "dpo":
            if enough_pairs:
                return wanted, None
            return wanted, (f"{ds.n_pairs} preference pairs, the {self.info.name} backend needs at least {least}"
                            if ds.n_pairs else "no preference pairs")
        if enough_sft:
            return wanted, None
        return wanted, (f"{ds.n_examples} examples, the {self.info.name} backend needs at least "
                        f"{self.info.min_training_examples}" if ds.n_examples else "no training examples")

    def evaluate(self, society: str, iteration: int, outcomes: list[DebateOutcome], models: Society,
                 task: Task | None = None) -> None:
        task = task or self.task
        for row in evaluate(self.run_row.id, society, iteration, outcomes, task, self.config.seed):
            self.store.save_evaluation(row)
        if outcomes:
            done = self.store.diversity_metrics(self.run_row.id, task.name, society, iteration)
            self.store.save_diversity(self.diversity.measure(society, iteration, outcomes, models, task, done))

    @property
    def diversity(self) -> DiversityMeter:
        if self._diversity is None:
            self._diversity = DiversityMeter(self.config.diversity, self.backend, self.run_row.id, self.console,
                                             ledger=self.ledger)
        return self._diversity


def _combined_sha(objective: Objective, ds: DatasetRow) -> str:
    """The data a preference job trains on: the pair file's sha256 (dpo), or both files' in turn (sft-then-dpo)."""
    if objective == "dpo":
        return str(ds.pairs_sha256)
    return hashlib.sha256(f"{ds.sha256}:{ds.pairs_sha256}".encode()).hexdigest()


def _read_verified(path: Path, sha256: str) -> bytes:
    """An earlier iteration's training file, exactly as recorded: accumulating onto a changed file would train on
    data the store does not describe."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"strategy accumulate needs the earlier training file {path}, which cannot be read ({exc}): "
                        "restore it (or run with the same --workdir as before)") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"strategy accumulate needs the earlier training file {path} as it was written, but it has "
                        "changed since: restore it")
    return data
