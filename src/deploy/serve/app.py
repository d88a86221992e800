"""`loralab serve`: the OpenAI API shape over the batched engine (FastAPI + uvicorn).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), GET /health, GET /metrics (Prometheus). The `model` field
picks the base model or one of the adapters configured at start. Errors use OpenAI's shape
{"error": {message, type, code}}: 400 bad request, 401 missing/wrong key, 404 unknown model, 413
prompt or body too large, 429 queue full, 504 timeout. Every request leaves one JSON log line on stderr.

The wire shapes live in protocol.py, model loading and the choice of engine in loading.py, the
engines in engine.py (torch) and llama_gateway.py (llama.cpp), the metrics in metrics.py; this
module holds the routes and the one `Reply` builder for streamed and whole answers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

# Module level on purpose: FastAPI resolves the (string) annotations of the endpoints here.
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loralab.config import Config
from loralab.deploy.serve.engine import QueueFull, Request
from loralab.deploy.serve.loading import Served, load_served
from loralab.deploy.serve.metrics import CONTENT_TYPE
from loralab.deploy.serve.protocol import (
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatTarget,
    ChunkChoice,
    Completion,
    CompletionTarget,
    Delta,
    Event,
    ModelCard,
    ModelList,
    Sampling,
    StreamError,
    StreamErrorDetail,
    TextChoice,
    Usage,
    parse_sampling,
    parse_target,
)


def _log(**fields) -> None:
    print(json.dumps({"ts": round(time.time(), 3), **fields}), file=sys.stderr, flush=True)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def check_key(served: Served, http: HttpRequest) -> None:
    if served.api_key is None:
        return
    given = http.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), served.api_key.encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error",
                       code="invalid_api_key")


async def read_json(http: HttpRequest, max_bytes: int) -> dict:
    too_large = ApiError(413, f"request body over {max_bytes} bytes", code="body_too_large")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in http.stream():  # capped while reading: a lying or absent length cannot exhaust memory
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def prompt_ids(served: Served, target: CompletionTarget | ChatTarget) -> list[int]:
    """The prompt's tokens (through the chat template for a chat), refused when over serve.max_prompt_tokens."""
    if isinstance(target, ChatTarget):
        try:
            ids = served.tokenizer.apply_chat_template([m.model_dump() for m in target.messages], add_generation_prompt=True,
                                                       tokenize=True, return_dict=False)
        except Exception as exc:  # the template's own rules (e.g. role order)
            raise ApiError(400, f"the chat template rejected these messages: {exc}", code="invalid_messages") from None
    else:
        ids = served.tokenizer(target.prompt, add_special_tokens=False)["input_ids"]
    limit = served.settings.max_prompt_tokens
    if len(ids) > limit:
        raise ApiError(413, f"prompt is {len(ids)} tokens; this server accepts at most {limit}", code="prompt_too_long")
    return list(ids)


def engine_request(served: Served, body: dict, chat: bool) -> tuple[Request, str, Sampling]:
    """The engine's request for a JSON body, checked in the order its problems are reported."""
    limits = served.limits()
    target = parse_target(body, chat, limits)
    ids = prompt_ids(served, target)
    sampling = parse_sampling(body, chat, limits)
    request = Request(
        prompt_ids=ids,
        adapter=None if target.model == served.base_id else target.model,
        max_tokens=sampling.token_budget(served.settings.default_max_tokens),
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=sampling.stop,
        seed=sampling.seed,
        ignore_eos=sampling.ignore_eos,
        emit=lambda event: None,  # replaced by `Pending`
    )
    return request, target.model, sampling


class Pending:
    """A submitted request's events, handed from the engine thread to this event loop, read under
    the request's deadline."""

    def __init__(self, request: Request, deadline: float):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.deadline = deadline
        request.emit = lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def next(self) -> Event:
        remaining = self.deadline - time.perf_counter()
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(self.events.get(), timeout=remaining)


@dataclass
class Reply:
    """Every answer to one request, whole or streamed chunk by chunk, built in one place so the two
    shapes cannot drift apart."""

    id: str
    model: str
    chat: bool
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def _object(self, streamed: bool) -> str:
        if not self.chat:
            return "text_completion"
        return "chat.completion.chunk" if streamed else "chat.completion"

    def _choice(self, text: str, finish: str | None, streamed: bool) -> TextChoice | ChatChoice | ChunkChoice:
        if not self.chat:
            return TextChoice(text=text, finish_reason=finish)
        if streamed:
            return ChunkChoice(delta=Delta(content=text), finish_reason=finish)
        return ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)

    def build(self, text: str, finish: str | None = None, completion_tokens: int | None = None,
              streamed: bool = False, choice: ChunkChoice | None = None) -> dict:
        """The answer (streamed=False) or one chunk; the usage comes with the finish."""
        usage = None if completion_tokens is None else Usage.of(self.prompt_tokens, completion_tokens)
        return Completion(id=self.id, object=self._object(streamed), created=self.created, model=self.model,
                          choices=[choice or self._choice(text, finish, streamed)], usage=usage).model_dump()

    def opening_chunk(self) -> dict:
        """A chat stream starts with the assistant's role and no text, as OpenAI's does."""
        return self.build("", streamed=True, choice=ChunkChoice(delta=Delta(role="assistant", content=""), finish_reason=None))


async def stream_reply(pending: Pending, request: Request, reply: Reply, log: dict, started: float) -> AsyncIterator[str]:
    tokens, finish = 0, None
    try:
        if reply.chat:
            yield _sse(reply.opening_chunk())
        while finish is None:
            event = await pending.next()
            if event.error is not None:
                yield _sse(StreamError(error=StreamErrorDetail(message=event.error, type="server_error")).model_dump())
                finish = "error"
                break
            if event.finish is None:
                yield _sse(reply.build(event.delta, streamed=True))
            else:
                finish, tokens = event.finish, event.completion_tokens
                yield _sse(reply.build("", finish, tokens, streamed=True))
        yield "data: [DONE]\n\n"
    except asyncio.TimeoutError:
        finish = "timeout"
        yield _sse(StreamError(error=StreamErrorDetail(message="request timed out", type="timeout")).model_dump())
    finally:
        request.cancelled.set()  # a client that went away stops costing compute
        _log(**log, status=200, model=reply.model, stream=True, finish=finish, prompt_tokens=reply.prompt_tokens,
             completion_tokens=tokens, ms=round(1000 * (time.perf_counter() - started)))


async def whole_reply(pending: Pending, request: Request, reply: Reply, log: dict, started: float,
                      timeout_s: float) -> JSONResponse:
    parts: list[str] = []
    try:
        while True:
            event = await pending.next()
            if event.error is not None:
                _log(**log, status=500, model=reply.model, error=event.error)
                return error_response(ApiError(500, event.error, kind="server_error"))
            parts.append(event.delta)
            if event.finish is not None:
                break
    except asyncio.TimeoutError:
        _log(**log, status=504, model=reply.model, error="timeout")
        return error_response(ApiError(504, f"no answer within {timeout_s} s", kind="timeout", code="timeout"))
    finally:
        request.cancelled.set()  # finished, timed out, or the client went away: stop spending compute on it
    _log(**log, status=200, model=reply.model, finish=event.finish, prompt_tokens=reply.prompt_tokens,
         completion_tokens=event.completion_tokens, ms=round(1000 * (time.perf_counter() - started)))
    return JSONResponse(reply.build("".join(parts), event.finish, event.completion_tokens))


async def complete(served: Served, http: HttpRequest, chat: bool):
    """Check, parse and queue one request, then answer it whole or as server-sent events."""
    started, request_id = time.perf_counter(), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    log = {"id": request_id, "path": http.url.path}
    s = served.settings
    try:
        check_key(served, http)
        request, model, sampling = engine_request(served, await read_json(http, s.max_body_bytes), chat)
    except ApiError as exc:
        _log(**log, status=exc.status, error=exc.code)
        return error_response(exc)
    pending = Pending(request, deadline=started + s.request_timeout_s)
    try:
        served.engine.submit(request)
    except QueueFull:
        _log(**log, status=429, model=model, error="queue_full")
        return error_response(ApiError(429, "server busy: the request queue is full, retry later", kind="rate_limit_error",
                                       code="queue_full"))
    reply = Reply(request_id, model, chat, len(request.prompt_ids))
    if sampling.stream:
        return StreamingResponse(stream_reply(pending, request, reply, log, started), media_type="text/event-stream")
    return await whole_reply(pending, request, reply, log, started, s.request_timeout_s)


def create_app(served: Served) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # After uvicorn's graceful drain and before it re-raises SIGTERM (which ends the process with
        # no `finally`): stop the engine, and with it a llama-server it started.
        served.engine.stop()

    app = FastAPI(title="loralab serve", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.get("/health")
    async def health():
        engine = served.engine
        body = {"status": "ok" if engine.alive else "engine stopped", "queued": engine.queued(),
                "max_queue": served.settings.max_queue, **engine.stats}
        return body if engine.alive else JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics():  # Prometheus' scrape format; counts only, so no key (as /health)
        return Response(served.engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        try:
            check_key(served, http)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse(ModelList(data=[ModelCard(id=i) for i in served.model_ids]).model_dump())

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(served, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(served, http, chat=True)

    return app


def serve(cfg: Config) -> None:
    import uvicorn

    if cfg.serve.engine == "vllm":
        from loralab.deploy.serve.vllm import launch_vllm

        launch_vllm(cfg)  # replaces this process
    served = load_served(cfg)
    served.engine.start()
    app = create_app(served)
    s = cfg.serve
    key_note = (f"API key required (from ${s.api_key_env})" if served.api_key
                else f"no API key (set ${s.api_key_env} to require one)")
    print(f"serving {served.base_id}" + (f" + adapters {', '.join(served.adapters)}" if served.adapters else "")
          + f" on http://{s.host}:{s.port}/v1; {key_note}", flush=True)
    try:
        # The engine keeps decoding while uvicorn drains, so requests in flight finish within the grace.
        uvicorn.run(app, host=s.host, port=s.port, log_level="warning", timeout_graceful_shutdown=s.shutdown_grace_s)
    finally:
        served.engine.stop()
