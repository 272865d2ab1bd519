"""A run's status is one of the five the pipeline and the store write, "interrupted" among them."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError

from orchestrator.store import RunRow, RunStatus, Store


def test_every_status_a_run_is_given_round_trips_and_no_other_is_accepted(tmp_path):
    assert set(get_args(RunStatus)) == {"created", "running", "interrupted", "failed", "finished"}
    store = Store(tmp_path / "s.db")
    try:
        for status in get_args(RunStatus):
            store.save_run(RunRow(id=status, config="{}", status=status, backend="local", model="m", task="t"))
            assert store.require_run(status).status == status
    finally:
        store.close()
    with pytest.raises(ValidationError, match="status"):
        RunRow(id="r", config="{}", status="paused", backend="local", model="m", task="t")
