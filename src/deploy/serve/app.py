"""`loralab serve`: the OpenAI API shape over the batched engine (FastAPI + uvicorn).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), GET /health. The `model` field picks the base model or one
of the adapters configured at start. Errors use OpenAI's shape {"error": {message, type, code}}:
400 bad request, 401 missing/wrong key, 404 unknown model, 413 prompt or body too large, 429
queue full, 504 timeout. Every request leaves one JSON log line on stderr.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

# Module level on purpose: FastAPI resolves the (string) annotations of the endpoints here.
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from loralab.config import Config, ServeConfig
from loralab.util.errors import LoralabError
from loralab.deploy.serve.engine import Engine, QueueFull, Request


ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


@dataclass
class Served:
    engine: Engine
    tokenizer: object
    base_id: str
    adapters: list[str]
    settings: ServeConfig
    api_key: str | None


def _log(**fields) -> None:
    print(json.dumps({"ts": round(time.time(), 3), **fields}), file=sys.stderr, flush=True)


def load_served(cfg: Config) -> Served:
    """Load the base model once and every configured adapter onto it (safetensors only)."""
    from peft import PeftModel

    from loralab.data.chat import ensure_chat_template
    from loralab.model_utils import load_base_model, resolve_autocast_dtype, resolve_device

    s = cfg.serve
    device = resolve_device(cfg.model.device)
    if s.int8 and device.type != "cpu":
        raise LoralabError("serve.int8 is PyTorch dynamic quantization, which runs on the CPU only: set model.device=cpu")
    if s.merged_model:
        model_cfg = type(cfg.model)(**{**cfg.model.__dict__, "name_or_path": s.merged_model})
        loaded = load_base_model(model_cfg, device)
        model, adapters, base_id = loaded.model, [], Path(s.merged_model.rstrip("/")).name
        if s.int8:
            from loralab.deploy.export import quantize_int8

            model = quantize_int8(model)  # weight-only int8
    else:
        if s.int8:
            raise LoralabError("serve.int8 needs serve.merged_model: LoRA layers cannot sit on dynamically quantized Linear layers")
        loaded = load_base_model(cfg.model, device)
        model, adapters = loaded.model, list(s.adapters)
        base_id = Path(cfg.model.name_or_path.rstrip("/")).name
        for index, (name, directory) in enumerate(s.adapters.items()):
            if name == base_id:
                raise LoralabError(f"serve.adapters: '{name}' is the base model's id; pick another name")
            weights = Path(directory) / "adapter_model.safetensors"
            if not weights.is_file():
                raise LoralabError(f"serve.adapters.{name}: {weights} not found (only safetensors adapters are served)")
            if index == 0:
                model = PeftModel.from_pretrained(model, directory, adapter_name=name)
            else:
                model.load_adapter(directory, adapter_name=name)
    ensure_chat_template(loaded.tokenizer)
    api_key = os.environ.get(s.api_key_env) or None
    # Weights cast once to bf16 where the hardware has it. Not autocast: that re-casts every weight
    # on every decoding step, which at batch 1 costs more than the matmuls themselves.
    dtype = resolve_autocast_dtype(cfg.model.precision, device) if not s.int8 else None
    if dtype is not None:
        model = model.to(dtype)
    engine = Engine(model, loaded.tokenizer, adapters, s.max_batch, s.max_queue, batch_wait_s=s.batch_wait_ms / 1000)
    return Served(engine, loaded.tokenizer, base_id, adapters, s, api_key)


def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}", code="invalid_value")
    if not low <= value <= high:
        raise ApiError(400, f"'{key}'={value} is outside [{low}, {high}]", code="invalid_value")
    return int(value) if integer else float(value)


def _prepare(served: Served, body: dict, chat: bool) -> tuple[Request, str]:
    s = served.settings
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required", code="missing_model")
    if model != served.base_id and model not in served.adapters:
        raise ApiError(404, f"model '{model}' does not exist; GET /v1/models lists what is served", code="model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", code="invalid_value")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role: system|user|assistant, content: string}",
                           code="invalid_messages")
        controls = [t for t in served.tokenizer.all_special_tokens if any(t in m["content"] for m in messages)]
        if controls:  # otherwise a client could forge turns, e.g. a system prompt, inside its content
            raise ApiError(400, f"message content may not contain control tokens ({', '.join(controls)})", code="invalid_messages")
        try:
            prompt_ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=False)
        except Exception as exc:  # the template's own rules (e.g. role order)
            raise ApiError(400, f"the chat template rejected these messages: {exc}", code="invalid_messages") from None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", code="invalid_prompt")
        prompt_ids = served.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > s.max_prompt_tokens:
        raise ApiError(413, f"prompt is {len(prompt_ids)} tokens; this server accepts at most {s.max_prompt_tokens}",
                       code="prompt_too_long")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or up to 4 non-empty strings", code="invalid_value")
    request = Request(
        prompt_ids=list(prompt_ids),
        adapter=None if model == served.base_id else model,
        max_tokens=_number(body, "max_tokens" if "max_tokens" in body or not chat else "max_completion_tokens",
                           s.default_max_tokens, 1, s.max_tokens_limit, integer=True),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        stop=stop,
        seed=_number(body, "seed", None, 0, 2**31 - 1, integer=True),
        ignore_eos=body.get("ignore_eos") is True,
        emit=lambda event: None,
    )
    return request, model


def create_app(served: Served):
    app = FastAPI(title="loralab serve", docs_url=None, redoc_url=None)
    s = served.settings

    def error_response(exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}},
                            status_code=exc.status)

    def check_key(http: HttpRequest) -> None:
        if served.api_key is None:
            return
        given = http.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), served.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error",
                           code="invalid_api_key")

    async def read_json(http: HttpRequest) -> dict:
        too_large = ApiError(413, f"request body over {s.max_body_bytes} bytes", code="body_too_large")
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > s.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in http.stream():  # capped while reading: a lying or absent length cannot exhaust memory
            size += len(chunk)
            if size > s.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    @app.get("/health")
    async def health():
        alive = served.engine.alive
        body = {"status": "ok" if alive else "engine stopped", "queued": served.engine.queue.qsize(), "max_queue": s.max_queue,
                **served.engine.stats}
        return body if alive else JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        try:
            check_key(http)
        except ApiError as exc:
            return error_response(exc)
        ids = [served.base_id, *served.adapters]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "loralab"} for i in ids]}

    async def complete(http: HttpRequest, chat: bool):
        started, request_id = time.perf_counter(), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        log = {"id": request_id, "path": http.url.path}
        try:
            check_key(http)
            body = await read_json(http)
            request, model = _prepare(served, body, chat)
        except ApiError as exc:
            _log(**log, status=exc.status, error=exc.code)
            return error_response(exc)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        try:
            served.engine.submit(request)
        except QueueFull:
            _log(**log, status=429, model=model, error="queue_full")
            return error_response(ApiError(429, "server busy: the request queue is full, retry later", kind="rate_limit_error",
                                           code="queue_full"))
        deadline = started + s.request_timeout_s
        created = int(time.time())
        usage = lambda done: {"prompt_tokens": len(request.prompt_ids), "completion_tokens": done,  # noqa: E731
                              "total_tokens": len(request.prompt_ids) + done}

        def choice(text: str, finish: str | None, delta: bool = False) -> dict:
            if chat:
                key = "delta" if delta else "message"
                content = {"content": text} if delta else {"role": "assistant", "content": text}
                return {"index": 0, key: content, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        obj = "chat.completion" if chat else "text_completion"

        async def next_event() -> dict:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(events.get(), timeout=remaining)

        if body.get("stream"):
            async def stream():
                done_tokens, finish = 0, None
                try:
                    if chat:
                        first = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                        yield f"data: {json.dumps(first)}\n\n"
                    while finish is None:
                        event = await next_event()
                        if "error" in event:
                            yield f"data: {json.dumps({'error': {'message': event['error'], 'type': 'server_error'}})}\n\n"
                            finish = "error"
                            break
                        if "delta" in event:
                            chunk = {"id": request_id, "object": obj + (".chunk" if chat else ""), "created": created,
                                     "model": model, "choices": [choice(event["delta"], None, delta=True)]}
                            yield f"data: {json.dumps(chunk)}\n\n"
                        if "finish" in event:
                            finish, done_tokens = event["finish"], event["completion_tokens"]
                            last = {"id": request_id, "object": obj + (".chunk" if chat else ""), "created": created,
                                    "model": model, "choices": [choice("", finish, delta=True)], "usage": usage(done_tokens)}
                            yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                except asyncio.TimeoutError:
                    finish = "timeout"
                    yield f"data: {json.dumps({'error': {'message': 'request timed out', 'type': 'timeout'}})}\n\n"
                finally:
                    request.cancelled.set()  # a client that went away stops costing compute
                    _log(**log, status=200, model=model, stream=True, finish=finish, prompt_tokens=len(request.prompt_ids),
                         completion_tokens=done_tokens, ms=round(1000 * (time.perf_counter() - started)))

            return StreamingResponse(stream(), media_type="text/event-stream")

        parts: list[str] = []
        try:
            while True:
                event = await next_event()
                if "error" in event:
                    _log(**log, status=500, model=model, error=event["error"])
                    return error_response(ApiError(500, event["error"], kind="server_error"))
                parts.append(event.get("delta", ""))
                if "finish" in event:
                    break
        except asyncio.TimeoutError:
            _log(**log, status=504, model=model, error="timeout")
            return error_response(ApiError(504, f"no answer within {s.request_timeout_s} s", kind="timeout", code="timeout"))
        finally:
            request.cancelled.set()  # finished, timed out, or the client went away: stop spending compute on it
        text = "".join(parts)
        _log(**log, status=200, model=model, finish=event["finish"], prompt_tokens=len(request.prompt_ids),
             completion_tokens=event["completion_tokens"], ms=round(1000 * (time.perf_counter() - started)))
        return {"id": request_id, "object": obj, "created": created, "model": model,
                "choices": [choice(text, event["finish"])], "usage": usage(event["completion_tokens"])}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await complete(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await complete(http, chat=True)

    return app


def serve(cfg: Config) -> None:
    import uvicorn

    served = load_served(cfg)
    served.engine.start()
    app = create_app(served)
    s = cfg.serve
    key_note = f"API key required (from ${s.api_key_env})" if served.api_key else f"no API key (set ${s.api_key_env} to require one)"
    print(f"serving {served.base_id}" + (f" + adapters {', '.join(served.adapters)}" if served.adapters else "")
          + f" on http://{s.host}:{s.port}/v1; {key_note}", flush=True)
    try:
        uvicorn.run(app, host=s.host, port=s.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        served.engine.stop()
