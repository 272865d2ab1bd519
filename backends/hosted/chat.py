"""Many chat completions at once through an OpenAI-compatible async SDK client, each under the rate limiter, each
retried alone. Used by every hosted backend: OpenAI's `AsyncOpenAI` and Together's `AsyncTogether` take the same
`chat.completions.create(model=, messages=, max_tokens=, temperature=, top_p=, seed=)` and answer the same shape.

A debate round is a few thousand independent requests: they all start at once as asyncio tasks and the limiter
decides how many are in flight. The backend's `RetryPolicy` is the only retry layer (clients are built with
`max_retries=0`): 429, 5xx, timeouts and dropped connections are retried, a request that used up its quick
retries waits longer (without a slot) while the others go on, and only a provider silent for `give_up_after`
seconds ends the round; a 429 also pauses the limiter, since the other requests would hit the same wall. Other
4xx are not retried: a bad key or an unknown model fails the whole call at once with a UserError that says
what to fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field
from tenacity import RetryCallState

from backends.base import ChatRequest, ChatResult, ResultCallback, Usage
from backends.hosted.env import Scrubber
from backends.hosted.errors import SdkErrors, error_message
from backends.hosted.rate_limit import RateLimiter, estimate_request_tokens
from backends.hosted.retry import RetryPolicy
from foundation.errors import UserError


class BodyMessage(BaseModel):
    role: str
    content: str


class ChatBody(BaseModel):
    """The JSON body of `POST /v1/chat/completions`; also the `body` of a Batch API line.

    `max_tokens` rather than `max_completion_tokens`: the finetunable models take it, and so does every
    OpenAI-compatible server (Together, vLLM, llama.cpp, Ollama). Our `weight` field is for training files only.
    """

    model: str
    messages: list[BodyMessage]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None

    def params(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def chat_body(request: ChatRequest, model: str) -> ChatBody:
    return ChatBody(
        model=model,
        messages=[BodyMessage(role=m.role, content=m.content) for m in request.messages],
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
    )


class _PromptDetails(BaseModel):
    cached_tokens: int | None = None


class _CompletionUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None
    cached_tokens: int | None = None  # some providers report it at the top level of `usage`


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Message = Field(default_factory=_Message)
    finish_reason: str | None = None


class CompletionPayload(BaseModel):
    """The parts of a chat completion we keep, read the same way from the SDK's object and a batch output line."""

    model_config = ConfigDict(extra="ignore")

    choices: list[_Choice] = Field(default_factory=list)
    usage: _CompletionUsage | None = None

    def to_result(self, key: str, billing: str = "standard") -> ChatResult:
        choice = self.choices[0] if self.choices else _Choice()
        usage = self.usage or _CompletionUsage()
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else usage.cached_tokens
        return ChatResult.model_validate({
            "key": key,
            "text": choice.message.content or "",
            "finish_reason": choice.finish_reason or "stop",
            "usage": Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                           cached_tokens=cached or 0),
            "billing": billing,
        })


class ChatClients(Protocol):
    """What the runner needs of a provider's client maker (`HostedClients` has it): a fresh async client per
    event loop, the SDK's errors, the server and the scrubber for messages, and what a refused key means."""

    @property
    def errors(self) -> SdkErrors: ...

    @property
    def scrubber(self) -> Scrubber: ...

    @property
    def where(self) -> str: ...

    def key_error(self, exc: BaseException) -> UserError | None: ...

    def async_(self) -> Any: ...


# Turns a request that failed for good into the error to raise, or None for the runner's default.
Refusal = Callable[[ChatRequest, str, Exception], Exception | None]


class ChatRunner:
    """Answers a list of ChatRequests concurrently; results in input order, `on_result` as each one finishes."""

    def __init__(
        self,
        clients: ChatClients,
        limiter: RateLimiter,
        *,
        retry: RetryPolicy,
        resolve_model: Callable[[str], str],
        refusal: Refusal | None = None,
    ) -> None:
        """`refusal` lets a provider name its own failures (e.g. a model that needs a dedicated endpoint)."""
        self.clients = clients
        self.limiter = limiter
        self.retry = retry
        self.resolve_model = resolve_model
        self.refusal = refusal

    def run(self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None) -> list[ChatResult]:
        """Runs its own event loop, so `on_result` is called in the caller's thread."""
        if not requests:
            return []
        return asyncio.run(self.run_async(requests, on_result))

    async def run_async(
        self, requests: Sequence[ChatRequest], on_result: ResultCallback | None = None
    ) -> list[ChatResult]:
        client = self.clients.async_()
        results: list[ChatResult | None] = [None] * len(requests)
        tasks = {asyncio.create_task(self._one(client, r, on_result)): i for i, r in enumerate(requests)}
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = sorted((t for t in done if t.exception() is not None), key=tasks.__getitem__)
                for task in done:
                    if task.exception() is None:  # each task delivered its own answer; a neighbour's failure
                        results[tasks[task]] = task.result()  # loses none of them
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await client.close()
        return [r for r in results if r is not None]

    async def _one(self, client: Any, request: ChatRequest, on_result: ResultCallback | None) -> ChatResult:
        """One request with retries; its answer is handed to `on_result` (which stores it) *before* its slot is
        freed. So at most `concurrency` answers are ever paid for but not yet stored, and a process killed at
        any instant (kill -9, a power cut) loses at most that many: released first, the slot would let new
        requests start while finished answers still wait in memory for their turn to be stored."""
        body = chat_body(request, self.resolve_model(request.model))
        cost = estimate_request_tokens((m.content for m in body.messages), body.max_tokens)

        async def attempt() -> ChatResult:
            async with self.limiter.slot(cost):
                completion = await client.chat.completions.create(**body.params())
                # Answered: nothing below is retried (errors from here on are not the SDK's).
                result = CompletionPayload.model_validate(completion.model_dump()).to_result(request.key)
                self.limiter.settle(cost, result.usage.prompt_tokens + result.usage.completion_tokens)
                if on_result is not None:
                    on_result(result)
                return result

        try:
            return await self.retry.call_async(attempt, f"chat request {request.key!r}",
                                               before_sleep=self._before_sleep)
        except self.clients.errors.base as exc:  # not transient (a ProviderUnavailable is not the SDK's)
            raise self._failure(request, body.model, exc) from None

    def _before_sleep(self, state: RetryCallState) -> None:
        """A 429 means every request is about to hit the same limit: hold them all for the wait."""
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, self.clients.errors.rate_limit) and state.next_action is not None:
            self.limiter.pause(state.next_action.sleep)

    def _failure(self, request: ChatRequest, model: str, exc: Exception) -> Exception:
        """The error to raise for a request that will not succeed: a UserError when the user can fix it."""
        c = self.clients
        detail = c.scrubber.scrub(error_message(exc))
        refused = c.key_error(exc)
        if refused is not None:
            return refused
        if self.refusal is not None and (own := self.refusal(request, model, exc)) is not None:
            return own
        if isinstance(exc, c.errors.not_found):
            return UserError(f"model {model} is not available on this server: {detail} "
                             f"(server {c.where}; check the model name or --base-url)")
        return c.errors.failure(exc, f"chat request {request.key!r}", c.scrubber)
