"""`loraforge serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a chat page at `/`.

Endpoints: POST /v1/chat/completions and /v1/completions (streaming as server-sent events ending with
`data: [DONE]`, or one JSON body), GET /v1/models, GET /health. `model` picks an adapter by name (the
run folder's name); only loaded names are accepted, so a request can never name a path. Errors use the
OpenAI shape `{"error": {"message", "type", "param", "code"}}` so OpenAI clients report them properly.

The routes live at module level on `router`; what they serve (the engine, the limits) is the app's
`Server`, in `app.state.server`, which `create_app` puts there and the `server` dependency hands out.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loraforge.serve.engine import Engine, QueueFull, ShuttingDown
from loraforge.serve.engine import Request as GenRequest


@dataclass
class Limits:
    """What one request may ask for; exceeding any is a 4xx with a message that names the limit."""

    api_key: str | None = None
    max_tokens_limit: int = 1024
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON is ~250K tokens of text: far above any prompt limit
    timeout: float = 120.0
    default_max_tokens: int = 256


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False  # a last chunk with no choices and the request's token counts


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, seed, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Server:
    """What the routes serve: the running engine and the request limits (`app.state.server`)."""

    engine: Engine
    limits: Limits
    created: int = field(default_factory=lambda: int(time.time()))  # the `created` of /v1/models


async def server(request: Request) -> Server:
    """The app's `Server`: a FastAPI dependency (async, so that FastAPI does not run it in a worker thread)."""
    return request.app.state.server


ServerDep = Annotated[Server, Depends(server)]
router = APIRouter()


def create_app(engine: Engine, limits: Limits) -> FastAPI:
    """The FastAPI app over a running `engine`; closing the app's lifespan closes the engine."""
    app = FastAPI(title="loraforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.server = Server(engine, limits)
    app.middleware("http")(_guard)
    app.add_exception_handler(APIError, _on_api_error)
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    # uvicorn runs this after it stopped accepting connections and waited for open ones
    # (timeout_graceful_shutdown), so only requests that outlived that wait are cancelled here.
    await asyncio.to_thread(app.state.server.engine.close, 10.0)


async def _guard(request: Request, call_next: Any) -> Response:
    """The API key (every path but the chat page) and the declared body size, before any route runs."""
    limits: Limits = request.app.state.server.limits
    if limits.api_key and request.url.path not in ("/", "/favicon.ico"):
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), limits.api_key.encode()):
            return APIError(401, "Invalid or missing API key. Send 'Authorization: Bearer <key>'.",
                            "invalid_request_error", code="invalid_api_key").response()
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        return APIError(413, f"Request body is {length} bytes; the limit is {limits.max_body_bytes}.",
                        code="request_too_large").response()
    try:
        return await call_next(request)
    except APIError as e:
        return e.response()


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


# -------------------------------------------------------------------------------------------------------
# Routes


@router.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse(resources.files("loraforge.serve").joinpath("static/index.html").read_text("utf-8"))


@router.get("/health")
async def health(srv: ServerDep) -> dict[str, Any]:
    sizes = srv.engine.batch_sizes
    return {"status": "ok", "models": list(srv.engine.adapters), "batches": len(sizes),
            "largest_batch": max(sizes, default=0)}


@router.get("/v1/models")
async def models(srv: ServerDep) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": srv.created,
                                        "owned_by": "loraforge"} for name in srv.engine.adapters]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, srv: ServerDep) -> Response:
    body = await _parse(request, ChatRequest, srv.limits)
    adapter = _pick_adapter(srv.engine, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    if adapter.data_kind == "chat":
        text = adapter.formatter(messages)
    else:  # alpaca/text runs were trained on one prompt: answer the last user message
        text = adapter.formatter(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _respond(srv, body, adapter.name, text, max_tokens, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, srv: ServerDep) -> Response:
    body = await _parse(request, CompletionRequest, srv.limits)
    adapter = _pick_adapter(srv.engine, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "Only one prompt per request is supported; send several requests (they are "
                            "batched together on the server).", param="prompt")
    return await _respond(srv, body, adapter.name, prompts[0], body.max_tokens, chat=False)


# -------------------------------------------------------------------------------------------------------
# What the completion routes share


async def _parse(request: Request, model: type[BaseModel], limits: Limits) -> Any:
    raw = bytearray()
    async for chunk in request.stream():  # chunked bodies carry no content-length: count as we read
        raw += chunk
        if len(raw) > limits.max_body_bytes:
            raise APIError(413, f"Request body exceeds {limits.max_body_bytes} bytes.", code="request_too_large")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(422, f"Request body is not valid JSON: {e}.", code="invalid_json") from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise APIError(422, f"Invalid request: {param}: {first['msg']} ({e.error_count()} error(s)).",
                       param=param, code="invalid_value") from e


def _pick_adapter(engine: Engine, name: str) -> Any:
    adapter = engine.adapters.get(name)
    if adapter is None:
        raise APIError(404, f"The model {name!r} does not exist. Served models: {', '.join(engine.adapters)}.",
                       param="model", code="model_not_found")
    return adapter


async def _respond(srv: Server, body: _Sampling, model: str, text: str, max_tokens: int | None, *,
                   chat: bool) -> Response:
    """Check the request against the limits, queue it, and answer: a stream of events or one JSON body."""
    limits, engine = srv.limits, srv.engine
    max_tokens = max_tokens or min(limits.default_max_tokens, limits.max_tokens_limit)
    if max_tokens > limits.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit}.",
                       param="max_tokens", code="max_tokens_too_large")
    ids = engine.encode(text)
    if len(ids) > limits.max_prompt_tokens:
        raise APIError(400, f"The prompt is {len(ids)} tokens; this server allows at most "
                            f"{limits.max_prompt_tokens}.", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    req = GenRequest(adapter=model, input_ids=ids, max_tokens=max_tokens, temperature=body.temperature,
                     top_p=body.top_p, stop=body.stops(), deadline=time.monotonic() + limits.timeout,
                     loop=loop, events=asyncio.Queue())
    try:
        engine.submit(req)
    except QueueFull as e:
        raise APIError(429, f"Server busy: {e}.", "rate_limit_error", code="queue_full") from e
    except ShuttingDown as e:
        raise APIError(503, "The server is shutting down.", "server_error", code="shutting_down") from e
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        with_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(req, rid, model, chat, with_usage, limits.timeout),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pieces: list[str] = []
    try:
        async for kind, value in _events(req, limits.timeout):
            if kind == "text":
                pieces.append(value)
            elif kind == "error":
                raise APIError(504 if "timed out" in value else 500, value, "server_error")
    finally:
        req.cancelled = True  # a no-op when done; stops the row if the client went away
    content = "".join(pieces)
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": content}}
                              if chat else {"index": 0, "text": content, "logprobs": None})
    choice["finish_reason"] = req.finish_reason
    return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": model, "choices": [choice],
                         "usage": _usage(req)})


async def _events(req: GenRequest, timeout: float) -> AsyncIterator[tuple[str, str]]:
    """The request's events until it is done; a deadline (plus slack for the queue) ends it as an error."""
    assert req.events is not None
    while True:
        remaining = req.deadline - time.monotonic()
        try:
            kind, *rest = await asyncio.wait_for(req.events.get(), timeout=max(remaining, 0) + 1.0)
        except asyncio.TimeoutError:
            req.cancelled = True
            yield "error", f"generation timed out after {timeout:g} s"
            return
        if kind == "done":
            if rest[0] == "timeout":
                yield "error", f"generation timed out after {timeout:g} s"
            return
        yield kind, rest[0]
        if kind == "error":
            return


async def _stream(req: GenRequest, rid: str, model: str, chat: bool, with_usage: bool,
                  timeout: float) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                {"content": delta} if delta is not None else {})
            choice: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return frame([choice])

    def frame(choices: list, **extra: Any) -> str:
        obj = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
               "created": int(time.time()), "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk(None, None, first=True)
        async for kind, value in _events(req, timeout):
            if kind == "text":
                yield chunk(value, None)
            else:
                yield f"data: {json.dumps(error_body(value, 'server_error'))}\n\n"
                break
        else:
            yield chunk(None, req.finish_reason)
            if with_usage:  # as OpenAI sends it: no choices, the whole request's counts
                yield frame([], usage=_usage(req))
        yield "data: [DONE]\n\n"
    finally:
        req.cancelled = True  # client disconnected (generator closed) or done: free the batch row


def _usage(req: GenRequest) -> dict[str, int]:
    return {"prompt_tokens": len(req.input_ids), "completion_tokens": len(req.tokens),
            "total_tokens": len(req.input_ids) + len(req.tokens)}


def run_server(runs: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_concurrency: int = 8, max_tokens_limit: int = 1024, max_prompt_tokens: int = 4096,
               timeout: float = 120.0, fast_decode: bool | None = None) -> None:
    """Load the runs and serve until SIGINT/SIGTERM; in-flight requests get up to 30 s to finish."""
    import uvicorn

    engine = Engine(runs, max_batch=max_concurrency, max_waiting=4 * max_concurrency, fast_decode=fast_decode)
    limits = Limits(api_key=api_key or None, max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                    timeout=timeout)
    app = create_app(engine, limits)
    print(f"serving {', '.join(engine.adapters)} on http://{host}:{port}/ (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
