"""Dropout on the LoRA branch's input, as a pure function of (seed, salt, element index).

peft computes base(x) + B(A(dropout(x)))·s: the frozen path never sees the mask. Its `nn.Dropout` keeps a
full-size mask (or the dropped copy of x) alive until backward, one per adapted projection. Here the mask
is never stored: it is a hash of (seed, salt, i), so backward regenerates it from the seed, an int64
scalar tensor saved per call (8 bytes instead of a [T, in] mask, and without bit-packing kernels).
Counter-based, not a torch.Generator, for two reasons:
- the seed is a *device tensor*, never read on the host: no sync, and a CUDA graph can replay the same
  mask in its forward and in its recompute by reading the seed from a buffer the caller fills
  (graphs.py does this through `seeds_from`); torch's generators hand each graph replay a new offset;
- the Triton kernels and their PyTorch twin compute the very same bits, so the CPU tests check the mask
  that the GPU uses, and `patch.self_check` can demand bit equality.

The mask, one definition for `keep_mask` and every kernel: one 32-bit hash per *pair* of elements. Flat
index i reads h = hash(seed, salt, i // 2), its low 16 bits for even i and its high 16 bits for odd i, and
is kept when those 16 bits are ≥ round(p·2¹⁶). So p is exact to 1/65536 (0.05 drops 3277/65536 = 0.050003
of the elements; the scale stays 1/(1 − p), as peft's). hash(seed, salt, j) = lowbias32(j·mul + add mod
2³²): one round of Chris Wellons' "lowbias32" finalizer, whose input is the pair counter through an affine
map keyed per call (mul odd, add: 32-bit keys digested from both halves of the seed and the salt).
One round suffices for a dropout mask: the inputs are distinct counters (the affine map is a bijection mod
2³²), nobody chooses them adversarially, and a full-avalanche bijection (each input bit flips each output
bit with probability ≈ 1/2) makes each 16-bit half uniform and unrelated to its neighbours' — the keep
rate and neighbour-correlation tests check exactly that. Keys enter through mul and add, so two calls'
streams are affinely reshuffled copies of one another: neighbours in one are far apart in the other. The
previous definition ran a mixer twice per element, the second time to fold in a second key; keying through
mul and add instead, and sharing each hash by two elements, cuts the integer work per element from 20 ops
to 6.5 (bench/NOTES.md counts them).

Everything is computed in int64 on the PyTorch side with every product below 2⁶³ (`_mul32` splits the
large multiplier), so torch and Triton agree without relying on wrap-around; the Triton kernels hash in
uint32, whose products wrap mod 2³² by definition. Pair indices wrap at 2³² (a [T, in] activation with
2³³ elements is 16 GiB in bf16). The seeds come from torch's default generator of the activations'
device (`draw_seed`): `torch.manual_seed` fixes them, and checkpointing's RNG restore replays them in the
recompute, exactly as it does for peft's `nn.Dropout`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import _triton

_M = 0xFFFFFFFF
_LB1, _LB2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers (the first < 2^31, the second not)
_SALT_A, _SALT_B = 0x9E3779B1, 0x7F4A7C15  # salts spread over 32 bits (golden-ratio style odd numbers)
_state = threading.local()


def _salt_keys(salt: int) -> tuple[int, int]:
    return (salt * _SALT_A) & _M, (salt * _SALT_B + 1) & _M


def _mul32(h: torch.Tensor, c: torch.Tensor | int) -> torch.Tensor:
    """(h·c) mod 2³² for 0 ≤ h, c < 2³², exact in int64: a multiplier below 2³¹ directly (product < 2⁶³),
    any other by its two 16-bit halves (products < 2⁴⁸)."""
    if isinstance(c, int) and c < 2**31:
        return (h * c) & _M
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M


def _lowbias32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _LB1)
    h = h ^ (h >> 15)
    h = _mul32(h, _LB2)
    return h ^ (h >> 16)


def _keys(seed: torch.Tensor, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mul, add) of one call: two 32-bit digests of the whole seed and the salt, mul odd."""
    sa, sb = _salt_keys(salt)
    lo, hi = seed & _M, (seed >> 32) & _M
    return _lowbias32(_lowbias32(lo ^ sa) ^ hi) | 1, _lowbias32(_lowbias32(hi ^ sb) ^ lo)


def _threshold(p: float) -> int:
    return min(int(p * 2**16 + 0.5), 2**16)  # round(p·2¹⁶), halves up; 2¹⁶ (p ≈ 1) keeps nothing


def keep_mask(seed: torch.Tensor, salt: int, n: int, p: float) -> torch.Tensor:
    """The [n] boolean keep mask for (seed, salt): the PyTorch twin of the Triton kernels' test."""
    mul, add = _keys(seed, salt)
    j = torch.arange((n + 1) // 2, device=seed.device, dtype=torch.int64) & _M  # pair counters
    h = _lowbias32((_mul32(j, mul) + add) & _M)
    bits = torch.stack((h & 0xFFFF, h >> 16), dim=-1).view(-1)[:n]  # element 2j: low half, 2j + 1: high
    return bits >= _threshold(p)


def _dropped_torch(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    keep = keep_mask(seed, salt, x.numel(), p).view(x.shape)
    acc = torch.promote_types(x.dtype, torch.float32)  # scale in fp32 and round once, as the kernel does
    return torch.where(keep, x.to(acc) * (1.0 / (1.0 - p)), 0.0).to(x.dtype)


def triton_enabled() -> bool:
    return _triton.AVAILABLE and _triton.ENABLED.get("dropout", True)


def _triton_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels handle `t` (a CUDA tensor, dropout kernels on); the interpreter tests
    replace it to run them on CPU tensors."""
    return t.is_cuda and triton_enabled()


def dropped(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """x ⊙ keep / (1 − p) with keep from (seed, salt) over x's row-major flat index; a new tensor."""
    x = x.contiguous()
    if _triton_on(x):
        return _dropped_triton(x, seed, salt, p)
    return _dropped_torch(x, seed, salt, p)


def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh seed on `device` from torch's default generator there (no host sync)."""
    return torch.randint(0, 2**62, (), device=device, dtype=torch.int64)


@dataclass
class _SeedSource:
    seed: torch.Tensor
    calls: int = 0  # salts handed out so far
    users: int = 0  # autograd calls that took a seed


@contextmanager
def seeds_from(seed: torch.Tensor):
    """Inside: every dropout call takes `seed` (a 0-d int64 device tensor the caller fills) and the next
    salts in call order, instead of drawing its own seed. A layer run twice in this context with the same
    seed value (a CUDA graph's forward and its recompute) draws the same masks. Yields the source, whose
    `users` says whether anything took a seed."""
    prev = getattr(_state, "source", None)
    src = _state.source = _SeedSource(seed)
    try:
        yield src
    finally:
        _state.source = prev


def seed_for_call(device: torch.device, n_salts: int) -> tuple[torch.Tensor, int]:
    """(seed, first salt) for one autograd call that applies up to `n_salts` masks."""
    src = getattr(_state, "source", None)
    if src is None:
        return draw_seed(device), 0
    first = src.calls
    src.calls += n_salts
    src.users += 1
    return src.seed, first


if _triton.AVAILABLE:
    tl, triton = _triton.tl, _triton.triton

    # ---- the hash in int64, the same ops as the PyTorch twin above (the scalar keys and the fallback kernel)

    @triton.jit
    def _mul32_i64(h, c):
        return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF

    @triton.jit
    def _lowbias32_i64(h):
        h = h ^ (h >> 16)
        h = (h * 0x7FEB352D) & 0xFFFFFFFF  # below 2^31: h·c < 2^63
        h = h ^ (h >> 15)
        h = _mul32_i64(h, 0x846CA68B)
        return h ^ (h >> 16)

    @triton.jit
    def _keys_i64(seed_ptr, salt_a, salt_b):
        seed = tl.load(seed_ptr).to(tl.int64)
        lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF  # int64 ^ (i32 or i64) promotes to int64
        mul = _lowbias32_i64(_lowbias32_i64(lo ^ salt_a) ^ hi) | 1
        add = _lowbias32_i64(_lowbias32_i64(hi ^ salt_b) ^ lo)
        return mul, add

    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, seed_ptr, n, salt_a, salt_b, thr, scale, BLOCK: tl.constexpr):
        # The fallback of the uint32 kernels below: keep_mask's int64 ops, one hash per element (its pair's).
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        mul, add = _keys_i64(seed_ptr, salt_a, salt_b)
        h = _lowbias32_i64((_mul32_i64((offs >> 1) & 0xFFFFFFFF, mul) + add) & 0xFFFFFFFF)
        bits = tl.where((offs & 1) == 1, h >> 16, h & 0xFFFF)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(bits >= thr, x * scale, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    # ---- the hash in uint32: products wrap mod 2^32, the same bits as the int64 ones at a fraction of the
    # integer work (a GPU has no native 64-bit multiply). Per pair of elements: one add (the counter's
    # affine key, see _keep_pairs) and lowbias32's 8 ops; per element: one mask or shift, one compare.

    @triton.jit
    def _lowbias32_u32(h):
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        return h ^ (h >> 16)

    @triton.jit
    def _keys32(seed_ptr, salt_a, salt_b):
        mul, add = _keys_i64(seed_ptr, salt_a, salt_b)  # per-call scalars: in int64, then 32 bits
        return mul.to(tl.uint32), add.to(tl.uint32)

    @triton.jit
    def _keep_pairs(j0, mul, add, thr, HALF: tl.constexpr):
        """Keep bits of the 2·HALF elements from flat index 2·j0 on (j0 a uint32 scalar, or a [B, 1] column
        of them: then [B, 2·HALF]). HALF hashes, not 2·HALF: (j0 + jj)·mul + add as a per-row term plus a
        per-column one, one add per pair; then each hash's low and high halves interleaved."""
        x = (j0 * mul + add) + tl.arange(0, HALF).to(tl.uint32) * mul
        h = _lowbias32_u32(x)
        return tl.interleave(h & 0xFFFF, h >> 16) >= thr

    @triton.jit
    def _keep_tile(rows, c0, k, mul, add, thr, BK: tl.constexpr, EVEN: tl.constexpr):
        """Keep bits of the [rows, c0 : c0 + BK] tile of a row-major [T, k] tensor (c0 even). With k even
        (EVEN) every row starts a pair: BK/2 hashes per row. With k odd, pairs straddle rows: one hash
        per element, its pair's, and the half its parity picks (the same bits, twice the work)."""
        if EVEN:
            j0 = rows.to(tl.uint32) * (k // 2).to(tl.uint32) + (c0 // 2).to(tl.uint32)  # wraps mod 2^32
            return _keep_pairs(j0[:, None], mul, add, thr, BK // 2)
        else:
            offs = rows.to(tl.int64)[:, None] * k + (c0 + tl.arange(0, BK))[None, :]
            h = _lowbias32_u32((offs >> 1).to(tl.uint32) * mul + add)
            return tl.where((offs & 1) == 1, h >> 16, h & 0xFFFF) >= thr

    @triton.jit
    def _keep_block(pid, seed_ptr, salt_a, salt_b, thr, BLOCK: tl.constexpr):
        mul, add = _keys32(seed_ptr, salt_a, salt_b)
        j0 = (pid.to(tl.int64) * (BLOCK // 2)).to(tl.uint32)  # BLOCK is even: the block starts a pair
        return _keep_pairs(j0, mul, add, thr, BLOCK // 2)

    @triton.jit
    def _dropout32_kernel(x_ptr, out_ptr, seed_ptr, n, salt_a, salt_b, thr, scale, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        keep = _keep_block(pid, seed_ptr, salt_a, salt_b, thr, BLOCK)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, tl.where(keep, x * scale, 0.0).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dropout_add32_kernel(acc_ptr, x_ptr, seed_ptr, n, salt_a, salt_b, thr, scale, alpha,
                              BLOCK: tl.constexpr):
        # acc += alpha · drop(x), the dropped value rounded to x's dtype first as `dropped` rounds it
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        keep = _keep_block(pid, seed_ptr, salt_a, salt_b, thr, BLOCK)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(keep, x * scale, 0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        a = tl.load(acc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(acc_ptr + offs, (a + alpha * d).to(acc_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _dropped_triton(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    out = torch.empty_like(x)
    n = x.numel()
    sa, sb = _salt_keys(salt)
    # Python ints are typed i32 below 2^31 and i64 above by Triton; either way they meet the int64 seed
    # and hash in the kernel and promote to int64, so every typing computes the same bits.
    kernel = _dropout32_kernel if _triton.ENABLED.get("dropout32", True) else _dropout_kernel
    kernel[(triton.cdiv(n, _BLOCK),)](x, out, seed, n, sa, sb, _threshold(p), 1.0 / (1.0 - p),
                                      BLOCK=_BLOCK, num_warps=4)
    return out


def dropped_add_(acc: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, salt: int, p: float,
                 alpha: float) -> torch.Tensor:
    """acc += alpha · dropped(x, seed, salt, p), in place, one pass on CUDA (backward's dX of the LoRA
    branch: no dropped copy of x written and read back)."""
    x = x.contiguous()
    if _triton_on(acc) and acc.is_contiguous() and _triton.ENABLED.get("dropout32", True):
        sa, sb = _salt_keys(salt)
        n = x.numel()
        _dropout_add32_kernel[(triton.cdiv(n, _BLOCK),)](acc, x, seed, n, sa, sb, _threshold(p), 1.0 / (1.0 - p),
                                                         float(alpha), BLOCK=_BLOCK, num_warps=4)
        return acc
    return acc.add_(dropped(x, seed, salt, p), alpha=alpha)


# ---------------------------------------------------------------- dropout inside the LoRA branch's GEMMs
#
# The LoRA branch touches drop(X) three times per projection: Z = drop(X)·Aᵀ in the forward (and again
# in a graph's recompute), dA = dZᵀ·drop(X) and the masked dX term drop(dZ·A) in the backward. Written
# as `dropped` + GEMM, each costs a [T, in] copy written and read back (~7 extra [T, in] passes per
# projection, ~6% of a Llama-7B step). The kernels below draw the mask on the tile they have just loaded
# (or, for dX, on the tile they are about to add), so dropout moves no byte the dropout-free GEMMs do
# not. Each has a PyTorch twin built from `dropped` (the CPU path and the reference of the GPU tests):
# same mask bits, same roundings, fp32 accumulation.

def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension ≥ 16


def _mm_enabled(x: torch.Tensor) -> bool:
    return _triton_on(x) and _triton.ENABLED.get("dropout32", True) and _triton.ENABLED.get("dropout_mm", True)


def dropped_mm(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """drop(x) @ aᵀ for x [T, in], a [r, in] (x's dtype), without the dropped copy of x."""
    if not _mm_enabled(x):
        return dropped(x, seed, salt, p) @ a.t()
    x, a = x.contiguous(), a.contiguous()
    t, k = x.shape
    r = a.shape[0]
    bm, bk = 64, 64
    n_m = triton.cdiv(t, bm)
    # Split the reduction over `in` so that the grid fills the GPU (T/64 row blocks alone leave most SMs
    # idle at 2,048 tokens); each split writes its own fp32 slice and one reduction adds them.
    splits, per = _splits(k, bk, n_m, x.device)
    part = torch.empty(splits, t, r, device=x.device, dtype=torch.float32)
    sa, sb = _salt_keys(salt)
    _dropped_mm_kernel[(n_m, splits)](x, a, part, seed, t, k, r, per, sa, sb, _threshold(p), 1.0 / (1.0 - p),
                                      BM=bm, BK=bk, BR=_rank_block(r), EVEN=k % 2 == 0, num_warps=4)
    return (part[0] if splits == 1 else part.sum(0)).to(x.dtype)


def _splits(n: int, block: int, other_programs: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, length of each, a multiple of `block`) of a reduction of length n, so that
    other_programs × splits is about four programs per SM and each split has ≥ 4 blocks."""
    want = max(1, min(triton.cdiv(n, 4 * block), triton.cdiv(4 * _sm_count(device), other_programs)))
    per = triton.cdiv(triton.cdiv(n, want), block) * block
    return triton.cdiv(n, per), per


def dropped_t_mm(d: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """dᵀ @ drop(x) for d [T, r], x [T, in]: the LoRA A gradient before its scale. fp32 on the GPU path
    (x's dtype on the twin); the caller casts to the parameter's dtype."""
    if not _mm_enabled(x):
        return d.t() @ dropped(x, seed, salt, p)
    d, x = d.contiguous(), x.contiguous()
    t, k = x.shape
    r = d.shape[1]
    bk, bt = 64, 64
    n_k = triton.cdiv(k, bk)
    # Split T as dropped_mm splits `in`: partial sums in their own slices, added by one reduction (not
    # atomics), so the gradient is the same bits on every run.
    splits, per = _splits(t, bt, n_k, x.device)
    part = torch.empty(splits, r, k, device=x.device, dtype=torch.float32)
    sa, sb = _salt_keys(salt)
    _dropped_t_mm_kernel[(n_k, splits)](d, x, part, seed, t, k, r, per, sa, sb, _threshold(p), 1.0 / (1.0 - p),
                                         BT=bt, BK=bk, BR=_rank_block(r), EVEN=k % 2 == 0, num_warps=4)
    return part[0] if splits == 1 else part.sum(0)


def dropped_addmm_(acc: torch.Tensor, d: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, salt: int, p: float,
                   alpha: float) -> torch.Tensor:
    """acc += alpha · drop(d @ a) in place, d [T, r], a [r, in]: the LoRA branch's part of dX, with the
    product rounded to acc's dtype before the mask as the twin rounds it."""
    if not (_mm_enabled(acc) and acc.is_contiguous()):
        return dropped_add_(acc, d @ a, seed, salt, p, alpha)
    d, a = d.contiguous(), a.contiguous()
    t, k = acc.shape
    r = d.shape[1]
    sa, sb = _salt_keys(salt)
    bm, bk = 64, 128
    _dropped_addmm_kernel[(triton.cdiv(t, bm), triton.cdiv(k, bk))](
        acc, d, a, seed, t, k, r, sa, sb, _threshold(p), 1.0 / (1.0 - p), float(alpha),
        BM=bm, BK=bk, BR=_rank_block(r), EVEN=k % 2 == 0, num_warps=4)
    return acc


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


if _triton.AVAILABLE:

    @triton.jit
    def _dropped_tile(x_ptr, rows, c0, k, k_end, t_end, mul, add, thr, scale, BK: tl.constexpr,
                      EVEN: tl.constexpr):
        # drop(x) on the tile [rows < t_end, c0 ≤ cols < k_end] of a row-major [T, k] x, rounded to x's
        # dtype as `dropped` rounds it; the flat index rows·k + cols is the one `dropped` hashes.
        cols = c0 + tl.arange(0, BK)
        offs = rows.to(tl.int64)[:, None] * k + cols[None, :]
        m = (rows[:, None] < t_end) & (cols[None, :] < k_end)
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        keep = _keep_tile(rows, c0, k, mul, add, thr, BK, EVEN)
        return tl.where(keep, x * scale, 0.0).to(x_ptr.dtype.element_ty)

    @triton.jit
    def _dropped_mm_kernel(x_ptr, a_ptr, part_ptr, seed_ptr, t, k, r, per, salt_a, salt_b, thr, scale,
                           BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, EVEN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        split = tl.program_id(1)
        rr = tl.arange(0, BR)
        mul, add = _keys32(seed_ptr, salt_a, salt_b)
        k0 = split * per
        k_end = tl.minimum(k, k0 + per)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for s in range(0, per, BK):
            cols = k0 + s + tl.arange(0, BK)  # per and BK are even: every tile starts a pair
            xd = _dropped_tile(x_ptr, rows, k0 + s, k, k_end, t, mul, add, thr, scale, BK, EVEN)
            at = tl.load(a_ptr + rr[None, :].to(tl.int64) * k + cols[:, None],  # aᵀ tile [BK, BR]
                         mask=(rr[None, :] < r) & (cols[:, None] < k_end), other=0.0)
            acc = tl.dot(xd, at, acc)
        out = part_ptr + split.to(tl.int64) * t * r + rows.to(tl.int64)[:, None] * r + rr[None, :]
        tl.store(out, acc, mask=(rows[:, None] < t) & (rr[None, :] < r))

    @triton.jit
    def _dropped_t_mm_kernel(d_ptr, x_ptr, part_ptr, seed_ptr, t, k, r, per, salt_a, salt_b, thr, scale,
                             BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, EVEN: tl.constexpr):
        c0 = tl.program_id(0) * BK
        split = tl.program_id(1)
        rr = tl.arange(0, BR)
        mul, add = _keys32(seed_ptr, salt_a, salt_b)
        t0 = split * per
        t_end = tl.minimum(t, t0 + per)
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        for s in range(0, per, BT):
            rows = t0 + s + tl.arange(0, BT)
            xd = _dropped_tile(x_ptr, rows, c0, k, k, t_end, mul, add, thr, scale, BK, EVEN)
            dv = tl.load(d_ptr + rows.to(tl.int64)[:, None] * r + rr[None, :],
                         mask=(rows[:, None] < t_end) & (rr[None, :] < r), other=0.0)
            acc = tl.dot(tl.trans(dv), xd, acc)
        cols = c0 + tl.arange(0, BK)
        out = part_ptr + split.to(tl.int64) * r * k + rr[:, None].to(tl.int64) * k + cols[None, :]
        tl.store(out, acc, mask=(rr[:, None] < r) & (cols[None, :] < k))

    @triton.jit
    def _dropped_addmm_kernel(acc_ptr, d_ptr, a_ptr, seed_ptr, t, k, r, salt_a, salt_b, thr, scale, alpha,
                              BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, EVEN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        c0 = tl.program_id(1) * BK
        cols = c0 + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        dv = tl.load(d_ptr + rows.to(tl.int64)[:, None] * r + rr[None, :],
                     mask=(rows[:, None] < t) & (rr[None, :] < r), other=0.0)
        av = tl.load(a_ptr + rr[:, None].to(tl.int64) * k + cols[None, :],
                     mask=(rr[:, None] < r) & (cols[None, :] < k), other=0.0)
        prod = tl.dot(dv, av).to(acc_ptr.dtype.element_ty).to(tl.float32)  # d @ a, rounded as the twin's
        mul, add = _keys32(seed_ptr, salt_a, salt_b)
        keep = _keep_tile(rows, c0, k, mul, add, thr, BK, EVEN)
        offs = rows.to(tl.int64)[:, None] * k + cols[None, :]
        m = (rows[:, None] < t) & (cols[None, :] < k)
        dd = tl.where(keep, prod * scale, 0.0).to(acc_ptr.dtype.element_ty)
        cur = tl.load(acc_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(acc_ptr + offs, (cur + alpha * dd.to(tl.float32)).to(acc_ptr.dtype.element_ty), mask=m)
