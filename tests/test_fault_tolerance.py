"""Long runs survive provider fault storms and outages, and no failure of any kind reaches the user as a traceback.

Each case drives the real CLI in a subprocess against the fake OpenAI server (real HTTP on loopback, the official
SDK) and asserts that no "Traceback" reaches stdout or stderr:
- a seeded 25 % storm of 429s, 500s and dropped connections over a run of more than 2,000 requests finishes in one
  invocation, with exactly the results of a fault-free run of the same seed;
- the server going fully down for 30 s in the middle of a debate: the run rides it out;
- the server down for longer than `give_up_after`: one line, exit 1, and a resume once it is back finishes with
  nothing asked twice;
- an unexpected exception in each subcommand: one line naming the log, which holds the traceback, and a secret
  planted in the environment (and carried by the exception's message) appears in neither.

The runs mostly wait (backoffs, the outage), so they start together in the background and the cases collect them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from foundation import crashpoints
from tests.fake_openai import API_KEY, FakeOpenAI
from tests.test_crash import REPO, RUN, Snapshot, openai_settings, output, write_config

# Retries as fast as the fakes allow: what is tested is whether a run gives up, not how long it waits.
FAST = {"max_retries": 2, "backoff_initial": 0.01, "backoff_max": 0.2, "concurrency": 16}
BIG = {"train_size": 100, "eval_size": 70, "iterations": 1}  # 900 + 2 × 630 debate requests, and the jobs
SMALL = {"train_size": 30, "eval_size": 10, "iterations": 1}
PLANTED = "sk-planted-4f9a2c7e1b3d5a6c8e0f"  # must reach no output and no log


def orchestrator(workdir: Path, *args: str, extra_env: dict[str, str] | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m orchestrator ARGS` in `workdir`, with the fake's key and nothing armed but what is asked."""
    env = {k: v for k, v in os.environ.items()
           if k not in (crashpoints.ENV_VAR, crashpoints.RAISE_VAR, crashpoints.DETAIL_VAR, "MAFT_DEBUG")}
    env.update(OPENAI_API_KEY=API_KEY, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="400",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_args(workdir: Path) -> list[str]:
    return ["run", "--config", str(workdir / "run.toml"), "--name", RUN, "--db", str(workdir / "m.db"), "--quiet"]


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, output(proc)


@dataclass
class Outcome:
    snapshot: Snapshot
    runs: list[subprocess.CompletedProcess[str]]
    requests: int  # every request the server received, faulted ones included
    repeated_chats: int
    outages: int
    seconds: float


def scenario(workdir: Path, sizes: dict[str, Any], *, storm: float = 0.0, outage: tuple[int, float] | None = None,
             give_up_after: float | None = None) -> Outcome:
    """A run in its own folder against its own fake. With an `outage` that never ends (inf), the server comes
    back once the run has given up, and the same command runs again."""
    started = time.monotonic()
    with FakeOpenAI(base_accuracy=0.8, finetune_bonus=0.05) as fake:
        settings = {**FAST, **({"give_up_after": give_up_after} if give_up_after is not None else {})}
        write_config(workdir, openai_settings(fake, **sizes, openai=settings))
        if storm:
            fake.storm(storm, kinds=("429", "500", "drop"), retry_after=0.01)
        if outage is not None:
            fake.outage(*outage)
        runs = [orchestrator(workdir, *run_args(workdir))]
        if runs[-1].returncode != 0 and outage is not None:
            fake.come_up()
            runs.append(orchestrator(workdir, *run_args(workdir)))
        fake.storm(0)
        return Outcome(Snapshot.read(workdir), runs, fake.total_requests(), fake.repeated_chats(), fake.outages,
                       time.monotonic() - started)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Outcome]]]:
    def folder(name: str) -> Path:
        return tmp_path_factory.mktemp(name)

    with ThreadPoolExecutor(max_workers=5, thread_name_prefix="faults") as pool:
        yield {
            "big": pool.submit(scenario, folder("big"), BIG),
            "storm": pool.submit(scenario, folder("storm"), BIG, storm=0.25),
            "small": pool.submit(scenario, folder("small"), SMALL),
            # the train debate has 270 requests: down from the 150th request on
            "outage": pool.submit(scenario, folder("outage"), SMALL, outage=(150, 30.0)),
            "gone": pool.submit(scenario, folder("gone"), SMALL, outage=(150, float("inf")), give_up_after=3.0),
        }


def test_a_25_percent_fault_storm_changes_nothing_and_needs_one_invocation(runs: dict[str, Future[Outcome]]) -> None:
    calm, stormy = runs["big"].result(timeout=900), runs["storm"].result(timeout=900)
    assert calm.requests >= 2000, calm.requests
    assert len(stormy.runs) == 1 and stormy.runs[0].returncode == 0, output(stormy.runs[0])
    no_traceback(stormy.runs[0])
    assert stormy.requests > calm.requests * 1.2  # the storm really faulted about a quarter of them
    assert stormy.snapshot.differences(calm.snapshot) == []


def test_a_server_down_for_30_s_mid_debate_is_ridden_out(runs: dict[str, Future[Outcome]]) -> None:
    calm, outage = runs["small"].result(timeout=900), runs["outage"].result(timeout=900)
    assert outage.outages == 1 and outage.seconds >= 30
    assert len(outage.runs) == 1 and outage.runs[0].returncode == 0, output(outage.runs[0])
    no_traceback(outage.runs[0])
    assert outage.snapshot.differences(calm.snapshot) == []
    assert outage.repeated_chats == 0


def test_a_server_down_past_give_up_after_stops_in_one_line_and_resumes(runs: dict[str, Future[Outcome]]) -> None:
    calm, gone = runs["small"].result(timeout=900), runs["gone"].result(timeout=900)
    stopped, resumed = gone.runs
    assert stopped.returncode == 1, output(stopped)
    no_traceback(stopped)
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1, stopped.stderr
    workdir = Path(stopped.args[stopped.args.index("--config") + 1]).parent
    assert re.fullmatch(
        r"stopped: the provider at http://127\.0\.0\.1:\d+/v1 has answered nothing for 3\.\d s \(.*\); everything "
        rf"finished so far is stored: continue with `orchestrator run --resume {RUN} --db {re.escape(str(workdir))}"
        rf"/m\.db` \(details in {re.escape(str(workdir))}/maft-runs/{RUN}/errors\.log\)", lines[0]), lines[0]
    assert "Traceback" in (workdir / "maft-runs" / RUN / "errors.log").read_text()
    assert resumed.returncode == 0, output(resumed)
    no_traceback(resumed)
    assert gone.snapshot.differences(calm.snapshot) == []
    assert gone.repeated_chats == 0  # nothing answered before the outage was asked again


# -- an unexpected exception in every subcommand ----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FakeOpenAI]]:
    """A small finished openai run, and its fake still serving (jobs cancel and eval talk to it)."""
    workdir = tmp_path_factory.mktemp("finished")
    with FakeOpenAI(base_accuracy=0.8) as fake:
        write_config(workdir, openai_settings(fake, train_size=12, eval_size=4, iterations=1, openai=FAST))
        proc = orchestrator(workdir, *run_args(workdir))
        assert proc.returncode == 0, output(proc)
        yield workdir, fake


COMMANDS = {
    "status": ["status", RUN],
    "report": ["report", RUN],
    "cost": ["cost", RUN],
    "jobs-list": ["jobs", "list", RUN],
    "jobs-cancel": ["jobs", "cancel", RUN],
    "eval": ["eval", RUN, "--task", "arithmetic", "--quiet"],
    "run": ["run", "--resume", RUN, "--quiet"],
    "run.started": ["run", "--resume", RUN, "--quiet", "--iterations", "2"],  # the run recorded, then it fails
}


@pytest.mark.parametrize("point", list(COMMANDS))
def test_an_unexpected_failure_is_one_line_and_a_scrubbed_log(finished_run: tuple[Path, FakeOpenAI],
                                                              point: str) -> None:
    workdir, _ = finished_run
    log = workdir / "maft-runs" / RUN / "errors.log"
    log.unlink(missing_ok=True)
    proc = orchestrator(workdir, *COMMANDS[point], "--db", str(workdir / "m.db"),
                        extra_env={crashpoints.RAISE_VAR: f"cli.{point}",
                                   crashpoints.DETAIL_VAR: f"the proxy said Authorization: {PLANTED}",
                                   "MY_PROXY_API_KEY": PLANTED})
    assert proc.returncode == 1, output(proc)
    no_traceback(proc)
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("error: unexpected InjectedFailure in `orchestrator "), line
    assert f"failure injected at cli.{point}" in line and f"the traceback is in {log}" in line
    if point == "run.started":
        assert f"continue with `orchestrator run --resume {RUN} --db {workdir / 'm.db'}`" in line
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "InjectedFailure" in text
    assert PLANTED not in proc.stdout + proc.stderr + text
    assert "***" in text  # the secret was there, and was scrubbed


def test_debug_shows_the_traceback(finished_run: tuple[Path, FakeOpenAI]) -> None:
    workdir, _ = finished_run
    proc = orchestrator(workdir, "status", RUN, "--db", str(workdir / "m.db"), "--debug",
                        extra_env={crashpoints.RAISE_VAR: "cli.status"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "InjectedFailure" in proc.stderr


# -- the progress bar ---------------------------------------------------------------------------------------------


@pytest.mark.fake_openai(base_accuracy=0.8)
def test_the_progress_bar_shows_the_retry_pressure(tmp_path: Path, fake_openai: FakeOpenAI) -> None:
    from rich.console import Console

    from backends.openai import OpenAIBackend
    from backends.openai_settings import OpenAIConfig
    from orchestrator.config import RunConfig
    from orchestrator.debate import Society
    from orchestrator.pipeline import Pipeline, open_run
    from orchestrator.store import Store, StoreState

    fake_openai.inject("POST /v1/chat/completions", "429", times=5, retry_after=0.01)
    fake_openai.inject("POST /v1/chat/completions", "500", times=2)
    config = RunConfig(backend="openai", model="gpt-4.1-mini-2025-04-14", train_size=4, eval_size=2, rounds=1,
                       openai=OpenAIConfig(base_url=fake_openai.base_url, poll_interval=0.01, concurrency=1,
                                           backoff_initial=0.01))
    store = Store(tmp_path / "m.db")
    backend = OpenAIBackend(config.model, config.openai, StoreState(store, "openai"), show_progress=False,
                            environ={"OPENAI_API_KEY": fake_openai.api_key})
    console = Console(record=True, force_terminal=True, width=200)
    pipeline = Pipeline(config=config, run=open_run(store, config, "p", must_exist=False), store=store,
                        backend=backend, workdir=tmp_path / "w", console=console, show_progress=True,
                        poll_interval=0.01)
    train, _ = pipeline.problems()
    pipeline.debate("train-1", train, Society.base(config.agents), 1)
    backend.close()
    store.close()
    assert "retrying 0 · 429s 5 · 5xx 2" in console.export_text()
