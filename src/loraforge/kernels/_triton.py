"""Triton kernels for the fast path, each with a pure-PyTorch twin elsewhere in this package.

Importing this module never fails: without Triton (CPU-only installs) `AVAILABLE` is False and every
caller takes its PyTorch path. Each kernel can be switched off on its own through `ENABLED`
(`patch_model` runs `self_check()` first and switches off any kernel that does not match its
PyTorch twin; the benchmark switches them off to measure what each one buys).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch only.
    import triton
    import triton.language as tl

    AVAILABLE = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    AVAILABLE = False

ENABLED: dict[str, bool] = {"dequant": True, "swiglu": True, "rmsnorm": True, "rope": True}


def enabled(name: str) -> bool:
    return AVAILABLE and ENABLED.get(name, False)


if AVAILABLE:

    @triton.jit
    def _nf4_dequant_kernel(q_ptr, a8_ptr, code2_ptr, absmax2_ptr, absmax_ptr, offset_ptr, table_ptr,
                            out_ptr, n_bytes, BLOCK: tl.constexpr, QBLOCK: tl.constexpr,
                            QBLOCK2: tl.constexpr, NESTED: tl.constexpr):
        # One program expands BLOCK packed bytes (2*BLOCK weights). A byte's two codes always sit in
        # the same quantization block (QBLOCK is even), so one absmax serves both.
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        b = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
        blk = (offs * 2) // QBLOCK
        if NESTED:
            a8 = tl.load(a8_ptr + blk, mask=mask, other=0).to(tl.int32)
            am = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + blk // QBLOCK2, mask=mask, other=0.0)
            am = am + tl.load(offset_ptr)
        else:
            am = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        hi = tl.load(table_ptr + (b >> 4)) * am
        lo = tl.load(table_ptr + (b & 15)) * am
        vals = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)
        offs2 = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + offs2, vals, mask=offs2 < 2 * n_bytes)

    @triton.jit
    def _gate_act(e, ACT: tl.constexpr):
        """(act(e), act'(e)) in fp32: ACT 0 is SiLU (SwiGLU), 1 is tanh-approximated GELU (Gemma's GeGLU)."""
        if ACT == 0:
            sig = tl.sigmoid(e)
            f = e * sig
            df = sig * (1.0 + e * (1.0 - sig))
        else:
            k = 0.7978845608028654  # sqrt(2/pi)
            t = 2.0 * tl.sigmoid(2.0 * k * (e + 0.044715 * e * e * e)) - 1.0  # tanh, from the sigmoid Triton has
            f = 0.5 * e * (1.0 + t)
            df = 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * k * (1.0 + 0.134145 * e * e)
        return f, df

    @triton.jit
    def _swiglu_fwd_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr, ACT: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        f, _ = _gate_act(e, ACT)
        tl.store(h_ptr + offs, (f * g).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(dh_ptr, e_ptr, g_ptr, h_ptr, de_ptr, dg_ptr, n, BLOCK: tl.constexpr,
                           ACT: tl.constexpr):
        # Recomputes h = act(e)*g (the down projection's LoRA grad needs it) next to de and dg.
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        f, df = _gate_act(e, ACT)
        tl.store(h_ptr + offs, (f * g).to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + offs, (dh * f).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(de_ptr + offs, (dh * g * df).to(de_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr,
                            FP32_SCALE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        # Same rounding as transformers' LlamaRMSNorm: normalize in fp32, round to the input dtype,
        # then multiply by the weight in that dtype; Gemma's (FP32_SCALE) multiplies in fp32 first.
        xn = x * rstd
        if not FP32_SCALE:
            xn = xn.to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + cols, (xn * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        gw = dy * w
        dx = rstd * (gw - xhat * (tl.sum(gw * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, seq, cos_bstride, SIGN: tl.constexpr,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        # One program per token: all heads of x [T, H, 2*HALF] rotated by that token's cos/sin rows.
        # out = x*cos + rotate_half(x)*sin (SIGN=1), or its inverse for backward (SIGN=-1).
        t = tl.program_id(0).to(tl.int64)
        crow = (t // seq) * cos_bstride + (t % seq) * (2 * HALF)
        d = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + crow + d).to(tl.float32)
        c2 = tl.load(cos_ptr + crow + HALF + d).to(tl.float32)
        s1 = tl.load(sin_ptr + crow + d).to(tl.float32) * SIGN
        s2 = tl.load(sin_ptr + crow + HALF + d).to(tl.float32) * SIGN
        h = tl.arange(0, BLOCK_H)
        hm = h < n_heads
        base = t * n_heads * (2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
        x1 = tl.load(x_ptr + base, mask=hm[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + base + HALF, mask=hm[:, None], other=0.0).to(tl.float32)
        if SIGN > 0:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        else:  # transpose of the rotation: dx1 = d1*c1 + d2*s2, dx2 = d2*c2 - d1*s1 (s already negated)
            o1 = x1 * c1[None, :] - x2 * s2[None, :]
            o2 = x2 * c2[None, :] + x1 * s1[None, :]
        tl.store(out_ptr + base, o1.to(out_ptr.dtype.element_ty), mask=hm[:, None])
        tl.store(out_ptr + base + HALF, o2.to(out_ptr.dtype.element_ty), mask=hm[:, None])


_EW_BLOCK = 1024
_DQ_BLOCK = 1024
_table_cache: dict[tuple, torch.Tensor] = {}


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    """fp32 copy of a small per-weight table on `device`, cached by storage (code maps are shared)."""
    key = (t.data_ptr(), str(device), t.numel())
    out = _table_cache.get(key)
    if out is None:
        out = t.detach().to(device=device, dtype=torch.float32).contiguous()
        _table_cache[key] = out
    return out


def nf4_dequant(weight: torch.Tensor, qs, dtype: torch.dtype) -> torch.Tensor:
    """One-kernel NF4 -> dtype expansion of a bitsandbytes 4-bit weight (double quant or not)."""
    q = weight.data.reshape(-1)
    n_bytes = q.numel()
    numel = 1
    for s in qs.shape:
        numel *= s
    assert numel == 2 * n_bytes and qs.blocksize % 2 == 0
    out = torch.empty(qs.shape, device=q.device, dtype=dtype)
    table = _f32(qs.code, q.device)
    if qs.nested:
        s2 = qs.state2
        args = (qs.absmax, _f32(s2.code, q.device), s2.absmax, s2.absmax, qs.offset.reshape(1))
        qb2 = s2.blocksize
    else:
        args = (qs.absmax, table, table, qs.absmax, table)
        qb2 = 1
    grid = (triton.cdiv(n_bytes, _DQ_BLOCK),)
    # No fused multiply-adds: bitsandbytes rounds code2[q] * absmax2 before it adds the offset (two
    # kernels), and a contracted FMA differs from that by one bf16 step in ~1 matrix of 12
    # (bench/results/nf4-dequant-exactness-2026-12-03-h200.json).
    _nf4_dequant_kernel[grid](q, *args, table, out, n_bytes, BLOCK=_DQ_BLOCK, QBLOCK=qs.blocksize,
                              QBLOCK2=qb2, NESTED=bool(qs.nested), num_warps=4, enable_fp_fusion=False)
    return out


_ACTS = {"silu": 0, "gelu_tanh": 1}


def swiglu_fwd(e: torch.Tensor, g: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """h = act(e)·g for a gated MLP: SwiGLU (silu) or GeGLU (gelu_tanh)."""
    h = torch.empty_like(e)
    n = e.numel()
    _swiglu_fwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](e, g, h, n, BLOCK=_EW_BLOCK, ACT=_ACTS[act], num_warps=4)
    return h


def swiglu_bwd(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, act: str = "silu"):
    h, de, dg = torch.empty_like(e), torch.empty_like(e), torch.empty_like(g)
    n = e.numel()
    _swiglu_bwd_kernel[(triton.cdiv(n, _EW_BLOCK),)](dh, e, g, h, de, dg, n, BLOCK=_EW_BLOCK,
                                                      ACT=_ACTS[act], num_warps=4)
    return h, de, dg


def _row_block(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    return block, min(max(block // 256, 1), 16)


def rmsnorm_fwd(x2d: torch.Tensor, w: torch.Tensor, eps: float, fp32_scale: bool = False):
    rows, n_cols = x2d.shape
    y = torch.empty_like(x2d)
    rstd = torch.empty(rows, device=x2d.device, dtype=torch.float32)
    block, warps = _row_block(n_cols)
    _rmsnorm_fwd_kernel[(rows,)](x2d, w, y, rstd, n_cols, eps, BLOCK=block, FP32_SCALE=fp32_scale,
                                 num_warps=warps)
    return y, rstd


def rmsnorm_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor):
    rows, n_cols = x2d.shape
    dx = torch.empty_like(x2d)
    block, warps = _row_block(n_cols)
    _rmsnorm_bwd_kernel[(rows,)](dy2d, x2d, w, rstd, dx, n_cols, BLOCK=block, num_warps=warps)
    return dx


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [B, S, H, D] contiguous; cos/sin [B or 1, S, D] contiguous. Returns the rotated x, same layout."""
    b, s, h, d = x.shape
    out = torch.empty_like(x)
    cos_bstride = 0 if cos.shape[0] == 1 else s * d
    _rope_kernel[(b * s,)](x, cos, sin, out, h, s, cos_bstride, SIGN=-1 if inverse else 1, HALF=d // 2,
                           BLOCK_H=triton.next_power_of_2(h), num_warps=4)
    return out
