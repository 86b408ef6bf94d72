"""The engine's fast decoding (FastDecoder: prefill by generate, static cache, graphed step pieces)
answers what plain batching through `generate` answers, each request stopping at its own max_tokens.

On a CPU there is no CUDA graph to record; the decoder runs the same pieces eagerly
(tests/infer/test_fast_decoder.py compares it with `generate` token for token). bench/serve_speed.py runs
the graphed path on a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

from loraforge.serve.engine import Engine, Request, _merged


def _run(engine: Engine, prompts: list[list[int]], max_tokens: list[int]) -> list[Request]:
    reqs = [Request(adapter=next(iter(engine.adapters)), input_ids=p, max_tokens=m, temperature=0.0)
            for p, m in zip(prompts, max_tokens, strict=True)]
    for r in reqs:  # submitted together: one batch of 3
        engine.submit(r)
    deadline = time.monotonic() + 120
    while any(r.finish_reason is None for r in reqs) and time.monotonic() < deadline:
        time.sleep(0.05)
    return reqs


def test_streamed_text_of_one_request_is_merged_between_flushes() -> None:
    a, b = Request(adapter="x", input_ids=[], max_tokens=1), Request(adapter="x", input_ids=[], max_tokens=1)
    items = [(a, ("text", "He")), (b, ("text", "1")), (a, ("text", "llo")), (b, ("done", "stop")),
             (a, ("text", "!")), (a, ("done", "length")), (b, ("text", "late"))]
    assert _merged(items) == [(a, ("text", "Hello!")), (b, ("text", "1")), (b, ("done", "stop")),
                              (a, ("done", "length")), (b, ("text", "late"))]


def test_fast_decode_matches_plain_batching(served_runs: list[Path]) -> None:
    prompts = [[5, 17, 42, 7, 99, 3], [8, 8, 101, 12], list(range(20, 90))]
    max_tokens = [12, 5, 9]
    answers = {}
    for fast in (False, True):
        engine = Engine([served_runs[0]], max_batch=4, fast_decode=fast, device="cpu", batch_wait_s=0.2)
        try:
            reqs = _run(engine, prompts, max_tokens)
            assert all(r.finish_reason in ("length", "stop") for r in reqs), [r.finish_reason for r in reqs]
            answers[fast] = [r.tokens for r in reqs]
            assert list(engine.batch_sizes) == [3]
            assert (engine.decoder is not None) == fast
        finally:
            engine.close()
    assert answers[True] == answers[False]
    # each request stops at its own max_tokens
    assert all(0 < len(t) <= m for t, m in zip(answers[True], max_tokens, strict=True))


def test_a_request_arriving_mid_batch_joins_it_and_ends_first(served_runs: list[Path]) -> None:
    """Continuous batching: a short request submitted while a long one decodes starts at the next step
    (it does not wait for the long one to end), finishes first, and both answer what each would alone."""
    name = None
    alone = {}
    long_prompt, short_prompt = [5, 17, 42, 7, 99, 3, 11, 12], [8, 8, 101, 12]
    engine = Engine([served_runs[0]], max_batch=4, fast_decode=True, device="cpu", batch_wait_s=0.01)
    try:
        name = next(iter(engine.adapters))
        engine.model.generation_config.eos_token_id = None  # both run to max_tokens
        engine.eos_ids = set()
        for prompt, n in ((long_prompt, 60), (short_prompt, 6)):
            (r,) = _run(engine, [prompt], [n])
            alone[len(prompt)] = r.tokens
        long = Request(adapter=name, input_ids=long_prompt, max_tokens=60, temperature=0.0)
        short = Request(adapter=name, input_ids=short_prompt, max_tokens=6, temperature=0.0)
        engine.submit(long)
        deadline = time.monotonic() + 60
        while len(long.tokens) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        engine.submit(short)
        while short.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert short.finish_reason == "length" and long.finish_reason is None  # it did not wait for long
        while long.finish_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(engine.batch_sizes)[-2:] == [1, 2]  # long alone, then both rows decoding
        assert long.tokens == alone[len(long_prompt)] and short.tokens == alone[len(short_prompt)]
    finally:
        engine.close()


def test_incremental_detokenization_equals_full_decode(embedded_model_dir: Path) -> None:
    """Engine._detokenize (a short window per token) ends with exactly the full decode, never sends
    text it later takes back, on multi-byte characters (CJK, emoji) and spacing-sensitive text."""
    import random

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    engine = Engine.__new__(Engine)  # only the tokenizer is needed
    engine.tokenizer = tok
    texts = ["Hello,  world!\n\n  Indented ünïcödé — 東京タワー 🚀🎉 done.", "  a  b\tc\n", "naïve café 你好吗？"]
    rng = random.Random(0)
    texts.append(tok.decode([rng.randrange(len(tok)) for _ in range(200)], skip_special_tokens=True))
    for text in texts:
        req = Request(adapter="x", input_ids=[], max_tokens=10)
        seen = ""
        for t in tok(text, add_special_tokens=False)["input_ids"]:
            req.tokens.append(t)
            now = engine._detokenize(req)
            assert now.startswith(seen)  # only ever appended to
            seen = now
        full = tok.decode(req.tokens, skip_special_tokens=True)
        assert full.startswith(seen) and len(full) - len(seen) <= 8  # at most a held-back tail


def test_a_burst_arriving_over_several_milliseconds_is_one_batch(served_runs: list[Path]) -> None:
    import threading

    engine = Engine([served_runs[0]], max_batch=8, device="cpu", batch_wait_s=0.01, batch_wait_max_s=0.5)
    try:
        name = next(iter(engine.adapters))
        reqs = [Request(adapter=name, input_ids=[5, 6, 7 + i], max_tokens=2, temperature=0.0) for i in range(6)]

        def arrive():  # one request every 4 ms, as HTTP clients of a burst do
            for r in reqs:
                engine.submit(r)
                time.sleep(0.004)

        t = threading.Thread(target=arrive)
        t.start()
        t.join()
        deadline = time.monotonic() + 60
        while any(r.finish_reason is None for r in reqs) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(engine.batch_sizes) == [6]
    finally:
        engine.close()
