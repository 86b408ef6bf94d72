"""How long a sequence fits: a per-token memory model of one training step at batch 1.

peak(s) = fixed + per_token x s + quadratic x s²

**fixed**: the frozen weights (NF4/FP4 with or without double quantization, 8-bit, or 16-bit),
embeddings/lm_head/norms (fp32 on the stock stack, whose `prepare_model_for_kbit_training` upcasts
them; the compute dtype on loraforge's), LoRA weights + grads + AdamW moments (16 bytes per trained
parameter, paged state included since it is real device memory), the dequantized workspace of the
largest frozen matrix (twice), and, with the chunked cross-entropy, its fixed chunk buffers.

**per token** (s tokens, act = 2 bytes):
- checkpoints: every decoder layer's input, L x h x (4 on the stock fp32 residual stream, else act);
  with offloaded checkpointing only the last layer's input, the one being recomputed and the one being
  prefetched stay on the GPU: 3 x h x act;
- one layer's recompute + backward working set: with loraforge's fused kernels
  act x (8h + 2kv + 6i) + fp32 attention log-sum-exp (the MLP backward holds e, g, dh, h, de, dg of
  width i at once; attention keeps q, k, v, output, o_proj input; the norms their inputs); on the
  peft/transformers modules 8h (fp32 norm copies) + a x (12h + 3kv + 6i), a the stream's dtype size,
  plus a dropout copy of each LoRA input when dropout > 0 (model/memory.py's accounting);
- LoRA intermediates: 2 x r x act per target module of the layer being recomputed;
- loss: full logits cost 12 bytes per vocabulary entry (memory.py's calibration); the chunked loss
  keeps the hidden-state gradient and the final norm's input and output (3 x h x act);
- attention is O(s) with SDPA's flash / memory-efficient kernels. The stock stack runs attention in
  fp32 (its upcast norms turn q, k, v fp32) with grouped-query heads (`enable_gqa`), a combination
  only SDPA's math kernel takes: tokens² scores, softmax and their gradients per head.

Calibration (H100 80 GB, SPEC.md, Llama-3-8B shape, QLoRA r16 all-linear, batch 1, stock stack):
8,192 tokens -> 44 GiB and 11,264 -> 74.5 GiB. With the per-token terms above, the quadratic term is
`ATTN_MATH_COPIES` x heads x 4 bytes x s²; 3.6 copies gives 45.4 GiB and 74.2 GiB at the two points
(+3%, -0.4%) and predicts 11,264 as the stock maximum on 80 GB, as measured.

`max_trainable_length(config, run, free_bytes)` inverts the model: the longest batch-1 sequence whose
peak stays within `USABLE_SHARE` x free_bytes - `RESERVE_BYTES`, rounded down to 1,024 tokens, and,
with offloading, within what host memory can hold (`host_free_bytes`).
"""

from __future__ import annotations

import math
from typing import Any

from loraforge.config import LORA_TARGET_PRESETS
from loraforge.model.memory import GIB, _shapes

LOGIT_BYTES = 12
ATTN_MATH_COPIES = 3.6
USABLE_SHARE = 0.97  # allocator fragmentation and cache
RESERVE_BYTES = 0.5 * GIB  # CUDA/cuBLAS workspaces and what the allocator rounds up
CE_CHUNK_BYTES = 256 * 2**20  # kernels/cross_entropy.CHUNK_BYTES: fp32 logits of one chunk
ROUND = 1024


def _dims(config: Any) -> dict[str, int]:
    """The memory report's layer shapes, with the q and k/v widths this model needs."""
    s = _shapes(config)
    return {**s, "kv": s["nkv"] * s["d"], "q": s["nh"] * s["d"]}


def _switches(run: Any) -> dict[str, bool]:
    t = run.training
    lc = bool(getattr(t, "long_context", False))

    def pick(name: str) -> bool:
        v = getattr(t, name, None)
        return lc if v is None else bool(v)

    return {"offload": pick("offload_activations") and bool(getattr(t, "gradient_checkpointing", True)),
            "chunked": pick("chunked_cross_entropy")}


def _targets(run: Any) -> list[str]:
    lora = run.lora
    if hasattr(lora, "resolved_targets"):
        return list(lora.resolved_targets())
    t = lora.target_modules
    return list(LORA_TARGET_PRESETS["all-linear"]) if t == "all" else list(t)


def memory_model(config: Any, run: Any, *, stack: str = "loraforge") -> dict[str, float]:
    """{'fixed': bytes, 'per_token': bytes, 'quadratic': bytes per token², plus the parts}.

    stack="stock": transformers + peft + bitsandbytes as SPEC.md measures it (fp32 upcasts, full
    logits). stack="loraforge": loraforge's build (compute-dtype frozen weights, fused kernels when
    `model.fast_kernels`, chunked loss with the fast kernels or `chunked_cross_entropy`, offloading
    per `training.long_context` / `offload_activations`).
    """
    if stack not in ("stock", "loraforge"):
        raise ValueError(f"stack must be 'stock' or 'loraforge', not {stack!r}")
    g = _dims(config)
    h, i, L, V, kv, q = g["h"], g["i"], g["L"], g["V"], g["kv"], g["q"]
    act = 2
    stock = stack == "stock"
    sw = _switches(run) if not stock else {"offload": False, "chunked": False}
    fast = not stock and bool(getattr(run.model, "fast_kernels", True))
    chunked = not stock and (sw["chunked"] or fast)
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    targets = [t for t in _targets(run) if t in shapes]
    r = run.lora.r

    m = run.model
    if getattr(m, "use_4bit", True):
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if getattr(m, "use_nested_quant", True) else 4 / 64)
    elif getattr(m, "use_8bit", False):
        per_param = 1.0 + 4 / h
    else:
        per_param = act
    linear = L * sum(a * b for a, b in shapes.values())
    other_dtype = 4 if stock else act
    weights = linear * per_param + (V * h * (1 if g["tied"] else 2) + (2 * L + 1) * h) * other_dtype
    trainable = L * sum(r * (a + b) for n, (a, b) in shapes.items() if n in targets)
    lora = trainable * 16
    workspace = 2 * max(a * b for a, b in shapes.values()) * act if per_param < act else 0
    ce_fixed = (CE_CHUNK_BYTES * 2) if chunked else 0  # fp32 chunk + its compute-dtype copies
    fixed = weights + lora + workspace + ce_fixed

    stream = 4 if stock else act
    checkpoints = (3 * h * act) if sw["offload"] else L * h * stream
    if fast:
        layer = act * (8 * h + 2 * kv + 6 * i) + 4 * g["nh"]
    else:
        layer = 8 * h + stream * (12 * h + 3 * kv + 6 * i)
        if run.lora.lora_dropout:
            layer += sum((stream + 1) * shapes[t][0] for t in targets)
    lora_act = 2 * r * act * len(targets)
    if chunked:
        # the chunked loss's hidden-state gradient and the final norm's tensors, counted with the layer
        layer_phase, loss_phase = layer + lora_act + 3 * h * act, 0
    else:
        # full logits: the loss phase and a layer's backward do not overlap; the peak is the larger
        layer_phase, loss_phase = layer + lora_act, V * LOGIT_BYTES
    quadratic = 0.0
    if stock and g["kv"] != g["q"]:
        quadratic = ATTN_MATH_COPIES * g["nh"] * 4  # fp32 GQA attention -> SDPA math kernel
    return {"fixed": fixed, "checkpoints": checkpoints, "layer": layer_phase, "loss": loss_phase,
            "quadratic": quadratic, "per_token": checkpoints + max(layer_phase, loss_phase),
            "weights": weights, "lora": lora, "workspace": workspace + ce_fixed,
            "host_per_token": (L - 1) * h * act if sw["offload"] else 0.0}


def peak_bytes(config: Any, run: Any, tokens: int, *, stack: str = "loraforge") -> float:
    """fixed + checkpoints·s + max(loss phase·s, layer phase·s + quadratic·s²)."""
    mm = memory_model(config, run, stack=stack)
    s = tokens
    return mm["fixed"] + mm["checkpoints"] * s + max(mm["loss"] * s, mm["layer"] * s + mm["quadratic"] * s * s)


def max_trainable_length(config: Any, run: Any, free_bytes: float, *, stack: str = "loraforge",
                         host_free_bytes: float | None = None) -> int:
    """Longest batch-1 sequence (multiple of 1,024) whose step is predicted to fit; 0 if none."""
    mm = memory_model(config, run, stack=stack)
    budget = USABLE_SHARE * free_bytes - RESERVE_BYTES - mm["fixed"]
    if budget <= 0:
        return 0
    # both phases must fit: the loss phase (linear) and the layer phase (linear + quadratic)
    s = budget / (mm["checkpoints"] + mm["loss"]) if mm["loss"] else math.inf
    a, b = mm["quadratic"], mm["checkpoints"] + mm["layer"]
    s = min(s, (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a) if a > 0 else budget / b)
    if host_free_bytes is not None and mm["host_per_token"] > 0:
        s = min(s, host_free_bytes / mm["host_per_token"])
    return max(0, int(s) // ROUND * ROUND)


def describe(config: Any, run: Any, free_bytes: float, host_free_bytes: float | None = None) -> str:
    """One line for the memory report: the predicted longest sequence, as configured and in long-context mode."""
    import copy

    now = max_trainable_length(config, run, free_bytes, host_free_bytes=host_free_bytes)
    lc_run = copy.deepcopy(run)
    lc_run.training.long_context = True
    for k in ("offload_activations", "chunked_cross_entropy"):
        if hasattr(lc_run.training, k):
            setattr(lc_run.training, k, None)
    lc = max_trainable_length(config, lc_run, free_bytes, host_free_bytes=host_free_bytes)
    mm = memory_model(config, run)
    return (f"memory report: longest trainable sequence at batch 1 ≈ {now:,} tokens as configured "
            f"({mm['per_token'] / 1024:.0f} KiB/token on the device), ≈ {lc:,} with training.long_context=true")


def report_max_length(run: Any, placement: Any, log=print) -> int | None:
    """Log the predicted longest trainable sequence before the model loads; never raises."""
    try:
        from transformers import AutoConfig

        from loraforge.model.load import resolve_model_path
        from loraforge.model.memory import free_bytes

        config = AutoConfig.from_pretrained(resolve_model_path(run.model),
                                            trust_remote_code=run.model.trust_remote_code)
        host = None
        if placement.device.type == "cuda":
            import psutil

            host = 0.9 * float(psutil.virtual_memory().available)
        free = free_bytes(placement.device)
        log(describe(config, run, free, host))
        n = max_trainable_length(config, run, free, host_free_bytes=host)
        if run.data.max_length > n:
            log(f"memory report: data.max_length={run.data.max_length:,} is above that"
                + ("" if run.training.long_context else "; training.long_context=true raises it"))
        return n
    except Exception as e:  # a report, never a reason to stop the run
        log(f"memory report: no length prediction ({type(e).__name__}: {str(e)[:120]})")
        return None
