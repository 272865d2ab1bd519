"""What `status`, `jobs list` and `report --json` show, as plain dicts: what `--json` prints and the terminal's
tables read (`orchestrator.report.terminal`). Read-only on the store."""

from __future__ import annotations

import time
from typing import Any

from orchestrator.config import RunConfig
from orchestrator.report.labels import BACKEND_SECTIONS, method_order, when_seconds
from orchestrator.societies import BASE
from orchestrator.store import EvaluationRow, JobRow, RunRow, Store

EVENTS_SHOWN = 3  # newest events per job in the terminal
EVENTS_KEPT = 50  # newest events per job in `--json`


def expected_responses(config: RunConfig) -> int:
    """How many responses a finished run stores: answers plus (in summary mode) one summary per critic turn."""
    per_problem = config.agents * config.rounds
    if config.summarize:
        per_problem += config.agents * (config.rounds - 1)
    evals = (config.iterations + 1) * config.eval_size
    trains = config.iterations * config.train_size
    return per_problem * (evals + trains)


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
    return {
        "run": {
            "id": run.id, "status": run.status, "error": run.error, "iterations_done": run.iterations_done,
            "created_at": when_seconds(run.created_at), "updated_at": when_seconds(run.updated_at),
        },
        "config": own_settings(config),
        "progress": {
            "responses_stored": store.count_responses(run.id),
            "responses_expected": expected_responses(config),
        },
        "agents": [a.model_dump(exclude={"run_id", "created_at"}) for a in store.get_agents(run.id)],
        "jobs": [_job_data(store, j, now) for j in jobs],
        "debates": [t.model_dump() for t in store.truncation(run.id)],
    }


def report_data(store: Store, run: RunRow) -> dict[str, Any]:
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
    }
