"""Convergence: held-out perplexity after the same training under each path (issue 21).

    python bench/convergence.py --device cpu  --arms all [--steps 32] [--threads 1] [--out bench/results]
    python bench/convergence.py --device cuda --arms all [--steps 200] [--out DIR]
    python bench/convergence.py --device cuda --arms stock fast
    python bench/convergence.py --device cuda --arms all --parallel 7 --threads 2   # every GPU arm at once

Arms (loraforge.bench.convergence.ARMS): GPU stock, fast, fast-graphs, bf16-lora, nf4-qlora, long-context,
packing; CPU cpu-fp32-lora, cpu-nf4-qlora. Each trains the embedded SmolLM2-135M-Instruct on chitchat with
configs/demo.yaml's settings, same steps, data order and seed, in its own process. Writes
OUT/convergence-<device>-<date>.json (one record per arm, and the criteria) and a PNG of every arm's loss
curve. Exits 1 when an arm fails or runs on a path other than the one it names; 2 on a bad argument or
when --device cuda finds no GPU. Nothing falls back to another device or path.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loraforge.bench.convergence import DEFAULT_STEPS, run_convergence  # noqa: E402
from loraforge.errors import LoraforgeError  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], required=True)
    p.add_argument("--arms", nargs="+", default=["all"], help="arm names, or all (the device's arms)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default: cpu 32, cuda 200)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON and PNG go")
    p.add_argument("--workdir", type=Path, default=None, help="run folders and logs (default: a temp folder)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per arm (1 is faster on shared cores)")
    p.add_argument("--parallel", type=int, default=1,
                   help="arms run at once (held-out perplexity is unchanged; their timings are then not speeds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every arm, e.g. --set data.max_samples=null (repeatable)")
    a = p.parse_args()
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="loraforge-convergence-"))
    try:
        steps = a.steps or DEFAULT_STEPS[a.device]
        path, _ = run_convergence(a.device, a.arms, steps, a.out, workdir, threads=a.threads,
                                  parallel=a.parallel, extra=a.set)
    except LoraforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"results: {path} (run folders and logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
