"""Ctrl-C that stops a run at its next safe point instead of wherever the signal lands.

The first Ctrl-C only asks: the run goes on until it has stored the response or job it is working on, then
stops with StopRequested (everything finished is kept; `--resume` continues). A second Ctrl-C stops at once.
The pipeline calls `check()` at its safe points: after each stored response, before each job, between polls.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType, TracebackType
from typing import Any


class StopRequested(Exception):
    """Ctrl-C was pressed; the run stopped at a safe point with everything finished stored."""


class GracefulStop:
    """Installs the two-step Ctrl-C handler for the duration of a `with` block (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> GracefulStop:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping at the next safe point (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise StopRequested("stopped at a safe point after Ctrl-C")


def never() -> None:
    """The checkpoint of code run without a handler (tests, the dry run)."""
