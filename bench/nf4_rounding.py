"""How NF4 rounds the embedded model, on the CPU (issue 21's NF4 gap; bench/NOTES.md, session 14).

Two measurements of the embedded SmolLM2-135M-Instruct, no training:
- grid: distinct values in each block of 32 weights of every linear layer (at most 16 everywhere means the
  weights already sit on a 4-bit grid with one scale per 32, as a Q4_1 GGUF stores them);
- sensitivity: held-out perplexity (chitchat validation conversations, the convergence harness's split) of
  the fp32 model, of the model with every quantizable weight replaced by its NF4 round trip
  (loraforge.bench.convergence.round_to_nf4, what a 4-bit load computes with), and with one projection
  kind or one layer left unrounded: whether a few weights carry the gap.

    python bench/nf4_rounding.py [--conversations 40] [--layers 0-29] [--out bench/results]

~20 s per perplexity on 2 cores; the whole run (2 + 7 + 30 evaluations) ~13 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch


def grid(weights: dict[str, torch.Tensor], rows: int = 2000) -> dict[str, dict[str, int]]:
    """Per weight: max and median number of distinct values in its first `rows` blocks of 32."""
    out = {}
    for name, w in weights.items():
        distinct = torch.tensor([len(torch.unique(b)) for b in w.reshape(-1, 32)[:rows]])
        out[name] = {"max": int(distinct.max()), "median": int(distinct.median())}
    return out


def layer_range(arg: str, n_layers: int) -> range:
    """--layers: all, none, or A-B (inclusive)."""
    if arg == "all":
        return range(n_layers)
    if arg == "none":
        return range(0)
    lo, hi = map(int, arg.split("-"))
    return range(lo, hi + 1)


def main() -> None:
    from transformers import AutoModelForCausalLM

    from loraforge.bench.convergence import labels_loss_perplexity, quantizable_linears, round_to_nf4
    from loraforge.config import DataConfig, ModelConfig
    from loraforge.data.pipeline import build_datasets
    from loraforge.model.load import load_tokenizer, resolve_model_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=40, help="held-out conversations scored")
    p.add_argument("--layers", default="all", help="layers to leave unrounded one at a time: all, none or A-B")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args()
    torch.set_num_threads(2)

    cfg = ModelConfig()
    path = resolve_model_path(cfg)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    data = DataConfig(dataset="chitchat", max_length=256, max_samples=600, validation_split=0.02)
    val = list(build_datasets(data, load_tokenizer(path, cfg)).validation)[:a.conversations]

    linears = quantizable_linears(model)
    dense = {n: m.weight.detach().clone() for n, m in linears.items()}
    round_to_nf4(model, nested=cfg.use_nested_quant)
    rounded = {n: m.weight.detach().clone() for n, m in linears.items()}

    def ppl_with(keep_dense) -> float:
        for n, m in linears.items():
            m.weight.data.copy_(dense[n] if keep_dense(n) else rounded[n])
        return labels_loss_perplexity(model, val, "cpu")

    base = ppl_with(lambda n: True)
    rows = [{"rounded": "none", "ppl": base}, {"rounded": "all", "ppl": ppl_with(lambda n: False)}]
    print(f"fp32 {base:.4f}; every weight NF4-rounded {rows[1]['ppl']:.4f} ({rows[1]['ppl'] / base - 1:+.2%})")
    kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    probes = [(f"all but {k}", f".{k}") for k in kinds] + [
        (f"all but layer {i}", f"layers.{i}.") for i in layer_range(a.layers, model.config.num_hidden_layers)]
    for label, part in probes:
        ppl = ppl_with(lambda n, part=part: part in n)
        rows.append({"rounded": label, "ppl": ppl})
        print(f"{label:20s} {ppl:.4f} ({ppl / base - 1:+.2%})", flush=True)
    for r in rows:
        r["vs_fp32"] = r["ppl"] / base - 1
    record = {"model": cfg.model_name, "conversations": len(val), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "grid": grid(dense), "sensitivity": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"nf4-rounding-cpu-{record['date']}.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
