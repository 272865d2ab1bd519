"""Names and markers on the provider's side: idempotency keys as the server sees them, model-name suffixes, bounded
scans of listings, and the training loss in a job's events."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any


def scan(items: Iterable[Any], limit: int) -> Iterable[Any]:
    """At most `limit` items of a (possibly auto-paginating) listing."""
    for _, item in zip(range(limit), items, strict=False):
        yield item


# -- names on the server ----------------------------------------------------------------------------------------


def key_digest(key: str, length: int = 32) -> str:
    """A job's idempotency key as the server sees it (a hash: keys may hold paths or be long)."""
    return hashlib.sha256(key.encode()).hexdigest()[:length]


def sanitize_suffix(suffix: str, max_chars: int, *, underscore: bool = True) -> str:
    """A model-name suffix of letters, digits and `-` (and `_` if `underscore`), at most `max_chars` long. A
    shortened suffix ends with a hash of the original, so two long suffixes that share a prefix still name
    different models."""
    disallowed = r"[^A-Za-z0-9_-]+" if underscore else r"[^A-Za-z0-9-]+"
    clean = re.sub(disallowed, "-", suffix).strip("-_") or "maft"
    if len(clean) <= max_chars:
        return clean
    digest = hashlib.sha256(suffix.encode()).hexdigest()[:8]
    return f"{clean[:max_chars - 9].rstrip('-_')}-{digest}"


_LOSS_IN_MESSAGE = re.compile(r"(?i)(?:training|train)[ _]loss[=: ]+([0-9]+(?:\.[0-9]+)?)")


def train_loss_in(event: Any) -> float | None:
    """An event's training loss: from its `data` (OpenAI's metrics events), else from its message."""
    data = getattr(event, "data", None)
    if isinstance(data, dict):
        value = data.get("train_loss")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    match = _LOSS_IN_MESSAGE.search(str(getattr(event, "message", "") or ""))
    return float(match.group(1)) if match else None


