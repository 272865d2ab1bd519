"""Building OpenAI / Azure OpenAI SDK clients from settings, the environment and `./.env`, and keeping the key secret.

The key is read once, held as a pydantic `SecretStr` (its repr is masked) and handed only to the SDK; every
error text that leaves this package goes through `Scrubber.scrub` first, because providers echo parts of keys
(and proxies echo headers) in their error bodies. Every client is built with `max_retries=0`: our own retry
layer (`backends.hosted.retry.RetryPolicy`) is the only one, so a retry budget means what it says. What is not
OpenAI's own (.env, scrubbing, backoff, retries, the `HostedClients` base) lives in `backends.hosted`; the twin of
this module is `together_client`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlparse

import openai
from openai import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI
from pydantic import BaseModel, ConfigDict, SecretStr

from backends.hosted.clients import HostedClients
from backends.hosted.env import env_value
from backends.hosted.errors import SdkErrors
from backends.openai_settings import OpenAIConfig
from foundation.errors import UserError

OPENAI_ERRORS = SdkErrors.of(openai, "OpenAIError")

OPENAI_HOSTS = frozenset({"api.openai.com"})
NO_KEY_PLACEHOLDER = "no-key-needed"  # sent to self-hosted servers (vLLM, llama.cpp, Ollama) that want none


class Credentials(BaseModel):
    """Where to send requests and with which key. `repr` and `model_dump` never show the key in clear."""

    model_config = ConfigDict(frozen=True)

    api: Literal["openai", "azure"]
    api_key: SecretStr
    key_variable: str  # the variable the key came from (or should come from), for error messages
    base_url: str | None = None
    azure_endpoint: str | None = None
    api_version: str | None = None
    organization: str | None = None
    project: str | None = None

    @property
    def where(self) -> str:
        """The server, for messages: base URL, Azure endpoint, or OpenAI's default."""
        return self.base_url or self.azure_endpoint or "https://api.openai.com/v1"

    @property
    def is_openai(self) -> bool:
        """True for OpenAI itself (not Azure, not a self-hosted OpenAI-compatible server)."""
        return self.api == "openai" and is_openai_url(self.base_url)


def is_openai_url(base_url: str | None) -> bool:
    return base_url is None or urlparse(base_url).hostname in OPENAI_HOSTS


def is_billed(settings: OpenAIConfig, env: Mapping[str, str]) -> bool | None:
    """Whether calls are billed per token (`[openai] billed`; needs no key). auto: True for OpenAI and Azure;
    None for any other base URL, which may be a proxy in front of OpenAI (billed) or a self-hosted server such
    as vLLM (free): billed exactly when the price table has the model, which the caller decides."""
    if settings.billed != "auto":
        return settings.billed
    if settings.api == "azure" or is_openai_url(settings.base_url or env.get("OPENAI_BASE_URL") or None):
        return True
    return None


def resolve_credentials(settings: OpenAIConfig, env: Mapping[str, str]) -> Credentials:
    """Settings first, then the environment; a missing piece is a one-line UserError naming the variable."""

    def get(name: str) -> str | None:
        return env_value(env, name)

    org, project = get("OPENAI_ORG_ID"), get("OPENAI_PROJECT_ID")
    if settings.api == "azure":
        endpoint = settings.azure_endpoint or get("AZURE_OPENAI_ENDPOINT")
        version = settings.api_version or get("OPENAI_API_VERSION")
        key = get("AZURE_OPENAI_API_KEY")
        if endpoint is None and settings.base_url is None:
            raise UserError("no Azure endpoint: set AZURE_OPENAI_ENDPOINT in the environment or .env "
                            "(or openai.azure_endpoint in the config)")
        if version is None:
            raise UserError("no Azure API version: set OPENAI_API_VERSION in the environment or .env "
                            "(or openai.api_version in the config), e.g. 2024-10-21")
        if key is None:
            raise UserError("no Azure OpenAI API key: set AZURE_OPENAI_API_KEY in the environment or in ./.env")
        return Credentials(api="azure", api_key=SecretStr(key), key_variable="AZURE_OPENAI_API_KEY",
                           base_url=settings.base_url, azure_endpoint=endpoint, api_version=version,
                           organization=org, project=project)
    base_url = settings.base_url or get("OPENAI_BASE_URL")
    key = get("OPENAI_API_KEY")
    creds_base = {"api": "openai", "key_variable": "OPENAI_API_KEY", "base_url": base_url,
                  "organization": org, "project": project}
    if key is None:
        if is_openai_url(base_url):
            raise UserError("no OpenAI API key: set OPENAI_API_KEY in the environment or in ./.env")
        key = NO_KEY_PLACEHOLDER  # vLLM, llama.cpp and Ollama accept any key; one that wants a key answers 401
    return Credentials.model_validate({**creds_base, "api_key": SecretStr(key)})


def resolve_clients(settings: OpenAIConfig, env: Mapping[str, str]) -> OpenAIClients:
    """The clients for these settings (`resolve_credentials`); a missing key is a one-line UserError."""
    return OpenAIClients(resolve_credentials(settings, env), timeout=settings.timeout)


class OpenAIClients(HostedClients[OpenAI, AsyncOpenAI]):
    """Makes OpenAI or Azure OpenAI SDK clients for one set of credentials."""

    errors = OPENAI_ERRORS

    def __init__(self, credentials: Credentials, *, timeout: float) -> None:
        super().__init__(credentials.api_key.get_secret_value(), timeout=timeout)
        self.credentials = credentials

    @property
    def where(self) -> str:
        return self.credentials.where

    @property
    def key_variable(self) -> str:
        return self.credentials.key_variable

    def _arguments(self) -> dict[str, Any]:
        """What every client gets, sync or async, OpenAI or Azure. max_retries=0: our retry layer is the only one."""
        c = self.credentials
        common: dict[str, Any] = {"api_key": c.api_key.get_secret_value(), "organization": c.organization,
                                  "max_retries": 0, "timeout": self.timeout}
        if c.api != "azure":
            return common | {"base_url": c.base_url, "project": c.project}
        where = {"base_url": c.base_url} if c.base_url is not None else {"azure_endpoint": c.azure_endpoint or ""}
        return common | where | {"api_version": c.api_version}

    def sync(self) -> OpenAI:
        kind = AzureOpenAI if self.credentials.api == "azure" else OpenAI
        return kind(**self._arguments())

    def async_(self) -> AsyncOpenAI:
        kind = AsyncAzureOpenAI if self.credentials.api == "azure" else AsyncOpenAI
        return kind(**self._arguments())
