"""Named schema migrations, applied once each and recorded in `_migrations` (the pattern of simonw/llm).

Never edit a migration that has shipped: add a new one. A database that records a migration this code does not
know was written by a newer version, and is refused rather than silently misread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlite_utils

from foundation.errors import UserError

Migration = Callable[[sqlite_utils.Database], None]


def m001_initial(db: sqlite_utils.Database) -> None:
    db.table("runs").create(
        {
            "id": str,
            "config": str,
            "status": str,
            "backend": str,
            "model": str,
            "task": str,
            "iterations_done": int,
            "created_at": float,
            "updated_at": float,
            "error": str,
        },
        pk="id",
    )
    db.table("problems").create(
        {"run_id": str, "split": str, "position": int, "problem_id": str, "question": str, "answer": str},
        pk=("run_id", "split", "problem_id"),
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("agents").create(
        {
            "run_id": str,
            "iteration": int,
            "agent": int,
            "role": str,
            "model_id": str,
            "parent_model_id": str,
            "job_key": str,
            "created_at": float,
        },
        pk=("run_id", "iteration", "agent", "role"),
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("responses").create(
        {
            "key": str,
            "run_id": str,
            "debate": str,
            "problem_id": str,
            "round": int,
            "agent": int,
            "kind": str,
            "model_id": str,
            "messages": str,
            "text": str,
            "answer": str,
            "finish_reason": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "cached_tokens": int,
            "created_at": float,
        },
        pk="key",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("responses").create_index(["run_id", "debate"])
    db.table("debates").create(
        {
            "run_id": str,
            "debate": str,
            "problem_id": str,
            "final_answer": str,
            "correct": int,
            "votes": str,
            "consensus": float,
            "created_at": float,
        },
        pk=("run_id", "debate", "problem_id"),
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("datasets").create(
        {
            "run_id": str,
            "iteration": int,
            "agent": int,
            "role": str,
            "path": str,
            "sha256": str,
            "n_examples": int,
            "n_generation": int,
            "n_critic_neg": int,
            "n_critic_pos": int,
            "n_critic_neg_available": int,
            "n_critic_pos_available": int,
            "problem_ids": str,
            "created_at": float,
        },
        pk=("run_id", "iteration", "agent", "role"),
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("jobs").create(
        {
            "key": str,
            "run_id": str,
            "iteration": int,
            "agent": int,
            "role": str,
            "backend": str,
            "provider_job_id": str,
            "base_model_id": str,
            "dataset_sha256": str,
            "status": str,
            "model_id": str,
            "train_loss": float,
            "trained_tokens": int,
            "error": str,
            "created_at": float,
            "updated_at": float,
            "finished_at": float,
        },
        pk="key",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("jobs").create_index(["run_id", "iteration"])
    db.table("job_events").create(
        {"job_key": str, "created_at": float, "level": str, "message": str},
        pk=("job_key", "created_at", "message"),
        foreign_keys=[("job_key", "jobs", "key")],
    )
    db.table("evaluations").create(
        {
            "run_id": str,
            "iteration": int,
            "method": str,
            "n": int,
            "correct": int,
            "accuracy": float,
            "stderr": float,
            "unparseable": int,
            "created_at": float,
        },
        pk=("run_id", "iteration", "method"),
        foreign_keys=[("run_id", "runs", "id")],
    )


def m002_costs_and_backend_state(db: sqlite_utils.Database) -> None:
    """The cost ledger, a backend's durable memory, and job attempts (a failed job is retried as a new one)."""
    db.table("usage").create(
        {
            "id": int,
            "run_id": str,
            "stage": str,  # debate | summary | training
            "debate": str,
            "iteration": int,
            "agent": int,
            "role": str,
            "model": str,
            "ref": str,  # the response key or job key this line pays for
            "billing": str,  # standard | batch | training
            "prompt_tokens": int,
            "cached_tokens": int,
            "completion_tokens": int,
            "trained_tokens": int,
            "cost_usd": float,
            "estimated": int,  # 1 while only an estimate (a job not yet billed)
            "price_source": str,
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("usage").create_index(["run_id"])
    db.table("usage").create_index(["ref", "billing"], unique=True)
    db.table("backend_state").create({"key": str, "value": str, "updated_at": float}, pk="key")
    db.table("jobs").add_column("attempt", int, not_null_default=1)


def m003_societies_tasks_and_diversity(db: sqlite_utils.Database) -> None:
    """Evaluations name the society evaluated (base, maft, a baseline or ablation) and the task (zero-shot
    transfer evaluates on another task than the run trained on); diversity metrics get their own table."""
    evaluations = db.table("evaluations")
    evaluations.add_column("society", str, not_null_default="maft")
    evaluations.add_column("task", str, not_null_default="")
    db.execute("update evaluations set society = 'base' where iteration = 0")
    db.execute("update evaluations set task = (select task from runs where runs.id = evaluations.run_id)")
    evaluations.transform(pk=("run_id", "task", "society", "iteration", "method"))
    db.table("diversity").create(
        {
            "run_id": str,
            "task": str,
            "society": str,
            "iteration": int,
            "metric": str,  # consensus | embedding_dissimilarity | critic_nll
            "value": float,
            "n": int,
            "detail": str,  # how it was measured (embedding model, held-out critic)
            "created_at": float,
        },
        pk=("run_id", "task", "society", "iteration", "metric"),
        foreign_keys=[("run_id", "runs", "id")],
    )


def m004_societies_of_models_and_request_hashes(db: sqlite_utils.Database) -> None:
    """Baselines and ablations train their own models: agents, datasets and jobs name their society. Responses
    keep a hash of the exact request, so an identical request anywhere in the run is answered from the store."""
    db.table("agents").add_column("society", str, not_null_default="maft")
    db.table("agents").transform(pk=("run_id", "society", "iteration", "agent", "role"))
    db.table("datasets").add_column("society", str, not_null_default="maft")
    db.table("datasets").transform(pk=("run_id", "society", "iteration", "agent", "role"))
    db.table("jobs").add_column("society", str, not_null_default="maft")
    db.table("responses").add_column("request_hash", str)
    db.table("responses").create_index(["run_id", "request_hash"])


def m005_training_estimates(db: sqlite_utils.Database) -> None:
    """A finetune's ledger line keeps its estimate (tokens, dollars) when the bill replaces the rest of it."""
    db.table("usage").add_column("estimated_tokens", int)
    db.table("usage").add_column("estimated_usd", float)
    db.execute("update usage set estimated_tokens = trained_tokens, estimated_usd = cost_usd where estimated = 1")


def m006_job_provider_status(db: sqlite_utils.Database) -> None:
    """Jobs keep the provider's own status (validating_files, paused, compressing, ...) beside ours, which folds
    several of the provider's into one."""
    db.table("jobs").add_column("provider_status", str)


def m007_truncated_answers(db: sqlite_utils.Database) -> None:
    """Evaluations count how many of their unanswered problems are unanswered because a reply was cut at
    max_tokens (a cut reply counts as no answer). Earlier rows did not tell: 0."""
    db.table("evaluations").add_column("truncated", int, not_null_default=0)


def m008_dataset_too_long(db: sqlite_utils.Database) -> None:
    """Datasets count the examples dropped as longer than the trainer's max_length (which would have cut their
    learned answer). Earlier sets were not checked: 0."""
    db.table("datasets").add_column("n_too_long", int, not_null_default=0)


def m009_single_agent_answers(db: sqlite_utils.Database) -> None:
    """The single-agent row grades every agent's round-1 answer, not agent 1's only: it says how many answers it
    graded. Earlier rows graded one per problem: null, read as n."""
    db.table("evaluations").add_column("answers", int)


def m010_dataset_preference_pairs(db: sqlite_utils.Database) -> None:
    """Datasets of a run with a preference objective (dpo, sft-then-dpo) record their pair file and its pair
    counts per kind; SFT sets, and every earlier one: null."""
    for column, kind in (("pairs_path", str), ("pairs_sha256", str), ("n_pairs", int), ("n_pairs_generator", int),
                         ("n_pairs_correction", int), ("n_pairs_anti_sycophancy", int), ("pairs_weight", float)):
        db.table("datasets").add_column(column, kind)


MIGRATIONS: list[Migration] = [
    m001_initial,
    m002_costs_and_backend_state,
    m003_societies_tasks_and_diversity,
    m004_societies_of_models_and_request_hashes,
    m005_training_estimates,
    m006_job_provider_status,
    m007_truncated_answers,
    m008_dataset_too_long,
    m009_single_agent_answers,
    m010_dataset_preference_pairs,
]


def migrate(db: sqlite_utils.Database) -> None:
    """Apply every migration not yet recorded, each in its own transaction."""
    if not db["_migrations"].exists():
        db.table("_migrations").create({"name": str, "applied_at": float}, pk="name")
    applied = {row["name"] for row in db["_migrations"].rows}
    known = {m.__name__ for m in MIGRATIONS}
    unknown = sorted(applied - known)
    if unknown:
        raise UserError(
            f"database {db.conn.execute('PRAGMA database_list').fetchone()[2]} was written by a newer "
            f"maft-orchestrator (migration {unknown[-1]}): upgrade with `pip install -U maft-orchestrator` "
            "or use another --db"
        )
    for migration in MIGRATIONS:
        if migration.__name__ in applied:
            continue
        with db.atomic():
            migration(db)
            db.table("_migrations").insert({"name": migration.__name__, "applied_at": time.time()})
