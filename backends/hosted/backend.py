"""`HostedBackend`: what the openai and together backends hold in common (base model, settings, durable state,
the rate limiter, the retry policy and the watch on the provider, where the key comes from, the clients, chat
and jobs made on first use, and the finetuning calls), so that each provider supplies only its clients, its jobs
and what differs (`_make_clients`, `_make_jobs`, `describe`, and a chat refusal or a check of its own)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from backends.base import (
    BASE_MODEL_ID,
    BackendState,
    ChatRequest,
    ChatResult,
    FinetuneSpec,
    JobRef,
    JobState,
    ResultCallback,
)
from backends.hosted.chat import ChatRunner
from backends.hosted.clients import HostedClients
from backends.hosted.env import read_environment
from backends.hosted.jobs import HostedJobs
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


class SyncClient(Protocol):
    """What the base needs of a provider's sync SDK client: that it can be closed."""

    def close(self) -> None: ...


SettingsT = TypeVar("SettingsT", bound=HostedSettings)
ClientT = TypeVar("ClientT", bound=SyncClient)
JobsT = TypeVar("JobsT", bound=HostedJobs[Any, Any])


class HostedBackend(ABC, Generic[SettingsT, ClientT, JobsT]):
    """What every hosted backend holds: its base model name, settings, durable state, the shared rate limiter,
    the retry policy and the watch on the provider that every call shares, and where the key comes from.
    Building one needs no key and makes no request (so `run --dry-run` works without one): the key is read at
    the first call that needs it, which in a run is the first debate round, before any work, and the clients,
    the chat runner and the jobs are made then, each once, under a lock (the pipeline polls jobs from several
    threads)."""

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
        """The parts made on first use, each None until then (a subclass adds its own, after these)."""
        self._clients: HostedClients[ClientT, Any] | None = None
        self._client: ClientT | None = None
        self._chat: ChatRunner | None = None
        self._jobs: JobsT | None = None

    # -- what a provider supplies

    @abstractmethod
    def _make_clients(self) -> HostedClients[ClientT, Any]:
        """The provider's key and client makers, from the settings and the environment (a missing key is a
        one-line UserError)."""

    @abstractmethod
    def _make_jobs(self) -> JobsT:
        """The provider's finetuning jobs, given `self.client`, `self.clients` and `self.retry`."""

    def _refusal(self, request: ChatRequest, model: str, exc: Exception) -> Exception | None:
        """The error a chat request refused for good ends in, when the provider has its own words for it;
        None for the chat runner's."""
        return None

    # -- made on first use

    @property
    def clients(self) -> HostedClients[ClientT, Any]:
        """Key and client makers; a missing key is a one-line UserError here."""
        with self._lock:
            if self._clients is None:
                self._clients = self._make_clients()
            return self._clients

    @property
    def client(self) -> ClientT:
        """The sync client (files, jobs, models, batches), made on first use and shared by threads (httpx is
        safe so)."""
        with self._lock:
            if self._client is None:
                self._client = self.clients.sync()
            return self._client

    @property
    def chats(self) -> ChatRunner:
        with self._lock:
            if self._chat is None:
                self._chat = ChatRunner(self.clients, self.limiter, retry=self.retry, resolve_model=self.resolve_model,
                                        refusal=self._refusal)
            return self._chat

    @property
    def jobs(self) -> JobsT:
        with self._lock:
            if self._jobs is None:
                self._jobs = self._make_jobs()
            return self._jobs

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

    # -- Backend protocol (what is the same for every provider)

    def chat(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        if not requests:
            return []
        return self.chats.run(requests, on_result)

    def start_finetune(self, spec: FinetuneSpec) -> JobRef:
        return self.jobs.start(spec)

    def poll(self, job: JobRef) -> JobState:
        return self.jobs.poll(job)

    def cancel(self, job: JobRef) -> None:
        self.jobs.cancel(job)

    def close(self) -> None:
        """Close the sync client; the parts made from it are made again if the backend is used after this."""
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None
            self._jobs = None
            self._chat = None

    def _environment(self) -> dict[str, str]:
        return read_environment(self._environ, self._dotenv)

    def _log(self, message: str) -> None:
        if self.show_progress:
            print(message, file=sys.stderr, flush=True)
