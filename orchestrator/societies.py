"""The societies a run can train and evaluate, in one registry that `--baselines`, the pipeline, the cost estimate
and the report all read: adding a baseline or an ablation is one entry here plus the code that trains it.

A society's `name` is a key of rows already on disk (debate names, job keys, evaluations), so it must never
change; everything else here (labels, plot styles, help text) is presentation and may.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from backends.base import Objective

# "objective": the multiagent society trained on the same debates by another `[training] objective`
SocietyKind = Literal["base", "multiagent", "single-model", "ablation", "objective", "student"]


class SocietySpec(BaseModel):
    """One society: how it is trained (its kind and the multiagent settings an ablation changes), how the report
    names and draws it, and what `--help` says of it."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: SocietyKind
    label: str
    help: str = ""  # --baselines' description; empty for the two that are not baselines (base, maft)
    paper_rank: int  # the paper's Table 1 order: baselines first, then ours and its ablations
    summarize: bool | None = None  # an ablation's summary setting; None: the run's own
    train_critics: bool = True  # False: an ablation that finetunes only the generators
    objective: Objective | None = None  # an objective variant's training objective; None: the run's own
    trained_roles: Literal["first-generator", "generators", "all"] = "all"  # what the cost estimate scales by
    color: str
    line: Any = "-"  # a matplotlib line style
    marker: str = "o"


BASE = "base"  # the untrained model: iteration 0 of every society
MAFT = "maft"  # the multiagent society: its debates and jobs carry no society prefix
STAR = "star"
MAJORITY_FT = "majority-ft"
SINGLE_FT = "single-ft"
NO_SUMMARY = "no-summary"
NO_CRITIC = "no-critic"
MAFT_SFT = "maft-sft"
MAFT_DPO = "maft-dpo"
MAFT_SFT_DPO = "maft-sft-dpo"
DISTILL = "distill"  # one student distilled from a finetuned society, answering in a single pass
SOUP = "soup"  # the society's generator adapters averaged into one, no training (local backend)

# In the terminal comparison's order (the report's other tables follow paper_rank).
SOCIETIES: dict[str, SocietySpec] = {s.name: s for s in (
    SocietySpec(name=BASE, kind="base", label="base", paper_rank=0, color="#7f7f7f"),
    SocietySpec(name=MAFT, kind="multiagent", label="multiagent FT", paper_rank=4, color="#1f77b4"),
    SocietySpec(name=STAR, kind="single-model", label="STaR", paper_rank=1, color="#d62728", line="--",
                marker="s", trained_roles="first-generator",
                help="STaR (ground-truth filtered answers, rationalized when wrong)"),
    SocietySpec(name=MAJORITY_FT, kind="single-model", label="majority FT", paper_rank=2, color="#9467bd",
                line=":", marker="^", trained_roles="generators",
                help="one model on answers that agree with a majority of N samples"),
    SocietySpec(name=SINGLE_FT, kind="single-model", label="single-agent FT", paper_rank=3, color="#8c564b",
                line="-.", marker="v", help="one model on every debate answer that agrees with the majority"),
    SocietySpec(name=NO_SUMMARY, kind="ablation", label="multiagent FT, no summary", paper_rank=5,
                color="#e377c2", line=(0, (5, 1)), marker="D", summarize=False,
                help="multiagent FT with concatenated answers"),
    SocietySpec(name=NO_CRITIC, kind="ablation", label="multiagent FT, no critic", paper_rank=6, color="#17becf",
                line=(0, (3, 1, 1, 1)), marker="P", train_critics=False, trained_roles="generators",
                help="multiagent FT with only generators finetuned"),
    SocietySpec(name=MAFT_SFT, kind="objective", label="multiagent FT, SFT", paper_rank=7, color="#2ca02c",
                line=(0, (4, 2)), marker="h", objective="sft",
                help="multiagent FT trained by SFT (beside a run whose objective is dpo or sft-then-dpo)"),
    SocietySpec(name=MAFT_DPO, kind="objective", label="multiagent FT, DPO", paper_rank=8, color="#ff7f0e",
                line=(0, (6, 2)), marker="<", objective="dpo",
                help="multiagent FT trained by DPO + NLL on preference pairs from the same debates"),
    SocietySpec(name=MAFT_SFT_DPO, kind="objective", label="multiagent FT, SFT then DPO", paper_rank=9,
                color="#98df8a", line=(0, (6, 1, 1, 1)), marker=">", objective="sft-then-dpo",
                help="multiagent FT trained by SFT, then DPO on preference pairs from the same debates"),
    SocietySpec(name=DISTILL, kind="student", label="distilled student", paper_rank=10, color="#bcbd22",
                line=(0, (1, 1)), marker="*", trained_roles="first-generator",
                help="one model finetuned on the society's consensus chains, answering once (`orchestrator distill`)"),
    SocietySpec(name=SOUP, kind="student", label="society soup", paper_rank=11, color="#aec7e8",
                line=(0, (2, 2)), marker="x", trained_roles="first-generator",
                help="the generators' LoRA adapters averaged into one, answering once (`distill`, local backend)"),
)}

# the societies `--baselines` may ask for beside the multiagent one: the paper's baselines, then its ablations, then
# the multiagent society trained by the other objectives; each one's debates and jobs carry its name as a prefix
BASELINES = tuple(sorted((s.name for s in SOCIETIES.values() if s.kind in ("single-model", "ablation", "objective")),
                         key=lambda name: SOCIETIES[name].paper_rank))
ABLATIONS = tuple(name for name in BASELINES if SOCIETIES[name].kind == "ablation")
OBJECTIVES = tuple(name for name in BASELINES if SOCIETIES[name].kind == "objective")
# what `--baselines all` asks for: the paper's baselines and ablations (an objective variant is asked by its name)
PAPER_BASELINES = tuple(name for name in BASELINES if name not in OBJECTIVES)
# the multiagent society with one setting changed: debated, finetuned and evaluated by the pipeline's own iteration
VARIANTS = ABLATIONS + OBJECTIVES
# models distilled from a society (`orchestrator distill`), evaluated answering once
STUDENTS = tuple(s.name for s in SOCIETIES.values() if s.kind == "student")
# every society whose debates and jobs carry its name as a prefix
PREFIXED = BASELINES + STUDENTS


def baselines_help(more: dict[str, str] | None = None) -> str:
    """`--baselines`' description of each choice, from the registry, then of the choices that are no society
    (`more`: name -> description)."""
    said = [(s.name, s.help) for name in BASELINES if (s := SOCIETIES[name]).help] + list((more or {}).items())
    return "; ".join(f"{name}: {text}" for name, text in said) + "."
