"""`loraforge serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a chat page at `/`.

Endpoints: POST /v1/chat/completions and /v1/completions (streaming as server-sent events ending with
`data: [DONE]`, or one JSON body), GET /v1/models, GET /health. `model` picks an adapter by name (the
run folder's name); only loaded names are accepted, so a request can never name a path. Errors use the
OpenAI shape `{"error": {"message", "type", "param", "code"}}` so OpenAI clients report them properly;
client input never ends in a 5xx (how a body is read and what it may hold: `serve/schema.py`). `seed` and
`logprobs`/`top_logprobs` are honoured (how: `serve/engine.py`); parameters the server cannot honour are
refused with a 400 naming them. Every request writes one access-log line (logger `loraforge.serve.access`):
method, path, status, milliseconds until the last byte, and prompt+completion tokens.

The routes live at module level on `router`; what they serve (the engine, the limits) is the app's
`Server`, in `app.state.server`, which `create_app` puts there and the `server` dependency hands out.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from itertools import accumulate
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from loraforge.errors import ConfigError, LoraforgeError
from loraforge.serve.engine import Engine, QueueFull, ShuttingDown
from loraforge.serve.engine import Request as GenRequest
from loraforge.serve.schema import APIError, ChatRequest, CompletionRequest, Sampling, error_body, read_body

access_log = logging.getLogger("loraforge.serve.access")


@dataclass
class Limits:
    """What one request may ask for; exceeding any is a 4xx with a message that names the limit."""

    api_key: str | None = None
    max_tokens_limit: int = 1024
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON is ~250K tokens of text: far above any prompt limit
    timeout: float = 120.0
    default_max_tokens: int = 256


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
    app.middleware("http")(_log_access)  # added last: the outermost, so it sees the guard's refusals too
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(HTTPException, _on_http_error)  # unknown paths and methods, in OpenAI's shape
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # FastAPI's 422, as OpenAI's 400
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
    length = request.headers.get("content-length", "")
    # isascii: "²".isdigit() is True and int("²") raises; over 18 digits is over any limit (and int() of
    # thousands of digits raises too)
    if length.isascii() and length.isdigit() and (len(length) > 18 or int(length) > limits.max_body_bytes):
        return APIError(413, f"Request body is {length} bytes; the limit is {limits.max_body_bytes}.",
                        code="request_too_large").response()
    try:
        return await call_next(request)
    except APIError as e:
        return e.response()


async def _log_access(request: Request, call_next: Any) -> Response:
    """One line per request once its last byte is sent (a stream's end, not its headers)."""
    start = time.perf_counter()
    response = await call_next(request)

    def line() -> None:
        gen = getattr(request.state, "gen", None)  # set by the completion routes once a request is queued
        tokens = f"{len(gen.input_ids)}+{len(gen.tokens)}" if gen is not None else "-"
        access_log.info("%s %s %d %.0f ms tokens=%s", request.method, request.url.path[:200],
                        response.status_code, (time.perf_counter() - start) * 1000, tokens)

    body = getattr(response, "body_iterator", None)
    if body is None:
        line()
        return response

    async def logged() -> AsyncIterator[Any]:
        try:
            async for part in body:
                yield part
        finally:
            line()

    response.body_iterator = logged()
    return response


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    body = error_body(f"{exc.detail}: {request.method} {request.url.path[:200]}", "invalid_request_error",
                      code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    loc = first["loc"][1:] if first["loc"][:1] in (("body",), ("query",), ("path",), ("header",)) else first["loc"]
    param = ".".join(map(str, loc)) or None
    return APIError(400, f"Invalid request: {param or 'body'}: {first['msg']}.", param=param,
                    code="invalid_value").response()


# -------------------------------------------------------------------------------------------------------
# Routes


@router.get("/", response_class=HTMLResponse)
async def page() -> HTMLResponse:
    return HTMLResponse(resources.files("loraforge.serve").joinpath("static/index.html").read_text("utf-8"))


@router.get("/health")
async def health(srv: ServerDep) -> dict[str, Any]:
    sizes = srv.engine.batch_sizes
    return {"status": "ok", "models": list(srv.engine.adapters), "batches": len(sizes),
            "largest_batch": max(sizes, default=0), "max_tokens_limit": srv.limits.max_tokens_limit}


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
    try:
        if adapter.data_kind == "chat":
            text = adapter.formatter(messages)
        else:  # alpaca/text runs were trained on one prompt: answer the last user message
            text = adapter.formatter(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
    except LoraforgeError as e:  # e.g. a chat template that refuses this order of roles
        raise APIError(400, str(e), param="messages", code="invalid_messages") from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _respond(request, srv, body, adapter.name, text, max_tokens, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, srv: ServerDep) -> Response:
    body = await _parse(request, CompletionRequest, srv.limits)
    adapter = _pick_adapter(srv.engine, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "Only one prompt per request is supported; send several requests (they are "
                            "batched together on the server).", param="prompt")
    return await _respond(request, srv, body, adapter.name, prompts[0], body.max_tokens, chat=False)


# -------------------------------------------------------------------------------------------------------
# What the completion routes share


async def _parse(request: Request, model: type[BaseModel], limits: Limits) -> Any:
    raw = bytearray()
    try:
        async for chunk in request.stream():  # chunked bodies carry no content-length: count as we read
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise APIError(413, f"Request body exceeds {limits.max_body_bytes} bytes.",
                               code="request_too_large")
    except ClientDisconnect:  # it sent less than its Content-Length and hung up: nobody reads this answer
        raise APIError(400, "The client hung up before sending the whole body.", code="incomplete_body") from None
    return read_body(bytes(raw), model)


def _pick_adapter(engine: Engine, name: str) -> Any:
    adapter = engine.adapters.get(name)
    if adapter is None:
        shown = repr(name[:100]) + ("..." if len(name) > 100 else "")
        raise APIError(404, f"The model {shown} does not exist. Served models: {', '.join(engine.adapters)}.",
                       param="model", code="model_not_found")
    return adapter


async def _respond(request: Request, srv: Server, body: Sampling, model: str, text: str, max_tokens: int | None,
                   *, chat: bool) -> Response:
    """Check the request against the limits, queue it, and answer: a stream of events or one JSON body."""
    limits, engine = srv.limits, srv.engine
    top_logprobs = body.top_logprobs_wanted()
    if top_logprobs is not None and body.stream:
        raise APIError(400, "logprobs are not supported with stream: true; ask without streaming.",
                       param="logprobs", code="unsupported_parameter")
    max_tokens = max_tokens or min(limits.default_max_tokens, limits.max_tokens_limit)
    if max_tokens > limits.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit}.",
                       param="max_tokens", code="max_tokens_too_large")
    try:
        ids = engine.encode(text)  # an empty prompt is the start of a document (OpenAI's answer to it)
    except LoraforgeError as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt", code="invalid_prompt") from None
    if len(ids) > limits.max_prompt_tokens:
        raise APIError(400, f"The prompt is {len(ids)} tokens; this server allows at most "
                            f"{limits.max_prompt_tokens}.", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    # Below 1e-4 sampling is greedy in all but name, and at 1e-300 the scaled logits overflow to inf and
    # sampling fails; the engine's batching rounds temperatures to 4 decimals anyway (Request.group).
    temperature = body.temperature if body.temperature >= 1e-4 else 0.0
    req = GenRequest(adapter=model, input_ids=ids, max_tokens=max_tokens, temperature=temperature,
                     top_p=body.top_p, stop=body.stops(), seed=body.seed, logprobs=top_logprobs,
                     deadline=time.monotonic() + limits.timeout, loop=loop, events=asyncio.Queue())
    try:
        engine.submit(req)
    except QueueFull as e:
        raise APIError(429, f"Server busy: {e}.", "rate_limit_error", code="queue_full") from e
    except ShuttingDown as e:
        raise APIError(503, "The server is shutting down.", "server_error", code="shutting_down") from e
    request.state.gen = req  # for the access log's token counts
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
    logprobs = None if top_logprobs is None else _logprobs(engine, req, content, chat, len(text))
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": content}}
                              if chat else {"index": 0, "text": content})
    choice["logprobs"] = logprobs
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


def _logprobs(engine: Engine, req: GenRequest, content: str, chat: bool, prompt_chars: int) -> dict[str, Any]:
    """The tokens of `content` with their logprobs, in OpenAI's chat shape (`{"content": [...]}`) or its
    legacy completions shape (parallel lists). Tokens past a stop string (generated, not sent) are left out."""
    rows: list[tuple[str, float, list[tuple[str, float]]]] = []
    offset = 0
    for token, (logprob, alternatives) in zip(req.tokens, req.token_logprobs, strict=False):
        if offset >= len(content) and rows:
            break
        piece = engine.token_text(token)
        rows.append((piece, logprob, [(engine.token_text(t), lp) for t, lp in alternatives]))
        offset += len(piece)
    if chat:
        def entry(piece: str, logprob: float) -> dict[str, Any]:
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**entry(p, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
                            for p, lp, alts in rows], "refusal": None}
    offsets = list(accumulate((len(p) for p, _, _ in rows[:-1]), initial=prompt_chars))
    return {"tokens": [p for p, _, _ in rows], "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [dict(alts) for _, _, alts in rows], "text_offset": offsets}


def _usage(req: GenRequest) -> dict[str, int]:
    return {"prompt_tokens": len(req.input_ids), "completion_tokens": len(req.tokens),
            "total_tokens": len(req.input_ids) + len(req.tokens)}


def check_exposure(host: str, api_key: str | None, insecure_no_key: bool) -> None:
    """Refuse (ConfigError: exit 2) to listen beyond this machine without an API key, unless told to."""
    if api_key or _is_loopback(host):
        return
    if not insecure_no_key:
        raise ConfigError(f"--host {host} makes the server reachable from other machines, and no API key is set: "
                          "anyone who reaches it can use the model. Set --api-key (or LORAFORGE_API_KEY), or pass "
                          "--insecure-no-key if every machine on this network may use it.")
    print(f"warning: serving on {host} without an API key (--insecure-no-key): anyone who reaches this "
          "address can use the model.", file=sys.stderr, flush=True)


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name (resolving it could name any interface), or "" (every interface)
        return False


def run_server(runs: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               insecure_no_key: bool = False, max_concurrency: int = 8, max_tokens_limit: int = 1024,
               max_prompt_tokens: int = 4096, timeout: float = 120.0, fast_decode: bool | None = None,
               trust_remote_code: bool = False) -> None:
    """Load the runs and serve until SIGINT/SIGTERM; in-flight requests get up to 30 s to finish."""
    import uvicorn

    check_exposure(host, api_key, insecure_no_key)  # before loading the model: a mistake shows at once
    engine = Engine(runs, max_batch=max_concurrency, max_waiting=4 * max_concurrency, fast_decode=fast_decode,
                    trust_remote_code=trust_remote_code)
    limits = Limits(api_key=api_key or None, max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                    timeout=timeout)
    app = create_app(engine, limits)
    print(f"serving {', '.join(engine.adapters)} on http://{host}:{port}/ (chat page at /, API at /v1)", flush=True)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
