"""Rotary position embedding of q and k in one kernel each way, in the projections' own layout.

transformers rotates q and k as [B, H, S, D] views with `q*cos + rotate_half(q)*sin`: a `cat`, a
negation, two multiplies and an add per tensor, each a kernel with its own bf16 rounding, and the
same again for backward and for the recompute. Here each of q and k is rotated by one kernel that
reads every element once and rounds once (fp32 inside), directly in the [B, S, H, D] layout the
projection wrote, so no transpose is materialized before attention. Backward is the transposed
rotation (sin negated). The PyTorch twin below is the same math, used off CUDA and in the checks.
"""

from __future__ import annotations

import torch

from . import _triton


def _rope_torch(x, cos, sin, inverse=False):
    """x [B, S, H, D]; cos/sin [B or 1, S, D]. Same formula and rounding as the Triton kernel."""
    acc = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    xf = x.to(acc)
    c, s = cos.to(acc)[:, :, None, :], sin.to(acc)[:, :, None, :]
    if inverse:
        s = -s
    x1, x2 = xf[..., :half], xf[..., half:]
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    if not inverse:
        o = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1)
    else:
        o = torch.cat([x1 * c1 - x2 * s2, x2 * c2 + x1 * s1], dim=-1)
    return o.to(x.dtype)


def _use_triton(x, cos) -> bool:
    d = x.shape[-1]
    return (x.is_cuda and _triton.enabled("rope") and d % 2 == 0 and (d // 2) & (d // 2 - 1) == 0
            and x.is_contiguous() and cos.is_contiguous())


def _apply(x, cos, sin, inverse):
    if _use_triton(x, cos):
        return _triton.rope(x, cos, sin, inverse)
    return _rope_torch(x, cos, sin, inverse)


class RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _apply(q, cos, sin, False), _apply(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None else _apply(dq.contiguous(), cos, sin, True)
        dk = None if dk is None else _apply(dk.contiguous(), cos, sin, True)
        return dq, dk, None, None


def rope_supported(q: torch.Tensor, cos: torch.Tensor) -> bool:
    """q [B, S, H, D]; cos must be [B or 1, S, D] (what LlamaRotaryEmbedding returns)."""
    return (cos.dim() == 3 and cos.shape[1] == q.shape[1] and cos.shape[-1] == q.shape[-1]
            and cos.shape[0] in (1, q.shape[0]) and q.shape[-1] % 2 == 0)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, S, Hq, D], k [B, S, Hk, D] (contiguous projection outputs) -> rotated, same layout."""
    return RoPE.apply(q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous())
