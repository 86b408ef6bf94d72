"""16 concurrent streams through `loraforge serve` against stock batch-16 `generate()`, same model, same run.

    python bench/serve_speed.py [--out bench/results] [--streams 16] [--new-tokens 128]

Model: Llama-2-7B shape with random bf16 weights (a merged bf16 fine-tune, to the GPU) and SmolLM2's
tokenizer (prepared by `bench/model_gpu_check.py --prepare`), the folder bench/train_gpu_check.py writes.
Prompts: 128 random tokens each. Greedy.

1. Stock: `model.generate` on the 16 prompts as one left-padded batch, and on one prompt alone (dynamic
   cache, eager), EOS disabled so every row makes exactly --new-tokens tokens.
2. loraforge's decoder in-process (`loraforge.infer.fast_decode.FastDecoder`, what the server runs) on the
   same prompts: tokens/s and the tokens themselves, compared with stock's token for token.
3. The server: `loraforge serve MODEL --max-concurrency 16` in a subprocess (fast decoding on). One warm-up
   round captures the graphs, then 16 clients send `/v1/completions` at once (text prompts, max_tokens=
   --new-tokens, temperature 0); aggregate tokens/s = completion tokens / wall time from first send to
   last answer. One client alone as well. Each completion's text against the stock text of its prompt.
4. Staggered arrivals (continuous batching): --staggered requests, one every --gap-s seconds, max_tokens
   cycling through 16/64/128, streamed; time to first token, latency and throughput, and the most rows
   that decoded together (/health's largest_batch).

Writes generate-server-<date>-<device>.json with `case`, `stock_tokens_per_s`, `loraforge_tokens_per_s`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def stock_generate(model, prompts, new_tokens):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t, out[:, width:].tolist()


def exact_length_prompts(tok, n: int, length: int, bad: set, g) -> tuple[list[str], list[list[int]]]:
    """n text prompts that encode to exactly `length` tokens, the same ids the server will encode them to.

    The API takes text, so the prompts must survive decode → encode. Random ids do not (BPE re-merges them,
    giving rows of different lengths, hence left padding — and with a padding mask stock `generate` itself
    may not be bit-reproducible run to run: `padded_stock_reproducible_rows` in the report checks). Words of
    the form " abc" that are single tokens concatenate back into the same ids."""
    import re

    import torch

    words = [i for i in range(len(tok)) if i not in bad and re.fullmatch(r" [a-z]{3,9}", tok.decode([i]))]
    texts, prompts = [], []
    while len(prompts) < n:
        row = [words[int(j)] for j in torch.randint(0, len(words), (length,), generator=g)]
        text = tok.decode(row, skip_special_tokens=True)
        ids = tok(text)["input_ids"]
        if len(ids) == length:
            texts.append(text)
            prompts.append(ids)
    return texts, prompts


def until_eos(ids: list[int], eos: set) -> list[int]:
    """The tokens a server returns: up to (not including) the first EOS. Stock is timed with EOS suppressed
    (min_new_tokens) so that every row makes all its tokens; equality is judged on what both produce."""
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


def decoder_in_process(model, prompts, stock16, stock1, new_tokens, eos: set) -> list[dict]:
    """FastDecoder on the stock model object: decode speed without HTTP, and greedy tokens vs stock's."""
    import torch

    from loraforge.infer.fast_decode import FastDecoder

    dec = FastDecoder(model, max_rows=len(prompts))
    rows = []
    for ps, ref in ((prompts, stock16), (prompts[:1], stock1)):
        width = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        list(dec.stream(ids, mask, new_tokens))  # captures this row count's graphs
        best, got = None, None
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            steps = list(dec.stream(ids, mask, new_tokens))
            torch.cuda.synchronize()
            dt_ = time.perf_counter() - t
            if best is None or dt_ < best:
                best, got = dt_, [list(c) for c in zip(*steps, strict=True)]
        got = [until_eos(x, eos) for x in got]
        ref = [r[: len(x)] for x, r in zip(got, ref, strict=True)]
        same = sum(x == r for x, r in zip(got, ref, strict=True))
        first = [next((i for i, (x, y) in enumerate(zip(gg, r, strict=True)) if x != y), None)
                 for gg, r in zip(got, ref, strict=True)]
        rows.append({"case": f"fast-decoder-in-process-{len(ps)}-rows", "loraforge_tokens_per_s":
                     round(len(ps) * new_tokens / best, 1), "wall_s": round(best, 4),
                     "identical_greedy_rows": f"{same}/{len(ps)}", "first_divergent_token": first})
        print(rows[-1], flush=True)
    del dec
    torch.cuda.empty_cache()
    return rows


def staggered(client, url: str, model_name: str, texts: list[str], n: int, gap_s: float) -> dict:
    """n streamed requests, one every gap_s seconds, max_tokens cycling 16/64/128: with continuous
    batching a request starts decoding at the next step, whatever the rows ahead of it still have to do."""
    import threading

    results: list[dict] = [{} for _ in range(n)]
    start = time.perf_counter()

    def one(i: int) -> None:
        body = {"model": model_name, "prompt": texts[i % len(texts)], "max_tokens": (16, 64, 128)[i % 3],
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first, tokens = None, 0
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        results[i] = {"ttft_s": first, "latency_s": time.perf_counter() - t0, "tokens": tokens}

    threads = []
    for i in range(n):
        time.sleep(max(0.0, start + i * gap_s - time.perf_counter()))
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)

    ttft = [r["ttft_s"] for r in results if r.get("ttft_s") is not None]
    lat = [r["latency_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": n, "gap_s": gap_s, "max_tokens_cycle": [16, 64, 128], "wall_s": round(wall, 2),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95), "ttft_max_s": pct(ttft, 1.0),
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
            "largest_batch": client.get(url + "/health").json()["largest_batch"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--staggered", type=int, default=48, help="requests of the staggered-arrival phase (0: skip)")
    ap.add_argument("--gap-s", type=float, default=0.1, help="seconds between two staggered arrivals")
    a = ap.parse_args(argv)
    import httpx
    import torch
    from train_gpu_check import make_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = make_model()
    g = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0}).eval()
    eos = model.generation_config.eos_token_id
    bad = set(eos if isinstance(eos, list) else [eos]) | {0}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts, prompts = exact_length_prompts(tok, a.streams, a.prompt_len, bad, g)
    stock_generate(model, prompts[:2], 8)  # warm-up
    # Is stock generate itself reproducible on a left-padded batch (rows of 100..128 tokens)?
    padded = [p[: a.prompt_len - (i * 7) % 29] for i, p in enumerate(prompts)]
    padded_runs = [stock_generate(model, padded, 48)[1] for _ in range(2)]
    padded_same = sum(x == y for x, y in zip(*padded_runs, strict=True))
    runs16 = [stock_generate(model, prompts, a.new_tokens) for _ in range(2)]
    stock16_same = sum(x == y for x, y in zip(runs16[0][1], runs16[1][1], strict=True))
    t16, stock16 = min(runs16, key=lambda r: r[0])
    t1, stock1 = min((stock_generate(model, prompts[:1], a.new_tokens) for _ in range(2)), key=lambda r: r[0])
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    in_process = decoder_in_process(model, prompts, stock16, stock1, a.new_tokens, eos_ids)
    del model
    torch.cuda.empty_cache()

    log = out_dir / "serve-bench-server.log"
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "loraforge.cli", "serve", str(path), "--port", str(a.port),
                             "--max-concurrency", str(a.streams), "--max-tokens-limit", str(a.new_tokens),
                             "--timeout", "600"], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{a.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.5)
        model_name = httpx.get(url + "/v1/models").json()["data"][0]["id"]

        # One client, as OpenAI SDK users hold one: a fresh httpx client per request costs ~20 ms of GIL
        # (SSL context set-up) and spread a burst of 16 over 2 batches in the first runs.
        client = httpx.Client(timeout=900, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

        def ask(p):
            r = client.post(url + "/v1/completions", json={
                "model": model_name, "prompt": p, "max_tokens": a.new_tokens, "temperature": 0})
            r.raise_for_status()
            body = r.json()
            return body["choices"][0]["text"], body["usage"]["completion_tokens"]

        def round_(ps):
            t = time.perf_counter()
            with ThreadPoolExecutor(len(ps)) as pool:
                res = list(pool.map(ask, ps))
            return time.perf_counter() - t, res

        warm_t = time.perf_counter()
        round_(texts)  # compiles the 16-row bucket
        round_(texts[:1])  # and the 1-row bucket
        warm_s = time.perf_counter() - warm_t
        batches0 = httpx.get(url + "/health").json()["batches"]
        s16, res16 = min((round_(texts) for _ in range(2)), key=lambda r: r[0])
        batches16 = (httpx.get(url + "/health").json()["batches"] - batches0) / 2  # per round of 16
        s1, res1 = min((round_(texts[:1]) for _ in range(2)), key=lambda r: r[0])
        stagger = staggered(client, url, model_name, texts, a.staggered, a.gap_s) if a.staggered else None
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    def match(stock_rows, served):
        same, first_div = 0, []
        for ids, (text, n) in zip(stock_rows, served, strict=True):
            ref = tok.decode(ids[:n], skip_special_tokens=True)  # n < new_tokens only if the server hit EOS
            same += ref == text
            k = next((i for i, (x, y) in enumerate(zip(ref, text, strict=False)) if x != y), min(len(ref), len(text)))
            first_div.append(k if ref != text else None)
        return same, first_div

    same16, div16 = match(stock16, res16)
    same1, div1 = match(stock1, res1)
    dev = torch.cuda.get_device_name(0)
    tokens16 = sum(n for _, n in res16)
    rows = [
        {"case": f"server-{a.streams}-streams-vs-stock-batch-{a.streams}", "device": dev,
         "stock_tokens_per_s": round(a.streams * a.new_tokens / t16, 1),
         "loraforge_tokens_per_s": round(tokens16 / s16, 1),
         "speedup": round((tokens16 / s16) / (a.streams * a.new_tokens / t16), 2),
         "completion_tokens": tokens16, "wall_s": round(s16, 3), "stock_s": round(t16, 3),
         "server_admissions_per_round": batches16,
         "identical_greedy_rows": f"{same16}/{a.streams}", "first_divergence_char": div16},
        {"case": "server-1-stream-vs-stock-batch-1", "device": dev,
         "stock_tokens_per_s": round(a.new_tokens / t1, 1), "loraforge_tokens_per_s": round(res1[0][1] / s1, 1),
         "speedup": round((res1[0][1] / s1) / (a.new_tokens / t1), 2), "wall_s": round(s1, 3), "stock_s": round(t1, 3),
         "identical_greedy_rows": f"{same1}/1", "first_divergence_char": div1},
    ]
    for r in in_process:
        stock = rows[0] if r["case"].endswith(f"-{a.streams}-rows") else rows[1]
        r.update(device=dev, stock_tokens_per_s=stock["stock_tokens_per_s"],
                 speedup=round(r["loraforge_tokens_per_s"] / stock["stock_tokens_per_s"], 2))
    rows += in_process
    from loraforge.bench.device import versions

    report = {"date": dt.date.today().isoformat(), "device": dev, "versions": versions(), "warmup_s": round(warm_s, 1),
              "padded_stock_reproducible_rows": f"{padded_same}/{len(padded)}",
              "stock_batch_reproducible_rows": f"{stock16_same}/{len(prompts)}",
              "prompt_tokens": a.prompt_len, "new_tokens": a.new_tokens, "results": rows,
              "staggered_arrivals": stagger}
    from loraforge.bench.device import device_tag

    tag = device_tag(dev)
    (out_dir / f"generate-server-{report['date']}-{tag}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
