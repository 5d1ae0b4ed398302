"""The OpenAI API over a Batcher, as a FastAPI app: `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (streamed as server-sent events in OpenAI's chunk format when asked),
`GET /health` and the chat page at `/`.

    app = build_app(batcher, ServedModel("tiny", GenerateSettings(), positions=128), Limits())
    uvicorn.run(app)

Requests start from the served model's generation settings (the recipe's [generate] table over the model's
generation_config.json: llmkit.generation.with_model_defaults); a request's `max_tokens`, `temperature`,
`top_p`, `n`, `stop` and `seed` override them. Other OpenAI fields are accepted and ignored. Errors have
OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.batching import Batcher, Failed, Finished, Job, Piece, QueueFull, TimedOut
from llmkit.errors import LlmkitError
from llmkit.generation import chat_prompt, with_model_defaults
from llmkit.settings import GenerateSettings


@dataclass
class Limits:
    """What requests may ask and how they are batched (the `llmkit serve` options of the same names)."""

    max_tokens: int = 1024  # the most new tokens a request may ask for
    max_body: int = 1_000_000  # request body, bytes
    timeout: float = 300.0  # seconds from arrival to the last token; then 504 (or an error event)
    max_n: int = 8  # continuations per request
    max_queue: int = 64  # requests waiting; one more is answered 429
    max_batch: int = 16  # requests in one generate call
    batch_wait: float = 0.02  # seconds a batch smaller than the demand waits for more (llmkit.batching)
    stream_interval: float = 0.02  # seconds of text in one streamed chunk, after the first (0: a chunk a token)
    batching: str = "dynamic"  # or "continuous": transformers' continuous batching (llmkit.batching.ContinuousBatcher)


@dataclass
class ServedModel:
    name: str  # the id clients pass as `model`
    settings: GenerateSettings  # defaults of every request (the model's own filled in)
    positions: int | None  # the longest sequence the model takes (prompt + new tokens); None: unknown


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status)


# ---------------------------------------------------------------- requests


class Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage counts

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
        return stops

    def new_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[str] = Field(..., min_length=1)


class TextPart(BaseModel):
    type: Literal["text"]  # the only kind of content part a text model reads
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        """{"role", "content"} with the content as one string, as chat templates take it."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": content}


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def settings_for(request: Sampling, served: ServedModel, limits: Limits) -> GenerateSettings:
    """The served model's settings with the request's overrides; ApiError names a field it cannot take."""
    if request.model != served.name:
        raise ApiError(404, f"The model '{request.model}' does not exist: this server has '{served.name}'",
                       param="model", code="model_not_found")
    asked = request.new_tokens()
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(400, f"max_tokens: at most {limits.max_tokens} (--max-tokens), got {asked}", param="max_tokens")
    if request.n > limits.max_n:
        raise ApiError(400, f"n: at most {limits.max_n}, got {request.n}", param="n")
    settings = replace(served.settings, max_new_tokens=asked or served.settings.max_new_tokens, num_beams=1,
                       num_return_sequences=request.n, stop=request.stops())
    if request.temperature is not None:
        settings = replace(settings, temperature=request.temperature, greedy=request.temperature == 0)
    if request.top_p is not None:
        settings = replace(settings, top_p=request.top_p)
    if request.n > 1 and not settings.sampling:
        raise ApiError(400, "n > 1 needs sampling: a temperature above 0", param="n")
    return settings


# ---------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """One request's jobs and the OpenAI objects made of their events: `chat` or plain completions."""

    def __init__(self, chat: bool, model: str, prompts: list[tuple[str, int]], n: int,
                 stream_interval: float = 0.0) -> None:
        self.chat, self.model, self.n = chat, model, n
        self.stream_interval, self.streamed = stream_interval, False
        self.prompts = prompts  # (prompt text, its token count)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        self.jobs: list[Job] = []

    def object(self, chunk: bool) -> str:
        return ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        return {"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model,
                "choices": choices}

    def choice(self, index: int, text: str | None, finish_reason: str | None, chunk: bool) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        content = {"role": "assistant", "content": text} if not chunk else ({"content": text} if text else {})
        return {"index": index, "delta" if chunk else "message": content, "logprobs": None,
                "finish_reason": finish_reason}

    def usage(self, finished: dict[int, Finished]) -> dict:
        completion = sum(choice.tokens for done in finished.values() for choice in done.choices)
        return usage(sum(tokens for _, tokens in self.prompts), completion)

    async def outcome(self) -> dict[int, Finished]:
        """Every job's Finished by job number; the first Failed raised."""
        finished: dict[int, Finished] = {}
        while len(finished) < len(self.jobs):
            number, event = await self.events.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                finished[number] = event
        return finished

    def body(self, finished: dict[int, Finished]) -> dict:
        choices = [self.choice(number * self.n + i, choice.text, choice.finish_reason, chunk=False)
                   for number in sorted(finished) for i, choice in enumerate(finished[number].choices)]
        return self.envelope(choices) | {"usage": self.usage(finished)}

    async def chunks(self, include_usage: bool):
        """Server-sent events: text as it is made, then each choice's finish reason, [DONE] last."""
        finished: dict[int, Finished] = {}
        if self.chat:  # OpenAI's first chunk of a choice names the role
            yield sse(self.envelope([self.choice(i, None, None, True) | {"delta": {"role": "assistant", "content": ""}}
                                     for i in range(len(self.jobs) * self.n)], chunk=True))
        while len(finished) < len(self.jobs):
            for number, event in await self.next_events():
                if isinstance(event, Piece):
                    yield sse(self.envelope([self.choice(number * self.n + event.choice, event.text, None, True)], True))
                elif isinstance(event, Finished):
                    finished[number] = event
                    yield sse(self.envelope([self.choice(number * self.n + i, None, choice.finish_reason, True)
                                             for i, choice in enumerate(event.choices)], True))
                else:
                    yield sse(failure(event.error)[1])
                    return
        if include_usage:
            yield sse(self.envelope([], True) | {"usage": self.usage(finished)})
        yield "data: [DONE]\n\n"

    async def next_events(self) -> list[tuple[int, object]]:
        """The events waiting (at least one), the text pieces in a row of one choice joined: a client slower
        than the model gets fewer, longer chunks instead of falling behind. After the first text, the pieces
        of `stream_interval` seconds go together (each chunk costs the server and the client far more than
        a token does), sent early when a job ends: its client is not kept from its next request."""
        events = [await self.events.get()]
        if self.streamed and isinstance(events[0][1], Piece):
            deadline = time.monotonic() + self.stream_interval
            while isinstance(events[-1][1], Piece) and (left := deadline - time.monotonic()) > 0:
                try:
                    events.append(await asyncio.wait_for(self.events.get(), left))
                except asyncio.TimeoutError:
                    break
        self.streamed = True
        while not self.events.empty():
            events.append(self.events.get_nowait())
        return join_pieces(events)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True


def join_pieces(events: list[tuple[int, object]]) -> list[tuple[int, object]]:
    """Consecutive text pieces of one job's choice as one."""
    joined: list[tuple[int, object]] = []
    for number, event in events:
        last = joined[-1] if joined else (None, None)
        if isinstance(event, Piece) and isinstance(last[1], Piece) and (last[0], last[1].choice) == (number, event.choice):
            joined[-1] = (number, Piece(event.choice, last[1].text + event.text))
        else:
            joined.append((number, event))
    return joined


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def failure(error: Exception) -> tuple[int, dict]:
    """A failed job as a status and OpenAI's error object."""
    if isinstance(error, TimedOut):
        status, kind, code = 504, "timeout", "timeout"
    else:
        status, kind, code = 500, "server_error", None
    message = str(error) if isinstance(error, TimedOut) else f"generation failed: {type(error).__name__}: {error}"
    return status, {"error": {"message": message, "type": kind, "param": None, "code": code}}


# ---------------------------------------------------------------- the app


def build_app(batcher: Batcher, served: ServedModel, limits: Limits, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="llmkit", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lambda app: lifespan(batcher))
    tokenizer = batcher.counting  # the server thread's own (llmkit.batching.Batcher.counting)
    defaults = with_model_defaults(served.settings, batcher.model)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):  # a bug: answered in OpenAI's shape, logged by uvicorn
        return error_response(500, f"internal error: {type(error).__name__}: {error}", "server_error")

    @app.get("/health")
    async def health():
        stats = batcher.stats
        return {"status": "ok", "model": served.name, "queued": batcher.queued, "generating": batcher.generating,
                "batches": stats.batches, "requests": stats.requests, "batched_requests": stats.batched_requests,
                "largest_batch": stats.largest_batch, "continuous_requests": stats.continuous_requests,
                "settings": shown_settings(defaults), "limits": vars(limits)}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return (files("llmkit") / "static" / "chat.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "llmkit"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_request(request, CompletionRequest, limits)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        for number, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ApiError(400, f"prompt{'' if len(prompts) == 1 else f'[{number}]'}: empty prompt", param="prompt")
        return await answer(body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_request(request, ChatRequest, limits)
        prompt = chat_prompt(tokenizer, [message.plain() for message in body.messages])
        return await answer(body, [prompt], chat=True)

    async def answer(body: Sampling, prompts: list[str], chat: bool):
        settings = settings_for(body, served, limits)
        special = not (chat and getattr(tokenizer, "chat_template", None))
        counted = [(prompt, batcher.count_tokens(prompt, special)) for prompt in prompts]
        check_length(counted, settings.max_new_tokens, served.positions)
        reply = Reply(chat, served.name, counted, body.n, limits.stream_interval)
        loop, deadline = asyncio.get_running_loop(), time.monotonic() + limits.timeout
        for number, (prompt, _) in enumerate(counted):
            emit = lambda event, number=number: loop.call_soon_threadsafe(reply.events.put_nowait, (number, event))  # noqa: E731
            reply.jobs.append(Job(prompt, settings, emit, add_special_tokens=special, seed=body.seed,
                                  stream=body.stream, deadline=deadline))
        try:
            batcher.submit(reply.jobs)
        except QueueFull as full:
            raise ApiError(429, str(full), type="rate_limit_error", code="queue_full") from None
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(cancelling(reply, reply.chunks(include_usage)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return reply.body(await reply.outcome())
        except Exception as error:  # noqa: BLE001 - the job's failure, in OpenAI's shape
            status, content = failure(error)
            return JSONResponse(content, status)
        finally:
            reply.cancel()

    return app


async def cancelling(reply: Reply, chunks):
    """The chunks; a client that leaves gives its jobs up (they stop at the next token)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        reply.cancel()


def lifespan(batcher: Batcher):
    """The worker runs while the app does; at shutdown (after uvicorn has drained the requests) it stops."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def running():
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    return running()


async def read_request(request: Request, model: type[BaseModel], limits: Limits):
    """The body, at most limits.max_body bytes (413), as `model` (400 naming the first bad field)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
        raise ApiError(413, f"request body over {limits.max_body} bytes (--max-body)", code="body_too_large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body:
            raise ApiError(413, f"request body over {limits.max_body} bytes (--max-body)", code="body_too_large")
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None


def check_length(counted: list[tuple[str, int]], new_tokens: int, positions: int | None) -> None:
    longest = max(tokens for _, tokens in counted)
    if positions is not None and longest + new_tokens > positions:
        raise ApiError(400, f"This model's maximum context length is {positions} tokens; the prompt has {longest} "
                            f"and max_tokens asks for {new_tokens} more", param="max_tokens",
                       code="context_length_exceeded")


def shown_settings(settings: GenerateSettings) -> dict:
    """The defaults a request starts from, for /health and the chat page."""
    return {"max_tokens": settings.max_new_tokens, "temperature": 0.0 if not settings.sampling else settings.temperature,
            "top_p": settings.top_p, "top_k": settings.top_k, "repetition_penalty": settings.repetition_penalty,
            "stop": settings.stop}


def check_limits(limits: Limits) -> None:
    """Bad server options, named as the command's flags."""
    for flag, value in (("--max-tokens", limits.max_tokens), ("--max-body", limits.max_body),
                        ("--max-queue", limits.max_queue), ("--max-batch", limits.max_batch)):
        if value < 1:
            raise LlmkitError(f"{flag} must be at least 1, got {value}")
    if limits.batching not in ("dynamic", "continuous"):
        raise LlmkitError(f"--batching must be dynamic or continuous, got {limits.batching!r}")
    if limits.timeout <= 0:
        raise LlmkitError(f"--timeout must be above 0 seconds, got {limits.timeout}")
    for flag, value in (("--batch-wait", limits.batch_wait), ("--stream-interval", limits.stream_interval)):
        if not 0 <= value <= 10:
            raise LlmkitError(f"{flag} must be 0 to 10 seconds, got {value}")
