"""Preference pairs as JSONL lines: ours (the local DPO trainer's) and the hosted providers' (OpenAI, Together).

Light (pydantic only, no torch), so the orchestrator that writes these files and the trainer that reads them share
one definition of a line and cannot drift apart.

- Ours: `{"messages": [...prompt...], "chosen": str, "rejected": str, "weight": w, ...}`, one pair per line; the
  prompt is the conversation the answer was given in (it ends with a user turn), `weight` in (0, 1] scales the
  pair's loss, and the optional `kind`, `agent`, `role`, `problem_id` say where the pair came from (for people
  reading the file; the trainer ignores them).
- Hosted: `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}],
  "non_preferred_output": [{"role": "assistant", "content": ...}]}`, each output exactly one assistant message.
  That is OpenAI's preference-finetuning format (developers.openai.com/api/docs/guides/direct-preference-optimization,
  "Data format": its example also carries `"tools": []` and `"parallel_tool_calls": true` inside `input`, which a
  text-only pair does not need), and Together's (docs.together.ai/docs/fine-tuning/preference-tuning: "Both
  outputs must contain exactly one message from the assistant role"; `input.messages` may hold several turns).
  No hosted format has a per-pair weight: hosted runs filter pairs by margin instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backends.base import ChatMessage, DpoParams, Objective
from foundation.errors import UserError

PairKind = Literal["generator", "correction", "anti-sycophancy"]
PairRole = Literal["generator", "critic"]
__all__ = ["DpoParams", "Objective"]  # defined beside FinetuneSpec, which carries them; named here too


def _prompt_ends_with_user(messages: list[ChatMessage]) -> list[ChatMessage]:
    if not messages or messages[-1].role != "user":
        raise ValueError("the prompt must be a conversation that ends with a user turn")
    return messages


class PreferenceLine(BaseModel):
    """One line of our local trainer's preference file."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage]
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0, le=1)
    kind: PairKind | None = None
    agent: int | None = None
    role: PairRole | None = None
    problem_id: str | None = None

    @field_validator("messages")
    @classmethod
    def check_prompt(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        return _prompt_ends_with_user(messages)

    def to_json(self) -> str:
        data = self.model_dump(exclude_none=True)
        data["messages"] = [m.model_dump(exclude_none=True) for m in self.messages]
        return json.dumps(data, ensure_ascii=False)


class HostedInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def check_prompt(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        return _prompt_ends_with_user(messages)


def _one_assistant(messages: list[ChatMessage]) -> list[ChatMessage]:
    if len(messages) != 1 or messages[0].role != "assistant" or not messages[0].content:
        raise ValueError("each output must be exactly one non-empty assistant message")
    return messages


class HostedPreferenceLine(BaseModel):
    """One line of OpenAI's / Together's preference file."""

    model_config = ConfigDict(extra="forbid")

    input: HostedInput
    preferred_output: list[ChatMessage]
    non_preferred_output: list[ChatMessage]

    @field_validator("preferred_output", "non_preferred_output")
    @classmethod
    def check_output(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        return _one_assistant(messages)

    @classmethod
    def of(cls, messages: list[ChatMessage], chosen: str, rejected: str) -> HostedPreferenceLine:
        return cls(
            input=HostedInput(messages=[m.model_copy(update={"weight": None}) for m in messages]),
            preferred_output=[ChatMessage(role="assistant", content=chosen)],
            non_preferred_output=[ChatMessage(role="assistant", content=rejected)],
        )

    def to_json(self) -> str:
        def dump(messages: list[ChatMessage]) -> list[dict[str, object]]:
            return [m.model_dump(exclude_none=True) for m in messages]

        return json.dumps(
            {
                "input": {"messages": dump(self.input.messages)},
                "preferred_output": dump(self.preferred_output),
                "non_preferred_output": dump(self.non_preferred_output),
            },
            ensure_ascii=False,
        )


def read_preference_file(path: Path) -> list[PreferenceLine]:
    """Parse our preference JSONL strictly: a bad line is named by number, so the user can fix the file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read preference file {path}: {exc}; check the path and that it is UTF-8") from exc
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            pairs.append(PreferenceLine.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise UserError(
                f"{path} line {number} is not a preference pair ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                'each line must be {"messages": [...], "chosen": ..., "rejected": ..., "weight": ...}'
            ) from exc
    if not pairs:
        raise UserError(f"preference file {path} has no pairs: build the preference dataset before finetuning")
    return pairs
