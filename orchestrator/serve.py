"""`orchestrator serve`: a run's societies behind an OpenAI-compatible HTTP API, so an existing application (any
OpenAI client) can point its `base_url` at the finetuned society and use it as one model.

Two threads with one job each. The HTTP side (a Starlette app under uvicorn, in a thread of its own) only parses,
checks and answers: every bad request gets OpenAI's error shape and status, and nothing it does blocks. The
debates run in the thread that opened the run (the command's main thread), because the store's SQLite connection
and the backend belong to it: `Debates.serve_forever` takes the queued questions, waits a short window for more
(and whatever arrived while the last debate ran is already waiting), and debates them together in one call per
society, so the backend sees one round of all of them at once (the local engine batches across them, a hosted
backend sends them concurrently).

A batch is an ordinary `DebateRunner` debate named `serve-K/DIGEST` (K the society's iteration, DIGEST of its
questions and the rounds), each question a problem whose id is a digest of its text: every reply is stored as it
arrives and paid for in the cost ledger under stage "serve", and a question asked again (in any later batch, or
by `ask`) is answered from the store, word for word the same request, for free.

The debate is put the last user message; earlier turns, system messages and sampling fields (temperature,
max_tokens, ...) are ignored: the society debates with the run's own settings, as it was trained and evaluated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from foundation.errors import RunStopped, UserError
from orchestrator.interrupts import StopRequested
from orchestrator.names import DebateName
from orchestrator.pipeline import Pipeline
from orchestrator.store import ResponseRow, Store
from orchestrator.tasks import Problem
from orchestrator.use import MAX_QUESTION_CHARS, Chosen, chosen_from_store, input_digest, tally, trained_iterations

BATCH_WINDOW = 0.05  # seconds a first question waits for others to share its debate: short beside a debate's rounds
POLL = 0.2  # seconds between looks at Ctrl-C and the HTTP thread while no question waits


# the API's bodies ------------------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class InMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatCompletionRequest(BaseModel):
    """What we read of a chat completion request; the rest (temperature, max_tokens, ...) is accepted, unused."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[InMessage]
    stream: bool | None = False


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "maft-orchestrator"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class OutMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: OutMessage
    finish_reason: str
    logprobs: None = None


class Debated(BaseModel):
    """The `maft` field of a completion: how the society decided, and where the debate is stored."""

    answer: str | None  # the majority's final answer (None: no agent gave a readable one)
    votes: dict[str, int]  # each readable final answer (as the vote spells it) -> how many agents gave it
    agreement: float  # the winning share of all agents: a confidence that costs nothing extra
    agent: int  # whose chain is the message, counted from 1
    society: str  # RUN@base, RUN@1, ...
    debate: str  # the stored debate (`orchestrator cost`, the responses table)
    problem: str  # the question's problem id in that debate
    generations: int  # replies the debate holds for this question (summaries included)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    maft: Debated


class ApiError(Exception):
    """A request answered with OpenAI's error body and an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status)


def stopping() -> ApiError:
    """What a client waiting when the server stops is answered."""
    return ApiError(503, "the server is stopping", "server_error", code="server_stopping")


# the societies ---------------------------------------------------------------------------------------------------


def served_societies(store: Store, pipeline: Pipeline) -> dict[str, Chosen]:
    """Model name -> society: RUN (the last trained iteration, as `ask` chooses by default), RUN@base, RUN@1, ..."""
    run_id, config = pipeline.run_row.id, pipeline.config
    chosen = [chosen_from_store(store, config, run_id, "base")]
    chosen += [chosen_from_store(store, config, run_id, str(i)) for i in trained_iterations(store, run_id)]
    return {run_id: chosen[-1], **{c.name: c for c in chosen}}


def question_id(question: str) -> str:
    """A question's problem id: the same question is the same problem, so its stored replies are found again."""
    return hashlib.sha256(question.encode()).hexdigest()[:16]


def last_user_message(messages: Sequence[InMessage]) -> str | None:
    for message in reversed(messages):
        if message.role == "user":
            text = message.text()
            return text if text.strip() else None
    return None


# the debates -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    model: str
    question: str
    future: Future[ChatCompletion]


class Debates:
    """The queue between the HTTP thread (which submits) and the thread that owns the run (which debates)."""

    def __init__(self, societies: Mapping[str, Chosen], rounds: int, window: float = BATCH_WINDOW) -> None:
        self.societies = dict(societies)
        self.rounds = rounds
        self.window = window
        self._jobs: queue.Queue[_Job] = queue.Queue()

    def submit(self, model: str, question: str) -> Future[ChatCompletion]:
        """Thread-safe: queue one question for `model`'s society; the future holds its completion."""
        future: Future[ChatCompletion] = Future()
        self._jobs.put(_Job(model=model, question=question, future=future))
        return future

    def serve_forever(self, pipeline: Pipeline, alive: Callable[[], bool]) -> None:
        """Debate the queued questions in batches until `alive()` is false or the pipeline's checkpoint raises
        (Ctrl-C); then fail what still waits, so no client hangs."""
        try:
            while alive():
                try:
                    first = self._jobs.get(timeout=POLL)
                except queue.Empty:
                    pipeline.checkpoint()
                    continue
                batch = [first]
                deadline = time.monotonic() + self.window
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        batch.append(self._jobs.get(timeout=left))
                    except queue.Empty:
                        break
                self._debate(pipeline, batch)
                pipeline.checkpoint()
        finally:
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not job.future.done():
                job.future.set_exception(stopping())

    def _debate(self, pipeline: Pipeline, batch: list[_Job]) -> None:
        """One debate per society in the batch, all its questions at once."""
        by_model: dict[str, list[_Job]] = {}
        for job in batch:
            by_model.setdefault(self.societies[job.model].name, []).append(job)
        try:
            for jobs in by_model.values():
                self._answer(pipeline, jobs)
        except BaseException:  # Ctrl-C (at a safe point, or a second one at once): answer every client, then stop
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(stopping())
            raise

    def _answer(self, pipeline: Pipeline, jobs: list[_Job]) -> None:
        """Debate one society's questions and settle their futures; a failure fails this batch, not the server."""
        done: Sequence[ChatCompletion | ApiError]
        try:
            done = self._debate_society(pipeline, self.societies[jobs[0].model], jobs)
        except StopRequested:
            raise
        except RunStopped as exc:  # over --max-cost: this batch is refused, the server keeps serving
            done = [ApiError(429, f"refused: {exc}", "insufficient_quota", code="insufficient_quota") for _ in jobs]
        except UserError as exc:
            done = [ApiError(400, str(exc)) for _ in jobs]
        except Exception as exc:
            print(f"serve: a debate failed: {exc!r}", file=sys.stderr, flush=True)
            done = [ApiError(500, f"the debate failed: {exc}", "server_error") for _ in jobs]
        for job, result in zip(jobs, done, strict=True):
            if isinstance(result, ApiError):
                job.future.set_exception(result)
            else:
                job.future.set_result(result.model_copy(update={"model": job.model}))

    def _debate_society(self, pipeline: Pipeline, chosen: Chosen, jobs: list[_Job]) -> list[ChatCompletion]:
        ids = [question_id(j.question) for j in jobs]
        problems = list({i: Problem(id=i, question=j.question, answer="") for i, j in zip(ids, jobs, strict=True)}
                        .values())
        digest = input_digest("serve", "\n".join(sorted(p.id for p in problems)).encode(), self.rounds)
        name = str(DebateName(stage="serve", iteration=chosen.iteration, input=digest))
        outcomes = pipeline.debate(name, problems, chosen.society, chosen.iteration,
                                   pipeline.settings(rounds=self.rounds))
        rows = list(pipeline.store.get_responses(pipeline.run_row.id, name).values())
        equivalent = pipeline.task.equivalent
        by_id: dict[str, ChatCompletion] = {}
        for outcome in outcomes:
            mine = [r for r in rows if r.problem_id == outcome.problem.id]
            by_id[outcome.problem.id] = completion(outcome, mine, chosen, name, self.rounds, equivalent)
        return [by_id[i] for i in ids]


def completion(outcome: Any, rows: Sequence[ResponseRow], chosen: Chosen, debate: str, rounds: int,
               equivalent: Callable[[str, str], bool]) -> ChatCompletion:
    """The answer to one question: the chain of the first agent whose final answer is the majority's (the first
    agent's if none is readable), and usage summing every reply of its debate, summaries included."""
    final = outcome.vote.final
    finals = [a.answers[-1] for a in outcome.agents]
    agent = next((n for n, a in enumerate(finals) if final is not None and a is not None and equivalent(a, final)), 0)
    transcript = outcome.agents[agent]
    last = next((r for r in rows if r.round == rounds and r.agent == agent and r.kind == "answer"), None)
    prompt = sum(r.prompt_tokens for r in rows)
    generated = sum(r.completion_tokens for r in rows)
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=chosen.name,
        choices=[Choice(message=OutMessage(content=transcript.messages[-1].content),
                        finish_reason=(last.finish_reason if last is not None and last.finish_reason else "stop"))],
        usage=Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated),
        maft=Debated(answer=final, votes=tally(finals, equivalent), agreement=round(outcome.vote.consensus, 6),
                     agent=agent + 1, society=chosen.name, debate=debate, problem=outcome.problem.id,
                     generations=len(rows)))


# the HTTP side ---------------------------------------------------------------------------------------------------


def create_app(debates: Debates, api_key: str | None = None) -> Starlette:
    """The ASGI app: GET /v1/models and POST /v1/chat/completions, every failure in OpenAI's error shape."""
    created = int(time.time())

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY' (the "
                           "server's --api-key).", code="invalid_api_key")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() != api_key:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def list_models(request: Request) -> JSONResponse:
        try:
            authorize(request)
        except ApiError as exc:
            return exc.response()
        cards = [ModelCard(id=name, created=created) for name in debates.societies]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def chat_completions(request: Request) -> JSONResponse:
        try:
            authorize(request)
            body = read_request(await request.body(), debates.societies)
            question = last_user_message(body.messages)
            if question is None:
                raise ApiError(400, "'messages' holds no user message with text: the society debates the last "
                               "user message.", param="messages")
            if len(question) > MAX_QUESTION_CHARS:
                raise ApiError(400, f"the last user message is {len(question):,} characters long (at most "
                               f"{MAX_QUESTION_CHARS:,})", param="messages", code="string_above_max_length")
            answer = await asyncio.wrap_future(debates.submit(body.model, question))
        except ApiError as exc:
            return exc.response()
        return JSONResponse(answer.model_dump())

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = {404: f"Unknown path {request.url.path}: this server answers GET /v1/models and POST "
                        "/v1/chat/completions.",
                   405: f"Method {request.method} is not allowed on {request.url.path}."}.get(status, str(exc))
        return ApiError(status, message, "invalid_request_error" if status < 500 else "server_error").response()

    routes = [Route("/v1/models", list_models, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def read_request(raw: bytes, models: Mapping[str, Chosen]) -> ChatCompletionRequest:
    """The request's body, checked in OpenAI's order: JSON, fields, streaming, model."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request: send a JSON object.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        body = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(400, f"Invalid request: {param}: {first['msg']}", param=param) from None
    if body.stream:
        raise ApiError(400, "stream=true is not supported: the society answers after its whole debate; send "
                       "stream=false.", param="stream", code="unsupported_value")
    if body.model not in models:
        raise ApiError(404, f"The model '{body.model}' does not exist: this server has {', '.join(models)}.",
                       param="model", code="model_not_found")
    return body


# listening -------------------------------------------------------------------------------------------------------


class Listening:
    """uvicorn serving `app` in a thread of its own (the main thread debates), started and stopped here. The
    socket is bound here, before uvicorn starts, so a taken port is one clear error (not uvicorn's log and an exit
    in its thread), and `--port 0` learns the port the system chose."""

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        import uvicorn

        self.host, self.port_asked = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.sock: socket.socket | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Listening:
        try:
            family = socket.getaddrinfo(self.host, self.port_asked, type=socket.SOCK_STREAM)[0][0]
            self.sock = socket.create_server((self.host, self.port_asked), family=family)
        except OSError as exc:
            raise UserError(f"cannot listen on {self.host}:{self.port_asked}: {exc.strerror or exc}; choose another "
                            "--port or --host") from None
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="serve-http",
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        """The port listened on: the one asked for, or the one the system chose for `--port 0`."""
        return int(self.sock.getsockname()[1]) if self.sock is not None else self.port_asked

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        if self.sock is not None:
            self.sock.close()
