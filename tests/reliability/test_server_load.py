"""`loraforge serve` under a bounded, hostile load on 127.0.0.1.

Mixed traffic: chat and completion requests, streaming and not, malformed and over-limit requests (each
must get its 4xx), and streams abandoned after the first token. Proven: no 5xx and no transport error;
every bad request gets the status it should; afterwards the queue has its full capacity (no request
leaked) and the server's RSS has not grown beyond a bound. p50/p95 latency is printed.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import API_KEY, LOAD, _server_args
from relserver import Server, burst, hostile_load, start_server, stop_server


def check_load(server: Server, limits: dict, *, requests: int, concurrency: int, rss_growth_mib: float) -> dict:
    warm = asyncio.run(burst(server, 4, max_tokens=4))  # first batches allocate caches: measure after them
    assert [r.status_code for r in warm] == [200] * 4
    rss_before = server.rss_mib()
    report = asyncio.run(hostile_load(server, requests=requests, concurrency=concurrency, limits={
        "max_tokens": limits["max_tokens"], "prompt_tokens": limits["prompt_tokens"]}))
    summary = report.summary()
    # Capacity probe: as many requests as may wait in the queue, at once. A request leaked by the load
    # (never finished, never cancelled) would still hold a place, and some of these would get a 429.
    probe = [r.status_code for r in asyncio.run(burst(server, 4 * limits["concurrency"], max_tokens=2))]
    rss_after = server.rss_mib()
    summary.update(rss_before_mib=round(rss_before, 1), rss_after_mib=round(rss_after, 1), probe_ok=probe.count(200))
    print("\nRELIABILITY LOAD " + json.dumps(summary))
    assert not report.unexpected, [(o.kind, o.status, o.note) for o in report.unexpected[:5]]
    assert summary["5xx"] == 0
    assert probe == [200] * len(probe), probe
    assert rss_after - rss_before < rss_growth_mib, summary
    return summary


def test_short_hostile_load_on_the_tiny_model(load_server: Server):
    check_load(load_server, LOAD, requests=60, concurrency=8, rss_growth_mib=64)


@pytest.mark.long
def test_long_hostile_load_on_the_embedded_model(embedded_model_dir: Path, tmp_path: Path):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))
    from lora_runs import make_lora_run

    run = make_lora_run(tmp_path / "smollm2-chat", "smollm2-135m-instruct", scale=0.002)
    limits = {"max_tokens": 64, "prompt_tokens": 400, "timeout": 300.0, "concurrency": 8}
    server = start_server([run], tmp_path / "serve.log", *_server_args(limits), api_key=API_KEY)
    try:
        check_load(server, limits, requests=500, concurrency=32, rss_growth_mib=160)
    finally:
        assert stop_server(server.proc) in (0, -15)
