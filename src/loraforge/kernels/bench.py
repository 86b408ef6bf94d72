"""Speed benchmark: the stock QLoRA stack against loraforge's fast path, in one process.

`run_speed_bench(cases, out_dir)` is what `loraforge bench` and `bench/speed.py` call. Per model
setup (shape, rank, targets) it loads the stock model (peft's `prepare_model_for_kbit_training`,
fp32 upcasts included, non-reentrant checkpointing, paged AdamW 32-bit) and the fast model (built
as loraforge builds it: bf16, peft, checkpointing, then `patch_model`), gives both the same LoRA
weights (B random, so every grad is non-trivial), compares one step's loss and grads, then times
stock → fast → stock on each batch shape. Both models stay resident; each model's peak is its
own (the other model's resident bytes are subtracted, which is exact for allocated memory).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 max_position_embeddings=1024),
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]
# case name -> (shape, r, targets, batch, seq)
CASES = {
    "llama2-7b-r16-all-4x512": ("llama2-7b", 16, "all", 4, 512),
    "llama2-7b-r16-all-2x2048": ("llama2-7b", 16, "all", 2, 2048),
    "llama2-7b-r8-qv-4x512": ("llama2-7b", 8, "qv", 4, 512),
    "llama3-8b-r16-all-4x512": ("llama3-8b", 16, "all", 4, 512),
}
H100_BF16_PEAK = 989e12
ROOT = os.environ.get("LORAFORGE_BENCH_CKPT", "/dev/shm/loraforge-ckpt")


def device_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the device part of a results file name."""
    return "cpu" if name == "cpu" else name.replace("NVIDIA ", "").split()[0].lower()


def require_cuda(what: str) -> None:
    """The GPU benchmarks measure a GPU: say so plainly where there is none."""
    from loraforge.errors import ResourceError

    if not torch.cuda.is_available():
        raise ResourceError(f"{what} needs a CUDA GPU and none is visible here (torch {torch.__version__}). "
                            "Run it on a GPU machine; the CPU smoke runs are bench/context.py --tiny --device cpu "
                            "and the tests.")


def make_checkpoint(shape: str, root: str = ROOT, device: str = "cuda") -> str:
    """Random bf16 weights of the real shape, written once (the stock baseline does the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = f"{root}/{shape}"
    if os.path.exists(f"{path}/config.json"):
        return path
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    with torch.device(device):
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path, max_shard_size="50GB")
    del m
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def build_model(path: str, r: int, targets: str, *, stock: bool, device: str = "cuda",
                quant: bool = True):
    """The stock QLoRA stack (stock=True) or loraforge's build before `patch_model`."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(dtype=torch.bfloat16, device_map={"": 0 if device == "cuda" else device},
              attn_implementation="sdpa")
    if quant:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    ck = {"use_reentrant": False}
    if stock and quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=ck)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ck)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                             target_modules=QV if targets == "qv" else ALL,
                                             task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode, where HF skips gradient checkpointing
    return model


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def sync_lora(src, dst, seed: int = 0) -> None:
    """Same LoRA weights in both models, B drawn nonzero so A's grads are nonzero too."""
    g = torch.Generator().manual_seed(seed)
    ps, pd = lora_params(src), lora_params(dst)
    assert ps.keys() == pd.keys(), "the two models have different LoRA parameters"
    with torch.no_grad():
        for n, p in ps.items():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
            pd[n].copy_(p)


def one_step_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    params = lora_params(model)
    for p in params.values():
        p.grad = None
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return float(loss.detach()), grads


def compare(stock_model, fast_model, batch: dict) -> dict:
    """Loss and max over LoRA params of ‖g_fast − g_stock‖/‖g_stock‖ for one batch."""
    ls, gs = one_step_grads(stock_model, batch)
    lf, gf = one_step_grads(fast_model, batch)
    rels = {n: float((gf[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in gs.items()}
    worst_name = max(rels, key=rels.get)
    flat_s = torch.cat([g.reshape(-1) for g in gs.values()])
    flat_f = torch.cat([gf[n].reshape(-1) for n in gs])
    return {"stock_loss": ls, "loraforge_loss": lf, "loss_rel_diff": abs(lf - ls) / abs(ls),
            "max_rel_grad_diff": rels[worst_name], "worst_param": worst_name,
            "median_rel_grad_diff": statistics.median(rels.values()),
            "global_rel_grad_diff": float((flat_f - flat_s).norm() / flat_s.norm()),
            "n_lora_params": len(gs)}


TOP_KERNELS = 40


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
        loss = model(**x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
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
        from .graphs import pool_reserved_bytes

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
                model(**x).loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 0.3)
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        kern = sum(e.self_device_time_total for e in p.key_averages()) / 2 / 1e6
        out["kernel_s"] = kern
        # name, ms per step, launches per step: enough to see where the step goes, kernel by kernel
        out["top_kernels"] = [(e.key[:80], round(e.self_device_time_total / 2 / 1e3, 2), e.count // 2)
                              for e in sorted(p.key_averages(),
                                              key=lambda e: -e.self_device_time_total)[:TOP_KERNELS]]
    return out


def _versions() -> dict:
    import peft
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__,
         "peft": peft.__version__, "python": platform.python_version()}
    try:
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except Exception:
        pass
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        pass
    return v


def run_speed_bench(cases: list[str] | None, out_dir, *, warm: int = 3, steps: int = 20,
                    ablations: bool = True, profile: bool = True, graphs: bool = True,
                    diagnose: bool = False) -> list[dict]:
    """Times the stock stack and the fast path on each case; writes speed-<date>-<device>.{json,md}."""
    import bitsandbytes as bnb

    from loraforge.errors import ConfigError

    from . import _triton
    from .patch import patch_model

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
        stock = build_model(path, r, targets, stock=True)
        stock_bytes = torch.cuda.memory_allocated() - base0
        fast = build_model(path, r, targets, stock=False)
        summary = patch_model(fast)
        if graphs and summary["patched"]:
            from .graphs import enable_graphed_layers

            enable_graphed_layers(fast, log=print)
        fast_bytes = torch.cuda.memory_allocated() - base0 - stock_bytes
        load_s = time.time() - t0
        print(json.dumps({"setup": [shape, r, targets], "patch": summary, "load_s": round(load_s, 1)}),
              flush=True)
        sync_lora(stock, fast)
        vocab = stock.config.vocab_size
        opt_s = bnb.optim.PagedAdamW32bit(list(lora_params(stock).values()), lr=2e-4)
        # the same optimizer (paged AdamW 32-bit, same math and states) as loraforge's trainer builds it
        from .optim import fused_paged_adamw_32bit

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
                **num, "patch": summary, "versions": _versions(),
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
    plain = build_model(path, r, targets, stock=False)
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
    import bitsandbytes as bnb

    from .optim import paged_adamw_32bit

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
