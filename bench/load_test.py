"""A bounded load test for `loraforge serve`: N requests, C at a time, a mix of streaming and not.

    python bench/load_test.py --url http://127.0.0.1:8000 --model demo --requests 64 --concurrency 8

Prints (and returns) throughput and latency percentiles; any failed request is counted and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx


async def _one(client: httpx.AsyncClient, i: int, model: str, max_tokens: int) -> tuple[float, int, str | None]:
    stream = i % 2 == 1
    body = {"model": model, "messages": [{"role": "user", "content": f"Say word number {i}."}],
            "max_tokens": max_tokens, "temperature": 0 if i % 3 else 0.7, "stream": stream}
    start = time.perf_counter()
    tokens = 0
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return time.perf_counter() - start, 0, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                done = False
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            return time.perf_counter() - start, tokens, event["error"]["message"]
                        tokens += bool(event["choices"][0]["delta"].get("content"))
                if not done:
                    return time.perf_counter() - start, tokens, "stream ended without [DONE]"
        else:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return time.perf_counter() - start, 0, f"HTTP {r.status_code}: {r.text[:200]}"
            tokens = r.json()["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return time.perf_counter() - start, tokens, f"{type(e).__name__}: {e}"
    return time.perf_counter() - start, tokens, None


async def run_load_test(url: str, model: str, *, requests: int = 64, concurrency: int = 8, max_tokens: int = 16,
                        api_key: str | None = None, timeout: float = 300.0) -> dict[str, Any]:
    """Send `requests` chat completions, `concurrency` in flight at once; return the figures."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        async def guarded(i: int) -> tuple[float, int, str | None]:
            async with gate:
                return await _one(client, i, model, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(requests)))
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    errors = [r[2] for r in results if r[2]]
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens, "errors": len(errors),
            "first_errors": errors[:3], "wall_s": round(wall, 2), "requests_per_s": round(requests / wall, 2),
            "completion_chunks_or_tokens": sum(r[1] for r in results),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(q[18], 3),
            "max_s": round(latencies[-1], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--api-key")
    a = ap.parse_args()
    print(json.dumps(asyncio.run(run_load_test(a.url, a.model, requests=a.requests, concurrency=a.concurrency,
                                               max_tokens=a.max_tokens, api_key=a.api_key)), indent=1))


if __name__ == "__main__":
    main()
