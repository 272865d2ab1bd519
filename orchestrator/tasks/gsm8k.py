"""GSM8K (Cobbe et al. 2021): grade-school word problems with integer answers.

Train problems come from the official train file and eval problems from the official test file, so the two
are disjoint by construction. The data ships inside the package (see data/README.md) so a run needs no
network and every machine sees the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.tasks.answers import extract_numeric_answer, numeric_equivalent
from orchestrator.tasks.base import Problem, Task, paper_defaults
from orchestrator.tasks.sampling import draw

DATA_DIR = Path(__file__).parent / "data" / "gsm8k"
DEFAULTS = paper_defaults(max_tokens=512, max_length=2048)


def gold_answer(solution: str) -> str:
    """The final answer of an official solution: the text after `####`, without thousands commas."""
    _, sep, tail = solution.rpartition("####")
    if not sep:
        raise ValueError("GSM8K solution has no '####' line")
    return tail.strip().replace(",", "")


class GSM8KTask(Task):
    name = "gsm8k"
    family = "gsm8k"

    def __init__(self, data_dir: Path = DATA_DIR) -> None:
        self._data_dir = data_dir
        self._splits: dict[str, list[Problem]] = {}  # loaded on first use: most runs touch one task only

    def train_problems(self, n: int, seed: int) -> list[Problem]:
        return draw(self._load("train"), n, seed, self.name, "train")

    def eval_problems(self, n: int, seed: int) -> list[Problem]:
        return draw(self._load("test"), n, seed, self.name, "eval")

    def extract_answer(self, text: str) -> str | None:
        return extract_numeric_answer(text)

    def equivalent(self, a: str, b: str) -> bool:
        return numeric_equivalent(a, b)

    def _load(self, split: str) -> list[Problem]:
        if split not in self._splits:
            problems = []
            with (self._data_dir / f"{split}.jsonl").open(encoding="utf-8") as f:
                for i, line in enumerate(f):
                    row = json.loads(line)
                    problems.append(
                        Problem(
                            id=f"gsm8k/{split}/{i}",
                            question=row["question"],
                            answer=gold_answer(row["answer"]),
                            meta={"solution": row["answer"]},  # the worked solution, for STaR rationales
                        )
                    )
            self._splits[split] = problems
        return self._splits[split]
