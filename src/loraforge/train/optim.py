"""Optimizer and learning-rate schedule: parameter groups, the optimizers `training.optim` names, warmup + decay.

`paged_adamw_32bit` is bitsandbytes' PagedAdamW32bit rule and paged fp32 states, stepped without its
per-parameter device synchronisation: bitsandbytes 0.50's `Optimizer8bit.step` calls
`torch.cuda.synchronize()` after every parameter's update (`sync_gpu(p)` in its loop), 448 host-device
round trips per step for r=16 on all seven Llama projections, during which the GPU idles. The trainer
uses `fused_paged_adamw_32bit` (torch's fused multi-tensor kernel on the same paged states);
`paged_adamw_32bit` keeps bitsandbytes' own kernels and synchronises once per step (bit-identical to
bitsandbytes; the benchmark's middle point). `paged_adamw_8bit` on a CPU is bitsandbytes' AdamW8bit (the
same 8-bit states without paging) where bitsandbytes has a CPU backend, else torch's AdamW; the log says
which. bitsandbytes is imported where it is used: importing it probes CUDA, which an adamw_torch or CPU
run need not pay for.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from loraforge.config import LoRAConfig, TrainingConfig


def param_groups(model: torch.nn.Module, cfg: TrainingConfig, lora: LoRAConfig | None = None) -> list[dict[str, Any]]:
    """Trainable parameters in groups: no weight decay on biases and norms; LoRA+ raises the B matrices' lr."""
    ratio = lora.loraplus_lr_ratio if lora else None
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "bias" in name or "norm" in name
        is_b = bool(ratio) and "lora_B" in name
        groups.setdefault((no_decay, is_b), []).append(p)
    out = []
    for (no_decay, is_b), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                    "lr": cfg.learning_rate * (ratio if is_b else 1.0)})
    return out


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device,
                    lora: LoRAConfig | None = None, notice=print) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, lora)
    if cfg.optim == "paged_adamw_8bit" and device.type != "cuda" and _cpu_8bit_adamw_works():
        notice("optimizer: paged_adamw_8bit pages state through CUDA unified memory, which a CPU run has not; "
               "using bitsandbytes' AdamW8bit (the same 8-bit states, not paged).")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate)
    if cfg.optim.startswith("paged_") and device.type != "cuda":
        notice(f"optimizer: {cfg.optim} pages state through CUDA unified memory, which a CPU run has not; "
               "using torch AdamW (same update rule).")
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    if cfg.optim == "paged_adamw_32bit":
        # bitsandbytes' PagedAdamW32bit update rule and paged fp32 states, stepped by torch's fused
        # multi-tensor kernel instead of one launch + prefetch + device sync per parameter (see below).
        return fused_paged_adamw_32bit(groups, lr=cfg.learning_rate)
    if cfg.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type == "cuda")


@functools.cache
def _cpu_8bit_adamw_works() -> bool:
    """Whether this bitsandbytes steps AdamW8bit on CPU tensors (0.50 does; older builds are CUDA-only).

    Probed once with one step on a parameter large enough for 8-bit states (bitsandbytes keeps tensors
    under 4096 elements in 32 bits).
    """
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.zeros(64, 64))
        p.grad = torch.ones_like(p)
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        opt.step()
        return opt.state[p]["state1"].dtype == torch.uint8
    except Exception:  # noqa: BLE001 - any failure (no CPU backend, no library) means: use torch's AdamW
        return False


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak lr at a step: linear warmup, then cosine/linear decay to 0, or constant."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, total_steps))


def paged_adamw_32bit(params, **kwargs):
    """A `bitsandbytes.optim.PagedAdamW32bit` whose step synchronises once, not per parameter."""
    import bitsandbytes as bnb

    class PagedAdamW32bitOneSync(bnb.optim.PagedAdamW32bit):
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            last = None
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
                    last = p
            if last is not None and last.is_cuda:
                torch.cuda.synchronize()
            return loss

    return PagedAdamW32bitOneSync(params, **kwargs)


def fused_paged_adamw_32bit(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                            weight_decay: float = 1e-2):
    """AdamW 32-bit with bitsandbytes' paged fp32 states, updated by torch's fused multi-tensor kernel.

    Same update rule as `bitsandbytes.optim.PagedAdamW32bit` (decoupled weight decay, bias-corrected
    moments, eps outside the square root) and the same state memory: both moments live in CUDA unified
    memory from `bitsandbytes.functional.get_paged`, which the driver may page out to host RAM under
    memory pressure (and which, as with bitsandbytes, torch's allocator statistics do not count). What
    changes is the launch count: a handful of multi-tensor kernels per step instead of one kernel, one
    state prefetch and (in bitsandbytes 0.50) one device sync per parameter — 448 of each for r=16 on
    all seven Llama projections, ~15-30 ms of a ~200 ms step once the rest of the step is graphed.
    Off CUDA the moments are ordinary tensors and torch's foreach path runs.
    """
    params = list(params)

    class FusedPagedAdamW32bit(torch.optim.AdamW):
        def __init__(self, params):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=_all_cuda(params) or None)

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and len(self.state[p]) == 0:
                        self.state[p].update(_paged_state(p, fused=bool(group.get("fused"))))
            return super().step(closure)

    return FusedPagedAdamW32bit(params)


def _all_cuda(params) -> bool:
    ps = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(ps) and all(p.is_cuda for p in ps)


def _paged_state(p: torch.Tensor, fused: bool) -> dict:
    """AdamW state for p with both moments in paged (unified) memory where bitsandbytes provides it."""
    def zeros():
        if p.is_cuda:
            try:
                return _paged_cuda_zeros(p.shape, p.device)
            except Exception:  # noqa: BLE001 - no paged memory: an ordinary device tensor works the same
                pass
        return torch.zeros_like(p, dtype=torch.float32)

    step = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
            else torch.tensor(0.0, dtype=torch.float32))
    return {"step": step, "exp_avg": zeros(), "exp_avg_sq": zeros()}


class _ManagedArray:
    """A CUDA-array-interface view of unified memory from bitsandbytes, so torch sees a CUDA tensor.

    `bitsandbytes.functional.get_paged` returns its unified-memory buffer as a tensor whose device
    says cpu (bitsandbytes' own kernels take raw pointers); torch's fused optimizer kernels insist on
    CUDA tensors. The pointer is valid on the device, so it is handed to `torch.as_tensor` through the
    CUDA array interface; the bitsandbytes tensor (the memory's owner) is kept alive by this object,
    which torch keeps alive as long as the view.
    """

    def __init__(self, owner: torch.Tensor, shape):
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": "<f4", "data": (owner.data_ptr(), False),
                                         "version": 3, "strides": None}


def _paged_cuda_zeros(shape, device) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    owner = bnbf.get_paged(*shape, dtype=torch.float32, device=device)
    t = torch.as_tensor(_ManagedArray(owner, shape), device=device)
    if not t.is_cuda or t.data_ptr() != owner.data_ptr():
        raise RuntimeError("unified memory did not map to a CUDA tensor")
    t.zero_()
    t.is_paged = True  # as bitsandbytes marks its paged tensors
    t.page_deviceid = getattr(owner, "page_deviceid", device.index or 0)
    return t


def unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside Accelerate's wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def drops_steps_on_device(optimizer: Any) -> bool:
    """Whether the optimizer can drop a step without the host looking at the loss first: torch's fused
    Adam/AdamW skip their update (moments, weights and step count untouched) when `found_inf` is 1."""
    inner = unwrapped(optimizer)
    return isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in inner.param_groups)


def finish_step(acc: Any, run: Any, model: torch.nn.Module, max_grad_norm: float, outcome: Any,
                loss_on_device: torch.Tensor | None = None) -> Any:
    """The end of every optimizer step, SFT or preference: a non-finite loss drops the update but still
    advances the schedule, to stay aligned with the data position; otherwise clip (the norm before clipping
    goes to `outcome.grad_norm`), step the optimizer and the schedule, and clear the gradients.

    The host decides from `outcome.nll`, which it had to wait for. With `loss_on_device` (an optimizer for
    which `drops_steps_on_device`), the optimizer decides on the device instead and the host never waits:
    a dropped step then still clips (its norm is not finite and goes unused) and launches the update, which
    does nothing."""
    if loss_on_device is None and not math.isfinite(outcome.nll):
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        return outcome
    if max_grad_norm > 0:
        outcome.grad_norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    inner = unwrapped(run.optimizer)
    if loss_on_device is not None:
        inner.found_inf = (~torch.isfinite(loss_on_device)).to(torch.float32)
    try:
        run.optimizer.step()
    finally:
        if loss_on_device is not None:
            inner.found_inf = None
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return outcome
