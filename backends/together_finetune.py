"""Finetuning on Together AI: check the file, upload it once, start one job per key, poll, cancel.

The same guards as OpenAI's (`backends.hosted` holds them): the file is checked locally first (Together's rules,
failing on the exact line and rule), uploaded once per content hash, and a job is created at most once per key.
Together's jobs carry no metadata, so the key travels in the job's suffix instead: `<suffix>-<8 hex of the key>`;
after a crash between creating a job and storing its id, the job is found by listing jobs and matching that
marker and the training file.

Loss mask: Together trains on assistant turns by default (`train_on_inputs="auto"`) and honours a per-message
`weight` of 0 or 1 on any role, but as soon as one message in a conversation has a weight it trains on *every*
message without one (train_on_inputs becomes true). Our files weight only assistant turns (OpenAI's format), so a
file with weights is uploaded as a copy that spells out every weight: 0 on system and user turns, the file's own
(default 1) on assistant turns. The loss then covers exactly the assistant turns the file asks for.

Strategy `continue`: Together starts a job from an earlier job's checkpoint (`from_checkpoint=<job id>`), not from
a model name, so every completed job's output name is remembered with its job id (`model:<output name>`).

Preference objectives (docs.together.ai/docs/fine-tuning/preference-tuning): "dpo" is one job with
`training_method="dpo"` on the pair file (checked with Together's rules first), `dpo_beta` = beta and `rpo_alpha`
= nll_weight (the NLL term on the preferred output, Iterative RPO's). "sft-then-dpo" is two jobs under one key, as
Together advises ("Do SFT first, then continue with DPO from that checkpoint"): the SFT job is the one the
pipeline knows; what its second stage needs is recorded (`then-dpo:<key>`) before the first is started, and when a
poll finds the SFT job completed, the DPO job is started `from_checkpoint` it, under its own key (`<key>/dpo`,
`start_once`: found again, never started twice, after a crash). The key's polls then report the DPO job: its
status, its model, and the trained tokens of both stages.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from together import Together

from backends.base import (
    BASE_MODEL_ID,
    BackendState,
    DpoParams,
    FinetuneSpec,
    JobEvent,
    JobRef,
    JobState,
    JobStatus,
)
from backends.hosted.chat_files import ChatFileRules, FileCheck, validate_chat_file
from backends.hosted.clients import HostedClients
from backends.hosted.errors import error_message
from backends.hosted.jobs import HostedJobs
from backends.hosted.names import key_digest, sanitize_suffix
from backends.hosted.preference_files import PreferenceRules, validate_preference_file
from backends.hosted.records import PreparedJob, upload_once
from backends.hosted.retry import RetryPolicy
from backends.together_settings import TogetherConfig
from foundation.errors import UserError

MIN_EXAMPLES = 1  # the SDK's MIN_SAMPLES
MAX_SUFFIX_CHARS = 40  # "up to 40 character suffix" (SDK docstring of fine_tuning.create)
MARKER_CHARS = 8  # hex digits of the key's hash at the end of the suffix
NANODOLLARS_PER_DOLLAR = 1e9  # the unit of a job's `total_price`
TOGETHER_RULES = ChatFileRules(
    provider="Together",
    example_keys=("messages",),
    message_keys=("role", "content", "weight"),
    roles=("system", "user", "assistant"),
    weight_roles=("system", "user", "assistant"),
    min_examples=MIN_EXAMPLES,
    alternate=True,
)
# "input.messages may hold several turns"; "Both outputs must contain exactly one message from the assistant role"
TOGETHER_PREFERENCE_RULES = PreferenceRules(provider="Together", min_examples=MIN_EXAMPLES)
_STATUS: Mapping[str, JobStatus] = MappingProxyType({
    "pending": "queued",
    "queued": "queued",
    "running": "running",
    "compressing": "running",
    "uploading": "running",
    "cancel_requested": "running",
    "completed": "succeeded",
    "error": "failed",
    "user_error": "failed",
    "cancelled": "cancelled",
})
DEAD = frozenset({"error", "user_error", "cancelled", "cancel_requested"})  # never re-attach to these
_JOBS_SCANNED = 500
_EVENTS_KEPT = 5000  # Together lists a job's every event on each poll: remember them all (a job logs ~10-100)


def job_status(remote: str | None) -> JobStatus:
    """Our status for Together's; one we do not know is not an end, so it counts as running."""
    return _STATUS.get(str(remote or ""), "running")


def key_marker(key: str) -> str:
    return key_digest(key, MARKER_CHARS)


def job_suffix(suffix: str, key: str) -> str:
    """The job's suffix: ours, sanitized to Together's limits (letters, digits and `-`; 40 characters with the
    marker), then `-` and the key's marker, so a job can be found by its key after a crash."""
    return f"{sanitize_suffix(suffix, MAX_SUFFIX_CHARS - MARKER_CHARS - 1, underscore=False)}-{key_marker(key)}"


def carries_marker(job: Any, marker: str) -> bool:
    """Whether a listed job was created for the key with this marker (its suffix, or its output name, ends so)."""
    suffix = str(getattr(job, "suffix", None) or "")
    if suffix:
        return suffix.endswith(f"-{marker}")
    return f"-{marker}" in str(getattr(job, "x_model_output_name", None) or "")


def upload_copy(path: Path, check: FileCheck) -> bytes:
    """The bytes to upload: the file itself, or, when it weights some messages, a copy with every weight
    spelled out (0 on system and user turns), since Together then trains on every unweighted message."""
    data = path.read_bytes()
    if not check.weighted:
        return data
    lines = []
    for line in data.decode("utf-8").splitlines():
        example = json.loads(line)
        example["messages"] = [{**m, "weight": m.get("weight", 1) if m["role"] == "assistant" else 0}
                               for m in example["messages"]]
        lines.append(json.dumps(example, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _timestamp(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


def _event_id(event: Any) -> str:
    """An event's `hash` when Together sends one, else one made of what identifies it (time, type, step, text)."""
    given = getattr(event, "hash", None) or (getattr(event, "model_extra", None) or {}).get("hash")
    if isinstance(given, str) and given:
        return given
    parts = [str(getattr(event, name, "") or "") for name in ("created_at", "type", "step", "message")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


class TogetherJobs(HostedJobs[Together, TogetherConfig]):
    """Files and fine-tuning jobs through the sync client, idempotent by FinetuneSpec.key."""

    events_kept = _EVENTS_KEPT

    def __init__(
        self,
        client: Together,
        clients: HostedClients[Together, Any],  # a TogetherClients
        state: BackendState,
        settings: TogetherConfig,
        *,
        retry: RetryPolicy,
        base_model: str,
    ) -> None:
        super().__init__(client, clients, state, settings, retry=retry)
        self.base_model = base_model  # the root every job of the run starts from, directly or via checkpoints
        self._limits: dict[str, Any] = {}

    # -- Together's calls

    def _retrieve_job(self, job_id: str) -> Any:
        return self.client.fine_tuning.retrieve(job_id)

    def _retrieve_file(self, file_id: str) -> Any:
        return self.client.files.retrieve(file_id)

    def _cancel_job(self, job_id: str) -> Any:
        return self.client.fine_tuning.cancel(job_id)

    def _refused(self, exc: Exception, doing: str) -> Exception:
        """What to raise for a non-retryable error."""
        errors, scrub = self.clients.errors, self.clients.scrubber
        refused = self.clients.key_error(exc)
        if refused is not None:
            return refused
        if errors.status_code(exc) == 402:
            return UserError(f"Together refused {doing}: the account's credit is spent (402): add credit, then "
                             "`orchestrator run --resume RUN`")
        if isinstance(exc, errors.bad_request | errors.unprocessable | errors.not_found):
            return UserError(f"Together refused {doing}: {scrub.scrub(error_message(exc))}")
        return errors.failure(exc, doing, scrub)

    # -- files

    def check(self, path: Path) -> FileCheck:
        return validate_chat_file(path, TOGETHER_RULES)

    def check_pairs(self, path: Path) -> FileCheck:
        return validate_preference_file(path, TOGETHER_PREFERENCE_RULES)

    def upload(self, path: Path, check: FileCheck) -> str:
        """The id of an uploaded copy of what this file trains on: reused when the server still has it."""
        data = upload_copy(path, check)
        sha = hashlib.sha256(data).hexdigest()

        def upload() -> str:
            with tempfile.TemporaryDirectory(prefix="maft-together-") as folder:
                copy = Path(folder) / f"{path.stem}.jsonl"  # the SDK wants a .jsonl path
                copy.write_bytes(data)
                uploaded = self._call(f"the upload of {path.name}",
                                      lambda: self.client.files.upload(copy, purpose="fine-tune", check=False))
            return str(uploaded.id)

        return upload_once(self.state, sha, exists=self._file_exists, upload=upload, filename=path.name,
                           nbytes=len(data))

    # -- jobs

    def _prepare(self, spec: FinetuneSpec) -> PreparedJob:
        dpo = spec.objective == "dpo"
        if dpo and spec.preference_file is None:
            raise UserError(f"finetune {spec.key!r} is dpo without a preference file")
        path = spec.preference_file if dpo and spec.preference_file is not None else spec.training_file
        check = self.check_pairs(path) if dpo else self.check(path)
        checkpoint = None if spec.base_model == spec.root_model else self._checkpoint(spec.base_model)
        file_id = self.upload(path, check)
        # for the bill, should Together not report its token count: our estimate of what one pass trains on
        self.state.put(f"estimate:{spec.key}", {"file_tokens": check.tokens, "counter": check.counter})
        marker = key_marker(spec.key)
        params = self._params(spec, file_id, checkpoint)
        return PreparedJob(file_id=file_id, maft_key=marker, find=lambda: self._find(marker, file_id),
                           create=lambda: self._create(params, spec.key))

    def _checkpoint(self, base_model: str) -> str | None:
        """None to train the base model; else the id of the job whose output `base_model` is (strategy continue)."""
        if base_model in (BASE_MODEL_ID, self.base_model):
            return None
        known = self.state.get(f"model:{base_model}")
        if known and known.get("job_id"):
            return str(known["job_id"])

        job_id = self._first_job(lambda: self.client.fine_tuning.list().data, _JOBS_SCANNED,
                                 lambda job: job.x_model_output_name == base_model and job.status == "completed")
        if job_id is None:
            raise UserError(f"cannot continue training {base_model}: no completed finetuning job of this Together "
                            "account produced it")
        self.state.put(f"model:{base_model}", {"job_id": job_id, "root": self.base_model})
        return job_id

    def _params(self, spec: FinetuneSpec, file_id: str, checkpoint: str | None) -> dict[str, Any]:
        """The arguments of `fine_tuning.create`. A job continuing from a checkpoint names no model: the SDK
        refuses both, and the checkpoint's job already fixes the base model."""
        s = self.settings
        params: dict[str, Any] = {
            "training_file": file_id,
            "n_epochs": s.n_epochs,
            "learning_rate": s.learning_rate,
            "batch_size": s.batch_size,
            "suffix": job_suffix(spec.suffix, spec.key),
            "random_seed": spec.seed,
            "training_method": "sft",
            "train_on_inputs": "auto",  # assistant turns only; weights, when present, say the rest
            "lora": s.lora,
        }
        if spec.objective == "dpo":  # the SDK refuses train_on_inputs with DPO
            dpo = spec.dpo or DpoParams()
            del params["train_on_inputs"]
            params |= {"training_method": "dpo", "dpo_beta": dpo.beta, "rpo_alpha": dpo.nll_weight,
                       "learning_rate": dpo.learning_rate or s.learning_rate}
        if s.lora:
            params |= {"lora_r": s.lora_r, "lora_alpha": s.lora_alpha}
        if checkpoint is None:
            params["model"] = spec.root_model or self.base_model
        else:
            params["from_checkpoint"] = checkpoint
        return params

    def _model_limits(self, model: str | None = None) -> Any:
        """A base model's limits (batch sizes, LoRA ranks; the run's by default), read once: the SDK checks a job
        against them, and would otherwise look them up under the checkpoint's name for a continued job."""
        model = model or self.base_model
        if model not in self._limits:
            self._limits[model] = self._call(f"reading the finetuning limits of {model}",
                                             lambda: self.client.fine_tuning.model_limits(model_name=model))
        return self._limits[model]

    def check_model(self) -> None:
        """Before anything is spent: can Together finetune the base model (its limits answer, so the finetuning
        API is there too)? A refusal is a UserError with Together's words."""
        self._model_limits()

    def _create(self, params: dict[str, Any], key: str) -> str:
        doing = f"creating the finetuning job for {key!r}"

        def create() -> str:
            try:
                limits = self._model_limits(params.get("model"))
                return str(self.client.fine_tuning.create(**params, model_limits=limits).id)
            except ValueError as exc:  # the SDK's own checks against the model's limits: nothing was sent
                raise UserError(f"Together cannot finetune {params.get('model', self.base_model)} with these "
                                f"settings: {exc} "
                                "(change [together] in the config)") from None

        return self.retry.create_once(create, lambda: self._find(key_marker(key), str(params["training_file"])),
                                      doing, refused=lambda exc: self._refused(exc, doing))

    def _find(self, marker: str, file_id: str) -> str | None:
        """A live job for this key and this training file (created by an earlier, interrupted start)."""
        return self._first_job(lambda: self.client.fine_tuning.list().data, _JOBS_SCANNED,
                               lambda job: carries_marker(job, marker) and job.training_file == file_id
                               and job.status not in DEAD)

    # -- poll

    def _state_of(self, job: JobRef, remote: Any) -> JobState:
        job_id = job.provider_job_id
        status = job_status(remote.status)
        raw = str(remote.status) if remote.status else None
        events, train_loss, last_error = self._new_events(job_id)
        model_id = None
        trained = self._trained_tokens(remote)
        if status == "succeeded":
            model_id = remote.x_model_output_name
            if not model_id:  # named in a moment
                return JobState(status="running", provider_status=raw, events=events, train_loss=train_loss)
            self.state.put(f"model:{model_id}", {"job_id": job_id, "root": self.base_model})
            if trained is None:
                trained, note = self._estimate(job.key, remote)
                events.append(JobEvent(created_at=time.time(), level="warning", message=note))
        error = None
        if status == "failed":
            error = self.clients.scrubber.scrub(self._error(remote) or last_error or "no error given")
        billed = self._billed(remote) if status in ("succeeded", "failed", "cancelled") else None
        return JobState(status=status, provider_status=raw, model_id=model_id, trained_tokens=trained,
                        billed_usd=billed, train_loss=train_loss, error=error, events=events)

    @staticmethod
    def _error(remote: Any) -> str | None:
        """The provider's reason for a failed job, where the job itself carries one."""
        extra = getattr(remote, "model_extra", None) or {}
        for name in ("error", "error_message", "message"):
            value = extra.get(name)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, str) and value:
                return value
        return None

    @staticmethod
    def _trained_tokens(remote: Any) -> int | None:
        """The tokens Together bills the job for (its `token_count`: epochs x the tokenized file, recorded with the
        price once tokenization is done); None while it has not said."""
        extra = getattr(remote, "model_extra", None) or {}
        if isinstance(extra.get("trained_tokens"), int):
            return int(extra["trained_tokens"])
        return int(remote.token_count) if remote.token_count else None

    @staticmethod
    def _billed(remote: Any) -> float | None:
        """What Together charged for an ended job, in dollars: its `total_price`, in nanodollars (the SDK's
        `finetune_price_to_dollars` divides by 1e9), recorded with the token count. The bill takes it over our
        table's rate: it is the only source of Together's DPO price, which its price page gives apart from SFT's.
        None where the job carries none (not tokenized yet, or an older API)."""
        price = getattr(remote, "total_price", None)
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            return None
        return float(price) / NANODOLLARS_PER_DOLLAR

    def _estimate(self, key: str, remote: Any) -> tuple[int, str]:
        """Trained tokens for a job that ended without Together's count: our count of the file times the epochs,
        and an event saying that it is an estimate."""
        record = self.state.get(f"estimate:{key}") or {}
        epochs = int(remote.n_epochs or self.settings.n_epochs)
        tokens = int(record.get("file_tokens") or 0) * epochs
        return tokens, (f"Together reported no token count for this job: trained tokens estimated as {tokens} "
                        f"({record.get('counter', 'no file count')} x {epochs} epochs)")

    def _new_events(self, job_id: str) -> tuple[list[JobEvent], float | None, str | None]:
        """Events not returned before, oldest first; the newest training loss; the newest error message.
        Together lists every event of a job on each poll, so the new ones are those not seen yet."""
        listed = self._call(f"reading events of job {job_id}", lambda: self.client.fine_tuning.list_events(job_id),
                            missing_ok=True)
        events = sorted(listed.data if listed is not None else [], key=lambda e: _timestamp(e.created_at))
        last_error = next((str(e.message) for e in reversed(events) if (e.level == "error" or str(e.type) in
                           ("job_error", "job_user_error")) and e.message), None)
        fresh, loss = self._take_events(job_id, lambda seen: [(i, e) for e in events
                                                              if (i := _event_id(e)) not in seen])
        return fresh, loss, last_error

    def _event_of(self, event: Any) -> JobEvent:
        return JobEvent(created_at=_timestamp(event.created_at), level=str(event.level or "info"),
                        message=str(event.message or event.type))
