"""The `bench --max-context` search: the longest batch-1 sequence each stack trains for one step.

It finds, by search, the longest batch-1 sequence that trains one step for (a) the stock stack — exactly
`stock_qlora_baseline.py maxctx`: peft's `prepare_model_for_kbit_training`, non-reentrant checkpointing,
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
    """Doubling from `start`, then bisection until bad - good <= resolution (stock_qlora_baseline's
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
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env_lf = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    state_path = out_dir / f"context-state-{device}-{shape}.json"
    state: dict[str, Any] = {}
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        log(f"resuming from {state_path}")
    host = host_available()
    row_path: Path | None = None

    def save():
        nonlocal row_path
        state_path.write_text(json.dumps(state, indent=1))
        row = _result_row(state, shape)
        if row is not None:
            row_path = out_dir / f"context-{row['date']}-{device_tag(row['device'])}.json"
            row_path.write_text(json.dumps(row, indent=1))

    def left() -> float:
        return budget_s - (time.time() - t0)

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

    for side in sides:
        ss = state.setdefault(side, {})
        if ss.get("done"):
            log(f"{side}: already done in the state file ({state_path.name})")
            continue
        if side == "stock":
            srch = Search.from_dict(ss["search"]) if "search" in ss else Search(stock_start, stock_hi, 1024)
        else:
            hi = loraforge_hi or 1 << 20
            srch = Search.from_dict(ss["search"]) if "search" in ss else Search(loraforge_start, hi, resolution)
        if left() < 60:
            log(f"{side}: no time left in this call's budget; run again to continue")
            break
        log(f"{side}: starting worker")
        w = WorkerProc(side, shape, device, root, probe_layers if side == "loraforge" else 0,
                       env_lf if side == "loraforge" else {}, log)
        ready = w.read(max(60.0, left()))
        if not ready or ready.get("timeout") or ready.get("op") != "ready":
            w.kill()
            log(f"{side}: worker did not start ({ready})")
            break
        ss["worker"] = ready
        state["device"] = ready.get("device", device)
        if device == "cuda" and "loraforge_host_cap" not in state:
            L, h = _shape_dims(shape)
            state["host_available_gib"] = round(host / 2**30, 1)
            state["loraforge_host_cap"] = int(0.9 * host / ((L - 1) * h * 2)) // 1024 * 1024
            try:
                state["predicted"] = predicted_max_lengths(shape, ready["total_gib"] * 2**30, 0.9 * host)
            except Exception as e:  # the prediction is a report, never a reason to stop the bench
                state["predicted"] = {"error": str(e)[:200]}
        if side == "loraforge" and state.get("loraforge_host_cap") and not loraforge_hi:
            srch.hi = min(srch.hi, state["loraforge_host_cap"])
        log(f"{side}: {json.dumps(ready)}")
        ss["search"] = srch.to_dict()
        save()
        stopped = False
        try:
            # tokens/s at the stock maximum (the stock side measures it after its search)
            if side == "loraforge" and "speed" not in ss:
                n_ref = stock_max or state.get("stock", {}).get("max_context") or 11264
                r = w.ask({"op": "speed", "n": n_ref, "warm": 1, "steps": speed_steps}, max(30.0, left()))
                if r is None or r.get("timeout"):
                    raise _Stop(f"speed at {n_ref}: {r}")
                ss["speed"] = r
                log(f"{side}: speed {json.dumps(r)}")
                save()
            probe = side == "loraforge" and probe_layers > 0
            while True:
                n = srch.next_length()
                if n is None:
                    break
                need = est_time(ss["search"], n) * (PROBE_SHARE if probe else 1.0)
                if need > left():
                    raise _Stop(f"next trial ({n} tokens, ~{need:.0f} s) does not fit the {left():.0f} s left")
                req: dict[str, Any] = {"op": "fits", "n": n}
                if side == "loraforge":
                    req["probe"] = probe
                if simulate_limit is not None:
                    req["simulate_limit"] = simulate_limit
                r = w.ask(req, max(10.0, left()))
                if r is None:  # died (host OOM killer, CUDA error): that length does not train
                    r = {"len": n, "ok": False, "why": "worker died"}
                    w.kill()
                    w = _restart(side, shape, device, root, probe_layers, env_lf, log)
                elif r.get("timeout"):
                    raise _Stop(f"trial at {n} ran past the budget; killed")
                r.pop("op", None)
                srch.record(r.pop("len"), r.pop("ok"), **r)
                ss["search"] = srch.to_dict()
                log(f"{side}: trial {json.dumps(srch.trials[-1] | {'len': n})}")
                save()
            if side == "stock":
                ss["max_context"] = srch.good
                if "speed" not in ss and srch.good:
                    r = w.ask({"op": "speed", "n": srch.good, "warm": 1, "steps": speed_steps}, max(30.0, left()))
                    if r is None or r.get("timeout"):
                        raise _Stop(f"speed at {srch.good}: {r}")
                    ss["speed"] = r
            else:
                ss["probe_max_context"] = srch.good if probe else None
                if probe and verify:
                    _verify(w, ss, srch, resolution, left, est_time, log, save, simulate_limit)
                else:
                    ss["max_context"] = srch.good
            ss["done"] = "max_context" in ss
            save()
        except _Stop as s:
            stopped = True
            log(f"{side}: stopped: {s}; state saved in {state_path}, run again to continue")
            save()
        finally:
            w.close() if not stopped else w.kill()
        if stopped:
            break
    row = _result_row(state, shape)
    log(f"max-context bench: {json.dumps(row) if row else 'nothing measured yet'}"
        + (f" -> {row_path}" if row_path else ""))
    return row or state


class _Stop(Exception):
    pass


def _restart(side, shape, device, root, probe_layers, env_lf, log) -> WorkerProc:
    w = WorkerProc(side, shape, device, root, probe_layers, env_lf if side == "loraforge" else {}, log)
    ready = w.read(600)
    if not ready or ready.get("op") != "ready":
        raise _Stop(f"{side} worker did not restart")
    return w


def _verify(w, ss, srch, resolution, left, est_time, log, save, simulate_limit) -> None:
    """A full step at the probe maximum; on failure step down by `resolution`, at most twice."""
    tries = ss.setdefault("verify", [])
    n = tries[-1]["len"] - resolution if tries and not tries[-1]["ok"] else srch.good
    for _ in range(3 - len([t for t in tries if not t["ok"]])):
        if n <= 0:
            break
        need = est_time({"trials": srch.trials + tries}, n) * 1.0
        if need > left():
            raise _Stop(f"verification step at {n} (~{need:.0f} s) does not fit the {left():.0f} s left")
        req = {"op": "fits", "n": n, "probe": False}
        if simulate_limit is not None:
            req["simulate_limit"] = simulate_limit
        r = w.ask(req, max(10.0, left()))
        if r is None or r.get("timeout"):
            raise _Stop(f"verification at {n}: {r}")
        r.pop("op", None)
        tries.append(r)
        log(f"loraforge: verify {json.dumps(r)}")
        save()
        if r["ok"]:
            ss["max_context"] = n
            return
        n -= resolution
    ss["max_context"] = None


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
        "stock_setup": "stock_qlora_baseline.py maxctx: prepare_model_for_kbit_training (fp32 upcasts), "
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
