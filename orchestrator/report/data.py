"""What `status`, `jobs list` and `report --json` show, as plain dicts: what `--json` prints and the terminal's
tables read (`orchestrator.report.terminal`). Read-only on the store."""

from __future__ import annotations

import time
from typing import Any

from orchestrator.config import RunConfig
from orchestrator.names import DebateName
from orchestrator.report.flips import flip_lines
from orchestrator.report.labels import BACKEND_SECTIONS, method_order, when_seconds
from orchestrator.report.samples import eval_debate_names
from orchestrator.societies import BASE, DISTILL, STUDENTS
from orchestrator.store import DebateTruncation, EvaluationRow, JobRow, RunRow, Store

EVENTS_SHOWN = 3  # newest events per job in the terminal
EVENTS_KEPT = 50  # newest events per job in `--json`


def _per_problem(config: RunConfig) -> int:
    """One debate's responses per problem: answers plus (in summary mode) one summary per critic turn."""
    return config.agents * config.rounds + (config.agents * (config.rounds - 1) if config.summarize else 0)


def expected_responses(config: RunConfig) -> int:
    """How many responses a finished run's society stores (the students' are counted apart, `student_progress`)."""
    evals = (config.iterations + 1) * config.eval_size
    trains = config.iterations * config.train_size
    return _per_problem(config) * (evals + trains)


def _student_debate(name: str) -> DebateName | None:
    parsed = DebateName.parse(name)
    return parsed if parsed is not None and parsed.society in STUDENTS else None


def student_progress(config: RunConfig, debates: list[DebateTruncation],
                     societies: list[tuple[str, int]]) -> dict[str, Any] | None:
    """The distilled student's and the soup's responses, stored and expected, kept out of the society's count so
    neither number outgrows the other: each student answers every held-out problem once (on its own task and on
    any it was evaluated zero-shot on), and the teacher's own debate `distill/train-L` (stored only where no
    iteration L + 1 debate could be read back) is a training debate like the society's. A student is expected
    from its stored agents or from its first debate; None for a run without one."""
    mine = [(d, parsed) for d in debates if (parsed := _student_debate(d.debate)) is not None]
    evals: set[tuple[str, int, str | None]] = {(s, level, None) for s, level in societies if s in STUDENTS}
    evals |= {(p.society, p.iteration, p.transfer) for _, p in mine if p.stage == "eval"}
    teachers = {p.iteration for _, p in mine if p.society == DISTILL and p.stage == "train"}
    evals |= {(DISTILL, level, None) for level in teachers}  # its debate begun: the student's answers will follow
    if not evals:
        return None
    return {
        "stored": sum(d.answers + d.summaries for d, _ in mine),
        "expected": len(evals) * config.eval_size + len(teachers) * _per_problem(config) * config.train_size,
        "societies": [s for s in STUDENTS if any(e[0] == s for e in evals)],
    }


def _evaluation_order(e: EvaluationRow) -> tuple[str, int, bool, str, int]:
    return e.task, e.iteration, e.society != BASE, e.society, method_order(e.method)


def runs_data(store: Store) -> list[dict[str, Any]]:
    out = []
    for run in store.list_runs():
        config = RunConfig.model_validate_json(run.config)
        out.append({
            "id": run.id, "status": run.status, "backend": run.backend, "model": run.model, "task": run.task,
            "iterations_done": run.iterations_done, "iterations": config.iterations,
            "created_at": when_seconds(run.created_at), "updated_at": when_seconds(run.updated_at),
        })
    return out


def job_elapsed(job: JobRow, now: float) -> float:
    """Seconds a job has taken: to its end once it has ended, up to `now` while it may still be going."""
    if job.finished_at is not None:
        return job.finished_at - job.created_at
    if job.status in ("pending", "queued", "running"):
        return max(0.0, now - job.created_at)
    return job.updated_at - job.created_at  # skipped, or ended before finished_at was recorded


def _job_data(store: Store, job: JobRow, now: float) -> dict[str, Any]:
    events = store.get_job_events(job.key)
    return {
        **job.model_dump(exclude={"run_id", "created_at", "updated_at", "finished_at"}),
        "elapsed_s": round(job_elapsed(job, now), 1),
        "last_event": events[-1].message if events else None,
        "events": [{"at": when_seconds(e.created_at), "level": e.level, "message": e.message}
                   for e in events[-EVENTS_KEPT:]],
        "events_total": len(events),
    }


def own_settings(config: RunConfig) -> dict[str, Any]:
    """The run's configuration with only its own backend's section: another backend's defaults say nothing about
    this run, and adding a backend to the registry must not change every report."""
    return {k: v for k, v in config.model_dump(mode="json").items()
            if k not in BACKEND_SECTIONS or k == config.backend}


def status_data(store: Store, run: RunRow, now: float | None = None) -> dict[str, Any]:
    config = RunConfig.model_validate_json(run.config)
    jobs = store.get_jobs(run.id)
    now = time.time() if now is None else now
    debates = store.truncation(run.id)
    students = student_progress(config, debates, store.societies(run.id))
    progress: dict[str, Any] = {
        "responses_stored": store.count_responses(run.id) - (students["stored"] if students else 0),
        "responses_expected": expected_responses(config),
    }
    if students is not None:
        progress["students"] = students
    return {
        "run": {
            "id": run.id, "status": run.status, "error": run.error, "iterations_done": run.iterations_done,
            "created_at": when_seconds(run.created_at), "updated_at": when_seconds(run.updated_at),
        },
        "config": own_settings(config),
        "progress": progress,
        "agents": [a.model_dump(exclude={"run_id", "created_at"}) for a in store.get_agents(run.id)],
        "jobs": [_job_data(store, j, now) for j in jobs],
        "debates": [t.model_dump() for t in debates],
    }


def flips_data(store: Store, run: RunRow) -> list[dict[str, Any]]:
    """The debates' flip rates (`orchestrator.report.flips`) by the society's stored name, in the accuracy table's
    order (iteration, the base society first, then society), so the terminal's rows line up with the accuracy
    rows above them; rates are shares of `answers`, as accuracy is a share of problems."""
    rows = []
    for line in flip_lines(store, run.id, eval_debate_names(store, run.id), run.task):
        rows.append({
            "debate": line.debate, "society": line.society_id, "iteration": line.iteration, "answers": line.answers,
            "wrong_to_right": line.wrong_to_right, "wrong_to_right_rate": line.wrong_to_right / line.answers,
            "right_to_wrong": line.right_to_wrong, "right_to_wrong_rate": line.right_to_wrong / line.answers,
        })
    return sorted(rows, key=lambda f: (f["iteration"], f["society"] != BASE, f["society"]))


def report_data(store: Store, run: RunRow, *, flips: bool = True) -> dict[str, Any]:
    """Everything `report` shows; `flips=False` leaves out the flip rates (read and graded from every evaluation
    debate's responses), for the summary at the end of `run`, which does not show them."""
    config = RunConfig.model_validate_json(run.config)
    return {
        "run": {"id": run.id, "status": run.status, "iterations_done": run.iterations_done},
        "config": own_settings(config),
        "evaluations": [
            e.model_dump(exclude={"run_id", "created_at"})
            for e in sorted(store.get_evaluations(run.id), key=_evaluation_order)
        ],
        "datasets": [
            d.model_dump(exclude={"run_id", "created_at", "problem_ids"}) for d in store.get_datasets(run.id)
        ],
        "diversity": [d.model_dump(exclude={"run_id", "created_at"}) for d in store.get_diversity(run.id)],
        "debates": [t.model_dump() for t in store.truncation(run.id)],
        "flips": flips_data(store, run) if flips else [],
    }
