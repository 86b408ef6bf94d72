"""Merged projection weights for the fast decoder's batched steps (`infer/fast_decode.py`).

A batched decode step through a QLoRA model runs ~1,300 kernels, most of them per projection: bitsandbytes
dequantizes the absmax and then the NF4 weight before each GEMM, and peft adds the A GEMM, the B GEMM, the
scale and the add (bench/NOTES.md, session 9). With the adapter merged into a 16-bit copy of the base and
q/k/v and gate/up concatenated, a layer's projections are four plain GEMMs.

The weights are those `loraforge merge` writes for the adapter — W + B·A·(alpha/r) through peft's own merge
arithmetic (`get_delta_weight`, and `dequantize_bnb_weight` where bitsandbytes holds W, as peft's merge of a
4-bit layer does) — except that W is the served NF4 base, dequantized, where `merge` reloads the 16-bit
original: the copy computes what the served model computes, up to one rounding of each merged weight.
Batched decoding has no bit-exact reference to keep (stock batched `generate` does not reproduce itself);
a lone row keeps the model's own modules and stays bit-identical to stock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraforge.model.memory import free_bytes


class Unmergeable(Exception):
    """A projection whose output is not W·x + b for one merged W (DoRA, another peft tuner, a layout)."""


@dataclass
class MergedLayer:
    """One decoder layer's projections as four (weight [out, in], bias or None) pairs."""

    qkv: torch.Tensor  # [q_out + k_out + v_out, hidden]
    qkv_bias: torch.Tensor | None
    qkv_split: tuple[int, int, int]  # (q_out, k_out, v_out): the fused output is split back by these
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # [2 · intermediate, hidden]: gate rows first, then up
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None

    @property
    def intermediate(self) -> int:
        return self.gate_up.shape[0] // 2


@dataclass
class MergedWeights:
    layers: list[MergedLayer]
    nbytes: int


def _base(proj: torch.nn.Module) -> torch.nn.Module:
    """The linear layer under a peft wrapper (the module itself when it has none)."""
    return proj.get_base_layer() if hasattr(proj, "get_base_layer") else proj


def _check(proj: torch.nn.Module) -> list[str]:
    """The adapters whose delta goes into the merged weight (none for a plain layer); raises Unmergeable."""
    from peft.tuners.lora import LoraLayer  # peft: a plain model needs none of it, so it stays out of start-up
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = _base(proj)
    if getattr(base, "fan_in_fan_out", False) or not hasattr(base, "in_features"):
        raise Unmergeable(f"{type(base).__name__} is not a [out, in] linear layer")
    if getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False):
        # bitsandbytes (0.50 here) repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first forward;
        # dequantize_4bit does not read that layout (a GPU never repacks)
        raise Unmergeable("bitsandbytes repacked the 4-bit weights for its CPU kernel")
    if not isinstance(proj, BaseTunerLayer):
        return []
    if not isinstance(proj, LoraLayer):
        raise Unmergeable(f"{type(proj).__name__} is not a LoRA layer")
    if proj.disable_adapters:
        if proj.merged:  # its forward would unmerge first: the base weight is not what it computes with
            raise Unmergeable("adapters are disabled on a merged layer")
        return []
    names = [a for a in proj.active_adapters if a in proj.lora_A and a not in proj.merged_adapters]
    for a in names:
        if a in getattr(proj, "lora_variant", {}) or getattr(proj, "use_dora", {}).get(a, False):
            raise Unmergeable(f"adapter {a!r} is a LoRA variant (DoRA or similar), not W + B·A·scale")
        if getattr(proj, "fan_in_fan_out", False):
            raise Unmergeable("fan_in_fan_out layers")
    return names


def merged_size(layers: list[torch.nn.Module], dtype: torch.dtype) -> int:
    """Bytes the merged copy of these decoder layers takes (raises Unmergeable for a layer it cannot merge)."""
    total = 0
    for layer in layers:
        for proj in _projections(layer):
            _check(proj)
            base = _base(proj)
            total += base.out_features * (base.in_features + 1)  # + 1: a bias, at most
    return total * torch.finfo(dtype).bits // 8


def _projections(layer: torch.nn.Module) -> list[torch.nn.Module]:
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def merged_projection(proj: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) in `dtype` with proj(x) == x·weightᵀ + bias up to rounding: the base weight (dequantized
    when bitsandbytes holds it) plus each active adapter's B·A·scaling, summed in fp32 and rounded once."""
    from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type  # as _check: peft when merging

    names = _check(proj)
    base = _base(proj)
    w = base.weight
    if get_bnb_param_type(w):
        w = dequantize_bnb_weight(w, state=getattr(base, "state", None))
    w = w.to(torch.float32)
    bias = base.bias.to(torch.float32) if base.bias is not None else None
    for a in names:
        w = w + proj.get_delta_weight(a).to(torch.float32)
        lora_b = proj.lora_B[a]
        if getattr(lora_b, "bias", None) is not None:  # peft's lora_bias: B's bias, scaled as its forward does
            extra = lora_b.bias.to(torch.float32) * proj.scaling[a]
            bias = extra if bias is None else bias + extra
    return w.to(dtype), (bias.to(dtype) if bias is not None else None)


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights stacked on the output dim; biases too when any part has one (zeros for those without)."""
    weight = torch.cat([w for w, _ in parts])
    if all(b is None for _, b in parts):
        return weight, None
    return weight, torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])


@torch.no_grad()
def build(layers: list[torch.nn.Module], dtype: torch.dtype) -> MergedWeights:
    """The merged copy of every decoder layer's projections, on the layers' device, with the model's active
    adapters (one layer at a time: the fp32 temporaries never exceed one layer's)."""
    out = []
    for layer in layers:
        q, k, v, o, gate, up, down = (merged_projection(p, dtype) for p in _projections(layer))
        qkv, qkv_bias = _concat([q, k, v])
        gate_up, gate_up_bias = _concat([gate, up])
        split = (q[0].shape[0], k[0].shape[0], v[0].shape[0])
        out.append(MergedLayer(qkv, qkv_bias, split, o[0], o[1], gate_up, gate_up_bias, down[0], down[1]))
    nbytes = sum(t.numel() * t.element_size() for m in out for t in (m.qkv, m.qkv_bias, m.o, m.o_bias, m.gate_up,
                                                                       m.gate_up_bias, m.down, m.down_bias)
                 if t is not None)
    return MergedWeights(out, nbytes)


def free_memory(device: torch.device) -> float | None:
    """Free bytes on a CUDA device; None elsewhere (a CPU has no device memory to guard)."""
    return free_bytes(device) if device.type == "cuda" else None


# A merged copy may take at most this share of the free device memory: the rest is for the KV cache as it
# grows, the graph pools and prefill activations of long prompts.
FREE_SHARE = 1 / 3


def fits(nbytes: int, device: torch.device) -> tuple[bool, str]:
    """Whether a merged copy of `nbytes` fits comfortably now, and why not."""
    free = free_memory(device)
    if free is None or nbytes <= free * FREE_SHARE:
        return True, "ok"
    return False, (f"merged weights would take {nbytes / 2**30:.2f} GiB, more than 1/3 of the "
                   f"{free / 2**30:.2f} GiB free on {device}")
