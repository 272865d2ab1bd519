"""`.env` files and secrets: the key is read from the environment over `./.env`, and every text that may be shown
or stored (an error body, an event, a traceback) goes through a `Scrubber` first, because providers echo parts of
keys, and proxies echo headers, in what they answer."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from foundation.errors import UserError

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Things that look like credentials even when they are not the key we hold (a proxy echoing a header, say).
_CREDENTIAL_PATTERNS = (
    (re.compile(r"sk-[A-Za-z0-9_*\-]{6,}"), "sk-***"),
    (re.compile(r"tgp_v1_[A-Za-z0-9_*\-]{6,}"), "tgp_v1_***"),  # Together's key format
    (re.compile(r"(?i)(bearer\s+)[^\s'\",}]+"), r"\1***"),
    (re.compile(r"(?i)(api[-_]key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}&]+"), r"\1***"),
)


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


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value, stripped; None when unset or blank."""
    return (env.get(name) or "").strip() or None


