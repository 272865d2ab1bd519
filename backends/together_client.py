"""Together's keys and SDK clients, the twin of `openai_client`: the key is read from TOGETHER_API_KEY (environment
over ./.env), held as a SecretStr and handed only to the SDK; clients retry nothing (`max_retries=0`), since our
retry policy is the only layer."""

from __future__ import annotations

from collections.abc import Mapping

import httpx
import together
from pydantic import SecretStr
from together import AsyncTogether, Together

from backends.hosted.env import Scrubber, env_value
from backends.hosted.errors import SdkErrors
from backends.together_settings import TogetherConfig
from foundation.errors import UserError

# The SDK's upload helper sends the file's bytes with the raw httpx client, so a dropped connection there is httpx's
TOGETHER_ERRORS = SdkErrors.of(together, "TogetherError", raw_connection=(httpx.TransportError,))
KEY_VARIABLE = "TOGETHER_API_KEY"
BASE_URL_VARIABLE = "TOGETHER_BASE_URL"
DEFAULT_API_ROOT = "https://api.together.ai"


def api_root(base_url: str | None) -> str:
    """What the SDK (>= 3) wants as `base_url`: the server's root, since it puts `/v1/...` in every path. A base
    URL ending in `/v1` (the OpenAI-compatible form Together's docs and older SDKs use) is cut back to it."""
    url = (base_url or DEFAULT_API_ROOT).rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class TogetherClients:
    """Makes SDK clients for one key: a sync one (files, jobs, models) and async ones (chat, one per event loop).
    The key is held as a SecretStr and handed only to the SDK; clients retry nothing (`max_retries=0`)."""

    errors = TOGETHER_ERRORS
    key_variable = KEY_VARIABLE

    def __init__(self, api_key: str, base_url: str | None, *, timeout: float) -> None:
        self._key = SecretStr(api_key)
        self.base_url = base_url
        self.timeout = timeout
        self.scrubber = Scrubber([api_key])

    @property
    def where(self) -> str:
        return f"{api_root(self.base_url)}/v1"

    def sync(self) -> Together:
        return Together(api_key=self._key.get_secret_value(), base_url=api_root(self.base_url), max_retries=0,
                        timeout=self.timeout)

    def async_(self) -> AsyncTogether:
        return AsyncTogether(api_key=self._key.get_secret_value(), base_url=api_root(self.base_url), max_retries=0,
                             timeout=self.timeout)

    def key_error(self, exc: BaseException) -> UserError | None:
        return self.errors.key_error(exc, where=self.where, key_variable=self.key_variable, scrubber=self.scrubber)


def resolve_clients(settings: TogetherConfig, env: Mapping[str, str]) -> TogetherClients:
    """The key from TOGETHER_API_KEY (environment over ./.env); the server from settings, else TOGETHER_BASE_URL,
    else Together's. A missing key is a one-line UserError naming the variable."""
    key = env_value(env, KEY_VARIABLE)
    if key is None:
        raise UserError(f"no Together API key: set {KEY_VARIABLE} in the environment or in ./.env")
    return TogetherClients(key, settings.base_url or env_value(env, BASE_URL_VARIABLE), timeout=settings.timeout)
