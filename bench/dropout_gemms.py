"""What LoRA dropout costs inside one fused projection group, on the GPU: forward + backward of
`lora_linears` (q, k, v of Llama-2-7B: 4096 → 3 × 4096, r=16, 4 × 512 tokens) and of `lora_mlp`
(4096 → 11008 → 4096), bf16 dense weights, CUDA-event timed.

    python bench/dropout_gemms.py [--tokens 2048] [--iters 50]

Settings: p = 0; p = 0.05 with the mask drawn inside the LoRA GEMMs (dropout.py's fused kernels); p =
0.05 through the twins (`dropped` copies + plain GEMMs, the path before the fused kernels). Prints one
JSON line per setting (ms per forward + backward, and the ratio to p = 0)."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from loraforge.bench.device import require_cuda  # noqa: E402
from loraforge.kernels import _triton  # noqa: E402
from loraforge.kernels.frozen import FrozenWeight  # noqa: E402
from loraforge.kernels.lora import lora_linears, lora_mlp  # noqa: E402


def _group(t: int, widths: list[tuple[int, int]], r: int = 16):
    dev, dt = "cuda", torch.bfloat16
    ws = [FrozenWeight((torch.randn(o, i, device=dev) * 0.02).to(dt), dt) for i, o in widths]
    ab = []
    for i, o in widths:
        ab += [(torch.randn(r, i, device=dev) * 0.02).requires_grad_(), (torch.randn(o, r, device=dev) * 0.02)
               .requires_grad_()]
    x = torch.randn(t, widths[0][0], device=dev, dtype=dt, requires_grad=True)
    return x, ws, ab


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _top_kernels(fn, iters: int = 5, top: int = 12) -> list:
    """[(kernel name, µs per iteration)] of the GPU kernels that take the most time in `fn`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key[:70], round(e.device_time_total / iters, 1)) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="also print each setting's top GPU kernels")
    args = ap.parse_args()
    require_cuda("bench/dropout_gemms.py")
    from loraforge.kernels.patch import self_check

    print(json.dumps({"self_check": self_check("cuda")}), flush=True)
    t = args.tokens
    attn = _group(t, [(4096, 4096)] * 3)
    mlp = _group(t, [(4096, 11008), (4096, 11008), (11008, 4096)])

    def run(p):
        def step():
            x, ws, ab = attn
            outs = lora_linears(x, ws, (2.0,) * 3, ab, (p,) * 3)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            x, ws, ab = mlp
            lora_mlp(x, ws, (2.0,) * 3, ab, (p,) * 3).sum().backward()
        return step

    base = None
    for name, p, fused in (("p0", 0.0, True), ("p0.05-fused", 0.05, True), ("p0.05-twins", 0.05, False)):
        _triton.ENABLED["dropout_mm"] = fused
        ms = _time(run(p), args.iters)
        base = base or ms
        print(json.dumps({"setting": name, "tokens": t, "ms_fwd_bwd": round(ms, 3), "vs_p0": round(ms / base, 4)}),
              flush=True)
        if args.profile:
            print(json.dumps({"setting": name, "top_kernels_us": _top_kernels(run(p))}), flush=True)


if __name__ == "__main__":
    main()
