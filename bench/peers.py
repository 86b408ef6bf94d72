"""Unsloth as a peer (issue 26): the stock QLoRA stack, Unsloth and loraforge on the same random-weight checkpoint
and the same shapes, in one call, each arm in its own process.

Device command lines, from the repo root, with the folder /work/shared/tools/peer_site.sh builds (Unsloth 2026.10.9,
TRL, bitsandbytes) carried as .gpu/site and the end-to-end data in .gpu/e2e; one case a call (~9 minutes each):

    export PYTHONPATH=$PWD/.gpu/site:$PWD/src PYTHONUNBUFFERED=1
    python bench/peers.py --cases step --budget-s 500 --out $OUT --tag=-step          # ~7.5 min
    python bench/peers.py --cases e2e --budget-s 500 --out $OUT --tag=-e2e            # ~4.5 min
    rm -rf /dev/shm/loraforge-ckpt/llama2-7b*  # host memory for the offloaded checkpoints of long sequences
    python bench/peers.py --cases context --budget-s 500 --out $OUT --tag=-context1    # then, with that JSON
    python bench/peers.py --cases context --budget-s 500 --out $OUT --tag=-context2 \\
        --resume bench/results/peers-DATE-h200-context1.json                           # ... until complete

Cases, as the records name them:
- step: `llama2-7b-r16-all-4x512`, `llama3-8b-r16-all-4x512`. QLoRA (NF4, double quant, bf16 compute), LoRA r=16
  alpha 32 on all seven projections, batch 4 x 512, 3 warm-up and 20 timed steps of the stock baseline's loop
  (forward with labels, backward, clip 0.3, paged AdamW step) on the same four random batches. Arms `stock`,
  `unsloth`, `loraforge`, `loraforge-offload` (the checkpoints in host memory; peers_arms.py, peers_unsloth.py):
  `tokens_per_s` (median step), `peak_gib`.
- context: `llama3-8b-max-context-80gib`. Batch 1, every probe process capped at 80 GiB
  (`torch.cuda.set_per_process_memory_fraction`); the longest length that trains one step, by doubling from
  --context-start and then bisection to --context-resolution (loraforge.bench.max_context.Search), every probe
  its own process (an OOM can leave a process unusable). `unsloth` with use_gradient_checkpointing="unsloth";
  `loraforge` through the max-context search's own worker (probe trials, then a full step at the probe maximum);
  `stock` on request (--arms). `max_tokens` (once the search has closed), `first_failing`, the trials. Probes at
  ~300K tokens take minutes, so the search stops cleanly when the next probe would overrun --budget-s; --resume
  with this call's JSON continues it.
- e2e: `train-e2e-llama2-7b`. 40 steps of batch 4 x 512 packed Alpaca rows (--data, --tokenizer: bench/train_e2e.py's
  data, shape and settings, dropout 0). `loraforge-train` and `bench` run bench/train_e2e.py; `unsloth-sft` runs
  Unsloth + TRL SFTTrainer (packing=True, paged_adamw_32bit). `wall_s` from process start to saved adapter,
  `tokens_per_s` over steps 11-40.

Writes <out>/peers-<date>-<device><tag>.json, one record per case and arm with its metric fields, `settings`,
`command`, `versions`, `device`, `date` (rewritten after every arm, so a call cut off keeps what it measured), and
<out>/peers-logs-<date>-<device><tag>.tar.gz with every process's output. An arm that fails, or runs past its time,
is a record with `error`; the other arms still run. Exit status 0 when it ran, 2 for a usage error or no CUDA GPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "src")]

from peers_common import parse_result  # noqa: E402

from loraforge.bench.device import device_tag, require_cuda, stamp  # noqa: E402
from loraforge.bench.max_context import _LF_ENV, PROBE_SHARE, Search  # noqa: E402
from loraforge.bench.models import SHAPES  # noqa: E402
from loraforge.data.records import normalize  # noqa: E402
from loraforge.data.sources import iter_source  # noqa: E402
from loraforge.data.templates import alpaca_prompt  # noqa: E402
from loraforge.errors import ConfigError, DataError, LoraforgeError  # noqa: E402

# In the order they run: the two the issue compares first, so that a call cut short loses stock (measured often).
ARMS = {"step": ("unsloth", "loraforge", "loraforge-offload", "stock"), "context": ("unsloth", "loraforge", "stock"),
        "e2e": ("loraforge-train", "bench", "unsloth-sft")}
DEFAULT_ARMS = {"step": ARMS["step"], "context": ("unsloth", "loraforge"), "e2e": ARMS["e2e"]}
UNSLOTH_PACKAGES = ("unsloth", "unsloth_zoo", "trl")  # stamped from metadata; the arm's process reports its own too
BATCH, SEQ, R = 4, 512, 16
E2E_SHAPE = "llama2-7b"
CONTEXT_SHAPE = "llama3-8b"
RESERVE_S = 15.0  # kept back from the budget for writing the results
MIN_ARM_S = 60.0  # no arm is started with less time than this left
GROWTH = 1.8  # a long step's time grows as length^1.8 (attention), the max-context search's estimate
PEAK_DEF = ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats() at the start of the timed steps, "
            "the same in every arm. The paged optimizer states live in CUDA unified memory, outside the "
            "allocator, in every arm alike.")
SUMMARY = ("case", "arm", "tokens_per_s", "peak_gib", "peak_gib_with_graph_pool", "max_tokens", "first_failing",
           "longest_ok_so_far", "complete", "wall_s", "error")


# --- processes ---------------------------------------------------------------------------------------------------

@dataclass
class Child:
    """One arm's process, once it has ended."""

    cmd: list[str]
    log: Path
    returncode: int | None = None
    wall_s: float = 0.0
    timed_out: bool = False
    result: dict[str, Any] | None = None  # its result line
    tail: str = ""  # the end of its output

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None and "error" not in self.result

    def error(self) -> str | None:
        if self.ok:
            return None
        if self.timed_out:
            why = f"ran past its {self.wall_s:.0f} s and was killed"
        elif self.result and "error" in self.result:
            why = f"{self.result['error']}\n{self.result.get('traceback', '')[-1500:]}"
        else:
            why = f"exited with status {self.returncode} before printing a result"
        return f"{why}\n--- output tail ---\n{self.tail[-1500:]}"


def run_child(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Child:
    """Runs `cmd` to its end or `timeout_s`, its output to `log`. It gets its own process group, killed when it
    ends, so nothing it started (dataset workers, compile workers) outlives it holding memory."""
    c = Child(cmd, log)
    t = time.perf_counter()
    with log.open("w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        try:
            c.returncode = p.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            c.timed_out = True
        finally:
            _kill_group(p)
    c.wall_s = time.perf_counter() - t
    text = log.read_text(errors="replace")
    c.result, c.tail = parse_result(text), text[-3000:]
    return c


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    p.wait()


# --- records -----------------------------------------------------------------------------------------------------

def arm_record(case: str, arm: str, meta: dict[str, Any], *, child: Child | None = None,
               result: dict[str, Any] | None = None, error: str | None = None,
               settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """One arm's record: case, arm, its metric fields (`result`), `error` if it failed, `settings`, how it ran
    (`command`, `process_wall_s`, `process_returncode`, `log`), and the stamp (`device`, `date`, `versions`: the
    parent's, overridden by what the arm's process reported of the libraries it imported)."""
    result = dict(result or {})
    child_versions = result.pop("versions", None) or {}
    result.pop("traceback", None)
    rec: dict[str, Any] = {"case": case, "arm": arm, **result}
    if error:
        rec["error"] = error
    if settings:
        rec["settings"] = settings
    if child is not None:
        rec.update(command=shlex.join(child.cmd), process_wall_s=round(child.wall_s, 1),
                   process_returncode=child.returncode, log=f"peers-logs/{child.log.name}")
    rec.update(meta)
    rec["versions"] = {**meta.get("versions", {}), **child_versions}
    return rec


def outcome(c: Child) -> tuple[dict[str, Any] | None, str | None]:
    """(metrics, None) from an arm that answered, else (None, why it did not)."""
    return (dict(c.result or {}), None) if c.ok else (None, c.error())


# --- the context search ------------------------------------------------------------------------------------------

@dataclass
class ContextState:
    """One arm's max-context search across calls: the search, the full-step verification of a probe maximum
    (loraforge), how many calls it took, and why the last one stopped before the end (None: it did not)."""

    search: Search
    verify: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    stopped: dict[str, Any] | None = None

    @classmethod
    def resume(cls, prev: dict[str, Any] | None, start: int, hi: int, resolution: int) -> ContextState:
        if prev and prev.get("search"):
            return cls(Search.from_dict(prev["search"]), list(prev.get("verify") or []), int(prev.get("calls", 0)))
        return cls(Search(start, hi, resolution))

    def closed(self) -> bool:
        return copy.deepcopy(self.search).next_length() is None  # next_length may move `bad` past `hi`

    def verified(self) -> int | None:
        return next((t["len"] for t in self.verify if t.get("ok")), None)


def estimate_s(trials: list[dict[str, Any]], n: int, scale: float = 1.0) -> float:
    """Seconds a probe process at n should take, from the longest timed one: its start-up (process wall time
    less the step) plus its step scaled by (n/len)^1.8 above it, linearly below; `scale` on the step (a full
    step from probe trials). 0 without a timed trial."""
    timed = [t for t in trials if t.get("ok") and t.get("s")]
    if not timed:
        return 0.0
    t = max(timed, key=lambda t: t["len"])
    startup = max(0.0, t.get("wall_s", t["s"]) - t["s"])
    r = n / t["len"]
    return startup + scale * t["s"] * (r ** GROWTH if r > 1 else r)


def trial_from_child(c: Child, n: int) -> dict[str, Any]:
    """A probe's trial {"len", "ok", ...}. A process the kernel killed (the host's OOM killer: offloaded
    activations fill host memory) did not fit either; a timeout or any other failure is not a trial."""
    base: dict[str, Any] = {"len": n, "wall_s": round(c.wall_s, 1), "log": c.log.name}
    if c.timed_out:
        return {**base, "timeout": True}
    r = c.result or {}
    if "ok" in r and "error" not in r:
        keep = ("ok", "s", "s_to_failure", "peak_gib", "reserved_gib", "why", "probe", "load_s")
        return {**base, **{k: r[k] for k in keep if k in r}}
    if c.result is None and c.returncode is not None and c.returncode < 0:
        return {**base, "ok": False, "why": f"killed by signal {-c.returncode} (host memory, most likely)"}
    return {**base, "error": c.error()}


def search_longest(state: ContextState, probe: Callable[[int], dict[str, Any]], left: Callable[[], float],
                   save: Callable[[], None]) -> str:
    """Probes the lengths the search asks for until it closes ("done"), saving after each; stops early when
    the next probe would not finish in the time left ("budget"), or a probe timed out or failed other than by
    memory ("timeout", "error"), keeping why in `state.stopped`."""
    s = state.search
    while (n := s.next_length()) is not None:
        need = max(MIN_ARM_S, estimate_s(s.trials, n))
        if need > left():
            state.stopped = {"why": "budget", "next_len": n, "estimate_s": round(need), "left_s": round(left())}
            return "budget"
        t = dict(probe(n))
        if "timeout" in t or "error" in t:
            state.stopped = {"why": "timeout" if "timeout" in t else "error", **t}
            return state.stopped["why"]
        s.record(t.pop("len"), t.pop("ok"), **t)
        save()
    state.stopped = None
    return "done"


def verify_longest(state: ContextState, full_step: Callable[[int], dict[str, Any]], left: Callable[[], float],
                   save: Callable[[], None], resolution: int, tries: int = 3) -> str:
    """A full step at the probe maximum, since a probe runs only part of the backward pass; on failure one
    `resolution` shorter, `tries` steps in all (the max-context search's rule)."""
    if state.verified() is not None or len(state.verify) >= tries:
        return "done"
    n = state.verify[-1]["len"] - resolution if state.verify else state.search.good
    while len(state.verify) < tries and n > 0:
        need = max(MIN_ARM_S, estimate_s(state.search.trials, n, scale=1 / PROBE_SHARE))
        if need > left():
            state.stopped = {"why": "budget", "next_len": n, "full_step": True, "estimate_s": round(need),
                             "left_s": round(left())}
            return "budget"
        t = full_step(n)
        if "timeout" in t or "error" in t:
            state.stopped = {"why": "timeout" if "timeout" in t else "error", "full_step": True, **t}
            return state.stopped["why"]
        state.verify.append(t)
        save()
        if t["ok"]:
            break
        n -= resolution
    state.stopped = None
    return "done"


def context_record(case: str, arm: str, state: ContextState, meta: dict[str, Any], settings: dict[str, Any],
                   probed: bool) -> dict[str, Any]:
    """The arm's max-context record. `max_tokens` only once the search has closed (and, for probe trials, a
    full step has confirmed it); until then `longest_ok_so_far` is a lower bound."""
    s = state.search
    closed = state.closed()
    if probed:
        nothing_fits = closed and s.good == 0  # no probe trained, so there is nothing to verify
        max_tokens = (0 if nothing_fits else state.verified()) if closed else None
        complete = closed and (max_tokens is not None or len(state.verify) >= 3)
        failed_full = [t["len"] for t in state.verify if not t.get("ok")]
        first_failing = min(failed_full) if failed_full else s.bad
    else:
        max_tokens = s.good if closed else None
        complete, first_failing = closed, s.bad
    at_max = next((t for t in reversed(state.verify + s.trials) if t.get("ok") and t["len"] == max_tokens), {})
    rec = {"case": case, "arm": arm, "max_tokens": max_tokens, "first_failing": first_failing,
           "first_failing_untested": s.bad_untested if first_failing == s.bad else False,
           "longest_ok_so_far": s.good, "complete": complete, "peak_gib_at_max": at_max.get("peak_gib"),
           "step_s_at_max": at_max.get("s"), "calls": state.calls, "stopped": state.stopped,
           "search": s.to_dict(), "verify": state.verify, "settings": settings}
    if probed:
        rec["probe_max_tokens"] = s.good if closed else None
    return arm_record(case, arm, meta, result=rec)


# --- one call ----------------------------------------------------------------------------------------------------

class Bench:
    """One call: its clock and budget, its work folder, the records so far (written out after every change),
    the GPU's facts, and the checkpoints made."""

    def __init__(self, a: argparse.Namespace, argv: list[str], resumed: dict[tuple[str, str], dict],
                 texts: list[str] | None):
        self.a, self.t0, self.resumed, self.texts = a, time.time(), resumed, texts
        self.invocation = shlex.join([sys.executable, str(Path(__file__)), *argv])
        self.work = Path(a.work).resolve()
        for mine in ("logs", "e2e"):  # this call's logs and runs only (Unsloth's compiled cache stays)
            shutil.rmtree(self.work / mine, ignore_errors=True)
        (self.work / "logs").mkdir(parents=True)
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self.checkpoints: dict[tuple, str | None] = {}
        c = self.child("device", [sys.executable, str(HERE / "peers_arms.py"), "device"], 120)
        self.device = c.result if c.ok else {"name": "unknown GPU", "error": c.error()}
        stem = f"{_today()}-{device_tag(self.device['name'])}{a.tag}"
        self.json_path, self.tar_path = self.out / f"peers-{stem}.json", self.out / f"peers-logs-{stem}.tar.gz"
        if not c.ok:
            self.put(arm_record("device", "peers.py", self.meta(), child=c, error=c.error()))

    def left(self) -> float:
        return self.a.budget_s - (time.time() - self.t0) - RESERVE_S

    def arms(self, case: str) -> list[str]:
        return [x for x in ARMS[case] if x in (self.a.arms or DEFAULT_ARMS[case])]

    def meta(self, unsloth: bool = False) -> dict[str, Any]:
        return {**stamp(self.device.get("name", "unknown GPU"), UNSLOTH_PACKAGES if unsloth else ()),
                "invocation": self.invocation}

    def child(self, name: str, cmd: list[str], timeout_s: float, env_extra: dict[str, str] | None = None) -> Child:
        """`cmd` in the work folder (where Unsloth writes its compiled cache), offline, PYTHONPATH made absolute."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               "UNSLOTH_DISABLE_STATISTICS": "1", **(env_extra or {})}
        if env.get("PYTHONPATH"):  # the children run in the work folder
            env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep)
                                                if p)
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        c = run_child(cmd, self.work / "logs" / f"{len(list((self.work / 'logs').iterdir())):03d}-{safe}.log",
                      timeout_s, env, self.work)
        print(f"[{time.time() - self.t0:6.0f} s] {name}: {'ok' if c.ok else 'FAILED'} in {c.wall_s:.0f} s",
              flush=True)
        return c

    def put(self, rec: dict[str, Any]) -> None:
        """Adds the record (replacing the one of the same case and arm), then writes the results and logs."""
        self.records = [r for r in self.records if (r["case"], r["arm"]) != (rec["case"], rec["arm"])] + [rec]
        self.json_path.write_text(json.dumps(self.records, indent=1))
        with tarfile.open(self.tar_path, "w:gz") as tar:
            tar.add(self.work / "logs", arcname="peers-logs")
            for f in sorted((self.work / "e2e").glob("*.log")) + sorted((self.work / "e2e").glob("*.json")):
                tar.add(f, arcname=f"peers-logs/e2e/{f.name}")
        line = {k: rec[k] for k in SUMMARY if rec.get(k) is not None}
        if "error" in line:
            line["error"] = str(line["error"])[:400]
        print(json.dumps(line), flush=True)

    def checkpoint(self, case: str, shape: str, *, word_tokenizer: bool = False,
                   tokenizer: str | None = None) -> str | None:
        """The random-weight checkpoint (made once, in /dev/shm, by loraforge.bench.models.make_checkpoint), with
        a word-level tokenizer for Unsloth or `tokenizer`'s; None (and a record saying why) if it failed."""
        key = (shape, word_tokenizer, tokenizer)
        if key not in self.checkpoints:
            cmd = [sys.executable, str(HERE / "peers_arms.py"), "make", "--shape", shape]
            cmd += (["--word-tokenizer"] if word_tokenizer else []) + (["--tokenizer", tokenizer] if tokenizer else [])
            c = self.child(f"make-{shape}", cmd, max(MIN_ARM_S, min(600.0, self.left())))
            self.checkpoints[key] = c.result["path"] if c.ok else None
            if not c.ok:
                self.put(arm_record(case, "checkpoint", self.meta(), child=c, error=c.error()))
        return self.checkpoints[key]

    def skip(self, case: str, arm: str, why: str) -> None:
        self.put(arm_record(case, arm, self.meta(arm.startswith("unsloth")), error=f"not run: {why}"))


def _today() -> str:
    return _dt.date.today().isoformat()


# --- the cases ---------------------------------------------------------------------------------------------------

STACKS = {
    "stock": "transformers + peft + bitsandbytes as loraforge.bench.models.build_stock builds it: "
             "prepare_model_for_kbit_training (fp32 upcasts), non-reentrant checkpointing, SDPA",
    "unsloth": "Unsloth FastLanguageModel.from_pretrained(load_in_4bit=True, dtype=bfloat16), get_peft_model(r=16, "
               "lora_alpha=32, lora_dropout=0, bias='none', all seven projections, "
               "use_gradient_checkpointing='unsloth'); Unsloth's own allocator setting",
    "loraforge": "as `loraforge train` builds it (loraforge.bench.models.build_loraforge): bf16 frozen weights, fused "
                 "LoRA, CUDA graphs, chunked loss, with training.offload_activations: false (the checkpoints on the "
                 "GPU). peak_gib_with_graph_pool adds the CUDA-graph pool's free bytes to peak_gib: what "
                 "bench/speed.py reports as loraforge_peak_gib (an upper bound)",
    "loraforge-offload": "the loraforge arm with training.offload_activations: each checkpointed layer's input in "
                         "pinned host memory from its forward to its backward (Unsloth's default, and a one-GPU "
                         "`loraforge train`'s since 2026-12-03 session 10), the layers still replayed as CUDA graphs",
}


def run_step(b: Bench) -> None:
    arms = b.arms("step")
    for shape in b.a.shapes:
        case = f"{shape}-r{R}-all-{BATCH}x{SEQ}"
        path = b.checkpoint(case, shape, word_tokenizer="unsloth" in arms) if arms else None
        settings = {"shape": shape, "batch": BATCH, "seq": SEQ, "r": R, "lora_alpha": 2 * R, "lora_dropout": 0.0,
                    "targets": "q,k,v,o,gate,up,down", "quant": "NF4, double quant, bf16 compute",
                    "warmup_steps": b.a.warmup, "timed_steps": b.a.steps, "clip": 0.3, "lr": 2e-4,
                    "batches": "4 random batches drawn on the CPU (seed 0), cycled; labels = input_ids; no mask",
                    "tokens_per_s": "batch x seq / median wall time of the timed steps, each synchronized",
                    "peak_gib": PEAK_DEF, "checkpoint": path}
        for arm in arms:
            if path is None or b.left() < MIN_ARM_S:
                b.skip(case, arm, "no checkpoint (see its record)" if path is None else "the time budget is spent")
                continue
            script = "peers_unsloth.py" if arm == "unsloth" else "peers_arms.py"
            cmd = [sys.executable, str(HERE / script), "step", *(["--side", arm] if arm != "unsloth" else []),
                   "--path", path, "--batch", str(BATCH), "--seq", str(SEQ), "--warmup", str(b.a.warmup),
                   "--steps", str(b.a.steps)]
            c = b.child(f"{case}-{arm}", cmd, min(b.a.arm_timeout_s, b.left()))
            result, error = outcome(c)
            b.put(arm_record(case, arm, b.meta(arm == "unsloth"), child=c, result=result, error=error,
                             settings={**settings, "stack": STACKS[arm]}))


def run_context(b: Bench) -> None:
    arms = b.arms("context")
    case = f"{CONTEXT_SHAPE}-max-context-{b.a.context_cap_gib:g}gib"
    path = b.checkpoint(case, CONTEXT_SHAPE, word_tokenizer="unsloth" in arms) if arms else None
    for arm in arms:
        if path is None:
            b.skip(case, arm, "no checkpoint (see its record)")
        else:
            _context_arm(b, case, arm, path)


def _context_arm(b: Bench, case: str, arm: str, path: str) -> None:
    """One arm's search (continued from --resume), then, for probe trials, the full-step verification."""
    a = b.a
    state = ContextState.resume(b.resumed.get((case, arm)), context_start(a, arm), a.context_hi,
                                a.context_resolution)
    state.calls += 1
    probed = arm == "loraforge" and a.probe_layers > 0
    meta, settings = b.meta(arm == "unsloth"), _context_settings(b, arm, probed)

    def save() -> None:
        b.put(context_record(case, arm, state, meta, settings, probed))

    def probe(n: int, probe_mode: bool) -> dict[str, Any]:
        if arm == "unsloth":
            cmd = [sys.executable, str(HERE / "peers_unsloth.py"), "fits", "--path", path]
        else:
            cmd = [sys.executable, str(HERE / "peers_arms.py"), "fits", "--side", arm, "--shape", CONTEXT_SHAPE]
            cmd += ["--probe", "--probe-layers", str(a.probe_layers)] if probe_mode else []
        cmd += ["--n", str(n), "--cap-gib", f"{a.context_cap_gib:g}"]
        c = b.child(f"{case}-{arm}-{n}{'-probe' if probe_mode else ''}", cmd, b.left(),
                    _LF_ENV if arm == "loraforge" else None)
        return trial_from_child(c, n)

    why = search_longest(state, lambda n: probe(n, probed), b.left, save)
    if why == "done" and probed:
        verify_longest(state, lambda n: probe(n, False), b.left, save, state.search.resolution)
    save()


def _context_settings(b: Bench, arm: str, probed: bool) -> dict[str, Any]:
    a = b.a
    how = {"unsloth": STACKS["unsloth"] + "; max_seq_length = the probe's length; bitsandbytes PagedAdamW32bit; "
                                          "one step: forward with labels, backward, optimizer step",
           "loraforge": "the max-context search's worker (loraforge.bench.context_worker): training.long_context "
                        "(offloaded checkpoints, chunked loss), PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
                        + (f"; probe trials (forward + backward through the last {a.probe_layers} layers), then a "
                           "full step at the probe maximum, one resolution shorter on failure (3 tries)"
                           if probed else "; full steps"),
           "stock": STACKS["stock"] + "; the max-context search's worker, one full step"}[arm]
    return {"shape": CONTEXT_SHAPE, "batch": 1, "r": R, "lora_alpha": 2 * R, "targets": "q,k,v,o,gate,up,down",
            "quant": "NF4, double quant, bf16 compute", "memory_cap_gib": a.context_cap_gib,
            "cap": "torch.cuda.set_per_process_memory_fraction(cap / total) in each probe process before loading",
            "search": "doubling, then bisection until first_failing - max_tokens <= resolution "
                      "(loraforge.bench.max_context.Search); each probe its own process; resumable across calls",
            "start": context_start(a, arm), "hi": a.context_hi, "resolution": a.context_resolution,
            "host_available_gib": b.device.get("host_available_gib"), "stack": how}


def run_e2e(b: Bench) -> None:
    a, arms = b.a, b.arms("e2e")
    case = f"train-e2e-{E2E_SHAPE}"
    tok, data = str(Path(a.tokenizer).resolve()), str(Path(a.data).resolve())
    path = b.checkpoint(case, E2E_SHAPE, tokenizer=tok) if arms else None
    settings = {"shape": f"{E2E_SHAPE}, vocabulary raised to the tokenizer's (bench/train_e2e.py)", "data": data,
                "tokenizer": tok, "steps": a.e2e_steps, "batch": BATCH, "max_length": SEQ, "packing": True,
                "r": R, "lora_alpha": 2 * R, "lora_dropout": 0.0, "targets": "all-linear", "lr": 2e-4,
                "optimizer": "paged_adamw_32bit", "weight_decay": 0.01, "schedule": "cosine, 2 warm-up steps",
                "clip": 0.3, "tokens_per_s": "tokens over steps 11-40 / their seconds (bench/train_e2e.py's window)",
                "wall_s": "from process start to the saved adapter (the process's end)", "checkpoint": path}
    stacks = {"loraforge-train": "python -m loraforge.cli train through bench/train_e2e.py: data.template alpaca, "
                                 "loss on the responses, validation_split 0.01 evaluated at the end",
              "bench": "bench/train_e2e.py's bench arm: loraforge's fast path on random tokens, 3 warm-up + 12 "
                       "timed steps",
              "unsloth-sft": STACKS["unsloth"] + "; TRL SFTTrainer, packing=True, dataset_text_field 'text' (the "
                             "Alpaca prompt, the response, EOS; loss on the whole text), no evaluation"}
    if path is None:
        for arm in arms:
            b.skip(case, arm, "no checkpoint (see its record)")
        return
    ours = [x for x in ("loraforge-train", "bench") if x in arms]
    if ours and b.left() >= MIN_ARM_S:
        _train_e2e_arms(b, case, ours, tok, data, settings, stacks)
    else:
        for arm in ours:
            b.skip(case, arm, "the time budget is spent")
    if "unsloth-sft" not in arms:
        return
    if b.left() < MIN_ARM_S:
        b.skip(case, "unsloth-sft", "the time budget is spent")
        return
    text_path = b.work / "e2e" / "alpaca-text.jsonl"
    text_path.parent.mkdir(parents=True, exist_ok=True)
    text_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in b.texts or []))
    cmd = [sys.executable, str(HERE / "peers_unsloth.py"), "sft", "--path", path, "--data", str(text_path),
           "--out", str(b.work / "e2e" / "unsloth-sft"), "--steps", str(a.e2e_steps), "--batch", str(BATCH),
           "--seq", str(SEQ)]
    c = b.child(f"{case}-unsloth-sft", cmd, min(a.e2e_timeout_s, b.left()))
    result, error = outcome(c)
    if result is not None:
        result["wall_s"] = round(c.wall_s, 1)  # the process's start to its end, which follows the saved adapter
    b.put(arm_record(case, "unsloth-sft", b.meta(True), child=c, result=result, error=error,
                     settings={**settings, "stack": stacks["unsloth-sft"]}))


def _train_e2e_arms(b: Bench, case: str, ours: list[str], tok: str, data: str, settings: dict,
                    stacks: dict) -> None:
    """loraforge-train and bench through bench/train_e2e.py, in one process of its own (which starts one per arm)."""
    out = b.work / "e2e"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("train-e2e-*-peers.json"):
        old.unlink()
    names = {"loraforge-train": "train", "bench": "bench"}
    cmd = [sys.executable, str(HERE / "train_e2e.py"), "--out", str(out), "--tokenizer", tok, "--data", data,
           "--cases", f"{E2E_SHAPE}:0", "--arms", ",".join(names[x] for x in ours), "--steps", str(b.a.e2e_steps),
           "--tag=-peers"]
    env = {"LORAFORGE_CACHE": os.environ.get("LORAFORGE_CACHE", str(b.work / "lfcache"))}
    c = b.child(f"{case}-train_e2e", cmd, min(b.a.e2e_timeout_s, b.left()), env)
    written = sorted(out.glob("train-e2e-*-peers.json"))
    rows = json.loads(written[-1].read_text()) if written else []
    for arm in ours:
        row = next((r for r in rows if r.get("arm") == arm), None)
        if row is None:
            error = c.error() or "bench/train_e2e.py wrote no record for this arm"
            b.put(arm_record(case, arm, b.meta(), child=c, error=error, settings={**settings, "stack": stacks[arm]}))
            continue
        result = {k: v for k, v in row.items() if k not in ("case", "arm", "device", "date", "versions", "error")}
        b.put(arm_record(case, arm, b.meta(), child=c, result=result, error=row.get("error"),
                         settings={**settings, "stack": stacks[arm], "train_e2e_case": row.get("case")}))


RUNNERS: dict[str, Callable[[Bench], None]] = {"step": run_step, "context": run_context, "e2e": run_e2e}


# --- the command line --------------------------------------------------------------------------------------------

def _names(known: tuple[str, ...] | list[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in known]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; known: {', '.join(known)}")
        return names
    return parse


def _starts(text: str) -> dict[str, int]:
    """--context-start: "N" for every arm, or "ARM=N,ARM=N" (the other arms from 65,536)."""
    starts = {"*": 65536}
    try:
        for part in text.split(","):
            arm, _, n = part.strip().rpartition("=")
            if arm and arm not in ARMS["context"]:
                raise argparse.ArgumentTypeError(f"unknown arm {arm!r}; known: {', '.join(ARMS['context'])}")
            starts[arm or "*"] = int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not N or ARM=N,...: {text!r}") from None
    if min(starts.values()) <= 0:
        raise argparse.ArgumentTypeError("lengths must be positive")
    return starts


def context_start(a: argparse.Namespace, arm: str) -> int:
    return a.context_start.get(arm, a.context_start["*"])


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    all_arms = tuple(dict.fromkeys(x for arms in ARMS.values() for x in arms))
    ap.add_argument("--cases", type=_names(tuple(RUNNERS), "case"), default=["step"],
                    help="comma list of step, context, e2e (default: step)")
    ap.add_argument("--arms", type=_names(all_arms, "arm"), default=None,
                    help=f"comma list of {', '.join(all_arms)} (default: each case's own; context: unsloth,loraforge)")
    ap.add_argument("--shapes", type=_names(tuple(SHAPES), "shape"), default=["llama2-7b", "llama3-8b"],
                    help="step case: the checkpoints' shapes")
    ap.add_argument("--out", default=str(HERE / "results"), help="where the JSON and the log archive go")
    ap.add_argument("--work", default="/tmp/peers-work", help="logs, run folders, Unsloth's compiled cache")
    ap.add_argument("--tag", default="", help="appended to the file names, e.g. -step")
    ap.add_argument("--budget-s", type=float, default=500.0, help="no arm or probe is started that would end later")
    ap.add_argument("--arm-timeout-s", type=float, default=300.0, help="step case: one arm's time limit")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--context-cap-gib", type=float, default=80.0)
    ap.add_argument("--context-start", type=_starts, default={"*": 65536},
                    help="the first length probed: N for every arm, or ARM=N,... (others from 65,536), e.g. "
                         "unsloth=327680,loraforge=458752 to start near each one's expected maximum")
    ap.add_argument("--context-hi", type=int, default=1 << 20, help="no probe past this; the next length is untested")
    ap.add_argument("--context-resolution", type=int, default=4096)
    ap.add_argument("--probe-layers", type=int, default=2, help="loraforge's probe trials; 0: full steps")
    ap.add_argument("--resume", default=None, help="a previous call's peers-*.json: continue its context searches")
    ap.add_argument("--tokenizer", default=str(ROOT / ".gpu" / "e2e" / "tok"), help="e2e case: a tokenizer folder")
    ap.add_argument("--data", default=str(ROOT / ".gpu" / "e2e" / "alpaca.jsonl"), help="e2e case: Alpaca JSONL")
    ap.add_argument("--e2e-steps", type=int, default=40)
    ap.add_argument("--e2e-timeout-s", type=float, default=420.0)
    a = ap.parse_args(argv)
    for name in ("budget_s", "arm_timeout_s", "steps", "context_cap_gib", "context_hi",
                 "context_resolution", "e2e_steps", "e2e_timeout_s"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if a.warmup < 0 or a.probe_layers < 0:
        ap.error("--warmup and --probe-layers must be 0 or more")
    return a


def load_resume(path: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The context-search records of a previous call's JSON, by (case, arm)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume {path}: cannot read it as JSON ({e})") from e
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConfigError(f"--resume {path}: expected a list of records (a peers-*.json this script wrote)")
    out = {}
    for i, r in enumerate(data):
        if r.get("search") is None:
            continue
        try:
            Search.from_dict(r["search"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--resume {path}: record {i} ({r.get('case')}/{r.get('arm')}): field 'search' is "
                              f"not a search state ({e})") from e
        out[(str(r.get("case")), str(r.get("arm")))] = r
    return out


def alpaca_texts(path: str) -> list[str]:
    """The Alpaca records as the text `loraforge train` reads with data.template alpaca: the prompt, then the
    response (the EOS is the Unsloth arm's tokenizer's to add). Read and checked by the product's own
    readers, so a bad record gets the message `loraforge train` would give."""
    if not Path(path).is_file():
        raise DataError(f"--data {path}: no such file; the e2e case needs bench/train_e2e.py's Alpaca JSONL")
    texts = []
    for rec in iter_source(path, "train"):
        r = normalize(rec.data, "alpaca", rec.where)  # InvalidRecord (a DataError) names file, line, field
        texts.append(alpaca_prompt(r["instruction"], r["input"]) + r["output"])
    if not texts:
        raise DataError(f"{path}: no records")
    return texts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    try:
        resumed = load_resume(a.resume) if a.resume else {}
        texts = None
        if "e2e" in a.cases:
            texts = alpaca_texts(a.data)
            if not Path(a.tokenizer, "tokenizer_config.json").is_file():
                raise DataError(f"--tokenizer {a.tokenizer}: not a tokenizer folder (no tokenizer_config.json)")
        require_cuda("bench/peers.py")
    except LoraforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    b = Bench(a, argv, resumed, texts)
    for case in a.cases:
        try:
            RUNNERS[case](b)
        except Exception:  # a bug here must not lose the other cases' records
            b.put(arm_record(case, "peers.py", b.meta(), error=traceback.format_exc()[-3000:]))
    print(f"wrote {b.json_path} and {b.tar_path} in {time.time() - b.t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
