"""`loraforge train` on a GPU takes the fast path: the real command, with and without CUDA graphs.

    python bench/train_gpu_check.py [--out bench/results] [--steps 40]

Llama-2-7B shape (random bf16 weights, SmolLM2's tokenizer and vocabulary, prepared by
`bench/model_gpu_check.py --prepare` into .cache/model-gpu-check/), QLoRA NF4 + double quant, r=16
all-linear, lora_dropout=0, packed 4 x 512 rows of a synthetic Alpaca file: the settings of the speed
bench's main case, run through the CLI as a user runs it. Runs `loraforge train` twice (cuda_graphs
false, true) in fresh processes, reads tokens/s from each run's metrics.jsonl (median of the logged
windows after the first `--skip` steps) and the fast-path lines from its log, and writes
`train-gpu-<date>-<device>.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
PREPARED = ROOT / ".cache" / "model-gpu-check" / "smollm2-135m-instruct"
CKPT = Path(os.environ.get("LORAFORGE_BENCH_CKPT", "/dev/shm/loraforge-ckpt")) / "llama2-7b-smol-tokenizer"


def make_model() -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraforge.bench.models import SHAPES

    if (CKPT / "config.json").exists():
        return CKPT
    tok = AutoTokenizer.from_pretrained(PREPARED)
    cfg = LlamaConfig(**{**SHAPES["llama2-7b"], "vocab_size": len(tok)}, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device("cuda"):
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(CKPT, max_shard_size="50GB")
    tok.save_pretrained(CKPT)
    del m
    torch.cuda.empty_cache()
    return CKPT


def make_data(path: Path, n: int = 3000) -> Path:
    rng = random.Random(0)
    words = ("model adapter gradient token layer weight memory kernel graph batch sequence loss step rank "
             "matrix vector attention norm train data value query key output input learn rate time").split()

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    rows = [{"instruction": text(rng.randint(8, 30)), "input": text(rng.randint(0, 40)),
             "output": text(rng.randint(40, 200))} for _ in range(n)]
    path.write_text(json.dumps(rows))
    return path


def run(out: Path, graphs: bool, data: Path, model: Path, steps: int, skip: int) -> dict:
    run_dir = Path(f"/tmp/train-gpu-check-{'graphs' if graphs else 'eager'}")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"model.model_name={model}", f"model.cuda_graphs={str(graphs).lower()}", "model.use_4bit=true",
        f"data.dataset={data}", "data.format=alpaca", "data.packing=true", "data.max_length=512",
        "data.validation_split=0", "data.cache=false",
        "lora.r=16", "lora.lora_alpha=32", "lora.lora_dropout=0", "lora.target_modules=all-linear",
        "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=1",
        f"training.max_steps={steps}", "training.logging_steps=5", "training.warmup_ratio=0",
        f"training.output_dir={run_dir}",
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "loraforge.cli", "train", *overrides], env=env,
                       capture_output=True, text=True, timeout=600)
    wall = time.time() - t0
    log = p.stdout + p.stderr
    (out / f"train-gpu-{'graphs' if graphs else 'eager'}.log").write_text(log[-20000:])
    recs = []
    mpath = run_dir / "metrics.jsonl"
    if mpath.exists():
        recs = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r and r.get("step", 0) > skip]
    losses = [r["loss"] for r in recs if "loss" in r]
    keep = ("fast kernels", "CUDA graphs", "peak", "optimizer")
    return {"cuda_graphs": graphs, "returncode": p.returncode, "wall_s": round(wall, 1),
            "tokens_per_s_median": round(statistics.median(speeds)) if speeds else None,
            "tokens_per_s_windows": [round(s) for s in speeds], "losses": losses,
            "log_lines": [line[:400] for line in log.splitlines() if any(k in line for k in keep)][:12]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=10, help="windows up to this step are warm-up")
    a = ap.parse_args(argv)
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model()
    data = make_data(Path("/tmp/train-gpu-check.json"))
    rows = [run(out, g, data, model, a.steps, a.skip) for g in (False, True)]
    dev = torch.cuda.get_device_name(0)
    from loraforge.bench.device import versions

    res = {"date": dt.date.today().isoformat(), "device": dev, "versions": versions(),
           "case": "llama2-7b-shape r16 all-linear 4x512 packed", "runs": rows}
    e, g = (r["tokens_per_s_median"] for r in rows)
    if e and g:
        res["graphs_speedup"] = round(g / e, 3)
    from loraforge.bench.device import device_tag

    tag = device_tag(dev)
    (out / f"train-gpu-{res['date']}-{tag}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
