"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) on the fast path, as peft computes it.

peft's DoRA output for one projection is y = g ⊙ (X Wᵀ + s·(X Aᵀ) Bᵀ) + b with the per-output-row scale
g = m / ‖W + s·B A‖ (row norms), m the trained magnitude and the norm detached (the paper's section 4.3:
the norm is a constant in backward, which saves its gradient's [out, in] memory). So DoRA is the fused
LoRA node's output times g, and only g is new.

peft forms W + s·B A as an fp32 [out, in] matrix every forward to take its row norms. Here the norm comes
from three small pieces instead: ‖W_i‖² (W is frozen: once per weight), the cross term ⟨W_i, (B A)_i⟩ =
Σ_k B_ik (W Aᵀ)_ik (one [out, in]·[in, r] product) and ‖(B A)_i‖² = (B (A Aᵀ) ⊙ B)_i (r×r). No [out, in]
matrix beyond the dequantized W the fused node expands anyway.

With LoRA dropout peft's DoRA also runs the base GEMM a second time, on the dropped input; the fast path
does not (the patch refuses DoRA with dropout and says so).
"""

from __future__ import annotations

import torch

from .frozen import FrozenWeight


def _row_sq_norms(fw: FrozenWeight, w: torch.Tensor) -> torch.Tensor:
    """‖W_i‖² in fp32, computed once per frozen weight and device (W never changes)."""
    cached = getattr(fw, "_dora_wsq", None)
    if cached is None or cached.device != w.device:
        cached = w.float().pow(2).sum(dim=1)
        fw._dora_wsq = cached
    return cached


@torch.no_grad()
def row_norms(fw: FrozenWeight, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W + s·B A‖ per output row, fp32 [out], without forming W + s·B A. Outside autocast: under a bf16
    autocast the small fp32 products (A Aᵀ, B·(A Aᵀ)) would be rounded to bf16."""
    w = fw.dense()
    with torch.autocast(device_type=w.device.type, enabled=False):
        af, bf = a.float(), b.float()
        cross = (bf * (w @ a.to(w.dtype).t()).float()).sum(dim=1)  # ⟨W_i, (B A)_i⟩
        lora_sq = ((bf @ (af @ af.t())) * bf).sum(dim=1)  # ‖(B A)_i‖²
        sq = _row_sq_norms(fw, w) + 2 * scale * cross + scale * scale * lora_sq
    return sq.clamp_min(torch.finfo(torch.float32).tiny).sqrt()


def dora_output(y: torch.Tensor, fw: FrozenWeight, a: torch.Tensor, b: torch.Tensor, scale: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """g ⊙ y + (1 − g) ⊙ bias for the fused node's output y = X Wᵀ + bias + s·(X Aᵀ) Bᵀ: peft's DoRA output.
    The gradient reaches m (through g), and A, B and X through y; not through the norm."""
    g = (magnitude / row_norms(fw, a, b, scale)).to(y.dtype)
    out = y * g
    bias = fw.bias_as(y.dtype)
    return out if bias is None else out + bias * (1 - g)
