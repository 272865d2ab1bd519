"""Building OpenAI / Azure OpenAI SDK clients from settings, the environment and `./.env`, and keeping the key secret.

The key is read once, held as a pydantic `SecretStr` (its repr is masked) and handed only to the SDK; every
error text that leaves this package goes through `Scrubber.scrub` first, because providers echo parts of keys
(and proxies echo headers) in their error bodies. Every client is built with `max_retries=0`: our own retry
layer (tenacity, in `openai_chat` and `call_with_retries`) is the only one, so a retry budget means what it says.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlparse

import openai
from openai import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI
from pydantic import BaseModel, ConfigDict, SecretStr
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from orchestrator.config import OpenAIConfig
from orchestrator.errors import UserError

OPENAI_HOSTS = frozenset({"api.openai.com"})
NO_KEY_PLACEHOLDER = "no-key-needed"  # sent to self-hosted servers (vLLM, llama.cpp, Ollama) that want none

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Things that look like credentials even when they are not the key we hold (a proxy echoing a header, say).
_CREDENTIAL_PATTERNS = (
    (re.compile(r"sk-[A-Za-z0-9_*\-]{6,}"), "sk-***"),
    (re.compile(r"(?i)(bearer\s+)[^\s'\",}]+"), r"\1***"),
    (re.compile(r"(?i)(api[-_]key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}&]+"), r"\1***"),
)


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


def is_hosted(settings: OpenAIConfig, env: Mapping[str, str]) -> bool:
    """OpenAI or Azure (billed per token), as opposed to a self-hosted OpenAI-compatible server. Needs no key."""
    return settings.api == "azure" or is_openai_url(settings.base_url or env.get("OPENAI_BASE_URL") or None)


class Scrubber:
    """Removes the key (and anything shaped like a credential) from text that may be shown or stored."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        for pattern, replacement in _CREDENTIAL_PATTERNS:
            text = pattern.sub(replacement, text)
        return text


def parse_dotenv(text: str, source: str = ".env") -> dict[str, str]:
    """A strict reader of `KEY=VALUE` lines (optionally `export KEY=VALUE`, values optionally quoted).

    Blank lines and `#` comments are skipped; an unquoted value ends at ` #`. Anything else is an error naming
    the line number only, never the line, since the line may hold a secret. Small enough that python-dotenv
    (with its variable expansion and multi-line values we do not want) is not worth a dependency.
    """
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.fullmatch(key):
            raise UserError(f"{source} line {number} is not KEY=VALUE: fix or remove that line")
        values[key] = _dotenv_value(value.strip(), source, number)
    return values


def _dotenv_value(value: str, source: str, number: int) -> str:
    if value[:1] in {'"', "'"}:
        quote = value[0]
        end = value.find(quote, 1)
        while quote == '"' and end > 0 and value[end - 1] == "\\":
            end = value.find(quote, end + 1)
        rest = value[end + 1:].strip() if end > 0 else ""
        if end < 0 or (rest and not rest.startswith("#")):
            raise UserError(f"{source} line {number} has a quoted value without its closing quote, or text after "
                            "it: fix that line")
        inner = value[1:end]
        return inner.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\") if quote == '"' else inner
    return re.split(r"\s+#", value, maxsplit=1)[0].strip()


def read_environment(environ: Mapping[str, str] | None = None, dotenv: Path | None = None) -> dict[str, str]:
    """The process environment over `./.env` (the environment wins, as every dotenv tool does)."""
    path = Path(".env") if dotenv is None else dotenv
    values: dict[str, str] = {}
    if path.is_file():
        values.update(parse_dotenv(path.read_text(encoding="utf-8"), source=str(path)))
    values.update(os.environ if environ is None else environ)
    return values


def resolve_credentials(settings: OpenAIConfig, env: Mapping[str, str]) -> Credentials:
    """Settings first, then the environment; a missing piece is a one-line UserError naming the variable."""

    def get(name: str) -> str | None:
        return (env.get(name) or "").strip() or None

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


class ClientFactory:
    """Makes SDK clients for one set of credentials: a sync one (files, jobs, batches) and async ones (chat).

    An async client belongs to the event loop it was made in, so `chat()` makes one per `asyncio.run`.
    """

    def __init__(self, credentials: Credentials, *, timeout: float) -> None:
        self.credentials = credentials
        self.timeout = timeout
        self.scrubber = Scrubber([credentials.api_key.get_secret_value()])

    def sync(self) -> OpenAI:
        c = self.credentials
        key = c.api_key.get_secret_value()
        if c.api == "azure":
            if c.base_url is not None:
                return AzureOpenAI(base_url=c.base_url, api_version=c.api_version, api_key=key,
                                   organization=c.organization, max_retries=0, timeout=self.timeout)
            return AzureOpenAI(azure_endpoint=c.azure_endpoint or "", api_version=c.api_version, api_key=key,
                               organization=c.organization, max_retries=0, timeout=self.timeout)
        return OpenAI(api_key=key, base_url=c.base_url, organization=c.organization, project=c.project,
                      max_retries=0, timeout=self.timeout)

    def async_(self) -> AsyncOpenAI:
        c = self.credentials
        key = c.api_key.get_secret_value()
        if c.api == "azure":
            if c.base_url is not None:
                return AsyncAzureOpenAI(base_url=c.base_url, api_version=c.api_version, api_key=key,
                                        organization=c.organization, max_retries=0, timeout=self.timeout)
            return AsyncAzureOpenAI(azure_endpoint=c.azure_endpoint or "", api_version=c.api_version, api_key=key,
                                    organization=c.organization, max_retries=0, timeout=self.timeout)
        return AsyncOpenAI(api_key=key, base_url=c.base_url, organization=c.organization, project=c.project,
                           max_retries=0, timeout=self.timeout)


# -- errors and retries ---------------------------------------------------------------------------------------

T = TypeVar("T")


class OpenAIRequestError(RuntimeError):
    """A request that could not be completed: retries ran out, or the server refused it for good.

    Names what failed (a chat request's key, or an operation) and the last status; never holds a secret.
    """

    def __init__(self, what: str, status: str, detail: str, attempts: int = 1) -> None:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{what} failed{tries}; last status {status}: {detail}")
        self.what = what
        self.status = status
        self.attempts = attempts


def is_retryable(exc: BaseException) -> bool:
    """429, 5xx, timeouts and dropped connections are worth another try; other 4xx are not."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.RateLimitError):
        return error_code(exc) not in {"daily_rate_limit_exceeded", "insufficient_quota"}  # waiting won't help
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def error_code(exc: BaseException) -> str | None:
    """The `code` of an OpenAI error body (`{"error": {"code": ...}}`), wherever the SDK left it."""
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("code"):
            return str(inner["code"])
    return None


def status_of(exc: BaseException) -> str:
    """A short status for messages: the HTTP status (with its code), or what happened to the connection."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection error"
    if isinstance(exc, openai.APIStatusError):
        code = error_code(exc)
        return f"{exc.status_code}{f' {code}' if code else ''}"
    return type(exc).__name__


def error_message(exc: BaseException) -> str:
    """The server's own message when it sent one (not the SDK's `Error code: ... - {body}` dump)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__


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
    requests failing together do not all come back together."""

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

    def tenacity_wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        return self.delay(state.attempt_number, exc)


def call_with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    max_retries: int,
    backoff: Backoff,
    scrubber: Scrubber,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run a sync SDK call, retrying what `is_retryable` allows. Errors that are not retryable propagate
    unchanged (the caller knows what a 404 means for it); running out of retries is an OpenAIRequestError."""
    retrying = Retrying(
        stop=stop_after_attempt(max_retries + 1),
        wait=backoff.tenacity_wait,
        retry=retry_if_exception(is_retryable),
        reraise=True,
        sleep=sleep,
    )
    try:
        return retrying(fn)
    except Exception as exc:
        if not is_retryable(exc):
            raise
        attempts = int(retrying.statistics.get("attempt_number", max_retries + 1))
        raise OpenAIRequestError(what, status_of(exc), scrubber.scrub(error_message(exc)), attempts) from None


def key_error(exc: BaseException, credentials: Credentials, scrubber: Scrubber) -> UserError | None:
    """A UserError for a refused key (401) or missing access (403), else None."""
    if isinstance(exc, openai.AuthenticationError):
        return UserError(f"the server at {credentials.where} rejected the API key (401): check "
                         f"{credentials.key_variable} in the environment or ./.env "
                         f"({scrubber.scrub(error_message(exc))})")
    if isinstance(exc, openai.PermissionDeniedError):
        return UserError(f"the API key has no access to this at {credentials.where} (403): "
                         f"{scrubber.scrub(error_message(exc))}")
    return None
