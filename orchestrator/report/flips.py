"""The debate's flip rates (issue 14): how often an agent's answer goes from wrong to right, and from right to wrong,
between its round-1 answer and its final-round one, per evaluation debate, graded against the ground truth.

A debate helps when it corrects more than it corrupts; a preference objective that teaches critics to keep a right
answer (anti-sycophancy pairs) should lower right→wrong without raising the other. An unreadable answer (no answer
found, or cut at max_tokens) counts as not right, as it does for accuracy. Debates of one round (a student, the
soup) have nothing to flip and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.debate import readable_answer
from orchestrator.report.labels import debate_society, parse_eval_debate
from orchestrator.report.samples import index_responses, make_grader
from orchestrator.store import Store


@dataclass(frozen=True)
class FlipLine:
    debate: str
    society: str  # as the report names it: "base society", "multiagent FT, iteration 2", ...
    society_id: str  # as the store names it: "base", "maft", "star", ... (what `--json` and the terminal key on)
    iteration: int
    answers: int  # (problem, agent) pairs with a round-1 and a final-round answer
    wrong_to_right: int
    right_to_wrong: int

    @property
    def wrong_to_right_pct(self) -> str:
        return f"{100 * self.wrong_to_right / self.answers:.1f}"

    @property
    def right_to_wrong_pct(self) -> str:
        return f"{100 * self.right_to_wrong / self.answers:.1f}"


def flip_lines(store: Store, run_id: str, names: Sequence[str], task_spec: str) -> list[FlipLine]:
    """One line per evaluation debate of more than one round on the run's own task, in the order of `names`."""
    grade, _ = make_grader(task_spec)
    truth = {p.problem_id: p.answer for p in store.get_problems(run_id, "eval")}
    lines = []
    for name in names:
        parsed = parse_eval_debate(name)
        if parsed is None:
            continue
        by_problem = index_responses(store.get_responses(run_id, name).values())
        answers = fixed = broken = 0
        for problem_id, responses in by_problem.items():
            last = max((r for r, _, kind in responses if kind == "answer"), default=1)
            if problem_id not in truth or last < 2:
                continue
            for agent in sorted({a for r, a, kind in responses if kind == "answer" and r == 1}):
                first, final = responses.get((1, agent, "answer")), responses.get((last, agent, "answer"))
                if first is None or final is None:
                    continue
                before = grade(readable_answer(first), truth[problem_id]) is True
                after = grade(readable_answer(final), truth[problem_id]) is True
                answers += 1
                fixed += not before and after
                broken += before and not after
        if answers:
            lines.append(FlipLine(debate=name, society=debate_society(name), society_id=parsed[0],
                                  iteration=parsed[1], answers=answers,
                                  wrong_to_right=fixed, right_to_wrong=broken))
    return lines
