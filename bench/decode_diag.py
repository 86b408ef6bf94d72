"""Why would FastDecoder's greedy tokens differ from stock `generate`'s on a 7B shape? And where does a
graphed decode step spend its time?

    python bench/decode_diag.py [--layers 32] [--rows 16] [--out DIR]

1. Stock `generate` (output_logits) on random prompts (`--padded`: left-padded) run twice — is stock
   reproducible? — and against FastDecoder variants (graphs + fused kernels, graphs, eager) step by step:
   the first step whose fp32 logits are not bit-equal, and the first divergent token per row. (An earlier
   version also tried K/V and the mask copied contiguous before attention: no change,
   bench/results/decode-diag-2026-11-22-h100-padded.json.)
2. torch.profiler over 8 graphed decode steps (the prefill left out) at 1 and `--rows` rows (fused kernels
   on, and off for 1 row; `--rows` rows also as one graph a step, `whole_step`): kernels per step, kernel
   time per step, the top kernels; and the wall time per step.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build(layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    return model


def first_diff(a: torch.Tensor, b: torch.Tensor):
    rows = []
    for r in range(a.shape[0]):
        d = (a[r] != b[r]).nonzero()
        rows.append(None if d.numel() == 0 else int(d[0]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--padded", action="store_true", help="rows of 110..128 tokens (left padding)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from loraforge.infer.fast_decode import FastDecoder

    model = build(a.layers, a.vocab)
    g = torch.Generator().manual_seed(1)
    lengths = [128 - (i * 7) % 19 if a.padded else 128 for i in range(a.rows)]
    width = max(lengths)
    ids = torch.zeros(a.rows, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, a.vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": a.layers,
              "rows": a.rows, "lengths": lengths, "variants": {}}
    with torch.no_grad():
        out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=a.new,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    ref_tok = out.sequences[:, width:]
    with torch.no_grad():
        again = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=a.new,
                               do_sample=False, pad_token_id=0)[:, width:]
    report["stock_vs_stock_first_divergent_token"] = first_diff(again.cpu(), ref_tok.cpu())
    print("stock vs stock", report["stock_vs_stock_first_divergent_token"], flush=True)
    ref_logits = [x.float() for x in out.logits]
    ids1, mask1 = ids[:1, width - lengths[0]:], mask[:1, width - lengths[0]:]
    with torch.no_grad():
        ref1 = model.generate(input_ids=ids1.cuda(), attention_mask=mask1.cuda(), max_new_tokens=a.new,
                              do_sample=False, pad_token_id=0)[:, ids1.shape[1]:]
    variants = {"graphs+fused": dict(graphs=True), "graphs": dict(graphs=True, fused_kernels=False),
                "eager": dict(graphs=False, fused_kernels=False)}
    for name, kw in variants.items():
        dec = FastDecoder(model, max_rows=a.rows, graphs=kw.pop("graphs"), fused_kernels=kw.pop("fused_kernels", True))
        for k, v in kw.items():
            setattr(dec, k, v)
        dec.keep_logits = True
        steps = list(dec.stream(ids, mask, a.new))
        toks = torch.tensor(steps).t()
        first_step = next((i for i, (x, y) in enumerate(zip(dec.trace, ref_logits, strict=False))
                           if not torch.equal(x, y)), None)
        max_abs = [float((x - y).abs().max()) for x, y in zip(dec.trace[:6], ref_logits[:6], strict=False)]
        one = torch.tensor(list(dec.stream(ids1, mask1, a.new))).t()
        row = {"fused": dec.fused, "first_step_logits_differ": first_step, "max_abs_logit_diff_first_steps": max_abs,
               "first_divergent_token": first_diff(toks.cpu(), ref_tok.cpu()),
               "one_row_unpadded_first_divergent_token": first_diff(one.cpu(), ref1.cpu())}
        report["variants"][name] = row
        print(name, json.dumps(row), flush=True)
        del dec
        torch.cuda.empty_cache()

    from torch.profiler import ProfilerActivity, profile

    report["profile"] = {}
    for fused, rows, whole in ((True, 1, False), (True, a.rows, False), (True, a.rows, True), (False, 1, False)):
        dec = FastDecoder(model, max_rows=a.rows, fused_kernels=fused, whole_step=whole)
        i_, m_ = (ids1, mask1) if rows == 1 else (ids, mask)
        list(dec.stream(i_, m_, 128))  # capture, and cuDNN builds its attention plan for every length t
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = len(list(dec.stream(i_, m_, 128)))
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n
        steps = 8
        it = dec.stream(i_, m_, steps + 2)
        next(it)  # the prefill, outside the profile (session 11: inside, it hid the 16-row step's kernels)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(steps):
                next(it)
            torch.cuda.synchronize()
        it.close()
        evs = p.key_averages()
        kern = sum(e.self_device_time_total for e in evs) / steps / 1e3
        count = sum(e.count for e in evs) / steps
        top = [(e.key[:70], round(e.self_device_time_total / steps / 1e3, 3), round(e.count / steps, 1))
               for e in sorted(evs, key=lambda e: -e.self_device_time_total)[:25]]
        prof = {"wall_ms_per_step_128": round(wall * 1e3, 3), "kernel_ms_per_step": round(kern, 3),
                "kernels_per_step": count}
        name = f"{rows}-rows-{'fused' if fused else 'eager-ops'}{'-whole-step' if whole else ''}"
        print(name, json.dumps(prof), flush=True)
        report["profile"][name] = dict(prof, top=top)
        del dec
        torch.cuda.empty_cache()
    if a.out:  # session 10 lost an H200 profile to a folder that did not exist
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "decode-diag.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
