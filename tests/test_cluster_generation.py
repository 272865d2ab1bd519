"""The local backend's generation sharded over Ray actors (`[cluster] generation_workers`), on a local Ray cluster
and the tiny random model.

One Ray cluster serves the whole module (2 CPUs and 2 logical GPUs, as in tests/test_cluster.py: each actor asks a
job's CPU and GPU, and decodes on the CPU). What is checked: two actors answer exactly what the in-process backend
answers, greedy and sampled, on the base model and on two adapters; every answer reaches `on_result` once, in the
calling thread; the actors start once and serve later calls, holding each adapter once; a finetune takes their
resources and the next call starts fresh ones that can use its adapter; a lost actor stops the call with a line that
names it; the real command with `generation_workers = 2` stores the answers an in-process run stores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray", reason="needs the [cluster] extra: scripts/setup --dev installs it")

import ray  # noqa: E402

from backends.base import ChatMessage, ChatRequest, ChatResult  # noqa: E402
from backends.cluster_settings import ClusterConfig  # noqa: E402
from backends.local import LocalBackend  # noqa: E402
from backends.local_cluster import RayLocalBackend  # noqa: E402
from backends.local_cluster_chat import ChatWorkers, shard  # noqa: E402
from foundation.errors import RunStopped, UserError  # noqa: E402
from tests.ray_cluster import start_test_cluster  # noqa: E402
from tests.test_cluster import cluster_settings, run_cli, same_results, specs, wait_all  # noqa: E402
from tests.test_crash import Snapshot, local_settings, write_config  # noqa: E402
from tests.tiny_model import build_random_adapter, build_tiny_model  # noqa: E402

CLUSTER = ClusterConfig(address="local", gpus_per_job=1, generation_workers=2)  # joins the module's cluster
PROMPTS = ("Hi", "What is 17+25?", "What is the result of 3+4*5+6-7*8? State your answer at the end.",
           "0123456789 + - * / = ( )")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    start_test_cluster()
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def models(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The base model and two adapters that change its answers at once (random B)."""
    folder = tmp_path_factory.mktemp("adapters")
    return ["base", *(str(build_random_adapter(tiny, folder / f"agent{i}", seed=20 + i)) for i in range(2))]


def requests(models: list[str], prefix: str = "q") -> list[ChatRequest]:
    """Every prompt on every model, greedy and sampled (each sampled request its own seed); one conversation
    asked twice on a model with different seeds, as a debate's first round asks it."""
    out = []
    for p, prompt in enumerate(PROMPTS):
        for m, model in enumerate(models):
            messages = (ChatMessage(role="user", content=prompt),)
            out.append(ChatRequest(key=f"{prefix}-{p}-{m}-greedy", model=model, messages=messages, max_tokens=10,
                                   temperature=0.0))
            for seed in (p * 10 + m, p * 10 + m + 100):
                out.append(ChatRequest(key=f"{prefix}-{p}-{m}-s{seed}", model=model, messages=messages,
                                       max_tokens=6 + p, temperature=0.7, seed=seed))
    return out


@pytest.fixture(scope="module")
def expected(tiny: Path, models: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, ChatResult]:
    """What the in-process backend answers, by key."""
    here = LocalBackend(str(tiny), workdir=tmp_path_factory.mktemp("here"), device="cpu", dtype="float32",
                        batch_size=16, show_progress=False)
    try:
        return {r.key: r for r in here.chat(requests(models))}
    finally:
        here.close()


def on_ray(model: Path, workdir: Path, config: ClusterConfig = CLUSTER, batch_size: int = 5) -> RayLocalBackend:
    """Another batch size than the in-process reference's: in float32 a row's answer does not depend on it."""
    backend = RayLocalBackend(str(model), workdir=workdir, device="cpu", dtype="float32", batch_size=batch_size,
                              show_progress=False)
    backend.attach(config)
    return backend


def workers_of(backend: RayLocalBackend) -> ChatWorkers:
    assert backend._generation is not None
    return backend._generation


def stats(backend: RayLocalBackend) -> list[dict[str, Any]]:
    return ray.get([a.stats.remote() for a in workers_of(backend).actors])


# -- sharding, pure ------------------------------------------------------------------------------------------------


def test_shards_balance_the_work_and_keep_identical_conversations_together() -> None:
    def ask(key: str, content: str, max_tokens: int, model: str = "base") -> ChatRequest:
        return ChatRequest(key=key, model=model, messages=(ChatMessage(role="user", content=content),),
                           max_tokens=max_tokens)

    asked = [ask("a1", "A", 50), ask("a2", "A", 50), ask("b", "B", 90), ask("c", "C", 10), ask("d", "D", 40),
             ask("a-other-model", "A", 50, model="/x/agent")]
    parts = shard(asked, 2)
    assert sorted(i for p in parts for i in p) == list(range(len(asked)))  # each request exactly once
    assert any({0, 1} <= set(p) for p in parts)  # "A" on base twice: one shard, prefilled once
    loads = [sum(asked[i].max_tokens for i in p) for p in parts]
    assert loads == [140, 150] or loads == [150, 140], parts
    assert shard(asked, 2) == parts  # deterministic
    assert shard(asked, 8)[6:] == [[], []]  # more workers than groups: some idle


# -- the backend against the module's cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(cluster: None, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayLocalBackend]:
    """One backend on two actors for the tests that follow in turn: its actors start once for all of them."""
    backend = on_ray(tiny, tmp_path_factory.mktemp("sharded"))
    yield backend
    backend.close()


def test_sharded_chat_equals_in_process_and_streams_into_the_calling_thread(
    sharded: RayLocalBackend, models: list[str], expected: dict[str, ChatResult]
) -> None:
    asked = requests(models)
    seen: list[tuple[str, int]] = []
    got = sharded.chat(asked, on_result=lambda r: seen.append((r.key, threading.get_ident())))
    first = [id(a) for a in workers_of(sharded).actors]
    before = stats(sharded)
    again = sharded.chat(asked[::-1])  # the same actors, the society already loaded
    after = stats(sharded)
    assert [id(a) for a in workers_of(sharded).actors] == first

    assert [r.key for r in got] == [r.key for r in asked]  # request order
    assert [r.model_dump() for r in got] == [expected[r.key].model_dump() for r in asked]
    assert [r.model_dump() for r in again] == [expected[r.key].model_dump() for r in asked[::-1]]
    assert any(r.text != expected[f"q-{p}-0-greedy"].text for p in range(len(PROMPTS))
               for r in (expected[f"q-{p}-1-greedy"], expected[f"q-{p}-2-greedy"]))  # the adapters do differ
    assert sorted(k for k, _ in seen) == sorted(r.key for r in asked)  # once each
    assert {t for _, t in seen} == {threading.get_ident()}
    pids = [s["pid"] for s in after]
    assert pids == [s["pid"] for s in before] and len(set(pids)) == 2 and os.getpid() not in pids
    assert [s["calls"] for s in before] == [1, 1] and [s["calls"] for s in after] == [2, 2]
    loaded = sorted(str(Path(m).resolve()) for m in models[1:])
    assert all(s["adapters"] == loaded for s in after), after  # each adapter once per actor


def test_a_lost_actor_stops_the_call_naming_it_and_the_next_call_starts_afresh(
    sharded: RayLocalBackend, models: list[str], expected: dict[str, ChatResult]
) -> None:
    asked = requests(models)
    seen: list[ChatResult] = []
    sharded.chat(asked[:2])  # the actors are up (started by the test before, or now)
    old = {s["pid"] for s in stats(sharded)}
    ray.kill(workers_of(sharded).actors[0])
    with pytest.raises(RunStopped, match=r"generation worker 1 of 2 \(a Ray actor\) died.*generation_workers"):
        sharded.chat(asked, on_result=seen.append)
    assert workers_of(sharded)._actors == []  # the other one killed too: its shard was decoding for nobody
    got = sharded.chat(asked)
    assert not old & {s["pid"] for s in stats(sharded)}
    assert all(r.model_dump() == expected[r.key].model_dump() for r in seen)  # what arrived before is right
    assert [r.model_dump() for r in got] == [expected[r.key].model_dump() for r in asked]


def test_a_request_the_model_cannot_take_is_the_users_error_as_in_process(
    sharded: RayLocalBackend, models: list[str]
) -> None:
    """Raised in an actor, it reaches the driver as the same one-line UserError, not as Ray's wrapped traceback."""
    long = ChatRequest(key="too-long", messages=(ChatMessage(role="user", content="7 " * 1200),), max_tokens=4)
    with pytest.raises(UserError, match=r"request 'too-long' has a \d+-token prompt, beyond the model's 1024") as info:
        sharded.chat([*requests(models)[:4], long])
    assert type(info.value) is UserError and "Traceback" not in str(info.value)


def test_a_finetune_takes_the_actors_resources_and_the_next_chat_uses_its_adapter(
    sharded: RayLocalBackend, tiny: Path, models: list[str], tmp_path: Path
) -> None:
    """The two actors hold the cluster's 2 CPUs: a job could never start beside them, so submitting one stops
    them, and the next call starts fresh ones, which load the adapter the job wrote on the storage."""
    sharded.chat(requests(models)[:2])
    old = {s["pid"] for s in stats(sharded)}
    (spec,) = specs(tmp_path / "data", 1)
    (state,) = wait_all(sharded, [sharded.start_finetune(spec)])
    assert sharded._generation is None
    assert state.status == "succeeded" and state.model_id is not None
    trained = [r.model_copy(update={"model": state.model_id, "key": f"t{i}"}) for i, r in
               enumerate(requests(models)[:6])]
    got = sharded.chat(trained)
    assert not old & {s["pid"] for s in stats(sharded)}
    here = LocalBackend(str(tiny), workdir=tmp_path / "here", device="cpu", dtype="float32", batch_size=16,
                        show_progress=False)
    try:
        reference = here.chat(trained)
    finally:
        here.close()
    assert [r.model_dump() for r in got] == [r.model_dump() for r in reference]
    assert any(r.text != b.text for r, b in zip(got, sharded.chat(requests(models)[:6]), strict=True))


# -- the real command ----------------------------------------------------------------------------------------------


def test_a_run_generating_on_two_actors_stores_what_an_in_process_run_stores(tiny: Path, tmp_path: Path) -> None:
    """The tiny random model answers nothing the task can parse, so no job has data and the run does not finetune:
    its debates and evaluations are all generation, on the same two actors throughout (the test before covers a
    finetune between them)."""
    reference = tmp_path / "in-process"
    write_config(reference, local_settings(tiny, iterations=1, agents=2))
    proc = run_cli(reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sharded = tmp_path / "sharded"
    settings = cluster_settings(tiny)
    write_config(sharded, {**settings, "cluster": {**settings["cluster"], "generation_workers": 2}})
    proc = run_cli(sharded)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine, theirs = Snapshot.read(sharded), Snapshot.read(reference)
    assert len(mine.responses) > 20 and mine.responses == theirs.responses
    assert same_results(mine, theirs) == []


def test_more_generation_workers_than_the_cluster_holds_is_one_line_before_the_run_starts(tiny: Path,
                                                                                        tmp_path: Path) -> None:
    """Three actors of 1 CPU on a 2-CPU cluster: the third would wait forever, so the command refuses at once."""
    settings = cluster_settings(tiny)
    write_config(tmp_path, {**settings, "cluster": {**settings["cluster"], "generation_workers": 3}})
    proc = run_cli(tmp_path)
    # Ray's own start-up warnings (token authentication) may come first: ours is the one line after them
    lines = [line for line in proc.stderr.strip().splitlines() if " WARNING " not in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "generation_workers = 3 ask 3 CPUs" in lines[0] and "the Ray cluster has 2" in lines[0], lines
    assert not (tmp_path / "maft-runs").exists()
