"""Tasks: problems with train/eval splits that never overlap, answer extraction and grading.

`get_task(spec)` is the one entry point; the spec is what the user types after `--task`.
"""

from __future__ import annotations

import os
from pathlib import Path

from foundation.errors import UserError
from orchestrator.tasks.arithmetic import DEFAULTS as ARITHMETIC_DEFAULTS
from orchestrator.tasks.arithmetic import VARIANTS, ArithmeticTask
from orchestrator.tasks.base import Problem, Task, TaskDefaults
from orchestrator.tasks.gsm8k import DEFAULTS as GSM8K_DEFAULTS
from orchestrator.tasks.gsm8k import GSM8KTask
from orchestrator.tasks.jsonl import DEFAULTS as JSONL_DEFAULTS
from orchestrator.tasks.jsonl import JsonlTask
from orchestrator.tasks.math import DEFAULTS as MATH_DEFAULTS
from orchestrator.tasks.math import MathTask

__all__ = ["TASK_SPECS_HELP", "Problem", "Task", "TaskDefaults", "get_task", "task_defaults"]

TASK_SPECS_HELP = (
    "arithmetic (a+b*c+d-e*f, values 0-29, as in the paper), arithmetic:easy (a+b, 0-20), "
    "arithmetic:medium (a+b*c, 0-10), gsm8k, math (levels 1-3, as in the paper), math:all, "
    'math:N or math:A-B (levels 1-5), or a path to a .jsonl file of {"question", "answer"} lines'
)

_KNOWN = "arithmetic, arithmetic:easy, arithmetic:medium, gsm8k, math, math:all, math:4, math:2-4"


def _kind(spec: str) -> str | None:
    """Which task a spec names, without loading anything: "jsonl", an arithmetic variant, "gsm8k", "math", or
    None. A spec that looks like a path (ends in .jsonl or has a separator) is a file."""
    s = spec.strip()
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    if s.lower().endswith(".jsonl") or any(sep in s for sep in separators):
        return "jsonl"
    key = s.lower()
    if key in VARIANTS or key == "gsm8k":
        return key
    if key == "math" or key.startswith("math:"):
        return "math"
    return None


def get_task(spec: str) -> Task:
    """The task a spec names."""
    s = spec.strip()
    kind = _kind(s)
    if kind == "jsonl":
        return JsonlTask(Path(s).expanduser(), name=s)
    if kind in VARIANTS:
        return ArithmeticTask(s.lower())
    if kind == "gsm8k":
        return GSM8KTask()
    if kind == "math":
        return MathTask.from_spec(s)
    raise UserError(f"task '{spec}' is unknown: use one of {_KNOWN}, or a path to a .jsonl file")


def task_defaults(spec: str) -> TaskDefaults:
    """The settings a run of `spec` uses where its config is silent (a spec that names no task gets the paper's
    MATH defaults here, and its one-line error from `get_task` when the run starts)."""
    kind = _kind(spec) or ""
    if kind in ARITHMETIC_DEFAULTS:
        return ARITHMETIC_DEFAULTS[kind]
    return {"gsm8k": GSM8K_DEFAULTS, "jsonl": JSONL_DEFAULTS}.get(kind, MATH_DEFAULTS)
