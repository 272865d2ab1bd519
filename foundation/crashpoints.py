"""Failpoints for crash tests: `crashpoint(name)` kills this process with SIGKILL when `MAFT_CRASH_AT` names it.

A run must survive being killed at any instant (a power cut, the OOM killer, `kill -9`) and, resumed, end exactly
as if nothing had happened. Tests can only prove that by killing the real process at chosen places, so the code
marks its dangerous moments (a response stored, a job created but its id not yet recorded, a transaction about to
commit, ...) with one line each:

    crashpoint("finetune.started")

`MAFT_CRASH_AT=finetune.started` kills the process at the first hit of that point, `MAFT_CRASH_AT=store.commit#7`
at its 7th hit in this process. The kill is `SIGKILL` to ourselves: no exception, no `finally`, no atexit, no
buffered output flushed, no SQLite rollback; exactly what a power cut leaves behind.

`MAFT_RAISE_AT=name` (or `name#k`) raises `InjectedFailure` there instead: an unexpected exception, for the
tests that check that no failure of any kind reaches the user as a traceback. Its message ends with
`MAFT_RAISE_DETAIL` when set, so a test can make it carry what a real error might (a secret a proxy echoed).

The variables are read once per process, on the first call. When it is unset (always, outside tests) a crashpoint
costs a few global lookups and comparisons, and counts nothing. `MAFT_CRASH_TRACE=FILE` appends the name of every
point hit to FILE instead, so a sweep can learn how often each point is hit in a run before choosing where to kill.

This module is the one place in the code base allowed a module-level mutable counter: a failpoint's "k-th hit"
is by definition a property of the whole process (hits come from any object and any thread: the debate's
callback, the job poller's threads, every store transaction), and threading a counter through every constructor
for the sake of tests would touch code that must not know tests exist. Failpoint libraries (FreeBSD's `fail(9)`,
TiKV's `fail-rs`) keep their state globally for the same reason.
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "MAFT_CRASH_AT"
RAISE_VAR = "MAFT_RAISE_AT"  # raise InjectedFailure at that point instead of dying
DETAIL_VAR = "MAFT_RAISE_DETAIL"  # text the injected failure's message ends with
TRACE_VAR = "MAFT_CRASH_TRACE"  # a file: every point hit is appended to it, one name a line (to plan a sweep)

_target: tuple[str, int] | None = None  # (point name, hit that kills); None when disarmed
_raise_at: tuple[str, int] | None = None  # (point name, hit that raises)
_read = False  # whether the environment was read (once per process)
_trace: str | None = None
_hits: dict[str, int] = {}  # hits of the armed point only: nothing is counted when disarmed
_raise_hits: dict[str, int] = {}
_lock = threading.Lock()  # points are hit from worker threads too (job polling)


def parse(spec: str | None) -> tuple[str, int] | None:
    """`name` or `name#k` (k >= 1) as (name, k); None for an empty spec. A malformed k is an error, not a
    silently disarmed crash test."""
    spec = (spec or "").strip()
    if not spec:
        return None
    name, sep, count = spec.rpartition("#")
    if not sep:
        return spec, 1
    if not name or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{ENV_VAR}={spec!r}: expected NAME or NAME#K with K >= 1")
    return name, int(count)


class InjectedFailure(RuntimeError):
    """The unexpected exception `MAFT_RAISE_AT` asks for."""


def arm(spec: str | None, *, raise_at: str | None = None) -> None:
    """Set (or with None clear) the crash and raise targets of this process and reset their hit counts; reads no
    environment. For tests of this module; a run is armed through the environment."""
    global _target, _raise_at, _read, _trace
    with _lock:
        _target, _raise_at, _trace, _read = parse(spec), parse(raise_at), None, True
        _hits.clear()
        _raise_hits.clear()


def _due(target: tuple[str, int] | None, name: str, counts: dict[str, int]) -> bool:
    """Count a hit of the armed point `name`; True at its k-th."""
    if target is None or name != target[0]:
        return False
    with _lock:
        counts[name] = counts.get(name, 0) + 1
        return counts[name] == target[1]


def crashpoint(name: str) -> None:
    """Die here, by SIGKILL, if `MAFT_CRASH_AT` names this point (and this is its k-th hit); raise
    InjectedFailure if `MAFT_RAISE_AT` does."""
    global _target, _raise_at, _read, _trace
    if not _read:
        with _lock:
            if not _read:
                _target, _raise_at = parse(os.environ.get(ENV_VAR)), parse(os.environ.get(RAISE_VAR))
                _trace, _read = os.environ.get(TRACE_VAR) or None, True
    if _trace is not None:
        with _lock, open(_trace, "a", encoding="utf-8") as trace:
            trace.write(name + "\n")
    if _due(_target, name, _hits):
        os.kill(os.getpid(), signal.SIGKILL)
    if _due(_raise_at, name, _raise_hits):
        detail = os.environ.get(DETAIL_VAR)
        raise InjectedFailure(f"failure injected at {name} ({RAISE_VAR})" + (f": {detail}" if detail else ""))


def hits(name: str) -> int:
    """How often the armed point was hit in this process (0 for any other point)."""
    with _lock:
        return _hits.get(name, 0)
