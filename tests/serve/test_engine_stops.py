"""Stop strings: the engine ends an answer at the first stop string, never sends any part of one, and
searches only new text each token (linear time: a long stop string stalled the worker for 37 s)."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from loraforge.serve.engine import Engine, Request, find_stop, stop_prefix_len


class CharTokenizer:
    """One token per character (token id = code point): the engine's decoding, without a model."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def fed(text: str, stops: list[str], max_tokens: int = 10**9) -> tuple[Request, list[str]]:
    """`text` generated one character per step through Engine._advance; the request and its text events."""
    engine = Engine.__new__(Engine)  # only what _advance uses: no model is loaded
    engine.tokenizer, engine.eos_ids = CharTokenizer(), set()
    req = Request(adapter="x", input_ids=[1], max_tokens=max_tokens, stop=stops)
    req.loop, req.events, req.outbox = object(), object(), []  # with an outbox, post() only collects events
    for ch in text:
        if req.finish_reason is not None:
            break
        engine._advance(req, ord(ch))
    if req.finish_reason is None:
        engine._finish(req, "length")
    return req, [event[1] for _, event in req.outbox if event[0] == "text"]


def test_the_answer_ends_before_the_first_stop_and_no_part_of_one_is_sent() -> None:
    req, pieces = fed("Hello there. User: hi again. END", ["User:", "END", "er"])
    assert "".join(pieces) == "Hello th" and req.finish_reason == "stop"  # "er" comes first
    req, pieces = fed("one two three", ["two", "one two"])
    assert "".join(pieces) == "" and req.finish_reason == "stop"  # the earliest start wins, whatever its order
    req, pieces = fed("abcabd", ["abd"])
    assert "".join(pieces) == "abc" and all("ab" != p[-2:] for p in pieces[:-1])
    for i in range(1, 4):  # each prefix of the stop that was held back is sent once the answer ends without it
        req, pieces = fed("xx" + "STOP"[:i], ["STOP"])
        assert "".join(pieces) == "xx" + "STOP"[:i] and req.finish_reason == "length"


def test_max_tokens_sends_the_held_back_tail() -> None:
    req, pieces = fed("hello wor", ["world"], max_tokens=9)
    assert "".join(pieces) == "hello wor" and req.finish_reason == "length"


@settings(max_examples=60, derandomize=True, deadline=None)
@given(text=st.text("ab\n", max_size=40), stops=st.lists(st.text("ab\n", min_size=1, max_size=5), min_size=1,
                                                         max_size=4))
def test_incremental_search_finds_what_a_full_search_finds(text: str, stops: list[str]) -> None:
    searched = 0
    for end in range(1, len(text) + 1):
        part = text[:end]
        at = find_stop(part, stops, searched)
        searched = end
        whole = min((i for s in stops if (i := part.find(s)) >= 0), default=-1)
        assert at == whole, (part, stops)
        if at >= 0:
            break
        assert stop_prefix_len(part, stops) == max(
            (k for s in stops for k in range(1, len(s)) if part.endswith(s[:k])), default=0)


def test_stop_search_is_linear_in_the_answer() -> None:
    # Four 256-character stops (the server's cap) that keep almost matching: each step holds back 255
    # characters. The old search (all text, every prefix of every stop at every step) took ~10 s here.
    stops = ["a" * 255 + c for c in "bcde"]
    t0 = time.perf_counter()
    req, pieces = fed("a" * 20_000, stops)
    assert time.perf_counter() - t0 < 3.0
    assert "".join(pieces) == "a" * 20_000 and req.finish_reason == "length"
    t0 = time.perf_counter()
    req, _ = fed("x" * 2000, ["y" * 1_000_000])  # a huge stop costs nothing per token (the server caps it)
    assert time.perf_counter() - t0 < 1.0
