"""OpenAI parameters the server honours (seed, logprobs) and refuses (n > 1, tools, JSON mode...), spoken
to in-process (TestClient, and the openai client over it) on a tiny random model; and the access log."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from loraforge.serve.app import Limits, create_app
from loraforge.serve.engine import Engine

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Name a fruit."}]


class Probe(BaseModel):
    count: int


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    eng = Engine([tiny_model_dir], max_batch=4, batch_wait_s=0.001, batch_wait_max_s=0.001)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def http(engine: Engine) -> Iterator[TestClient]:
    app = create_app(engine, Limits(api_key=KEY, max_tokens_limit=32))

    @app.post("/probe")  # a route validated by FastAPI itself, whose errors used to be 422s
    async def probe(body: Probe) -> dict:
        return {"count": body.count}

    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def model(engine: Engine) -> str:
    return next(iter(engine.adapters))


@pytest.fixture(scope="module")
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


def chat(http: TestClient, model: str, **kw) -> dict:
    r = http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 8, **kw},
                  headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_seed_gives_the_same_sample_and_another_seed_another(http: TestClient, model: str) -> None:
    def answer(seed: int) -> str:
        return chat(http, model, temperature=1.0, seed=seed)["choices"][0]["message"]["content"]

    first = answer(1234)
    assert answer(1234) == first  # a random 2-layer model: near-uniform over 49K tokens, so a draw is a seed's
    assert answer(99) != first
    r = http.post("/v1/completions", json={"model": model, "prompt": "The river", "max_tokens": 6, "seed": -5,
                                           "temperature": 1.5}, headers=AUTH)
    again = http.post("/v1/completions", json={"model": model, "prompt": "The river", "max_tokens": 6, "seed": -5,
                                               "temperature": 1.5}, headers=AUTH)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == again.json()["choices"][0]["text"]


def test_chat_logprobs_in_openais_shape_through_the_openai_client(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes) == t.token.encode()
        assert len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert math.isclose(t.top_logprobs[0].logprob, t.logprob, abs_tol=1e-5)  # greedy: the top one
    plain = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content


def test_completion_logprobs_in_the_legacy_shape(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt="The river", max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(alts) == 2 and max(alts.values()) >= lp.token_logprobs[i] - 1e-5
               for i, alts in enumerate(lp.top_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == len("The river")


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"42": 10}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "stream": True}, "logprobs"),
    ({"seed": "7"}, "seed"),
])
def test_parameters_the_server_cannot_honour_are_400_in_openais_shape(http: TestClient, model: str, extra: dict,
                                                                      param: str) -> None:
    r = http.post("/v1/chat/completions", json={"model": model, "messages": MESSAGES, **extra}, headers=AUTH)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_neutral_values_clients_always_send_are_accepted(http: TestClient, model: str) -> None:
    out = chat(http, model, n=1, tools=[], presence_penalty=0, frequency_penalty=0, logit_bias={},
               response_format={"type": "text"}, user="someone", temperature=0)
    assert out["choices"][0]["message"]["content"] is not None


def test_the_openai_client_raises_bad_request_for_n_2(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model=model, messages=MESSAGES, n=2, max_tokens=2)


def test_fastapi_validation_errors_are_openai_400s(http: TestClient) -> None:
    r = http.post("/probe", json={"count": "many"}, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == "count"


def test_one_access_log_line_per_request(http: TestClient, model: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="loraforge.serve.access"):
        chat(http, model, max_tokens=3, temperature=0)
        with http.stream("POST", "/v1/chat/completions", headers=AUTH,
                         json={"model": model, "messages": MESSAGES, "max_tokens": 3, "stream": True}) as r:
            assert "[DONE]" in "".join(r.iter_text())
        http.get("/v1/models")  # no key: refused by the guard, still logged
    lines = [r.getMessage() for r in caplog.records if r.name == "loraforge.serve.access"]
    assert len(lines) == 3, lines
    for line in lines[:2]:
        method, path, status, ms, unit, tokens = line.split()
        assert (method, path, status, unit) == ("POST", "/v1/chat/completions", "200", "ms")
        prompt, completion = map(int, tokens.removeprefix("tokens=").split("+"))
        assert float(ms) >= 0 and prompt > 3 and 1 <= completion <= 3
    assert lines[2].startswith("GET /v1/models 401 ") and lines[2].endswith("tokens=-")


@pytest.mark.long  # ~3.5 s: a second engine, with the fast decoder
def test_a_seeded_request_on_the_fast_decoder_runs_alone_and_repeats(tiny_model_dir: Path) -> None:
    import asyncio

    from loraforge.serve.engine import Request

    eng = Engine([tiny_model_dir], max_batch=4, fast_decode=True, batch_wait_s=0.001)
    try:
        async def run(seed: int | None) -> list[list[int]]:
            loop = asyncio.get_running_loop()
            reqs = [Request(adapter=next(iter(eng.adapters)), input_ids=[1, 2, 3, 4], max_tokens=5, temperature=1.0,
                            seed=s, loop=loop, events=asyncio.Queue()) for s in (None, seed, None)]
            for r in reqs:
                eng.submit(r)
            for r in reqs:
                while (await r.events.get())[0] not in ("done", "error"):
                    pass
            return [r.tokens for r in reqs]

        first, second = asyncio.run(run(7)), asyncio.run(run(7))
        assert first[1] == second[1] and len(first[1]) == 5
        assert eng.fast_decode and eng.decoder is not None
    finally:
        eng.close()
