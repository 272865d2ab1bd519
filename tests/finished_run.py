"""A finished run to use (`ask`, `solve`, `serve`, `export`) and the CLI that uses it, for test_use and test_serve.

The run is the openai backend against the fake OpenAI server on 127.0.0.1 (one finished run of 3 agents, 2
rounds, 1 iteration, made once per session by conftest's `finished`), so every chat the commands send is counted by
the server: `chat_bodies` by request content, `repeated_chats()` for a request answered twice. Each test works on
its own copy of the run's database. Requests go one at a time (`concurrency = 1`).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from foundation import crashpoints
from tests.fake_openai import API_KEY, FakeOpenAI

REPO = Path(__file__).resolve().parents[1]
RUN = "use"
AGENTS, ROUNDS = 3, 2
PER_QUESTION = AGENTS * ROUNDS + AGENTS * (ROUNDS - 1)  # answers, plus one summary per agent in each later round
KILLED = -signal.SIGKILL


def cli_env(crash_at: str | None = None) -> dict[str, str]:
    """The CLI's environment: the fake server's key, offline, wide so rich wraps nothing, optionally armed to die
    by SIGKILL at a crash point."""
    env = {k: v for k, v in os.environ.items() if k not in (crashpoints.ENV_VAR, crashpoints.TRACE_VAR)}
    env.update(OPENAI_API_KEY=API_KEY, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="250",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if crash_at is not None:
        env[crashpoints.ENV_VAR] = crash_at
    return env


def cli_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args, "--db", str(workdir / "m.db")]


def cli(workdir: Path, *args: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """`orchestrator ARGS --db m.db` in `workdir` (so no `.env` of the checkout is read)."""
    return subprocess.run(cli_command(workdir, *args), cwd=workdir, env=cli_env(crash_at), capture_output=True,
                          text=True, timeout=300)


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-3000:]}"


class Finished:
    """The finished run and the fake server that served it (still serving)."""

    def __init__(self, fake: FakeOpenAI, folder: Path) -> None:
        self.fake = fake
        self.folder = folder

    def copy(self, to: Path) -> Path:
        """A workdir of its own holding a copy of the run's database."""
        to.mkdir(parents=True, exist_ok=True)
        source, target = sqlite3.connect(self.folder / "m.db"), sqlite3.connect(to / "m.db")
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        return to


def finished_run(folder: Path) -> Iterator[Finished]:
    """One finished run of the openai backend on the fake server (3 agents, 2 rounds, 1 iteration), in `folder`;
    the server keeps serving while the generator is open."""
    with FakeOpenAI(base_accuracy=0.8, finetune_bonus=0.05) as fake:
        (folder / "run.toml").write_text(
            f'backend = "openai"\nmodel = "gpt-4.1-mini-2025-04-14"\ntask = "arithmetic:easy"\nagents = {AGENTS}\n'
            f"rounds = {ROUNDS}\niterations = 1\ntrain_size = 30\neval_size = 4\ncritic_mix = 0.0\nseed = 0\n\n"
            f'[openai]\nbase_url = "{fake.base_url}"\npoll_interval = 0.01\nconcurrency = 1\nn_epochs = 1\n\n'
            '[diversity]\nembeddings = "off"\n', encoding="utf-8")
        proc = cli(folder, "run", "--config", str(folder / "run.toml"), "--name", RUN, "--quiet")
        assert proc.returncode == 0, output(proc)
        yield Finished(fake, folder)


def chats(fake: FakeOpenAI) -> int:
    return sum(fake.chat_bodies.values())


def ledger(workdir: Path, stage: str) -> list[str]:
    db = sqlite3.connect(workdir / "m.db")
    try:
        return [r[0] for r in db.execute("select ref from usage where run_id = ? and stage = ?", [RUN, stage])]
    finally:
        db.close()


def responses(workdir: Path) -> int:
    db = sqlite3.connect(workdir / "m.db")
    try:
        return int(db.execute("select count(*) from responses").fetchone()[0])
    finally:
        db.close()
