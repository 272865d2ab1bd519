"""kill -9 anywhere: a run killed by SIGKILL at any point and resumed ends exactly like an uninterrupted run.

The real CLI runs in a subprocess (`python -m orchestrator run --config run.toml --name crash --db ...`) with
`MAFT_CRASH_AT=POINT[#K]`, which makes `foundation.crashpoints.crashpoint(POINT)` kill the process with SIGKILL at
its K-th hit: no exception, no cleanup, nothing flushed, exactly a power cut. The same command run again (without
the variable) must resume and finish, and the store must then hold what an uninterrupted run of the same seed
holds: the same evaluations, the same datasets (by sha256), the same responses word for word, the same models,
one ledger line per thing paid for; and the provider must have seen no second job, no second upload of the same
data, and no stored answer asked for again (in a debate, at most the requests in flight when it died).

The fake OpenAI server runs in this process, a fresh one per scenario so its counts are the scenario's own. Its
finetuned model ids are pure functions of what a model is made of, and answers are keyed by the request and the
model id, so "the same results" is meaningful across a crash (see `tests/fake_openai.py`).

The reference runs are module-scoped and shared by all cases. `bench/crash_sweep.py` reuses this harness for a
longer sweep (every point, several hit counts, both backends).
"""

from __future__ import annotations

import collections
import copy
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from foundation import crashpoints
from tests.fake_openai import API_KEY, FakeOpenAI

REPO = Path(__file__).resolve().parents[1]
RUN = "crash"
AGENTS = 3
CONCURRENCY = 4
MINI = "gpt-4.1-mini-2025-04-14"
KILLED = -signal.SIGKILL  # what subprocess reports for a child killed by SIGKILL
PROVIDER_IDS = re.compile(r"\b(?:ftjob|file|ftevent|batch)-[A-Za-z0-9]+")  # ids a server makes up: not results
TIMINGS = re.compile(r"\bin [0-9.]+ s \([0-9]+ tokens/s\)")  # how fast a job trained varies run to run: not a result

# -- the CLI in a subprocess --------------------------------------------------------------------------------------


def cli(workdir: Path, *, crash_at: str | None = None, trace: Path | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`orchestrator run --config run.toml --name crash --db m.db` in `workdir`, optionally armed to die (or to
    write every crash point it passes to `trace`).

    Run in `workdir` so no `.env` of the checkout is read; COLUMNS is wide so rich never wraps a message."""
    env = {k: v for k, v in os.environ.items() if k not in (crashpoints.ENV_VAR, crashpoints.TRACE_VAR)}
    env.update(OPENAI_API_KEY=API_KEY, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="400",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if crash_at is not None:
        env[crashpoints.ENV_VAR] = crash_at
    if trace is not None:
        env[crashpoints.TRACE_VAR] = str(trace)
    command = [sys.executable, "-m", "orchestrator", "run", "--config", str(workdir / "run.toml"), "--name", RUN,
               "--db", str(workdir / "m.db"), "--quiet"]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def write_config(workdir: Path, settings: Mapping[str, Any]) -> None:
    """run.toml from a dict whose dict values are tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for table, values in settings.items():
        if isinstance(values, dict):
            lines += ["", f"[{table}]", *(f"{k} = {toml_value(v)}" for k, v in values.items())]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "run.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- what a run left behind ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything a finished run computed, from its store, with the scenario's own paths taken out."""

    status: str
    evaluations: tuple[tuple[Any, ...], ...]  # (society, iteration, method, correct, n)
    datasets: dict[tuple[Any, ...], str]  # (society, iteration, agent, role) -> sha256
    agents: dict[tuple[Any, ...], str]  # (society, iteration, agent, role) -> model id
    responses: dict[str, tuple[str, str | None]]  # key -> (text, parsed answer)
    jobs: dict[str, tuple[str, int]]  # job key -> (status, attempt)
    ledger: collections.Counter[tuple[str, str]]  # (ref, billing) -> lines
    events: collections.Counter[tuple[str, str]]  # (job key, provider's event message, ids taken out) -> times
    integrity: str
    partial_adapters: tuple[str, ...] = ()  # `.partial` staging dirs left in the adapters folder

    @classmethod
    def read(cls, workdir: Path) -> Snapshot:
        db = sqlite3.connect(workdir / "m.db")
        try:
            here = str(workdir.resolve())

            def local(text: str | None) -> str:
                return (text or "").replace(here, "<workdir>")

            rows = db.execute("select status from runs where id = ?", [RUN]).fetchone()
            snapshot = cls(
                status=rows[0] if rows else "missing",
                evaluations=tuple(db.execute(
                    "select society, iteration, method, correct, n from evaluations where run_id = ? "
                    "order by task, society, iteration, method", [RUN]).fetchall()),
                datasets={tuple(r[:4]): r[4] for r in db.execute(
                    "select society, iteration, agent, role, sha256 from datasets where run_id = ?", [RUN])},
                agents={tuple(r[:4]): local(r[4]) for r in db.execute(
                    "select society, iteration, agent, role, model_id from agents where run_id = ?", [RUN])},
                responses={r[0]: (r[1], r[2]) for r in db.execute(
                    "select key, text, answer from responses where run_id = ?", [RUN])},
                jobs={r[0]: (r[1], r[2]) for r in db.execute(
                    "select key, status, attempt from jobs where run_id = ?", [RUN])},
                ledger=collections.Counter((r[0], r[1]) for r in db.execute(
                    "select ref, billing from usage where run_id = ?", [RUN])),
                events=collections.Counter((r[0], TIMINGS.sub("<timing>", PROVIDER_IDS.sub("<id>", local(r[1]))))
                                          for r in db.execute(
                    "select job_key, message from job_events where level != 'status' and job_key in "
                    "(select key from jobs where run_id = ?)", [RUN])),
                integrity=db.execute("pragma integrity_check").fetchone()[0],
                partial_adapters=tuple(sorted(p.name for p in workdir.glob(f"maft-runs/{RUN}/adapters/.*.partial"))),
            )
        finally:
            db.close()
        return snapshot

    def differences(self, reference: Snapshot, *, retried: Callable[[str], bool] = lambda key: False) -> list[str]:
        """What differs from `reference`, in words (empty when the run ended exactly like it). Jobs named by
        `retried` may have a later attempt than the reference's."""
        problems = []
        if self.status != "finished":
            problems.append(f"run status {self.status}")
        if self.integrity != "ok":
            problems.append(f"integrity_check: {self.integrity}")
        for name in ("evaluations", "datasets", "agents"):
            if getattr(self, name) != getattr(reference, name):
                problems.append(f"{name} differ: {getattr(self, name)} vs {getattr(reference, name)}")
        if self.responses != reference.responses:
            keys = set(self.responses) ^ set(reference.responses)
            changed = [k for k in set(self.responses) & set(reference.responses)
                       if self.responses[k] != reference.responses[k]]
            problems.append(f"responses differ: {len(keys)} keys only on one side, {len(changed)} changed "
                            f"(e.g. {sorted(keys)[:2] or sorted(changed)[:2]})")
        jobs = {k: v for k, v in self.jobs.items() if not retried(k)}
        if jobs != {k: v for k, v in reference.jobs.items() if not retried(k)}:
            problems.append(f"jobs differ: {sorted(set(jobs.items()) ^ set(reference.jobs.items()))[:4]}")
        events = {e: n for e, n in self.events.items() if not retried(e[0])}
        if events != {e: n for e, n in reference.events.items() if not retried(e[0])}:
            lost = reference.events - self.events
            problems.append(f"job events differ: {sum(lost.values())} lost (e.g. {sorted(lost)[:2]}), "
                            f"{sum((self.events - reference.events).values())} extra")
        doubled = [ref for ref, n in self.ledger.items() if n > 1]
        if doubled:
            problems.append(f"ledger lines doubled: {doubled[:3]}")
        lines = {line for line in self.ledger if not retried(line[0].split("#attempt-")[0])}
        if lines != {line for line in reference.ledger if not retried(line[0].split("#attempt-")[0])}:
            problems.append(f"ledger lines differ: {sorted(lines ^ set(reference.ledger))[:4]}")
        if self.partial_adapters:
            problems.append(f"unfinished adapters left: {self.partial_adapters}")
        return problems


@dataclass(frozen=True)
class ServerCounts:
    """What the provider saw: how many jobs and training uploads it holds, and how many chat answers it produced
    for a request it had already answered (the same paid request twice)."""

    jobs: int
    jobs_per_iteration: dict[int, int]
    uploads: int
    batches: int
    repeated_chats: int

    @classmethod
    def of(cls, fake: FakeOpenAI) -> ServerCounts:
        per_iteration: collections.Counter[int] = collections.Counter()
        for job in fake.jobs.values():
            suffix = job["user_provided_suffix"] or ""
            iteration = next((int(part[1:]) for part in suffix.split("-") if part[:1] == "i" and part[1:].isdigit()),
                             0)
            per_iteration[iteration] += 1
        return cls(jobs=len(fake.jobs), jobs_per_iteration=dict(per_iteration),
                   uploads=sum(f["purpose"] == "fine-tune" for f in fake.files.values()),
                   batches=len(fake.batches), repeated_chats=fake.repeated_chats())


# -- scenarios ----------------------------------------------------------------------------------------------------


def openai_settings(fake: FakeOpenAI, **overrides: Any) -> dict[str, Any]:
    """The openai run of every scenario: 3 agents, 2 rounds, 2 iterations, small sets, fast polling."""
    openai = {"base_url": fake.base_url, "poll_interval": 0.01, "concurrency": CONCURRENCY, "n_epochs": 1,
              "max_retries": 10, **overrides.pop("openai", {})}
    return {"backend": "openai", "model": MINI, "task": "arithmetic:easy", "agents": AGENTS, "rounds": 2,
            "iterations": 2, "train_size": 30, "eval_size": 10, "critic_mix": 0.0, "seed": 0, **overrides,
            "openai": openai, "diversity": {"embeddings": "off"}}


def new_fake() -> FakeOpenAI:
    """Every model right 80 % of the time, +5 points per finetune: answers vary, so results can differ."""
    return FakeOpenAI(base_accuracy=0.8, finetune_bonus=0.05)


@dataclass
class Scenario:
    """One run in its own folder against its own fake server; what it left behind."""

    workdir: Path
    snapshot: Snapshot
    server: ServerCounts
    runs: list[subprocess.CompletedProcess[str]] = field(default_factory=list)
    seconds: float = 0.0


def openai_scenario(workdir: Path, crash_at: str | None = None, *, storm: bool = False,
                    **overrides: Any) -> Scenario:
    """A run killed at `crash_at` and resumed by the same command (or not killed: the reference, or a storm),
    checking that the killed process died by SIGKILL and the resumed one finished."""
    started = time.monotonic()
    with new_fake() as fake:
        if storm:
            # Every endpoint: 429s and 503s with a short Retry-After, 500s, dropped connections, and answers
            # slower than the client's timeout (the server still does the work: a lost answer).
            fake.storm(0.2, kinds=("429", "500", "503", "drop", "slow"), retry_after=0.02, delay=STORM_SLOW)
            overrides.setdefault("openai", {}).update(timeout=STORM_TIMEOUT)
        write_config(workdir, openai_settings(fake, **overrides))
        runs = []
        if crash_at is not None:
            runs.append(cli(workdir, crash_at=crash_at))
            assert runs[-1].returncode == KILLED, f"{crash_at} did not kill the run\n{output(runs[-1])}"
        runs.append(cli(workdir))
        assert runs[-1].returncode == 0, output(runs[-1])
        fake.storm(0)
        server = ServerCounts.of(fake)
    return Scenario(workdir, Snapshot.read(workdir), server, runs, time.monotonic() - started)


# The client's timeout in the storm is shorter than a slow answer, so timeouts really happen. The slow request is
# done by the server (a job created, a file stored) before the client, after its first backoff (at least 0.5 s),
# looks for it: a lost answer. A request the server would run only after the client had looked and found nothing
# is indistinguishable from a lost request without server-side idempotency keys, which OpenAI's API lacks.
STORM_TIMEOUT = 1.0
STORM_SLOW = 1.2


# Batch mode: one debate round per Batch API job, each waited for (the backend's first look at a batch comes after
# 5 s); one round per debate and one iteration keep it to three batches.
BATCH = {"rounds": 1, "iterations": 1, "openai": {"batch": True}}


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Scenario]]]:
    """Runs that mostly wait, started in the background with the first openai case so the other cases' work fills
    their waiting: the fault storm (a 500 or a dropped connection waits 1 s, 2 s, 4 s, ... before the next try)
    and batch mode (every batch is first looked at after 5 s). Nothing they check depends on timing."""
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="background") as pool:
        yield {
            "storm": pool.submit(openai_scenario, tmp_path_factory.mktemp("storm"), storm=True),
            "batch": pool.submit(openai_scenario, tmp_path_factory.mktemp("batch"), **copy.deepcopy(BATCH)),
            "batch.created#2": pool.submit(openai_scenario, tmp_path_factory.mktemp("batch-crash"),
                                           "batch.created#2", **copy.deepcopy(BATCH)),
        }


@pytest.fixture(scope="module")
def openai_reference(tmp_path_factory: pytest.TempPathFactory, background: dict[str, Future[Scenario]]) -> Scenario:
    reference = openai_scenario(tmp_path_factory.mktemp("openai-reference"))
    assert reference.snapshot.status == "finished" and reference.snapshot.integrity == "ok"
    assert reference.server.jobs_per_iteration == {1: 2 * AGENTS, 2: 2 * AGENTS}  # every set is big enough
    assert reference.server.repeated_chats == 0
    assert {s for s, _ in reference.snapshot.jobs.values()} == {"succeeded"}
    return reference


# (point, may a stored answer be asked again?) -- the first are inside a debate: up to the requests in flight
OPENAI_POINTS = [
    ("debate.eval-0.stored#10", True),  # the base society's evaluation
    ("debate.train-1.stored#100", True),  # mid-debate, round 2
    ("debate.eval-1.stored#45", True),  # the finetuned society's evaluation
    ("store.commit#250", True),  # inside a write transaction, before COMMIT
    ("store.state_commit#3", False),  # a backend's record (an upload, a job) written, not committed
    ("pipeline.datasets_written", False),
    ("hosted.file_uploaded#2", False),  # the server has the file, we have no record of it
    ("hosted.job_creating#3", False),
    ("hosted.job_created#4", False),  # the server has the job, we have no record of its id
    ("hosted.job_created#8", False),  # iteration 2: a finetune of a finetune
    ("finetune.intent_stored#2", False),
    ("finetune.started#5", False),  # the backend has the job id, the job row does not
    ("finetune.poll_fetched#10", False),  # polled, new events handed over, nothing stored yet
    ("finetune.polled#9", False),
    ("pipeline.finishing", False),
]


@pytest.mark.parametrize(("point", "in_debate"), OPENAI_POINTS, ids=[p for p, _ in OPENAI_POINTS])
def test_a_run_killed_anywhere_resumes_to_the_same_end(point: str, in_debate: bool, openai_reference: Scenario,
                                                        tmp_path: Path) -> None:
    crashed = openai_scenario(tmp_path, point)
    assert crashed.snapshot.differences(openai_reference.snapshot) == []
    assert crashed.server.jobs_per_iteration == openai_reference.server.jobs_per_iteration  # no second job
    assert crashed.server.uploads == openai_reference.server.uploads  # no second upload of the same data
    assert crashed.server.repeated_chats <= (CONCURRENCY if in_debate else 0)


def test_a_failed_job_stops_the_run_and_the_same_command_finishes_it(openai_reference: Scenario,
                                                                    tmp_path: Path) -> None:
    with new_fake() as fake:
        fake.fail_jobs("i1-a2-c", message="the file was refused on purpose")
        write_config(tmp_path, openai_settings(fake))
        stopped = cli(tmp_path)
        assert stopped.returncode == 1, output(stopped)
        assert "Traceback" not in stopped.stdout + stopped.stderr
        line = next((ln for ln in stopped.stdout.splitlines() if ln.startswith("stopped:")), "")
        for fragment in ("agent 2 critic", "the file was refused on purpose", f"orchestrator run --resume {RUN}"):
            assert fragment in line, output(stopped)
        kept = Snapshot.read(tmp_path)
        assert sorted(s for s, _ in kept.jobs.values()) == ["failed"] + ["succeeded"] * (2 * AGENTS - 1)
        assert kept.integrity == "ok" and kept.status == "failed"
        for key, response in kept.responses.items():  # the work done before the failure stays, and is the same
            assert openai_reference.snapshot.responses[key] == response
        fake.clear_failures()  # the cause is fixed
        resumed = cli(tmp_path)
        assert resumed.returncode == 0, output(resumed)
        server = ServerCounts.of(fake)
    after = Snapshot.read(tmp_path)
    failed = f"{RUN}/iteration-1/agent-2/critic"
    assert after.differences(openai_reference.snapshot, retried=lambda key: key == failed) == []
    assert after.jobs[failed] == ("succeeded", 2)
    assert server.jobs_per_iteration == {1: 2 * AGENTS + 1, 2: 2 * AGENTS}  # only the failed job again
    assert server.repeated_chats == 0


# -- the local backend --------------------------------------------------------------------------------------------


def build_answering_model(path: Path) -> Path:
    """The tiny random model of `tests/tiny_model.py`, taught in a second to end every answer with
    "The answer is N." (N mostly 7, else 3 or 12), as a generator and as a critic: agents then agree often enough
    for every set to have data, so LoRA jobs really train, and disagree often enough for debates to matter. (A
    reply cut at max_tokens is no answer, so critics must learn to finish too.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import prompts
    from tests.tiny_model import build_tiny_model

    build_tiny_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    rng = random.Random(0)
    texts = []
    for i in range(64):
        a, b = rng.randrange(21), rng.randrange(21)
        question = f"What is the result of {a}+{b}? Make sure to state your answer at the end of the response."
        answer = f"The answer is {rng.choice([7, 7, 7, 3, 12])}."
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 2:  # a critic's turn after a summary of gibberish, as the base model writes them
            summary = "".join(rng.choice("abcdefghij 0123456789.") for _ in range(rng.randrange(4, 40)))
            turns += [{"role": "user", "content": prompts.render("arithmetic/critic_summary.txt", summary=summary,
                                                                 question=f"{a}+{b}")},
                      {"role": "assistant", "content": f"The answer is {rng.choice([7, 7, 7, 3, 12])}."}]
        texts.append(tokenizer.apply_chat_template(turns, tokenize=False))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        batch = tokenizer(texts[(step * 8) % 64:(step * 8) % 64 + 8], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def local_settings(model: Path, **overrides: Any) -> dict[str, Any]:
    return {"backend": "local", "model": str(model), "task": "arithmetic:easy", "agents": AGENTS, "rounds": 2,
            "iterations": 2, "train_size": 8, "eval_size": 4, "critic_mix": 0.5, "seed": 0, **overrides,
            "generation": {"max_tokens": 8, "summary_max_tokens": 12},
            "training": {"epochs": 2, "batch_size": 2, "learning_rate": 1e-3, "max_length": 256},
            "local": {"device": "cpu", "batch_size": 16}, "diversity": {"embeddings": "off", "critic_nll": False}}


def local_scenario(workdir: Path, model: Path, crash_at: str | None = None) -> Scenario:
    started = time.monotonic()
    write_config(workdir, local_settings(model))
    runs = []
    if crash_at is not None:
        runs.append(cli(workdir, crash_at=crash_at))
        assert runs[-1].returncode == KILLED, f"{crash_at} did not kill the run\n{output(runs[-1])}"
    runs.append(cli(workdir))
    assert runs[-1].returncode == 0, output(runs[-1])
    empty = ServerCounts(jobs=0, jobs_per_iteration={}, uploads=0, batches=0, repeated_chats=0)
    return Scenario(workdir, Snapshot.read(workdir), empty, runs, time.monotonic() - started)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_answering_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def local_reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    reference = local_scenario(tmp_path_factory.mktemp("local-reference"), tiny_model)
    statuses = collections.Counter(s for s, _ in reference.snapshot.jobs.values())
    assert statuses["succeeded"] >= 4, reference.snapshot.jobs  # enough really trains for the points below
    return reference


LOCAL_POINTS = [
    "debate.train-1.stored#40",  # mid-debate
    "local.train_step#5",  # mid local training
    "local.adapter_saved#3",  # adapter saved in its `.partial` staging dir, job.json still says running
    "local.adapter_in_place#6",  # finished on disk, the job row does not know yet
    "store.commit#150",  # inside a store transaction
    "debate.eval-2.stored#20",  # mid-evaluation of a twice finetuned society
]


@pytest.mark.parametrize("point", LOCAL_POINTS)
def test_a_local_run_killed_anywhere_resumes_to_the_same_end(point: str, tiny_model: Path,
                                                              local_reference: Scenario, tmp_path: Path) -> None:
    crashed = local_scenario(tmp_path, tiny_model, point)
    assert crashed.snapshot.differences(local_reference.snapshot) == []


# -- the failpoints themselves --------------------------------------------------------------------------------------


def test_a_crashpoint_kills_at_its_kth_hit_and_costs_nothing_unarmed() -> None:
    code = ("from foundation.crashpoints import crashpoint\n"
            "for i in range(5):\n    print(i, flush=True)\n    crashpoint('here')\n    crashpoint('elsewhere')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), crashpoints.ENV_VAR: "here#3"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == KILLED and proc.stdout.split() == ["0", "1", "2"]
    assert crashpoints.parse("a.b#12") == ("a.b", 12) and crashpoints.parse("a.b") == ("a.b", 1)
    assert crashpoints.parse("") is None
    with pytest.raises(ValueError, match="NAME#K"):
        crashpoints.parse("a#0")
    crashpoints.arm(None)
    try:
        for _ in range(1000):
            crashpoints.crashpoint("here")  # disarmed: returns at once and counts nothing
        assert crashpoints.hits("here") == 0
    finally:
        crashpoints.arm(None)


def test_every_crash_point_in_the_code_is_killed_at_by_a_case_here() -> None:
    """A point added to the code without a case here would be a place nobody has proved safe to die at."""
    declared = set()
    for path in [*REPO.glob("orchestrator/*.py"), *REPO.glob("backends/*.py")]:
        declared |= set(re.findall(r'crashpoint\("([^"]+)"\)', path.read_text(encoding="utf-8")))
    killed = {p.partition("#")[0] for p in [*(p for p, _ in OPENAI_POINTS), *LOCAL_POINTS, "batch.created"]}
    assert declared and declared <= killed, sorted(declared - killed)
    assert any(p.startswith("debate.") for p in killed)  # f"debate.{name}.stored": one per debate


# last: the background runs went on beside everything above


def test_a_run_killed_after_creating_a_batch_resumes_to_the_same_end(
        background: dict[str, Future[Scenario]]) -> None:
    """Killed after the batch was created, before its id was recorded: the resumed run finds it by its metadata
    and waits for it, paying for no second batch and asking nothing twice."""
    reference, crashed = background["batch"].result(timeout=600), background["batch.created#2"].result(timeout=600)
    assert reference.server.batches == 3 and reference.snapshot.jobs
    assert crashed.snapshot.differences(reference.snapshot) == []
    assert crashed.server == reference.server  # batches, jobs and uploads; no answer produced twice


def test_a_fault_storm_changes_nothing(openai_reference: Scenario, background: dict[str, Future[Scenario]]) -> None:
    """Every request on every endpoint faulted with probability 0.2 (429, 500, 503, dropped connections, answers
    slower than the client's timeout): the run ends exactly like the calm one, with no second job."""
    stormy = background["storm"].result(timeout=600)
    assert stormy.snapshot.differences(openai_reference.snapshot) == []
    assert stormy.server.jobs_per_iteration == openai_reference.server.jobs_per_iteration
    assert stormy.server.uploads == openai_reference.server.uploads

