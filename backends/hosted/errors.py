"""Errors of hosted providers: what a Stainless-generated SDK raises (`SdkErrors` binds the family of one SDK) and
what it means to us, and the two errors a hosted call ends in when it cannot succeed: `HostedRequestError` (the
server refused for good, or our retries of it ran out) and `ProviderUnavailable` (the provider answered nothing
for `give_up_after` seconds). Both name what failed and never hold a secret; both stop a run resumably."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from backends.hosted.env import Scrubber
from foundation.errors import UserError


class HostedRequestError(RuntimeError):
    """A request that could not be completed: retries ran out, or the server refused it for good.

    Names what failed (a chat request's key, or an operation) and the last status; never holds a secret.
    """

    def __init__(self, what: str, status: str, detail: str, attempts: int = 1) -> None:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{what} failed{tries}; last status {status}: {detail}")
        self.what = what
        self.status = status
        self.attempts = attempts


class ProviderUnavailable(HostedRequestError):
    """The provider answered nothing (to any request) for `give_up_after` seconds: not this request's fault, and
    nothing a retry now would cure. Everything answered before is stored; resuming later continues."""

    def __init__(self, what: str, status: str, detail: str, attempts: int, *, where: str, silent_for: float) -> None:
        seconds = f"{silent_for:.0f}" if silent_for >= 10 else f"{silent_for:.1f}"
        RuntimeError.__init__(self, f"the provider at {where} has answered nothing for {seconds} s "
                                    f"({what}: {attempts} tries, last status {status}: {detail})")
        self.what = what
        self.status = status
        self.attempts = attempts
        self.where = where
        self.silent_for = silent_for


def error_code(exc: BaseException) -> str | None:
    """The `code` of an error body (`{"error": {"code": ...}}` or `{"code": ...}`), wherever the SDK left it."""
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("code"):
            return str(inner["code"])
    return None


def error_message(exc: BaseException) -> str:
    """The server's own message when it sent one (not the SDK's `Error code: ... - {body}` dump)."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(inner, str) and inner:
            return inner
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__


# 429s that waiting will not cure (OpenAI's codes; a provider without them never sends them)
FATAL_RATE_LIMIT_CODES = frozenset({"daily_rate_limit_exceeded", "insufficient_quota"})


@dataclass(frozen=True)
class SdkErrors:
    """The exception classes of one Stainless-generated SDK (`openai`, `together`), and what they mean to us."""

    base: type[Exception]
    status: type[Exception]  # APIStatusError: any 4xx/5xx, with `.status_code`, `.body`, `.response`
    connection: type[Exception]  # APIConnectionError, which includes timeouts
    timeout: type[Exception]
    rate_limit: type[Exception]
    authentication: type[Exception]
    permission_denied: type[Exception]
    not_found: type[Exception]
    bad_request: type[Exception]
    unprocessable: type[Exception]
    conflict: type[Exception]
    fatal_rate_limit_codes: frozenset[str] = FATAL_RATE_LIMIT_CODES
    # dropped connections that escape the SDK's wrapping (a helper that talks to raw httpx, e.g. an upload)
    raw_connection: tuple[type[Exception], ...] = ()

    @classmethod
    def of(cls, sdk: ModuleType, base: str, *, raw_connection: tuple[type[Exception], ...] = ()) -> SdkErrors:
        """Bind the classes a Stainless SDK exports at its top level; `base` names its root error class."""
        return cls(
            base=getattr(sdk, base), status=sdk.APIStatusError, connection=sdk.APIConnectionError,
            timeout=sdk.APITimeoutError, rate_limit=sdk.RateLimitError, authentication=sdk.AuthenticationError,
            permission_denied=sdk.PermissionDeniedError, not_found=sdk.NotFoundError,
            bad_request=sdk.BadRequestError, unprocessable=sdk.UnprocessableEntityError, conflict=sdk.ConflictError,
            raw_connection=raw_connection,
        )

    @property
    def connections(self) -> tuple[type[Exception], ...]:
        return (self.connection, *self.raw_connection)

    @property
    def remote(self) -> tuple[type[Exception], ...]:
        """What a remote call can raise that is about the server or the network (not our own bugs)."""
        return (self.status, *self.connections)

    def status_code(self, exc: BaseException) -> int | None:
        """The HTTP status of an APIStatusError; None for anything else."""
        if not isinstance(exc, self.status):
            return None
        return int(getattr(exc, "status_code", 0)) or None

    def is_retryable(self, exc: BaseException) -> bool:
        """429, 5xx, timeouts and dropped connections are worth another try; other 4xx are not."""
        if isinstance(exc, self.connections):  # includes timeouts
            return True
        code = self.status_code(exc)
        if isinstance(exc, self.rate_limit) or code == 429:  # SDK helpers may raise a bare APIStatusError for one
            return error_code(exc) not in self.fatal_rate_limit_codes  # waiting won't help those
        return code is not None and code >= 500

    def status_of(self, exc: BaseException) -> str:
        """A short status for messages: the HTTP status (with its code), or what happened to the connection."""
        if isinstance(exc, self.timeout):
            return "timeout"
        if isinstance(exc, self.connections):
            return "connection error"
        code = self.status_code(exc)
        if code is not None:
            err = error_code(exc)
            return f"{code}{f' {err}' if err else ''}"
        return type(exc).__name__

    def key_error(self, exc: BaseException, *, where: str, key_variable: str, scrubber: Scrubber) -> UserError | None:
        """A UserError for a refused key (401) or missing access (403), else None."""
        if isinstance(exc, self.authentication):
            return UserError(f"the server at {where} rejected the API key (401): check {key_variable} in the "
                             f"environment or ./.env ({scrubber.scrub(error_message(exc))})")
        if isinstance(exc, self.permission_denied):
            return UserError(f"the API key has no access to this at {where} (403): "
                             f"{scrubber.scrub(error_message(exc))}")
        return None

    def failure(self, exc: BaseException, what: str, scrubber: Scrubber, attempts: int = 1) -> HostedRequestError:
        return HostedRequestError(what, self.status_of(exc), scrubber.scrub(error_message(exc)), attempts)


