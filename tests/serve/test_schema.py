"""Reading a request body: every hostile body is a 400 in OpenAI's error shape that names the problem
(never a RecursionError, a UnicodeEncodeError or a coerced value), and a body is checked fast."""

from __future__ import annotations

import json
import time

import pytest

from loraforge.serve.schema import MAX_JSON_DEPTH, APIError, ChatRequest, CompletionRequest, error_body, read_body

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**kw) -> bytes:
    return json.dumps({"model": "m", "messages": MESSAGES, **kw}).encode()


def refused(raw: bytes, model=ChatRequest) -> APIError:
    with pytest.raises(APIError) as e:
        read_body(raw, model)
    assert e.value.status == 400, e.value.message
    assert json.loads(e.value.response().body)["error"]["message"] == e.value.message.encode(
        "utf-8", "backslashreplace").decode()  # the OpenAI error body, encodable whatever the client sent
    return e.value


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,  # was a RecursionError (500)
    b'{"model": "m", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
    b'{"a": ' * 40 + b"1" + b"}" * 40,
    b"[" * 40 + b'"\\"' * 300_000,  # an unterminated string of escaped quotes: one linear pass, not one per quote
])
def test_deep_json_is_refused_before_parsing(raw: bytes) -> None:
    t0 = time.perf_counter()
    e = refused(raw)
    assert "levels deep" in e.message and e.code == "invalid_json"
    assert time.perf_counter() - t0 < 1.0


def test_brackets_inside_strings_do_not_count_and_a_shallow_body_parses() -> None:
    body = read_body(chat(stop=["[" * 200, "{" * 200]), ChatRequest)
    assert body.stops() == ["[" * 200, "{" * 200]
    at_the_limit = refused(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)  # parsed; then not a request
    assert at_the_limit.code == "invalid_value"


@pytest.mark.parametrize("raw, param", [
    (b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\uDFFF"}]}]}',
     "messages.0.content.0.text"),
    (b'{"model": "\\udc00", "messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["ok", "\\ud83d"]}', "stop.1"),
    (b'{"model": "m", "messages": [], "\\ud800": 1}', "\\ud800"),
])
def test_lone_surrogates_are_refused_naming_the_field(raw: bytes, param: str) -> None:
    e = refused(raw)
    assert e.code == "invalid_unicode" and e.message.startswith(param)
    assert error_body(e.message, e.type, e.param)["error"]["param"] == param


def test_a_surrogate_pair_is_text() -> None:
    body = read_body(b'{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}', ChatRequest)
    assert body.messages[0].text() == "\U0001f600"


@pytest.mark.parametrize("raw, says", [
    (b'{"model": "m", "messages": [', "not valid JSON"),
    (b"", "not valid JSON"),
    (chat()[:-1] + b', "temperature": NaN}', "NaN"),
    (chat()[:-1] + b', "temperature": -Infinity}', "Infinity"),
    (chat()[:-1] + b', "max_tokens": ' + b"9" * 5000 + b"}", "4300 digits"),
    ('{"model": "m"}'.encode("utf-16"), "not UTF-8"),
    (b'{"model": "\xff"}', "not UTF-8"),
])
def test_bodies_that_are_not_utf8_json_are_400(raw: bytes, says: str) -> None:
    e = refused(raw)
    assert says in e.message and e.code == "invalid_json"


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("max_tokens", 2.0), ("max_tokens", "5"), ("max_tokens", 0), ("stream", "yes"),
    ("stream", 1), ("temperature", True), ("temperature", "0.5"), ("temperature", 3), ("top_p", 0),
    ("n", True), ("max_completion_tokens", False), ("stream_options", {"include_usage": "yes"}),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", "x" * 257), ("stop", [1]), ("model", 5),
    ("messages", "hi"), ("messages", []), ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "wizard", "content": "x"}]), ("messages", [{"role": "user", "content": [{"text": "x"}]}]),
])
def test_types_are_strict_where_openais_are(field: str, value) -> None:
    e = refused(chat(**{field: value}))
    assert e.param is not None and e.param.startswith(field) and e.code == "invalid_value", e.message
    assert "str" not in e.param.split(".") and "[" not in e.param  # no pydantic union tags in `param`


def test_strict_types_still_take_what_openai_takes() -> None:
    body = read_body(chat(temperature=0, top_p=1, max_tokens=5, stream=True, stop=["a", "b", "c", "d"],
                          user="u", seed=3), ChatRequest)
    assert body.temperature == 0.0 and body.max_tokens == 5 and body.stream is True and len(body.stops()) == 4
    nulls = read_body(chat(temperature=None, top_p=None, n=None, stream=None, stop=None, max_tokens=None),
                      ChatRequest)  # null means the default, as in OpenAI's schema
    assert (nulls.temperature, nulls.top_p, nulls.n, nulls.stream, nulls.stops()) == (1.0, 1.0, 1, False, [])
    assert read_body(b'{"model": "m", "prompt": ""}', CompletionRequest).prompt == ""
    assert read_body(chat(stop="x" * 256), ChatRequest).stops() == ["x" * 256]


@pytest.mark.parametrize("field, value", [("n", 2), ("best_of", 3), ("tools", [{"type": "function"}]),
                                          ("response_format", {"type": "json_schema"}), ("echo", True)])
def test_parameters_the_server_cannot_honour_are_named(field: str, value) -> None:
    e = refused(chat(**{field: value}))
    assert e.param == field and e.code == "unsupported_parameter", e.message


def test_not_an_object_names_the_body() -> None:
    for raw in (b"[1, 2]", b"null", b'"text"', b"3"):
        e = refused(raw)
        assert e.code == "invalid_value" and "body" in e.message
