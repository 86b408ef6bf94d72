"""The GPU fast path as a run gets it: the fused kernels (kernels/patch.py), then CUDA graphs where they
apply, and one human line saying which and, when off, why and what to set. `loraforge train` and the
benchmark both call `apply_fast_path`, so the bench times exactly what users run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loraforge.config import RunConfig
from loraforge.kernels.graphs import enable_graphed_layers
from loraforge.kernels.patch import fast_path_summary, patch_model


@dataclass
class FastPath:
    """What `apply_fast_path` did: the patch report, the graph runner (or None) and the one-line summary."""

    report: dict[str, Any] = field(default_factory=dict)
    graphs: Any = None
    line: str = ""


def _declined(reason: str, hint: str) -> dict[str, Any]:
    return {"patched": False, "reason": reason, "hint": hint}


def apply_fast_path(model: Any, run: RunConfig, *, processes: int = 1, sharded: bool = False,
                    allow_cpu: bool = False, log: Callable[[str], None] = print) -> FastPath:
    """Patch `model` in place when the run allows it, capture CUDA graphs when they apply, log one line.

    `sharded` (FSDP): no patch — the kernels read the packed NF4 bytes as uint8, FSDP stores them in the
    compute dtype. `allow_cpu`: patch on the CPU too (the same math without Triton; tests and smoke runs).
    """
    cuda = next(model.parameters()).device.type == "cuda"
    if not run.model.fast_kernels:
        report = _declined("model.fast_kernels is false", "set model.fast_kernels: true")
    elif sharded:
        report = _declined("FSDP shards the 4-bit weights in the compute dtype, which the fused kernels cannot "
                           "read", "use DDP (training.distributed_strategy) when the model fits one GPU")
    elif not (cuda or allow_cpu):
        report = _declined("the model is on the CPU", "run on a CUDA GPU (model.device: auto)")
    else:  # without Triton (a CPU-only torch) the kernels run their PyTorch twins, and the report says so
        report = patch_model(model, allow_cpu=allow_cpu)
    graphs = _graphs(model, run, report, cuda=cuda, processes=processes, log=log)
    line = fast_path_summary(model if report.get("patched") else report)
    # On a GPU a run off the fast path (or without the graphs it asked for) trains at a fraction of the
    # speed: never silently. On the CPU the stock path is the expected one.
    slow = cuda and (not report.get("patched") or (run.model.cuda_graphs and graphs is None))
    log(f"warning: {line}" if slow else line)
    return FastPath(report, graphs, line)


def _graphs(model: Any, run: RunConfig, report: dict[str, Any], *, cuda: bool, processes: int,
            log: Callable[[str], None]) -> Any:
    if not (cuda and report.get("patched") and run.model.cuda_graphs):
        return None
    if not run.training.gradient_checkpointing:
        log("CUDA graphs: off (they replay checkpointed layers; training.gradient_checkpointing is false)")
    elif run.training.long_context:
        log("CUDA graphs: off (training.long_context: lengths this long are not replayed; "
            "offload_activations alone keeps them)")
    elif processes > 1:
        log("CUDA graphs: off under several processes (not yet measured with DDP's gradient hooks)")
    else:
        # Four shapes: unpacked batches flattened to one of four lengths (train/sampler.py, `flatten_to`)
        return enable_graphed_layers(model, max_signatures=4, log=log)
    return None


def prime_graphs(model: Any, runner: Any, losses: list[Callable[[], Any]], *,
                 log: Callable[[str], None] = print) -> None:
    """Capture the layers' CUDA graphs before step 1, from step 1's own batch and stand-ins of the other
    shapes the run will feed (each of `losses` runs one batch's forward).

    Without this, step 1 runs the ordinary checkpoint and step 2 captures (a shape is captured the second
    time it is seen), so the first steps of every run are several times slower than the rest. Here each
    forward and backward captures at first sight; then the gradients are dropped and the RNG states put
    back, so step 1 computes exactly what it would have computed (the same dropout masks included).
    """
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state_all()
    t0 = time.perf_counter()
    before, runner.min_repeats = runner.min_repeats, 1
    try:
        for loss in losses:
            loss().backward()
    finally:
        runner.min_repeats = before
        for p in trainable:
            p.grad = None
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state_all(cuda_rng)
    torch.cuda.synchronize()
    s = runner.summary()
    log(f"CUDA graphs: {s['captured']} layer graph pairs captured before step 1 ({time.perf_counter() - t0:.1f} s)"
        + (f"; off: {s['disabled']}" if s["disabled"] else ""))
