"""Stock QLoRA stack vs loraforge's fast path on one GPU.

    python bench/speed.py [CASE ...] [--out bench/results] [--steps 20] [--warmup 3] [--no-ablations]

The logic lives in `loraforge.bench.speed.run_speed_bench` (what `loraforge bench` calls); this
file only parses arguments. Cases: see `loraforge.bench.speed.CASES`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loraforge.bench.speed import CASES, run_speed_bench  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help=f"default: all of {sorted(CASES)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-graphs", action="store_true", help="fast path without CUDA graphs")
    ap.add_argument("--diagnose", action="store_true", help="phase times, CPU profile, bf16 grad floor")
    a = ap.parse_args(argv)
    run_speed_bench(a.cases or None, a.out, warm=a.warmup, steps=a.steps,
                    ablations=not a.no_ablations, profile=not a.no_profile, graphs=not a.no_graphs,
                    diagnose=a.diagnose)


if __name__ == "__main__":
    from loraforge.errors import LoraforgeError

    try:
        main()
    except LoraforgeError as e:  # what the user can fix: the message, no traceback
        sys.exit(f"error: {e}")
