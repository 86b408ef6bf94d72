"""Multi-GPU scaling through the real training path: `loraforge train` (LLAMATrainer) under torchrun.

    python bench/ddp.py                       # on a machine with >= 2 GPUs; < 8 minutes
    python bench/ddp.py --shape tiny --cpu    # CPU smoke test of the same code (2 gloo processes)

Cases (random weights of the real shapes, written once to /dev/shm, QLoRA NF4 r=16 on all linear
layers, gradient checkpointing, paged AdamW 32-bit, per-GPU batch 4 x 512 tokens):
  ddp-7b    Llama-2-7B shape, DDP, 1 GPU and 2 GPUs in the same call -> tokens/s scaling
  13b       Llama-2-13B shape on 1 GPU (the single-GPU peak memory), then FSDP full shard on 2 GPUs
            -> per-GPU peak memory
The vocabulary is the embedded SmolLM2 tokenizer's (49,152 tokens, vs Llama-2's 32,000), since no hub
tokenizer is reachable; both arms of every comparison use it. tokens/s counts non-padding tokens over all
GPUs, from the end of the warm-up steps to the last step (metrics.jsonl windows).
Writes bench/results/ddp-<date>-<device>.json: a list of {case, gpus, tokens_per_s, peak_gib, ...}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024),
}


def make_shape(name: str, root: Path, cpu: bool, tokenizer: str | None = None) -> Path:
    """Random bf16 weights of `name` with the embedded tokenizer (or the tokenizer folder given), saved once
    under `root`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraforge.model.embedded import resolve_embedded

    path = root / name
    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(tokenizer or resolve_embedded("smollm2-135m-instruct"))
    cfg = LlamaConfig(**SHAPES[name], vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    t = time.time()
    with torch.device("cpu" if cpu else "cuda"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.float32 if cpu else torch.bfloat16)
    model.save_pretrained(path, max_shard_size="50GB")
    tok.save_pretrained(path)
    del model
    print(json.dumps({"made": name, "s": round(time.time() - t, 1)}), flush=True)
    return path


def write_data(path: Path, n: int, words: int = 700) -> Path:
    """Raw-text records long enough to be truncated at 512 tokens: every batch is full."""
    rng = random.Random(0)
    vocab = "the of and to in is was for on that with as by at from his her they this which be or an".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words))}) + "\n"
                            for _ in range(n)))
    return path


def run_case(case: str, shape_dir: Path, data: Path, out: Path, gpus: int, strategy: str, a, tag: str = "") -> dict:
    run_dir = out / f"{case}-{gpus}gpu{'-' + tag if tag else ''}"
    # The case's scratch folder: an earlier bench's run there is removed (a run folder takes one run, and
    # moved-aside copies would pile up in /dev/shm).
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"model.model_name={shape_dir}", f"data.dataset={data}", "data.format=text", "data.max_length=512",
                 "data.validation_split=0.0", "lora.r=16", "lora.lora_alpha=32", "lora.target_modules=all-linear",
                 "lora.lora_dropout=0.0", f"training.output_dir={run_dir}", f"training.max_steps={a.warm + a.steps}",
                 f"training.per_device_train_batch_size={a.batch}", "training.gradient_accumulation_steps=1",
                 "training.logging_steps=1", "training.save_steps=0", "training.warmup_ratio=0.0",
                 f"training.distributed_strategy={strategy}", "training.gradient_checkpointing=true",
                 # CUDA-graphed layers run in single-process training only: off in every arm, so that the
                 # 1-GPU and N-GPU figures time the same code
                 "model.cuda_graphs=false"]
    if a.cpu:
        overrides += ["model.use_4bit=false", "model.device=cpu", "model.dtype=float32", "data.max_length=64"]
    env = {**os.environ, "LORAFORGE_BENCH_PEAK_DIR": str(run_dir), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
           __file__, "--worker", *overrides]
    t = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.case_timeout)
    row = {"case": case, "gpus": gpus, "run": tag or None, "strategy": strategy, "shape": shape_dir.name,
           "batch_per_gpu": a.batch,
           "seq": 64 if a.cpu else 512, "wall_s": round(time.time() - t, 1)}
    if proc.returncode != 0:
        row.update(tokens_per_s=None, peak_gib=None, error=proc.stderr[-3000:])
        print(proc.stderr[-3000:], file=sys.stderr)
        return row
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r and r["step"] > a.warm - 1]
    tokens = sum(r["tokens_per_s"] * (r["elapsed_s"] - p["elapsed_s"]) for p, r in zip(recs, recs[1:], strict=False))
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("peak-rank*.json"))]
    peaks = [r["peak_gib"] for r in ranks]
    if any(r.get("phases_ms_median") for r in ranks):
        row["phases_ms_median_per_rank"] = [r["phases_ms_median"] for r in ranks]
    row.update(tokens_per_s=round(tokens / (recs[-1]["elapsed_s"] - recs[0]["elapsed_s"]), 1),
               peak_gib=round(max(peaks), 2) if peaks else None, peak_gib_per_rank=peaks,
               final_loss=recs[-1]["loss"])
    return row


def _time_phases() -> dict[str, list[float]]:
    """--phases: wrap the training loop's parts (forward, backward, the cross-rank reduces, clipping, the
    optimizer step) in device syncs and timers. It perturbs overlap, so it says where time goes, not how
    fast a step is."""
    import torch
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from loraforge.train.trainer import LLAMATrainer

    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            phases.setdefault(name, []).append(time.perf_counter() - t)
            return out
        return wrapper

    LLAMATrainer._micro_step_loss = timed("forward", LLAMATrainer._micro_step_loss)
    Accelerator.backward = timed("backward", Accelerator.backward)
    Accelerator.reduce = timed("reduce", Accelerator.reduce)
    Accelerator.clip_grad_norm_ = timed("clip", Accelerator.clip_grad_norm_)
    AcceleratedOptimizer.step = timed("optimizer", AcceleratedOptimizer.step)
    return phases


def worker(overrides: list[str]) -> None:
    """One torchrun process: the same code as `loraforge train`, plus this rank's peak memory."""
    import statistics

    import torch

    from loraforge.config import load_config
    from loraforge.train.trainer import LLAMATrainer

    phases = _time_phases() if os.environ.get("LORAFORGE_BENCH_PHASES") and torch.cuda.is_available() else {}
    LLAMATrainer.from_config(load_config(None, overrides), log=lambda m: None).train()
    rank = int(os.environ.get("RANK", "0"))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    record = {"peak_gib": peak, "phases_ms_median": {k: round(statistics.median(v[3:] or v) * 1e3, 1)
                                                     for k, v in phases.items()}}
    Path(os.environ["LORAFORGE_BENCH_PEAK_DIR"], f"peak-rank{rank}.json").write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["real", "tiny"], default="real", help="tiny: a smoke test of the code")
    ap.add_argument("--cpu", action="store_true", help="CPU processes with gloo (FSDP needs CUDA: runs DDP)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case")
    ap.add_argument("--warm", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--cases", default="ddp-7b,13b")
    ap.add_argument("--shm", default="/dev/shm/loraforge-bench")
    ap.add_argument("--case-timeout", type=int, default=240)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder instead of the embedded model's")
    ap.add_argument("--phases", action="store_true", help="time forward/backward/reduce/clip/optimizer per rank")
    a = ap.parse_args(argv)
    import torch

    if a.phases:
        os.environ["LORAFORGE_BENCH_PHASES"] = "1"

    root, work = Path(a.shm), Path(a.shm) / "runs"
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(root / "text.jsonl", n=a.batch * a.gpus * (a.warm + a.steps) + 8)
    small, large = ("tiny", "tiny") if a.shape == "tiny" else ("llama2-7b", "llama2-13b")
    fsdp = "ddp" if a.cpu else "fsdp"
    rows = []
    if "ddp-7b" in a.cases:
        path = make_shape(small, root, a.cpu, a.tokenizer)
        # 1 GPU before and after N GPUs, the faster one counts (as in the speed bench): the first process
        # on a fresh machine also pays Triton's compile and cold caches (run 1 measured 3,289 vs 3,751
        # tok/s for the larger 13B shape right after it)
        rows += [run_case("ddp-7b", path, data, work, g, "ddp", a, tag) for g, tag in
                 ((1, "before"), (a.gpus, ""), (1, "after"))]
    if "13b" in a.cases:
        path = make_shape(large, root, a.cpu, a.tokenizer)
        rows += [run_case("13b-single", path, data, work, 1, "ddp", a),
                 run_case("fsdp-13b", path, data, work, a.gpus, fsdp, a)]
    one = max((r["tokens_per_s"] or 0 for r in rows if r["case"] == "ddp-7b" and r["gpus"] == 1), default=None)
    for r in rows:
        if r["case"] == "ddp-7b" and r["gpus"] > 1 and one and r["tokens_per_s"]:
            r["scaling_vs_1gpu"] = round(r["tokens_per_s"] / one, 3)
    from loraforge.bench.device import device_tag

    device = "cpu" if a.cpu else device_tag(torch.cuda.get_device_name(0))
    out = Path(a.out) / f"ddp-{datetime.date.today().isoformat()}-{device}{'-smoke' if a.shape == 'tiny' else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
