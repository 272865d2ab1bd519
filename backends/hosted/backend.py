"""`HostedBackend`: what the openai and together backends hold in common (base model, settings, durable state,
the rate limiter, the retry policy and the watch on the provider, where the key comes from), so that each
provider supplies only its clients and what differs."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from backends.base import BASE_MODEL_ID, BackendState
from backends.hosted.env import read_environment
from backends.hosted.rate_limit import RateLimiter
from backends.hosted.retry import Backoff, ProviderWatch, RetryPolicy


class HostedSettings(Protocol):
    """The settings every hosted backend's config section has (OpenAIConfig, TogetherConfig)."""

    concurrency: int
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_retries: int
    give_up_after: float
    backoff_initial: float
    backoff_max: float


SettingsT = TypeVar("SettingsT", bound=HostedSettings)


class HostedBackend(Generic[SettingsT]):
    """What every hosted backend holds: its base model name, settings, durable state, the shared rate limiter,
    the retry policy and the watch on the provider that every call shares, and where the key comes from.
    Building one needs no key and makes no request (so `run --dry-run` works without one); subclasses read the
    key at the first call that needs it, and make their clients and runners then (`_setup` sets them to None)."""

    def __init__(
        self,
        model: str,
        settings: SettingsT,
        state: BackendState,
        *,
        show_progress: bool = True,
        environ: Mapping[str, str] | None = None,
        dotenv: Path | None = None,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`environ` and `dotenv` replace the process environment and `./.env` (tests); `backoff` (else the
        settings' `backoff_initial` / `backoff_max`), `sleep` and `async_sleep` set how long retries wait."""
        self.model = model
        self.settings = settings
        self.state = state
        self.show_progress = show_progress
        self.backoff = backoff or Backoff(initial=settings.backoff_initial, maximum=settings.backoff_max)
        self.sleep = sleep
        self.async_sleep = async_sleep
        self.limiter = RateLimiter(settings.concurrency, settings.requests_per_minute, settings.tokens_per_minute)
        self.watch = ProviderWatch()
        self._retry: RetryPolicy | None = None
        self._environ = environ
        self._dotenv = dotenv
        self._lock = threading.RLock()  # the pipeline polls jobs from several threads
        self._setup()

    def _setup(self) -> None:
        """The parts a subclass makes on first use (clients, runners), each None until then."""

    @property
    def clients(self) -> Any:
        """The provider's key and client makers, each subclass its own; a missing key is a one-line UserError."""
        raise NotImplementedError

    @property
    def retry(self) -> RetryPolicy:
        """The one retry policy of every call this backend makes, built with the clients (it scrubs their key)."""
        with self._lock:
            if self._retry is None:
                c = self.clients
                self._retry = RetryPolicy(errors=c.errors, scrubber=c.scrubber, where=c.where,
                                          max_retries=self.settings.max_retries, backoff=self.backoff,
                                          give_up_after=self.settings.give_up_after, watch=self.watch,
                                          sleep=self.sleep, async_sleep=self.async_sleep)
            return self._retry

    def retry_pressure(self) -> str:
        """What the progress bar shows of the retries under way (ReportsRetries); "" while all is well."""
        return self.watch.pressure()

    def check_credentials(self) -> None:
        """The key is read now (a missing one is a one-line UserError); nothing is sent (NeedsCredentials)."""
        _ = self.clients

    def resolve_model(self, model_id: str) -> str:
        """BASE_MODEL_ID stands for the provider's base model; every other id goes to the server as it is."""
        return self.model if model_id == BASE_MODEL_ID else model_id

    def _environment(self) -> dict[str, str]:
        return read_environment(self._environ, self._dotenv)

    def _log(self, message: str) -> None:
        if self.show_progress:
            print(message, file=sys.stderr, flush=True)
