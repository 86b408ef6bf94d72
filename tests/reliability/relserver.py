"""A real `loraforge serve` process on 127.0.0.1, and a hostile, bounded load generator against it.

The load mixes valid chat/completion requests (streaming and not), malformed or over-limit ones that must
get their 4xx, and streams the client abandons mid-way. Every request is bounded by a client timeout and
the whole run by a wall-clock cap; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    api_key: str | None
    model: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs: list[Path], log: Path, *args: str, api_key: str | None = None, wait_s: float = 240) -> Server:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LORAFORGE_API_KEY", None)
    cmd = [sys.executable, "-m", "loraforge.cli", "serve", *map(str, runs), "--host", "127.0.0.1",
           "--port", str(port), *(["--api-key", api_key] if api_key else []), *args]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(f"{url}/health", headers=headers, timeout=2)
            if r.status_code == 200:
                return Server(url, proc, log, api_key, r.json()["models"][0])
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"server did not come up in {wait_s}s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, timeout: float = 40) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(30)
    return proc.returncode


def chat(model: str, text: str = "Say apple.", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


@dataclass
class Outcome:
    kind: str
    status: int
    seconds: float
    expected: tuple[int, ...]
    note: str = ""


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def by_status(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return dict(sorted(out.items()))

    @property
    def unexpected(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status not in o.expected]

    def latency(self, kinds: tuple[str, ...] = ("chat", "stream", "completion")) -> dict[str, float]:
        times = sorted(o.seconds for o in self.outcomes if o.kind in kinds and o.status == 200)
        if len(times) < 2:
            return {"p50_s": times[0] if times else 0.0, "p95_s": times[0] if times else 0.0}
        return {"p50_s": round(statistics.median(times), 3),
                "p95_s": round(statistics.quantiles(times, n=20, method="inclusive")[18], 3),
                "max_s": round(times[-1], 3)}

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for o in self.outcomes:
            kinds[o.kind] = kinds.get(o.kind, 0) + 1
        return {"requests": len(self.outcomes), "wall_s": round(self.wall_s, 2), "kinds": kinds,
                "statuses": self.by_status(), "5xx": sum(o.status >= 500 for o in self.outcomes),
                "unexpected": len(self.unexpected), **self.latency()}


def malformed(i: int, server: Server, limits: dict[str, int]) -> tuple[str, dict[str, Any], Any, tuple[int, ...]]:
    """(name, headers, body, expected statuses) of the i-th bad request; each must be refused with a 4xx."""
    m, h = server.model, server.headers
    cases: list[tuple[str, dict[str, Any], Any, tuple[int, ...]]] = [
        ("invalid-json", h, b'{"model": "x", "messages": [', (400, 422)),
        ("path-traversal-model", h, chat("../../../../etc/passwd"), (400, 404)),
        ("absolute-path-model", h, chat("/etc/passwd"), (400, 404)),
        ("no-messages", h, {"model": m}, (400, 422)),
        ("empty-messages", h, {"model": m, "messages": []}, (400, 422)),
        ("bad-role", h, {"model": m, "messages": [{"role": "wizard", "content": "hi"}]}, (400, 422)),
        ("content-not-text", h, {"model": m, "messages": [{"role": "user", "content": {"a": 1}}]}, (400, 422)),
        ("max-tokens-too-large", h, chat(m, max_tokens=limits["max_tokens"] + 1), (400,)),
        ("max-tokens-negative", h, chat(m, max_tokens=-5), (400, 422)),
        ("temperature-nan", h, b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
         % m.encode(), (400, 422)),
        ("prompt-too-long", h, chat(m, "word " * (limits["prompt_tokens"] + 50)), (400,)),
        ("not-an-object", h, [1, 2, 3], (400, 422)),
    ]
    if server.api_key:
        cases.insert(1, ("no-api-key", {}, chat(m), (401,)))
        cases.insert(4, ("wrong-api-key", {"Authorization": "Bearer nope"}, chat(m), (401,)))
    return cases[i % len(cases)]


async def one_request(client: httpx.AsyncClient, server: Server, i: int, limits: dict[str, int],
                      max_tokens: int) -> Outcome:
    m = server.model
    slot = i % 10
    t0 = time.perf_counter()
    try:
        if slot in (0, 1, 2):
            r = await client.post("/v1/chat/completions", json=chat(m, f"Say word {i}.", max_tokens=max_tokens,
                                                                    temperature=0 if i % 3 else 0.7),
                                  headers=server.headers)
            ok = r.status_code != 200 or r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            return Outcome("chat", r.status_code, time.perf_counter() - t0, (200,), "" if ok else r.text[:200])
        if slot == 3:
            r = await client.post("/v1/completions", json={"model": m, "prompt": f"Count to {i}:",
                                                           "max_tokens": max_tokens, "temperature": 0},
                                  headers=server.headers)
            return Outcome("completion", r.status_code, time.perf_counter() - t0, (200,))
        if slot in (4, 5, 6):
            async with client.stream("POST", "/v1/chat/completions", headers=server.headers,
                                     json=chat(m, f"Tell me about {i}.", max_tokens=max_tokens, stream=True,
                                               temperature=0)) as r:
                done, note = False, ""
                if r.status_code == 200:
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: ") and "error" in json.loads(line[6:]):
                            note = line[:200]
                else:
                    await r.aread()
            status = r.status_code if (done and not note) or r.status_code != 200 else 599
            return Outcome("stream", status, time.perf_counter() - t0, (200,), note or ("" if done else "no [DONE]"))
        if slot == 7:  # the client goes away after the first generated text
            async with client.stream("POST", "/v1/chat/completions", headers=server.headers,
                                     json=chat(m, f"Talk about {i}.", max_tokens=limits["max_tokens"],
                                               stream=True, temperature=0)) as r:
                if r.status_code == 200:
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                            break
            return Outcome("disconnect", r.status_code, time.perf_counter() - t0, (200,))
        name, headers, body, expected = malformed((i // 10) * 2 + slot - 8, server, limits)
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await client.post("/v1/chat/completions", content=content,
                              headers={**headers, "Content-Type": "application/json"})
        if r.status_code < 500 and r.status_code != 200:
            assert "error" in r.json(), r.text[:200]  # the OpenAI error shape
        return Outcome(f"bad:{name}", r.status_code, time.perf_counter() - t0, expected, r.text[:160])
    except httpx.HTTPError as e:
        return Outcome("transport-error", 0, time.perf_counter() - t0, (200,), f"{type(e).__name__}: {e}")


async def hostile_load(server: Server, *, requests: int, concurrency: int, limits: dict[str, int],
                       max_tokens: int = 12, request_timeout: float = 120, cap_s: float = 900) -> LoadReport:
    gate = asyncio.Semaphore(concurrency)
    report = LoadReport()
    async with httpx.AsyncClient(base_url=server.url, timeout=request_timeout) as client:
        async def guarded(i: int) -> Outcome:
            async with gate:
                return await one_request(client, server, i, limits, max_tokens)

        t0 = time.perf_counter()
        report.outcomes = list(await asyncio.wait_for(asyncio.gather(*(guarded(i) for i in range(requests))), cap_s))
        report.wall_s = time.perf_counter() - t0
    return report


async def burst(server: Server, n: int, max_tokens: int, timeout: float = 120) -> list[httpx.Response]:
    """`n` small requests at once (a capacity probe: all 200 when nothing is leaked)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, headers=server.headers) as client:
        return list(await asyncio.gather(*(client.post("/v1/chat/completions",
                                                       json=chat(server.model, max_tokens=max_tokens, temperature=0))
                                           for _ in range(n))))
