"""Offloaded activation checkpointing: each checkpointed decoder layer's input lives in host memory.

With (non-reentrant) gradient checkpointing the only tensor a decoder layer keeps between its forward
and its backward is its input hidden state, tokens x hidden in the activation dtype: 8 KiB per token
per layer for a 4096-wide model, 32 GiB for 32 layers at 128K tokens. Here those inputs go to host
memory while the forward runs on, and come back just before the layer is recomputed in backward.

How it hooks in. transformers calls `layer._gradient_checkpointing_func(forward, hidden_states)` for
each decoder layer (train mode, checkpointing on). We wrap that function per layer: the wrapped call
runs the original checkpoint inside a `torch.autograd.graph.saved_tensors_hooks` context. Inside the
checkpointed region torch's checkpoint installs its own hooks (only the innermost pair applies), so our
pack hook sees exactly what the checkpoint itself saves: its inputs — and we act only on the first
positional one, the hidden state (matched by storage, shape and stride). The same holds for reentrant
checkpointing, whose autograd Function saves its inputs with `save_for_backward`. peft and loraforge's
fused kernels run inside the region and are untouched.

- pack (forward): the side CUDA stream waits for the main stream, copies the hidden state into a
  pinned host buffer (non_blocking), and the GPU tensor is marked as used by the side stream
  (`record_stream`) so the allocator does not hand its memory out again before the copy is done. The
  saved-tensor slot keeps only the host copy, so the GPU memory is free once the layer's forward has
  moved on. The last layer is not offloaded (its backward starts at once), nor tensors under
  `min_bytes` (not worth a transfer).
- unpack (backward, when the checkpoint recomputes the layer): the host copy comes back on the side
  stream (or was already prefetched), the main stream waits for it, and the copy of the layer below
  (index - 1, next in backward order) is started on the side stream: its transfer overlaps this
  layer's recompute and backward.

On a CPU there is nothing to move: the handle keeps the tensor itself and every other step (the
per-layer registry, the prefetch bookkeeping, the counters) runs as on a GPU, so the CPU tests check
the hook logic; `force_copy=True` makes the CPU path copy into a separate buffer as well, so a test
can see that what backward gets back is the copy, not the original.

`on_backward_layer(index)`, when set, is called as backward reaches the recompute of layer `index`
(before its input is restored); an exception it raises ends that backward. The max-context benchmark
(loraforge.bench.probe) uses it to stop backward after a few layers.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class OffloadStats:
    offloaded: int = 0  # tensors sent to the host
    offloaded_bytes: int = 0
    kept: int = 0  # matched layer inputs kept on the device (last layer, too small, host full)
    restored: int = 0
    prefetched: int = 0  # restored from a prefetch started by the layer above
    host_full: int = 0
    layers_seen: set = field(default_factory=set)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "layers_seen"}
        d["layers_seen"] = len(self.layers_seen)
        return d


class PinnedPool:
    """Host buffers reused across steps, sized exactly (no power-of-two rounding).

    torch's pinned-memory allocator rounds every block up to a power of two, which at long context
    wastes up to half of the host memory the checkpoints need (31 x 2.7 GiB at 342K tokens rounds to
    31 x 4 GiB). On CUDA we take plain host memory and page-lock it with cudaHostRegister; where
    that is not available we fall back to `pin_memory=True`. A buffer goes back to the pool when the
    saved tensor that holds it is freed (end of that layer's backward) and is reused by a later pack
    of at most its size.
    """

    def __init__(self, pin: bool, limit_bytes: float | None = None):
        self.pin = pin
        self.limit_bytes = limit_bytes
        self._free: list[torch.Tensor] = []
        self._registered: dict[int, int] = {}  # data_ptr -> nbytes, for cudaHostUnregister
        self.total_bytes = 0
        self._lock = threading.Lock()  # buffers come back from autograd's device thread

    def _alloc(self, nbytes: int) -> torch.Tensor:
        if not self.pin:
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        try:
            err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
            ok = int(getattr(err, "value", err)) == 0
        except Exception:  # no binding in this build: the caching pinned allocator instead
            ok = False
        if ok:
            self._registered[buf.data_ptr()] = nbytes
            return buf
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _release(self, buf: torch.Tensor) -> None:
        ptr = buf.data_ptr()
        if self._registered.pop(ptr, None) is not None:
            try:
                torch.cuda.cudart().cudaHostUnregister(ptr)
            except Exception:
                pass
        self.total_bytes -= buf.numel()

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A host buffer of at least `nbytes` (the smallest free one that fits), or None if the
        limit forbids a new one."""
        with self._lock:
            fits = [b for b in self._free if b.numel() >= nbytes]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                self._free.remove(buf)
                return buf
            # Free buffers too small for this size would sit unused next to a new one.
            for b in [b for b in self._free if b.numel() < nbytes]:
                self._free.remove(b)
                self._release(b)
            if self.limit_bytes is not None and self.total_bytes + nbytes > self.limit_bytes:
                return None
            self.total_bytes += nbytes
        return self._alloc(nbytes)

    def give_back(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)

    def clear(self) -> None:
        with self._lock:
            for b in self._free:
                self._release(b)
            self._free.clear()


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


class _Saved:
    """What the saved-tensor slot holds instead of a layer input."""

    __slots__ = ("index", "shape", "dtype", "stride", "device", "host", "host_buf", "device_tensor",
                 "ready", "prefetch", "prefetch_ready", "__weakref__")

    def __init__(self, index, t):
        self.index = index
        self.shape, self.dtype, self.stride, self.device = t.shape, t.dtype, t.stride(), t.device
        self.host = None  # host copy (a view of host_buf)
        self.host_buf = None
        self.device_tensor = None  # kept as is (no offload) on CPU or when not offloaded
        self.ready = None  # CUDA event: host copy complete
        self.prefetch = None  # device tensor being filled from the host copy
        self.prefetch_ready = None


class ActivationOffloader:
    """Per-model state of offloaded checkpointing; see the module docstring."""

    def __init__(self, num_layers: int, *, min_bytes: int = 2 * 2**20, offload_last: bool = False,
                 prefetch: bool = True, force_copy: bool = False, host_limit_bytes: float | None = None):
        self.num_layers = num_layers
        self.min_bytes = min_bytes
        self.offload_last = offload_last
        self.prefetch = prefetch
        self.force_copy = force_copy
        self.on_backward_layer: Callable[[int], None] | None = None
        self.enabled = True
        self.stats = OffloadStats()
        self._live: dict[int, weakref.ReferenceType] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pool: PinnedPool | None = None
        self._host_limit = host_limit_bytes

    # -- plumbing -------------------------------------------------------------------------------
    def _side_stream(self, device) -> torch.cuda.Stream:
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device=device)
        return s

    def pool(self, pin: bool) -> PinnedPool:
        if self._pool is None:
            self._pool = PinnedPool(pin, self._host_limit)
        return self._pool

    def _should_offload(self, index: int, t: torch.Tensor) -> bool:
        if not self.enabled or not t.is_contiguous():
            return False
        if index == self.num_layers - 1 and not self.offload_last:
            return False
        if t.device.type == "cuda":
            return t.numel() * t.element_size() >= self.min_bytes
        return self.force_copy

    # -- hooks ----------------------------------------------------------------------------------
    def _pack(self, index: int, key: tuple, t: torch.Tensor):
        if _key(t) != key:
            return t  # another input of the checkpoint (none for transformers' decoder layers)
        self.stats.layers_seen.add(index)
        saved = _Saved(index, t)
        nbytes = t.numel() * t.element_size()
        buf = self.pool(t.is_cuda).take(nbytes) if self._should_offload(index, t) else None
        if buf is None:
            if self._should_offload(index, t):
                self.stats.host_full += 1
            saved.device_tensor = t
            self.stats.kept += 1
        else:
            host = buf[:nbytes].view(t.dtype).view(t.shape)
            if t.is_cuda:
                main = torch.cuda.current_stream(t.device)
                side = self._side_stream(t.device)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    host.copy_(t, non_blocking=True)
                    saved.ready = torch.cuda.Event()
                    saved.ready.record(side)
                t.record_stream(side)
            else:
                host.copy_(t)
            saved.host, saved.host_buf = host, buf
            weakref.finalize(saved, self.pool(t.is_cuda).give_back, buf)
            self.stats.offloaded += 1
            self.stats.offloaded_bytes += nbytes
        self._live[index] = weakref.ref(saved)
        return saved

    def _start_fetch(self, saved: _Saved) -> None:
        """Begin the host -> device copy of `saved` on the side stream."""
        if saved.host is None or saved.prefetch is not None:
            return
        if saved.device.type != "cuda":
            saved.prefetch = saved.host.clone()
            return
        main = torch.cuda.current_stream(saved.device)
        side = self._side_stream(saved.device)
        # Allocated on the main stream (so its memory belongs there); the side stream waits for
        # the main one, so the block is free of earlier work before it is overwritten.
        dev = torch.empty(saved.shape, dtype=saved.dtype, device=saved.device)
        if saved.ready is not None:
            side.wait_event(saved.ready)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            dev.copy_(saved.host, non_blocking=True)
            saved.prefetch_ready = torch.cuda.Event()
            saved.prefetch_ready.record(side)
        dev.record_stream(side)
        saved.prefetch = dev

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        index = saved.index
        if self.on_backward_layer is not None:
            self.on_backward_layer(index)
        if saved.device_tensor is not None:
            out = saved.device_tensor
        else:
            was_prefetched = saved.prefetch is not None
            self._start_fetch(saved)
            out = saved.prefetch
            if saved.prefetch_ready is not None:
                torch.cuda.current_stream(saved.device).wait_event(saved.prefetch_ready)
            saved.prefetch, saved.prefetch_ready = None, None  # a second unpack fetches again
            self.stats.prefetched += int(was_prefetched)
        self.stats.restored += 1
        if self.prefetch and index > 0:
            ref = self._live.get(index - 1)
            below = ref() if ref is not None else None
            if below is not None:
                self._start_fetch(below)
        return out

    @contextmanager
    def saving(self, index: int, target: torch.Tensor):
        """Context for one checkpointed call of layer `index` whose input is `target`.

        The pack hook knows the target by storage, shape, stride and dtype only: autograd keeps the
        hook functions with every tensor they packed, so a closure over the tensor itself would keep
        it alive — on the GPU — for as long as its host copy."""
        key = _key(target)
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: self._pack(index, key, t), self._unpack):
            yield

    def release_host_memory(self) -> None:
        if self._pool is not None:
            self._pool.clear()


class OffloadedCheckpoint:
    """Drop-in for a decoder layer's `_gradient_checkpointing_func`."""

    def __init__(self, inner, offloader: ActivationOffloader, index: int):
        self.inner = inner
        self.offloader = offloader
        self.index = index

    def __call__(self, fn, *args, **kwargs):
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if target is None or not self.offloader.enabled or not torch.is_grad_enabled():
            return self.inner(fn, *args, **kwargs)
        with self.offloader.saving(self.index, target):
            return self.inner(fn, *args, **kwargs)


def decoder_layers(model):
    """The decoder layers of a (peft-wrapped) transformers causal LM."""
    m = model
    for _ in range(6):  # PeftModel -> LoraModel -> CausalLM -> Model
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
        m = getattr(m, "model", None) or getattr(m, "base_model", None)
        if m is None:
            break
    raise ValueError("no decoder layers found (expected model.model.layers)")


def enable_offloaded_checkpointing(model, **kwargs) -> ActivationOffloader:
    """Wrap each decoder layer's checkpoint function so its input is offloaded; idempotent.

    Gradient checkpointing must already be on (transformers' `gradient_checkpointing_enable`,
    non-reentrant or reentrant); the model must be in train mode for it to apply, as always.
    Enabling checkpointing again afterwards replaces the wrappers: call this again then.
    """
    layers = decoder_layers(model)
    existing = getattr(model, "_loraforge_offloader", None)
    if existing is not None and all(isinstance(getattr(layer, "_gradient_checkpointing_func", None),
                                               OffloadedCheckpoint) for layer in layers):
        return existing
    layers = checkpointed_layers(model, "offloaded checkpointing")
    off = ActivationOffloader(len(layers), **kwargs)
    for i, layer in enumerate(layers):
        inner = layer._gradient_checkpointing_func
        if isinstance(inner, OffloadedCheckpoint):
            inner = inner.inner
        layer._gradient_checkpointing_func = OffloadedCheckpoint(inner, off, i)
    model._loraforge_offloader = off
    return off


def checkpointed_layers(model, what: str):
    """The decoder layers, each with gradient checkpointing on (what `what` wraps), or a ValueError."""
    layers = decoder_layers(model)
    missing = [i for i, layer in enumerate(layers)
               if not callable(getattr(layer, "_gradient_checkpointing_func", None))
               or not getattr(layer, "gradient_checkpointing", False)]
    if missing:
        raise ValueError(f"{what}: gradient checkpointing must be on in every decoder layer "
                         f"(not on layers {missing[:5]}...): enable training.gradient_checkpointing")
    return layers


def unwrap_checkpoint_funcs(model, wrapper_cls, attr: str) -> list:
    """Give each decoder layer back the checkpoint function a `wrapper_cls` wrapped, wherever it sits in the
    layer's chain of wrappers (graphs go beneath the offloader); drop `model.<attr>`. Returns the wrappers
    that were removed (their owners may have resources to release)."""
    removed = []
    for layer in decoder_layers(model):
        owner, f = None, getattr(layer, "_gradient_checkpointing_func", None)
        while f is not None and not isinstance(f, wrapper_cls):
            owner, f = f, getattr(f, "inner", None)
        if f is None:
            continue
        if owner is None:
            layer._gradient_checkpointing_func = f.inner
        else:
            owner.inner = f.inner
        removed.append(f)
    if hasattr(model, attr):
        delattr(model, attr)
    return removed


def disable_offloaded_checkpointing(model) -> None:
    for f in unwrap_checkpoint_funcs(model, OffloadedCheckpoint, "_loraforge_offloader"):
        f.offloader.release_host_memory()
