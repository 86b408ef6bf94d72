"""Speed benchmark: the stock QLoRA stack against loraforge's fast path, in one process.

`run_speed_bench(cases, out_dir)` is what `loraforge bench` and `bench/speed.py` call. Per model
setup (shape, rank, targets) it loads the stock model (peft's `prepare_model_for_kbit_training`,
fp32 upcasts included, non-reentrant checkpointing, paged AdamW 32-bit) and loraforge's model (built
as `loraforge train` builds it, models.build_loraforge: bf16, LoRA, the fast path and its CUDA graphs),
gives both the same LoRA weights (B random, so every grad is non-trivial), compares one step's loss and
grads, then times stock → fast → stock on each batch shape. Both models stay resident; each model's peak
is its own (the other model's resident bytes are subtracted, which is exact for allocated memory).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from loraforge.bench.device import device_tag, require_cuda, versions
from loraforge.bench.models import (
    bench_run,
    build_loraforge,
    build_stock,
    compare,
    load_loraforge,
    lora_params,
    make_checkpoint,
    sync_lora,
)
from loraforge.errors import ConfigError
from loraforge.kernels import _triton
from loraforge.kernels.graphs import pool_reserved_bytes
from loraforge.train.optim import fused_paged_adamw_32bit, paged_adamw_32bit

# case name -> (shape, r, targets, batch, seq)
CASES = {
    "llama2-7b-r16-all-4x512": ("llama2-7b", 16, "all", 4, 512),
    "llama2-7b-r16-all-2x2048": ("llama2-7b", 16, "all", 2, 2048),
    "llama2-7b-r8-qv-4x512": ("llama2-7b", 8, "qv", 4, 512),
    "llama3-8b-r16-all-4x512": ("llama3-8b", 16, "all", 4, 512),
}
H100_BF16_PEAK = 989e12
TOP_KERNELS = 40


def bench_step(model, opt, params, batch) -> torch.Tensor:
    """One step of the stock baseline's loop: forward with labels, backward, clip 0.3, optimizer step,
    zero_grad. Returns the loss (not synchronized)."""
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _time_steps(model, opt, batches, warm: int, steps: int, other_bytes: int, profile: bool):
    params = list(lora_params(model).values())
    torch.cuda.synchronize()
    walls, gpus = [], []
    for i in range(warm + steps):
        if i == warm:  # steady state only: CUDA-graph capture happens in the warm-up steps
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        x = batches[i % len(batches)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        start.record()
        loss = bench_step(model, opt, params, x)
        end.record()
        torch.cuda.synchronize()
        if i >= warm:
            walls.append(time.perf_counter() - t)
            gpus.append(start.elapsed_time(end) / 1e3)
    # Graph replays use their private pool's free blocks without the allocator seeing them: count
    # the pool's free bytes on top of the allocator's peak (an upper bound of the true peak).
    runner = getattr(model, "_loraforge_graphs", None)
    pool = 0
    if runner is not None and not runner.stats.disabled and not runner.paused:
        pool = pool_reserved_bytes(runner)
    out = {"step_s": statistics.median(walls), "event_s": statistics.median(gpus),
           "peak_gib": (torch.cuda.max_memory_allocated() - other_bytes + pool) / 2**30,
           "graph_pool_free_gib": pool / 2**30,
           "reserved_gib_approx": (torch.cuda.max_memory_reserved() - other_bytes) / 2**30,
           "loss": float(loss.detach())}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for x in batches[:2]:
                bench_step(model, opt, params, x)
            torch.cuda.synchronize()
        kern = sum(e.self_device_time_total for e in p.key_averages()) / 2 / 1e6
        out["kernel_s"] = kern
        # name, ms per step, launches per step: enough to see where the step goes, kernel by kernel
        out["top_kernels"] = [(e.key[:80], round(e.self_device_time_total / 2 / 1e3, 2), e.count // 2)
                              for e in sorted(p.key_averages(),
                                              key=lambda e: -e.self_device_time_total)[:TOP_KERNELS]]
    return out


def run_speed_bench(cases: list[str] | None, out_dir, *, warm: int = 3, steps: int = 20,
                    ablations: bool = True, profile: bool = True, graphs: bool = True,
                    diagnose: bool = False) -> list[dict]:
    """Times the stock stack and the fast path on each case; writes speed-<date>-<device>.{json,md}."""
    import bitsandbytes as bnb  # the stock side's optimizer; a GPU install has it

    cases = list(cases or CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ConfigError(f"unknown bench case(s) {unknown}; known: {sorted(CASES)}")
    require_cuda("the speed benchmark")
    device_name = torch.cuda.get_device_name(0)
    dev_tag = device_tag(device_name)
    date = _dt.date.today().isoformat()
    setups: dict[tuple, list[str]] = {}
    for c in cases:
        shape, r, targets, _, _ = CASES[c]
        setups.setdefault((shape, r, targets), []).append(c)

    results = []
    for (shape, r, targets), names in setups.items():
        path = make_checkpoint(shape)
        base0 = torch.cuda.memory_allocated()
        t0 = time.time()
        stock = build_stock(path, r, targets)
        stock_bytes = torch.cuda.memory_allocated() - base0
        fast, built = build_loraforge(bench_run(path, r, targets, cuda_graphs=graphs))
        summary = built["patch"]
        fast_bytes = torch.cuda.memory_allocated() - base0 - stock_bytes
        load_s = time.time() - t0
        print(json.dumps({"setup": [shape, r, targets], "patch": summary, "load_s": round(load_s, 1)}),
              flush=True)
        sync_lora(stock, fast)
        vocab = stock.config.vocab_size
        opt_s = bnb.optim.PagedAdamW32bit(list(lora_params(stock).values()), lr=2e-4)
        # the same optimizer (paged AdamW 32-bit, same math and states) as loraforge's trainer builds it
        opt_f = fused_paged_adamw_32bit(list(lora_params(fast).values()), lr=2e-4)
        n_params = sum(p.numel() for p in fast.parameters())
        n_params_real = _real_param_count(fast)
        for name in names:
            _, _, _, bs, seq = CASES[name]
            g = torch.Generator(device="cuda").manual_seed(0)
            batches = []
            for _ in range(4):
                ids = torch.randint(0, vocab, (bs, seq), device="cuda", generator=g)
                batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                "labels": ids})
            prof = profile and name == names[0]
            s1 = _time_steps(stock, opt_s, batches, warm, steps, fast_bytes, prof)
            f1 = _time_steps(fast, opt_f, batches, warm, steps, stock_bytes, prof)
            s2 = _time_steps(stock, opt_s, batches, warm, steps, fast_bytes, False)
            # Numerics after timing, so that the fast side runs as timed (graphs captured by now):
            # both models get the same LoRA weights again, then one step's loss and grads are compared.
            sync_lora(stock, fast)
            num = compare(stock, fast, batches[0])
            print(json.dumps({"case": name, **num}), flush=True)
            toks = bs * seq
            stock_best = min(s1["step_s"], s2["step_s"])
            row = {
                "case": name, "device": device_name, "date": date, "shape": shape, "r": r,
                "targets": targets, "batch": bs, "seq": seq, "warmup_steps": warm,
                "timed_steps": steps,
                "stock_tokens_per_s": round(toks / stock_best),
                "stock_tokens_per_s_runs": [round(toks / s1["step_s"]), round(toks / s2["step_s"])],
                "loraforge_tokens_per_s": round(toks / f1["step_s"]),
                "speedup_vs_faster_stock": round(stock_best / f1["step_s"], 3),
                "stock_step_s": [round(s1["step_s"], 4), round(s2["step_s"], 4)],
                "loraforge_step_s": round(f1["step_s"], 4),
                "stock_event_s": [round(s1["event_s"], 4), round(s2["event_s"], 4)],
                "loraforge_event_s": round(f1["event_s"], 4),
                "stock_peak_gib": round(max(s1["peak_gib"], s2["peak_gib"]), 3),
                "loraforge_peak_gib": round(f1["peak_gib"], 3),
                "stock_reserved_gib_approx": round(max(s1["reserved_gib_approx"],
                                                       s2["reserved_gib_approx"]), 3),
                "loraforge_reserved_gib_approx": round(f1["reserved_gib_approx"], 3),
                "mfu": round(6 * n_params_real * toks / f1["step_s"] / H100_BF16_PEAK, 4),
                "stock_mfu": round(6 * n_params_real * toks / stock_best / H100_BF16_PEAK, 4),
                "params": n_params_real, "params_stored": n_params,
                "loraforge_graph_pool_free_gib": round(f1["graph_pool_free_gib"], 3),
                "graphs": (fast._loraforge_graphs.summary() if hasattr(fast, "_loraforge_graphs") else None),
                **num, "patch": summary, "versions": versions(),
            }
            if prof:
                row["stock_kernel_s"] = round(s1["kernel_s"], 4)
                row["loraforge_kernel_s"] = round(f1["kernel_s"], 4)
                # what the step would reach if the GPU never waited for the CPU
                row["loraforge_kernel_bound_tokens_per_s"] = round(toks / f1["kernel_s"])
                row["stock_top_kernels"] = s1["top_kernels"]
                row["loraforge_top_kernels"] = f1["top_kernels"]
            if ablations and name == "llama2-7b-r16-all-4x512":
                row["ablations"] = _ablations(fast, opt_f, batches, warm, steps, stock_bytes, toks)
            if diagnose and name == "llama2-7b-r16-all-4x512":
                row["loraforge_diagnosis"] = _diagnose(fast, opt_f, batches, toks)
                row["stock_diagnosis"] = _diagnose(stock, opt_s, batches, toks)
                row["bf16_floor"] = _bf16_floor(path, r, targets, stock, batches[0])
            print(json.dumps({k: v for k, v in row.items() if "top_kernels" not in k
                              and "diagnosis" not in k}), flush=True)
            for k in ("loraforge_diagnosis", "stock_diagnosis"):
                if k in row:
                    print(k, json.dumps(row[k], indent=0), flush=True)
            results.append(row)
            _write(results, Path(out_dir), date, dev_tag)  # after every case: a cut-off run keeps its rows
        del stock, fast, opt_s, opt_f
        gc.collect()
        torch.cuda.empty_cache()
        _triton.ENABLED.update(dequant=True, swiglu=True, rmsnorm=True, rope=True)
    return results


def _bf16_floor(path, r, targets, stock, batch) -> dict:
    """The stock stack without the fp32 upcast (loraforge's build, unpatched) against the stock
    stack: how far bf16 frozen weights alone move the grads, i.e. the tolerance to judge by."""
    plain = load_loraforge(bench_run(path, r, targets))
    sync_lora(stock, plain)
    res = compare(stock, plain, batch)
    del plain
    gc.collect()
    torch.cuda.empty_cache()
    return {k: v for k, v in res.items() if k != "n_lora_params"}


def _real_param_count(model) -> int:
    """Parameters of the unquantized model (a 4-bit Params4bit stores two per byte)."""
    n = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            k = 1
            for s in qs.shape:
                k *= s
            n += k
        else:
            n += p.numel()
    return n


def _diagnose(model, opt, batches, toks) -> dict:
    """Wall time per phase (synchronized) and the top CPU-side ops of one fast-path step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    params = list(lora_params(model).values())
    phases = {"forward": [], "backward": [], "clip": [], "optimizer": []}
    for i in range(6):
        x = batches[i % len(batches)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**x).loss
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        if i >= 2:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[k].append(dt)
    out = {k: round(statistics.median(v), 4) for k, v in phases.items()}
    with prof(activities=[ProfilerActivity.CPU]) as p:
        x = batches[0]
        model(**x).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    ka = p.key_averages()
    out["cpu_total_s"] = round(sum(e.self_cpu_time_total for e in ka) / 1e6, 4)
    out["cpu_top"] = [(e.key[:70], e.count, round(e.self_cpu_time_total / 1e3, 1))
                      for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:25]]
    return out


def _ablations(fast, opt, batches, warm, steps, other_bytes, toks) -> dict:
    """The fast path's tokens/s with one part swapped at a time (same model, same run): the CUDA graphs
    paused, and the optimizer replaced by torch's fused AdamW (unpaged states), by loraforge's one-sync
    paged AdamW and by bitsandbytes' own (one launch, prefetch and device sync per parameter).

    (Per-kernel Triton ablations were measured before the graphs, bench/NOTES.md: a captured graph
    replays its kernels whatever `_triton.ENABLED` says later, so they are not repeated here.)"""
    import bitsandbytes as bnb  # the stock side's optimizer; a GPU install has it

    def timed(optimizer) -> dict:
        r = _time_steps(fast, optimizer, batches, warm, steps, other_bytes, False)
        return {"tokens_per_s": round(toks / r["step_s"]), "event_s": round(r["event_s"], 4),
                "peak_gib": round(r["peak_gib"], 3)}

    out = {"all_on": timed(opt)}
    runner = getattr(fast, "_loraforge_graphs", None)
    if runner is not None:  # the same kernels launched one by one: what the graphs buy
        runner.paused = True
        out["no_cuda_graphs"] = timed(opt)
        runner.paused = False
    params = list(lora_params(fast).values())
    out["torch_fused_adamw"] = timed(torch.optim.AdamW(params, lr=2e-4, fused=True))
    out["one_sync_paged_adamw"] = timed(paged_adamw_32bit(params, lr=2e-4))
    out["bnb_paged_adamw"] = timed(bnb.optim.PagedAdamW32bit(params, lr=2e-4))
    return out


def _write(results: list[dict], out_dir: Path, date: str, dev_tag: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"speed-{date}-{dev_tag}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = ["| case | stock tok/s (runs) | loraforge tok/s | speedup | stock peak GiB | "
             "loraforge peak GiB | MFU stock → loraforge | loss stock / loraforge | max rel grad diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['stock_tokens_per_s']:,} "
            f"({', '.join(f'{x:,}' for x in r['stock_tokens_per_s_runs'])}) "
            f"| {r['loraforge_tokens_per_s']:,} | {r['speedup_vs_faster_stock']:.2f}× "
            f"| {r['stock_peak_gib']:.2f} | {r['loraforge_peak_gib']:.2f} "
            f"| {r['stock_mfu']:.1%} → {r['mfu']:.1%} | {r['stock_loss']:.4f} / {r['loraforge_loss']:.4f} "
            f"| {r['max_rel_grad_diff']:.2e} |")
    if results:
        r = results[0]
        lines += ["", f"Device: {r['device']}; {r['date']}; versions: {r['versions']}.",
                  f"{r['warmup_steps']} warm-up + {r['timed_steps']} timed steps, median wall time;"
                  " speedup is against the faster of the two stock runs (before and after loraforge)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
