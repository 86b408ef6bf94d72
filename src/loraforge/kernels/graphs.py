"""Checkpointed decoder layers replayed as CUDA graphs: the training step without launch overhead.

Why. After the fused kernels, a 7B QLoRA step at 4×512 spends ~205 ms in GPU kernels but ~500 ms of
wall time (bench/NOTES.md): the host cannot issue the ~60 small kernels per layer (dequantizations,
LoRA GEMMs, casts, RoPE, norms) as fast as the GPU runs them, and in backward the recompute runs
Python on autograd's device thread. A CUDA graph issues a whole layer with one launch.

What is captured. Gradient checkpointing already splits the step into per-layer pieces with tiny
interfaces: a layer's forward needs its input hidden state (plus the position embeddings and the mask,
the same for every layer), and its backward needs that input again and the gradient of its output.
So for each decoder layer and each input signature (shapes and dtypes of the hidden state and of
every tensor argument) two graphs are captured once:

- forward: the layer under `no_grad`, from a static input buffer into a static output buffer;
- backward: the recompute with grad from the same static input, then `torch.autograd.grad` for the
  input and the layer's trainable (LoRA) parameters given a static output-gradient buffer. The
  recompute keeps the dequantized frozen weights for the backward that follows at once
  (`lora.keeping_dense`), so each 4-bit weight is expanded twice per step instead of three times.

`_GraphedLayer`, an autograd Function, ties the two into the model's graph: it saves the layer input
(exactly what checkpointing saves) and returns the parameter gradients to autograd, so accumulation,
grad hooks and clipping see ordinary gradients. Every graph shares one memory pool: graphs never run
concurrently, and what outlives a replay (outputs) is copied out at once.

LoRA dropout. Its masks come from a seed (dropout.py). Ordinary checkpointing replays the forward's
seeds in the recompute by restoring the RNG state; two separate graphs cannot (each replay of a graph
gets fresh random numbers). So each layer's graphs take their dropout seed from a static buffer
(`dropout.seeds_from`): the forward replay draws a new seed into it and keeps a copy, the backward
replay puts that copy back, and the recompute inside it draws the forward's masks again. A layer
without dropout draws nothing.

Safety. A call whose signature is new captures (the first step of each shape; at most
`max_signatures` shapes, after which new shapes run the ordinary checkpoint), and anything the graphs
cannot express (no CUDA, grad off, a tensor argument that needs grad, a trainable parameter replaced
since capture, a capture error) runs the ordinary checkpoint instead. On a CPU, `emulate=True` runs
the very same buffers and calls eagerly instead of replaying, so the tests check the autograd wiring.
"""

from __future__ import annotations

import functools
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .dropout import draw_seed, seeds_from
from .lora import keeping_dense


def _signature(x: torch.Tensor, kwargs: dict) -> tuple | None:
    """Hashable description of a call, or None if the call cannot be graphed."""

    def sig(v, is_input=False):
        if isinstance(v, torch.Tensor):
            if v.requires_grad and not is_input:  # a keyword tensor that needs grad: not ours to graph
                raise TypeError
            return ("T", tuple(v.shape), v.dtype, v.device, v.stride())
        if isinstance(v, (tuple, list)):
            return (type(v).__name__, *(sig(u) for u in v))
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        raise TypeError

    try:
        return (sig(x, True), tuple(sorted((k, sig(v)) for k, v in kwargs.items())))
    except TypeError:
        return None


def _static_like(v):
    """A buffer with the same layout as v (tensors), or v itself (everything else)."""
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
    if isinstance(v, (tuple, list)):
        return type(v)(_static_like(u) for u in v)
    return v


def _tensors(v) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for u in v for t in _tensors(u)]
    return []


def _kw_tensors(kwargs: dict) -> list[torch.Tensor]:
    """Every tensor among the keyword arguments, in key order (the order the signature uses)."""
    return [t for k in sorted(kwargs) for t in _tensors(kwargs[k])]


@contextmanager
def _aliased(slots: list[tuple[torch.nn.Module, str]]):
    """Swap each (module, name) parameter for a new leaf Parameter sharing its storage; restore after."""
    originals = [mod._parameters[name] for mod, name in slots]
    leaves = [torch.nn.Parameter(p.detach(), requires_grad=True) for p in originals]
    for (mod, name), leaf in zip(slots, leaves, strict=True):
        mod._parameters[name] = leaf
    try:
        yield leaves
    finally:
        for (mod, name), p in zip(slots, originals, strict=True):
            mod._parameters[name] = p


@dataclass
class _Statics:
    """Buffers shared by every layer's graphs for one signature."""

    x: torch.Tensor
    y: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    seed: torch.Tensor  # the dropout seed of the layer being replayed (0-d int64)
    kwargs: dict
    kw_tensors: list[torch.Tensor]
    last_kw: list = field(default_factory=list)  # the tensors last copied in (kept alive: no id reuse)


@dataclass
class _LayerGraphs:
    fwd: Any
    bwd: Any
    grads: tuple  # static parameter gradients (None where a parameter gets none)
    ptrs: tuple  # data_ptr of each trainable parameter at capture
    seeded: bool = False  # the layer applies LoRA dropout: each forward replay draws a seed


@dataclass
class GraphStats:
    captured: int = 0  # (layer, signature) pairs captured
    replays: int = 0
    fallbacks: int = 0
    disabled: str = ""  # why graphs were switched off for good, if they were


class LayerGraphRunner:
    """Owns the graphs, the static buffers and the shared memory pool of one model."""

    def __init__(self, slots: list[list[tuple[torch.nn.Module, str]]], *, max_signatures: int = 3,
                 min_repeats: int = 2, emulate: bool = False, warmup: int = 2, log=None):
        # slots[i]: (module, attribute) of each trainable parameter of layer i, so that a parameter
        # replaced after capture (the graph would go on reading the old one) is noticed
        self.slots = slots
        self.params = [[mod._parameters[name] for mod, name in layer] for layer in slots]
        self.max_signatures = max_signatures
        # A shape is captured the `min_repeats`-th time a layer sees it: unpacked batches padded to
        # their longest row change shape often, and a capture is only worth it for a shape that recurs.
        self.min_repeats = min_repeats
        self.seen: dict[tuple[int, tuple], int] = {}
        self.emulate = emulate
        self.warmup = warmup
        self.log = log or (lambda m: None)
        self.statics: dict[tuple, _Statics] = {}
        self.graphs: dict[tuple[int, tuple], _LayerGraphs] = {}
        self.stats = GraphStats()
        self.paused = False  # the benchmark's ablation: ordinary checkpointing, graphs kept
        self.pool = None if emulate else torch.cuda.graph_pool_handle()
        # One capture stream for every graph: the allocator reuses a freed block only on the stream it
        # was freed on, so a stream per capture would keep every capture's working memory apart.
        self.stream = None if emulate else torch.cuda.Stream()

    # ---------------------------------------------------------------- per call
    def usable(self, x: torch.Tensor, kwargs: dict) -> tuple | None:
        if self.stats.disabled or self.paused or not torch.is_grad_enabled():
            return None
        if not self.emulate and not x.is_cuda:
            return None
        s = _signature(x, kwargs)
        if s is None:
            return None
        dev = x.device.type
        s = (*s, ("autocast", torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
        if s not in self.statics and len(self.statics) >= self.max_signatures:
            return None
        return s

    def summary(self) -> dict:
        return {"captured": self.stats.captured, "replays": self.stats.replays,
                "fallbacks": self.stats.fallbacks, "signatures": len(self.statics),
                "disabled": self.stats.disabled}

    def _fill_kwargs(self, st: _Statics, kwargs: dict) -> None:
        live = _kw_tensors(kwargs)
        if len(live) == len(st.last_kw) and all(a is b and a._version == v for a, (b, v) in
                                                zip(live, st.last_kw, strict=True)):
            return  # the same position embeddings / mask as the previous layer: already there
        for dst, src in zip(st.kw_tensors, live, strict=True):
            dst.copy_(src)
        st.last_kw = [(t, t._version) for t in live]

    def _bind(self, fn, st: _Statics):
        """fn (transformers' partial over the layer's forward) with the static tensors in place."""
        static_kw = {**fn.keywords, **st.kwargs}
        return functools.partial(fn.func, *fn.args, **static_kw)

    def _get(self, index: int, sig: tuple, fn, x: torch.Tensor, kwargs: dict) -> _LayerGraphs | None:
        g = self.graphs.get((index, sig))
        params = self.params[index]
        if g is None:
            if len(self.seen) > 4096:  # shapes that never recur: forget them
                self.seen.clear()
            n = self.seen[(index, sig)] = self.seen.get((index, sig), 0) + 1
            if n < self.min_repeats:
                return None
        if g is not None:
            if any(mod._parameters.get(name) is not p or p.data_ptr() != ptr for (mod, name), p, ptr
                   in zip(self.slots[index], params, g.ptrs, strict=True)):
                self.disable(f"a trainable parameter of layer {index} was replaced after capture")
                return None
            return g
        st = self.statics.get(sig)
        if st is None:
            kw_static = {k: _static_like(v) for k, v in kwargs.items()}
            st = _Statics(x=_static_like(x), y=_static_like(x), dy=_static_like(x), dx=_static_like(x),
                          seed=torch.zeros((), dtype=torch.int64, device=x.device),
                          kwargs=kw_static, kw_tensors=_kw_tensors(kw_static))
            self.statics[sig] = st
        try:
            g = self._capture(index, fn, st, x, kwargs)
        except Exception as e:  # a layer the graphs cannot express runs the ordinary checkpoint
            self.disable(f"capture of layer {index} failed: {type(e).__name__}: {str(e)[:300]}")
            return None
        self.graphs[(index, sig)] = g
        self.stats.captured += 1
        return g

    def _capture(self, index: int, fn, st: _Statics, x: torch.Tensor, kwargs: dict) -> _LayerGraphs:
        params = self.params[index]
        bound = self._bind(fn, st)
        dev = x.device.type
        amp = dict(enabled=torch.is_autocast_enabled(dev), dtype=torch.get_autocast_dtype(dev))

        def call(inp):
            # the caller's autocast state, without autocast's cast cache (its entries would be made
            # inside the capture and outlive it); replays and their backward see the same state
            with torch.autocast(dev, cache_enabled=False, **amp):
                return bound(inp)

        st.x.copy_(x)
        self._fill_kwargs(st, kwargs)
        st.dy.zero_()

        def run_fwd() -> bool:
            """Runs the layer; True if it took a dropout seed."""
            with torch.no_grad(), seeds_from(st.seed) as src:
                out = call(st.x)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"decoder layer returned {type(out).__name__}, not a tensor")
                st.y.copy_(out)
            return src.users > 0

        def run_bwd():
            # Fresh leaves over the same storage stand in for the parameters: the graph reads the
            # parameters' memory (so optimizer updates are seen), while autograd never touches the
            # parameters' own AccumulateGrad nodes, which belong to the default stream and, if an
            # earlier step's graph is still referenced, would join that stream into the capture.
            with torch.enable_grad(), keeping_dense(), seeds_from(st.seed), \
                    _aliased(self.slots[index]) as leaves:
                xi = st.x.detach().requires_grad_(True)
                out = call(xi)
                grads = torch.autograd.grad(out, (xi, *leaves), st.dy, allow_unused=True)
            st.dx.copy_(grads[0])
            return grads[1:]

        ptrs = tuple(p.data_ptr() for p in params)
        if self.emulate:
            seeded = run_fwd()  # fail here, not in the middle of a backward, if the layer cannot run this way
            return _LayerGraphs(fwd=run_fwd, bwd=run_bwd, grads=(), ptrs=ptrs, seeded=seeded)

        side = self.stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # cuBLAS workspaces, Triton compiles, SDPA kernel choice
            for _ in range(self.warmup):
                seeded = run_fwd()
                run_bwd()
        torch.cuda.current_stream().wait_stream(side)
        fwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd, pool=self.pool, stream=side):  # the stream the warm-up ran on
            run_fwd()
        bwd = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bwd, pool=self.pool, stream=side):
            grads = run_bwd()
        # The warm-up's autograd graphs hold pool memory through reference cycles; they are young, so the
        # youngest generation frees them (a full collection per layer cost ~0.3 s each, 10 s per model).
        gc.collect(0)
        return _LayerGraphs(fwd=fwd, bwd=bwd, grads=tuple(grads), ptrs=ptrs, seeded=seeded)

    def disable(self, why: str) -> None:
        if not self.stats.disabled:
            self.stats.disabled = why
            self.log(f"CUDA graphs off: {why}; layers run the ordinary checkpoint")
        self.graphs.clear()
        self.statics.clear()
        self.seen.clear()

    # ---------------------------------------------------------------- replay
    def forward(self, st: _Statics, g: _LayerGraphs, x: torch.Tensor,
                kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the layer's output, the dropout seed its backward must see again, or None)."""
        st.x.copy_(x)
        self._fill_kwargs(st, kwargs)
        seed = None
        if g.seeded:  # drawn outside the graph, from the default generator: torch.manual_seed fixes it
            seed = draw_seed(x.device)
            st.seed.copy_(seed)
        if self.emulate:
            g.fwd()
        else:
            g.fwd.replay()
        self.stats.replays += 1
        return st.y.clone(), seed

    def backward(self, st: _Statics, g: _LayerGraphs, x: torch.Tensor, kwargs: dict,
                 dy: torch.Tensor, seed: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        # st and g come from the forward's ctx: a runner switched off meanwhile still finishes this step
        st.x.copy_(x)
        st.dy.copy_(dy)
        if seed is not None:  # the forward's masks again (another layer's forward replay came between)
            st.seed.copy_(seed)
        self._fill_kwargs(st, kwargs)
        if self.emulate:
            grads = g.bwd()
        else:
            g.bwd.replay()
            grads = g.grads
        self.stats.replays += 1
        return st.dx.clone(), tuple(grads)


class _GraphedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner, index, st, g, kwargs, x, *params):
        ctx.runner, ctx.st, ctx.g, ctx.kwargs = runner, st, g, kwargs
        ctx.save_for_backward(x)
        y, ctx.seed = runner.forward(st, g, x, kwargs)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx, grads = ctx.runner.backward(ctx.st, ctx.g, x, ctx.kwargs, dy.contiguous(), ctx.seed)
        # Static gradient buffers go to autograd as they are: AccumulateGrad copies or adds them
        # (it never keeps a tensor someone else still holds), before the next replay overwrites them.
        return (None, None, None, None, None, dx if ctx.needs_input_grad[5] else None, *grads)


class GraphedCheckpoint:
    """Drop-in for a decoder layer's `_gradient_checkpointing_func` (as offload.OffloadedCheckpoint)."""

    def __init__(self, inner, runner: LayerGraphRunner, index: int):
        self.inner = inner
        self.runner = runner
        self.index = index

    def __call__(self, fn, *args, **kwargs):
        r = self.runner
        graphable = (isinstance(fn, functools.partial) and len(args) == 1 and not kwargs
                     and isinstance(args[0], torch.Tensor) and args[0].is_contiguous())
        sig = r.usable(args[0], fn.keywords) if graphable else None
        g = r._get(self.index, sig, fn, args[0], fn.keywords) if sig is not None else None
        if g is None:
            r.stats.fallbacks += 1
            return self.inner(fn, *args, **kwargs)
        return _GraphedLayer.apply(r, self.index, r.statics[sig], g, fn.keywords, args[0], *r.params[self.index])


def enable_graphed_layers(model, *, max_signatures: int = 3, min_repeats: int = 2, emulate: bool = False,
                          log=None) -> LayerGraphRunner:
    """Wrap each checkpointed decoder layer so it runs as CUDA graphs; idempotent.

    Gradient checkpointing must be on (`model.gradient_checkpointing_enable`). With the activation
    offloader (offload.py) the graphs go beneath it, whichever was enabled first: the offloader's hooks
    then see the one tensor a graphed layer saves, its input, and keep it in host memory until the
    layer's backward, as they do for an ordinary checkpoint.
    """
    from .offload import OffloadedCheckpoint, checkpointed_layers

    existing = getattr(model, "_loraforge_graphs", None)
    if existing is not None:
        return existing
    layers = checkpointed_layers(model, "graphed layers")
    slots = [[(mod, name) for mod in layer.modules() for name, p in mod.named_parameters(recurse=False)
              if p.requires_grad] for layer in layers]
    runner = LayerGraphRunner(slots, max_signatures=max_signatures, min_repeats=min_repeats, emulate=emulate,
                              log=log)
    for i, layer in enumerate(layers):
        outer = layer._gradient_checkpointing_func
        holder = outer if isinstance(outer, OffloadedCheckpoint) else None
        inner = holder.inner if holder is not None else outer
        if isinstance(inner, GraphedCheckpoint):
            continue
        if holder is not None:
            holder.inner = GraphedCheckpoint(inner, runner, i)
        else:
            layer._gradient_checkpointing_func = GraphedCheckpoint(inner, runner, i)
    model._loraforge_graphs = runner
    return runner


def disable_graphed_layers(model) -> None:
    from .offload import unwrap_checkpoint_funcs

    for f in unwrap_checkpoint_funcs(model, GraphedCheckpoint, "_loraforge_graphs"):
        f.runner.disable("switched off")


def pool_reserved_bytes(runner: LayerGraphRunner) -> int:
    """Bytes the graphs' private pool holds (replays use its free blocks without the allocator seeing
    them, so an honest peak adds this to the allocator's peak of everything else)."""
    if runner.pool is None:
        return 0
    total = 0
    for seg in torch.cuda.memory_snapshot():
        if tuple(seg.get("segment_pool_id", (0, 0))) == tuple(runner.pool):
            total += seg["total_size"] - seg["allocated_size"]
    return total
