"""LoRA dropout and Mistral on the fast path: stock vs loraforge tokens/s, each model alone on the GPU.

    python bench/dropout_speed.py [--out DIR] [--steps 20] [--warmup 3]

Cases (QLoRA NF4 double quant, r=16 all linear layers, batch 4 x 512): the Llama-2-7B shape with dropout
0 and 0.05, the Mistral-7B shape with dropout 0.05. Writes train-fastpath-<date>-<device>.json: one record
per case and arm ("stock" | "loraforge"), with tokens_per_s, peak_gib and the fast-path line.
"""

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402

from loraforge.bench.device import device_tag, require_cuda, stamp  # noqa: E402
from loraforge.bench.models import bench_run, build_loraforge, build_stock, lora_params, make_checkpoint  # noqa: E402
from loraforge.bench.speed import _time_steps  # noqa: E402
from loraforge.kernels.patch import fast_path_summary  # noqa: E402
from loraforge.train.optim import fused_paged_adamw_32bit  # noqa: E402

CASES = [("llama2-7b", 0.0), ("llama2-7b", 0.05), ("mistral-7b", 0.05)]


def _batches(vocab: int, bs: int = 4, seq: int = 512) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for _ in range(4):
        ids = torch.randint(0, vocab, (bs, seq), device="cuda", generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _one(arm: str, shape: str, p: float, warm: int, steps: int) -> dict:
    path = make_checkpoint(shape)
    if arm == "stock":
        model = build_stock(path, 16, "all", lora_dropout=p)
        opt = bnb.optim.PagedAdamW32bit(list(lora_params(model).values()), lr=2e-4)
        line = "stock (transformers + peft + bitsandbytes)"
    else:
        model, _ = build_loraforge(bench_run(path, 16, "all", lora_dropout=p), log=lambda _: None)
        opt = fused_paged_adamw_32bit(list(lora_params(model).values()), lr=2e-4)
        line = fast_path_summary(model)
    t = _time_steps(model, opt, _batches(model.config.vocab_size), warm, steps, 0, False)
    rec = {"case": f"train-fastpath-{shape}-r16-all-4x512-dropout{p:g}", "arm": arm, "shape": shape,
           "lora_dropout": p, "tokens_per_s": round(4 * 512 / t["step_s"]), "step_s": round(t["step_s"], 4),
           "peak_gib": round(t["peak_gib"], 3), "fast_path": arm == "loraforge" and line.startswith("fast path: on"),
           "fast_path_line": line}
    print(json.dumps(rec), flush=True)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    require_cuda("the dropout speed benchmark")
    name = torch.cuda.get_device_name(0)
    rows = [_one(arm, shape, p, a.warmup, a.steps) for shape, p in CASES for arm in ("loraforge", "stock")]
    meta = stamp(name)
    rows = [{**r, **meta} for r in rows]
    out = Path(a.out) / f"train-fastpath-{meta['date']}-{device_tag(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
