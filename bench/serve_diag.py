"""Where the server's decode time goes: the same model and shapes through plain `generate`, through
`generate` with the server's streamer and stopping criterion, and through the Engine in-process.

    python bench/serve_diag.py [--out bench/results]

Diagnostic for bench/serve_speed.py (16 streams through the server ran far below what the static-cache
compiled `generate` does on its own). Prints and writes serve-diag-<date>-<device>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    import torch
    from train_gpu_check import make_model
    from transformers import CompileConfig, StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    from loraforge.infer.load import load
    from loraforge.serve.engine import Engine, Request

    path = make_model()
    loaded = load(path)
    model, tok = loaded.model, loaded.tokenizer
    out: dict = {"dtype": str(next(model.parameters()).dtype), "model_class": type(model).__name__}
    g = torch.Generator().manual_seed(0)
    width, new = 192, 128

    def batch(n):
        ids = torch.randint(3, 32000, (n, width), generator=g).cuda()
        return ids, torch.ones_like(ids)

    class Streamer(BaseStreamer):
        def put(self, value):
            value.reshape(-1).tolist()

        def end(self):
            pass

    class Never(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    fast = dict(cache_implementation="static",
                compile_config=CompileConfig(fullgraph=False, mode="reduce-overhead", dynamic=False))

    def gen(n, extra, label, thread=False):
        ids, mask = batch(n)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **fast, **extra)
        res = {}

        def run():
            for i in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=mask, **kw)
                torch.cuda.synchronize()
                res[i] = time.perf_counter() - t

        if thread:
            th = threading.Thread(target=run)
            th.start()
            th.join()
        else:
            run()
        out[label] = {"s": [round(res[i], 3) for i in range(3)], "tokens_per_s": round(n * new / res[2], 1)}
        print(label, out[label], flush=True)

    gen(1, {}, "generate_bs1")
    gen(16, {}, "generate_bs16")
    gen(1, dict(streamer=Streamer(), stopping_criteria=StoppingCriteriaList([Never()])), "generate_bs1_streamer")
    gen(16, dict(streamer=Streamer(), stopping_criteria=StoppingCriteriaList([Never()])), "generate_bs16_streamer")
    gen(16, {}, "generate_bs16_thread", thread=True)
    del loaded
    eng = Engine([str(path)], max_batch=16, batch_wait_s=0.05)
    eng.model, eng.tokenizer = model, tok
    for label, n in (("engine_bs16", 16), ("engine_bs1", 1), ("engine_bs16_again", 16)):
        name = next(iter(eng.adapters))
        reqs = [Request(adapter=name, input_ids=torch.randint(3, 32000, (150,), generator=g).tolist(),
                        max_tokens=new, temperature=0.0) for _ in range(n)]
        t = time.perf_counter()
        for r in reqs:
            eng.submit(r)
        while any(r.finish_reason is None for r in reqs):
            time.sleep(0.002)
        s = time.perf_counter() - t
        out[label] = {"s": round(s, 3), "tokens": sum(len(r.tokens) for r in reqs),
                      "tokens_per_s": round(sum(len(r.tokens) for r in reqs) / s, 1),
                      "batch_sizes": list(eng.batch_sizes)[-4:]}
        print(label, out[label], flush=True)
    eng.close()
    from loraforge.bench.device import versions

    out.update(device=torch.cuda.get_device_name(0), date=dt.date.today().isoformat(), versions=versions())
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"serve-diag-{dt.date.today().isoformat()}-h100.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
