"""Hand-written autograd for LoRA linears on a frozen base, and for the Llama MLP built from them.

For one projection, y = X Wᵀ + s·(X Aᵀ) Bᵀ with W frozen (4-bit or 16-bit) and A [r, in], B [out, r]
trainable. What peft does per call (clone the base output, cast X to fp32, two fp32 GEMMs, a
scale, a cast back, an add) becomes one base GEMM plus a [T, r] GEMM and an `addmm_` that adds the
LoRA term into the base output, all in the activation dtype. The fp32 LoRA parameters are cast to
the activation dtype once per call (r×in elements: negligible) and their grads cast back.

Saved for backward: only the inputs (X for a projection group; X, e, g for the MLP). W is expanded
again in backward instead of being kept, as bitsandbytes does. Backward never forms an out×in
product: dA = s·(dY B)ᵀ X and dB = s·dYᵀ (X Aᵀ), 2·T·r·(in+out) FLOPs each.

LoRA dropout (peft's `lora_dropout`): the mask applies to the LoRA branch's input only, y = X Wᵀ +
s·(drop(X) Aᵀ) Bᵀ, one independent mask per projection as peft draws them. No mask is kept: each call
saves one seed (dropout.py: an int64 device scalar), and the three GEMMs that meet drop(X) — Z =
drop(X)·Aᵀ, dA = dZᵀ·drop(X) and dX's masked term drop(dZ·A) — draw the mask inside their own tiles
(dropout.py's `dropped_mm`, `dropped_t_mm`, `dropped_addmm_`), so dropout adds no saved activation and
no [T, in] pass to the dropout-free path. With p = 0 (or in eval mode, where the patch passes p = 0)
no seed is drawn and the plain GEMMs run.

A recompute followed at once by its backward (`keeping_dense`) also hands over Z = drop(X)·Aᵀ ([T, r],
small), which dB needs, instead of computing it again.

Frozen base biases (Qwen2's q/k/v) are added by the base GEMM (`addmm`); they get no gradient.

Every function here has a pure-PyTorch path (used on CPU and in the float64 gradient checks);
SwiGLU uses a Triton kernel on CUDA when `_triton.enabled("swiglu")`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from . import _triton
from .dropout import draw_seed, dropped, dropped_addmm_, dropped_mm, dropped_t_mm, seed_for_call, seeds_from
from .frozen import FrozenWeight

_state = threading.local()


@contextmanager
def keeping_dense():
    """Inside: forward nodes keep their expanded frozen weights for their backward instead of expanding
    them again. For a recompute that is followed at once by its backward (graphs.py): one layer's
    dense weights held briefly, one 4-bit expansion per weight saved."""
    prev = getattr(_state, "keep", False)
    _state.keep = True
    try:
        yield
    finally:
        _state.keep = prev


def _keep() -> bool:
    return getattr(_state, "keep", False)


class _Drop:
    """The dropout of one projection's LoRA input: its mask is a function of (seed, salt), so calling it
    in backward on X gives the forward's drop(X) again, and on a [T, in] gradient masks it the same way."""

    __slots__ = ("p", "salt", "seed")

    def __init__(self, seed: torch.Tensor, salt: int, p: float):
        self.seed, self.salt, self.p = seed, salt, p

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return dropped(t, self.seed, self.salt, self.p)

    def mm(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """drop(x) @ aᵀ."""
        return dropped_mm(x, a, self.seed, self.salt, self.p)

    def t_mm(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """dᵀ @ drop(x)."""
        return dropped_t_mm(d, x, self.seed, self.salt, self.p)

    def addmm_(self, acc: torch.Tensor, d: torch.Tensor, a: torch.Tensor, alpha: float) -> torch.Tensor:
        """acc += alpha · drop(d @ a)."""
        return dropped_addmm_(acc, d, a, self.seed, self.salt, self.p, alpha)


def _drops(ps, device) -> tuple:
    """A `_Drop` per projection with p > 0 (None elsewhere), one seed for the call; all None (and no
    seed drawn, no RNG consumed) when no p is positive."""
    if not any(ps):
        return (None,) * len(ps)
    seed, first = seed_for_call(device, len(ps))
    return tuple(_Drop(seed, first + i, p) if p > 0 else None for i, p in enumerate(ps))


def _lora_in(x2d, a, drop):
    """Z = drop(X)·Aᵀ [T, r], the LoRA branch's rank-r activation."""
    return x2d @ a.t() if drop is None else drop.mm(x2d, a)


def _lora_grads(dyb, dy2d, x2d, z, s, drop):
    """(dA, dB) of one projection from dZ = dY·B [T, r] and Z = drop(X)·Aᵀ."""
    da = (dyb.t() @ x2d if drop is None else drop.t_mm(dyb, x2d)).mul_(s)  # [r, in]
    return da, (dy2d.t() @ z).mul_(s)  # [out, r]


def _lora_dx_(dx, dyb, a, s, drop):
    """dX += s·drop(dZ·A): the LoRA branch's part of dX, masked as the forward's input was
    (∂drop(X)/∂X = m)."""
    return dx.addmm_(dyb, a, alpha=s) if drop is None else drop.addmm_(dx, dyb, a, s)


def _lora_forward(x2d, w, a, b, s, drop=None, bias=None, kept=None):
    """x2d [T, in] -> [T, out]: base GEMM (+ frozen bias), then the LoRA term accumulated into it (β=1,
    α=s), its input dropped by `drop` when given. `kept`: a list that receives Z = drop(X)·Aᵀ for a
    backward that follows at once (`keeping_dense`), which then need not compute it again."""
    out = x2d @ w.t() if bias is None else torch.addmm(bias, x2d, w.t())
    if a is not None:
        z = _lora_in(x2d, a, drop)
        if kept is not None:
            kept.append(z)
        out.addmm_(z, b.t(), alpha=s)
    return out


def _lora_backward(dy2d, x2d, w, a, b, s, dx, drop=None, z=None):
    """Accumulates dX of one projection into `dx` (or creates it) and returns (dx, dA, dB).

    With `drop`, the LoRA branch saw drop(X) = X ⊙ m: dA and dB use drop(X) (its mask drawn again from
    the seed), and so does the branch's part of dX. `z`: the forward's Z when it kept it."""
    if dx is None:
        dx = dy2d @ w
    else:
        dx.addmm_(dy2d, w)
    if a is None:
        return dx, None, None
    if z is None:
        z = _lora_in(x2d, a, drop)
    dyb = dy2d @ b  # [T, r]
    da, db = _lora_grads(dyb, dy2d, x2d, z, s, drop)
    return _lora_dx_(dx, dyb, a, s, drop), da, db


def _cast(p, dtype):
    return None if p is None else p.to(dtype)


def _grad_like(g, p):
    return None if (g is None or p is None or not p.requires_grad) else g.to(p.dtype)


class LoRALinears(torch.autograd.Function):
    """Several LoRA projections of one input (q,k,v share X; o is a group of one). Saves X once.

    `ps`: each projection's LoRA dropout probability (0: none)."""

    @staticmethod
    def forward(ctx, x, weights: tuple[FrozenWeight, ...], scales: tuple[float, ...], ps: tuple[float, ...],
                *ab):
        x2d = x.reshape(-1, x.shape[-1])
        outs, dense, keep = [], [], _keep()
        drops = _drops(ps, x.device)
        kept_z: list = []
        for i, fw in enumerate(weights):
            a, b = _cast(ab[2 * i], x.dtype), _cast(ab[2 * i + 1], x.dtype)
            w = fw.dense()
            kept = [] if keep else None
            out = _lora_forward(x2d, w, a, b, scales[i], drops[i], fw.bias_as(x.dtype), kept)
            outs.append(out.view(*x.shape[:-1], -1))
            kept_z.append(kept[0] if kept else None)
            if keep:
                dense.append(w)
        ctx.dense = tuple(dense) if keep else None
        ctx.kept_z = kept_z
        ctx.weights, ctx.scales, ctx.drops = weights, scales, drops
        ctx.save_for_backward(x, *ab)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        x, *ab = ctx.saved_tensors
        x2d = x.reshape(-1, x.shape[-1])
        dx, grads = None, []
        for i, fw in enumerate(ctx.weights):
            a_p, b_p = ab[2 * i], ab[2 * i + 1]
            a, b = _cast(a_p, x.dtype), _cast(b_p, x.dtype)
            d = douts[i]
            if d is None:
                grads += [None, None]
                continue
            w = ctx.dense[i] if ctx.dense is not None else fw.dense()
            dx, da, db = _lora_backward(d.reshape(-1, d.shape[-1]), x2d, w, a, b, ctx.scales[i], dx,
                                        ctx.drops[i], ctx.kept_z[i])
            grads += [_grad_like(da, a_p), _grad_like(db, b_p)]
        if dx is not None:
            dx = dx.view(x.shape)
        return (dx, None, None, None, *grads)


def _acc(dtype):
    """fp32 for 16-bit inputs (as in the kernels); float64 stays float64 for the gradient checks."""
    return torch.promote_types(dtype, torch.float32)


def _gate_act(ef: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(act(e), act'(e)) in e's (accumulation) dtype: SiLU for SwiGLU, tanh-GELU for Gemma's GeGLU."""
    if act == "silu":
        sig = torch.sigmoid(ef)
        return ef * sig, sig * (1 + ef * (1 - sig))
    k = 0.7978845608028654  # sqrt(2/pi)
    t = torch.tanh(k * (ef + 0.044715 * ef.pow(3)))
    return 0.5 * ef * (1 + t), 0.5 * (1 + t) + 0.5 * ef * (1 - t * t) * k * (1 + 0.134145 * ef * ef)


def swiglu_forward(e: torch.Tensor, g: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """h = act(e)·g, the gated MLP's middle (SwiGLU; GeGLU with act="gelu_tanh")."""
    if e.is_cuda and _triton.enabled("swiglu"):
        return _triton.swiglu_fwd(e, g, act)
    acc = _acc(e.dtype)
    return (_gate_act(e.to(acc), act)[0] * g.to(acc)).to(e.dtype)


def swiglu_backward(dh, e, g, act: str = "silu"):
    """Returns (h, de, dg) for h = act(e)·g, computing in fp32 like the Triton kernel."""
    if e.is_cuda and _triton.enabled("swiglu"):
        return _triton.swiglu_bwd(dh, e, g, act)
    acc = _acc(e.dtype)
    ef, gf, dhf = e.to(acc), g.to(acc), dh.to(acc)
    f, df = _gate_act(ef, act)
    return (f * gf).to(e.dtype), (dhf * gf * df).to(e.dtype), (dhf * f).to(g.dtype)


class GatedAct(torch.autograd.Function):
    """h = act(e)·g with e, g halves of one fused gate_up projection (Phi-3); saves e and g."""

    @staticmethod
    def forward(ctx, e, g, act):
        e, g = e.contiguous(), g.contiguous()
        ctx.act = act
        ctx.save_for_backward(e, g)
        return swiglu_forward(e, g, act)

    @staticmethod
    def backward(ctx, dh):
        e, g = ctx.saved_tensors
        _, de, dg = swiglu_backward(dh.contiguous(), e, g, ctx.act)
        return de, dg, None


class LoRAMLP(torch.autograd.Function):
    """down(act(gate(X)) · up(X)) with LoRA on any of the three. Saves X, e = gate(X), g = up(X).

    `ps`: the LoRA dropout probability of gate, up and down (down's LoRA input is h = act(e)·g);
    `act`: "silu" (SwiGLU: Llama, Mistral, Qwen) or "gelu_tanh" (GeGLU: Gemma)."""

    @staticmethod
    def forward(ctx, x, weights, scales, ps, act, ag, bg, au, bu, ad, bd):
        x2d = x.reshape(-1, x.shape[-1])
        dt = x.dtype
        keep = _keep()
        dense = []

        def expand(fw):
            w = fw.dense()
            if keep:
                dense.append(w)
            return w

        drops = _drops(ps, x.device)
        kept = [[] if keep else None for _ in range(3)]
        e = _lora_forward(x2d, expand(weights[0]), _cast(ag, dt), _cast(bg, dt), scales[0], drops[0], None, kept[0])
        g = _lora_forward(x2d, expand(weights[1]), _cast(au, dt), _cast(bu, dt), scales[1], drops[1], None, kept[1])
        h = swiglu_forward(e, g, act)
        y = _lora_forward(h, expand(weights[2]), _cast(ad, dt), _cast(bd, dt), scales[2], drops[2], None, kept[2])
        ctx.kept_z = [k[0] if k else None for k in kept]
        ctx.dense = tuple(dense) if keep else None
        ctx.weights, ctx.scales, ctx.drops, ctx.act = weights, scales, drops, act
        ctx.save_for_backward(x, e, g, ag, bg, au, bu, ad, bd)
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, e, g, ag, bg, au, bu, ad, bd = ctx.saved_tensors
        dt = x.dtype
        def w(i):  # expanded one at a time unless kept from the forward: peak holds one dense weight
            return ctx.dense[i] if ctx.dense is not None else ctx.weights[i].dense()

        sg, su, sd = ctx.scales
        dg_drop, du_drop, dd_drop = ctx.drops
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, dy.shape[-1])
        ad_c, bd_c = _cast(ad, dt), _cast(bd, dt)
        # dh = dY Wdᵀ-side (+ LoRA), then the gate's backward, which also rebuilds h for dA_down/dB_down.
        dh = dy2d @ w(2)
        if ad_c is not None:
            dyb = dy2d @ bd_c
            _lora_dx_(dh, dyb, ad_c, sd, dd_drop)
        h, de, dg = swiglu_backward(dh, e, g, ctx.act)
        del dh
        dad = dbd = None
        kept_g, kept_u, kept_d = ctx.kept_z
        if ad_c is not None:
            z = kept_d if kept_d is not None else _lora_in(h, ad_c, dd_drop)
            dad, dbd = _lora_grads(dyb, dy2d, h, z, sd, dd_drop)
        del h
        dx, dau, dbu = _lora_backward(dg, x2d, w(1), _cast(au, dt), _cast(bu, dt), su, None, du_drop, kept_u)
        dx, dag, dbg = _lora_backward(de, x2d, w(0), _cast(ag, dt), _cast(bg, dt), sg, dx, dg_drop, kept_g)
        return (dx.view(x.shape), None, None, None, None,
                _grad_like(dag, ag), _grad_like(dbg, bg), _grad_like(dau, au), _grad_like(dbu, bu),
                _grad_like(dad, ad), _grad_like(dbd, bd))


def lora_linears(x, weights, scales, ab, ps=None):
    """One output per projection; `ps`: LoRA dropout probabilities (None: no dropout)."""
    ps = tuple(ps) if ps is not None else (0.0,) * len(weights)
    return LoRALinears.apply(x, tuple(weights), tuple(scales), ps, *ab)


def lora_mlp(x, weights, scales, ab, ps=None, act: str = "silu"):
    ps = tuple(ps) if ps is not None else (0.0, 0.0, 0.0)
    return LoRAMLP.apply(x, tuple(weights), tuple(scales), ps, act, *ab)


@contextmanager
def _tile_seeds(seed: torch.Tensor | None, tile: int):
    """Tile `tile`'s dropout masks: the call's seed and the tile's own three salts, the same in the forward
    and in the backward's recompute."""
    if seed is None:
        yield
        return
    with seeds_from(seed) as src:
        src.calls = 3 * tile
        yield


class TiledMLP(torch.autograd.Function):
    """`lora_mlp` over the tokens in tiles of `tile` rows (ALST's tiled MLP, arXiv 2506.13996). Saves only X
    and one dropout seed; the backward recomputes each tile's MLP and takes its gradients before the next,
    so the [tokens, intermediate] tensors exist for one tile at a time. Costs one more MLP forward: for long
    sequences only (long-context runs, model/memory.MLP_TILE_TOKENS)."""

    @staticmethod
    def forward(ctx, x, tile, weights, scales, ps, act, *ab):
        x2d = x.reshape(-1, x.shape[-1])
        seed = draw_seed(x.device) if any(p > 0 for p in ps) else None
        out = []
        for k, lo in enumerate(range(0, x2d.shape[0], tile)):
            with _tile_seeds(seed, k):
                out.append(lora_mlp(x2d[lo:lo + tile], weights, scales, ab, ps, act))
        ctx.tile, ctx.weights, ctx.scales, ctx.ps, ctx.act, ctx.seed = tile, weights, scales, ps, act, seed
        ctx.save_for_backward(x, *ab)
        return torch.cat(out).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, *ab = ctx.saved_tensors
        x2d, dy2d = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2d)
        leaves = [None if p is None else p.detach().requires_grad_() for p in ab]
        grads = [None if p is None else torch.zeros_like(p) for p in ab]
        for k, lo in enumerate(range(0, x2d.shape[0], ctx.tile)):
            xk = x2d[lo:lo + ctx.tile].detach().requires_grad_()
            with torch.enable_grad(), _tile_seeds(ctx.seed, k):
                yk = lora_mlp(xk, ctx.weights, ctx.scales, leaves, ctx.ps, ctx.act)
            live = [p for p in leaves if p is not None]
            got = torch.autograd.grad(yk, [xk, *live], dy2d[lo:lo + ctx.tile])
            dx[lo:lo + ctx.tile] = got[0]
            for g, d in zip((g for g in grads if g is not None), got[1:], strict=True):
                g += d
        return (dx.view(x.shape), None, None, None, None, None, *grads)


def tiled_mlp(x, tile: int, weights, scales, ab, ps=None, act: str = "silu"):
    ps = tuple(ps) if ps is not None else (0.0, 0.0, 0.0)
    return TiledMLP.apply(x, tile, tuple(weights), tuple(scales), ps, act, *ab)


def lora_fused_mlp(x, weights, scales, ab, ps=None, act: str = "silu"):
    """Phi-3's MLP: down(act(gate) · up) with [gate | up] = gate_up(X), one LoRA projection each way."""
    ps = tuple(ps) if ps is not None else (0.0, 0.0)
    (gu,) = LoRALinears.apply(x, (weights[0],), (scales[0],), ps[:1], *ab[:2])
    e, g = gu.chunk(2, dim=-1)
    h = GatedAct.apply(e, g, act)
    (y,) = LoRALinears.apply(h, (weights[1],), (scales[1],), ps[1:], *ab[2:])
    return y
