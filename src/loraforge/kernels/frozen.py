"""Frozen base weights as dense matrices, produced on demand.

A LoRA step needs each frozen weight W [out, in] three times (forward, recompute, backward) and
never keeps it: the 4-bit weight is expanded to the compute dtype right before its GEMM and freed
right after. `FrozenWeight.dense()` is that expansion; a plain (bf16/fp16/fp32) weight is returned
as is.
"""

from __future__ import annotations

import torch

from . import _triton


class FrozenWeight:
    """A frozen linear weight that knows how to become a dense [out, in] tensor (and its frozen bias, if any)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias
        self.dtype = dtype
        self.quant_state = getattr(weight, "quant_state", None)
        self.is_4bit = self.quant_state is not None
        if self.is_4bit:
            self.shape = tuple(self.quant_state.shape)
        else:
            self.shape = tuple(weight.shape)

    def bias_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        b = self.bias
        return b if b is None or b.dtype == dtype else b.to(dtype)

    def dense(self) -> torch.Tensor:
        if not self.is_4bit:
            w = self.weight
            return w if w.dtype == self.dtype else w.to(self.dtype)
        qs = self.quant_state
        if _triton.enabled("dequant") and self.weight.is_cuda:
            return _triton.nf4_dequant(self.weight, qs, self.dtype)
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(self.weight.data, qs)
        return w if w.dtype == self.dtype else w.to(self.dtype)


def nf4_dequant_reference(weight: torch.Tensor, qs) -> torch.Tensor:
    """Pure-PyTorch NF4 (double-quant aware) dequantization: the formula the Triton kernel implements.

    bitsandbytes packs two 4-bit codes per byte, the first element in the high nibble; each block of
    `qs.blocksize` consecutive elements (row-major over [out, in]) shares one absmax. With double
    quantization the absmax is itself 8-bit: absmax = code2[a8] * absmax2[block // blocksize2] + offset.
    """
    q = weight.data.reshape(-1).to(torch.int64)
    codes = torch.stack([q >> 4, q & 15], dim=1).reshape(-1)
    table = qs.code.to(device=q.device, dtype=torch.float32)
    vals = table[codes]
    if qs.nested:
        s2 = qs.state2
        a8 = qs.absmax.reshape(-1).to(torch.int64)
        idx = torch.arange(a8.numel(), device=q.device) // s2.blocksize
        absmax = s2.code.to(torch.float32)[a8] * s2.absmax.to(torch.float32)[idx] + qs.offset.float()
    else:
        absmax = qs.absmax.float().reshape(-1)
    n = vals.numel()
    vals = vals.reshape(-1, qs.blocksize) * absmax[: n // qs.blocksize, None]
    numel = 1
    for s in qs.shape:
        numel *= s
    return vals.reshape(-1)[:numel].reshape(qs.shape).to(qs.dtype)
