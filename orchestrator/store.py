"""The SQLite store: every step of a run writes here before the next begins, and a resumed run reads it back.

Rows cross this boundary as pydantic models, so the rest of the code never sees a raw dict from SQL. The file
is plain SQLite (WAL mode) that users can open with `sqlite-utils` or Datasette.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import sqlite_utils
from pydantic import BaseModel, Field

from foundation.added_later import OmitsAddedDefaults, added_later
from foundation.crashpoints import crashpoint
from foundation.errors import UserError
from orchestrator.migrations import migrate
from orchestrator.societies import MAFT

RowT = TypeVar("RowT", bound=BaseModel)
BUSY_TIMEOUT_MS = 30_000  # writers wait for each other this long before SQLite says "database is locked"


def _now() -> float:
    return time.time()


# every status a run is given: created (recorded, nothing run yet), running (a process was working on it; see
# locks.is_held for whether one still is), interrupted (Ctrl-C or a signal), failed (an error, in `error`), finished
RunStatus = Literal["created", "running", "interrupted", "failed", "finished"]


class RunRow(BaseModel):
    id: str
    config: str  # the RunConfig as JSON
    status: RunStatus = "created"
    backend: str
    model: str
    task: str
    iterations_done: int = 0
    created_at: float = Field(default_factory=_now)
    updated_at: float = Field(default_factory=_now)
    error: str | None = None


class ProblemRow(BaseModel):
    run_id: str
    split: str  # train | eval
    position: int
    problem_id: str
    question: str
    answer: str


class AgentRow(BaseModel):
    """Which model plays agent `agent` in `role` at `iteration` (0 = the base model) in a society."""

    run_id: str
    society: str = MAFT
    iteration: int
    agent: int
    role: str  # generator | critic
    model_id: str
    parent_model_id: str | None = None
    job_key: str | None = None
    created_at: float = Field(default_factory=_now)


class ResponseRow(BaseModel):
    key: str
    run_id: str
    debate: str
    problem_id: str
    round: int
    agent: int
    kind: str  # answer | summary
    model_id: str
    messages: str  # the prompt conversation as JSON
    text: str
    answer: str | None = None
    request_hash: str | None = None  # the exact request (model, messages, sampling, seed): reused if asked again
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    created_at: float = Field(default_factory=_now)


class DebateRow(BaseModel):
    run_id: str
    debate: str
    problem_id: str
    final_answer: str | None
    correct: int | None  # ground truth is looked at only for evaluation
    votes: str  # JSON: the parsed final-round answer of each agent
    consensus: float
    created_at: float = Field(default_factory=_now)


class DatasetRow(OmitsAddedDefaults):
    run_id: str
    society: str = MAFT
    iteration: int
    agent: int
    role: str
    path: str
    sha256: str
    n_examples: int
    n_generation: int = 0
    n_critic_neg: int = 0
    n_critic_pos: int = 0
    n_critic_neg_available: int = 0
    n_critic_pos_available: int = 0
    problem_ids: str = "[]"
    n_too_long: int = 0  # examples dropped as longer than max_length (never trained on cut)
    created_at: float = Field(default_factory=_now)
    # preference pairs (objective dpo / sft-then-dpo; None: none were built), `orchestrator.preference`
    pairs_path: str | None = added_later(None)
    pairs_sha256: str | None = added_later(None)
    n_pairs: int | None = added_later(None)
    n_pairs_generator: int | None = added_later(None)
    n_pairs_correction: int | None = added_later(None)
    n_pairs_anti_sycophancy: int | None = added_later(None)
    pairs_weight: float | None = added_later(None)  # summed vote-margin weights: the pairs' effective size


class JobRow(BaseModel):
    key: str
    run_id: str
    society: str = MAFT
    iteration: int
    agent: int
    role: str
    backend: str
    provider_job_id: str | None = None
    base_model_id: str
    dataset_sha256: str | None = None
    status: str = "pending"  # pending | queued | running | succeeded | failed | cancelled | skipped
    provider_status: str | None = None  # the provider's own status, as last polled (validating_files, paused, ...)
    attempt: int = 1  # a failed job is retried as attempt 2, 3, ... under a new idempotency key
    model_id: str | None = None
    train_loss: float | None = None
    trained_tokens: int | None = None
    error: str | None = None
    created_at: float = Field(default_factory=_now)
    updated_at: float = Field(default_factory=_now)
    finished_at: float | None = None


class JobEventRow(BaseModel):
    job_key: str
    created_at: float
    level: str = "info"
    message: str


class DiversityRow(BaseModel):
    """How different a society's agents are from each other at one iteration."""

    run_id: str
    task: str
    society: str
    iteration: int
    metric: str  # consensus | embedding_dissimilarity | critic_nll
    value: float
    n: int
    detail: str | None = None
    created_at: float = Field(default_factory=_now)


class UsageRow(BaseModel):
    """One line of the cost ledger: what one response or one finetune cost, and which price said so."""

    id: int | None = None
    run_id: str
    stage: str  # debate | evaluation | training | diversity
    debate: str | None = None
    iteration: int | None = None
    agent: int | None = None
    role: str | None = None
    model: str
    ref: str  # the response key or job key paid for; (ref, billing) is unique, so nothing is counted twice
    billing: str  # standard | batch | training | embedding
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    trained_tokens: int = 0
    cost_usd: float = 0.0
    estimated: int = 0
    price_source: str | None = None
    created_at: float = Field(default_factory=_now)
    # a finetune's estimate before it ran, kept when its bill replaces the rest of the line
    estimated_tokens: int | None = None
    estimated_usd: float | None = None


class EvaluationRow(BaseModel):
    """Accuracy of one way of answering (`method`: single | majority | debate) by one society on one task."""

    run_id: str
    task: str
    society: str  # base | maft | a baseline (star, majority-ft, single-ft) | an ablation (no-summary, no-critic)
    iteration: int
    method: str
    n: int
    correct: int
    accuracy: float
    stderr: float
    unparseable: int
    truncated: int = 0  # of the unparseable: no answer because a reply was cut at max_tokens
    answers: int | None = None  # answers graded (`correct` and `unparseable` count them): N per problem for a
    # single agent (all N round-1 answers, accuracy the mean per-problem share), else None: one per problem
    created_at: float = Field(default_factory=_now)


class DebateTruncation(BaseModel):
    """How many of one debate's replies stopped at max_tokens: cut answers count as no answer; cut summaries are
    still shown to the critics, as they are."""

    debate: str
    answers: int
    answers_cut: int
    summaries: int
    summaries_cut: int


_PKS: dict[str, str | tuple[str, ...]] = {
    "runs": "id",
    "problems": ("run_id", "split", "problem_id"),
    "agents": ("run_id", "society", "iteration", "agent", "role"),
    "responses": "key",
    "debates": ("run_id", "debate", "problem_id"),
    "datasets": ("run_id", "society", "iteration", "agent", "role"),
    "jobs": "key",
    "job_events": ("job_key", "created_at", "message"),
    "evaluations": ("run_id", "task", "society", "iteration", "method"),
    "diversity": ("run_id", "task", "society", "iteration", "metric"),
    "backend_state": "key",
}


class StoreState:
    """The store as a backend's durable memory (backends.base.BackendState), namespaced by backend name.

    Backends call it from worker threads (jobs are polled concurrently), and a SQLite connection belongs to
    the thread that opened it, so each thread gets its own connection to the same file; WAL mode and the busy
    timeout let them write one after another without `database is locked`.
    """

    def __init__(self, store: Store, namespace: str) -> None:
        self.path = store.path
        self.namespace = namespace
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self._local.conn = conn
        return conn

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._conn().execute("select value from backend_state where key = ?",
                                   [f"{self.namespace}:{key}"]).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")  # take the write lock up front: no stale-snapshot SQLITE_BUSY later
        try:
            conn.execute(
                "insert into backend_state (key, value, updated_at) values (?, ?, ?) on conflict(key) do update "
                "set value = excluded.value, updated_at = excluded.updated_at",
                [f"{self.namespace}:{key}", json.dumps(value, sort_keys=True), _now()],
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        crashpoint("store.state_commit")  # a backend's record written, not committed
        conn.execute("COMMIT")


class Store:
    """One SQLite file. Each public write is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.parent and not path.parent.exists():
            raise UserError(f"cannot create database {path}: folder {path.parent} does not exist; create it first")
        try:
            self.db = sqlite_utils.Database(path)
            self.db.enable_wal()
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db.execute("PRAGMA foreign_keys = ON")
        except Exception as exc:  # sqlite3.DatabaseError: not a database, unreadable file, ...
            raise UserError(f"cannot open database {path}: {exc}; point --db at a maft database or a new file") \
                from None
        migrate(self.db)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction. BEGIN IMMEDIATE takes the write lock before reading anything: in WAL mode a
        deferred transaction that read first fails at once with "database is locked" if another connection
        (a backend's worker thread) wrote in between."""
        if self.db.conn.in_transaction:
            with self.db.atomic():  # nested: a savepoint
                yield
            return
        self.db.conn.execute("BEGIN IMMEDIATE")
        try:
            with self.db.atomic():
                yield
        except BaseException:
            self.db.conn.rollback()
            raise
        crashpoint("store.commit")  # written, not committed: a resumed run must find none of it
        self.db.conn.commit()

    # generic helpers -------------------------------------------------------------------------------------

    def _upsert(self, table: str, rows: Iterable[BaseModel]) -> None:
        records = [r.model_dump() for r in rows]
        if records:
            self.db.table(table).upsert_all(records, pk=_PKS[table])

    def _select(self, table: str, cls: type[RowT], where: str | None = None, args: Any = None,
                order_by: str | None = None) -> list[RowT]:
        return [cls.model_validate(r) for r in self.db[table].rows_where(where, args, order_by=order_by)]

    def _run_rows(self, table: str, cls: type[RowT], run_id: str, **filters: Any) -> list[RowT]:
        """A run's rows of a per-agent table, filtered by every filter that is not None."""
        given = {k: v for k, v in filters.items() if v is not None}
        where = " and ".join(["run_id = ?", *(f"{k} = ?" for k in given)])
        return self._select(table, cls, where, [run_id, *given.values()], "society, iteration, agent, role")

    # runs ------------------------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRow | None:
        rows = self._select("runs", RunRow, "id = ?", [run_id])
        return rows[0] if rows else None

    def require_run(self, run_id: str) -> RunRow:
        run = self.get_run(run_id)
        if run is None:
            raise UserError(f"run '{run_id}' is not in {self.path}: `orchestrator status --db {self.path}` lists runs")
        return run

    def list_runs(self) -> list[RunRow]:
        return self._select("runs", RunRow, order_by="created_at")

    def save_run(self, run: RunRow) -> None:
        run.updated_at = _now()
        with self.transaction():
            self._upsert("runs", [run])

    # problems --------------------------------------------------------------------------------------------

    def save_problems(self, rows: list[ProblemRow]) -> None:
        with self.transaction():
            self._upsert("problems", rows)

    def get_problems(self, run_id: str, split: str) -> list[ProblemRow]:
        return self._select("problems", ProblemRow, "run_id = ? and split = ?", [run_id, split], "position")

    # agents ----------------------------------------------------------------------------------------------

    def save_agents(self, rows: list[AgentRow]) -> None:
        with self.transaction():
            self._upsert("agents", rows)

    def get_agents(self, run_id: str, iteration: int | None = None, society: str | None = MAFT) -> list[AgentRow]:
        """The agents of one society (all societies with `society=None`), of one iteration or all."""
        return self._run_rows("agents", AgentRow, run_id, society=society, iteration=iteration)

    def societies(self, run_id: str) -> list[tuple[str, int]]:
        """Every (society, iteration) with stored agents, in the order they were made."""
        rows = self.db.execute(
            "select society, iteration from agents where run_id = ? group by society, iteration "
            "order by min(created_at)", [run_id]).fetchall()
        return [(str(r[0]), int(r[1])) for r in rows]

    # responses -------------------------------------------------------------------------------------------

    def save_response(self, row: ResponseRow, usage: UsageRow | None = None) -> None:
        """A response and its ledger line together: never a paid answer without its cost, nor the reverse."""
        with self.transaction():
            self._upsert("responses", [row])
            if usage is not None:
                self.db.table("usage").insert(usage.model_dump(exclude={"id"}), replace=True)

    def get_responses(self, run_id: str, debate: str) -> dict[str, ResponseRow]:
        rows = self._select("responses", ResponseRow, "run_id = ? and debate = ?", [run_id, debate])
        return {r.key: r for r in rows}

    def find_response(self, run_id: str, request_hash: str) -> ResponseRow | None:
        """A response to exactly this request, given anywhere in the run (another debate, a baseline)."""
        rows = self._select("responses", ResponseRow, "run_id = ? and request_hash = ?", [run_id, request_hash])
        return rows[0] if rows else None

    def count_responses(self, run_id: str) -> int:
        return self.db["responses"].count_where("run_id = ?", [run_id])

    def truncation(self, run_id: str) -> list[DebateTruncation]:
        """Per debate, in the order the debates began: replies, and those cut at max_tokens."""
        rows = self.db.execute(
            "select debate, sum(kind != 'summary'), sum(kind != 'summary' and finish_reason = 'length'), "
            "sum(kind = 'summary'), sum(kind = 'summary' and finish_reason = 'length') from responses "
            "where run_id = ? group by debate order by min(created_at), debate", [run_id]).fetchall()
        return [DebateTruncation(debate=r[0], answers=r[1], answers_cut=r[2], summaries=r[3], summaries_cut=r[4])
                for r in rows]

    # debates ---------------------------------------------------------------------------------------------

    def save_debates(self, rows: list[DebateRow]) -> None:
        with self.transaction():
            self._upsert("debates", rows)

    def get_debates(self, run_id: str, debate: str) -> list[DebateRow]:
        return self._select("debates", DebateRow, "run_id = ? and debate = ?", [run_id, debate])

    def debate_names(self, run_id: str) -> list[str]:
        """The names of a run's debates that have stored outcomes, in name order."""
        rows = self.db.execute("select distinct debate from debates where run_id = ? order by debate",
                               [run_id]).fetchall()
        return [str(r[0]) for r in rows]

    # datasets --------------------------------------------------------------------------------------------

    def save_datasets(self, rows: list[DatasetRow]) -> None:
        with self.transaction():
            self._upsert("datasets", rows)

    def get_datasets(self, run_id: str, iteration: int | None = None, society: str | None = None) -> list[DatasetRow]:
        return self._run_rows("datasets", DatasetRow, run_id, society=society, iteration=iteration)

    # jobs ------------------------------------------------------------------------------------------------

    def save_job(self, job: JobRow, events: Iterable[JobEventRow] = ()) -> None:
        job.updated_at = _now()
        with self.transaction():
            self._upsert("jobs", [job])
            self._upsert("job_events", events)

    def get_job(self, key: str) -> JobRow | None:
        rows = self._select("jobs", JobRow, "key = ?", [key])
        return rows[0] if rows else None

    def get_jobs(self, run_id: str) -> list[JobRow]:
        return self._select("jobs", JobRow, "run_id = ?", [run_id], "iteration, agent, role")

    def get_job_events(self, job_key: str) -> list[JobEventRow]:
        return self._select("job_events", JobEventRow, "job_key = ?", [job_key], "created_at")

    # cost ledger -----------------------------------------------------------------------------------------

    def record_usage(self, rows: Iterable[UsageRow]) -> None:
        """Append ledger lines; a line for the same (ref, billing) replaces the earlier one (an estimate
        replaced by the bill, or a retried write after a crash); a line without an estimate keeps the earlier
        line's `estimated_tokens` / `estimated_usd`."""
        records = [r.model_dump(exclude={"id"}) for r in rows]
        if records:
            with self.transaction():
                for record in records:
                    if record["billing"] == "training" and record["estimated_tokens"] is None:  # a finetune's bill
                        earlier = self.db.execute(
                            "select estimated_tokens, estimated_usd from usage where ref = ? and billing = ?",
                            [record["ref"], record["billing"]]).fetchone()
                        if earlier is not None:
                            record["estimated_tokens"], record["estimated_usd"] = earlier
                self.db.table("usage").insert_all(records, replace=True)

    def get_usage(self, run_id: str) -> list[UsageRow]:
        return self._select("usage", UsageRow, "run_id = ?", [run_id], "id")

    def total_cost(self, run_id: str) -> float:
        row = self.db.execute("select coalesce(sum(cost_usd), 0) from usage where run_id = ?", [run_id]).fetchone()
        return float(row[0])

    # evaluations -----------------------------------------------------------------------------------------

    def save_evaluation(self, row: EvaluationRow) -> None:
        with self.transaction():
            self._upsert("evaluations", [row])

    def get_evaluations(self, run_id: str) -> list[EvaluationRow]:
        return self._select("evaluations", EvaluationRow, "run_id = ?", [run_id], "task, society, iteration, method")

    def save_diversity(self, rows: list[DiversityRow]) -> None:
        with self.transaction():
            self._upsert("diversity", rows)

    def diversity_metrics(self, run_id: str, task: str, society: str, iteration: int) -> set[str]:
        """The diversity metrics already stored for one evaluation."""
        rows = self.db.execute("select metric from diversity where run_id = ? and task = ? and society = ? and "
                               "iteration = ?", [run_id, task, society, iteration]).fetchall()
        return {r[0] for r in rows}

    def get_diversity(self, run_id: str) -> list[DiversityRow]:
        return self._select("diversity", DiversityRow, "run_id = ?", [run_id], "task, society, iteration, metric")
