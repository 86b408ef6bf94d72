"""Security and limits of `loraforge serve`, against a real server process on 127.0.0.1.

An API key is required everywhere but the chat page; the body size, prompt length, max_tokens and the
queue are capped with a 4xx that names the limit; a generation that runs past --timeout is cut off
(504, or an error event in a stream) and the server keeps serving; a client that disconnects mid-stream
frees the generator at once; the `model` field is a name, never a path.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
from conftest import STRICT
from relserver import Server, burst, chat

HOSTILE_MODELS = ["../../../../etc/passwd", "/etc/passwd", "..", ".", "tiny-chat/../../../etc/passwd",
                  "%2e%2e/%2e%2e/etc/passwd", "..\\..\\etc\\passwd", "adapter", "tiny-chat/adapter", "", "\x00"]


def post(server: Server, body, *, headers: dict | None = None, timeout: float = 60, path: str = "/v1/chat/completions"):
    h = server.headers if headers is None else headers
    if isinstance(body, bytes):
        return httpx.post(server.url + path, content=body, headers={**h, "Content-Type": "application/json"},
                          timeout=timeout)
    return httpx.post(server.url + path, json=body, headers=h, timeout=timeout)


def test_api_key_is_required(strict_server: Server):
    s = strict_server
    for path in ("/v1/models", "/health"):
        assert httpx.get(s.url + path, timeout=10).status_code == 401
        assert httpx.get(s.url + path, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        assert httpx.get(s.url + path, headers=s.headers, timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {s.api_key}"},
                    {"Authorization": f"Bearer {s.api_key}x"}, {"Authorization": f"Bearer {s.api_key[:-1]}"}):
        r = post(s, chat(s.model, max_tokens=2), headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert post(s, chat(s.model, max_tokens=2)).status_code == 200


def test_body_size_is_capped_with_and_without_content_length(strict_server: Server):
    s = strict_server
    big = json.dumps(chat(s.model, "x" * (2 << 20))).encode()
    r = post(s, big)
    assert r.status_code == 413, r.text[:200]

    def chunks():  # chunked transfer: no Content-Length for the middleware to check up front
        for i in range(0, len(big), 64 << 10):
            yield big[i:i + (64 << 10)]

    r = httpx.post(s.url + "/v1/chat/completions", content=chunks(), timeout=60,
                   headers={**s.headers, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:200]
    assert post(s, big, headers={}).status_code == 401  # no key: refused before the body is read


def test_prompt_length_and_max_tokens_are_capped(strict_server: Server):
    s = strict_server
    r = post(s, chat(s.model, "word " * (STRICT["prompt_tokens"] * 2), max_tokens=2))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = post(s, {"model": s.model, "prompt": "word " * (STRICT["prompt_tokens"] * 2), "max_tokens": 2},
             path="/v1/completions")
    assert r.status_code == 400, r.text
    for body in (chat(s.model, max_tokens=STRICT["max_tokens"] + 1),
                 chat(s.model, max_completion_tokens=STRICT["max_tokens"] + 1),
                 chat(s.model, max_tokens=10**12)):
        r = post(s, body)
        assert r.status_code == 400 and "max_tokens" in r.text, r.text


def test_model_field_cannot_name_a_path(strict_server: Server, tiny_run: Path):
    s = strict_server
    for name in [*HOSTILE_MODELS, str(tiny_run), str(tiny_run / "adapter")]:
        r = post(s, chat(name, max_tokens=2))
        assert r.status_code in (400, 404, 422), (name, r.status_code)
        assert "root:" not in r.text
    # URL paths that climb out of the app: raw requests, so no client normalizes the dots away.
    for path in ("/../../../../etc/passwd", "/static/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                 "/v1/../../../etc/passwd", "//etc/passwd"):
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {s.api_key}\r\n"
                         "Connection: close\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        status = int(reply.split(b" ", 2)[1])
        assert status in (400, 404), (path, reply[:200])
        assert b"root:" not in reply


def test_stuck_generation_is_timed_out_and_the_server_keeps_serving(strict_server: Server):
    s = strict_server
    # Greedy decoding of a random tiny model never emits EOS: 4000 tokens take ~40 s here, so only the
    # --timeout (5 s) can end it.
    t0 = time.monotonic()
    r = post(s, chat(s.model, max_tokens=STRICT["max_tokens"], temperature=0))
    took = time.monotonic() - t0
    assert r.status_code == 504 and "timed out" in r.json()["error"]["message"], r.text[:300]
    assert took < STRICT["timeout"] + 3, took
    t0 = time.monotonic()
    with httpx.stream("POST", s.url + "/v1/chat/completions", headers=s.headers, timeout=60,
                      json=chat(s.model, max_tokens=STRICT["max_tokens"], temperature=0, stream=True)) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert time.monotonic() - t0 < STRICT["timeout"] + 3
    assert lines[-1] == "data: [DONE]" and "timed out" in lines[-2], lines[-3:]
    assert post(s, chat(s.model, max_tokens=2)).status_code == 200


def test_client_disconnect_mid_stream_frees_the_generator(strict_server: Server):
    s = strict_server
    with httpx.stream("POST", s.url + "/v1/chat/completions", headers=s.headers, timeout=60,
                      json=chat(s.model, max_tokens=STRICT["max_tokens"], temperature=0, stream=True)) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # leave after the first generated text; closing the response drops the connection
    # One generation at a time on this server: the next request waits for the abandoned one unless the
    # disconnect cancelled it. Left running, it would hold the worker until the 5 s timeout.
    t0 = time.monotonic()
    r = post(s, chat(s.model, max_tokens=1, temperature=0))
    took = time.monotonic() - t0
    assert r.status_code == 200
    assert took < STRICT["timeout"] / 2, f"the abandoned stream still held the generator ({took:.1f} s)"


def test_a_full_queue_answers_429_not_a_crash(strict_server: Server):
    s = strict_server
    replies = asyncio.run(burst(s, 14, max_tokens=24))  # 1 generating + 4 waiting fit; the rest are refused
    statuses = [r.status_code for r in replies]
    assert 429 in statuses and 200 in statuses, statuses
    assert set(statuses) <= {200, 429, 504}, statuses  # 504: a queued request that outwaited the 5 s timeout
    refused = next(r for r in replies if r.status_code == 429).json()["error"]
    assert refused["type"] == "rate_limit_error" and refused["code"] == "queue_full", refused
    time.sleep(1.0)
    assert [r.status_code for r in asyncio.run(burst(s, 4, max_tokens=2))] == [200] * 4  # the queue is free again
