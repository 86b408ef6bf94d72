"""Hostile HTTP against a real `loraforge serve` process on 127.0.0.1: no input ends in a 5xx or a traceback.

Three kinds of input, each counted and printed (`RELIABILITY SERVER FUZZ {...}`):
- generated bodies (hypothesis): random JSON values and shapes around the chat and completions schemas
  (wrong types, nulls, NaN, lone surrogates, long and many stop strings, extra keys), truncated, spliced
  with random bytes, nested deep or sent as UTF-16, with random content types, API keys, paths, methods;
- the bodies a reviewer found 500s or stalls with (deep JSON, a surrogate, an empty prompt, a stop string of
  a million characters, ...), each with the status it must get;
- requests written byte by byte on a socket: Content-Length lies, conflicting framing, huge headers,
  non-ASCII header bytes, garbage request lines.
Every 4xx from the app is in OpenAI's error shape; afterwards the server answers a normal request, its
log holds no traceback, and its RSS grew by less than 1 GB.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relserver import Server, chat, start_server, stop_server

LIMITS = {"max_tokens": 8, "prompt_tokens": 256}  # every accepted request generates at most 8 tokens: fast
SHORT = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
LONG = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
RSS_GROWTH_LIMIT_MIB = 1024
TALLY: Counter = Counter()  # inputs tried, by kind, over the module


@pytest.fixture(scope="module")
def fuzz_server(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("fuzz-serve") / "serve.log"
    s = start_server([tiny_run], log, "--max-concurrency", "2", "--max-tokens-limit", str(LIMITS["max_tokens"]),
                     "--max-prompt-tokens", str(LIMITS["prompt_tokens"]), "--timeout", "60", api_key=API_KEY)
    yield s
    assert stop_server(s.proc) in (0, -15), log.read_text()[-2000:]
    print("\nRELIABILITY SERVER FUZZ " + json.dumps({"inputs": sum(TALLY.values()), **TALLY}))


def check_reply(r: httpx.Response, what: str) -> None:
    """No 5xx; a 4xx in OpenAI's error shape; a 200 stream without an error event."""
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (what, r.text[:300])
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and "server_error" not in r.text, (what, r.text[-300:])


def still_serving(s: Server) -> None:
    r = httpx.post(f"{s.url}/v1/chat/completions", json=chat(s.model, max_tokens=2), headers=s.headers, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text[:300]
    assert "Traceback" not in s.log.read_text(), s.log.read_text()[-3000:]


# -------------------------------------------------------------------------------------------------------
# Generated requests

texts = st.text(max_size=30) | st.sampled_from(["", "\ud800", "a\udfffb", "\x00", "\u202e", "<|im_end|>",
                                                 "{{ 7 * 7 }}", "\U0001f600" * 8, "[" * 40, "\\"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
numbers = st.one_of(st.integers(-3, 12), st.floats(-1, 3), st.booleans(), st.sampled_from(["5", "0.5", None]),
                    json_values)
roles = st.sampled_from(["user", "system", "assistant", "developer", "tool", "USER", ""])
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | json_values},
                                       optional={"text": texts | json_values}), max_size=3)
message = st.fixed_dictionaries({"role": roles, "content": texts}) | st.fixed_dictionaries(
    {}, optional={"role": roles | json_values, "content": texts | parts | json_values, "name": texts})
stops = st.one_of(texts, st.lists(texts, max_size=6), st.text("ab", min_size=200, max_size=300), json_values)
sampling = {"max_tokens": numbers, "temperature": numbers, "top_p": numbers, "n": numbers,
            "stream": st.booleans() | numbers, "stream_options": st.fixed_dictionaries(
                {}, optional={"include_usage": st.booleans() | json_values}) | json_values,
            "stop": stops, "seed": json_values, "user": texts}


@st.composite
def bodies(draw, model: str) -> tuple[str, bytes]:
    """(path, body): a chat or completions request, valid, with one field gone wrong, or wild; then
    sometimes mangled as bytes."""
    chat_route = draw(st.booleans())
    valid = {"model": st.just(model), "max_tokens": st.integers(1, LIMITS["max_tokens"]) | st.none(),
             "temperature": st.sampled_from([0, 0.0, 0.7, 1, 2, 1e-9]), "top_p": st.sampled_from([1, 0.5, 1e-9]),
             "stream": st.booleans(), "stop": st.lists(st.text(max_size=4), max_size=4) | st.text(max_size=3),
             "stream_options": st.just({"include_usage": True})}
    if chat_route:
        valid["messages"] = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                            "content": st.text(max_size=30)}), min_size=1, max_size=3)
    else:
        valid["prompt"] = st.text(max_size=30)
    wild = {"model": texts | json_values, **sampling,
            **({"messages": st.lists(message, max_size=3) | json_values, "max_completion_tokens": numbers}
               if chat_route else {"prompt": texts | st.lists(texts, max_size=2) | json_values})}
    how = draw(st.sampled_from(["valid", "one field wrong", "wild"]))
    if how == "wild":
        value = draw(st.fixed_dictionaries({}, optional=wild) | json_values)
    else:
        required = ("model", "messages" if chat_route else "prompt")
        value = draw(st.fixed_dictionaries({k: valid[k] for k in required},
                                           optional={k: v for k, v in valid.items() if k not in required}))
        if how == "one field wrong":
            key = draw(st.sampled_from(sorted(wild)))
            value[key] = draw(wild[key])
    raw = json.dumps(value).encode()  # ensure_ascii: a lone surrogate travels as its \ud800 escape
    mangle = draw(st.sampled_from(["no"] * 6 + ["truncate", "splice", "nest", "utf-16"]))
    if mangle == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mangle == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    elif mangle == "nest":
        depth = draw(st.sampled_from([1, 31, 33, 1000, 100_000]))
        raw = b"[" * depth + raw + b"]" * depth
    elif mangle == "utf-16":
        raw = json.dumps(value, ensure_ascii=False).encode("utf-16", "surrogatepass")
    path = "/v1/chat/completions" if chat_route else "/v1/completions"
    return draw(st.sampled_from([path] * 12 + ["/v1/chat/completions/", "/v1/embeddings", "/v1/models"])), raw


AUTH = [{"Authorization": f"Bearer {API_KEY}"}] * 16 + [
    {}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {API_KEY}"},
    {"Authorization": f"bearer {API_KEY}"}, {"X-Api-Key": API_KEY}, {"Authorization": b"Bearer \xff\xfe\x80"},
    {"Authorization": f"Bearer {API_KEY}" + "x" * 4000}]
CONTENT_TYPES = ["application/json", "application/json", "text/plain", "", "application/json; charset=utf-16",
                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", b"application/\xc3(json"]


def _generated_property(s: Server, seen: Counter):
    @given(request=bodies(s.model), auth=st.sampled_from(AUTH), ctype=st.sampled_from(CONTENT_TYPES),
           method=st.sampled_from(["POST"] * 17 + ["GET", "PUT", "DELETE"]))
    def prop(request, auth, ctype, method):
        path, raw = request
        r = httpx.request(method, s.url + path, content=raw, headers={**auth, "Content-Type": ctype}, timeout=60)
        check_reply(r, f"{method} {path} {raw[:200]!r}")
        seen[r.status_code] += 1

    return prop


def run_generated(s: Server, budget: settings) -> Counter:
    still_serving(s)  # the first batches allocate: measure memory after them
    rss_before = s.rss_mib()
    seen: Counter = Counter()
    budget(_generated_property(s, seen))()
    rss_after = s.rss_mib()
    TALLY["generated"] += sum(seen.values())
    print(f"\ngenerated requests tried: {sum(seen.values())} statuses {dict(sorted(seen.items()))} "
          f"rss {rss_before:.0f} -> {rss_after:.0f} MiB")
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MIB
    still_serving(s)
    return seen


def test_generated_requests_never_get_a_5xx(fuzz_server: Server):
    seen = run_generated(fuzz_server, SHORT)
    assert seen[200] > 0 and sum(n for code, n in seen.items() if 400 <= code < 500) > 0, seen


@pytest.mark.long
def test_generated_requests_never_get_a_5xx_long(fuzz_server: Server):
    run_generated(fuzz_server, LONG)


# -------------------------------------------------------------------------------------------------------
# The bodies that found 500s and stalls, each with its answer

def _msg(model: str, content: str = "hi", **kw) -> bytes:
    return json.dumps(chat(model, content, **kw)).encode()


def known_bodies(m: str) -> list[tuple[str, str, bytes, int, str]]:
    """(name, path, body, status, what the error message or body says)."""
    c, p = "/v1/chat/completions", "/v1/completions"
    ok = json.loads(_msg(m, max_tokens=2))
    return [
        ("deep JSON, 100,000 levels", c, b'{"model": "x", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         400, "levels deep"),
        ("deep JSON, 33 levels", c, b"[" * 33 + b"]" * 33, 400, "levels deep"),
        ("lone surrogate in content", c, _msg(m, "a\ud800b"), 400, "messages.0.content"),
        ("lone surrogate in a text part", c, json.dumps({**ok, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "\udfff"}]}]}).encode(), 400, "messages.0.content.0.text"),
        ("lone surrogate in model", c, json.dumps({**ok, "model": "\udc00"}).encode(), 400, "model"),
        ("lone surrogate in a key", c, json.dumps({**ok, "\ud800": 1}).encode(), 400, "surrogate"),
        ("empty completion prompt", p, json.dumps({"model": m, "prompt": "", "max_tokens": 2}).encode(), 200,
         "text_completion"),
        ("prompt [\"\"]", p, json.dumps({"model": m, "prompt": [""], "max_tokens": 2}).encode(), 200, "choices"),
        ("chat of one empty message", c, _msg(m, "", max_tokens=2), 200, "choices"),
        ("two prompts", p, json.dumps({"model": m, "prompt": ["a", "b"]}).encode(), 400, "one prompt"),
        ("max_tokens: true", c, _msg(m, max_tokens=True), 400, "valid integer"),
        ("max_tokens: 2.0", c, _msg(m, max_tokens=2.0), 400, "valid integer"),
        ("max_tokens: \"5\"", c, _msg(m, max_tokens="5"), 400, "valid integer"),
        ("stream: \"yes\"", c, _msg(m, stream="yes"), 400, "valid boolean"),
        ("stream: 1", c, _msg(m, stream=1), 400, "valid boolean"),
        ("temperature: true", c, _msg(m, temperature=True), 400, "valid number"),
        ("temperature: NaN", c, _msg(m)[:-1] + b', "temperature": NaN}', 400, "NaN"),
        ("temperature: 5e-324", c, _msg(m, temperature=5e-324, max_tokens=2), 200, "choices"),
        ("top_p: 1e-300", c, _msg(m, temperature=1.0, top_p=1e-300, max_tokens=2), 200, "choices"),
        ("stop of 1,000,000 characters", c, _msg(m, stop=["x" * 1_000_000]), 400, "at most 256"),
        ("five stop strings", c, _msg(m, stop=list("abcde")), 400, "at most 4"),
        ("stop [\"\"]", c, _msg(m, stop=[""], max_tokens=2), 200, "choices"),
        ("a 5,000-digit number", c, _msg(m)[:-1] + b', "max_tokens": ' + b"9" * 5000 + b"}", 400, "4300"),
        ("max_tokens 10**30", c, _msg(m, max_tokens=10**30), 400, "at most 8"),
        ("UTF-16 body", c, json.dumps(ok).encode("utf-16"), 400, "not UTF-8"),
        ("UTF-8 BOM", c, b"\xef\xbb\xbf" + json.dumps(ok).encode(), 400, "BOM"),
        ("invalid UTF-8", c, _msg(m).replace(b"hi", b"h\xff"), 400, "not UTF-8"),
        ("empty body", c, b"", 400, "not valid JSON"),
        ("a JSON array", c, b"[1, 2]", 400, "body"),
        ("null", c, b"null", 400, "body"),
        ("2 MiB body", c, _msg(m, "x" * (2 << 20)), 413, "limit"),
        ("prompt over the token limit", c, _msg(m, "word " * 2000), 400, "tokens"),
        ("only a system message", c, json.dumps({**ok, "messages": [{"role": "system", "content": "x"}]}).encode(),
         200, "choices"),
        ("only an assistant message", c, json.dumps({**ok, "messages": [{"role": "assistant", "content": "x"}]})
         .encode(), 200, "choices"),
        ("model is a path", c, _msg("../../../etc/passwd"), 404, "does not exist"),
        ("model of 100,000 characters", c, _msg("m" * 100_000), 404, "..."),
        ("unknown route", "/v1/embeddings", _msg(m), 404, "Not Found"),
        ("wrong method", "/v1/models", _msg(m), 405, "Method Not Allowed"),
    ]


def test_known_hostile_bodies_get_their_answer(fuzz_server: Server):
    s = fuzz_server
    cases = known_bodies(s.model)
    for name, path, raw, status, says in cases:
        t0 = time.monotonic()
        r = httpx.post(s.url + path, content=raw, headers={**s.headers, "Content-Type": "application/json"},
                       timeout=60)
        check_reply(r, name)
        assert (r.status_code, says in r.text) == (status, True), (name, r.status_code, r.text[:300])
        assert time.monotonic() - t0 < 10, name  # the million-character stop string stalled the worker 37 s
    TALLY["known bodies"] += len(cases)
    print(f"\nknown hostile bodies tried: {len(cases)}")
    still_serving(s)


# -------------------------------------------------------------------------------------------------------
# Raw HTTP: framing and header lies a client library would not send

def raw_exchange(s: Server, data: bytes, *, hang_up: bool, wait_s: float = 10.0) -> int | None:
    """Send `data` on a fresh connection (then hang up, or wait); the status of the first response, or
    None if none came (the server closed the connection, or still waits for the body it was promised)."""
    host, port = s.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        reply = b""
        try:
            sock.sendall(data)
            if hang_up:
                sock.shutdown(socket.SHUT_RDWR)
                return None
            while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
                reply += chunk
        except (TimeoutError, OSError):  # no answer in time, or closed on us mid-send (a header over its limit)
            pass
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.") else None


def raw_cases(s: Server) -> list[tuple[str, bytes, bool]]:
    body = _msg(s.model, max_tokens=2)
    auth = f"Authorization: Bearer {s.api_key}\r\n".encode()

    def post(headers: bytes, payload: bytes = body, path: bytes = b"/v1/chat/completions") -> bytes:
        return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + auth + headers + b"\r\n" + payload

    return [  # (name, bytes, hang up right after sending)
        ("Content-Length larger than the body, then hang up", post(b"Content-Length: 5000\r\n"), True),
        ("Content-Length larger than the body, connection kept open", post(b"Content-Length: 5000\r\n"), False),
        ("hang up after the headers", post(b"Content-Length: %d\r\n" % len(body), b""), True),
        ("Content-Length smaller than the body", post(b"Content-Length: 10\r\n"), False),
        ("Content-Length: abc", post(b"Content-Length: abc\r\n"), False),
        ("Content-Length: -5", post(b"Content-Length: -5\r\n"), False),
        ("Content-Length: superscript two", post(b"Content-Length: \xb2\r\n"), False),
        ("Content-Length of 5,000 digits", post(b"Content-Length: " + b"9" * 5000 + b"\r\n"), False),
        ("Content-Length over the body limit", post(b"Content-Length: 99999999999\r\n"), False),
        ("two different Content-Lengths", post(b"Content-Length: 5\r\nContent-Length: %d\r\n" % len(body)), False),
        ("Content-Length and chunked", post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                                            b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"), False),
        ("a bad chunk size", post(b"Transfer-Encoding: chunked\r\n", b"zz\r\n" + body + b"\r\n0\r\n\r\n"), False),
        ("a chunked body that stops early", post(b"Transfer-Encoding: chunked\r\n", b"ffff\r\n" + body), False),
        ("no Content-Length, no chunking", post(b""), False),
        ("a 100 KB header", post(b"Content-Length: %d\r\nX-Big: " % len(body) + b"a" * 100_000 + b"\r\n"), False),
        ("2,000 headers", post(b"Content-Length: %d\r\n" % len(body) + b"X-H: 1\r\n" * 2000), False),
        ("non-ASCII bytes in a header", post(b"Content-Length: %d\r\nX-Name: \xff\xfe\x80\r\n" % len(body)), False),
        ("a 100 KB URL", post(b"Content-Length: %d\r\n" % len(body), path=b"/v1/" + b"a" * 100_000), False),
        ("a NUL in the path", post(b"Content-Length: %d\r\n" % len(body), path=b"/v1/chat/completions%00"), False),
        ("a garbage request line", b"GARBAGE\r\n\r\n", False),
        ("HTTP/1.0 without Host", b"GET /health HTTP/1.0\r\n" + auth + b"\r\n", False),
        ("Expect: 100-continue", post(b"Content-Length: %d\r\nExpect: 100-continue\r\n" % len(body)), False),
        ("an unknown Transfer-Encoding", post(b"Transfer-Encoding: gzip\r\n"), False),
    ]


def test_raw_http_lies_never_get_a_5xx(fuzz_server: Server):
    s = fuzz_server
    cases = raw_cases(s)
    outcomes = {}
    for name, data, hang_up in cases:
        status = raw_exchange(s, data, hang_up=hang_up, wait_s=5.0)
        outcomes[name] = status
        assert status is None or status < 500, (name, status)
    TALLY["raw HTTP"] += len(cases)
    print("\nraw HTTP cases tried: " + json.dumps(outcomes, indent=1))
    still_serving(s)
