"""The max-context search's worker process: one model (stock or loraforge), one optimizer, trials on request.

The parent (max_context.py) starts `python -m loraforge.bench.context_worker worker --side ...` through
`WorkerProc`, writes one JSON request a line on its stdin ({"op": "fits" | "speed" | "quit", ...}) and reads
one result line back, prefixed with `PREFIX` (everything else the worker prints is log). Each side runs in
its own process: the GPU holds one model at a time, an OOM cannot poison the other side, and an allocator
setting for one side does not leak to the other.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from loraforge.bench.device import versions
from loraforge.bench.models import ROOT, bench_run, build_loraforge, build_stock, make_checkpoint
from loraforge.bench.probe import ProbeStop, probing

PREFIX = "@@ "


def _emit(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


class _Worker:
    """Runs inside the worker process: one model, one optimizer, trials on request."""

    def __init__(self, side: str, shape: str, device: str, root: str, probe_layers: int):
        self.side, self.device = side, device
        self.cuda = device == "cuda"
        path = make_checkpoint(shape, root=root, device=device)
        t = time.time()
        self.info: dict[str, Any] = {"side": side, "shape": shape}
        self.offloader = None
        if side == "stock":
            self.model = build_stock(path, 16, "all", device=device)
        else:
            # `loraforge train` with training.long_context=true; on the CPU (smoke runs) the fast path's
            # math is patched in too, so that the whole pipeline runs there.
            run = bench_run(path, 16, "all", device=device, long_context=True)
            self.model, built = build_loraforge(run, allow_cpu=not self.cuda, log=lambda m: None,
                                                host_limit_bytes=host_available() * 0.9)
            self.info["patch"] = {k: v for k, v in built["patch"].items()
                                  if k in ("patched", "reason", "cross_entropy", "attention", "mlp")}
            self.info["long_context"] = built["long_context"]
            self.offloader = getattr(self.model, "_loraforge_offloader", None)
            self.probe_layers = probe_layers
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cuda:
            import bitsandbytes as bnb  # the stock baseline's optimizer, on both sides; a GPU install has it

            self.opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
        else:
            self.opt = torch.optim.AdamW(params, lr=2e-4)
        self.vocab = self.model.config.vocab_size
        self.info["load_s"] = round(time.time() - t, 1)
        if self.cuda:
            self.info["device"] = torch.cuda.get_device_name(0)
            self.info["total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
        else:
            self.info["device"] = "cpu"
        if side == "loraforge":
            # One short full step first: LoRA grads (kept allocated: zero_grad(set_to_none=False)) and
            # the optimizer state exist before any measured trial, so a probe's peak includes them.
            self._step(512, probe=False)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _step(self, n: int, probe: bool) -> bool:
        """One training step at batch 1 x n; returns whether it stopped early as a probe."""
        x = torch.randint(0, self.vocab, (1, n), device=self.device)
        if self.side == "stock":
            # the stock baseline's one-step fit test, statement for statement
            self.model(input_ids=x, labels=x).loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return False
        probe = probe and self.offloader is not None
        try:
            with probing(self.offloader, self.probe_layers) if probe else nullcontext():
                self.model(input_ids=x, labels=x).loss.backward()
        except ProbeStop:
            self.opt.zero_grad(set_to_none=False)
            return True
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        return False

    def fits(self, n: int, probe: bool = False, simulate_limit: int | None = None) -> dict:
        if simulate_limit is not None and not self.cuda and n > simulate_limit:
            return {"len": n, "ok": False, "simulated": True}
        try:
            if self.cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            self._sync()
            t = time.time()
            probed = self._step(n, probe)
            self._sync()
            out = {"len": n, "ok": True, "s": round(time.time() - t, 2), "probe": probed}
            if self.cuda:
                out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                out["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            return out
        except torch.OutOfMemoryError:
            self.opt.zero_grad(set_to_none=self.side == "stock")
            return {"len": n, "ok": False, "why": "cuda oom"}
        except (RuntimeError, MemoryError) as e:  # host memory (pinning) or CUDA OOM raised as RuntimeError
            if "out of memory" not in str(e).lower() and not isinstance(e, MemoryError):
                raise
            self.opt.zero_grad(set_to_none=self.side == "stock")
            return {"len": n, "ok": False, "why": f"{type(e).__name__}: {str(e)[:160]}"}
        finally:
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()

    def speed(self, n: int, warm: int = 1, steps: int = 3) -> dict:
        times = []
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            for i in range(warm + steps):
                self._sync()
                t = time.time()
                self._step(n, probe=False)
                self._sync()
                if i >= warm:
                    times.append(time.time() - t)
        except torch.OutOfMemoryError:
            return {"len": n, "ok": False, "why": "cuda oom"}
        finally:
            gc.collect()
        times.sort()
        med = times[len(times) // 2]
        out = {"len": n, "ok": True, "step_s": round(med, 4), "tokens_per_s": round(n / med, 1),
               "steps": steps, "warmup": warm}
        if self.cuda:
            out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if self.offloader is not None:
            out["offload"] = self.offloader.stats.as_dict()
        return out


def host_available() -> float:
    """Bytes of host memory available now (what offloaded checkpoints may use)."""
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    return float("inf")


def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=("stock", "loraforge"), required=True)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--root", default=None)
    ap.add_argument("--probe-layers", type=int, default=2)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    if a.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    w = _Worker(a.side, a.shape, a.device, a.root or ROOT, a.probe_layers)
    _emit({"op": "ready", **w.info, "versions": versions()})
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            break
        if op == "fits":
            _emit({"op": "fits", **w.fits(**req)})
        elif op == "speed":
            _emit({"op": "speed", **w.speed(**req)})


class WorkerProc:
    """The parent's handle on one worker process."""

    def __init__(self, side: str, shape: str, device: str, root: str | None, probe_layers: int,
                 env_extra: dict[str, str], log):
        cmd = [sys.executable, "-u", "-m", "loraforge.bench.context_worker", "worker", "--side", side,
               "--shape", shape, "--device", device, "--probe-layers", str(probe_layers)]
        if root:
            cmd += ["--root", root]
        env = dict(os.environ, **env_extra)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self.log = log
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, bufsize=1, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read(self, timeout_s: float) -> dict | None:
        """The next result line, or None if the worker died or the time ran out (then it is killed)."""
        deadline = time.time() + timeout_s
        while True:
            left = deadline - time.time()
            if left <= 0:
                self.kill()
                return {"timeout": True}
            try:
                line = self.lines.get(timeout=min(left, 5.0))
            except queue.Empty:
                continue
            if line is None:
                return None
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
            if "Loading weights" not in line and "warn" not in line.lower() and line.strip():
                self.log("  | " + line.rstrip()[:300])

    def ask(self, req: dict, timeout_s: float) -> dict | None:
        try:
            self.p.stdin.write(json.dumps(req) + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self.read(timeout_s)

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.p.stdin.flush()
                self.p.wait(timeout=60)
            except Exception:
                self.kill()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()




if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
