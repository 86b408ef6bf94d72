"""Longest trainable batch-1 sequence: the stock QLoRA stack vs loraforge's long-context path.

    python bench/context.py [--shape llama3-8b] [--out bench/results] [--stock-only | --loraforge-only]
                            [--budget-s 500] [--loraforge-start 65536] [--resolution 1024]
                            [--probe-layers 2] [--no-verify] [--fresh]
    python bench/context.py --tiny --device cpu          # CPU smoke run of the whole pipeline

The logic lives in `loraforge.bench.max_context.run_max_context_bench` (what `loraforge bench
--max-context` calls). The search state is kept in <out>/context-state-<device>-<shape>.json: a call
that runs out of its time budget stops cleanly, and the next call continues the search.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loraforge.bench.max_context import rebuild_report, run_max_context_bench  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--tiny", action="store_true", help="the tiny shape (2 layers), small lengths")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    side = ap.add_mutually_exclusive_group()
    side.add_argument("--stock-only", action="store_true")
    side.add_argument("--loraforge-only", action="store_true")
    ap.add_argument("--budget-s", type=float, default=500.0, help="stop starting new trials after this")
    ap.add_argument("--stock-start", type=int, default=4096)
    ap.add_argument("--loraforge-start", type=int, default=65536)
    ap.add_argument("--loraforge-hi", type=int, default=None, help="default: what host RAM can hold")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--probe-layers", type=int, default=2, help="0: every loraforge trial is a full step")
    ap.add_argument("--no-verify", action="store_true", help="skip the full step at the probe maximum")
    ap.add_argument("--stock-max", type=int, default=None, help="length for loraforge's tokens/s "
                    "(default: the stock result in the state file, else 11264)")
    ap.add_argument("--speed-steps", type=int, default=3)
    ap.add_argument("--simulate-limit", type=int, default=None, help="CPU only: longer counts as OOM")
    ap.add_argument("--fresh", action="store_true", help="ignore the saved search state")
    ap.add_argument("--root", default=None, help="where the random-weight checkpoint is written")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the result JSON from the saved state; run nothing")
    a = ap.parse_args(argv)
    if a.report_only:
        print(rebuild_report(a.out, "tiny" if a.tiny else a.shape, a.device))
        return
    shape = "tiny" if a.tiny else a.shape
    kw = {}
    if a.tiny:
        kw = dict(stock_start=64, loraforge_start=128, resolution=64,
                  simulate_limit=a.simulate_limit or (512 if a.device == "cpu" else None))
    sides = ("stock",) if a.stock_only else ("loraforge",) if a.loraforge_only else ("stock", "loraforge")
    kw = dict(dict(stock_start=a.stock_start, loraforge_start=a.loraforge_start, resolution=a.resolution,
                   simulate_limit=a.simulate_limit), **kw)
    run_max_context_bench(a.out, shape, sides=sides, device=a.device, loraforge_hi=a.loraforge_hi,
                          probe_layers=a.probe_layers, verify=not a.no_verify, budget_s=a.budget_s,
                          speed_steps=a.speed_steps, stock_max=a.stock_max, resume=not a.fresh,
                          root=a.root, **kw)


if __name__ == "__main__":
    from loraforge.errors import LoraforgeError

    try:
        main()
    except LoraforgeError as e:  # what the user can fix: the message, no traceback
        sys.exit(f"error: {e}")
