"""How the report names and spells things: societies, methods, metrics and backends as people read them, the
order tables list them in, the styles plots draw them with, what an evaluation debate's name says, and the one
spelling of a number each of the report's outputs shares.

Every place the report knows a society, a method or a backend by its stored name is here; societies and backends
come from their registries (`orchestrator.societies`, `backends`).
"""

from __future__ import annotations

import time
from typing import Any

from backends import backend_names
from orchestrator.evaluate import MATCHED_MAJORITY
from orchestrator.names import DebateName
from orchestrator.societies import BASE, MAFT, SOCIETIES, STUDENTS

METHOD_LABELS = {"single": "single agent", "majority": "majority vote", "debate": "debate",
                 MATCHED_MAJORITY: "majority vote, N x M samples"}
SOCIETY_LABELS = {name: spec.label for name, spec in SOCIETIES.items()}
# Paper's Table 1 order: baselines first, then ours and its ablations; unknown societies follow by name.
SOCIETY_ORDER = tuple(sorted(SOCIETIES, key=lambda name: SOCIETIES[name].paper_rank))
METRIC_LABELS = {
    "consensus": "consensus (share of agents agreeing with the majority)",
    "embedding_dissimilarity": "embedding dissimilarity (1 − mean pairwise cosine)",
    "critic_nll_final": "critic NLL of the other critics' final answers",
    "critic_nll": "critic NLL of the other agents' round-1 answers (earlier definition)",
    "final_consensus": "final-round consensus (debates table)",
}
# The settings sections of RunConfig that belong to one backend (the registry's): the report shows only the run's own.
BACKEND_SECTIONS = frozenset(backend_names())

# How plots draw each method and society.
METHOD_COLORS = {"single": "#1f77b4", "majority": "#ff7f0e", "debate": "#2ca02c", MATCHED_MAJORITY: "#9467bd"}
SOCIETY_COLORS = {name: spec.color for name, spec in SOCIETIES.items()}
SOCIETY_LINES: dict[str, Any] = {name: spec.line for name, spec in SOCIETIES.items() if spec.kind != "base"}
SOCIETY_MARKERS = {name: spec.marker for name, spec in SOCIETIES.items()}


def society_name(society: str) -> str:
    return SOCIETY_LABELS.get(society, society)


def society_label(society: str, iteration: int) -> str:
    name = society_name(society)
    return name if society == BASE else f"{name}, iteration {iteration}"


def method_name(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def answers_once(society: str) -> bool:
    """A distilled student or the soup: one agent answering in one round, so its single agent, majority vote and
    debate are the same answer, and diversity (among agents) is not defined for it."""
    return society in STUDENTS


ONE_ANSWER = "one answer"  # the method of a society that `answers_once`


def kept_row(society: str, method: str) -> bool:
    """Whether an accuracy row is shown: all three of a society's, one of a student's (its debate row, graded once
    per problem, which the other two repeat)."""
    return not answers_once(society) or method == "debate"


def society_method(society: str, method: str) -> str:
    """A method as a table names it for `society`: "one answer" for a student."""
    return ONE_ANSWER if answers_once(society) else method_name(method)


def method_order(method: str) -> int:
    return list(METHOD_LABELS).index(method) if method in METHOD_LABELS else len(METHOD_LABELS)


def method_rank(method: str) -> tuple[int, str]:
    return method_order(method), method


def society_rank(society: str) -> tuple[int, str]:
    return (SOCIETY_ORDER.index(society) if society in SOCIETY_ORDER else len(SOCIETY_ORDER), society)


def table_rank(society: str) -> int:
    """The terminal comparison's order: by SOCIETY_LABELS, unknown societies last."""
    return list(SOCIETY_LABELS).index(society) if society in SOCIETY_LABELS else 99


# evaluation debates ----------------------------------------------------------------------------------------

def parse_eval_debate(name: str) -> tuple[str, int] | None:
    """(society, iteration) of an evaluation debate on the run's own task: `eval-0` is the base society, `eval-k`
    multiagent FT after k iterations, `SOCIETY/eval-k` another finetuned society (an ablation or a baseline);
    None for training and transfer debates."""
    parsed = DebateName.parse(name)
    if parsed is None or not parsed.is_evaluation or parsed.transfer is not None:
        return None
    return (BASE if parsed.iteration == 0 and parsed.society == MAFT else parsed.society), parsed.iteration


def debate_society(name: str) -> str:
    parsed = parse_eval_debate(name)
    if parsed is None:
        return name
    society, iteration = parsed
    return "base society" if society == BASE else f"{society_name(society)}, iteration {iteration}"


# numbers and times -----------------------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def acc_text(accuracy: float, stderr: float) -> str:
    """The one spelling of "accuracy ± s.e." in percent, shared by the terminal, HTML and Markdown."""
    return f"{pct(accuracy)} ± {pct(stderr)}"


def usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def mark(correct: bool | None) -> str:
    """✓ or ✗ beside an answer graded against the ground truth; nothing where it could not be graded."""
    return {True: "✓", False: "✗"}.get(correct, "") if correct is not None else ""


def when_seconds(ts: float | None) -> str | None:
    """A stored timestamp in local time, to the second (the terminal and `--json`); None stays None."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else None


def when_minutes(ts: float | None) -> str:
    """A stored timestamp in local time, to the minute (the report files); "—" when there is none."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "—"
