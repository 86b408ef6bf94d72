"""`loraforge train` as users run it, beside the benchmark's fast path and the stock stack, in one call.

    python bench/train_e2e.py --out DIR --tokenizer TOK --data ALPACA.jsonl \
        [--cases llama2-7b:0.05,mistral-7b:0.05,llama2-7b:0:dora] [--arms train,bench,stock] [--old-src DIR]
    python bench/train_e2e.py --gradcheck qwen3-8b,gemma2-9b --out DIR --tokenizer TOK

Each case is a model shape (loraforge.bench.models.SHAPES, random bf16 weights, written once), a LoRA
dropout and, with a third field `dora`, DoRA instead of LoRA: QLoRA NF4 double quant, r=16 alpha 32 on all
linear layers, batch 4 x 512, paged AdamW 32-bit.
Arms, each in its own process so none inherits another's memory or compiled state:
- `loraforge-train`: the CLI (`python -m loraforge.cli train CONFIG`) on packed Alpaca-style records
  (max_length 512, logging every step), wall time from process start to the saved adapter; tokens/s over
  steps 11-40 from metrics.jsonl (`elapsed_s` of each record), and over steps 1-10 (`first10`).
- `loraforge-train-before`: the same command on an older checkout (`--old-src`), for before/after.
- `train-noamp`: the same with training.mixed_precision "no" (no autocast; the model computes in bf16).
- `train-unpacked`: the same with data.packing false (the default a user gets): one example a row, right-padded
  (case `...-unpacked`, `"packing": false`; tokens/s counts real tokens, not the padding).
- `stock-unpacked`: `train-unpacked` with model.fast_kernels false: the stock stack (transformers + peft +
  bitsandbytes) through the same command, loop and data (arm `stock-train`).
- `bench`: the benchmark's fast path (`bench_run` + `build_loraforge`, `_time_steps`): random token rows.
- `stock`: transformers + peft + bitsandbytes, as `build_stock` builds it.
The tokenizer is the embedded SmolLM2's (no hub here); a shape whose vocabulary is smaller (Llama-2,
Mistral: 32,000) gets 49,152 rows, in every arm alike. `--gradcheck`: loss and LoRA gradients of the
fast path against the stock stack on one batch, both models loaded together, 4 decoder layers of the
real widths. Writes train-e2e-<date>-<device>.json (records with case, arm, tokens_per_s, wall_s,
fast_path, versions, date).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

STEPS, BATCH, SEQ = 40, 4, 512


def _case(spec: str) -> tuple[str, float, bool]:
    """"shape[:dropout[:dora]]" -> (shape, dropout, DoRA)."""
    shape, _, rest = spec.partition(":")
    p, _, variant = rest.partition(":")
    return shape, float(p or 0.05), variant == "dora"


def _name(shape: str, p: float, dora: bool = False) -> str:
    return f"train-e2e-{shape}-dropout{p:g}" + ("-dora" if dora else "")


def _config(path: str, data: str, run_dir: Path, p: float, steps: int, training: dict | None = None,
            dora: bool = False, packing: bool = True, model: dict | None = None) -> Path:
    cfg = {
        "model": {"model_name": path, "use_4bit": True, "bnb_4bit_compute_dtype": "bfloat16", "dtype": "bfloat16",
                  "attn_implementation": "sdpa", "device": os.environ.get("E2E_DEVICE", "cuda"), **(model or {})},
        "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": p, "target_modules": "all-linear", "use_dora": dora},
        "data": {"dataset": data, "format": "alpaca", "template": "alpaca", "max_length": SEQ, "packing": packing,
                 "validation_split": 0.01, "cache": False},
        "training": {"output_dir": str(run_dir), "max_steps": steps, "per_device_train_batch_size": BATCH,
                     "gradient_accumulation_steps": 1, "logging_steps": 1, "optim": "paged_adamw_32bit",
                     **(training or {})},
        "eval": {"num_generation_samples": 0},
    }
    import yaml

    out = run_dir.with_suffix(".yaml")
    out.write_text(yaml.safe_dump(cfg))
    return out


def _window(by_step: dict[int, dict], el: dict[int, float], a: int, b: int) -> tuple[float, float]:
    """(tokens/s, tokens a step) over steps a+1..b, both logged steps (or 0). A metrics record covers the
    steps since the record before it (logging_steps apart): its tokens are tokens_per_s x those seconds."""
    logged = sorted(s for s in by_step if a < s <= b)
    prev = dict(zip(logged, [a, *logged[:-1]], strict=True))
    tokens = sum(by_step[s]["tokens_per_s"] * (el[s] - el[prev[s]]) for s in logged)
    return tokens / max(el[b] - el[a], 1e-9), tokens / max(b - a, 1)


def _train_arm(path: str, data: str, out: Path, p: float, steps: int, src: Path, arm: str,
               training: dict | None = None, dora: bool = False, packing: bool = True,
               model: dict | None = None) -> dict:
    run_dir = out / f"run-{Path(path).name}-{p:g}{'-dora' if dora else ''}-{arm}{'' if packing else '-unpacked'}"
    cfg = _config(path, data, run_dir, p, steps, training, dora, packing, model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loraforge.cli", "train", str(cfg)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    log = proc.stdout + proc.stderr
    (out / f"{run_dir.name}.log").write_text(log)
    rec = {"arm": arm, "wall_s": round(wall, 1), "returncode": proc.returncode}
    if proc.returncode != 0:
        rec["error"] = log[-1500:]
        return rec
    steps_rec = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if '"tokens_per_s"' in x]
    by_step = {r["step"]: r for r in steps_rec}
    last = max(by_step)
    el = {0: 0.0, **{s: by_step[s]["elapsed_s"] for s in by_step}}
    line = next((x for x in log.splitlines() if "fast path:" in x), "")
    rate, per_step = _window(by_step, el, 10, last)
    rec.update(tokens_per_s=round(rate), first10_tokens_per_s=round(_window(by_step, el, 0, 10)[0]),
               tokens_per_step=round(per_step), logging_steps=(training or {}).get("logging_steps", 1),
               train_s=el[last], steps=last, fast_path=line.split("fast path:")[-1].strip().startswith("on"),
               fast_path_line=line.strip()[-300:],
               startup_lines=[x for x in log.splitlines() if "CUDA graphs" in x][:3])
    return rec


def _random_batches(vocab: int, n: int = 4) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (BATCH, SEQ), device="cuda", generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _inproc_arm(arm: str, path: str, p: float, vocab: int, dora: bool = False) -> dict:
    import bitsandbytes as bnb

    from loraforge.bench.models import bench_run, build_loraforge, build_stock, lora_params
    from loraforge.bench.speed import _time_steps
    from loraforge.kernels.patch import fast_path_summary
    from loraforge.train.optim import fused_paged_adamw_32bit

    t = time.perf_counter()
    if arm == "stock":
        model = build_stock(path, 16, "all", lora_dropout=p, use_dora=dora)
        opt = bnb.optim.PagedAdamW32bit(list(lora_params(model).values()), lr=2e-4)
        line, warm, steps = "stock (transformers + peft + bitsandbytes)", 2, int(os.environ.get("E2E_STOCK_STEPS", 6))
    else:
        model, _ = build_loraforge(bench_run(path, 16, "all", lora_dropout=p, use_dora=dora), log=lambda _: None)
        opt = fused_paged_adamw_32bit(list(lora_params(model).values()), lr=2e-4)
        line, warm, steps = fast_path_summary(model), 3, 12
    load_s = time.perf_counter() - t
    r = _time_steps(model, opt, _random_batches(vocab), warm, steps, 0, False)
    return {"arm": arm, "tokens_per_s": round(BATCH * SEQ / r["step_s"]), "step_s": round(r["step_s"], 4),
            "peak_gib": round(r["peak_gib"], 3), "load_s": round(load_s, 1),
            "fast_path": line.startswith("fast path: on"), "fast_path_line": line}


def _gradcheck(shape: str, tokenizer: str) -> dict:
    from loraforge.bench.models import bench_run, build_loraforge, build_stock, compare, make_checkpoint, sync_lora

    path = make_checkpoint(shape, layers=4, tokenizer=tokenizer)
    stock = build_stock(path, 16, "all")
    fast, _ = build_loraforge(bench_run(path, 16, "all", cuda_graphs=False), log=lambda _: None)
    sync_lora(stock, fast)
    vocab = min(stock.config.vocab_size, 49152)
    res = compare(stock, fast, _random_batches(vocab, 1)[0])
    from loraforge.kernels.patch import fast_path_summary

    return {"case": f"gradcheck-{shape}-4layers", "arm": "loraforge-vs-stock", **res,
            "fast_path_line": fast_path_summary(fast)}


def _child(args) -> None:
    """One arm in this process: prints its record as the last line."""
    shape, p, dora = _case(args.child_case)
    if args.child_arm == "gradcheck":
        rec = _gradcheck(shape, args.tokenizer)
    else:
        from loraforge.bench.models import make_checkpoint

        path = make_checkpoint(shape, tokenizer=args.tokenizer)
        rec = _inproc_arm(args.child_arm, path, p, 49152, dora)
    print("RECORD " + json.dumps(rec), flush=True)


def _spawn(args, case: str, arm: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child-case", case, "--child-arm", arm, "--tokenizer", args.tokenizer,
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"child-{case.replace(':', '-')}-{arm}.log").write_text(proc.stdout + proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RECORD "):
            return json.loads(line[7:])
    return {"arm": arm, "error": (proc.stdout + proc.stderr)[-1500:], "returncode": proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tokenizer", required=True, help="a tokenizer folder (the embedded SmolLM2's)")
    ap.add_argument("--data", help="Alpaca-format JSONL for loraforge train")
    ap.add_argument("--cases", default="llama2-7b:0.05")
    ap.add_argument("--arms", default="train,bench,stock")
    ap.add_argument("--gradcheck", default="", help="shapes whose fast-path gradients to check against stock")
    ap.add_argument("--old-src", default=None, help="src/ of an older checkout: adds loraforge-train-before")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--logging-steps", type=int, default=1, choices=(1, 2, 5, 10),
                    help="the train arm's training.logging_steps (10 is the default a user gets); steps 10 "
                         "and the last must be logged")
    ap.add_argument("--tag", default="")
    ap.add_argument("--child-case")
    ap.add_argument("--child-arm")
    args = ap.parse_args()
    if args.child_case:
        return _child(args)
    from loraforge.bench.device import device_tag, require_cuda, stamp
    from loraforge.bench.models import make_checkpoint

    require_cuda("bench/train_e2e.py")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for shape in filter(None, args.gradcheck.split(",")):
        rec = _spawn(args, f"{shape}:0", "gradcheck", out)
        rec.setdefault("case", f"gradcheck-{shape}-4layers")
        print(json.dumps(rec), flush=True)
        records.append(rec)
    for case in filter(None, args.cases.split(",")):
        shape, p, dora = _case(case)
        t = time.perf_counter()
        path = make_checkpoint(shape, tokenizer=args.tokenizer)
        print(json.dumps({"checkpoint": path, "s": round(time.perf_counter() - t, 1)}), flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        for arm in args.arms.split(","):
            if arm == "train":
                rec = _train_arm(path, args.data, out, p, args.steps, ROOT / "src", "loraforge-train",
                                 {"logging_steps": args.logging_steps}, dora=dora)
            elif arm == "train-unpacked":  # data.packing false, the default: right-padded rows of each example
                rec = _train_arm(path, args.data, out, p, args.steps, ROOT / "src", "loraforge-train",
                                 {"logging_steps": args.logging_steps}, dora=dora, packing=False)
            elif arm == "stock-unpacked":  # the same command and data on the stock stack
                rec = _train_arm(path, args.data, out, p, args.steps, ROOT / "src", "stock-train",
                                 {"logging_steps": args.logging_steps}, dora=dora, packing=False,
                                 model={"fast_kernels": False})
            elif arm == "train-noamp":  # the same run without Accelerate's bf16 autocast around the forward
                rec = _train_arm(path, args.data, out, p, args.steps, ROOT / "src", arm, {"mixed_precision": "no"})
            elif arm == "before":
                if not args.old_src:
                    continue
                rec = _train_arm(path, args.data, out, p, args.steps, Path(args.old_src), "loraforge-train-before")
            else:
                rec = _spawn(args, case, arm, out)
            unpacked = arm in ("train-unpacked", "stock-unpacked")  # tokens/s counts real tokens, not the padding
            rec.update(case=_name(shape, p, dora) + ("-unpacked" if unpacked else ""), shape=shape, lora_dropout=p,
                       use_dora=dora, packing=not unpacked)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    gpu = torch.cuda.get_device_name(0)
    meta = {**stamp(gpu),
            "batch": f"{BATCH}x{SEQ}", "lora": "r16 alpha32 all-linear, NF4 double quant, paged AdamW 32-bit"}
    for r in records:
        r.update(meta)
    name = f"train-e2e-{meta['date']}-{device_tag(gpu)}{args.tag}.json"
    (out / name).write_text(json.dumps(records, indent=1))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
