"""The server as a subprocess with a real socket, spoken to by the official `openai` client and by httpx."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import API_KEY, Server, start_server, stop_server

MESSAGES = [{"role": "user", "content": "Say apple."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_lists_every_adapter_by_run_folder_name(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == ["tiny-chat", "tiny-chat-b"]


def test_chat_non_streaming_and_streaming_agree_and_adapters_differ(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 8 and full.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    other = client.chat.completions.create(model="tiny-chat-b", messages=MESSAGES, max_tokens=8, temperature=0)
    assert other.choices[0].message.content != text  # the per-request adapter really switches


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=6, temperature=0)
    assert full.choices[0].text and full.object == "text_completion"
    parts = list(client.completions.create(model="tiny-chat", prompt="The river", max_tokens=6, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    counted = list(client.completions.create(model="tiny-chat", prompt="The river", max_tokens=6, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == full.usage.completion_tokens
    assert "".join(p.choices[0].text for p in counted[:-1]) == full.choices[0].text
    sampled = client.completions.create(model="tiny-chat", prompt="The river", max_tokens=4, temperature=0.8,
                                        top_p=0.9)
    assert sampled.usage.completion_tokens >= 1


def test_wrong_or_missing_api_key_is_401(server: Server) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2)
    assert e.value.status_code == 401
    for path in ("/v1/models", "/health"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/").status_code == 200  # the chat page itself asks the user for the key


def test_limits_and_bad_requests_get_openai_style_4xx(server: Server, client: openai.OpenAI) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = server.url + "/v1/chat/completions"
    huge = json.dumps({"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = httpx.post(url, content=huge, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, content=b'{"model": "tiny-chat", "messages": [', headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, json={"model": "tiny-chat", "messages": "hi"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="../../etc/passwd", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="tokens; this server allows at most 300"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "word " * 400}],
                                       max_tokens=2)


def test_concurrent_requests_are_batched_and_match_single_requests(server: Server, client: openai.OpenAI) -> None:
    prompts = [f"Say {w}." for w in ("apple", "river", "cloud", "stone")]

    def ask(p: str) -> str:
        r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": p}],
                                           max_tokens=10, temperature=0)
        return r.choices[0].message.content

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone  # left-padded batching does not change greedy answers
    health = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert health["largest_batch"] > 1


@pytest.mark.long
def test_sigterm_lets_an_inflight_stream_finish(served_runs, tmp_path) -> None:
    s = start_server(served_runs[:1], tmp_path / "serve.log", api_key=None)
    got: list[str] = []
    started = threading.Event()

    def consume() -> None:
        body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                started.set()
                got.append(line)

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(30)
    code = stop_server(s)
    t.join(30)
    # uvicorn stops accepting, waits for open responses, then re-raises the signal: exit -15, no traceback
    assert code in (0, -15) and "Traceback" not in s.log.read_text(), s.log.read_text()[-2000:]
    assert "data: [DONE]" in got, got[-3:]
