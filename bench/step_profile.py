"""Where `loraforge train`'s step goes beside the benchmark's fast path (issue 27): torch.profiler over three
steady steps of each, on the same shape and dropout, each in its own process.

    python bench/step_profile.py --tokenizer TOK --data ALPACA.jsonl --shape llama2-7b --dropout 0 --out DIR

`train`: `LLAMATrainer` on bench/train_e2e.py's config (packed Alpaca rows, logging every step), steps 21-23
profiled (the trainer's own loop; the profiler starts and stops between steps, after a device sync).
`bench`: bench/train_e2e.py's `bench` arm (random rows, no mask), three steps after five warm-up steps.
Writes step-profile-<shape>-dropout<p>.json: per arm the wall time and the summed GPU kernel time per step
(their difference is time the GPU waits for the host), and the kernels by GPU time per step; then the
kernels whose time differs most between the arms. For `train`, also every operation of the three steps before
those that made the host wait for the GPU (`host_syncs`, by call site, from torch's sync debug mode).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

STEPS = 3


def _summary(prof, wall_s: float) -> dict:
    from torch.autograd import DeviceType

    kernels: dict[str, list[float]] = {}
    host: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type == DeviceType.CUDA:
            k = kernels.setdefault(e.key[:110], [0.0, 0])
            k[0] += e.self_device_time_total / 1e3 / STEPS
            k[1] += e.count / STEPS
        elif e.self_cpu_time_total > 0:
            host[e.key[:80]] = host.get(e.key[:80], 0.0) + e.self_cpu_time_total / 1e3 / STEPS
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return {"wall_ms_per_step": round(wall_s * 1e3 / STEPS, 2),
            "gpu_kernel_ms_per_step": round(sum(v[0] for v in kernels.values()), 2),
            "kernels": [{"name": n, "ms_per_step": round(v[0], 3), "calls_per_step": round(v[1], 1)}
                        for n, v in top[:40]],
            "host_ops": [{"name": n, "ms_per_step": round(v, 3)}
                         for n, v in sorted(host.items(), key=lambda kv: -kv[1])[:25]]}


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


def profile_train(path: str, data: str, out: Path, p: float) -> dict:
    import torch
    from train_e2e import _config

    from loraforge.config import load_config
    from loraforge.train.trainer import LLAMATrainer

    cfg_path = _config(path, data, out / f"run-profile-{p:g}", p, 20 + STEPS + 1)
    trainer = LLAMATrainer.from_config(load_config(cfg_path))
    orig, state = LLAMATrainer._optimizer_step, {"n": 0, "prof": None, "t": 0.0}

    syncs: dict[str, int] = {}

    def step(self, *args, **kwargs):
        if state["n"] == 20 - STEPS:  # the sync watch slows the host: on the steps before the profiled ones
            state["watch"] = _watch_syncs(syncs)
        if state["n"] == 20:
            state["watch"]()
            torch.cuda.synchronize()
            state["prof"] = _profiler().__enter__()
            state["t"] = time.perf_counter()
        out = orig(self, *args, **kwargs)
        state["n"] += 1
        if state["n"] == 20 + STEPS:
            torch.cuda.synchronize()
            state["wall"] = time.perf_counter() - state["t"]
            state["prof"].__exit__(None, None, None)
        return out

    LLAMATrainer._optimizer_step = step
    trainer.train()
    sites = [{"where": k, "per_step": round(n / STEPS, 2)} for k, n in sorted(syncs.items(), key=lambda kv: -kv[1])]
    return {"arm": "loraforge-train", **_summary(state["prof"], state["wall"]), "host_syncs": sites}


def _watch_syncs(sites: dict[str, int]):
    """Count the operations that make the host wait for the GPU (torch's sync debug mode), by call site, until
    the returned function is called: in a steady step, each is GPU idle time while the host catches up."""
    import torch

    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-6:]))
        sites[where] = sites.get(where, 0) + 1

    warnings.simplefilter("always")
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")

    def stop() -> None:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = shown

    return stop


def profile_bench(path: str, p: float) -> dict:
    import torch
    from train_e2e import BATCH, SEQ, _random_batches

    from loraforge.bench.models import bench_run, build_loraforge, lora_params
    from loraforge.bench.speed import bench_step
    from loraforge.train.optim import fused_paged_adamw_32bit

    model, _ = build_loraforge(bench_run(path, 16, "all", lora_dropout=p), log=lambda _: None)
    params = list(lora_params(model).values())
    opt = fused_paged_adamw_32bit(params, lr=2e-4)
    batches = _random_batches(49152)
    for i in range(5):
        bench_step(model, opt, params, batches[i % len(batches)])
    torch.cuda.synchronize()
    with _profiler() as prof:
        t = time.perf_counter()
        for i in range(STEPS):
            bench_step(model, opt, params, batches[i % len(batches)])
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    return {"arm": "bench", "tokens_per_step": BATCH * SEQ, **_summary(prof, wall)}


def _diff(a: dict, b: dict) -> list[dict]:
    ka = {k["name"]: k["ms_per_step"] for k in a["kernels"]}
    kb = {k["name"]: k["ms_per_step"] for k in b["kernels"]}
    rows = [{"name": n, "train_ms": ka.get(n, 0.0), "bench_ms": kb.get(n, 0.0),
             "delta_ms": round(ka.get(n, 0.0) - kb.get(n, 0.0), 3)} for n in set(ka) | set(kb)]
    return sorted(rows, key=lambda r: -abs(r["delta_ms"]))[:20]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--child", choices=["train", "bench"])
    a = ap.parse_args()
    from loraforge.bench.models import make_checkpoint

    path = make_checkpoint(a.shape, tokenizer=a.tokenizer)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.child:
        rec = profile_train(path, a.data, a.out, a.dropout) if a.child == "train" else profile_bench(path, a.dropout)
        print("RECORD " + json.dumps(rec), flush=True)
        return
    recs = []
    for arm in ("bench", "train"):
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", arm], capture_output=True, text=True)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RECORD ")), None)
        recs.append(json.loads(line[7:]) if line else {"arm": arm, "error": (proc.stdout + proc.stderr)[-2000:]})
        print(json.dumps({k: v for k, v in recs[-1].items() if k not in ("kernels", "host_ops")})[:2500], flush=True)
    import torch

    from loraforge.bench.device import stamp

    result = {"shape": a.shape, "dropout": a.dropout, **stamp(torch.cuda.get_device_name()), "arms": recs}
    if all("kernels" in r for r in recs):
        result["train_minus_bench"] = _diff(recs[1], recs[0])
        for r in result["train_minus_bench"][:12]:
            print(f"{r['delta_ms']:+8.3f} ms  train {r['train_ms']:7.3f}  bench {r['bench_ms']:7.3f}  {r['name']}")
    path_out = a.out / f"step-profile-{a.shape}-dropout{a.dropout:g}.json"
    path_out.write_text(json.dumps(result, indent=1))
    print(f"wrote {path_out}")


if __name__ == "__main__":
    main()
