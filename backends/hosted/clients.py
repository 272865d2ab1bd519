"""`HostedClients`: a provider's key and the SDK clients made with it, the base of `OpenAIClients` and
`TogetherClients`.

The key is held as a pydantic `SecretStr` (its repr is masked) and handed only to the SDK; the `Scrubber` made
from it cleans every error text before it is shown or stored. Every client a provider makes must retry nothing
(`max_retries=0`): the backend's `RetryPolicy` is the only retry layer, so a retry budget means what it says.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Generic, TypeVar

from pydantic import SecretStr

from backends.hosted.env import Scrubber
from backends.hosted.errors import SdkErrors
from foundation.errors import UserError

SyncT = TypeVar("SyncT", covariant=True)
AsyncT = TypeVar("AsyncT", covariant=True)


class HostedClients(ABC, Generic[SyncT, AsyncT]):
    """Makes one provider's SDK clients for one key: a sync client (files, jobs, models, batches), shared by
    threads, and async ones (chat), one per event loop since an async client belongs to the loop it was made in.
    A provider supplies its SDK's errors, the server (`where`), the variable the key came from, and the two
    client makers."""

    errors: ClassVar[SdkErrors]

    def __init__(self, api_key: str, *, timeout: float) -> None:
        self._key = SecretStr(api_key)
        self.timeout = timeout
        self.scrubber = Scrubber([api_key])

    @property
    @abstractmethod
    def where(self) -> str:
        """The server, for messages."""

    @property
    @abstractmethod
    def key_variable(self) -> str:
        """The variable the key came from (or should come from), for messages."""

    @abstractmethod
    def sync(self) -> SyncT: ...

    @abstractmethod
    def async_(self) -> AsyncT: ...

    def key_error(self, exc: BaseException) -> UserError | None:
        """A UserError for a refused key (401) or missing access (403), else None."""
        return self.errors.key_error(exc, where=self.where, key_variable=self.key_variable, scrubber=self.scrubber)
