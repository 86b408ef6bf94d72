"""Probe steps for the max-context search: backward stops once the last few layers are done.

With offloaded checkpointing, GPU memory in backward is the same for every layer (one layer's recompute
plus its transfer buffers), so the peak of a full step is reached within the first layers of backward; a
probe measures it without paying for the rest of the step. The search verifies its final answer with a
full step. The offloader calls `on_backward_layer(index)` as backward reaches each layer's recompute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from loraforge.kernels.offload import ActivationOffloader


class ProbeStop(Exception):
    """Raised inside backward by a probe once the layers under test are done."""


@contextmanager
def probing(offloader: ActivationOffloader, layers: int) -> Iterator[None]:
    """Within the context, backward raises ProbeStop when it reaches the recompute of layer L-1-layers."""
    def stop(index: int) -> None:
        if index < offloader.num_layers - 1 - layers:
            raise ProbeStop(f"probe: backward reached layer {index}")

    offloader.on_backward_layer = stop
    try:
        yield
    finally:
        offloader.on_backward_layer = None
