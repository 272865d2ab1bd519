"""The society registry is the one list `--baselines`, the pipeline, the estimate and the report read."""

from __future__ import annotations

from click.testing import CliRunner

from orchestrator.baselines import SINGLE_MODEL_METHODS
from orchestrator.cli import cli, parse_baselines
from orchestrator.names import DebateName
from orchestrator.report.labels import SOCIETY_COLORS, SOCIETY_ORDER, society_name
from orchestrator.societies import ABLATIONS, BASELINES, MAFT, OBJECTIVES, PAPER_BASELINES, SOCIETIES, STUDENTS


def test_every_baseline_has_a_way_to_train_it() -> None:
    single = {name for name, spec in SOCIETIES.items() if spec.kind == "single-model"}
    assert single == set(SINGLE_MODEL_METHODS)
    assert set(ABLATIONS) == {name for name, spec in SOCIETIES.items() if spec.kind == "ablation"}
    assert set(OBJECTIVES) == {name for name, spec in SOCIETIES.items() if spec.kind == "objective"}
    assert all(SOCIETIES[name].objective is not None for name in OBJECTIVES)
    assert set(BASELINES) == single | set(ABLATIONS) | set(OBJECTIVES)
    assert MAFT not in BASELINES and "base" not in BASELINES


def test_baselines_follow_the_papers_table_order() -> None:
    assert PAPER_BASELINES == ("star", "majority-ft", "single-ft", "no-summary", "no-critic")
    assert BASELINES[:5] == PAPER_BASELINES and BASELINES[5:] == ("maft-sft", "maft-dpo", "maft-sft-dpo")
    assert SOCIETY_ORDER == ("base", "star", "majority-ft", "single-ft", MAFT, "no-summary", "no-critic", "maft-sft",
                             "maft-dpo", "maft-sft-dpo", "distill", "soup")
    assert parse_baselines("all") == PAPER_BASELINES


def test_the_report_and_help_read_the_registry() -> None:
    for name, spec in SOCIETIES.items():
        assert society_name(name) == spec.label
        assert SOCIETY_COLORS[name] == spec.color
    text = CliRunner().invoke(cli, ["run", "--help"], terminal_width=400).output
    words = " ".join(text.split()).replace("- ", "-")  # help wraps at hyphens too
    for name in BASELINES:
        assert f"{name}: {SOCIETIES[name].help}" in words
    assert "majority-matched: a majority vote of as many round-1 samples" in words


def test_a_baselines_debates_are_named_by_the_registry() -> None:
    assert STUDENTS == ("distill", "soup") and not set(STUDENTS) & set(BASELINES)  # no `--baselines` choice
    for name in BASELINES + STUDENTS:
        debate = DebateName(stage="eval", iteration=2, society=name)
        assert DebateName.parse(str(debate)) == debate


def test_ablations_change_exactly_their_own_setting() -> None:
    assert SOCIETIES["no-summary"].summarize is False and SOCIETIES["no-summary"].train_critics
    assert SOCIETIES["no-critic"].summarize is None and not SOCIETIES["no-critic"].train_critics
