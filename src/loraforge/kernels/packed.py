"""Attention over packed rows without a mask: each example attends causally to itself only.

transformers gives packed rows (restarting position ids, data/packing.py) a block-diagonal [B, 1, S, S]
mask for SDPA. Building it reads a device value back (`find_packed_sequence_indices` asks whether any row
is packed), so the host waits for the GPU at every forward, and a masked SDPA cannot use the causal
flash kernel: on the H200, Llama-2-7B 4×512, 10.2 ms against 5.0 ms a step (bench/NOTES.md, session 8).
Flash attention's variable-length form takes the examples' offsets instead (`cu_seqlens`, computed on
the host by `data.packing.boundaries`) and runs the causal kernel over each example.

`attend` is used only where `check` passed on the device (torch's `varlen_attn` is CUDA-only and its
signature changed between releases); `attend_reference` is its PyTorch twin, one causal SDPA per
example, for the CPU tests and the check itself.
"""

from __future__ import annotations

import functools
import inspect

import torch

# The keyword under which a packed batch carries its examples' offsets (`data.packing.boundaries`) into the
# model's forward; the trainer's feed adds it on the host when `check` passed for the model.
BOUNDARIES_KEY = "packed_cu_seqlens"
# Set by the model's forward for unpacked rows without a mask: plain causal attention, no mask built (the
# same host wait: transformers asks of any rows given no mask whether they are packed).
CAUSAL_KEY = "loraforge_causal"


@functools.cache
def _varlen():
    """torch's varlen_attn and its keyword names, looked up once (inspect is slow for a per-layer call)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    return varlen_attn, set(inspect.signature(varlen_attn).parameters)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scaling: float) -> torch.Tensor:
    """q [B, Hq, S, D], k and v [B, Hkv, S, D] (transformers' layout) → [B, S, Hq, D], as transformers'
    attention functions return it. `cu`: int32 example offsets over the B·S tokens, then the total."""
    fn, params = _varlen()
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v))
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if hkv != hq:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
    if "scale" in params:
        kw["scale"] = scaling
    out = fn(q, k, v, cu, cu, s, s, **kw)
    return out.view(b, s, hq, d)


def attend_reference(q, k, v, cu, scaling) -> torch.Tensor:
    """`attend` in plain PyTorch: one causal SDPA per example (reads `cu` on the host)."""
    b, hq, s, d = q.shape
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (q, k, v))
    if k.shape[1] != hq:
        k, v = (t.repeat_interleave(hq // t.shape[1], dim=1) for t in (k, v))
    bounds = cu.tolist()
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi > lo:
            piece = [t[lo:hi].transpose(0, 1) for t in (q, k, v)]
            o = torch.nn.functional.scaled_dot_product_attention(*piece, is_causal=True, scale=scaling)
            outs.append(o.transpose(0, 1))
    return torch.cat(outs).view(b, s, hq, d)


def check(device: torch.device, scaling_ok: bool, head_dim: int = 64, group: int = 1) -> str:
    """'on (err …)' when `attend` runs here and matches its twin (forward and gradients) at the model's head
    size and query heads per key head (`group`), else 'off (why)'."""
    fn, params = _varlen()
    if device.type != "cuda":
        return "off (CUDA only)"
    if fn is None:
        return f"off (torch {torch.__version__} has no varlen_attn)"
    if not scaling_ok and "scale" not in params:
        return "off (this torch's varlen_attn has no scale argument)"
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen, dtype=torch.bfloat16)

    try:
        # two rows of 48: examples of 5, 30 and 13 tokens, then 20 and 28; empty ones pad the capacity
        cu = torch.tensor([0, 5, 35, 48, 68, 96, 96, 96, 96], dtype=torch.int32, device=device)
        errs = []
        hkv = 2
        for hq in sorted({hkv, hkv * group}):  # plain multi-head, and the model's grouping
            q = rnd(2, hq, 48, head_dim).requires_grad_()
            k, v = rnd(2, hkv, 48, head_dim).requires_grad_(), rnd(2, hkv, 48, head_dim).requires_grad_()
            dy = rnd(2, 48, hq, head_dim)
            got = (attend(q, k, v, cu, 0.125), *torch.autograd.grad(attend(q, k, v, cu, 0.125), (q, k, v), dy))
            ref = [t.float().detach().requires_grad_() for t in (q, k, v)]
            out = attend_reference(*ref, cu, 0.125)
            want = (out, *torch.autograd.grad(out, ref, dy.float()))
            errs += [float((a.float() - b).norm() / b.norm()) for a, b in zip(got, want, strict=True)]
    except Exception as exc:  # a build without the flash kernels, an old GPU: the masked SDPA stays
        return f"off ({type(exc).__name__}: {str(exc)[:120]})"
    err = max(errs)
    return f"on (err {err:.1e})" if err < 2e-2 else f"off (err {err:.1e} against the reference)"
