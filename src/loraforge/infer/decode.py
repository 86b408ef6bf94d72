"""Fewer kernels per decode step, with stock's exact arithmetic (for `infer/fast_decode.py`).

A 7B decode step on an H100 is ~5 ms of weight reads and ~3 ms of ~1,300 tiny eager kernels: each
RMSNorm is 8 kernels, RoPE 5 per tensor, the cache writes 2, SwiGLU 2, the residual adds 2 per layer
(bench/results/decode-diag-*.json). These Triton kernels merge them while reproducing, value for value,
what the eager PyTorch ops compute: every intermediate that eager rounds to bf16/fp16 is rounded here at
the same point, products and sums are single fp32 operations like eager's, and the one reduction (the
mean of squares in RMSNorm) is still done by `torch.mean` on the same fp32 tensor eager reduces, so its
summation order is PyTorch's own. Merging elementwise ops therefore changes no bit, which keeps greedy
decoding identical to stock `generate`.

The math functions (exp in SiLU, rsqrt in RMSNorm) must round like CUDA's as PyTorch calls them, which
the code cannot promise for every Triton/CUDA pair: `self_check()` compares each kernel with its eager
ops on random data on the GPU, bit for bit, and the decoder uses only the kernels that pass (and tries
the libdevice and the approximate variants of each math function).
"""

from __future__ import annotations

import torch

from loraforge.kernels import _triton

if _triton.AVAILABLE:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except Exception:  # pragma: no cover - older Triton
        libdevice = None

    @triton.jit
    def _load_residual(h_ptr, d_ptr, hout_ptr, row, offs, m, n, HAS_ADD: tl.constexpr):
        # float(h + d), with h + d rounded to the activation dtype and stored as eager's residual add does.
        h = tl.load(h_ptr + row * n + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_ADD:
            d = tl.load(d_ptr + row * n + offs, mask=m, other=0.0).to(tl.float32)
            hb = (h + d).to(hout_ptr.dtype.element_ty)
            tl.store(hout_ptr + row * n + offs, hb, mask=m)
            h = hb.to(tl.float32)
        return h

    @triton.jit
    def _store_scaled(x, r, w_ptr, out_ptr, row, offs, m, n):
        # weight * (x * r).to(dtype): LlamaRMSNorm's last two operations, each rounded as eager rounds it.
        y = (x * r).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + offs, (w * y).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _add_square_kernel(h_ptr, d_ptr, out_ptr, sq_ptr, n, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
        # h' = h + d (rounded to the activation dtype, as eager's add), sq = float(h')²: RMSNorm's `.float()`
        # and `.pow(2)` of the next norm, fused into the residual add before it.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < n
        h = _load_residual(h_ptr, d_ptr, out_ptr, row, offs, m, n, HAS_ADD)
        tl.store(sq_ptr + row * n + offs, h * h, mask=m)

    @triton.jit
    def _rsqrt(x, MODE: tl.constexpr):
        if MODE == 0:
            return libdevice.rsqrt(x)
        return tl.math.rsqrt(x)

    @triton.jit
    def _norm_out_kernel(x_ptr, var_ptr, w_ptr, out_ptr, eps, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
        # weight * (float(x) * rsqrt(var + eps)).to(dtype): the rest of LlamaRMSNorm after the mean.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + row * n + offs, mask=m, other=0.0).to(tl.float32)
        _store_scaled(x, _rsqrt(tl.load(var_ptr + row) + eps, MODE), w_ptr, out_ptr, row, offs, m, n)

    @triton.jit
    def _rms_norm_kernel(h_ptr, d_ptr, hout_ptr, w_ptr, out_ptr, eps, n, HAS_ADD: tl.constexpr,
                         MODE: tl.constexpr, BLOCK: tl.constexpr):
        # The residual add and the whole LlamaRMSNorm in one program per row: the mean of squares is this
        # program's own sum, so its order is not torch.mean's (see `rms_norm_one`).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < n
        h = _load_residual(h_ptr, d_ptr, hout_ptr, row, offs, m, n, HAS_ADD)
        _store_scaled(h, _rsqrt(tl.sum(h * h, axis=0) / n + eps, MODE), w_ptr, out_ptr, row, offs, m, n)

    @triton.jit
    def _round_bf16(x):
        # fp32 → nearest bf16 (ties to even), kept as fp32. Done on the bits because Triton folds
        # `x.to(bf16).to(fp32)` away in this kernel (measured: 3,861 of 16,384 RoPE outputs off by one
        # rounding, bench/NOTES.md); integer ops cannot be folded.
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                           H, HKV, L, sqb, sqh, sq_in, skv_in, D: tl.constexpr):
        # One program per (row, head): q heads get RoPE into qo (strides sqb, sqh); kv heads get RoPE on k
        # and both k and v written into the static cache at `slot`. Eager: x*cos and rotate_half(x)*sin
        # each rounded to the dtype, then their sum rounded. bf16 only (the rounding helper is bf16's).
        # sq_in, skv_in: the row strides of q and of k, v (wider than their heads when they are column
        # slices of one q/k/v GEMM's output).
        b = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        d = tl.arange(0, D)
        half = D // 2
        partner = (d + half) % D
        sign = tl.where(d < half, -1.0, 1.0)
        c = tl.load(cos_ptr + b * D + d).to(tl.float32)
        s = tl.load(sin_ptr + b * D + d).to(tl.float32)
        dt = qo_ptr.dtype.element_ty
        if j < H:
            base = q_ptr + b * sq_in + j * D
            x = tl.load(base + d).to(tl.float32)
            xr = tl.load(base + partner).to(tl.float32) * sign
            y = (_round_bf16(x * c) + _round_bf16(xr * s)).to(dt)
            tl.store(qo_ptr + b * sqb + j * sqh + d, y)
        else:
            h = (j - H).to(tl.int64)
            slot = tl.load(slot_ptr)
            base = k_ptr + b * skv_in + h * D
            x = tl.load(base + d).to(tl.float32)
            xr = tl.load(base + partner).to(tl.float32) * sign
            y = (_round_bf16(x * c) + _round_bf16(xr * s)).to(dt)
            dst = ((b * HKV + h) * L + slot) * D + d
            tl.store(kc_ptr + dst, y)
            tl.store(vc_ptr + dst, tl.load(v_ptr + b * skv_in + h * D + d))

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, sg, su, MODE: tl.constexpr, BLOCK: tl.constexpr):
        # silu(g) rounded to the dtype (eager: x / (1 + exp(-x)) in fp32), times u, rounded. Program (row,
        # block) of n columns; g and u rows sg and su apart (column slices of one gate/up GEMM's output).
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(g_ptr + row * sg + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * su + offs, mask=m, other=0.0).to(tl.float32)
        if MODE == 0:
            a = libdevice.div_rn(g, 1.0 + libdevice.exp(-g))
        elif MODE == 1:
            a = g / (1.0 + libdevice.exp(-g))
        else:
            a = g / (1.0 + tl.exp(-g))
        y = a.to(out_ptr.dtype.element_ty).to(tl.float32) * u
        tl.store(out_ptr + row * n + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


def add_square(h: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, float(h + delta)²) — or (h, float(h)²) without delta. Rows on the last dim."""
    n = h.shape[-1]
    rows = h.numel() // n
    sq = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    out = torch.empty_like(h) if delta is not None else h
    _add_square_kernel[(rows,)](h, delta if delta is not None else h, out, sq, n, HAS_ADD=delta is not None,
                                BLOCK=_block(n))
    return out, sq


def norm_out(x: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, eps: float, mode: int) -> torch.Tensor:
    n = x.shape[-1]
    out = torch.empty_like(x)
    _norm_out_kernel[(x.numel() // n,)](x, var, weight, out, eps, n, MODE=mode, BLOCK=_block(n))
    return out


def rms_norm(h, delta, weight, eps, mode) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, LlamaRMSNorm(h + delta)) in three kernels, the middle one torch's own mean."""
    h, sq = add_square(h, delta)
    return h, norm_out(h, sq.mean(-1, keepdim=True), weight, eps, mode)


def rms_norm_one(h, delta, weight, eps, mode) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm` in one kernel instead of three. Its sum of squares runs in another order than torch.mean's,
    so the output may differ from eager's by a rounding: for merged batches only, whose merged weights
    already round differently from the modules (a single row keeps the exact three kernels)."""
    n = h.shape[-1]
    out = torch.empty_like(h)
    h_out = torch.empty_like(h) if delta is not None else h
    _rms_norm_kernel[(h.numel() // n,)](h, delta if delta is not None else h, h_out, weight, out, eps, n,
                                        HAS_ADD=delta is not None, MODE=mode, BLOCK=_block(n))
    return h_out, out


def rope_cache(q, k, v, cos, sin, q_out, k_cache, v_cache, slot) -> torch.Tensor:
    """q, k, v: [B, 1, heads·D] projections, each row contiguous (k and v with one row stride: column slices
    of one GEMM's output will do); cos, sin: [B, 1, D]; q_out: [B, H, 1, D] with the strides eager's RoPE
    result has; k_cache, v_cache: [≥B, Hkv, L, D] contiguous; slot: 1-element long tensor."""
    b, hd = q.shape[0], q_out.shape[-1]
    heads, kv_heads = q_out.shape[1], k_cache.shape[1]
    if not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and k.stride(0) == v.stride(0)):
        raise ValueError("rope_cache needs rows of contiguous heads, and one row stride for k and v")
    _rope_cache_kernel[(b, heads + kv_heads)](q, k, v, cos, sin, q_out, k_cache, v_cache, slot, heads, kv_heads,
                                              k_cache.shape[2], q_out.stride(0), q_out.stride(1), q.stride(0),
                                              k.stride(0), D=hd)
    return q_out


def silu_mul(g: torch.Tensor, u: torch.Tensor, mode: int) -> torch.Tensor:
    """silu(g)·u as eager rounds it, contiguous. g, u: [..., n] with contiguous rows, evenly strided (column
    slices of one [rows, 2n] GEMM output will do: one kernel where eager takes two)."""
    n = g.shape[-1]
    g2, u2 = g.reshape(-1, n), u.reshape(-1, n)  # views for evenly strided rows
    if g2.stride(-1) != 1 or u2.stride(-1) != 1:
        raise ValueError("silu_mul needs rows of contiguous columns")
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, 1024))](g2, u2, out, n, g2.stride(0), u2.stride(0), MODE=mode,
                                                          BLOCK=1024)
    return out


# ---------------------------------------------------------------------------------------------------------
# Eager references (what LlamaRMSNorm, apply_rotary_pos_emb, the cache update and LlamaMLP compute)

def _eager_norm(h, weight, eps):
    x = h.to(torch.float32)
    var = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(var + eps)).to(h.dtype)


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def eager_rope(q, cos, sin):
    """apply_rotary_pos_emb for one tensor: q [B, H, 1, D] (a transposed view), cos/sin [B, 1, D]."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * c) + (_rotate_half(q) * s)


def within_rounding(a: torch.Tensor, ref: torch.Tensor) -> bool:
    """a equals ref up to a rounding or two of their dtype (a sum taken in another order)."""
    eps = torch.finfo(ref.dtype).eps
    return torch.allclose(a.float(), ref.float(), rtol=2 * eps, atol=2 * eps * float(ref.float().abs().mean()))


DETAIL: dict = {}  # what the last self_check saw, for a failing kernel's report


def self_check(device, dtype=torch.bfloat16) -> dict[str, int | None]:
    """Which kernels reproduce eager bit for bit on this GPU, and with which math variant (None: none)."""
    if not (_triton.AVAILABLE and libdevice is not None and torch.device(device).type == "cuda"):
        return {"norm": None, "norm_one": None, "rope": None, "silu_mul": None}
    g = torch.Generator(device=device).manual_seed(0)
    rows, n = 16, 4096
    h = (torch.randn(rows, 1, n, generator=g, device=device) * 3).to(dtype)
    d = (torch.randn(rows, 1, n, generator=g, device=device)).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g, device=device)).to(dtype)
    found: dict[str, int | None] = {}
    ref_h = h + d
    ref = _eager_norm(ref_h, w, 1e-5)
    found["norm"] = None
    for mode in (0, 1):
        try:
            hh, out = rms_norm(h, d, w, 1e-5, mode)
            _, out0 = rms_norm(h, None, w, 1e-5, mode)
        except Exception:  # noqa: BLE001 - a variant this Triton cannot compile is simply not used
            continue
        if torch.equal(hh, ref_h) and torch.equal(out, ref) and torch.equal(out0, _eager_norm(h, w, 1e-5)):
            found["norm"] = mode
            break
    found["norm_one"] = None
    if found["norm"] is not None:
        hh, out = rms_norm_one(h, d, w, 1e-5, found["norm"])
        _, out0 = rms_norm_one(h, None, w, 1e-5, found["norm"])
        if torch.equal(hh, ref_h) and within_rounding(out, ref) and within_rounding(out0, _eager_norm(h, w, 1e-5)):
            found["norm_one"] = found["norm"]
    if dtype != torch.bfloat16:
        found["rope"] = None
        return _check_silu(found, device, dtype, g, rows)
    heads, kv, hd = 8, 2, 128
    # q, k, v as column slices of one q/k/v GEMM's output, as merged batches give them (rows further apart)
    qkv = torch.randn(rows, 1, (heads + 2 * kv) * hd, generator=g, device=device).to(dtype)
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
    ang = torch.rand(rows, 1, hd, generator=g, device=device) * 50
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    qv = q.view(rows, 1, heads, hd).transpose(1, 2)
    ref_q = eager_rope(qv, cos, sin)
    ref_k = eager_rope(k.view(rows, 1, kv, hd).transpose(1, 2), cos, sin)
    kc = torch.zeros(rows, kv, 8, hd, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    slot = torch.tensor([5], device=device)
    out = torch.empty_strided(ref_q.shape, ref_q.stride(), dtype=dtype, device=device)
    try:
        rope_cache(q, k, v, cos, sin, out, kc, vc, slot)
        checks = {"q": torch.equal(out, ref_q), "k": torch.equal(kc[:, :, 5:6], ref_k),
                  "v": torch.equal(vc[:, :, 5:6], v.view(rows, 1, kv, hd).transpose(1, 2)),
                  "rest": not kc[:, :, :5].any()}
        ok = all(checks.values())
        DETAIL["rope"] = dict(checks, q_max_diff=float((out.float() - ref_q.float()).abs().max()),
                              k_max_diff=float((kc[:, :, 5:6].float() - ref_k.float()).abs().max()))
    except Exception as e:  # noqa: BLE001
        ok = False
        DETAIL["rope"] = f"{type(e).__name__}: {e}"[:500]
    found["rope"] = 0 if ok else None
    return _check_silu(found, device, dtype, g, rows)


def _check_silu(found, device, dtype, g, rows):
    gate = (torch.randn(rows, 1, 11008, generator=g, device=device) * 4).to(dtype)
    up = torch.randn(rows, 1, 11008, generator=g, device=device).to(dtype)
    ref = torch.nn.functional.silu(gate) * up
    both = torch.cat([gate, up], dim=-1)  # the halves of one gate/up GEMM's output, as merged batches have them
    found["silu_mul"] = None
    for mode in (0, 1, 2):
        try:
            if torch.equal(silu_mul(gate, up, mode), ref) and torch.equal(silu_mul(*both.split(11008, -1), mode), ref):
                found["silu_mul"] = mode
                break
        except Exception:  # noqa: BLE001
            continue
    return found
