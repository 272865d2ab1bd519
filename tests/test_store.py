import sqlite3

import pytest

from foundation.errors import UserError
from orchestrator.migrations import MIGRATIONS
from orchestrator.store import JobEventRow, JobRow, ResponseRow, RunRow, Store, UsageRow


def test_migrations_apply_once_and_record_names(tmp_path):
    path = tmp_path / "m.db"
    Store(path).close()
    Store(path).close()  # a second open applies nothing again
    con = sqlite3.connect(path)
    names = [r[0] for r in con.execute("select name from _migrations")]
    assert names == [m.__name__ for m in MIGRATIONS]
    tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
    assert {"runs", "problems", "agents", "responses", "debates", "datasets", "jobs", "job_events",
            "evaluations"} <= tables
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Store(path).close()
    con = sqlite3.connect(path)
    con.execute("insert into _migrations values ('m999_from_the_future', 0)")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="newer maft-orchestrator"):
        Store(path)


def test_a_file_that_is_not_a_database_is_a_user_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_text("this is not sqlite" * 100)
    with pytest.raises(UserError, match="cannot open database"):
        Store(path)


def test_rows_round_trip_and_events_deduplicate(tmp_path):
    store = Store(tmp_path / "s.db")
    store.save_run(RunRow(id="r", config="{}", backend="local", model="m", task="t"))
    store.save_response(ResponseRow(key="k", run_id="r", debate="d", problem_id="p", round=1, agent=0,
                                    kind="answer", model_id="base", messages="[]", text="hi", answer="1"))
    assert store.get_responses("r", "d")["k"].text == "hi"
    job = JobRow(key="j", run_id="r", iteration=1, agent=0, role="generator", backend="local", base_model_id="base")
    event = JobEventRow(job_key="j", created_at=1.0, message="started")
    store.save_job(job, [event])
    store.save_job(job, [event, JobEventRow(job_key="j", created_at=2.0, message="done")])
    assert [e.message for e in store.get_job_events("j")] == ["started", "done"]
    assert store.get_job("j").status == "pending"
    assert store.get_run("missing") is None


def test_m003_backfills_the_society_and_task_of_earlier_evaluations(tmp_path):
    import sqlite_utils

    from orchestrator.migrations import m001_initial, m002_costs_and_backend_state

    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    db.table("_migrations").create({"name": str, "applied_at": float}, pk="name")
    for migration in (m001_initial, m002_costs_and_backend_state):
        migration(db)
        db.table("_migrations").insert({"name": migration.__name__, "applied_at": 0})
    db.table("runs").insert({"id": "r", "config": "{}", "status": "finished", "backend": "local", "model": "m",
                             "task": "gsm8k", "iterations_done": 1, "created_at": 0, "updated_at": 0})
    for iteration in (0, 1):
        db.table("evaluations").insert({"run_id": "r", "iteration": iteration, "method": "debate", "n": 10,
                                        "correct": 5, "accuracy": 0.5, "stderr": 0.16, "unparseable": 0,
                                        "created_at": 0})
    db.close()
    store = Store(path)
    rows = {(e.iteration, e.society, e.task) for e in store.get_evaluations("r")}
    assert rows == {(0, "base", "gsm8k"), (1, "maft", "gsm8k")}
    assert store.get_diversity("r") == []


def test_a_full_disk_fails_a_whole_write_and_keeps_everything_before(tmp_path):
    """SQLite's own "database or disk is full" (the file may not grow: `PRAGMA max_page_count`): the write that
    hit it is rolled back whole (never a response without its ledger line), earlier ones stay, and once there is
    room again the same store writes on."""
    store = Store(tmp_path / "full.db")
    store.save_run(RunRow(id="r", config="{}", backend="x", model="m", task="t"))
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages + 4}")

    def save(i: int) -> None:
        store.save_response(ResponseRow(key=f"k{i}", run_id="r", debate="d", problem_id=f"p{i}", round=1, agent=0,
                                        kind="answer", model_id="m", messages="[]", text="x" * 3000),
                            UsageRow(run_id="r", stage="debate", model="m", ref=f"k{i}", billing="standard"))

    saved = 0
    with pytest.raises(sqlite3.OperationalError, match="^database or disk is full$"):
        for saved in range(1000):
            save(saved)
    assert 0 < saved < 1000 and not store.db.conn.in_transaction
    assert store.count_responses("r") == saved == len(store.get_usage("r"))
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.db.execute("PRAGMA max_page_count = 1073741823")
    save(saved)
    assert store.count_responses("r") == saved + 1 == len(store.get_usage("r"))
    store.close()
