"""The `bench --max-context` search: the longest batch-1 sequence each stack trains for one step.

It finds, by search, the longest batch-1 sequence that trains one step for (a) the stock stack — exactly
`bench/models.build_stock`: peft's `prepare_model_for_kbit_training`, non-reentrant checkpointing,
SDPA, paged AdamW 32-bit; and (b) `loraforge train` with `training.long_context=true`, and the tokens/s of
both at the stock maximum. Each side runs in its own worker process (context_worker.py); the parent only
orchestrates and writes results, and never touches CUDA. The search state is saved after every trial, so
a search cut off by a time limit continues where it stopped on the next call. The memory model
(model/memory.py) predicts both answers; the report puts its prediction beside the measurement.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from loraforge.bench.context_worker import WorkerProc, host_available
from loraforge.bench.device import device_tag, require_cuda
from loraforge.bench.models import ROOT, SHAPES, bench_run
from loraforge.config import RunConfig
from loraforge.errors import LoraforgeError
from loraforge.model.memory import max_trainable_length, memory_model


@dataclass
class Search:
    """Doubling from `start`, then bisection until bad - good <= resolution (the stock baseline's
    maxctx: midpoints rounded down to resolution/2). `bad` is the smallest length known not to fit
    (or, with `bad_untested`, the first doubling step past `hi`)."""

    start: int
    hi: int
    resolution: int = 1024
    good: int = 0
    bad: int | None = None
    bad_untested: bool = False
    trials: list[dict] = field(default_factory=list)

    def next_length(self) -> int | None:
        if self.bad is None:
            n = self.good * 2 if self.good else self.start
            if n > self.hi:
                self.bad, self.bad_untested = n, True
            else:
                return n
        if self.bad - self.good <= self.resolution:
            return None
        step = max(1, self.resolution // 2)
        mid = (self.good + self.bad) // 2 // step * step
        # Nothing past `hi` is probed, bisection included: a midpoint beyond it probes `hi` itself, and once
        # `hi` fits the search ends at "at least hi" (`bad` stays the untested doubling step).
        mid = min(mid, self.hi)
        return mid if self.good < mid < self.bad else None

    def record(self, n: int, ok: bool, **info) -> None:
        self.trials.append({"len": n, "ok": ok, **info})
        if ok:
            self.good = max(self.good, n)
        else:
            self.bad = n if self.bad is None else min(self.bad, n)
            self.bad_untested = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> Search:
        return cls(**d)


CASE = "llama3-8b-qlora-r16-all-linear-bs1"
PROBE_SHARE = 0.35  # a probe trial (forward + 2 layers of backward) against a full step, roughly


def _bench_setup(shape: str) -> tuple[Any, RunConfig]:
    """(model config, run config) of the bench's case, for the memory model."""
    return LlamaConfig(**SHAPES[shape], tie_word_embeddings=False), bench_run(f"{ROOT}/{shape}", 16, "all")


def predicted_max_lengths(shape: str, total_bytes: float, host_bytes: float | None) -> dict[str, int]:
    """The memory model's prediction (model/memory.py) for both sides of the bench."""
    cfg, run = _bench_setup(shape)
    stock = max_trainable_length(cfg, run, total_bytes, stack="stock")
    run.training.long_context = True
    lf = max_trainable_length(cfg, run, total_bytes, stack="loraforge", host_free_bytes=host_bytes)
    return {"stock": stock, "loraforge": lf}


def stock_memory_breakdown(shape: str, tokens: int) -> dict[str, float]:
    """Where the stock stack's memory goes at `tokens` (GiB), from the memory model whose total is
    calibrated against the measured peaks: frozen weights (4-bit + fp32 upcasts), LoRA weights with
    grads and Adam moments, the checkpointed layer inputs, one layer's recompute working set, the
    tokens² attention copies of SDPA's math kernel, and the full-logits loss. The peak is the larger
    of the layer phase and the loss phase on top of the fixed part and the checkpoints."""
    cfg, run = _bench_setup(shape)
    mm = memory_model(cfg, run, stack="stock")
    g, s = 2**30, tokens
    layer = mm["layer"] * s + mm["quadratic"] * s * s
    loss = mm["loss"] * s
    out = {"weights": mm["weights"] / g, "lora_grads_and_adam_states": mm["lora"] / g,
           "dequant_workspace": mm["workspace"] / g, "activation_checkpoints": mm["checkpoints"] * s / g,
           "layer_recompute_linear": mm["layer"] * s / g, "attention_tokens_squared": mm["quadratic"] * s * s / g,
           "logits_and_loss": loss / g, "peak_phase": "layer" if layer >= loss else "loss"}
    out["model_peak"] = (mm["fixed"] + mm["checkpoints"] * s + max(layer, loss)) / g
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def rebuild_report(out_dir: str | Path, shape: str = "llama3-8b", device: str = "cuda") -> Path | None:
    """Rewrite context-<date>-<device>.json from the saved search state, running nothing (e.g. after the
    report gained fields). A state from workers that did not report their versions takes them from the
    same day's speed bench on the same device, and says so."""
    out_dir = Path(out_dir)
    state_path = out_dir / f"context-state-{device}-{shape}.json"
    if not state_path.exists():
        raise LoraforgeError(f"no search state at {state_path}: run the search first (bench/context.py).")
    state = json.loads(state_path.read_text())
    row = _result_row(state, shape)
    if row is None:
        return None
    if not row.get("versions") and row.get("device"):
        speed = out_dir / f"speed-{row['date']}-{device_tag(row['device'])}.json"
        if speed.exists():
            cases = json.loads(speed.read_text())
            if cases and cases[0].get("device") == row["device"]:
                row["versions"] = cases[0].get("versions")
                row["versions_source"] = (f"not recorded by this search; taken from {speed.name}, the speed "
                                          "bench run the same day on the same device image")
    path = out_dir / f"context-{row['date']}-{device_tag(row['device'])}.json"
    path.write_text(json.dumps(row, indent=1))
    return path


def run_max_context_bench(out_dir: str | Path = "bench/results", shape: str = "llama3-8b", *,
                          sides: tuple[str, ...] = ("stock", "loraforge"), device: str = "cuda",
                          stock_start: int = 4096, stock_hi: int = 262144,
                          loraforge_start: int = 65536, loraforge_hi: int | None = None,
                          resolution: int = 1024, probe_layers: int = 2, verify: bool = True,
                          budget_s: float = 500.0, speed_steps: int = 3, stock_max: int | None = None,
                          resume: bool = True, root: str | None = None, simulate_limit: int | None = None,
                          log=None) -> dict:
    """Search both sides' longest trainable batch-1 length; write context-<date>-<device>.json.

    Stops starting new work when the next step would not finish within `budget_s` (estimated from the
    previous trials, quadratic in length); the state file lets the next call continue.
    `probe_layers` > 0: the loraforge search uses probe trials (forward + backward through the last
    `probe_layers` layers, see offload.py), then verifies the result with a full step; 0: full steps.
    `simulate_limit` (CPU smoke tests only): lengths above it count as out of memory without running.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if device == "cuda":
        require_cuda("the max-context search")
    t0 = time.time()  # the budget counts from here, setup included
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(out_dir=out_dir, state_path=out_dir / f"context-state-{device}-{shape}.json", shape=shape,
               device=device, root=root, probe_layers=probe_layers, resolution=resolution, verify=verify,
               speed_steps=speed_steps, stock_max=stock_max, simulate_limit=simulate_limit,
               t0=t0, budget_s=budget_s, log=log)
    if resume and run.state_path.exists():
        run.state = json.loads(run.state_path.read_text())
        log(f"resuming from {run.state_path}")
    run.host = host_available()
    for name in sides:
        ss = run.state.setdefault(name, {})
        if ss.get("done"):
            log(f"{name}: already done in the state file ({run.state_path.name})")
            continue
        if "search" in ss:
            search = Search.from_dict(ss["search"])
        elif name == "stock":  # always to 1,024 whatever `resolution` says: that is the stock baseline's resolution
            search = Search(stock_start, stock_hi, 1024)
        else:
            search = Search(loraforge_start, loraforge_hi or 1 << 20, resolution)
        if run.left() < 60:
            log(f"{name}: no time left in this call's budget; run again to continue")
            break
        worker = _start_worker(run, name)
        if worker is None:
            break
        # An explicit loraforge_hi is the caller's to keep, even past what host memory allows.
        if name == "loraforge" and run.state.get("loraforge_host_cap") and not loraforge_hi:
            search.hi = min(search.hi, run.state["loraforge_host_cap"])
        ss["search"] = search.to_dict()
        run.save()
        side = _Side(name, ss, search, worker, probe=name == "loraforge" and probe_layers > 0)
        if not _run_side(run, side):
            break
    row = _result_row(run.state, shape)
    log(f"max-context bench: {json.dumps(row) if row else 'nothing measured yet'}"
        + (f" -> {run.row_path}" if run.row_path else ""))
    return row or run.state


@dataclass
class _Run:
    """One call of the bench: its settings, its clock, and the search state, which is written out after
    every change so that a call cut off by its time budget loses nothing."""

    out_dir: Path
    state_path: Path
    shape: str
    device: str
    root: str | None
    probe_layers: int
    resolution: int
    verify: bool
    speed_steps: int
    stock_max: int | None
    simulate_limit: int | None
    t0: float
    budget_s: float
    log: Callable[[str], None]
    state: dict[str, Any] = field(default_factory=dict)
    host: float = 0.0  # bytes of host memory free when the call began
    row_path: Path | None = None  # the report last written, for the closing log line

    def save(self) -> None:
        self.state_path.write_text(json.dumps(self.state, indent=1))
        row = _result_row(self.state, self.shape)
        if row is not None:
            self.row_path = self.out_dir / f"context-{row['date']}-{device_tag(row['device'])}.json"
            self.row_path.write_text(json.dumps(row, indent=1))

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    @staticmethod
    def est_time(side_state: dict, n: int) -> float:
        """Seconds of a full step at n, from the longest timed trial so far: attention makes long steps
        grow faster than linearly (length^1.8 here), a probe is taken as 35% of a full step (+10%)."""
        timed = [t for t in side_state.get("trials", []) if t.get("s")]
        if not timed:
            return 0.0
        t = max(timed, key=lambda t: t["len"])
        full = t["s"] / (PROBE_SHARE if t.get("probe") else 1.0)
        r = n / t["len"]
        return 1.1 * full * (r ** 1.8 if r > 1 else r)


@dataclass
class _Side:
    """One side's work in this call. `ss` is that side's entry in the run's state, so what is written
    to it is saved with the next `_Run.save()`."""

    name: str
    ss: dict[str, Any]
    search: Search
    worker: WorkerProc  # replaced when a trial kills it
    probe: bool  # loraforge's search by probe trials, then a full step to verify


class _Stop(Exception):
    """Ends this call early with the state saved (budget spent, worker lost); the next call resumes."""


_LF_ENV = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def _spawn(run: _Run, name: str) -> WorkerProc:
    lf = name == "loraforge"
    # The stock worker takes no probe trials, so it is given no probe layers.
    return WorkerProc(name, run.shape, run.device, run.root, run.probe_layers if lf else 0,
                      _LF_ENV if lf else {}, run.log)


def _start_worker(run: _Run, name: str) -> WorkerProc | None:
    """The side's worker once it reports ready (recorded in the state), or None if it never did."""
    run.log(f"{name}: starting worker")
    w = _spawn(run, name)
    ready = w.read(max(60.0, run.left()))
    if not ready or ready.get("timeout") or ready.get("op") != "ready":
        w.kill()
        run.log(f"{name}: worker did not start ({ready})")
        return None
    run.state[name]["worker"] = ready
    run.state["device"] = ready.get("device", run.device)
    if run.device == "cuda" and "loraforge_host_cap" not in run.state:
        _record_host_limits(run, ready)
    run.log(f"{name}: {json.dumps(ready)}")
    return w


def _record_host_limits(run: _Run, ready: dict) -> None:
    """The loraforge length host memory allows, and the memory model's prediction. Taken from the first
    GPU worker to come up: the prediction needs the GPU's size, and only a worker touches CUDA."""
    L, h = _shape_dims(run.shape)
    run.state["host_available_gib"] = round(run.host / 2**30, 1)
    # Offloaded checkpointing keeps every layer's bf16 input but the last one's in host memory, and the
    # worker's offloader may use 90% of what is free (context_worker.py), so longer cannot train.
    run.state["loraforge_host_cap"] = int(0.9 * run.host / ((L - 1) * h * 2)) // 1024 * 1024
    try:
        run.state["predicted"] = predicted_max_lengths(run.shape, ready["total_gib"] * 2**30, 0.9 * run.host)
    except Exception as e:  # the prediction is a report, never a reason to stop the bench
        run.state["predicted"] = {"error": str(e)[:200]}


def _run_side(run: _Run, side: _Side) -> bool:
    """Speed, search and result of one side; False when it stopped early, which ends this call."""
    stopped = False
    try:
        if side.name == "loraforge" and "speed" not in side.ss:
            _loraforge_speed(run, side)
        _search(run, side)
        _finish(run, side)
    except _Stop as s:
        stopped = True
        run.log(f"{side.name}: stopped: {s}; state saved in {run.state_path}, run again to continue")
        run.save()
    finally:
        # a stopped call is out of time (or its worker is lost): no waiting up to 60 s for a clean quit
        if stopped:
            side.worker.kill()
        else:
            side.worker.close()
    return not stopped


def _loraforge_speed(run: _Run, side: _Side) -> None:
    """tokens/s at the stock maximum, so that both sides' speeds compare at one length (the stock side
    measures its own after its search). Without a stock result, 11,264: the stock maximum on an 80 GB
    GPU (bench/NOTES.md)."""
    n_ref = run.stock_max or run.state.get("stock", {}).get("max_context") or 11264
    side.ss["speed"] = _speed(run, side.worker, n_ref)
    run.log(f"{side.name}: speed {json.dumps(side.ss['speed'])}")
    run.save()


def _search(run: _Run, side: _Side) -> None:
    """Trials until the search closes, each saved as it lands; none is started that the budget would
    not see finish."""
    while (n := side.search.next_length()) is not None:
        need = run.est_time(side.ss["search"], n) * (PROBE_SHARE if side.probe else 1.0)
        if need > run.left():
            raise _Stop(f"next trial ({n} tokens, ~{need:.0f} s) does not fit the {run.left():.0f} s left")
        req = _fits_request(run, n, side.probe if side.name == "loraforge" else None)
        r = side.worker.ask(req, max(10.0, run.left()))
        if r is None:  # died (host OOM killer, CUDA error): that length does not train
            r = {"len": n, "ok": False, "why": "worker died"}
            side.worker.kill()
            side.worker = _restart(run, side.name)
        elif r.get("timeout"):
            raise _Stop(f"trial at {n} ran past the budget; killed")
        r.pop("op", None)
        side.search.record(r.pop("len"), r.pop("ok"), **r)
        side.ss["search"] = side.search.to_dict()
        run.log(f"{side.name}: trial {json.dumps(side.search.trials[-1] | {'len': n})}")
        run.save()


def _restart(run: _Run, name: str) -> WorkerProc:
    w = _spawn(run, name)
    ready = w.read(600)
    if not ready or ready.get("op") != "ready":
        raise _Stop(f"{name} worker did not restart")
    return w


def _finish(run: _Run, side: _Side) -> None:
    """The side's result from its search: stock adds its speed at its maximum; loraforge's probe
    maximum is confirmed by a full step, since a probe only runs part of the backward pass."""
    ss, search = side.ss, side.search
    if side.name == "stock":
        ss["max_context"] = search.good
        if "speed" not in ss and search.good:
            ss["speed"] = _speed(run, side.worker, search.good)
    else:
        ss["probe_max_context"] = search.good if side.probe else None
        if side.probe and run.verify:
            _verify(run, side)
        else:
            ss["max_context"] = search.good
    ss["done"] = "max_context" in ss
    run.save()


def _verify(run: _Run, side: _Side) -> None:
    """A full step at the probe maximum; on failure step down by `resolution`, at most twice."""
    tries = side.ss.setdefault("verify", [])
    n = tries[-1]["len"] - run.resolution if tries and not tries[-1]["ok"] else side.search.good
    for _ in range(3 - len([t for t in tries if not t["ok"]])):
        if n <= 0:
            break
        need = run.est_time({"trials": side.search.trials + tries}, n)  # a full step: no probe share
        if need > run.left():
            raise _Stop(f"verification step at {n} (~{need:.0f} s) does not fit the {run.left():.0f} s left")
        r = side.worker.ask(_fits_request(run, n, False), max(10.0, run.left()))
        if r is None or r.get("timeout"):
            raise _Stop(f"verification at {n}: {r}")
        r.pop("op", None)
        tries.append(r)
        run.log(f"loraforge: verify {json.dumps(r)}")
        run.save()
        if r["ok"]:
            side.ss["max_context"] = n
            return
        n -= run.resolution
    side.ss["max_context"] = None


def _speed(run: _Run, w: WorkerProc, n: int) -> dict:
    r = w.ask({"op": "speed", "n": n, "warm": 1, "steps": run.speed_steps}, max(30.0, run.left()))
    if r is None or r.get("timeout"):
        raise _Stop(f"speed at {n}: {r}")
    return r


def _fits_request(run: _Run, n: int, probe: bool | None) -> dict[str, Any]:
    """A trial at n; `probe` None leaves it out (the stock side, which has no probe trials)."""
    req: dict[str, Any] = {"op": "fits", "n": n}
    if probe is not None:
        req["probe"] = probe
    if run.simulate_limit is not None:
        req["simulate_limit"] = run.simulate_limit
    return req


def _shape_dims(shape: str) -> tuple[int, int]:
    s = SHAPES[shape]
    return s["num_hidden_layers"], s["hidden_size"]


def _result_row(state: dict, shape: str) -> dict | None:
    st, lf = state.get("stock", {}), state.get("loraforge", {})
    if not st.get("search") and not lf.get("search"):
        return None
    smax, lmax = st.get("max_context"), lf.get("max_context")
    sspeed, lspeed = st.get("speed") or {}, lf.get("speed") or {}
    lsearch = lf.get("search") or {}
    row = {
        "case": CASE if shape == "llama3-8b" else f"{shape}-qlora-r16-all-linear-bs1",
        "device": state.get("device"), "date": _dt.date.today().isoformat(), "shape": shape,
        "stock_max_context": smax, "loraforge_max_context": lmax,
        "ratio": round(lmax / smax, 2) if smax and lmax else None,
        "stock_tokens_per_s": sspeed.get("tokens_per_s"), "loraforge_tokens_per_s": lspeed.get("tokens_per_s"),
        "tokens_per_s_at_length": sspeed.get("len") or lspeed.get("len"),
        "complete": bool(st.get("done") and lf.get("done")),
        "loraforge_probe_max_context": lf.get("probe_max_context", lsearch.get("good")),
        "loraforge_search_bracket": [lsearch.get("good"), lsearch.get("bad")] if lsearch else None,
        "loraforge_host_cap": state.get("loraforge_host_cap"),
        "host_available_gib": state.get("host_available_gib"),
        "predicted_max_context": state.get("predicted"),
        "stock_trials": (st.get("search") or {}).get("trials"),
        "loraforge_trials": lsearch.get("trials"), "loraforge_verify": lf.get("verify"),
        "stock_speed": sspeed, "loraforge_speed": lspeed,
        "stock_setup": "bench/models.py build_stock: prepare_model_for_kbit_training (fp32 upcasts), "
                       "non-reentrant checkpointing, SDPA, NF4 double-quant, r16 all-linear, PagedAdamW32bit",
        "loraforge_setup": "bf16 frozen weights, fused LoRA kernels (patch_model), chunked linear CE, "
                           "offloaded non-reentrant checkpointing, SDPA is_causal, PagedAdamW32bit, "
                           "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        "workers": {"stock": st.get("worker"), "loraforge": lf.get("worker")},
        "versions": (st.get("worker") or {}).get("versions") or (lf.get("worker") or {}).get("versions"),
    }
    if smax:
        measured = next((t.get("peak_gib") for t in (st.get("search") or {}).get("trials", [])
                         if t.get("len") == smax and t.get("ok")), None)
        row["stock_memory_at_max"] = {**stock_memory_breakdown(shape, smax), "measured_peak": measured,
                                      "source": "memory model (model/memory.py), total calibrated "
                                                "against the measured peaks; measured_peak is the trial's"}
    return row
