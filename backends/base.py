"""The one seam between the orchestrator and a provider.

The pipeline, debate, data and evaluation code only ever talk to a `Backend`. Everything a provider needs to
know (how to batch, how to retry, where adapters live, what a model id looks like) stays behind it, so a new
provider is a new module here and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from foundation.added_later import OmitsAddedDefaults, added_later

Role = Literal["system", "user", "assistant"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# The model id a backend uses for "the untouched base model". Finetuned agents get the id the provider returns
# (an adapter directory for local, `ft:...` for OpenAI).
BASE_MODEL_ID = "base"


class ChatMessage(BaseModel):
    """One chat turn; `weight` follows OpenAI's finetuning format (0 = do not learn this assistant turn)."""

    model_config = ConfigDict(frozen=True)

    role: Role
    content: str
    weight: int | None = None


class ChatRequest(BaseModel):
    """One independent conversation to continue. `key` is ours: unique per request, stable across resumes."""

    model_config = ConfigDict(frozen=True)

    key: str
    model: str = BASE_MODEL_ID
    messages: tuple[ChatMessage, ...]
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class ChatResult(BaseModel):
    key: str
    text: str
    finish_reason: str = "stop"
    usage: Usage = Field(default_factory=Usage)
    billing: Literal["standard", "batch"] = "standard"  # batch results are priced at the batch rate


Objective = Literal["sft", "dpo", "sft-then-dpo"]


class TrainingParams(OmitsAddedDefaults):
    """Hyper-parameters of one finetune. Hosted backends map what they support and ignore LoRA-only fields.

    `objective` picks what the models learn from a debate: "sft" its agreeing answers (the paper's MAFT), "dpo"
    per-agent preference pairs by DPO + NLL (`beta`, `nll_weight`: see `DpoParams`), "sft-then-dpo" both in turn.
    Added after runs were stored, so they are left out of a dump (and a run's identity) at their defaults."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1, le=100)
    batch_size: int = Field(8, ge=1, le=1024)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lora_rank: int = Field(8, ge=1, le=1024)
    lora_alpha: int = Field(16, ge=1, le=4096)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    max_length: int = Field(512, ge=16, le=131072)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    objective: Objective = added_later("sft")
    beta: float = added_later(0.1, gt=0, le=100)
    nll_weight: float = added_later(1.0, ge=0, le=100)

    def dpo(self) -> DpoParams:
        return DpoParams(beta=self.beta, nll_weight=self.nll_weight)


class DpoParams(BaseModel):
    """The preference stage's own settings; epochs and batch size are the run's [training] ones.

    `nll_weight` is the length-normalised NLL on the chosen answer of Iterative RPO (Pang et al., arXiv
    2404.19733, where plain DPO without it fell below SFT on GSM8K); `learning_rate` None takes the run's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    beta: float = Field(0.1, gt=0, le=100)
    nll_weight: float = Field(1.0, ge=0, le=100)
    learning_rate: float | None = Field(None, gt=0, le=1.0)


class FinetuneSpec(BaseModel):
    """What to train. `key` makes the job idempotent: starting the same key twice must not train twice."""

    key: str
    base_model: str  # the model id to start from: BASE_MODEL_ID or an earlier finetuned id (strategy `continue`)
    training_file: Path
    suffix: str
    params: TrainingParams = Field(default_factory=TrainingParams)
    seed: int = 0
    # what this job learns: "dpo" reads only `preference_file`, "sft-then-dpo" both files in one local job
    objective: Objective = "sft"
    preference_file: Path | None = None
    dpo: DpoParams | None = None
    # the base model under `base_model` when it is not the run's (a student distilled into another, smaller model:
    # `orchestrator distill --model`); None: the run's base model. Only where `BackendInfo.other_models`
    root_model: str | None = None
    # the key of the attempt this one retries (a job that failed or was cancelled), so that a backend training in
    # stages can start from the stages of it that succeeded instead of paying for them again (a hosted
    # sft-then-dpo job whose DPO stage failed keeps its SFT stage); None: the job's first attempt
    retry_of: str | None = None


class JobEvent(BaseModel):
    created_at: float
    level: str = "info"
    message: str


class JobRef(BaseModel):
    key: str
    provider_job_id: str


class JobState(BaseModel):
    status: JobStatus
    provider_status: str | None = None  # the provider's own word for it (validating_files, paused, compressing, ...)
    missing: bool = False  # the provider no longer knows the job (404); status is then "failed"
    model_id: str | None = None  # set only when status == "succeeded"
    trained_tokens: int | None = None
    # of `trained_tokens`, those a DPO stage trained (priced apart where the provider does); None: the backend does
    # not count them apart, and the bill splits the count as the job's files would
    dpo_tokens: int | None = None
    # what the provider says it charged for the job, in dollars (Together's `total_price`, every stage's), which the
    # bill takes over our price table's rate; None: priced from the table
    billed_usd: float | None = None
    train_loss: float | None = None
    error: str | None = None
    events: list[JobEvent] = Field(default_factory=list)


class BackendInfo(BaseModel):
    name: str
    base_model: str  # the provider's name of the base model (what BASE_MODEL_ID stands for)
    device: str | None = None
    supports_finetuning: bool = True
    supports_batch: bool = False
    pricing_source: str | None = None
    max_concurrent_jobs: int | None = None  # the provider's limit on running finetunes; None = no limit
    # True when calls cost money per token (hosted); the price table then applies. None: an unknown server
    # (an OpenAI-compatible URL), billed exactly when the price table has a price for the model
    billed: bool | None = False
    # whose prices apply: the price table's entries for this provider (or for none), and its size tiers for a
    # model not listed by name; None: any entry, no tiers
    price_family: str | None = None
    training_epochs: int = 1  # passes a finetune makes over its file, for cost estimates before the bill
    min_training_examples: int = 1  # the provider refuses smaller files (OpenAI: 10)
    full_finetune: bool = False  # full finetuning rather than LoRA, where the provider prices them apart
    embedding_model: str | None = None  # the model `embed` uses when given none (SupportsEmbeddings); None: no endpoint
    # What a finetune can learn (`TrainingParams.objective`): every backend trains "sft"; the preference objectives
    # only where the provider has a preference method. `weighted_pairs`: the pairs' vote-margin weights scale the
    # loss in our trainer's format (a hosted provider sets False: the pairs under `[preference] min_margin` are
    # dropped and the providers' format is written); `one_turn_pairs`: the provider takes only prompts with one user
    # turn (OpenAI's DPO), so the critics' pairs are dropped
    objectives: tuple[Objective, ...] = ("sft",)
    weighted_pairs: bool = True
    one_turn_pairs: bool = False
    # trains and serves base models other than the run's (`FinetuneSpec.root_model`): the local backend loads each
    # one it is given beside the run's; a hosted provider finetunes whichever of its models it is named
    other_models: bool = False
    # a line a command that will finetune here must show first (OpenAI: its self-serve finetuning is closing)
    finetuning_notice: str | None = None


@runtime_checkable
class BackendState(Protocol):
    """Durable memory a backend keeps in the run's store, so it can stay idempotent across crashes.

    A hosted backend writes what it is about to pay for (an uploaded file's id by content hash, the batch a
    request went into) before and after each remote call, and reads it back when a resumed run asks again.
    Implementations must be safe to call from several threads at once (jobs are polled concurrently).
    """

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: dict[str, Any]) -> None: ...


class MemoryState:
    """A BackendState that lives only as long as the process (for tests and one-off use)."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self._data.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._data[key] = dict(value)


ResultCallback = Callable[[ChatResult], None]


@runtime_checkable
class Backend(Protocol):
    """What every provider implements. Calls are synchronous; a backend may be concurrent inside."""

    name: str

    def describe(self) -> BackendInfo: ...

    def chat(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        """Answer every request, in the order given. `on_result` is called as each one finishes, so the caller
        can store it at once and a crash loses at most what was in flight."""
        ...

    def start_finetune(self, spec: FinetuneSpec) -> JobRef: ...

    def poll(self, job: JobRef) -> JobState: ...

    def cancel(self, job: JobRef) -> None: ...

    def close(self) -> None: ...


# -- optional capabilities ------------------------------------------------------------------------------------------
# Not every provider can do these, so they are separate protocols: callers check `isinstance(backend, ...)` and
# say plainly what is missing, instead of every backend growing methods that raise "not supported".


@runtime_checkable
class NeedsCredentials(Protocol):
    """A backend that needs an API key. `check_credentials` finds it (environment or `.env`) without asking the
    provider anything, and raises a one-line UserError naming where to set it, so that a run can refuse before
    it is recorded, not fail once it has started."""

    def check_credentials(self) -> None: ...


@runtime_checkable
class ChecksServer(Protocol):
    """A backend whose server may lack what a command needs: an OpenAI-compatible `--base-url` server without
    finetuning endpoints, a model it does not serve. `check_server` finds out with a cheap call or two (listing
    jobs, looking the model up) before anything is spent, and raises a one-line UserError naming what is missing
    and what to do; `finetuning=False` (an evaluation) asks only about the model."""

    def check_server(self, *, finetuning: bool) -> None: ...


@runtime_checkable
class ChecksSociety(Protocol):
    """A backend with a fixed number of model slots (a vLLM server's `max_loras`): `check_society` says, before
    the run is recorded, whether a society of N agents (2N finetuned models) fits, as a one-line UserError naming
    the setting to change; going past the slots would evict models silently."""

    def check_society(self, agents: int) -> None: ...


@runtime_checkable
class ReportsRetries(Protocol):
    """A backend that retries remote calls: what the progress bar shows of it ("retrying 3 · 429s 41"; "" while
    nothing has gone wrong), so a user can see a fault storm happening."""

    def retry_pressure(self) -> str: ...


class ScoreRequest(BaseModel):
    """How surprising `continuation` is as the assistant's reply to `messages` under `model`.

    The diversity metric "NLL of other agents' answers under a held-out critic" needs exactly this: a fixed
    answer scored as a reply to a fixed conversation, with the prompt itself not scored. `key` is ours, for
    logs and error messages.
    """

    model_config = ConfigDict(frozen=True)

    key: str
    model: str = BASE_MODEL_ID
    messages: tuple[ChatMessage, ...]
    continuation: str


@runtime_checkable
class AveragesAdapters(Protocol):
    """A backend whose finetuned models are LoRA adapters on disk, which it can average into one adapter whose
    delta is the mean of theirs (the society soup, `orchestrator distill`'s zero-training baseline)."""

    def average_adapters(self, adapters: Sequence[str], out: Path) -> str:
        """The averaged adapter's model id, written to `out` once (read back after)."""
        ...


@runtime_checkable
class SupportsScoring(Protocol):
    """A backend that can score a given reply token by token (a local model; few hosted APIs can)."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]:
        """Mean negative log-likelihood per token (nats) of each request's `continuation` as the assistant's
        reply, end-of-turn token included, in the order given."""
        ...


class EmbeddingResult(BaseModel):
    """What one `embed` call gives back: a vector per text, in the order given, and what the provider billed
    for them, summed over every request it took (the orchestrator turns that into a ledger line)."""

    vectors: list[list[float]]
    prompt_tokens: int = Field(0, ge=0)  # the provider's own count; 0 where it reports none
    model: str  # the embedding model that was asked (the backend's default when none was given)


@runtime_checkable
class SupportsEmbeddings(Protocol):
    """A backend with an embedding endpoint; `model` picks one of the provider's embedding models (None: its
    default, `BackendInfo.embedding_model`)."""

    def embed(self, texts: Sequence[str], model: str | None = None) -> EmbeddingResult: ...
