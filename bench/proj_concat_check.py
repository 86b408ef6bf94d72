"""Would one GEMM for q,k,v (or gate,up) give the decoder's bits and save time? H100, bf16, M = 1 and 16 rows.

    python bench/proj_concat_check.py [--out DIR]

For each group of projections of a Llama-2-7B layer: the separate `F.linear` calls (what the model's
modules run, what stock runs) against one `F.linear` on the concatenated weight, split afterwards.
Prints whether every output bit is equal (the decoder promises stock's tokens, so a faster GEMM that rounds
differently is not a free change) and the time of each, from a CUDA graph of 200 repetitions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def timed(fn, reps: int = 200) -> float:
    """Milliseconds per call, from one CUDA graph of `reps` calls (no launch gaps from Python)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    hidden, inter = 4096, 11008
    groups = {"q,k,v": [hidden] * 3, "gate,up": [inter] * 2}
    rows_out = []
    for name, outs in groups.items():
        ws = [torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16) * 0.02 for n in outs]
        cat = torch.cat(ws)
        for m in (1, 16):
            x = torch.randn(m, 1, hidden, device="cuda", dtype=torch.bfloat16)
            sep = [F.linear(x, w) for w in ws]
            one = F.linear(x, cat).split(outs, dim=-1)
            equal = all(torch.equal(s, o) for s, o in zip(sep, one, strict=True))
            t_sep = timed(lambda x=x, ws=ws: [F.linear(x, w) for w in ws])
            t_one = timed(lambda x=x, cat=cat: F.linear(x, cat))
            row = {"group": name, "rows": m, "bit_equal": equal, "separate_ms": round(t_sep, 4),
                   "concatenated_ms": round(t_one, 4), "saved_per_layer_us": round(1000 * (t_sep - t_one), 1)}
            rows_out.append(row)
            print(row, flush=True)
    import datetime as dt

    report = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "cuda": torch.version.cuda, "results": rows_out}
    if a.out:
        Path(a.out, "proj-concat-check.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
