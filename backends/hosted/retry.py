"""The one retry layer of the hosted backends (every SDK client is built with `max_retries=0`, so a retry budget
means what it says).

A request that meets a transient fault (429, 5xx, a timeout, a dropped connection) is tried again after a backoff:
first `max_retries` times quickly (exponential from `Backoff.initial`, or the server's Retry-After), then, put
back, again and again at `Backoff.maximum` while the other requests go on. Nothing gives up on one request while
the provider still answers others: a long run must not die because one request in thousands was unlucky. What
ends the waiting is the provider itself falling silent: when nothing has been answered for `give_up_after`
seconds (`ProviderWatch` keeps that clock for every request of a backend), the request ends in
`ProviderUnavailable`, which stops the run resumably. Errors that waiting cannot cure (a bad key, an unknown
model, a 400) are raised at once, unchanged, for the caller to name.

`ProviderWatch` also counts the retry pressure (requests waiting, 429s, 5xx, dropped connections) that the
progress bar shows, so a user can see a storm happening.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception

from backends.hosted.env import Scrubber
from backends.hosted.errors import ProviderUnavailable, SdkErrors, error_message

T = TypeVar("T")

def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms` (OpenAI's), else `retry-after` in seconds or as an
    HTTP date. None when absent or unreadable; never negative."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = (lowered.get(name) or "").strip()
        if not raw:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                when = parsedate_to_datetime(raw).timestamp()
            except (TypeError, ValueError, IndexError):
                continue
            value = when - (time.time() if now is None else now)
        if math.isfinite(value):
            return max(0.0, value)
    return None


def retry_after_of(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    return parse_retry_after(headers) if headers is not None else None


@dataclass(frozen=True)
class Backoff:
    """How long to wait before attempt n+1: the server's Retry-After when it gave one (capped), else
    exponential from `initial`, capped at `maximum`, with jitter (half fixed, half random) so that many
    requests failing together do not all come back together. `[openai]`/`[together]` `backoff_initial` and
    `backoff_max` set the first two."""

    initial: float = 1.0
    maximum: float = 60.0
    max_retry_after: float = 300.0
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def delay(self, attempt: int, exc: BaseException | None) -> float:
        server = retry_after_of(exc) if exc is not None else None
        if server is not None:
            return min(server, self.max_retry_after)
        base = min(self.maximum, self.initial * 2 ** max(0, attempt - 1))
        return base * (0.5 + 0.5 * self.rand())

    def later(self, exc: BaseException | None) -> float:
        """The wait of a request put back after its quick retries: the server's Retry-After, else about
        `maximum` (jittered the same way)."""
        server = retry_after_of(exc) if exc is not None else None
        if server is not None:
            return min(server, self.max_retry_after)
        return self.maximum * (0.5 + 0.5 * self.rand())



FaultKind = str  # "429", "5xx", "timeout", "dropped", or another status


class ProviderWatch:
    """What every request of one backend has seen of the provider lately, shared by all of them (the async chat
    requests and the threads that poll jobs): how long it has answered nothing, and the retry pressure.

    "Answered nothing" is measured from the first fault after the last answer (any response that is not a
    transient fault: a completion, a job, even a 400), so the clock runs only while every request fails, and
    one answer to anyone stops it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._silent_since: float | None = None
        self._waiting = 0
        self._faults: dict[FaultKind, int] = {}

    def answered(self) -> None:
        with self._lock:
            self._silent_since = None

    def fault(self, kind: FaultKind) -> None:
        with self._lock:
            self._faults[kind] = self._faults.get(kind, 0) + 1
            if self._silent_since is None:
                self._silent_since = self._clock()

    def silent_for(self) -> float:
        """Seconds since the provider last answered anything, counted from the first fault after it (0 while
        it answers)."""
        with self._lock:
            return 0.0 if self._silent_since is None else max(0.0, self._clock() - self._silent_since)

    def faults(self) -> dict[FaultKind, int]:
        with self._lock:
            return dict(self._faults)

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a request's wait before its next try."""
        with self._lock:
            self._waiting += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1

    def pressure(self) -> str:
        """One short line for the progress bar ("retrying 3 · 429s 41 · 5xx 12 · dropped 2"); "" while nothing
        has gone wrong."""
        with self._lock:
            waiting, faults = self._waiting, dict(self._faults)
        if not faults:
            return ""
        labels = {"429": "429s", "5xx": "5xx", "timeout": "timeouts", "dropped": "dropped"}
        counts = [f"{labels.get(kind, kind)} {n}" for kind, n in sorted(faults.items(), key=lambda kv: -kv[1])]
        return " · ".join([f"retrying {waiting}", *counts])


@dataclass(frozen=True)
class RetryPolicy:
    """How one backend retries: built once, with its client's errors and scrubber, and used by every remote call
    it makes (chat, embeddings, uploads, job creation, polls, batches). tenacity runs the loop.

    A transient fault is tried again `max_retries` times at `backoff.delay`, then put back at `backoff.later`
    for as long as the provider answers anyone; when it has answered nothing for `give_up_after` seconds the
    call raises `ProviderUnavailable`. Waits are cut short at that deadline, so the last try happens there.
    """

    errors: SdkErrors
    scrubber: Scrubber
    where: str  # the server, for messages
    max_retries: int
    backoff: Backoff
    give_up_after: float
    watch: ProviderWatch
    sleep: Callable[[float], None] = time.sleep
    async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def kind(self, exc: BaseException) -> FaultKind:
        if isinstance(exc, self.errors.timeout):
            return "timeout"
        if isinstance(exc, self.errors.connections):
            return "dropped"
        code = self.errors.status_code(exc)
        if code == 429:
            return "429"
        return "5xx" if code is not None and code >= 500 else str(code or type(exc).__name__)

    def delay(self, attempt: int, exc: BaseException | None) -> float:
        """Seconds before attempt `attempt + 1` (attempt 1 is the first try), never past the give-up deadline."""
        delay = self.backoff.delay(attempt, exc) if attempt <= self.max_retries else self.backoff.later(exc)
        return max(0.0, min(delay, self.give_up_after - self.watch.silent_for()))

    # -- the pieces tenacity is given

    def _worth_retrying(self, exc: BaseException) -> bool:
        """Count a failed try; True when it is worth another one."""
        if self.errors.is_retryable(exc):
            self.watch.fault(self.kind(exc))
            return True
        if isinstance(exc, self.errors.status):
            self.watch.answered()  # a refusal is an answer: the provider is there
        return False

    def _stop(self, state: RetryCallState) -> bool:
        return self.watch.silent_for() >= self.give_up_after

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return self.delay(state.attempt_number, exc)

    def _sleep(self, seconds: float) -> None:
        with self.watch.waiting():
            self.sleep(seconds)

    async def _sleep_async(self, seconds: float) -> None:
        with self.watch.waiting():
            await self.async_sleep(seconds)

    def _retrying(self, **extra: Any) -> dict[str, Any]:
        return {"stop": self._stop, "wait": self._wait, "retry": retry_if_exception(self._worth_retrying),
                "reraise": True, **extra}

    def _ended(self, exc: BaseException, what: str, attempts: int) -> BaseException:
        """What a call that raised `exc` ends in: a transient fault means the provider fell silent."""
        if not self.errors.is_retryable(exc):
            return exc
        detail = self.scrubber.scrub(error_message(exc))
        return ProviderUnavailable(what, self.errors.status_of(exc), detail, attempts, where=self.where,
                                   silent_for=self.watch.silent_for())

    # -- calls

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run a sync SDK call under the policy. Errors that are not transient propagate unchanged (the caller
        knows what a 404 means for it); a provider silent for too long is a ProviderUnavailable."""
        retrying = Retrying(**self._retrying(sleep=self._sleep))
        try:
            result = retrying(fn)
        except self.errors.remote as exc:
            ended = self._ended(exc, what, int(retrying.statistics.get("attempt_number", 1)))
            if ended is exc:
                raise
            raise ended from None
        self.watch.answered()
        return result

    async def call_async(self, fn: Callable[[], Awaitable[T]], what: str,
                         before_sleep: Callable[[RetryCallState], None] | None = None) -> T:
        """`call` for a coroutine (chat): a request sleeps without holding a slot while the others go on.
        `before_sleep` hears of every wait (the chat runner pauses the limiter on a 429)."""
        retrying = AsyncRetrying(**self._retrying(sleep=self._sleep_async, before_sleep=before_sleep))
        try:
            result: T = await retrying(fn)
        except self.errors.remote as exc:
            ended = self._ended(exc, what, int(retrying.statistics.get("attempt_number", 1)))
            if ended is exc:
                raise
            raise ended from None
        self.watch.answered()
        return result

    def call_or_refuse(self, fn: Callable[[], T], what: str, refused: Callable[[Exception, str], Exception], *,
                       missing_ok: bool = False) -> T | None:
        """`call`; a refusal becomes what `refused` makes of it (an error that says what to do and holds no
        secret). With `missing_ok`, a 404 answers None: the caller knows what a missing object means."""
        try:
            return self.call(fn, what)
        except self.errors.not_found as exc:
            if missing_ok:
                return None
            raise refused(exc, what) from None
        except self.errors.status as exc:
            raise refused(exc, what) from None

    def create_once(self, create: Callable[[], str], find: Callable[[], str | None], what: str,
                    refused: Callable[[Exception], Exception]) -> str:
        """Create a remote object (a job, a batch, an upload) and return its id. Before each new try, look for it
        with `find`: the failed request may have reached the server even though its answer did not reach us. A
        refusal for good (a 4xx other than 429) is raised as `refused(exc)`."""
        tries = 0

        def attempt() -> str:
            nonlocal tries
            tries += 1
            if tries > 1 and (found := find()) is not None:
                return found
            return create()

        try:
            return self.call(attempt, what)
        except self.errors.status as exc:
            raise refused(exc) from None
