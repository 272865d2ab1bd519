"""Preference finetuning files (JSONL, one `{"input": {"messages": [...]}, "preferred_output": [...],
"non_preferred_output": [...]}` pair a line), checked before any upload, like the chat files of `chat_files`.

OpenAI and Together take the same format (`backends.preference_data.HostedPreferenceLine` writes it) with
slightly different rules: OpenAI trains "only on one-turn conversations" (its DPO guide: one user turn, the
outputs being the last assistant message) and wants 10 examples; Together takes several turns in
`input.messages` and one example. Both want each output to be exactly one assistant message. The first broken
rule is a UserError naming the file, the line and the rule, before anything is uploaded or paid for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.hosted.chat_files import CharEstimate, FileCheck, TokenCounter, json_object_line, read_utf8
from foundation.errors import UserError

OUTPUTS = ("preferred_output", "non_preferred_output")


@dataclass(frozen=True)
class PreferenceRules:
    """One provider's documented rules for preference files that can be checked without its server."""

    provider: str
    input_keys: tuple[str, ...] = ("messages",)  # keys allowed inside `input` (OpenAI also takes tools)
    roles: tuple[str, ...] = ("system", "user", "assistant")
    one_turn: bool = False  # exactly one user message in `input.messages` (OpenAI)
    min_examples: int = 1
    max_example_tokens: int | None = None


def _fail(path: Path, where: str, rule: str) -> UserError:
    return UserError(f"preference file {path}, {where}: {rule}")


def _messages(path: Path, where: str, messages: Any, roles: tuple[str, ...]) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _fail(path, where, "must be a non-empty list of messages")
    for index, message in enumerate(messages, start=1):
        at = f"{where}, message {index}"
        if not isinstance(message, dict):
            raise _fail(path, at, "a message must be a JSON object")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise _fail(path, at, f"unknown message key {unknown[0]!r} (allowed: role, content, name)")
        if message.get("role") not in roles:
            raise _fail(path, at, f"role must be one of {', '.join(roles)}, got {message.get('role')!r}")
        content = message.get("content")
        if not isinstance(content, str) or not content:
            raise _fail(path, at, "content must be a non-empty string")
    return messages


def check_pair(path: Path, number: int, line: str, counter: TokenCounter, rules: PreferenceRules) -> int:
    """Check one JSONL line against the provider's preference format; its token count when it passes."""
    where = f"line {number}"
    pair = json_object_line(path, number, line, "preference", "pair")
    keys = ("input", *OUTPUTS)
    missing = [k for k in keys if k not in pair]
    unknown = sorted(set(pair) - set(keys))
    if missing or unknown:
        what = f"missing key {missing[0]!r}" if missing else f"unknown key {unknown[0]!r}"
        raise _fail(path, where, f"{what} (a pair has exactly: {', '.join(keys)})")
    given = pair["input"]
    if not isinstance(given, dict) or sorted(set(given) - set(rules.input_keys)):
        raise _fail(path, where, f"`input` must be an object with only {', '.join(rules.input_keys)}")
    messages = _messages(path, f"{where}, input.messages", given.get("messages"), rules.roles)
    if messages[-1]["role"] != "user":
        raise _fail(path, where, "input.messages must end with a user message (the outputs answer it)")
    users = sum(m["role"] == "user" for m in messages)
    if rules.one_turn and users != 1:
        raise _fail(path, where, f"{rules.provider} trains only on one-turn conversations: input.messages has "
                                 f"{users} user messages, it must have exactly one")
    tokens = 2 + sum(4 + counter.count(m["content"]) for m in messages)
    for name in OUTPUTS:
        output = _messages(path, f"{where}, {name}", pair[name], ("assistant",))
        if len(output) != 1:
            raise _fail(path, where, f"{name} must contain exactly one message from the assistant role, got "
                                     f"{len(output)}")
        tokens += 4 + counter.count(output[0]["content"])
    if rules.max_example_tokens is not None and tokens > rules.max_example_tokens:
        raise _fail(path, where, f"about {tokens} tokens ({counter.name}), over the limit of "
                                 f"{rules.max_example_tokens} tokens per example")
    return tokens


def validate_preference_file(path: Path, rules: PreferenceRules, *,
                             counter: TokenCounter | None = None) -> FileCheck:
    """Every rule in `rules` that can be checked without the server; the first broken one is a UserError."""
    counter = counter or CharEstimate()
    data, text = read_utf8(path, "preference")
    counts = [check_pair(path, n, line, counter, rules) for n, line in enumerate(text.splitlines(), start=1)]
    if len(counts) < rules.min_examples:
        raise UserError(f"preference file {path} has {len(counts)} pairs; {rules.provider} needs at least "
                        f"{rules.min_examples}")
    return FileCheck(path=str(path), sha256=hashlib.sha256(data).hexdigest(), examples=len(counts),
                     tokens=sum(counts), max_example_tokens=max(counts, default=0), counter=counter.name)
