"""The local backend's finetunes as Ray tasks (`[cluster]`), on a local Ray cluster and the tiny random model.

One Ray cluster serves the whole module (2 CPUs and 2 logical GPUs: Ray's GPUs are only counted, so `gpus_per_job
= 1` is scheduled as on a GPU machine while each worker trains on the CPU). The CLI tests run the real command in
a subprocess with `[cluster] address = "local"`, which starts a cluster of its own in that process.

What is checked: an iteration's jobs train at the same time (their recorded spans overlap); a job trained on a
worker equals the in-process one (same loss, same adapter bytes); a task that raised is a failed job; a job a dead
driver left unfinished is submitted again, a finished one never; a driver killed by SIGKILL mid-iteration and
resumed trains no job twice and ends as an uninterrupted run ends; missing Ray or a bad address is one line, exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="needs the [cluster] extra: scripts/setup --dev installs it")

import ray  # noqa: E402

from backends.base import TERMINAL_STATUSES, FinetuneSpec, JobEvent, JobRef, JobState, TrainingParams  # noqa: E402
from backends.cluster_settings import ClusterConfig  # noqa: E402
from backends.local import LocalBackend, _new_record, _write_job  # noqa: E402
from backends.local_cluster import RAY_MISSING, RayLocalBackend, _Task  # noqa: E402
from foundation import crashpoints  # noqa: E402
from foundation.errors import UserError  # noqa: E402
from tests.ray_cluster import start_test_cluster  # noqa: E402
from tests.test_crash import RUN, Snapshot, build_answering_model, local_settings, write_config  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARAMS = TrainingParams(epochs=2, batch_size=2, learning_rate=1e-2, lora_rank=8, lora_dropout=0.0, max_length=128)
CLUSTER = ClusterConfig(address="local", gpus_per_job=1)  # the module's cluster is already up: it is joined


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """The module's Ray cluster, its two workers started (torch imported) before any test times a job."""
    start_test_cluster()

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import backends.local  # noqa: F401  (what every task imports first)

        return os.getpid()

    try:
        assert len(set(ray.get([warm.remote() for _ in range(2)]))) == 2
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def specs(folder: Path, count: int = 4) -> list[FinetuneSpec]:
    """`count` agents' generator jobs of one iteration, each on its own small file and seed."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for agent in range(count):
        data = folder / f"agent-{agent}.jsonl"
        rows = [{"messages": [{"role": "user", "content": f"What is {agent}+{j}?"},
                              {"role": "assistant", "content": f"The answer is {agent + j}."}]} for j in range(8)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out.append(FinetuneSpec(key=f"r/iteration-1/agent-{agent + 1}/generator", base_model="base",
                                training_file=data, suffix="t", params=PARAMS, seed=agent))
    return out


def on_ray(model: Path, workdir: Path, config: ClusterConfig = CLUSTER) -> RayLocalBackend:
    backend = RayLocalBackend(str(model), workdir=workdir, device="cpu", show_progress=False)
    backend.attach(config)
    return backend


def ref(spec: FinetuneSpec) -> JobRef:
    return JobRef(key=spec.key, provider_job_id="")


def wait_all(backend: LocalBackend, refs: list[JobRef], limit: float = 300) -> list[JobState]:
    """Poll until every job ended; each state's events are all its polls reported, as the store keeps them."""
    deadline = time.monotonic() + limit  # a hang fails the test instead of the CI job
    seen: list[dict[tuple[float, str], JobEvent]] = [{} for _ in refs]
    while time.monotonic() < deadline:
        states = [backend.poll(r) for r in refs]
        for events, state in zip(seen, states, strict=True):
            events.update({(e.created_at, e.message): e for e in state.events})
        if all(s.status in TERMINAL_STATUSES for s in states):
            return [s.model_copy(update={"events": sorted(e.values(), key=lambda e: e.created_at)})
                    for s, e in zip(states, seen, strict=True)]
        time.sleep(0.1)
    raise AssertionError(f"jobs did not end: {[s.status for s in states]}")


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def record(backend: LocalBackend, spec: FinetuneSpec) -> dict:
    return json.loads((backend.adapter_path(spec.key) / "job.json").read_text(encoding="utf-8"))


# -- the backend against the module's cluster ----------------------------------------------------------------------


def test_jobs_train_side_by_side_and_equal_the_in_process_ones(cluster: None, tiny: Path, tmp_path: Path) -> None:
    jobs = specs(tmp_path / "data", 2)
    here = LocalBackend(str(tiny), workdir=tmp_path / "here", device="cpu", show_progress=False)
    expected = []
    for spec in jobs:
        here.start_finetune(spec)
        expected.append(here.poll(ref(spec)))
    here.close()

    backend = on_ray(tiny, tmp_path / "there")
    started = [backend.start_finetune(spec) for spec in jobs]  # returns at once: nothing trained here
    assert all(backend.poll(r).status in ("queued", "running") for r in started)
    states = wait_all(backend, started)
    backend.close()

    assert [s.status for s in states] == ["succeeded"] * 2, [s.error for s in states]
    for spec, mine, theirs in zip(jobs, states, expected, strict=True):
        assert mine.train_loss == theirs.train_loss and mine.trained_tokens == theirs.trained_tokens
        assert mine.model_id == str(backend.adapter_path(spec.key))
        weights = "adapter_model.safetensors"
        assert (Path(mine.model_id) / weights).read_bytes() == (here.adapter_path(spec.key) / weights).read_bytes()
        messages = [e.message for e in mine.events]
        assert messages[0] == "queued on the Ray cluster" and messages.count("started") == 1, messages
    spans = [(r["created_at"], r["finished_at"]) for r in (record(backend, s) for s in jobs)]
    pids = {record(backend, s)["pid"] for s in jobs}
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, spans  # two workers, two CPUs and two logical GPUs: two jobs at a time
    assert len(pids) == 2 and os.getpid() not in pids  # trained by the two workers, not by this process


def test_a_task_that_raises_is_a_failed_job_with_its_error(cluster: None, tmp_path: Path) -> None:
    """The worker cannot load the model: the task raises before any record of its own; the job says why."""
    backend = on_ray(tmp_path / "no-model", tmp_path / "w")
    (spec,) = specs(tmp_path / "data", 1)
    (state,) = wait_all(backend, [backend.start_finetune(spec)])
    backend.close()
    assert state.status == "failed" and state.model_id is None
    assert state.error is not None and "no-model" in state.error and "Traceback" not in state.error
    assert state.events[-1].level == "error"


def test_a_dead_drivers_jobs_are_submitted_again_and_finished_ones_never(cluster: None, tiny: Path,
                                                                         tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    done, unfinished, saved = specs(tmp_path / "data", 3)
    first = on_ray(tiny, workdir)
    wait_all(first, [first.start_finetune(done)])
    first.close()
    finished = (first.adapter_path(done.key) / "job.json").read_bytes()
    # what a killed driver leaves: a record its dead worker had started, and one saved but not yet renamed
    staging = first.staging_path(unfinished.key)
    staging.mkdir(parents=True)
    _write_job(staging, {**_new_record(unfinished), "events": [{"created_at": 1.0, "level": "info",
                                                                "message": "started"}]})
    here = LocalBackend(str(tiny), workdir=tmp_path / "saved", device="cpu", show_progress=False)
    here.start_finetune(saved)  # the adapter and a succeeded record, as the worker had left them in staging
    os.replace(here.adapter_path(saved.key), first.staging_path(saved.key))
    here.close()

    second = on_ray(tiny, workdir)
    states = wait_all(second, [ref(done), ref(unfinished), ref(saved)])
    second.close()
    assert [s.status for s in states] == ["succeeded"] * 3
    assert (second.adapter_path(done.key) / "job.json").read_bytes() == finished  # not trained again
    again = [e.message for e in states[1].events]  # the dead worker's "started" was the dead driver's to store
    assert again[0].startswith("submitted again") and again.count("started") == 1, again
    assert not any(e.message.startswith("submitted again") for s in (states[0], states[2]) for e in s.events)
    assert record(second, saved)["pid"] == os.getpid()  # renamed into place, not trained on a worker
    assert not list(workdir.glob("adapters/.*.partial"))


def test_a_job_recorded_but_not_yet_renamed_into_place_is_still_running(cluster: None, tiny: Path,
                                                                        tmp_path: Path) -> None:
    """The worker records success in its staging dir, then renames it: a poll in between must not hand out a model
    id that names no folder yet. Once no task of ours runs for it, the driver finishes the rename itself."""
    (spec,) = specs(tmp_path / "data", 1)
    here = LocalBackend(str(tiny), workdir=tmp_path / "here", device="cpu", show_progress=False)
    here.start_finetune(spec)
    here.close()
    backend = on_ray(tiny, tmp_path / "w")
    backend.staging_path(spec.key).parent.mkdir(parents=True)
    os.replace(here.adapter_path(spec.key), backend.staging_path(spec.key))  # as the worker leaves it, renaming
    backend.check_server(finetuning=True)
    backend._tasks[spec.key] = _Task(ref=ray.remote(num_cpus=0)(sleep).remote(60), spec=spec)  # its task runs
    state = backend.poll(ref(spec))
    assert (state.status, state.model_id) == ("running", None)
    backend.cancel(ref(spec))  # the task is gone; the record it wrote stays as it was
    state = backend.poll(ref(spec))
    backend.close()
    assert state.status == "succeeded" and Path(str(state.model_id)) == backend.adapter_path(spec.key)
    assert (backend.adapter_path(spec.key) / "adapter_model.safetensors").is_file()


def test_a_job_larger_than_the_cluster_is_refused_before_it_waits_forever(cluster: None, tiny: Path,
                                                                        tmp_path: Path) -> None:
    backend = on_ray(tiny, tmp_path / "w", CLUSTER.model_copy(update={"gpus_per_job": 3}))
    (spec,) = specs(tmp_path / "data", 1)
    with pytest.raises(UserError, match=r"asks 3 GPUs per job but the Ray cluster has 2"):
        backend.start_finetune(spec)
    backend.close()
    assert ray.is_initialized()  # the module's cluster, not this backend's to stop
    assert not backend.staging_path(spec.key).exists()


def test_data_files_off_the_storage_are_copied_onto_it(cluster: None, tiny: Path, tmp_path: Path) -> None:
    storage = tmp_path / "shared"
    backend = on_ray(tiny, tmp_path / "maft-runs" / "r", CLUSTER.model_copy(update={"storage": storage}))
    (spec,) = specs(tmp_path / "elsewhere", 1)
    (state,) = wait_all(backend, [backend.start_finetune(spec)])
    backend.close()
    assert state.status == "succeeded" and Path(str(state.model_id)).is_relative_to(storage)
    trained_on = Path(record(backend, spec)["spec"]["training_file"])
    assert trained_on.is_relative_to(storage) and trained_on.read_bytes() == spec.training_file.read_bytes()
    assert backend.workdir.parent == storage.resolve() and backend.workdir.name.startswith("r-")


# -- the real command ----------------------------------------------------------------------------------------------


def command(workdir: Path, *, pythonpath: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """`orchestrator run --config run.toml --name crash --db m.db --quiet` in `workdir`, as tests/test_crash.py
    runs it."""
    env = {k: v for k, v in os.environ.items() if k not in (crashpoints.ENV_VAR, crashpoints.TRACE_VAR)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="400", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [*pythonpath, str(REPO), env.get("PYTHONPATH")])))
    return ([sys.executable, "-m", "orchestrator", "run", "--config", str(workdir / "run.toml"), "--name", RUN,
             "--db", str(workdir / "m.db"), "--quiet"], env)


def run_cli(workdir: Path, timeout: float = 300, **kw: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    args, env = command(workdir, **kw)
    with subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        finally:
            _kill_group(child.pid)  # what Ray may leave of a cluster it started in that process
    return subprocess.CompletedProcess(args, child.returncode, out, err)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def cluster_settings(model: Path) -> dict:
    cluster = {"address": "local", "num_cpus": 2, "num_gpus": 2, "gpus_per_job": 1}
    return {**local_settings(model, iterations=1, agents=2), "cluster": cluster}


def finished_adapters(workdir: Path) -> dict[str, bytes]:
    """Each finished adapter's job.json, by folder name."""
    out = {}
    for path in workdir.glob(f"maft-runs/{RUN}/adapters/*/job.json"):
        try:
            if json.loads(path.read_text(encoding="utf-8"))["status"] == "succeeded":
                out[path.parent.name] = path.read_bytes()
        except (OSError, ValueError):
            continue
    return out


def started_but_unfinished(db: Path) -> int:
    """Jobs the store knows as started (a provider job id) and not yet succeeded."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from jobs where provider_job_id is not null "
                                "and status != 'succeeded'").fetchone()[0]
    except sqlite3.Error:
        return 0


def same_results(mine: Snapshot, reference: Snapshot) -> list[str]:
    """Snapshot.differences without the job events (a cluster job has more: queued, submitted again)."""
    return [p for p in mine.differences(reference) if not p.startswith("job events differ")]


@pytest.fixture(scope="module")
def answering(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_answering_model(tmp_path_factory.mktemp("answering") / "model")


def test_a_driver_killed_mid_iteration_resumes_without_training_a_job_twice(answering: Path,
                                                                            tmp_path: Path) -> None:
    reference = tmp_path / "in-process"
    write_config(reference, local_settings(answering, iterations=1, agents=2))
    proc = run_cli(reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    crashed = tmp_path / "cluster"
    write_config(crashed, cluster_settings(answering))
    args, env = command(crashed)
    driver = subprocess.Popen(args, cwd=crashed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            finished = finished_adapters(crashed)
            if finished and started_but_unfinished(crashed / "m.db"):
                break
            time.sleep(0.02)
        assert driver.poll() is None, f"the run ended before it could be killed: {driver.stderr.read()[-3000:]}"
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: its Ray cluster and tasks die with it
        driver.wait(timeout=60)
    finally:
        _kill_group(driver.pid)
        if driver.stderr is not None:
            driver.stderr.close()
    time.sleep(1)  # what the driver's workers had in hand when they died is all on disk
    at_kill = finished_adapters(crashed)

    resumed = run_cli(crashed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = Snapshot.read(crashed)
    assert same_results(after, Snapshot.read(reference)) == []
    assert {k: v for k, v in finished_adapters(crashed).items() if k in at_kill} == at_kill  # none trained again
    with sqlite3.connect(crashed / "m.db") as conn:
        events = conn.execute("select job_key, message from job_events where level != 'status'").fetchall()
        trained = {k for (k,) in conn.execute("select key from jobs where status = 'succeeded'")}
    assert trained and all(sum(m.startswith("trained ") for k, m in events if k == key) == 1 for key in trained)
    assert any(m.startswith("submitted again") for _, m in events)  # the resume did find unfinished jobs


def test_missing_ray_and_a_bad_address_are_one_line_and_exit_2(tiny: Path, tmp_path: Path) -> None:
    no_ray = tmp_path / "no-ray"
    (no_ray / "ray").mkdir(parents=True)
    (no_ray / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n", encoding="utf-8")
    settings = {**local_settings(tiny, iterations=1), "cluster": {"address": "local"}}
    write_config(tmp_path / "a", settings)
    proc = run_cli(tmp_path / "a", pythonpath=(str(no_ray),))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and RAY_MISSING in lines[0], proc.stderr

    write_config(tmp_path / "b", {**settings, "cluster": {"address": "http://head:8265"}})
    proc = run_cli(tmp_path / "b")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "[cluster] address" in lines[0], proc.stderr
    assert not (tmp_path / "b" / "m.db").exists() or RUN not in (tmp_path / "b" / "m.db").read_bytes().decode(
        "latin-1")
