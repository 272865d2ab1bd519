"""A stateful fake of the Together AI HTTP API on 127.0.0.1, for tests that drive the official `together` SDK (3.x).

The server, fault injection, counts and chat answers are shared with the OpenAI fake (`tests/fake_http.py`); this
module holds what is Together's: routes, body shapes (as the SDK's types parse them), the upload flow, fine-tuning
jobs and serverless LoRA inference.

    with FakeTogether(base_accuracy=0.5) as fake:
        client = together.Together(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)

`base_url` is the server's root ("http://127.0.0.1:PORT"), not ".../v1": the SDK's paths already start with /v1
(its default base URL is "https://api.together.ai"). `openai_base_url` (".../v1") is for the `openai` SDK, which
Together's chat endpoint is compatible with.

What it serves:
  chat      POST /v1/chat/completions      base models, and completed LoRA finetunes of `serverless_lora_models`;
                                           another finetune (of another base, or a full finetune unless
                                           `serverless_full_finetunes`) is refused (400): it needs a dedicated
                                           endpoint
  models    GET  /v1/models                a plain JSON list of the models chat can serve now
  files     POST /v1/files                 upload step 1: form fields purpose, file_name, file_type, checksum;
                                           answers 302, Location = a presigned storage URL, X-Together-File-Id
            PUT  /fake-storage/{id}        upload step 2: the bytes, no API key (the URL's signature is checked)
            POST /v1/files/{id}/preprocess upload step 3: validates a fine-tune file, answers the file object
            GET  /v1/files, GET|DELETE /v1/files/{id}, GET /v1/files/{id}/content
  jobs      GET  /v1/fine-tunes/models/limits?model_name=   what `fine_tuning.create()` asks first
            POST /v1/fine-tunes/estimate-price              what it asks second
            POST|GET /v1/fine-tunes, GET /v1/fine-tunes/{id}, POST .../{id}/cancel, GET .../{id}/events,
            GET .../{id}/checkpoints

A job moves one state every `job_polls_per_state` GETs of /v1/fine-tunes/{id} (not on list, events or
checkpoints): pending -> queued -> running -> uploading -> completed, or -> error (a bad training file, detected
when it leaves pending; `fail_jobs`), or cancel_requested -> cancelled after a cancel. Each change logs events;
an error's message is only in its last event (level "error", type "job_error"): Together's job has no error field.
The output model name is set at creation; the model answers chat only once the job is completed.

`counts` keys are "METHOD template", e.g. "GET /v1/fine-tunes/{id}", "PUT /fake-storage/{id}"; an unknown route is
counted under its raw path. `usage[model]` holds what was billed: chat prompt/completion tokens and requests under
the model asked for, and a completed job's trained tokens (file tokens x epochs) under its root base model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from tests.fake_http import (
    ApiError,
    Call,
    FakeLLMServer,
    ModelInfo,
    Reply,
    Route,
    count_tokens,
    find_route,
    messages_tokens,
    parse_multipart,
)

API_KEY = "tg-fake-test-key"
USER = "fake-user"  # the namespace of output model names
USER_ID = "user_fake0123456789"
LLAMA_8B = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
QWEN_7B = "Qwen/Qwen2.5-7B-Instruct"
LLAMA_70B = "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference"
LLAMA_8B_TURBO = "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"
SERVERLESS_LORA_MODELS = (LLAMA_8B, QWEN_7B)
TRAINING_ROLES = ("system", "user", "assistant")
FILE_PURPOSES = ("fine-tune", "eval", "batch-api", "calibration")
TERMINAL = ("completed", "cancelled", "error", "user_error")
NANODOLLARS = 1_000_000_000  # Together's `total_price` unit (the SDK's finetune_price_to_dollars divides by it)
# The fake's own DPO rate, as a multiple of its SFT rate. Together prices DPO apart from SFT on its pricing page, whose
# figure we could not read; what matters here is that the two differ, so a bill that priced a DPO job at the SFT
# rate of our table instead of taking the job's `total_price` would show.
DPO_PRICE_FACTOR = 2.5
DEFAULT_SEED = 42  # what the server uses when a request has no random_seed
MODEL_LIST_URL = "https://api.together.ai/models"
KEYS_URL = "https://api.together.ai/settings/api-keys"


@dataclass(frozen=True)
class HostedModel:
    """A model Together serves; `lora_price`/`full_price` are $ per 1M trained tokens (None: not finetunable)."""

    name: str
    billion_params: float
    context_length: int
    lora_price: float | None
    full_price: float | None

    @property
    def short_name(self) -> str:
        return self.name.rpartition("/")[2]


MODELS = {
    m.name: m
    for m in (
        HostedModel(LLAMA_8B, 8.0, 131_072, 0.48, 0.54),
        HostedModel(QWEN_7B, 7.6, 32_768, 0.48, 0.54),
        HostedModel(LLAMA_70B, 70.6, 131_072, 2.90, 3.20),
        HostedModel(LLAMA_8B_TURBO, 8.0, 131_072, None, None),
    )
}


# ---------------------------------------------------------------- pure helpers


def iso(ts: float | None = None) -> str:
    """Together's timestamps: ISO 8601 in UTC with milliseconds."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class FileReport:
    """What validating a fine-tune file found (Together's server-side checks of the conversational format)."""

    examples: int = 0
    tokens: int = 0
    has_weights: bool = False
    error: str | None = None
    format: str = "CONVERSATION"  # or "PREFERENCE" (input / preferred_output / non_preferred_output)


def message_problem(message: Any, j: int, expected: tuple[str, ...]) -> str | None:
    """What is wrong with message j of a conversation (None when fine); `expected` are the roles allowed there."""
    if not isinstance(message, dict):
        return f"message {j} is not an object"
    role, content = message.get("role"), message.get("content")
    if role not in TRAINING_ROLES:
        return f"message {j} has an invalid role {role!r} (possible roles: {', '.join(TRAINING_ROLES)})"
    if role not in expected:
        return (f"message {j} has role {role!r} where {' or '.join(expected)} was expected (a conversation starts "
                "with system or user, then alternates user and assistant)")
    if not isinstance(content, str) or not content.strip():
        return f"message {j} has empty or missing `content`"
    weight = message.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        return f"message {j} has weight {weight!r}; only 0 and 1 are supported"
    return None


def conversation_problem(example: Any) -> str | None:
    """What is wrong with one line's conversation, or None."""
    messages = example.get("messages") if isinstance(example, dict) else None
    if messages is None:
        columns = sorted(example) if isinstance(example, dict) else []
        return (f"could not detect the dataset format from the columns {columns}; this fake accepts only the "
                "conversational format (a `messages` list)")
    if not isinstance(messages, list) or not messages:
        return "`messages` must be a non-empty list"
    expected: tuple[str, ...] = ("system", "user")
    for j, message in enumerate(messages, 1):
        if problem := message_problem(message, j, expected):
            return problem
        expected = ("assistant",) if message["role"] == "user" else ("user",)
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant message"
    if all(m.get("weight", 1) == 0 for m in messages):
        return "every message has weight 0, so nothing would be trained"
    return None


PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")


def preference_problem(example: Any) -> str | None:
    """What is wrong with one preference line (Together's rules: `input.messages` in the conversational format,
    ending with a user turn; "Both outputs must contain exactly one message from the assistant role"), or None."""
    missing = [k for k in PREFERENCE_KEYS if k not in example]
    if missing:
        return f"the preference format needs the fields {', '.join(PREFERENCE_KEYS)}; `{missing[0]}` is missing"
    given = example["input"]
    messages = given.get("messages") if isinstance(given, dict) else None
    if not isinstance(messages, list) or not messages:
        return "`input.messages` must be a non-empty list"
    expected: tuple[str, ...] = ("system", "user", "assistant")
    for j, message in enumerate(messages, 1):
        if problem := message_problem(message, j, expected):
            return f"in `input.messages`, {problem}"
    if messages[-1]["role"] != "user":
        return "the last message of `input.messages` must have role 'user'"
    for name in PREFERENCE_KEYS[1:]:
        output = example[name]
        if (not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict)
                or output[0].get("role") != "assistant"):
            return f"`{name}` must contain exactly one message from the assistant role"
        content = output[0].get("content")
        if not isinstance(content, str) or not content.strip():
            return f"the message of `{name}` has empty or missing `content`"
    return None


def preference_tokens(example: dict[str, Any]) -> int:
    """A pair's tokens: its prompt and both outputs (each is trained on: the reference and the policy see both)."""
    return messages_tokens(example["input"]["messages"] + example["preferred_output"] + example["non_preferred_output"])


def parse_line(line: str) -> tuple[Any, str | None]:
    """One JSONL line's example, and what is wrong with it (None when it is a good conversation)."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError:
        return None, "it is not valid JSON"
    if isinstance(example, dict) and "messages" not in example and "input" in example:
        return example, preference_problem(example)
    return example, conversation_problem(example)


def check_training_file(data: bytes) -> FileReport:
    """Validate a conversational JSONL file line by line; the error names the first bad line."""
    report = FileReport()
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        report.error = "The file is not UTF-8 encoded."
        return report
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        example, problem = parse_line(line)
        kind = "PREFERENCE" if isinstance(example, dict) and "messages" not in example and "input" in example \
            else "CONVERSATION"
        if not problem and report.examples and kind != report.format:
            problem = f"the line is in the {kind.lower()} format, but the file began in the {report.format.lower()} one"
        if problem:
            report.error = f"Invalid format on line {i} of the input file: {problem}."
            return report
        report.format = kind
        report.examples += 1
        if kind == "PREFERENCE":
            report.tokens += preference_tokens(example)
            continue
        report.tokens += messages_tokens(example["messages"])
        report.has_weights |= any("weight" in m for m in example["messages"])
    if not report.examples:
        report.error = "The file has no examples; the minimum is 1."
    return report


def model_limits(model: HostedModel) -> dict[str, Any]:
    """The body of GET /v1/fine-tunes/models/limits, as `FinetuneModelLimits` parses it."""
    return {
        "model_name": model.name,
        "max_num_epochs": 20,
        "max_num_evals": 100,
        "max_num_checkpoints": 20,
        "max_learning_rate": 1.0,
        "min_learning_rate": 1e-8,
        "max_seq_length_sft": min(model.context_length, 32_768),
        "max_seq_length_dpo": min(model.context_length, 16_384),
        "min_max_seq_length": 512,
        "default_gradient_accumulation_steps": 1,
        "merge_output_lora": False,
        "supports_full_training": model.full_price is not None,
        "supports_reasoning": False,
        "supports_tools": True,
        "supports_vision": False,
        "lora_training": {
            "default_rank": 64,
            "max_rank": 64,
            "min_batch_size": 8,
            "max_batch_size": 32 if model.billion_params > 20 else 128,
            "max_batch_size_dpo": 16 if model.billion_params > 20 else 64,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        "full_training": {
            "min_batch_size": 8,
            "max_batch_size": 16 if model.billion_params > 20 else 96,
            "max_batch_size_dpo": 8 if model.billion_params > 20 else 48,
        },
    }


def training_price(model: HostedModel, lora: bool, tokens: int) -> float:
    """Dollars for training `tokens` tokens (already multiplied by epochs)."""
    per_million = model.lora_price if lora else model.full_price
    return tokens * (per_million or 0.0) / 1e6


def checkpoint_steps(total_steps: int, n_checkpoints: int) -> list[int]:
    """Evenly spaced steps at which checkpoints are saved; the last one is the final model."""
    return sorted({max(1, round(total_steps * k / n_checkpoints)) for k in range(1, n_checkpoints + 1)})


def split_checkpoint(reference: str) -> tuple[str, int | None]:
    """"{job id or output name}[:{step}]" -> (name, step or None)."""
    name, sep, step = reference.rpartition(":")
    if sep and step.isdigit():
        return name, int(step)
    return reference, None


def positive_int(body: Mapping[str, Any], name: str, default: int, maximum: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ApiError(400, f"{name} must be an integer between 1 and {maximum}, got {value!r}.", param=name)
    return value


ROUTES = (
    Route("POST", "/v1/chat/completions", "_chat"),
    Route("GET", "/v1/models", "_list_models"),
    Route("POST", "/v1/files", "_start_upload"),
    Route("PUT", "/fake-storage/{id}", "_store_upload"),
    Route("POST", "/v1/files/{id}/preprocess", "_preprocess_file"),
    Route("GET", "/v1/files", "_list_files"),
    Route("GET", "/v1/files/{id}", "_get_file"),
    Route("DELETE", "/v1/files/{id}", "_delete_file"),
    Route("GET", "/v1/files/{id}/content", "_get_file_content"),
    Route("GET", "/v1/fine-tunes/models/limits", "_model_limits"),
    Route("POST", "/v1/fine-tunes/estimate-price", "_estimate_price"),
    Route("POST", "/v1/fine-tunes", "_create_job"),
    Route("GET", "/v1/fine-tunes", "_list_jobs"),
    Route("GET", "/v1/fine-tunes/{id}", "_get_job"),
    Route("POST", "/v1/fine-tunes/{id}/cancel", "_cancel_job"),
    Route("GET", "/v1/fine-tunes/{id}/events", "_list_events"),
    Route("GET", "/v1/fine-tunes/{id}/checkpoints", "_list_checkpoints"),
)
UNAUTHENTICATED = ("_store_upload",)  # a presigned URL carries its own signature


@dataclass
class _Model(ModelInfo):
    """A model chat may be asked for: a base model, or the output of a completed job."""

    lora: bool = False


@dataclass
class _JobState:
    """What the fake keeps about a job beside its JSON."""

    base: HostedModel
    depth: int
    lora: bool
    polls: int = 0
    examples: int = 0
    file_tokens: int = 0
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- the fake


class FakeTogether(FakeLLMServer):
    """The fake provider: state, behaviour switches for tests, and one handler method per route."""

    name = "fake_together"
    api_key: str = API_KEY
    usage_keys = ("prompt_tokens", "completion_tokens", "requests", "trained_tokens")

    def __init__(
        self,
        *,
        seed: int = 0,
        chat_latency: float = 0.0,
        base_accuracy: float = 0.5,
        finetune_bonus: float = 0.25,
        accuracy: dict[str, float] | None = None,
        job_polls_per_state: int = 1,
        serverless_lora_models: Iterable[str] = SERVERLESS_LORA_MODELS,
        serverless_full_finetunes: bool = False,
    ) -> None:
        super().__init__(seed=seed, chat_latency=chat_latency, base_accuracy=base_accuracy,
                         finetune_bonus=finetune_bonus, accuracy=accuracy)
        self.job_polls_per_state = job_polls_per_state
        self.serverless_lora_models = tuple(serverless_lora_models)
        self.serverless_full_finetunes = serverless_full_finetunes
        self.base_url = ""
        self.openai_base_url = ""
        self.files: dict[str, dict[str, Any]] = {}
        self.file_contents: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self._upload_tokens: dict[str, str] = {}
        self._job_state: dict[str, _JobState] = {}
        self._fail_rules: list[tuple[str, str]] = []
        self._models = {m.name: _Model(m.name, m.name, 0, 1_700_000_000, m.name.partition("/")[0]) for m in
                        MODELS.values()}

    def start(self) -> Self:
        """Listen on a free port of 127.0.0.1; `base_url` is the root the together SDK wants."""
        super().start()
        self.base_url = self.origin
        self.openai_base_url = f"{self.origin}/v1"
        return self

    # ------------------------------------------------------------ behaviour switches

    def fail_jobs(self, suffix_contains: str, message: str = "Injected failure: the training run crashed.") -> None:
        """Jobs whose suffix contains this string end in status `error` at their next state change, with
        `message` in a job_error event."""
        with self._lock:
            self._fail_rules.append((suffix_contains, message))

    def clear_failures(self) -> None:
        """The cause of injected job failures is fixed: new state changes succeed again."""
        with self._lock:
            self._fail_rules.clear()

    def accuracy_of(self, model: str) -> float:
        """The chance that `model` answers right: set_accuracy / accuracy= entries win; otherwise its root base
        model's accuracy plus finetune_bonus per finetune (a job from a checkpoint is one deeper), capped at 1."""
        with self._lock:
            info = self._models.get(model)
        if info is None:
            raise KeyError(model)
        return self._accuracy_for(info)

    # ------------------------------------------------------------ request entry point

    def resolve(self, method: str, path: str) -> tuple[str, tuple[Route, tuple[str, ...]] | None]:
        found = find_route(ROUTES, method, path)
        return (f"{method} {found[0].template}" if found else f"{method} {path}"), found

    def dispatch(self, call: Call, found: tuple[Route, tuple[str, ...]] | None) -> Reply:
        if found is None or found[0].handler not in UNAUTHENTICATED:
            self._authorize(call.headers)
        if found is None:
            hint = ""
            if call.path.startswith("/v1/v1/"):
                hint = " The together SDK's paths start with /v1 already: give the client a base_url without /v1."
            raise ApiError(404, f"Invalid URL ({call.method} {call.path}).{hint}")
        route, call.params = found
        return self.call_handler(route.handler, call)

    def _authorize(self, headers: Mapping[str, str]) -> None:
        if (headers.get("Authorization") or "") != f"Bearer {self.api_key}":
            raise ApiError(401, f"Invalid API key provided. You can find your API key at {KEYS_URL}.",
                           code="invalid_api_key")

    # ------------------------------------------------------------ models and chat

    def _servable(self, info: _Model) -> bool:
        """Base models serve; a finetune only as a LoRA adapter on a serverless-LoRA base (a full finetune is a new
        model and needs a dedicated endpoint), unless `serverless_full_finetunes` relaxes the second rule."""
        if info.depth == 0:
            return True
        return info.root in self.serverless_lora_models and (info.lora or self.serverless_full_finetunes)

    def _list_models(self, call: Call) -> Reply:
        """Together answers a plain JSON list (no {"data": ...} envelope)."""
        with self._lock:
            models = [m for m in self._models.values() if self._servable(m)]
        return Reply.json([self._model_object(m) for m in models])

    def _model_object(self, info: _Model) -> dict[str, Any]:
        base = MODELS[info.root]
        return {
            "id": info.id,
            "object": "model",
            "created": info.created,
            "type": "chat",
            "display_name": info.id.rpartition("/")[2],
            "organization": info.owned_by,
            "link": f"{MODEL_LIST_URL}/{info.id}",
            "context_length": base.context_length,
            "config": {"chat_template": None, "stop": ["<|eot_id|>"], "bos_token": None, "eos_token": None},
            "pricing": {"hourly": 0, "input": 0.18, "output": 0.18, "base": 0, "finetune": 0},
        }

    def _chat_model(self, name: Any) -> _Model:
        """The model a chat request names, or the 404 / 400 Together answers."""
        with self._lock:
            info = self._models.get(name) if isinstance(name, str) else None
        if info is None:
            raise ApiError(404, f"Unable to access model {name}. Please visit {MODEL_LIST_URL} to view the list of "
                           "supported models.", code="model_not_available")
        if not self._servable(info):
            raise ApiError(400, f"Unable to access non-serverless model {name}. Please visit {MODEL_LIST_URL}/{name} "
                           "to create and start a new dedicated endpoint for the model.", code="model_not_available")
        return info

    def _chat(self, call: Call) -> Reply:
        body = call.json()
        if body.get("stream"):
            raise ApiError(400, "The fake does not stream; send stream=false.", param="stream")
        info = self._chat_model(body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "`messages` must be a non-empty array of message objects.", param="messages")
        n = body.get("n") or 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
            raise ApiError(400, f"Invalid `n`: {n!r}.", param="n")
        self._wait_chat_latency()
        p = self._accuracy_for(info)
        choices = [self._choice(info.id, body, i, p) for i in range(n)]
        prompt = messages_tokens(messages)
        completion = sum(count_tokens(c["message"]["content"]) for c in choices)
        self._bill(info.id, prompt_tokens=prompt, completion_tokens=completion, requests=1)
        return Reply.json({
            "id": self._new_id("", 16, "0123456789abcdef") + "-FAKE",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": info.id,
            "prompt": [],
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        })

    def _choice(self, model: str, body: dict[str, Any], index: int, p: float) -> dict[str, Any]:
        """One choice; Together says "eos" when the model stopped by itself and "length" when max_tokens cut it."""
        text, finish = self._answer(model, body, index, p), "eos"
        limit = body.get("max_tokens")
        if isinstance(limit, int) and count_tokens(text) > limit:
            text, finish = text[: limit * 4], "length"
        seed = body.get("seed") if isinstance(body.get("seed"), int) else DEFAULT_SEED
        return {"index": index, "seed": seed, "finish_reason": finish, "logprobs": None,
                "message": {"role": "assistant", "content": text, "tool_calls": []}}

    # ------------------------------------------------------------ files: the three-step upload, then CRUD

    def _start_upload(self, call: Call) -> Reply:
        """Step 1: register the file and answer 302 to a presigned URL on this server (the SDK PUTs the bytes)."""
        fields = parse_multipart(call.body, call.headers.get("Content-Type") or "")
        form = {name: data.decode("utf-8", "replace") for name, (_, data) in fields.items()}
        purpose, file_type = form.get("purpose", ""), form.get("file_type", "")
        if purpose not in FILE_PURPOSES:
            raise ApiError(400, f"Invalid purpose {purpose!r}; expected one of {', '.join(FILE_PURPOSES)}.",
                           param="purpose")
        if file_type not in ("jsonl", "parquet", "csv"):
            raise ApiError(400, f"Invalid file_type {file_type!r}; expected jsonl, parquet or csv.", param="file_type")
        file_id = self._uuid("file-")
        token = self._new_id("", 32)
        file = {"id": file_id, "object": "file", "created_at": int(time.time()), "filename": form.get("file_name")
                or "upload.jsonl", "bytes": 0, "purpose": purpose, "FileType": file_type, "Processed": False,
                "LineCount": 0, "processing_status": "PENDING"}
        with self._lock:
            self.files[file_id] = file
            self._upload_tokens[file_id] = token
        location = f"{self.origin}/fake-storage/{file_id}?X-Amz-Signature={token}"
        return Reply.json({}, 302, {"Location": location, "X-Together-File-Id": file_id})

    def _store_upload(self, call: Call) -> Reply:
        """Step 2: the storage bucket takes the bytes if the URL's signature is the one it issued."""
        file_id = call.params[0]
        with self._lock:
            if self._upload_tokens.get(file_id) != call.arg("X-Amz-Signature"):
                return Reply(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>", "application/xml")
            self.file_contents[file_id] = call.body
            self.files[file_id]["bytes"] = len(call.body)
        return Reply(200, b"", headers={"ETag": f'"{self._new_id("", 32, "0123456789abcdef")}"'})

    def _preprocess_file(self, call: Call) -> Reply:
        """Step 3: validate the uploaded bytes (fine-tune files only) and answer the file object."""
        with self._lock:
            file = self._require_file(call.params[0])
            if file["id"] not in self.file_contents:
                raise ApiError(400, f"File {file['id']} has no uploaded content yet.")
            content = self.file_contents[file["id"]]
        report = check_training_file(content) if file["purpose"] == "fine-tune" else FileReport()
        status = "INVALID_FORMAT" if report.error else "COMPLETED"
        with self._lock:
            file.update(Processed=True, LineCount=report.examples, processing_status=status, validation_report={
                "valid": report.error is None, "file_id": file["id"], "nlines": report.examples,
                "dataset_format": report.format, "dataset_has_message_weights": report.has_weights,
                "error": report.error, "error_type": "INVALID_FORMAT" if report.error else None,
            })
            return Reply.json(file)

    def _require_file(self, file_id: str) -> dict[str, Any]:
        with self._lock:
            if file_id not in self.files:
                raise ApiError(404, f"File {file_id} not found.", code="file_not_found")
            return self.files[file_id]

    def _list_files(self, call: Call) -> Reply:
        with self._lock:
            return Reply.json({"object": "list", "data": list(self.files.values())})

    def _get_file(self, call: Call) -> Reply:
        return Reply.json(self._require_file(call.params[0]))

    def _get_file_content(self, call: Call) -> Reply:
        with self._lock:
            self._require_file(call.params[0])
            return Reply(body=self.file_contents.get(call.params[0], b""), content_type="application/octet-stream")

    def _delete_file(self, call: Call) -> Reply:
        file_id = call.params[0]
        with self._lock:
            self._require_file(file_id)
            del self.files[file_id]
            self.file_contents.pop(file_id, None)
        return Reply.json({"id": file_id, "deleted": True})

    # ------------------------------------------------------------ fine-tuning: what create() asks first

    def _finetunable(self, name: Any) -> HostedModel:
        model = MODELS.get(name) if isinstance(name, str) else None
        if model is None or model.lora_price is None:
            raise ApiError(400, f"Model {name} is not supported for fine-tuning. See "
                           "https://docs.together.ai/docs/fine-tuning-models for the models you can fine-tune.",
                           param="model", code="model_not_supported")
        return model

    def _find_job(self, name: str) -> dict[str, Any] | None:
        """A job by its id or its output model name."""
        with self._lock:
            return self.jobs.get(name) or next((j for j in self.jobs.values() if j["model_output_name"] == name), None)

    def _checkpoint(self, reference: str) -> tuple[dict[str, Any], int | None]:
        """The job and step a from_checkpoint reference ("{job id or output name}[:{step}]") names; 400 if unknown."""
        name, step = split_checkpoint(reference)
        job = self._find_job(name)
        if job is None:
            raise ApiError(400, f"Checkpoint {reference!r} not found: no fine-tuning job or output model is named "
                           f"{name!r}.", param="from_checkpoint")
        return job, step

    def _model_limits(self, call: Call) -> Reply:
        """create() asks this first, with `model`, or with from_checkpoint's part before ":" (a job id or name)."""
        name = call.arg("model_name") or ""
        if name not in MODELS and (name.startswith("ft-") or self._find_job(name)):
            job, _ = self._checkpoint(name)
            return Reply.json(model_limits(self._job_state[job["id"]].base))
        return Reply.json(model_limits(self._finetunable(name)))

    def _estimate_price(self, call: Call) -> Reply:
        """create() asks this second; a file that failed validation gets no estimate (the job will fail)."""
        body = call.json()
        file = self._require_file(str(body.get("training_file")))
        if file["processing_status"] != "COMPLETED":
            invalid = file["processing_status"] == "INVALID_FORMAT"
            return Reply.json({"estimation_available": False,
                               "unavailable_reason": "train_file_invalid" if invalid else "train_file_not_validated"})
        if body.get("from_checkpoint"):
            parent = self._job_state[self._checkpoint(str(body["from_checkpoint"]))[0]["id"]]
            base, lora = parent.base, parent.lora
        else:
            base, lora = self._finetunable(body.get("model")), True
        if body.get("training_type"):
            lora = body["training_type"].get("type") == "Lora"
        with self._lock:
            tokens = check_training_file(self.file_contents[file["id"]]).tokens * int(body.get("n_epochs") or 1)
        return Reply.json({
            "estimation_available": True, "allowed_to_proceed": True, "user_limit": 1000.0,
            "estimated_total_price": round(training_price(base, lora, tokens), 6),
            "estimated_train_token_count": tokens, "estimated_eval_token_count": 0,
        })

    # ------------------------------------------------------------ fine-tuning: jobs

    def _create_job(self, call: Call) -> Reply:
        body = call.json()
        base, depth, parent = self._job_origin(body)
        file = self._require_file(str(body.get("training_file")))
        if file["purpose"] != "fine-tune":
            raise ApiError(400, f"File {file['id']} was not uploaded for purpose 'fine-tune'.", param="training_file")
        training_type = self._training_type(body, base, parent)
        job = self._job_json(body, base, file, training_type)
        state = _JobState(base, depth, training_type["type"] == "Lora")
        with self._lock:
            self.jobs[job["id"]] = job
            self._job_state[job["id"]] = state
            self._event(job, "job_pending", "Fine tune request created")
        return Reply.json(job)

    def _job_origin(self, body: Mapping[str, Any]) -> tuple[HostedModel, int, dict[str, Any] | None]:
        """(base model, finetune depth of the result, parent job or None) for a create request."""
        reference, model = body.get("from_checkpoint"), body.get("model")
        if reference and model:
            raise ApiError(400, "Specify either a model or a checkpoint to start a job from, not both.")
        if not reference:
            return self._finetunable(model), 1, None
        parent, step = self._checkpoint(str(reference))
        if parent["status"] != "completed":
            raise ApiError(400, f"Job {parent['id']} has no checkpoints to continue from: its status is "
                           f"{parent['status']}.", param="from_checkpoint")
        steps = [c["step"] for c in self._job_state[parent["id"]].checkpoints]
        if step is not None and step not in steps:
            raise ApiError(400, f"Job {parent['id']} has no checkpoint at step {step} (steps: {steps}).",
                           param="from_checkpoint")
        state = self._job_state[parent["id"]]
        return state.base, state.depth + 1, parent

    def _training_type(
        self, body: Mapping[str, Any], base: HostedModel, parent: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The request's training_type, checked against the model limits; absent: LoRA, or the parent's type."""
        given = body.get("training_type")
        if given is None:
            given = dict(parent["training_type"]) if parent else {"type": "Lora"}
        if not isinstance(given, dict):
            raise ApiError(400, f"training_type must be an object, got {given!r}.", param="training_type")
        limits = model_limits(base)
        if given.get("type") == "Full":
            if parent and parent["training_type"]["type"] != "Full":
                raise ApiError(400, "A job from a LoRA checkpoint must also train LoRA.", param="training_type")
            return {"type": "Full"}
        if given.get("type") != "Lora":
            raise ApiError(400, f"Unknown training_type {given!r}.", param="training_type")
        if parent and parent["training_type"]["type"] != "Lora":
            raise ApiError(400, "A job from a full fine-tuning checkpoint must also train fully.",
                           param="training_type")
        rank = given.get("lora_r", limits["lora_training"]["default_rank"])
        if not isinstance(rank, int) or not 1 <= rank <= limits["lora_training"]["max_rank"]:
            raise ApiError(400, f"lora_r must be between 1 and {limits['lora_training']['max_rank']}, got {rank!r}.",
                           param="training_type.lora_r")
        return {"type": "Lora", "lora_r": rank, "lora_alpha": given.get("lora_alpha", rank * 2),
                "lora_dropout": given.get("lora_dropout", 0.0),
                "lora_trainable_modules": given.get("lora_trainable_modules", "all-linear")}

    def _job_json(self, body: Mapping[str, Any], base: HostedModel, file: Mapping[str, Any],
                  training_type: dict[str, Any]) -> dict[str, Any]:
        """The job as Together shows it at creation (validating the hyperparameters on the way)."""
        limits = model_limits(base)
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 40):
            raise ApiError(400, "suffix must be a string of at most 40 characters.", param="suffix")
        n_epochs = positive_int(body, "n_epochs", 1, limits["max_num_epochs"])
        n_checkpoints = positive_int(body, "n_checkpoints", 1, limits["max_num_checkpoints"])
        learning_rate = body.get("learning_rate", 1e-5)
        if not isinstance(learning_rate, int | float) or not limits["min_learning_rate"] <= learning_rate <= 1.0:
            raise ApiError(400, f"learning_rate must be between 1e-08 and 1, got {learning_rate!r}.",
                           param="learning_rate")
        method = body.get("training_method") or {"method": "sft", "train_on_inputs": "auto"}
        if method.get("method") not in ("sft", "dpo"):
            raise ApiError(400, f"Unknown training_method {method.get('method')!r}: use 'sft' or 'dpo'.",
                           param="training_method")
        if method["method"] == "dpo":
            beta, alpha = method.get("dpo_beta"), method.get("rpo_alpha")
            if beta is not None and (not isinstance(beta, int | float) or beta <= 0):
                raise ApiError(400, f"dpo_beta must be a positive number, got {beta!r}.", param="dpo_beta")
            if alpha is not None and (not isinstance(alpha, int | float) or alpha < 0):
                raise ApiError(400, f"rpo_alpha must be non-negative, got {alpha!r}.", param="rpo_alpha")
            if "train_on_inputs" in method:
                raise ApiError(400, "train_on_inputs is only supported for SFT training.", param="train_on_inputs")
        batch_size = self._batch_size(body.get("batch_size", "max"), limits, training_type["type"] == "Lora")
        tag = self._new_id("", 8, "0123456789abcdef")
        output = f"{USER}/{base.short_name}-{suffix}-{tag}" if suffix else f"{USER}/{base.short_name}-{tag}"
        now = iso()
        return {
            "id": self._uuid("ft-"), "object": "finetune", "status": "pending", "created_at": now, "updated_at": now,
            "started_at": None, "user_id": USER_ID, "owner_address": "0xfake", "model": base.name,
            "model_output_name": output, "adapter_output_name": None, "suffix": suffix,
            "training_file": file["id"], "validation_file": body.get("validation_file") or "",
            "from_checkpoint": body.get("from_checkpoint"), "n_epochs": n_epochs, "n_checkpoints": n_checkpoints,
            "n_evals": body.get("n_evals") or 0, "batch_size": batch_size, "learning_rate": learning_rate,
            "lr_scheduler": body.get("lr_scheduler"), "warmup_ratio": body.get("warmup_ratio", 0.0),
            "max_grad_norm": body.get("max_grad_norm", 1.0), "weight_decay": body.get("weight_decay", 0.0),
            "packing": body.get("packing", True), "training_type": training_type, "training_method": method,
            "train_on_inputs": method.get("train_on_inputs", "auto"),
            "random_seed": body.get("random_seed") if body.get("random_seed") is not None else DEFAULT_SEED,
            "token_count": None, "param_count": int(base.billion_params * 1e9), "total_price": None,
            "epochs_completed": 0, "steps_completed": 0, "total_steps": None, "queue_depth": 0,
            "trainingfile_numlines": file.get("LineCount", 0), "trainingfile_size": file.get("bytes", 0),
            "wandb_project_name": None, "wandb_url": None, "events": [],
        }

    @staticmethod
    def _batch_size(value: Any, limits: Mapping[str, Any], lora: bool) -> int:
        bounds = limits["lora_training" if lora else "full_training"]
        if value == "max":
            return int(bounds["max_batch_size"])
        if isinstance(value, bool) or not isinstance(value, int) or not (
                bounds["min_batch_size"] <= value <= bounds["max_batch_size"]):
            raise ApiError(400, f"batch_size must be 'max' or between {bounds['min_batch_size']} and "
                           f"{bounds['max_batch_size']}, got {value!r}.", param="batch_size")
        return value

    def _require_job(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise ApiError(404, f"Fine-tune job {job_id} not found.", code="not_found")
        return self.jobs[job_id]

    def _list_jobs(self, call: Call) -> Reply:
        """The jobs, oldest first, in the "truncated" form (no events), as Together lists them."""
        with self._lock:
            return Reply.json({"data": [{k: v for k, v in j.items() if k != "events"} for j in self.jobs.values()]})

    def _get_job(self, call: Call) -> Reply:
        with self._lock:
            job = self._require_job(call.params[0])
            self._poll_job(job)
            return Reply.json(job)

    def _cancel_job(self, call: Call) -> Reply:
        with self._lock:
            job = self._require_job(call.params[0])
            if job["status"] in TERMINAL:
                raise ApiError(400, f"Job {job['id']} has already ended ({job['status']}) and cannot be cancelled.")
            if job["status"] != "cancel_requested":
                self._set_status(job, "cancel_requested")
                self._event(job, "cancel_requested", "Job cancellation requested")
            return Reply.json({k: v for k, v in job.items() if k != "events"})

    def _list_events(self, call: Call) -> Reply:
        with self._lock:
            return Reply.json({"data": list(self._require_job(call.params[0])["events"])})

    def _list_checkpoints(self, call: Call) -> Reply:
        with self._lock:
            job = self._require_job(call.params[0])
            return Reply.json({"data": list(reversed(self._job_state[job["id"]].checkpoints))})

    def job_events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's events, oldest first."""
        with self._lock:
            return list(self.jobs[job_id]["events"])

    # ------------------------------------------------------------ fine-tuning: a job's life

    def _poll_job(self, job: dict[str, Any]) -> None:
        """Count a retrieval; every `job_polls_per_state` of them the job moves on by one state."""
        state = self._job_state[job["id"]]
        if job["status"] in TERMINAL:
            return
        state.polls += 1
        if state.polls >= self.job_polls_per_state:
            state.polls = 0
            self._advance_job(job, state)

    def _advance_job(self, job: dict[str, Any], state: _JobState) -> None:
        rule = next((r for r in self._fail_rules if r[0] in (job["suffix"] or "")), None)
        if rule is not None and job["status"] != "cancel_requested":
            self._fail_job(job, rule[1])
            return
        step = {"pending": self._validate_job, "queued": self._start_job, "running": self._train_job,
                "uploading": self._complete_job, "cancel_requested": self._stop_job}[job["status"]]
        step(job, state)

    def _validate_job(self, job: dict[str, Any], state: _JobState) -> None:
        """pending -> queued, or -> error naming the bad line of the training file."""
        content = self.file_contents.get(job["training_file"])
        report = check_training_file(content) if content is not None else FileReport(error="It was deleted.")
        wanted = "PREFERENCE" if job["training_method"]["method"] == "dpo" else "CONVERSATION"
        if not report.error and report.format != wanted:
            report.error = (f"A {job['training_method']['method'].upper()} job needs a file in the "
                            f"{wanted.lower()} format; this one is in the {report.format.lower()} format.")
        if report.error:
            self._fail_job(job, f"The training file {job['training_file']} failed validation. {report.error}")
            return
        state.examples, state.file_tokens = report.examples, report.tokens
        job.update(trainingfile_numlines=report.examples, total_steps=self._total_steps(job, report.examples))
        self._set_status(job, "queued")
        self._event(job, "job_pending", "Job is queued (queue position 1)")
        if report.has_weights and job["train_on_inputs"] is not True:
            job["train_on_inputs"] = True
            self._event(job, "warning", "The training file has message weights, so train_on_inputs was set to "
                        "true: every message whose weight is 1 (the default) is trained on.", level="warning")

    @staticmethod
    def _total_steps(job: Mapping[str, Any], examples: int) -> int:
        return max(1, math.ceil(examples / job["batch_size"])) * job["n_epochs"]

    def _start_job(self, job: dict[str, Any], state: _JobState) -> None:
        self._set_status(job, "running")
        job["started_at"] = job["updated_at"]
        base = job["model"]
        self._event(job, "job_start", f"Job started at {job['started_at']}")
        self._event(job, "model_downloading", f"Downloading model data for {base}")
        self._event(job, "model_download_complete", f"Model data downloaded for {base}")
        self._event(job, "training_data_downloading", f"Downloading training data from {job['training_file']}")
        self._event(job, "training_data_download_complete", f"Training data downloaded: {state.examples} examples, "
                    f"{state.file_tokens} tokens", token_count=state.file_tokens)
        self._event(job, "training_start", f"Training started for model {base}")

    def _train_job(self, job: dict[str, Any], state: _JobState) -> None:
        """running -> uploading: log the epochs and save the checkpoints."""
        total, epochs = job["total_steps"], job["n_epochs"]
        for epoch in range(1, epochs + 1):
            self._event(job, "epoch_complete", f"Epoch completed, at step {total * epoch // epochs}",
                        step=total * epoch // epochs, total_steps=total)
        steps = checkpoint_steps(total, job["n_checkpoints"])
        for step in steps:
            final = step == steps[-1]
            path = job["model_output_name"] if final else f"{job['id']}:{step}"
            state.checkpoints.append({"step": step, "path": path, "created_at": iso(),
                                      "checkpoint_type": "Final" if final else f"Intermediate (step {step})",
                                      "checkpoint": "adapter" if state.lora else "model"})
            self._event(job, "checkpoint_save", f"Checkpoint saved at step {step}", step=step, checkpoint_path=path)
        job.update(steps_completed=total, epochs_completed=epochs)
        self._event(job, "training_complete", f"Training completed for {job['model']} at {iso()}")
        self._set_status(job, "uploading")
        self._event(job, "model_uploading", "Uploading output model")

    def _complete_job(self, job: dict[str, Any], state: _JobState) -> None:
        """uploading -> completed: the output model exists, and the trained tokens are billed."""
        trained = state.file_tokens * job["n_epochs"]
        price = training_price(state.base, state.lora, trained)
        if job["training_method"]["method"] == "dpo":
            price *= DPO_PRICE_FACTOR
        name = job["model_output_name"]
        self._models[name] = _Model(name, state.base.name, state.depth, int(time.time()), USER, lora=state.lora)
        job.update(token_count=trained, total_price=round(price * NANODOLLARS))
        self._bill(state.base.name, trained_tokens=trained)
        self._event(job, "model_upload_complete", f"Model upload complete: {name}")
        self._set_status(job, "completed")
        self._event(job, "job_complete", f"Job finished at {job['updated_at']}")

    def _stop_job(self, job: dict[str, Any], state: _JobState) -> None:
        self._set_status(job, "cancelled")
        self._event(job, "job_stopped", "Job was cancelled")

    def _fail_job(self, job: dict[str, Any], message: str) -> None:
        self._set_status(job, "error")
        self._event(job, "job_error", message, level="error")

    def _set_status(self, job: dict[str, Any], status: str) -> None:
        job.update(status=status, updated_at=iso())

    def _event(self, job: dict[str, Any], type: str, message: str, *, level: str = "info", **extra: Any) -> None:
        job["events"].append({"object": "fine-tune-event", "created_at": iso(), "level": level, "message": message,
                              "type": type, "param_count": job["param_count"], "token_count": 0, "wandb_url": "",
                              "hash": self._new_id("", 16, "0123456789abcdef")} | extra)

    def _uuid(self, prefix: str) -> str:
        """A seeded UUID-looking id, as Together's file-... and ft-... ids are."""
        digits = self._new_id("", 32, "0123456789abcdef")
        return f"{prefix}{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
