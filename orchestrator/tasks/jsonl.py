"""A user's own problems: one JSON object per line with `question` (or `problem`) and `answer`.

Optional `id` and `split` ("train" or "test"). Lines without a split are assigned by a hash of the question,
20% to eval, so the split is stable however the file is reordered or extended. The file is read and checked
when the task is created, so a typo on line 812 stops the run before any model is called. Prompts and
grading are MATH's (boxed answers; exact numbers, else math-verify) since that fits free-form answers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from foundation.errors import UserError
from orchestrator.tasks.answers import extract_boxed
from orchestrator.tasks.base import Problem, Task
from orchestrator.tasks.math import DEFAULTS as MATH_DEFAULTS
from orchestrator.tasks.math import MathGrader
from orchestrator.tasks.sampling import draw, is_eval

_SPLITS = {"train": False, "test": True, "eval": True}  # value: held out
DEFAULTS = MATH_DEFAULTS  # free-form answers with MATH's prompts: MATH's lengths


class JsonlTask(Task):
    family = "math"

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = path
        self.name = name if name is not None else str(path)
        self._train, self._eval = _load(path)
        self._grader = MathGrader()

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        return draw(self._train, n, seed, self.name, "train")

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        return draw(self._eval, n, seed, self.name, "eval")

    def extract_answer(self, text: str) -> str | None:
        return extract_boxed(text)

    def equivalent(self, a: str, b: str) -> bool:
        return self._grader.equivalent(a, b)


def _load(path: Path) -> tuple[list[Problem], list[Problem]]:
    where = f"task file '{path}'"
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"{where} {what}: give the path of a .jsonl file with one problem per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text ({e.reason}): save it as UTF-8") from e

    pools: dict[bool, list[Problem]] = {False: [], True: []}
    ids: dict[str, int] = {}
    questions: dict[str, tuple[int, bool]] = {}  # normalised question -> (line, held out)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        at = f"{where} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{at} is not valid JSON ({e.msg}): write one JSON object per line") from e
        if not isinstance(row, dict):
            raise UserError(
                f"{at} is not a JSON object: write one object per line, e.g. "
                '{"question": "...", "answer": "..."}'
            )
        question = _question(row, at)
        answer = _answer(row, at)
        key = " ".join(question.split())
        held_out = _split(row, at, key)
        problem_id = str(row["id"]) if row.get("id") is not None else f"{path.stem}/{number}"
        if problem_id in ids:
            raise UserError(f"{at} repeats id '{problem_id}' from line {ids[problem_id]}: make ids unique")
        ids[problem_id] = number
        if key in questions and questions[key][1] != held_out:
            raise UserError(
                f"{at} has the same question as line {questions[key][0]} but the other split: "
                "a problem cannot be in both train and test"
            )
        questions.setdefault(key, (number, held_out))
        problem = Problem(id=problem_id, question=question, answer=answer, meta={"line": number})
        pools[held_out].append(problem)
    if not ids:
        raise UserError(f"{where} is empty: add one JSON object per line with 'question' and 'answer'")
    return pools[False], pools[True]


def _question(row: dict[str, Any], at: str) -> str:
    value = row.get("question", row.get("problem"))
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{at} has no 'question' (or 'problem') string: add the problem text")
    return value


def _answer(row: dict[str, Any], at: str) -> str:
    value = row.get("answer")
    if isinstance(value, bool) or value is None:  # bool is an int in Python, but never a meant answer
        raise UserError(f"{at} has no 'answer': add the final answer as a string or number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"{at} has a non-finite 'answer' ({value}): give a finite number or a string")
        return repr(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise UserError(f"{at} has an empty or non-scalar 'answer': give the final answer as a string or number")


def _split(row: dict[str, Any], at: str, key: str) -> bool:
    split = row.get("split")
    if split is None:
        return is_eval(key)
    if not isinstance(split, str) or split.lower() not in _SPLITS:
        raise UserError(f'{at} has split {split!r}: use "train" or "test" (or leave it out)')
    return _SPLITS[split.lower()]
