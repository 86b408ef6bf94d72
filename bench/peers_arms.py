"""The stock and loraforge arms of bench/peers.py, one per process, and its helpers that touch the GPU (so that
the parent never does). Each prints one result line (peers_common.RESULT) and exits.

    python bench/peers_arms.py device
    python bench/peers_arms.py make --shape llama2-7b [--word-tokenizer | --tokenizer DIR]
    python bench/peers_arms.py step --side stock|loraforge --path CKPT [--batch 4 --seq 512 --warmup 3 --steps 20]
    python bench/peers_arms.py fits --side stock|loraforge --shape llama3-8b --n N --cap-gib 80 [--probe]

- stock: transformers + peft + bitsandbytes as `loraforge.bench.models.build_stock` builds it (the baseline's
  fp32 upcasts, non-reentrant checkpointing), bitsandbytes' PagedAdamW32bit;
- loraforge: `build_loraforge` (what `loraforge train` builds: bf16, fused LoRA, CUDA graphs), its fused paged
  AdamW 32-bit; `fits` runs the max-context search's own worker (`training.long_context`, offloaded
  checkpoints, probe trials through the last layers) under the memory cap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from peers_common import cap_memory, random_batches, run_arm, step_arguments, time_steps, trainable  # noqa: E402

from loraforge.bench.context_worker import _Worker, host_available  # noqa: E402
from loraforge.bench.models import ROOT, bench_run, build_loraforge, build_stock, make_checkpoint  # noqa: E402

R = 16  # LoRA rank of every case; alpha 2r, all seven linear projections, NF4 double quant


def device() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "total_gib": round(props.total_memory / 2**30, 2),
            "gpus": torch.cuda.device_count(), "host_available_gib": round(host_available() / 2**30, 1)}


def write_word_tokenizer(path: str) -> bool:
    """A word-level tokenizer with the checkpoint's vocabulary ("w3", "w4", ...), saved beside its weights:
    Unsloth loads a tokenizer with every model and a random checkpoint has none. The stock and loraforge
    builds never read it. False if one is there already."""
    if Path(path, "tokenizer.json").exists():
        return False
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = json.loads(Path(path, "config.json").read_text())["vocab_size"]
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>", model_max_length=1 << 20).save_pretrained(path)
    return True


def make(a: argparse.Namespace) -> dict:
    t = time.perf_counter()
    path = make_checkpoint(a.shape, tokenizer=a.tokenizer)
    made_s = time.perf_counter() - t
    wrote = write_word_tokenizer(path) if a.word_tokenizer else False
    vocab = json.loads(Path(path, "config.json").read_text())["vocab_size"]
    return {"path": path, "s": round(made_s, 1), "vocab": vocab, "word_tokenizer_written": wrote}


def step(a: argparse.Namespace) -> dict:
    import bitsandbytes as bnb  # the stock side's optimizer; a GPU install has it

    from loraforge.kernels.graphs import pool_reserved_bytes
    from loraforge.kernels.patch import fast_path_summary
    from loraforge.train.optim import fused_paged_adamw_32bit

    t = time.perf_counter()
    if a.side == "stock":
        model = build_stock(a.path, R, "all")
        opt = bnb.optim.PagedAdamW32bit(trainable(model), lr=2e-4)
        optimizer = "bitsandbytes PagedAdamW32bit"
    else:
        # loraforge-offload: the checkpoints in host memory beneath the graphs (a one-GPU run's default since
        # session 10); loraforge: set off, the checkpoints on the GPU, as every record before then measured
        offload = a.side == "loraforge-offload"
        model, _ = build_loraforge(bench_run(a.path, R, "all", offload_activations=offload), log=lambda _: None)
        opt = fused_paged_adamw_32bit(trainable(model), lr=2e-4)
        optimizer = "loraforge fused_paged_adamw_32bit (paged fp32 states, torch's fused update)"
    load_s = time.perf_counter() - t
    out = time_steps(model, opt, random_batches(model.config.vocab_size, a.batch, a.seq), a.warmup, a.steps)
    out.update(load_s=round(load_s, 1), optimizer=optimizer, attn=getattr(model.config, "_attn_implementation", None))
    if a.side != "stock":
        out["fast_path"] = fast_path_summary(model)
        off = getattr(model, "_loraforge_offloader", None)
        if off is not None:
            out["offload"] = off.stats.as_dict()
        runner = getattr(model, "_loraforge_graphs", None)
        if runner is not None:
            out["graphs"] = runner.summary()
            if not runner.stats.disabled and not runner.paused:
                # bench/speed.py's loraforge_peak_gib: graph replays use their private pool's free blocks
                # without the allocator seeing them, so it adds them (an upper bound of the true peak)
                pool = pool_reserved_bytes(runner) / 2**30
                out["graph_pool_free_gib"] = round(pool, 3)
                out["peak_gib_with_graph_pool"] = round(out["peak_gib"] + pool, 3)
    return out


def fits(a: argparse.Namespace) -> dict:
    """One trial of the max-context search's worker (loraforge.bench.context_worker) under the memory cap."""
    cap = cap_memory(a.cap_gib)
    worker = _Worker(a.side, a.shape, "cuda", ROOT, a.probe_layers if a.side == "loraforge" else 0)
    res = worker.fits(a.n, probe=a.probe and a.side == "loraforge")
    return {**res, "load_s": worker.info.get("load_s"), "cap": cap,
            "worker": {k: v for k, v in worker.info.items() if k not in ("side", "shape")}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("device")
    p = sub.add_parser("make")
    p.add_argument("--shape", required=True)
    p.add_argument("--word-tokenizer", action="store_true")
    p.add_argument("--tokenizer", default=None)
    p = step_arguments(sub.add_parser("step"))
    p.add_argument("--side", choices=("stock", "loraforge", "loraforge-offload"), required=True)
    p = sub.add_parser("fits")
    p.add_argument("--side", choices=("stock", "loraforge"), required=True)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--cap-gib", type=float, default=80.0)
    p.add_argument("--probe", action="store_true", help="loraforge: a probe trial (backward through the last layers)")
    p.add_argument("--probe-layers", type=int, default=2)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    arms = {"device": lambda: device(), "make": lambda: make(a), "step": lambda: step(a), "fits": lambda: fits(a)}
    run_arm(arms[a.cmd])


if __name__ == "__main__":
    main()
