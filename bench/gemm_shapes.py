"""Are the base GEMMs of one 7B LoRA step worth grouping? Times each projection's GEMM shape alone and
grouped (q/k/v as one [12288, 4096] weight, gate/up as one [22016, 4096]), forward and backward-dX,
at T tokens per micro-step, and prints ms and TFLOP/s per variant.

    python bench/gemm_shapes.py [--tokens 2048] [--out DIR]

Wave quantization is the question: a [2048, 11008] output in 256×128 tiles is 688 tiles, 5.2 waves on
132 SMs (the sixth wave 20% full); grouped gate/up is 10.4 waves.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps  # ms


def main(argv=None):
    from loraforge.bench.device import device_tag, require_cuda

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    require_cuda("the GEMM shape bench")
    T, H, F = a.tokens, a.hidden, a.inter
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, xi = torch.randn(T, H, **bf), torch.randn(T, F, **bf)
    w_h = [torch.randn(H, H, **bf) * 0.02 for _ in range(3)]
    w_i = [torch.randn(F, H, **bf) * 0.02 for _ in range(2)]
    w_qkv, w_gu = torch.cat(w_h), torch.cat(w_i)
    d_h = [torch.randn(T, H, **bf) for _ in range(3)]
    d_i = [torch.randn(T, F, **bf) for _ in range(2)]
    d_qkv, d_gu = torch.cat(d_h, 1), torch.cat(d_i, 1)
    w_down = torch.randn(H, F, **bf) * 0.02

    def acc3(ds, ws):
        out = ds[0] @ ws[0]
        for d, w in zip(ds[1:], ws[1:], strict=True):
            out.addmm_(d, w)
        return out

    cases = {
        # name: (fn, flops)
        "fwd q,k,v separate": (lambda: [x @ w.t() for w in w_h], 3 * 2 * T * H * H),
        "fwd q,k,v grouped": (lambda: x @ w_qkv.t(), 3 * 2 * T * H * H),
        "fwd gate,up separate": (lambda: [x @ w.t() for w in w_i], 2 * 2 * T * H * F),
        "fwd gate,up grouped": (lambda: x @ w_gu.t(), 2 * 2 * T * H * F),
        "fwd down": (lambda: xi @ w_down.t(), 2 * T * H * F),
        "bwd dX q,k,v separate (mm+addmm)": (lambda: acc3(d_h, w_h), 3 * 2 * T * H * H),
        "bwd dX q,k,v grouped": (lambda: d_qkv @ w_qkv, 3 * 2 * T * H * H),
        "bwd dX gate,up separate (mm+addmm)": (lambda: acc3(d_i, w_i), 2 * 2 * T * H * F),
        "bwd dX gate,up grouped": (lambda: d_gu @ w_gu, 2 * 2 * T * H * F),
        "bwd dH down": (lambda: d_h[0] @ w_down, 2 * T * H * F),
    }
    rows = []
    for name, (fn, flops) in cases.items():
        ms = timed(fn)
        rows.append({"case": name, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)})
        print(f"{name:40s} {ms:8.4f} ms  {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    if a.out:
        import datetime as _dt

        p = Path(a.out) / f"gemm-shapes-{_dt.date.today().isoformat()}-{device_tag(torch.cuda.get_device_name(0))}.json"
        p.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                 "tokens": T, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
