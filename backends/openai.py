"""The openai backend: OpenAI, Azure OpenAI, or any OpenAI-compatible server (vLLM, llama.cpp, Ollama) for chat.

This module only wires the parts together; each lives in its own module:
`openai_client` (keys and clients), `openai_batch` (chat through the Batch API), `openai_finetune` (file rules,
uploads, jobs); what every hosted provider shares lives in `backends.hosted` (.env and secrets, retries,
idempotent uploads and jobs, concurrent chat, training file checks, the rate limiter, and `HostedBackend`,
which owns the glue: this module supplies only what is OpenAI's own).
`BASE_MODEL_ID` stands for the provider's base model given as `model`; every other model id (an `ft:` id, an
Azure deployment name) goes to the server as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from openai import OpenAI
from openai.types import CreateEmbeddingResponse

from backends.base import (
    BackendInfo,
    ChatRequest,
    ChatResult,
    EmbeddingResult,
    ResultCallback,
)
from backends.hosted.backend import HostedBackend
from backends.hosted.errors import error_message
from backends.openai_batch import OpenAIBatches
from backends.openai_client import OPENAI_ERRORS, OpenAIClients, is_billed, resolve_clients
from backends.openai_finetune import DEFAULT_MAX_EXAMPLE_TOKENS, MIN_EXAMPLES, SELF_SERVE_NOTICE, OpenAIJobs
from backends.openai_settings import OpenAIConfig
from foundation.errors import UserError

AUTO_EPOCHS_ESTIMATE = 3  # OpenAI's usual choice for "auto" (more for files under ~35 examples)
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-small"
EMBEDDING_CHUNK = 512  # inputs per request, well under the API's limit


class OpenAIBackend(HostedBackend[OpenAIConfig, OpenAI, OpenAIJobs]):
    """Chat, batch chat and finetuning through the official SDK. `describe()` needs no key and makes no request."""

    name = "openai"

    batch_poll_initial = 5.0  # seconds before a batch's first poll (tests set less)
    max_example_tokens = DEFAULT_MAX_EXAMPLE_TOKENS

    def _setup(self) -> None:
        super()._setup()
        self._batches: OpenAIBatches | None = None

    def _make_clients(self) -> OpenAIClients:
        return resolve_clients(self.settings, self._environment())

    def _make_jobs(self) -> OpenAIJobs:
        return OpenAIJobs(self.client, self.clients, self.state, self.settings, retry=self.retry,
                          resolve_model=self.resolve_model, max_example_tokens=self.max_example_tokens)

    @property
    def batches(self) -> OpenAIBatches:
        with self._lock:
            if self._batches is None:
                self._batches = OpenAIBatches(self.client, self.clients, self.state, self.settings, retry=self.retry,
                                              resolve_model=self.resolve_model, sleep=self.sleep,
                                              poll_initial=self.batch_poll_initial, log=self._log)
            return self._batches

    # -- Backend protocol -----------------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        """Finetuning and batch are reported available: whether a self-hosted server has them is only known
        when asked, and the first call says clearly when it has not."""
        # OpenAI and Azure bill; another server bills when the price table knows its model (None: a proxy does,
        # vLLM serving an unlisted model does not); `[openai] billed` forces either
        billed = is_billed(self.settings, self._environment())
        epochs = self.settings.n_epochs
        return BackendInfo(
            name=self.name if self.settings.api == "openai" else "azure-openai",
            base_model=self.model,
            device=None,
            supports_finetuning=True,
            supports_batch=True,
            pricing_source=None if billed is False else "orchestrator/prices.toml (OpenAI list prices)",
            max_concurrent_jobs=self.settings.max_concurrent_jobs,
            billed=billed,
            price_family="openai",  # OpenAI's list prices, also for Azure and for a proxy in front of either
            training_epochs=epochs if isinstance(epochs, int) else AUTO_EPOCHS_ESTIMATE,
            min_training_examples=MIN_EXAMPLES,
            embedding_model=DEFAULT_EMBEDDING_MODEL,
            # method "dpo" on one-turn prompts only, and no NLL term: DPO only after an SFT job ("sft-then-dpo")
            objectives=("sft", "sft-then-dpo"),
            weighted_pairs=False,
            one_turn_pairs=True,
            other_models=True,  # a job names its model: a student may be another one of the account's
            finetuning_notice=None if self.settings.api == "azure" else SELF_SERVE_NOTICE,
        )

    def check_server(self, *, finetuning: bool) -> None:
        """Before anything is spent (ChecksServer): the model is served, and, when the command will train, the
        server has a finetuning API (and a Batch API under `batch = true`)."""
        self._check_model()
        if finetuning:
            self.jobs.check_available()
        if self.settings.batch:
            self.batches.check_available()

    def _check_model(self) -> None:
        """`models.retrieve(model)`; a 404 is confirmed by the model list (vLLM and llama.cpp list models but do
        not serve `/models/{id}`), and a server with no list at all is let through: its first chat will tell.
        Azure is skipped: its models are deployments, which `/models` does not list."""
        if self.settings.api == "azure":
            return
        errors = OPENAI_ERRORS
        try:
            self.retry.call(lambda: self.client.models.retrieve(self.model), f"looking up model {self.model}")
            return
        except errors.not_found as exc:
            missing = exc
        except errors.status as exc:
            if (refused := self.clients.key_error(exc)) is not None:
                raise refused from None
            return
        try:
            listed = self.retry.call(lambda: [m.id for m in self.client.models.list()], "listing models")
        except errors.status as exc:
            if (refused := self.clients.key_error(exc)) is not None:
                raise refused from None
            return
        if self.model not in listed:
            detail = self.clients.scrubber.scrub(error_message(missing))
            raise UserError(f"model {self.model} is not available on this server: {detail} (server "
                            f"{self.clients.where}; check the model name or --base-url)")

    def chat(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        if requests and self.settings.batch:
            return self.batches.run(requests, on_result)
        return super().chat(requests, on_result)

    def embed(self, texts: Sequence[str], model: str | None = None) -> EmbeddingResult:
        """The provider's embedding endpoint (`[diversity] embeddings = "provider"`), in chunks it accepts; the
        prompt tokens are the provider's `usage` of every chunk, summed (a server that reports none counts 0)."""
        name = model or DEFAULT_EMBEDDING_MODEL
        vectors: list[list[float]] = []
        prompt_tokens = 0
        for start in range(0, len(texts), EMBEDDING_CHUNK):
            chunk = list(texts[start:start + EMBEDDING_CHUNK])

            def ask(chunk: list[str] = chunk) -> CreateEmbeddingResponse:
                return self.client.embeddings.create(model=name, input=chunk)

            reply = self.retry.call(ask, f"embedding {len(chunk)} texts with {name}")
            vectors += [list(item.embedding) for item in sorted(reply.data, key=lambda d: d.index)]
            prompt_tokens += getattr(reply.usage, "prompt_tokens", None) or 0
        return EmbeddingResult(vectors=vectors, prompt_tokens=prompt_tokens, model=name)

    def close(self) -> None:
        with self._lock:
            super().close()
            self._batches = None
