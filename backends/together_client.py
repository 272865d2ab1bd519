"""Together's keys and SDK clients, the twin of `openai_client`: the key is read from TOGETHER_API_KEY (environment
over ./.env), held as a SecretStr and handed only to the SDK; clients retry nothing (`max_retries=0`), since our
retry policy is the only layer."""

from __future__ import annotations

from collections.abc import Mapping

import httpx
import together
from together import AsyncTogether, Together

from backends.hosted.clients import HostedClients
from backends.hosted.env import env_value
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


class TogetherClients(HostedClients[Together, AsyncTogether]):
    """Makes Together SDK clients for one key and server."""

    errors = TOGETHER_ERRORS

    def __init__(self, api_key: str, base_url: str | None, *, timeout: float) -> None:
        super().__init__(api_key, timeout=timeout)
        self.base_url = base_url

    @property
    def where(self) -> str:
        return f"{api_root(self.base_url)}/v1"

    @property
    def key_variable(self) -> str:
        return KEY_VARIABLE

    def sync(self) -> Together:
        return Together(api_key=self._key.get_secret_value(), base_url=api_root(self.base_url), max_retries=0,
                        timeout=self.timeout)

    def async_(self) -> AsyncTogether:
        return AsyncTogether(api_key=self._key.get_secret_value(), base_url=api_root(self.base_url), max_retries=0,
                             timeout=self.timeout)


def resolve_clients(settings: TogetherConfig, env: Mapping[str, str]) -> TogetherClients:
    """The key from TOGETHER_API_KEY (environment over ./.env); the server from settings, else TOGETHER_BASE_URL,
    else Together's. A missing key is a one-line UserError naming the variable."""
    key = env_value(env, KEY_VARIABLE)
    if key is None:
        raise UserError(f"no Together API key: set {KEY_VARIABLE} in the environment or in ./.env")
    return TogetherClients(key, settings.base_url or env_value(env, BASE_URL_VARIABLE), timeout=settings.timeout)
