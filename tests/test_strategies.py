"""The three iteration strategies (METHOD.md §4): continue, restart, and accumulate (the base model on all of an
agent's own data from iterations 1..ℓ)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from backends.base import BASE_MODEL_ID, BackendInfo
from foundation.errors import UserError
from orchestrator.config import RunConfig
from orchestrator.estimate import estimate_run
from orchestrator.pipeline import Pipeline, open_run
from orchestrator.store import Store
from orchestrator.tasks import get_task
from tests.fakes import ScriptedBackend

SMALL = dict(task="arithmetic:easy", agents=3, rounds=2, train_size=12, eval_size=4, seed=3, iterations=2)


def run(tmp_path: Path, strategy: str, baselines: tuple[str, ...] = ()) -> tuple[Store, ScriptedBackend]:
    config = RunConfig(**SMALL, strategy=strategy)
    backend = ScriptedBackend()
    store = Store(tmp_path / f"{strategy}.db")
    run_row = open_run(store, config, "r", must_exist=False)
    Pipeline(config=config, run=run_row, store=store, backend=backend, workdir=tmp_path / strategy,
             console=Console(quiet=True), show_progress=False, poll_interval=0).run(baselines)
    return store, backend


def lines(path: str) -> list[str]:
    return Path(path).read_text().splitlines()


def test_accumulate_trains_iteration_2_from_the_base_model_on_both_iterations_data(tmp_path):
    accumulated, backend = run(tmp_path, "accumulate", baselines=("single-ft", "star"))
    # restart debates iteration 2 with the same iteration-1 models (both train the base model at iteration 1),
    # so its iteration-2 files are exactly the data iteration 2 adds
    restarted, _ = run(tmp_path, "restart", baselines=("single-ft", "star"))
    for society in ("maft", "single-ft"):
        first = {(d.agent, d.role): d for d in accumulated.get_datasets("r", 1, society)}
        own = {(d.agent, d.role): d for d in restarted.get_datasets("r", 2, society)}
        second = accumulated.get_datasets("r", 2, society)
        assert second and len(second) == len(first) == len(own)
        for d in second:
            slot = (d.agent, d.role)
            assert lines(d.path) == lines(first[slot].path) + lines(own[slot].path)
            assert d.n_examples == first[slot].n_examples + own[slot].n_examples == len(lines(d.path))
            assert d.n_critic_neg == first[slot].n_critic_neg + own[slot].n_critic_neg
    # STaR restarts on its latest data whatever the strategy
    for store in (accumulated, restarted):
        (star,) = store.get_datasets("r", 2, "star")
        assert star.n_examples == len(lines(star.path))
    (acc_star,), (re_star,) = accumulated.get_datasets("r", 2, "star"), restarted.get_datasets("r", 2, "star")
    assert lines(acc_star.path) == lines(re_star.path)
    # every model of every iteration starts from the base model, on its accumulated file
    assert backend.specs and all(s.base_model == BASE_MODEL_ID for s in backend.specs)
    trained_files = {str(s.training_file) for s in backend.specs}
    assert {d.path for d in accumulated.get_datasets("r", 2, "maft")} <= trained_files


def test_continue_and_restart_train_on_the_iterations_own_data(tmp_path):
    for strategy in ("continue", "restart"):
        store, backend = run(tmp_path, strategy)
        first = {(d.agent, d.role): lines(d.path) for d in store.get_datasets("r", 1)}
        for d in store.get_datasets("r", 2):
            earlier = first[(d.agent, d.role)]
            assert not earlier or lines(d.path)[: len(earlier)] != earlier  # not iteration 1's data again
        iteration2 = [s for s in backend.specs if "-i2-" in s.suffix]
        assert iteration2 and all((s.base_model == BASE_MODEL_ID) == (strategy == "restart") for s in iteration2)


def test_accumulate_refuses_an_earlier_file_that_changed(tmp_path):
    store, _ = run(tmp_path, "accumulate")
    config = RunConfig(**{**SMALL, "iterations": 3}, strategy="accumulate")
    previous = store.get_datasets("r", 2)[0]
    Path(previous.path).write_text("{}\n")
    with pytest.raises(UserError, match="changed since"):
        Pipeline(config=config, run=open_run(store, config, "r", must_exist=True), store=store,
                 backend=ScriptedBackend(), workdir=tmp_path / "accumulate", console=Console(quiet=True),
                 show_progress=False, poll_interval=0).run()


def test_the_dry_run_counts_accumulated_training_tokens():
    info = BackendInfo(name="local", base_model="m")
    task = get_task("arithmetic:easy")

    def trained(strategy: str) -> dict[int, int]:
        config = RunConfig(**{**SMALL, "iterations": 3}, strategy=strategy)
        return {e.iteration: e.trained_tokens for e in estimate_run(config, task, _free(), info) if
                e.stage == "training"}

    restart, accumulate = trained("restart"), trained("accumulate")
    assert accumulate[1] == restart[1]
    assert accumulate[2] == restart[1] + restart[2] and accumulate[3] == sum(restart.values())


def _free():
    from orchestrator.costs import Pricing

    return Pricing(None, "m")
