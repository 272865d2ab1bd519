"""Never paying twice: durable records in `BackendState` that keep uploads and jobs idempotent across crashes.

What is about to be paid for is recorded before the remote call, its id after; a job (or upload) created just
before a crash is looked for on the server instead of being created twice. Job events are handed over at least
once and, barring a crash, exactly once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from backends.base import BackendState
from foundation.crashpoints import crashpoint


def upload_once(
    state: BackendState,
    sha256: str,
    *,
    exists: Callable[[str], bool],
    upload: Callable[[], str],
    filename: str,
    nbytes: int,
    find: Callable[[], str | None] | None = None,
) -> str:
    """The id of an uploaded copy of this content (`file:<sha256>` in state): reused when the server still has it,
    else uploaded (again) and recorded.

    The intent is recorded before the upload and the id after it, like a job's: a process killed between the
    two leaves an "uploading" record, and the next call first asks `find` (the provider's file list, searched
    for this name and size) for the copy that upload may have left on the server, instead of paying for the
    storage and the transfer twice. Without `find` an interrupted upload is simply done again."""
    key = f"file:{sha256}"
    known = state.get(key) or {}
    if known.get("file_id") and exists(str(known["file_id"])):
        return str(known["file_id"])  # else deleted on the server: upload again
    file_id = find() if find is not None and known.get("status") == "uploading" else None
    if file_id is None:
        state.put(key, {"status": "uploading", "filename": filename, "bytes": nbytes})
        file_id = upload()
        crashpoint("hosted.file_uploaded")  # the server has the file; our record does not
    state.put(key, {"status": "uploaded", "file_id": file_id, "filename": filename, "bytes": nbytes})
    return file_id


class JobRecord(BaseModel):
    """What BackendState holds under `job:<key>`: the intent before the create call, the job id after."""

    status: Literal["creating", "created"]
    maft_key: str
    file_id: str
    job_id: str | None = None


@dataclass(frozen=True)
class PreparedJob:
    """A job ready to be created: its uploaded file, the marker it carries on the server (metadata, suffix),
    how to find it there (a live job for this key and data), and how to create it."""

    file_id: str
    maft_key: str
    find: Callable[[], str | None]
    create: Callable[[], str]


def start_once(
    state: BackendState,
    key: str,
    *,
    alive: Callable[[str], bool],
    prepare: Callable[[], PreparedJob],
) -> str:
    """The provider's job id for idempotency key `key`, creating the job only if no earlier call did.

    A recorded job that still exists is returned as is; otherwise the job is prepared (file checked and
    uploaded), looked for on the server (created by a start that crashed before recording the id), and only
    then created, with the intent recorded before the call and the id after it.
    """
    record_key = f"job:{key}"
    stored = state.get(record_key) or {}
    if stored.get("job_id") and alive(str(stored["job_id"])):
        return str(stored["job_id"])  # else gone from the server: create it again
    job = prepare()
    found = job.find()
    if found is None:
        state.put(record_key, JobRecord(status="creating", maft_key=job.maft_key, file_id=job.file_id).model_dump())
        crashpoint("hosted.job_creating")  # the intent is recorded, the job not yet created
        found = job.create()
        crashpoint("hosted.job_created")  # the server has the job; our record does not have its id
    state.put(record_key, JobRecord(status="created", maft_key=job.maft_key, file_id=job.file_id,
                                    job_id=found).model_dump())
    return found


SEEN_EVENTS_KEPT = 200  # event ids remembered per job to de-duplicate across polls


class EventsRecord(BaseModel):
    """Under `events:<job id>`: the newest event ids already returned, and the last training loss seen."""

    seen: list[str] = []
    train_loss: float | None = None

    @classmethod
    def load(cls, state: BackendState, job_id: str) -> EventsRecord:
        return cls.model_validate(state.get(f"events:{job_id}") or {})

    def remember(self, state: BackendState, job_id: str, ids: Iterable[str], train_loss: float | None, *,
                 keep: int = SEEN_EVENTS_KEPT) -> None:
        """Add the ids just returned (keeping the newest `keep`) and the latest loss, durably."""
        seen = [*self.seen, *ids][-keep:]
        state.put(f"events:{job_id}", EventsRecord(seen=seen, train_loss=train_loss).model_dump())


class EventCursor:
    """Which events of each job were handed to the caller: every event is returned by a poll at least once,
    and, barring a crash, exactly once.

    The caller stores a poll's events (with the job's row) before it polls that job again, so an event id becomes
    durably "seen" (`EventsRecord`) only at the next poll of its job in this process; until then it is seen in
    memory only. Recording it at once would lose it for good when the process dies between the poll and the
    caller's commit (kill -9, a power cut, a full disk): a resumed run would skip it as seen. Handed over again
    instead, it is stored once (job_events is keyed by job, time and message)."""

    def __init__(self, state: BackendState) -> None:
        self.state = state
        self._handed: dict[str, list[str]] = {}  # job id -> ids returned by its last poll in this process
        self._lock = threading.Lock()  # jobs are polled from several threads (one job by one thread at a time)

    def load(self, job_id: str) -> tuple[EventsRecord, set[str]]:
        """The durable record, and every id not to return again (recorded, or handed over by this process)."""
        record = EventsRecord.load(self.state, job_id)
        with self._lock:
            handed = self._handed.get(job_id, [])
        return record, {*record.seen, *handed}

    def hand_over(self, job_id: str, record: EventsRecord, ids: Iterable[str], train_loss: float | None, *,
                  keep: int = SEEN_EVENTS_KEPT) -> None:
        """`ids` are being returned now; those the previous poll returned are stored by now: record them."""
        with self._lock:
            stored = self._handed.get(job_id, [])
            self._handed[job_id] = list(ids)
        record.remember(self.state, job_id, stored, train_loss, keep=keep)


