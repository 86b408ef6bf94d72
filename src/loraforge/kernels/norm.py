"""RMSNorm with a frozen weight: saves X and one fp32 1/rms per row, and has no dW.

transformers' LlamaRMSNorm runs five elementwise kernels forward and keeps their fp32
intermediates for backward; this is one kernel each way on CUDA (Triton) and the same math in
PyTorch elsewhere.
"""

from __future__ import annotations

import torch

from . import _triton


def _rmsnorm_fwd_torch(x2d, w, eps, fp32_scale=False):
    xf = x2d.to(torch.promote_types(x2d.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    if fp32_scale:  # Gemma: (x̂ · w) rounded once, w = 1 + weight in fp32
        return (xf * rstd[:, None] * w).to(x2d.dtype), rstd
    y = w * (xf * rstd[:, None]).to(x2d.dtype)
    return y.to(x2d.dtype), rstd


def _rmsnorm_bwd_torch(dy2d, x2d, w, rstd):
    acc = rstd.dtype
    xhat = x2d.to(acc) * rstd[:, None]
    gw = dy2d.to(acc) * w.to(acc)
    dx = rstd[:, None] * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
    return dx.to(x2d.dtype)


class RMSNormFrozen(torch.autograd.Function):
    """`fp32_scale`: Gemma's order, x̂·w in fp32 then one rounding (Llama rounds x̂ first, then scales)."""

    @staticmethod
    def forward(ctx, x, weight, eps, fp32_scale=False):
        x2d = x.reshape(-1, x.shape[-1])
        if x.is_cuda and _triton.enabled("rmsnorm"):
            y, rstd = _triton.rmsnorm_fwd(x2d.contiguous(), weight, eps, fp32_scale)
        else:
            y, rstd = _rmsnorm_fwd_torch(x2d, weight, eps, fp32_scale)
        ctx.save_for_backward(x, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, dy.shape[-1])
        if x.is_cuda and _triton.enabled("rmsnorm"):
            dx = _triton.rmsnorm_bwd(dy2d.contiguous(), x2d.contiguous(), weight, rstd)
        else:
            dx = _rmsnorm_bwd_torch(dy2d, x2d, weight, rstd)
        return dx.view(x.shape), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fp32_scale: bool = False) -> torch.Tensor:
    return RMSNormFrozen.apply(x, weight, eps, fp32_scale)
