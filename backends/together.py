"""The together backend: chat and LoRA (or full) finetuning on Together AI through the official `together` SDK.

This module wires the parts together: keys and clients (`together_client`), concurrent chat (`hosted.chat`, the
same runner as OpenAI's, given Together's async client), finetuning jobs (`together_finetune`). `BASE_MODEL_ID`
stands for the base model given as `model`; a finetuned agent is the job's `output_name`, which Together serves
without a dedicated endpoint only for LoRA adapters of some base models ("serverless LoRA"). Before a round is
sent, every finetuned model in it is checked once: listed by `GET /v1/models` (free), or else its first request
goes alone before the others, so a model that needs a dedicated endpoint stops the run with what to do, never
half a round.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from together import Together

from backends.base import BASE_MODEL_ID, BackendInfo, ChatRequest, ChatResult, ResultCallback
from backends.hosted.backend import HostedBackend
from backends.hosted.errors import HostedRequestError, error_message
from backends.together_client import TOGETHER_ERRORS, TogetherClients, resolve_clients
from backends.together_finetune import MIN_EXAMPLES, TogetherJobs
from backends.together_settings import TogetherConfig
from foundation.errors import UserError

MODELS_PAGE = "https://api.together.ai/models"
# Together's words when a model has no serverless deployment ("Unable to access non-serverless model X. Please
# visit ... to create and start a new dedicated endpoint for the model.")
_NEEDS_ENDPOINT = re.compile(r"(?i)dedicated endpoint|non-serverless")


def needs_endpoint(exc: BaseException) -> bool:
    """Whether an error is Together saying that a model must first be deployed on a dedicated endpoint."""
    code = TOGETHER_ERRORS.status_code(exc)
    return code is not None and 400 <= code < 500 and bool(_NEEDS_ENDPOINT.search(error_message(exc)))


def endpoint_error(model: str, *, finetuned: bool = True) -> UserError:
    what = "finetuned model" if finetuned else "model"
    return UserError(f"{what} {model} needs a dedicated endpoint on Together before it can answer: create and start "
                     f"one ({MODELS_PAGE}/{model}), then `orchestrator run --resume RUN`")


def listed_models(payload: Any) -> set[str]:
    """The model ids in a `GET /v1/models` answer: a JSON list (Together's) or `{"data": [...]}` (OpenAI's)."""
    items = payload.get("data", []) if isinstance(payload, dict) else payload
    if not isinstance(items, list):
        return set()
    return {str(item["id"]) for item in items if isinstance(item, dict) and item.get("id")}


class TogetherBackend(HostedBackend[TogetherConfig, Together, TogetherJobs]):
    """Chat and finetuning on Together AI through the official SDK. `describe()` needs no key and makes no
    request."""

    name = "together"

    def _setup(self) -> None:
        super()._setup()
        self._servable: set[str] = set()  # finetuned models seen answering (or listed): no check needed again

    def _make_clients(self) -> TogetherClients:
        return resolve_clients(self.settings, self._environment())

    def _make_jobs(self) -> TogetherJobs:
        return TogetherJobs(self.client, self.clients, self.state, self.settings, retry=self.retry,
                            base_model=self.model)

    # -- Backend protocol -----------------------------------------------------------------------------------

    def describe(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            base_model=self.model,
            device=None,
            supports_finetuning=True,
            supports_batch=False,
            pricing_source="orchestrator/prices.toml (Together list prices)",
            max_concurrent_jobs=self.settings.max_concurrent_jobs,
            billed=True,
            price_family="together",  # Together prices models it does not list by their size
            training_epochs=self.settings.n_epochs,
            min_training_examples=MIN_EXAMPLES,
            full_finetune=not self.settings.lora,
            # training_method="dpo" (rpo_alpha its NLL term), and an SFT job then a DPO job from its checkpoint
            objectives=("sft", "dpo", "sft-then-dpo"),
            weighted_pairs=False,
            other_models=True,  # a job names its model (`root_model`): a student may be another one
        )

    def chat(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        """Answer every request. A finetuned model not yet known to answer is checked first: listed by the
        server (free), or its first request is sent alone, before every other request of the round."""
        if not requests:
            return []
        done: dict[str, ChatResult] = {}

        def keep(result: ChatResult) -> None:
            done[result.key] = result
            if on_result is not None:
                on_result(result)

        probes = self._probes(requests)
        if probes:
            self._log(f"checking that {len(probes)} finetuned model(s) answer without a dedicated endpoint")
            super().chat(probes, keep)  # a model that needs an endpoint raises here, before the round is sent
            self._servable.update(self.resolve_model(p.model) for p in probes)
        super().chat([r for r in requests if r.key not in done], keep)
        return [done[r.key] for r in requests]

    def _probes(self, requests: Sequence[ChatRequest]) -> list[ChatRequest]:
        """The first request of every finetuned model that is neither known to answer nor listed as servable."""
        first: dict[str, ChatRequest] = {}
        for request in requests:
            model = self.resolve_model(request.model)
            if request.model != BASE_MODEL_ID and model != self.model and model not in self._servable:
                first.setdefault(model, request)
        if not first:
            return []
        self._servable.update(self._listed() & set(first))
        return [r for m, r in first.items() if m not in self._servable]

    def _listed(self) -> set[str]:
        """The models `GET /v1/models` lists as servable (free). Empty when the server has no such list, so that
        every unlisted model is then checked by its first request instead."""
        errors = self.clients.errors
        try:
            payload = self.retry.call(lambda: self.client.get("/v1/models", cast_to=object), "listing models")
        except errors.status as exc:
            refused = self.clients.key_error(exc)
            if refused is not None:
                raise refused from None
            return set()
        except HostedRequestError:
            return set()
        return listed_models(payload)

    def _refusal(self, request: ChatRequest, model: str, exc: Exception) -> Exception | None:
        """A 4xx saying that a model needs a dedicated endpoint becomes the UserError that says how to get one."""
        if needs_endpoint(exc):
            return endpoint_error(model, finetuned=model != self.model)
        return None

    def check_server(self, *, finetuning: bool) -> None:
        """Before anything is spent (ChecksServer): when the command will train, Together can finetune the base
        model. (Whether a model answers without a dedicated endpoint is found by its first request.)"""
        if finetuning:
            self.jobs.check_model()
