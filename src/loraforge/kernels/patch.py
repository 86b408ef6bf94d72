"""Put the fast path into a peft LoRA/QLoRA Llama model, in place.

What changes (per decoder layer, forward methods of instances only, so that transformers' own
gradient checkpointing of the decoder layer, peft's parameters and `save_pretrained` stay as
they are):
- self_attn: q/k/v in one `LoRALinears` node (X saved once), o_proj in another; RoPE and SDPA as
  transformers does them.
- mlp: one `LoRAMLP` node.
- input/post-attention/final RMSNorm: `RMSNormFrozen`.
- the causal-LM head, when labels are given and grad is on: `causal_lm_loss`, which returns the
  loss and no logits (`outputs.logits is None`).
- frozen fp32 floating-point parameters (peft's `prepare_model_for_kbit_training` upcasts norms,
  embeddings and lm_head) go back to the compute dtype: the fp32 copies turn the residual stream,
  attention and the logits fp32 (research/performance.md section 1.2: −23% GPU time).
"""

from __future__ import annotations

import types

import torch

from . import _triton

_SUPPORTED_MODEL_TYPES = ("llama",)
_ATTN = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _unwrap(model):
    """(peft model or None, the transformers CausalLM inside it)."""
    base = model
    peft_model = None
    if hasattr(model, "base_model") and hasattr(model, "peft_config"):
        peft_model = model
        base = model.base_model  # LoraModel
        base = getattr(base, "model", base)
    return peft_model, base


def is_supported(model, *, allow_cpu: bool = False) -> tuple[bool, str]:
    """Whether `patch_model` can put the fast path into this model, and if not, why."""
    peft_model, base = _unwrap(model)
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _SUPPORTED_MODEL_TYPES:
        return False, f"architecture {getattr(cfg, 'model_type', None)!r} is not Llama"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return False, f"hidden_act {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return False, "base projections have biases"
    if peft_model is not None:
        for name, pc in peft_model.peft_config.items():
            if getattr(pc, "peft_type", None) is not None and str(pc.peft_type.value) != "LORA":
                return False, f"adapter {name!r} is {pc.peft_type.value}, not LoRA"
            if getattr(pc, "use_dora", False):
                return False, "DoRA adapters are not supported"
            if getattr(pc, "lora_dropout", 0.0):
                return False, f"lora_dropout={pc.lora_dropout} > 0 is not supported"
            if getattr(pc, "bias", "none") != "none":
                return False, f"bias={pc.bias!r} is not supported"
            if getattr(pc, "lora_bias", False):
                return False, "lora_bias is not supported"
        if len(getattr(peft_model, "active_adapters", ["x"])) != 1:
            return False, "more than one active adapter"
    try:
        dev = next(base.parameters()).device
    except StopIteration:
        return False, "model has no parameters"
    if dev.type != "cuda" and not allow_cpu:
        return False, f"model is on {dev.type}: the fast path is for CUDA GPUs"
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None or not len(layers):
        return False, "no decoder layers found at model.model.layers"
    return True, "ok"


def _lora_parts(mod):
    """(base layer, A's nn.Linear, B's nn.Linear, scale) for a projection, or None.

    The A/B *modules* are kept, not their Parameters: each call reads `.weight` afresh, so whoever
    swaps a parameter on the module (graphs.py does, to capture with fresh autograd leaves) is seen."""
    adapter = None
    if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
        active = getattr(mod, "active_adapters", None) or [getattr(mod, "active_adapter", None)]
        if len(active) != 1:
            return None
        adapter = active[0]
        if getattr(mod, "merged", False) or getattr(mod, "disable_adapters", False):
            return None
        if mod.use_dora.get(adapter, False) or adapter in getattr(mod, "lora_magnitude_vector", {}):
            return None
        if adapter not in mod.lora_A:
            base = mod.get_base_layer()
            return (base, None, None, 0.0) if getattr(base, "bias", None) is None else None
        if not isinstance(mod.lora_dropout[adapter], torch.nn.Identity):
            return None
        la, lb = mod.lora_A[adapter], mod.lora_B[adapter]
        if getattr(la, "bias", None) is not None or getattr(lb, "bias", None) is not None:
            return None
        base = mod.get_base_layer()
        if getattr(base, "bias", None) is not None:
            return None
        return base, la, lb, float(mod.scaling[adapter])
    if isinstance(mod, torch.nn.Linear) and mod.bias is None:
        return mod, None, None, 0.0
    return None


def _weights(mods):
    return [None if m is None else m.weight for m in mods]


def _attn_forward_factory(orig_forward, parts_qkv, parts_o, dtype):
    from transformers.models.llama import modeling_llama as ml

    from .frozen import FrozenWeight
    from .lora import lora_linears
    from .rope import apply_rope, rope_supported

    w_qkv = tuple(FrozenWeight(p[0].weight, dtype) for p in parts_qkv)
    s_qkv = tuple(p[3] for p in parts_qkv)
    ab_qkv = [m for p in parts_qkv for m in (p[1], p[2])]
    w_o = (FrozenWeight(parts_o[0].weight, dtype),)
    ab_o = [parts_o[1], parts_o[2]]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        if past_key_values is not None or position_embeddings is None or hidden_states.dtype != dtype:
            return orig_forward(hidden_states, position_embeddings=position_embeddings,
                                attention_mask=attention_mask, past_key_values=past_key_values,
                                **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = lora_linears(hidden_states, w_qkv, s_qkv, _weights(ab_qkv))
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
        cos, sin = position_embeddings
        if rope_supported(q, cos):  # rotated in the [B, S, H, D] layout, one kernel per tensor
            q, k = apply_rope(q, k, cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = ml.apply_rotary_pos_emb(q, k, cos, sin)
        attention_interface = ml.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, ml.eager_attention_forward)
        out, weights = attention_interface(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        (out,) = lora_linears(out, w_o, (parts_o[3],), _weights(ab_o))
        return out, weights

    return forward


def _mlp_forward_factory(orig_forward, parts, dtype):
    from .frozen import FrozenWeight
    from .lora import lora_mlp

    ws = tuple(FrozenWeight(p[0].weight, dtype) for p in parts)
    ss = tuple(p[3] for p in parts)
    ab = [m for p in parts for m in (p[1], p[2])]

    def forward(self, x):
        if x.dtype != dtype:
            return orig_forward(x)
        return lora_mlp(x, ws, ss, _weights(ab))

    return forward


def _norm_forward_factory(orig_forward, dtype):
    from .norm import rms_norm

    def forward(self, hidden_states):
        if hidden_states.dtype != dtype or self.weight.requires_grad:
            return orig_forward(hidden_states)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    return forward


def _lm_forward_factory(orig_forward):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .cross_entropy import causal_lm_loss

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if labels is None or not torch.is_grad_enabled() or self.lm_head.weight.requires_grad \
                or not isinstance(self.lm_head, torch.nn.Linear) or self.lm_head.bias is not None:
            return orig_forward(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, past_key_values=past_key_values,
                                inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                logits_to_keep=logits_to_keep, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        loss = causal_lm_loss(outputs.last_hidden_state, self.lm_head.weight, labels,
                              shift_labels=shift_labels, num_items_in_batch=num_items)
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


def self_check(device) -> dict[str, str]:
    """Runs each Triton kernel once against its PyTorch twin; switches off any that fails."""
    out = {}
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

    checks = {"swiglu": (chk_swiglu, 1e-2), "rmsnorm": (chk_rmsnorm, 1e-2), "dequant": (chk_dequant, 0.0),
              "rope": (chk_rope, 1e-2)}
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
    """Patch a peft LoRA/QLoRA Llama model in place so its training step runs the fast path.

    Returns a summary: {"patched": bool, "reason": str, "layers": n, "attention": n, "mlp": n,
    "norms": n, "cross_entropy": bool, "downcast_params": n, "skipped": [...], "triton": {...}}.
    Never raises for an unsupported model: it returns "patched": False and the reason.
    `allow_cpu` lets the tests run the same math on the CPU (correct, not faster).
    """
    summary: dict = {"patched": False, "layers": 0, "attention": 0, "mlp": 0, "norms": 0,
                     "cross_entropy": False, "downcast_params": 0, "skipped": []}
    ok, why = is_supported(model, allow_cpu=allow_cpu)
    summary["reason"] = why
    if not ok:
        return summary
    if getattr(model, "_loraforge_patched", False):
        summary.update(model._loraforge_patch_summary, reason="already patched")
        return summary
    _, base = _unwrap(model)
    dtype = _compute_dtype(base)
    summary["dtype"] = str(dtype).replace("torch.", "")
    device = next(base.parameters()).device
    summary["triton"] = self_check(device)

    for p in base.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype == torch.float32 \
                and not hasattr(p, "quant_state"):
            p.data = p.data.to(dtype)
            summary["downcast_params"] += 1

    from transformers.models.llama import modeling_llama as ml

    def patch_norm(norm, where):
        if isinstance(norm, ml.LlamaRMSNorm):
            norm.forward = types.MethodType(_norm_forward_factory(norm.forward, dtype), norm)
            summary["norms"] += 1
        else:
            summary["skipped"].append(f"{where}: {type(norm).__name__} is not LlamaRMSNorm")

    for i, layer in enumerate(base.model.layers):
        summary["layers"] += 1
        attn, mlp = layer.self_attn, layer.mlp
        parts = [_lora_parts(getattr(attn, n)) for n in (*_ATTN, "o_proj")]
        if all(p is not None for p in parts) and getattr(attn, "head_dim", None):
            attn.forward = types.MethodType(
                _attn_forward_factory(attn.forward, parts[:3], parts[3], dtype), attn)
            summary["attention"] += 1
        else:
            summary["skipped"].append(f"layers.{i}.self_attn: unsupported projection (dropout/DoRA/bias?)")
        parts = [_lora_parts(getattr(mlp, n, None)) for n in _MLP]
        if all(p is not None for p in parts):
            mlp.forward = types.MethodType(_mlp_forward_factory(mlp.forward, parts, dtype), mlp)
            summary["mlp"] += 1
        else:
            summary["skipped"].append(f"layers.{i}.mlp: unsupported projection (dropout/DoRA/bias?)")
        patch_norm(layer.input_layernorm, f"layers.{i}.input_layernorm")
        patch_norm(layer.post_attention_layernorm, f"layers.{i}.post_attention_layernorm")
    patch_norm(base.model.norm, "model.norm")

    if fast_cross_entropy:
        if isinstance(getattr(base, "lm_head", None), torch.nn.Linear):
            base.forward = types.MethodType(_lm_forward_factory(base.forward), base)
            summary["cross_entropy"] = True
        else:
            summary["skipped"].append("lm_head: not a plain Linear, stock loss kept")
    summary["patched"] = summary["attention"] + summary["mlp"] > 0
    model._loraforge_patched = True
    model._loraforge_patch_summary = dict(summary)
    return summary
