"""What every arm of bench/peers.py shares: its result line, the random batches, the timed step loop, the
memory cap, and how an out-of-memory failure is told from any other.

Torch only, never loraforge, transformers or Unsloth: each arm's process imports its own stack and nothing
of another's (Unsloth must be imported before transformers and peft to patch them).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

RESULT = "PEERS_RESULT "  # prefix of the one line an arm prints for the parent; everything else is log
# Messages of the ways running out of GPU memory surfaces: torch's allocator, cuBLAS's workspace, a raw CUDA call.
OOM_MARKS = ("out of memory", "cublas_status_alloc_failed", "cudaerrormemoryallocation")


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(RESULT + json.dumps(obj) + "\n")
    sys.stdout.flush()


def parse_result(text: str) -> dict[str, Any] | None:
    """The last result line in an arm's output, or None if it printed none (it died first)."""
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT):
            try:
                return json.loads(line[len(RESULT):])
            except json.JSONDecodeError:
                return None
    return None


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and any(m in str(exc).lower() for m in OOM_MARKS)


def run_arm(fn: Callable[[], dict[str, Any]]) -> None:
    """Runs one arm and prints its result; a failure becomes an {"error"} result and exit status 1."""
    try:
        emit(fn())
    except BaseException as e:  # noqa: BLE001 - whatever went wrong is the record's to say
        emit({"error": f"{type(e).__name__}: {str(e)[:1500]}", "traceback": traceback.format_exc()[-3000:]})
        sys.exit(1)


def step_arguments(p: Any) -> Any:
    """The step arm's arguments, the same in every arm's process (an argparse parser or subparser)."""
    p.add_argument("--path", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    return p


def random_batches(vocab: int, batch: int, seq: int, n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` batches of random tokens, drawn on the CPU so that every process, whatever its stack, gets the
    same ones. input_ids are the labels; no attention mask (unpadded rows: every stack takes its causal path)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, batch, seq), generator=g).cuda()
    return [{"input_ids": x, "labels": x} for x in ids]


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def time_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[dict], warm: int, steps: int,
               clip: float = 0.3) -> dict[str, Any]:
    """The stock baseline's loop (forward with labels, backward, clip, optimizer step, zero_grad), `warm` steps
    then `steps` timed ones. Peak: max_memory_allocated after resetting it at the start of the timed steps."""
    params = trainable(model)
    walls, losses = [], []
    for i in range(warm + steps):
        if i == warm:  # steady state only: compilation and CUDA-graph capture happen in the warm-up steps
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        x = batches[i % len(batches)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(**x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warm:
            walls.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    tokens = batches[0]["input_ids"].numel()
    step = statistics.median(walls)
    return {"tokens_per_s": round(tokens / step), "step_s": round(step, 4),
            "step_s_range": [round(min(walls), 4), round(max(walls), 4)],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "trainable_params": sum(p.numel() for p in params), "tokens_per_step": tokens}


def cap_memory(cap_gib: float) -> dict[str, Any]:
    """Caps this process's CUDA allocator at `cap_gib` (an 80 GB card's worth on a larger one); call it before
    anything is allocated."""
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(1.0, cap_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    return {"cap_gib": cap_gib, "fraction": round(fraction, 5), "device_total_gib": round(total / 2**30, 2)}


def fits(step: Callable[[], None], n: int) -> dict[str, Any]:
    """One training step at batch 1 x n: {"len", "ok", "s", "peak_gib"}; running out of GPU memory is ok=False
    (any other failure raises)."""
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    try:
        step()
        torch.cuda.synchronize()
    except BaseException as e:
        if not is_oom(e):
            raise
        return {"len": n, "ok": False, "why": f"{type(e).__name__}: {str(e)[:200]}",
                "s_to_failure": round(time.perf_counter() - t, 2)}
    return {"len": n, "ok": True, "s": round(time.perf_counter() - t, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def window_rate(marks: dict[int, tuple[float, float]], a: int, b: int) -> float | None:
    """Tokens/s over steps a+1..b from cumulative marks {step: (seconds, tokens)} (step 0: the start of
    training); None when either end is missing."""
    if a not in marks or b not in marks or marks[b][0] <= marks[a][0]:
        return None
    return (marks[b][1] - marks[a][1]) / (marks[b][0] - marks[a][0])


def loaded_versions(names: tuple[str, ...]) -> dict[str, str]:
    """`__version__` of each of `names` this process has imported."""
    out = {}
    for name in names:
        v = getattr(sys.modules.get(name), "__version__", None)
        if v is not None:
            out[name] = str(v)
    return out
