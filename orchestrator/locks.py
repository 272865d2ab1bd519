"""One process per run: a second `orchestrator run` on the same run refuses and names the one that holds it.

An OS file lock (flock) beside the database, not a row in it: the kernel drops it when its process dies, even by
SIGKILL, so a crashed run never leaves a stale lock for the user to clean up.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from foundation.errors import UserError


def lock_path(db: Path, run_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return db.resolve().parent / f".{db.name}.{safe}.lock"


class RunLock:
    def __init__(self, db: Path, run_id: str) -> None:
        self.path = lock_path(db, run_id)
        self.run_id = run_id
        self._file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise UserError(
                f"run '{self.run_id}' is already running ({holder}): wait for it to finish, or stop it, then run again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "command": " ".join(sys.argv[:3])}))
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the lock
            self._file = None


def is_held(db: Path, run_id: str) -> bool:
    """Whether a live process holds the run's lock. A run whose status says "running" while nobody holds it was
    killed (SIGKILL, power loss) before it could record how it ended.

    The probe holds a shared lock for an instant and never waits; a run started within that same instant would
    be refused as already running (and can simply be started again)."""
    try:
        handle = open(lock_path(db, run_id), encoding="utf-8")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return False  # never run in this folder, or run from elsewhere
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        handle.close()  # closing releases the probe's lock, if it got one
    return False


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"process {holder['pid']} on {holder['host']} since {since}"
    except (ValueError, KeyError, TypeError):
        return "by another process"
