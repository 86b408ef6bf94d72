"""Put the fast path into a peft LoRA/QLoRA model of the Llama family, in place: Llama, Mistral, Qwen2/2.5,
Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 (`_ARCHS` says what differs between them).

What changes (per decoder layer, forward methods of instances only, so that transformers' own
gradient checkpointing of the decoder layer, peft's parameters and `save_pretrained` stay as
they are):
- self_attn: q/k/v in one `LoRALinears` node (X saved once; Phi-3's fused qkv_proj is a node of one),
  o_proj in another; the q/k norms (Qwen3, Gemma 3), RoPE and the attention call as transformers does
  them for that architecture (sliding windows, Gemma 2's logit soft-capping).
- mlp: one `LoRAMLP` node, SwiGLU or GeGLU (Gemma); Phi-3's gate_up_proj: two nodes and the gate.
- every RMSNorm of the layer and the final one: `RMSNormFrozen` (Gemma's x̂·(1 + w) too).
- the causal-LM head, when labels are given and grad is on: `causal_lm_loss`, which returns the
  loss and no logits (`outputs.logits is None`); Gemma 2's final soft-capping inside it.
- frozen fp32 floating-point parameters (peft's `prepare_model_for_kbit_training` upcasts norms,
  embeddings and lm_head) go back to the compute dtype: the fp32 copies turn the residual stream,
  attention and the logits fp32 (research/performance.md section 1.2: −23% GPU time).
peft's `lora_dropout` runs inside the fused nodes (lora.py, dropout.py), in training mode only, as
peft's `nn.Dropout` does. `fast_path_summary` says in one line whether a run got all this, and if not,
which setting would give it.
"""

from __future__ import annotations

import importlib
import types
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import torch

from . import _triton
from .packed import BOUNDARIES_KEY, CAUSAL_KEY


@dataclass(frozen=True)
class _Arch:
    """What the patch needs to know of one transformers architecture (Llama's layer layout, or a variant)."""

    prefix: str  # class-name prefix in the modeling module
    # How stock attention passes `sliding_window` to the attention function: not at all (Llama), from
    # the config (Mistral, Phi-3), or from the attention module, set per layer from config.layer_types.
    window: Literal["none", "config", "module"]
    module: str = ""  # transformers.models.<module>.modeling_<module>; "" = the model_type
    qk_norm: bool = False  # an RMSNorm over each head of q and of k before RoPE (Qwen3, Gemma 3)
    act: Literal["silu", "gelu_tanh"] = "silu"  # the MLP's gate: SwiGLU, or GeGLU (Gemma)
    act_field: str = "hidden_act"  # the config field naming it
    plus_one: bool = False  # Gemma's RMSNorm: x̂·(1 + w), in fp32
    softcap: bool = False  # Gemma 2 soft-caps attention logits (passed to the attention function)
    fused: bool = False  # Phi-3: one qkv_proj and one gate_up_proj


_GEMMA = dict(act="gelu_tanh", act_field="hidden_activation", plus_one=True)
_ARCHS = {"llama": _Arch("Llama", "none"), "mistral": _Arch("Mistral", "config"),
          "qwen2": _Arch("Qwen2", "module"), "qwen3": _Arch("Qwen3", "module", qk_norm=True),
          "gemma2": _Arch("Gemma2", "module", softcap=True, **_GEMMA),
          "gemma3_text": _Arch("Gemma3", "module", module="gemma3", qk_norm=True, **_GEMMA),
          "phi3": _Arch("Phi3", "config", fused=True)}
_ACT_NAMES = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")}
_ATTN = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _attn_names(arch: _Arch) -> tuple[str, ...]:
    return ("qkv_proj",) if arch.fused else _ATTN


def _mlp_names(arch: _Arch) -> tuple[str, ...]:
    return ("gate_up_proj", "down_proj") if arch.fused else _MLP


def _arch_module(model_type: str):
    name = _ARCHS[model_type].module or model_type
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _unwrap(model):
    """(peft model or None, the transformers CausalLM inside it)."""
    base = model
    peft_model = None
    if hasattr(model, "base_model") and hasattr(model, "peft_config"):
        peft_model = model
        base = model.base_model  # LoraModel
        base = getattr(base, "model", base)
    return peft_model, base


_GPU_HINT = "run on a CUDA GPU (model.device: auto or cuda)"


def _refusal(model, allow_cpu: bool) -> tuple[str, str] | None:
    """(why the fast path cannot take this model, what a user can set to get it), or None if it can."""
    peft_model, base = _unwrap(model)
    cfg = getattr(base, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in _ARCHS:
        return (f"model type {mt!r} is not supported yet",
                f"the fast path covers {', '.join(_ARCHS)}; other models train on the stock path")
    arch = _ARCHS[mt]
    act = getattr(cfg, arch.act_field, None) or arch.act
    if act not in _ACT_NAMES[arch.act]:
        return (f"{arch.act_field} {act!r} is not {_ACT_NAMES[arch.act][0]}",
                f"no setting: this checkpoint's MLP is not the {arch.prefix} gated MLP the kernels fuse")
    if getattr(cfg, "mlp_bias", False):
        return "the MLP projections have biases", "no setting: this checkpoint's MLP has biases"
    if peft_model is not None:
        for name, pc in peft_model.peft_config.items():
            if getattr(pc, "peft_type", None) is not None and str(pc.peft_type.value) != "LORA":
                return f"adapter {name!r} is {pc.peft_type.value}, not LoRA", "use a LoRA adapter"
            if getattr(pc, "use_dora", False) and getattr(pc, "lora_dropout", 0.0) > 0:
                return ("DoRA with lora_dropout > 0 is not supported",
                        "set lora.lora_dropout: 0 (DoRA runs on the fast path without dropout)")
            if getattr(pc, "bias", "none") != "none":
                return f"bias={pc.bias!r} trains biases", "set lora.bias: none"
            if getattr(pc, "lora_bias", False):
                return "lora_bias is not supported", "use adapters without lora_bias"
        if len(getattr(peft_model, "active_adapters", ["x"])) != 1:
            return "more than one active adapter", "activate a single adapter"
    try:
        dev = next(base.parameters()).device
    except StopIteration:
        return "model has no parameters", "load a model with weights"
    if dev.type != "cuda" and not allow_cpu:
        return f"the model is on {dev.type}: the fast path is for CUDA GPUs", _GPU_HINT
    if any(p.dtype == torch.int8 for p in base.parameters()):  # bitsandbytes 8-bit: W needs its SCB scales
        return "8-bit base weights are not supported", "set model.use_8bit: false (model.use_4bit: true is QLoRA)"
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None or not len(layers):
        return "no decoder layers found at model.model.layers", "no setting: unexpected model layout"
    mod, prefix = _arch_module(mt), arch.prefix
    for part, cls in (("self_attn", "Attention"), ("mlp", "MLP")):
        want = getattr(mod, f"{prefix}{cls}")
        if type(getattr(layers[0], part, None)) is not want:
            return (f"layers[0].{part} is {type(getattr(layers[0], part, None)).__name__}, not transformers' "
                    f"{want.__name__}", "set model.trust_remote_code: false to load transformers' own code")
    return None


def is_supported(model, *, allow_cpu: bool = False) -> tuple[bool, str]:
    """Whether `patch_model` can put the fast path into this model, and if not, why."""
    refusal = _refusal(model, allow_cpu)
    return (True, "ok") if refusal is None else (False, refusal[0])


class _Proj(NamedTuple):
    """One projection as the fused nodes see it."""

    base: torch.nn.Module  # the frozen Linear / Linear4bit
    lora_a: torch.nn.Module | None
    lora_b: torch.nn.Module | None
    scale: float
    dropout: torch.nn.Module | None  # peft's nn.Dropout (None: Identity or no LoRA)
    magnitude: torch.nn.Module | None = None  # DoRA's trained magnitude m (peft's lora_magnitude_vector)

    def p(self) -> float:
        """The dropout probability for this call: 0 in eval mode, as nn.Dropout."""
        d = self.dropout
        return d.p if d is not None and d.training else 0.0


def _frozen_bias(base) -> bool:
    """No bias, or a frozen one (added by the base GEMM, no grad); a trained bias is not for us."""
    b = getattr(base, "bias", None)
    return b is None or not b.requires_grad


def _lora_parts(mod) -> _Proj | None:
    """The projection's parts, or None if the fused nodes cannot run it.

    The A/B *modules* are kept, not their Parameters: each call reads `.weight` afresh, so whoever
    swaps a parameter on the module (graphs.py does, to capture with fresh autograd leaves) is seen."""
    if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
        active = getattr(mod, "active_adapters", None) or [getattr(mod, "active_adapter", None)]
        if len(active) != 1:
            return None
        adapter = active[0]
        if getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
            return None
        dora = bool(mod.use_dora.get(adapter, False))
        magnitude = getattr(mod, "lora_magnitude_vector", {})
        variant = getattr(mod, "lora_variant", {}).get(adapter)
        if dora != (adapter in magnitude) or (variant is not None and not (dora and "Dora" in type(variant).__name__)):
            return None  # a LoRA variant other than DoRA, or a DoRA layer without its magnitude
        base = mod.get_base_layer()
        if not _frozen_bias(base) or not _dense_or_4bit(base):
            return None
        if adapter not in mod.lora_A:
            return _Proj(base, None, None, 0.0, None)
        drop = mod.lora_dropout[adapter]
        if type(drop) not in (torch.nn.Identity, torch.nn.Dropout):
            return None
        la, lb = mod.lora_A[adapter], mod.lora_B[adapter]
        if getattr(la, "bias", None) is not None or getattr(lb, "bias", None) is not None:
            return None
        drop = drop if isinstance(drop, torch.nn.Dropout) and drop.p > 0 else None
        if dora and drop is not None:
            return None  # peft's DoRA runs the base GEMM again on the dropped input (dora.py)
        return _Proj(base, la, lb, float(mod.scaling[adapter]), drop, magnitude[adapter] if dora else None)
    if isinstance(mod, torch.nn.Linear) and _frozen_bias(mod) and _dense_or_4bit(mod):
        return _Proj(mod, None, None, 0.0, None)
    return None


def _dense_or_4bit(base) -> bool:
    w = getattr(base, "weight", None)
    return w is not None and (w.is_floating_point() or getattr(w, "quant_state", None) is not None)


def _weights(mods):
    return [None if m is None else m.weight for m in mods]


def _frozen(parts, dtype):
    from .frozen import FrozenWeight

    return tuple(FrozenWeight(p.base.weight, dtype, p.base.bias) for p in parts)


def _attn_forward_factory(orig_forward, parts_qkv, parts_o, dtype, model_type):
    from .lora import lora_linears
    from .packed import attend
    from .rope import apply_rope, rope_supported

    ml = _arch_module(model_type)
    arch = _ARCHS[model_type]
    window = arch.window
    w_qkv, w_o = _frozen(parts_qkv, dtype), _frozen((parts_o,), dtype)
    s_qkv = tuple(p.scale for p in parts_qkv)
    ab_qkv = [m for p in parts_qkv for m in (p.lora_a, p.lora_b)]
    ab_o = [parts_o.lora_a, parts_o.lora_b]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        # transformers 5 passes the KV cache as `cache` (`past_key_values` before): with either, or
        # another dtype, the stock forward runs (it updates the cache; training never has one).
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None \
                or position_embeddings is None or hidden_states.dtype != dtype:
            return orig_forward(hidden_states, position_embeddings=position_embeddings,
                                attention_mask=attention_mask, **kwargs)
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        qkv = _with_dora(lora_linears(hidden_states, w_qkv, s_qkv, _weights(ab_qkv), [p.p() for p in parts_qkv]),
                         parts_qkv, w_qkv)
        if arch.fused:  # Phi-3: one projection, [q | k | v] along its output
            nq, nkv = self.config.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
            qkv = qkv[0].split((nq, nkv, nkv), dim=-1)
        q, k, v = (t.reshape(hidden_shape) for t in qkv)
        if arch.qk_norm:  # per head, before RoPE (Qwen3, Gemma 3): the norms are patched like the others
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        if rope_supported(q, cos):  # rotated in the [B, S, H, D] layout, one kernel per tensor
            q, k = apply_rope(q, k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = ml.apply_rotary_pos_emb(q, k, cos, sin)
        if window == "config":
            kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
        elif window == "module":
            kwargs["sliding_window"] = self.sliding_window
        if arch.softcap:
            kwargs["softcap"] = self.attn_logit_softcapping
        if kwargs.pop(CAUSAL_KEY, False):  # unpacked rows: the model's forward passed a placeholder, no mask
            attention_mask = None  # SDPA then runs causal (see _lm_forward_factory)
        cu = kwargs.pop(BOUNDARIES_KEY, None)
        if cu is not None:  # packed rows, and the model's forward passed no mask (see _lm_forward_factory)
            out, weights = attend(q, k, v, cu, self.scaling), None
        else:
            attention_interface = ml.ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, ml.eager_attention_forward)
            out, weights = attention_interface(
                self, q, k, v, attention_mask,
                dropout=self.attention_dropout if self.training else 0.0,
                scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        (out,) = _with_dora(lora_linears(out, w_o, (parts_o.scale,), _weights(ab_o), (parts_o.p(),)),
                            (parts_o,), w_o)
        return out, weights

    return forward


def _mlp_forward_factory(orig_forward, parts, dtype, arch: _Arch):
    from .lora import lora_fused_mlp, lora_mlp, tiled_mlp

    ws = _frozen(parts, dtype)
    ss = tuple(p.scale for p in parts)
    ab = [m for p in parts for m in (p.lora_a, p.lora_b)]
    fn = lora_fused_mlp if arch.fused else lora_mlp
    if any(p.magnitude is not None for p in parts):
        fn = partial(_dora_mlp, parts=parts, fused=arch.fused)

    def forward(self, x):
        if x.dtype != dtype:
            return orig_forward(x)
        # long-context runs (`tile_mlps`): in tiles, the checkpoint's no-grad forward too, whose e, g and h
        # for every token would otherwise be the layer's peak once the backward is tiled
        tile = getattr(self, "_loraforge_tile", 0)
        if tile and fn is lora_mlp and x.shape[:-1].numel() > 2 * tile:
            return tiled_mlp(x, tile, ws, ss, _weights(ab), [p.p() for p in parts], arch.act)
        return fn(x, ws, ss, _weights(ab), [p.p() for p in parts], arch.act)

    forward.tileable = fn is lora_mlp
    return forward


def _with_dora(outs, parts, frozen) -> tuple:
    """The fused node's outputs, each projection that has a DoRA magnitude scaled as peft's DoRA (dora.py)."""
    from .dora import dora_output

    return tuple(o if p.magnitude is None else
                 dora_output(o, fw, p.lora_a.weight, p.lora_b.weight, p.scale, p.magnitude.weight)
                 for o, p, fw in zip(outs, parts, frozen, strict=True))


def _dora_mlp(x, ws, ss, ab, ps, act, *, parts, fused: bool):
    """The gated MLP with DoRA projections: gate and up (or Phi-3's gate_up) in one LoRA node, each output
    scaled by its DoRA magnitude before the gate, then down. DoRA needs each projection's own output, which
    the fused `LoRAMLP` node keeps inside."""
    from .lora import GatedAct, lora_linears

    n_in = 1 if fused else 2
    gates = _with_dora(lora_linears(x, ws[:n_in], ss[:n_in], ab[:2 * n_in], ps[:n_in]), parts[:n_in], ws[:n_in])
    e, g = gates[0].chunk(2, dim=-1) if fused else gates
    h = GatedAct.apply(e.contiguous(), g.contiguous(), act)
    (y,) = _with_dora(lora_linears(h, ws[n_in:], ss[n_in:], ab[2 * n_in:], ps[n_in:]), parts[n_in:], ws[n_in:])
    return y


def _norm_forward_factory(orig_forward, dtype, plus_one: bool):
    from .norm import rms_norm

    def forward(self, hidden_states):
        if hidden_states.dtype != dtype or self.weight.requires_grad:
            return orig_forward(hidden_states)
        eps = getattr(self, "variance_epsilon", None) or self.eps
        if plus_one:  # Gemma: x̂·(1 + w) in fp32; w is frozen, so 1 + w is made once per device
            w = getattr(self, "_loraforge_w1", None)
            if w is None or w.device != self.weight.device:
                w = self._loraforge_w1 = 1.0 + self.weight.detach().float()
            return rms_norm(hidden_states, w, eps, fp32_scale=True)
        return rms_norm(hidden_states, self.weight, eps)

    return forward


def _lm_forward_factory(orig_forward):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .cross_entropy import causal_lm_loss

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if labels is None or not torch.is_grad_enabled() or self.lm_head.weight.requires_grad \
                or not isinstance(self.lm_head, torch.nn.Linear) or self.lm_head.bias is not None:
            kwargs.pop(BOUNDARIES_KEY, None)  # the stock forward builds the packed rows' mask itself
            return orig_forward(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, past_key_values=past_key_values,
                                inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                logits_to_keep=logits_to_keep, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        bare = attention_mask is None and past_key_values is None
        packed = bare and kwargs.get(BOUNDARIES_KEY) is not None and getattr(self, "_loraforge_packed", False)
        # Unpacked rows without a mask (the trainer drops a right-padded batch's, sampler.without_padding_mask)
        # need only causal attention; with a restarting `position_ids` they would be packed rows.
        causal = bare and position_ids is None and getattr(self, "_loraforge_causal", False)
        if not packed:
            kwargs.pop(BOUNDARIES_KEY, None)
        if packed or causal:
            # A 4D mask is taken as already built (transformers' `_preprocess_mask_arguments`), so none is
            # built and the host does not wait for the GPU to say whether the rows are packed (it asks even
            # of plain rows). It is empty: any attention that did read it would fail on its shape, not attend
            # across examples. Our attention forward takes the offsets, or CAUSAL_KEY, instead.
            like = input_ids if input_ids is not None else inputs_embeds
            attention_mask = like.new_empty((1, 1, 0, 0), dtype=torch.bool)
            if causal:
                kwargs[CAUSAL_KEY] = True
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        loss = causal_lm_loss(outputs.last_hidden_state, self.lm_head.weight, labels,
                              shift_labels=shift_labels, num_items_in_batch=num_items,
                              softcap=getattr(self.config, "final_logit_softcapping", None))
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)

    return forward


def _compute_dtype(base) -> torch.dtype:
    for mod in base.modules():
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        cd = getattr(mod, "compute_dtype", None)
        if qs is not None:
            return cd if cd in (torch.bfloat16, torch.float16) else qs.dtype
    emb = base.get_input_embeddings().weight.dtype
    return emb if emb in (torch.bfloat16, torch.float16) else torch.bfloat16


def _dropout_gemms_agree(x, seed, rnd) -> bool:
    """The LoRA GEMMs that draw the dropout mask in their tiles (dropout.py) against their twins; off
    (the twins run: `dropped` + plain GEMMs) if any differs by more than bf16 rounding."""
    from . import dropout as D

    _triton.ENABLED["dropout_mm"] = True
    a, d = rnd(16, x.shape[1]) * 0.02, rnd(x.shape[0], 16)
    xd = D._dropped_torch(x, seed, 3, 0.5).float()
    try:  # dX's term added to zeros: a bf16 sum's rounding would hide a wrong mask
        pairs = ((D.dropped_mm(x, a, seed, 3, 0.5), xd @ a.float().t()),
                 (D.dropped_t_mm(d, x, seed, 3, 0.5), d.float().t() @ xd),
                 (D.dropped_addmm_(torch.zeros_like(x), d, a, seed, 3, 0.5, 1.0),
                  D._dropped_torch(d @ a, seed, 3, 0.5).float()))
    except Exception:  # a kernel that does not build: the twins run, the element kernels stay on
        return False
    return all(float((u.float() - v).norm() / v.norm()) < 1e-2 for u, v in pairs)


def self_check(device) -> dict[str, str]:
    """Runs each Triton kernel once against its PyTorch twin; switches off any that fails."""
    out = {}
    _triton.ENABLED.setdefault("dropout", True)  # dropout.py's kernel, checked here with the others
    if not _triton.AVAILABLE or torch.device(device).type != "cuda":
        return {k: "off (no Triton/CUDA)" for k in _triton.ENABLED}
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen).to(torch.bfloat16)

    checks = {}

    def chk_swiglu():
        from .lora import swiglu_backward, swiglu_forward
        e, g, dh = rnd(300, 700), rnd(300, 700), rnd(300, 700)
        _triton.ENABLED["swiglu"] = True
        a = (swiglu_forward(e, g), *swiglu_backward(dh, e, g))
        _triton.ENABLED["swiglu"] = False
        b = (swiglu_forward(e, g), *swiglu_backward(dh, e, g))
        return max(float((x.float() - y.float()).norm() / y.float().norm()) for x, y in zip(a, b, strict=True))

    def chk_rmsnorm():
        from .norm import _rmsnorm_bwd_torch, _rmsnorm_fwd_torch
        x, w, dy = rnd(37, 4096), rnd(4096), rnd(37, 4096)
        y1, r1 = _triton.rmsnorm_fwd(x, w, 1e-5)
        y2, r2 = _rmsnorm_fwd_torch(x, w, 1e-5)
        d1, d2 = _triton.rmsnorm_bwd(dy, x, w, r1), _rmsnorm_bwd_torch(dy, x, w, r2)
        return max(float((y1.float() - y2.float()).norm() / y2.float().norm()),
                   float((d1.float() - d2.float()).norm() / d2.float().norm()))

    def chk_dequant():
        import bitsandbytes.functional as bnbf
        w = rnd(384, 1024)
        errs = []
        for nested in (True, False):
            q, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
            ref = bnbf.dequantize_4bit(q, qs)
            got = _triton.nf4_dequant(q, qs, torch.bfloat16)
            errs.append(float((got.float() - ref.float()).abs().max()))
        return max(errs)

    def chk_rope():
        from .rope import _rope_torch

        x, cos, sin = rnd(2, 37, 5, 128), rnd(2, 37, 128), rnd(2, 37, 128)
        errs = []
        for inv in (False, True):
            a, b = _triton.rope(x, cos, sin, inv), _rope_torch(x, cos, sin, inv)
            errs.append(float((a.float() - b.float()).norm() / b.float().norm()))
        return max(errs)

    def chk_dropout():
        from .dropout import _dropped_torch, _dropped_triton, draw_seed, dropped_add_

        x, seed = rnd(37, 4100), draw_seed(device)
        errs = []
        for kernel32 in (True, False):  # the uint32 hash (the default) and the int64 one it falls back to
            _triton.ENABLED["dropout32"] = kernel32
            for salt, p in ((0, 0.05), (5, 0.5)):  # the kernel and its twin must drop the very same elements
                a, b = _dropped_triton(x, seed, salt, p), _dropped_torch(x, seed, salt, p)
                err = float((a.float() - b.float()).abs().max()) + float(((a == 0) != (b == 0)).sum())
                if kernel32:
                    acc = rnd(37, 4100)
                    want = acc.float() + 0.5 * b.float()
                    got = dropped_add_(acc.clone(), x, seed, salt, p, 0.5).float()
                    err += float(((got - want).abs() > 1e-2 * want.abs() + 1e-2).sum())
                errs.append(err)
            if kernel32 and max(errs) == 0:
                _triton.ENABLED["dropout_mm"] = _dropout_gemms_agree(x, seed, rnd)
                return 0.0  # the uint32 kernels agree: they stay on
        _triton.ENABLED["dropout32"] = False
        return max(errs[2:])

    checks = {"swiglu": (chk_swiglu, 1e-2), "rmsnorm": (chk_rmsnorm, 1e-2), "dequant": (chk_dequant, 0.0),
              "rope": (chk_rope, 1e-2), "dropout": (chk_dropout, 0.0)}
    for name, (fn, tol) in checks.items():
        want = _triton.ENABLED.get(name, False)
        try:
            err = fn()
            ok = err <= tol
            out[name] = f"{'on' if ok and want else 'off'} (err {err:.2e})"
        except Exception as exc:  # a kernel that does not build or run is switched off, not fatal
            ok = False
            out[name] = f"off ({type(exc).__name__}: {str(exc)[:120]})"
        _triton.ENABLED[name] = bool(ok and want)
    return out


def patch_model(model, *, fast_cross_entropy: bool = True, allow_cpu: bool = False) -> dict:
    """Patch a peft LoRA/QLoRA Llama, Mistral or Qwen2 model in place so its training step runs the fast path.

    Returns a summary: {"patched": bool, "reason": str, "hint": str, "model_type": str, "layers": n,
    "attention": n, "mlp": n, "norms": n, "cross_entropy": bool, "lora_dropout": p, "downcast_params": n,
    "skipped": [...], "triton": {...}}. Never raises for an unsupported model: it returns "patched":
    False, the reason and the hint (what to set to get the fast path). `fast_path_summary` turns it into
    one line. `allow_cpu` lets the tests run the same math on the CPU (correct, not faster).
    """
    summary: dict = {"patched": False, "layers": 0, "attention": 0, "mlp": 0, "norms": 0,
                     "cross_entropy": False, "lora_dropout": 0.0, "downcast_params": 0, "skipped": []}
    refusal = _refusal(model, allow_cpu)
    summary["reason"], summary["hint"] = refusal or ("ok", "")
    if refusal is not None:
        return summary
    if getattr(model, "_loraforge_patched", False):
        summary.update(model._loraforge_patch_summary, reason="already patched")
        return summary
    _, base = _unwrap(model)
    mt = summary["model_type"] = base.config.model_type
    dtype = _compute_dtype(base)
    summary["dtype"] = str(dtype).replace("torch.", "")
    device = next(base.parameters()).device
    summary["triton"] = self_check(device)

    for p in base.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype == torch.float32 \
                and not hasattr(p, "quant_state"):
            p.data = p.data.to(dtype)
            summary["downcast_params"] += 1

    arch = _ARCHS[mt]
    norm_cls = getattr(_arch_module(mt), f"{arch.prefix}RMSNorm")

    def patch_norm(norm, where):
        if type(norm) is norm_cls:
            norm.forward = types.MethodType(_norm_forward_factory(norm.forward, dtype, arch.plus_one), norm)
            summary["norms"] += 1
        else:
            summary["skipped"].append(f"{where}: {type(norm).__name__} is not {norm_cls.__name__}")

    def note_dropout(parts):
        summary["lora_dropout"] = max([summary["lora_dropout"]] + [p.dropout.p for p in parts if p.dropout])
        summary["dora"] = summary.get("dora", False) or any(p.magnitude is not None for p in parts)

    for i, layer in enumerate(base.model.layers):
        summary["layers"] += 1
        attn, mlp = layer.self_attn, layer.mlp
        parts = [_lora_parts(getattr(attn, n, None)) for n in (*_attn_names(arch), "o_proj")]
        if all(p is not None for p in parts) and getattr(attn, "head_dim", None):
            attn.forward = types.MethodType(
                _attn_forward_factory(attn.forward, parts[:-1], parts[-1], dtype, mt), attn)
            summary["attention"] += 1
            note_dropout(parts)
        else:
            summary["skipped"].append(
                f"layers.{i}.self_attn: unsupported projection (DoRA with dropout/trained bias/8-bit?)")
        parts = [_lora_parts(getattr(mlp, n, None)) for n in _mlp_names(arch)]
        if all(p is not None for p in parts):
            mlp.forward = types.MethodType(_mlp_forward_factory(mlp.forward, parts, dtype, arch), mlp)
            summary["mlp"] += 1
            note_dropout(parts)
        else:
            summary["skipped"].append(f"layers.{i}.mlp: unsupported projection (DoRA with dropout/trained bias/8-bit?)")
        # every norm of the layer: Llama's two, Gemma's four, the q/k norms of Qwen3 and Gemma 3
        norms = [(f"layers.{i}.{n}", m) for n, m in layer.named_children() if n.endswith("layernorm")]
        norms += [(f"layers.{i}.self_attn.{n}", getattr(attn, n)) for n in ("q_norm", "k_norm") if arch.qk_norm]
        for where, norm in norms:
            patch_norm(norm, where)
    patch_norm(base.model.norm, "model.norm")

    if fast_cross_entropy:
        if isinstance(getattr(base, "lm_head", None), torch.nn.Linear):
            base.forward = types.MethodType(_lm_forward_factory(base.forward), base)
            summary["cross_entropy"] = True
        else:
            summary["skipped"].append("lm_head: not a plain Linear, stock loss kept")
    summary["patched"] = summary["attention"] + summary["mlp"] > 0
    causal = _plainly_causal(base, arch, summary)
    summary["packed_attention"] = _packed_attention(base, arch, causal, device)
    base._loraforge_packed = summary["packed_attention"].startswith("on")
    base._loraforge_causal = causal is None and base.config._attn_implementation == "sdpa"
    model._loraforge_patched = True
    model._loraforge_patch_summary = dict(summary)
    return summary


def _plainly_causal(base, arch: _Arch, summary: dict) -> str | None:
    """None when every layer's attention is ours and plainly causal (no window, no soft-capping, no
    attention dropout), so the model's forward may build no mask (packed.py); else why not."""
    layers = base.model.layers
    if summary["attention"] != len(layers) or not summary["cross_entropy"]:
        return "not every layer's attention is patched"
    cfg = base.config
    windows = [getattr(cfg, "sliding_window", None)] if arch.window == "config" else \
        [getattr(layer.self_attn, "sliding_window", None) for layer in layers] if arch.window == "module" else []
    if arch.softcap or any(w is not None for w in windows):
        return "sliding-window or soft-capped attention"
    if getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout"
    return None


def _packed_attention(base, arch: _Arch, not_causal: str | None, device: torch.device) -> str:
    """Whether packed batches may skip their mask and run variable-length attention (packed.py)."""
    from .packed import check

    if not_causal is not None:
        return f"off ({not_causal})"
    layers, cfg = base.model.layers, base.config
    scaling_ok = all(abs(layer.self_attn.scaling - layer.self_attn.head_dim ** -0.5) < 1e-9 for layer in layers)
    group = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    return check(device, scaling_ok, layers[0].self_attn.head_dim, group)


def tile_mlps(model, tokens: int) -> int:
    """Long sequences (more than 2 x `tokens`) run each patched gated MLP in tiles of `tokens` rows
    (lora.TiledMLP); returns how many MLPs will. Phi-3's fused gate_up and DoRA MLPs are not tiled."""
    if not getattr(model, "_loraforge_patched", False):
        return 0
    _, base = _unwrap(model)
    n = 0
    for layer in base.model.layers:
        if getattr(getattr(vars(layer.mlp).get("forward"), "__func__", None), "tileable", False):
            layer.mlp._loraforge_tile = tokens
            n += 1
    return n


def fast_path_summary(model_or_report) -> str:
    """One line for a run's start-up: whether it runs the fast path, and if not, why and what to set.

    "fast path: on (fused LoRA with dropout 0.05, CUDA graphs, chunked loss)" or "fast path: off for
    this run because DoRA with lora_dropout > 0 is not supported — set lora.lora_dropout: 0 …". Takes the model
    (after `patch_model` and `enable_graphed_layers`, or one never patched: then `is_supported` says
    why) or a `patch_model` report; a caller that chose not to patch passes its own
    {"patched": False, "reason": ..., "hint": ...}.
    """
    model = None if isinstance(model_or_report, dict) else model_or_report
    if model is None:
        report = model_or_report
    elif getattr(model, "_loraforge_patched", False):
        report = model._loraforge_patch_summary
    else:
        reason, hint = _refusal(model, allow_cpu=False) or (
            "the fast path was not applied to this model", "set model.fast_kernels: true")
        report = {"patched": False, "reason": reason, "hint": hint}
    if not report.get("patched"):
        reason = report.get("reason", "unknown")
        hint = report.get("hint")
        if reason == "ok":  # supported, yet nothing was patched: every layer was skipped
            skipped = report.get("skipped") or ["no decoder layer could be patched"]
            reason, hint = f"no layer could be patched ({skipped[0]})", hint or "see the skipped list"
        return f"fast path: off for this run because {reason}" + (f" — {hint}" if hint else "")
    p = report.get("lora_dropout", 0.0)
    parts = [("fused DoRA" if report.get("dora") else "fused LoRA") + (f" with dropout {p:g}" if p else "")]
    runner = getattr(model, "_loraforge_graphs", None) if model is not None else None
    if runner is not None:
        parts.append(f"CUDA graphs off: {runner.stats.disabled}" if runner.stats.disabled else "CUDA graphs")
    elif model is not None:
        parts.append("no CUDA graphs")
    parts.append("chunked loss" if report.get("cross_entropy") else "stock loss")
    if str(report.get("packed_attention", "")).startswith("on"):
        parts.append("rows without padding or masks")
    off = [k for k, v in (report.get("triton") or {}).items() if v.startswith("off") and "no Triton" not in v]
    if off:
        parts.append(f"Triton off: {', '.join(off)} (their PyTorch twins run)")
    line = f"fast path: on ({', '.join(parts)})"
    skipped = report.get("skipped") or []
    if skipped:
        line += f"; {len(skipped)} module(s) on the stock path, e.g. {skipped[0]}"
    return line
