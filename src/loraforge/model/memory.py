"""Peak device memory of a training step, computed from the model's config before anything large loads.

Two reports read the same accounting: `check_fits` (the pre-flight report of a run: its batch and length,
refused before loading if it cannot fit) and `report_max_length` / `max_trainable_length` (the longest
batch-1 sequence that fits, as configured and in long-context mode; the max-context benchmark reports the
same prediction). The per-part byte counts — frozen weights, LoRA weights and optimizer state, a checkpointed
layer input, one layer's recompute + backward, the logits, the dequantization workspace — are each written
once below and used by both.

The estimate is of the peak that `torch.cuda.max_memory_allocated` reports; the allocator's cache and the
CUDA context come on top (`check_fits` and `max_trainable_length` leave room for them).

peak = persistent + checkpointed layer inputs + max(logits phase, one layer's recompute + backward)

**Persistent.** Bytes per parameter (bitsandbytes, blocksize 64): NF4/FP4 stores 0.5 byte plus an fp32
absmax per block (+4/64); double quantization stores that absmax in 8 bits with an fp32 scale per 256
blocks (+1/64 + 4/16384). 8-bit stores 1 byte plus an fp32 scale per output row. Embeddings, norms and
lm_head stay in the compute dtype (fp32 on the stock stack, whose `prepare_model_for_kbit_training` upcasts
them). A LoRA parameter costs 16 bytes: fp32 weight, fp32 gradient and two fp32 Adam moments (8-bit Adam:
2 bytes of state instead of 8). bitsandbytes' paged optimizers put the state of tensors with >= 1e5
elements in CUDA unified memory, which `max_memory_allocated` does not see (about 0.13 GiB of the 0.3 GiB
of state at 7B r=16 all-linear); it is real device memory, so we count it. The dequantized bf16 weight of
the largest matrix, twice (forward recompute and backward), is workspace.

**Checkpointed inputs.** With checkpointing each decoder layer keeps its input, tokens x hidden in the
residual stream's dtype (bf16 here, fp32 on the stock path, whose fp32 norms and embeddings turn the
whole stream fp32), until its backward has run: all L of them are alive at the start of backward. With
offloaded checkpointing only the last layer's input, the one being recomputed and the one being
prefetched stay on the GPU: 3 x h x act per token; the other L-1 live in host memory.

**Logits phase.** The lm_head output, its fp32 copy in transformers' loss, the log-softmax and, in
backward, its gradient: about 12 bytes per token per vocabulary entry. Calibrated on the stock path's
measured peaks (H100, bench/results/speed-2026-11-22-h100*; the stock path's persistent bytes are
exact from the shapes, and its checkpoints are fp32):
  7B r16 all 4x512: 6.25 GiB - 4.56 persistent - 1.00 checkpoints = 0.69 GiB = 11.3 B x 2048 x 32000
  7B r8 q,v 4x512:  5.97 - 4.14 - 1.00 = 0.83 GiB = 13.6 B x 2048 x 32000
  7B r16 all 2x2048: 8.01 - 4.56 - 2.00 = 1.45 GiB = 11.9 B x 4096 x 32000
  8B r16 all 4x512: 11.6 - 7.72 - 1.00 = 2.88 GiB = 11.8 B x 2048 x 128256
The r8 q,v and r16 all-linear cases differ by their LoRA bytes only, so at 4x512 the stock peak is the
logits phase, not a layer's backward. loraforge's fast path computes the loss in chunks and measured
5.23 / 6.05 / 4.82 / 7.16 GiB for the same cases; the pre-flight estimate is for the non-fast path (no
chunking), so it lies between the two: about the fast path plus 12 x tokens x vocab, less than stock by the
fp32 upcast of embeddings/lm_head (0.49 GiB at 7B, 1.96 at 8B) and by the halved checkpoints. The chunked
loss (fast path, or `chunked_cross_entropy`) keeps the hidden-state gradient and the final norm's input and
output (3 x h x act per token) plus its fixed chunk buffers.

**One layer's recompute + backward** (per token, act = bytes of the activation dtype): RMSNorm keeps an
fp32 copy of its input (2 x 4h); q, k, v, their rotary versions, attention output, o_proj output and the
residual (act x (6h + 3 kv)); MLP gate, up, SiLU and product (act x 4i) and its output and residual
(act x 4h with the norm's output); gradients of the widest tensors in flight (act x (2h + 2i)); and each
LoRA target's own dropout copy of its input plus a 1-byte mask ((act + 1) x in_features) when dropout > 0.
With loraforge's fused kernels it is act x (8h + 2kv + 6i) + fp32 attention log-sum-exp (the MLP backward
holds e, g, dh, h, de, dg of width i at once; attention keeps q, k, v, output, o_proj input; the norms their
inputs), plus the LoRA intermediates 2 x r x act per target of the layer being recomputed. At 7B 4x512 this
phase (0.95 GiB) and the logits phase (0.73 GiB) are close; the estimate takes the larger. Long-context runs
tile the MLP (`MLP_TILE_TOKENS`): its 6 x i x act per token become a fixed tile's worth, which at Llama-3-8B
takes the layer phase from ~236 to ~68 KiB per token (predicted, not yet measured).

**Attention** is O(tokens) with SDPA's flash / memory-efficient kernels. The stock stack runs attention in
fp32 (its upcast norms turn q, k, v fp32) with grouped-query heads (`enable_gqa`), a combination only
SDPA's math kernel takes: tokens² scores, softmax and their gradients per head. Calibration (H100 80 GB,
bench/results/context-*-h100.json, Llama-3-8B, QLoRA r16 all-linear, batch 1, stock stack): 8,192 tokens -> 44 GiB and
11,264 -> 74.5 GiB. With the per-token terms above, the quadratic term is `ATTN_MATH_COPIES` x heads x
4 bytes x s²; 3.6 copies gives 45.4 GiB and 74.2 GiB at the two points (+3%, -0.4%) and predicts 11,264
as the stock maximum on 80 GB, as measured.

`max_trainable_length(config, run, free_bytes)` inverts the per-token model: the longest batch-1 sequence
whose peak stays within `USABLE_SHARE` x free_bytes - `RESERVE_BYTES`, rounded down to 1,024 tokens, and,
with offloading, within what host memory can hold (`host_free_bytes`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from loraforge.config import LoRAConfig, ModelConfig, RunConfig, TrainingConfig
from loraforge.errors import ResourceError

GIB = 2**30
LOGIT_BYTES = 12  # per token per vocabulary entry; calibration above
ATTN_MATH_COPIES = 3.6  # fp32 tokens² copies per head in SDPA's math kernel; calibration above
USABLE_SHARE = 0.97  # allocator fragmentation and cache
RESERVE_BYTES = 0.5 * GIB  # CUDA/cuBLAS workspaces and what the allocator rounds up
ROUND = 1024  # predicted lengths are rounded down to this
# fp32 logits per chunk of the chunked losses (kernels/cross_entropy.py, train/preference.py): defined here,
# where the memory model counts it, and imported by both. 64 MiB (was 256): at 4x512 the loss is the step's
# peak, where the chunk and its 16-bit copies came to ~0.4 GiB of the 0.6-0.8 GiB loraforge needed beyond
# Unsloth (bench/NOTES.md, issue 26): 512 rows of a 32K vocabulary, 128 of Llama-3's 128K.
LOGITS_CHUNK_BYTES = 64 * 2**20
# Every chunk reads the whole lm_head weight (1 GiB for Llama-3, 1.7 GiB for Gemma 2): below ~128 rows its two
# GEMMs are bound by that read, and more chunks cost time without saving much more memory.
LOGITS_CHUNK_MIN_ROWS = 128


# Long-context runs compute the MLP over the tokens in tiles of this many (kernels/lora.TiledMLP, after ALST,
# arXiv 2506.13996): its [tokens, intermediate] tensors, ~70% of a layer's backward at Llama-3-8B, then
# exist for one tile at a time. 8,192 tokens keep each tile's GEMMs large enough to stay compute-bound.
MLP_TILE_TOKENS = 8192


def logits_chunk_rows(vocab: int, budget: int = LOGITS_CHUNK_BYTES, copies: int = 1,
                      min_rows: int = LOGITS_CHUNK_MIN_ROWS) -> int:
    """Tokens per chunk whose `copies` fp32 logits rows fit `budget`, but at least `min_rows`; a multiple of 64
    (whole tensor-core tiles for the lm_head GEMMs) once there are that many."""
    rows = max(budget // (4 * vocab * copies), min_rows, 1)
    return rows - rows % 64 if rows >= 64 else rows


Stack = Literal["stock", "loraforge"]


# ------------------------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Dims:
    """A Llama-family model's sizes, read from its transformers config."""

    h: int
    i: int
    L: int
    V: int
    nh: int
    nkv: int
    d: int
    tied: int

    @property
    def q(self) -> int:
        return self.nh * self.d

    @property
    def kv(self) -> int:
        return self.nkv * self.d

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection in one decoder layer."""
        h, i = self.h, self.i
        return {"q_proj": (h, self.q), "k_proj": (h, self.kv), "v_proj": (h, self.kv), "o_proj": (self.q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def dims(config: Any) -> Dims:
    h = config.hidden_size
    nh = config.num_attention_heads
    return Dims(h=h, i=config.intermediate_size, L=config.num_hidden_layers, V=config.vocab_size, nh=nh,
                nkv=getattr(config, "num_key_value_heads", None) or nh,
                d=getattr(config, "head_dim", None) or h // nh,
                tied=int(bool(getattr(config, "tie_word_embeddings", False))))


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection in one Llama decoder layer."""
    return dims(config).linears()


def bytes_per_quantized_param(run: RunConfig, hidden: int) -> float | None:
    """Bytes a quantized linear weight takes per parameter; None if the base is not quantized."""
    m = run.model
    if m.use_4bit:
        return 0.5 + (1 / 64 + 4 / (64 * 256) if m.use_nested_quant else 4 / 64)
    if m.use_8bit:
        return 1.0 + 4 / max(1, hidden)
    return None


def _parameter_counts(g: Dims) -> tuple[int, int, int]:
    """(decoder linears, embeddings + lm_head, norms)."""
    return g.L * sum(a * b for a, b in g.linears().values()), g.V * g.h * (1 if g.tied else 2), (2 * g.L + 1) * g.h


def weight_bytes(g: Dims, run: RunConfig, act: int, other: int) -> float:
    """The frozen base: quantized (or `act`-byte) linears, embeddings/lm_head/norms in `other` bytes each."""
    linear, embed, norm = _parameter_counts(g)
    per_param = bytes_per_quantized_param(run, g.h)
    return linear * (per_param if per_param is not None else act) + (embed + norm) * other


def dequant_workspace_bytes(g: Dims, run: RunConfig, act: int) -> int:
    """The largest frozen matrix dequantized, twice (forward recompute and backward); 0 unquantized."""
    quantized = bytes_per_quantized_param(run, g.h) is not None
    return 2 * max(a * b for a, b in g.linears().values()) * act if quantized else 0


def lora_targets(g: Dims, lora: LoRAConfig) -> list[str]:
    """The decoder-layer projections the adapter targets, in layer order."""
    targets = lora.resolved_targets()
    return [name for name in g.linears() if name in targets]


def lora_param_count(g: Dims, lora: LoRAConfig) -> int:
    """LoRA A and B of every target in every layer."""
    return g.L * sum(lora.r * (a + b) for name, (a, b) in g.linears().items() if name in lora_targets(g, lora))


def trained_param_count(g: Dims, lora: LoRAConfig) -> int:
    """What training adds and updates: LoRA A and B, DoRA's magnitudes, full copies of modules_to_save."""
    dora = g.L * sum(g.linears()[t][1] for t in lora_targets(g, lora)) if lora.use_dora else 0
    saved_copies = sum(g.V * g.h for m in (lora.modules_to_save or []) if m in ("lm_head", "embed_tokens"))
    return lora_param_count(g, lora) + dora + saved_copies


def parameter_counts(config: Any, lora: LoRAConfig) -> tuple[int, int]:
    """(trainable, total) parameters of the model with its adapter, from the model's config: what the memory
    report and the trainer's model line both print. The total counts the adapter too (as peft does); a 4-bit
    weight counts as the parameters it represents."""
    g = dims(config)
    trainable = trained_param_count(g, lora)
    return trainable, sum(_parameter_counts(g)) + trainable


def layer_bytes_per_token(g: Dims, lora: LoRAConfig, act: int) -> tuple[int, int, int]:
    """One layer's recompute + backward on the peft/transformers modules, per token, in three parts:
    (kept for its backward, gradients in flight, LoRA dropout copies); see the module docstring."""
    saved = 8 * g.h + act * (10 * g.h + 3 * g.kv + 4 * g.i)
    in_flight = act * (2 * g.h + 2 * g.i)
    dropout = sum((act + 1) * g.linears()[t][0] for t in lora_targets(g, lora)) if lora.lora_dropout else 0
    return saved, in_flight, dropout


# The fused MLP's backward holds e, g, dh, h, de and dg at once, each [tokens, intermediate].
MLP_WIDE_TENSORS = 6


def fused_layer_bytes_per_token(g: Dims, act: int) -> int:
    """One layer's recompute + backward with loraforge's fused kernels, per token."""
    return act * (8 * g.h + 2 * g.kv + MLP_WIDE_TENSORS * g.i) + 4 * g.nh


# ------------------------------------------------------------------------------- pre-flight report


@dataclass
class MemoryEstimate:
    total_params: int
    trainable_params: int
    weights_bytes: float
    lora_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    workspace_bytes: float
    peak_phase: str = ""

    @property
    def total_bytes(self) -> float:
        return (self.weights_bytes + self.lora_bytes + self.optimizer_bytes + self.activation_bytes
                + self.workspace_bytes)

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:6.2f} GiB"  # noqa: E731
        return [f"  parameters      {self.total_params / 1e6:,.1f}M total, "
                f"{self.trainable_params / 1e6:,.2f}M trainable",
                f"  weights         {g(self.weights_bytes)}",
                f"  trained + grads {g(self.lora_bytes)}",
                f"  optimizer state {g(self.optimizer_bytes)}",
                f"  activations     {g(self.activation_bytes)} (estimate; peak in the {self.peak_phase})",
                f"  workspace       {g(self.workspace_bytes)}",
                f"  total           {g(self.total_bytes)}"]


def estimate(config: Any, run: RunConfig, dtype_bytes: int = 2) -> MemoryEstimate:
    """Peak memory of one training step of the run's batch on the non-fast path; `dtype_bytes` is the
    compute/activation dtype (2 = bf16/fp16)."""
    g = dims(config)
    act = dtype_bytes
    lora = run.lora
    weights = weight_bytes(g, run, act, act)

    # Trained tensors: LoRA A and B per target (+ DoRA's magnitude), and full copies of modules_to_save.
    trainable, total = parameter_counts(config, lora)
    saved_copies = sum(g.V * g.h for m in (lora.modules_to_save or []) if m in ("lm_head", "embed_tokens"))
    lora_bytes = trainable * 8 + saved_copies * act  # fp32 weight + grad; the copy keeps a frozen original
    opt_bytes = trainable * (2 if run.training.optim == "paged_adamw_8bit" else 8)

    tokens = run.training.per_device_train_batch_size * run.data.max_length
    saved_layer, grads_in_flight, dropout = layer_bytes_per_token(g, lora, act)
    layer = tokens * (saved_layer + grads_in_flight + dropout)
    logits = tokens * g.V * LOGIT_BYTES
    workspace = dequant_workspace_bytes(g, run, act)
    if lora.use_dora:
        # DoRA recomputes the norm of W + BA every forward: a dequantized fp32 copy of the largest weight.
        workspace += max(a * b for a, b in g.linears().values()) * 4
    if run.training.gradient_checkpointing:
        checkpoints = g.L * tokens * g.h * act
        if logits >= layer + workspace:
            acts, workspace, phase = checkpoints + logits, 0, "logits and loss"
        else:
            acts, phase = checkpoints + layer, "first layer's backward"
    else:
        acts = g.L * tokens * (saved_layer + dropout) + tokens * grads_in_flight + logits
        phase = "logits and loss"
    return MemoryEstimate(total_params=total, trainable_params=trainable,
                          weights_bytes=weights, lora_bytes=lora_bytes, optimizer_bytes=opt_bytes,
                          activation_bytes=acts, workspace_bytes=workspace, peak_phase=phase)


def free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)


def suggestions(run: RunConfig) -> list[str]:
    out = []
    t = run.training
    if t.per_device_train_batch_size > 1:
        out.append(f"training.per_device_train_batch_size={max(1, t.per_device_train_batch_size // 2)} "
                   f"training.gradient_accumulation_steps={t.gradient_accumulation_steps * 2} (same effective batch)")
    if not t.gradient_checkpointing:
        out.append("training.gradient_checkpointing=true")
    if run.data.max_length > 512:
        out.append(f"data.max_length={run.data.max_length // 2}")
    if not run.model.use_4bit:
        out.append("model.use_4bit=true model.use_8bit=false (QLoRA)")
    elif not run.model.use_nested_quant:
        out.append("model.use_nested_quant=true")
    if run.lora.modules_to_save:
        out.append("lora.modules_to_save=null (full copies of large modules are trained otherwise)")
    if t.optim != "paged_adamw_8bit":
        out.append("training.optim=paged_adamw_8bit")
    return out


# Allocator cache and fragmentation: reserved/allocated was 1.17-1.76 on the H100 bench runs. Refuse a run
# whose estimated peak exceeds 95% of free memory; warn above 80%.
REFUSE_SHARE, WARN_SHARE = 0.95, 0.80


def _model_config(model: ModelConfig) -> Any:
    """The transformers config of the run's model, read without loading any weights."""
    from transformers import AutoConfig

    from loraforge.model.load import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=model.trust_remote_code)


def check_fits(run: RunConfig, placement: Any, log=print) -> MemoryEstimate | None:
    """Print the memory report; raise ResourceError, before loading, if the run cannot fit."""
    try:
        est = estimate(_model_config(run.model), run, dtype_bytes=torch.finfo(placement.dtype).bits // 8)
    except (AttributeError, OSError, ValueError):
        log("memory report: not available for this model's config")
        return None
    free = free_bytes(placement.device)
    log(f"memory report for {placement.device} (free {free / GIB:.1f} GiB), batch "
        f"{run.training.per_device_train_batch_size} x {run.data.max_length} tokens:")
    for line in est.lines():
        log(line)
    tips = "\n  ".join(suggestions(run)) or "a device with more memory"
    if est.total_bytes > REFUSE_SHARE * free:
        raise ResourceError(f"this run needs about {est.total_bytes / GIB:.1f} GiB but {placement.device} has "
                            f"{free / GIB:.1f} GiB free. Options that lower it:\n  {tips}")
    if est.total_bytes > WARN_SHARE * free:
        log(f"memory report: the estimate is {100 * est.total_bytes / free:.0f}% of free memory; allocator "
            "fragmentation may push it over (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True helps). "
            f"Options that lower it:\n  {tips}")
    return est


# ------------------------------------------------------------------------ longest trainable sequence


def _long_context_parts(t: TrainingConfig) -> tuple[bool, bool]:
    """(offloaded checkpoints, chunked loss) as the run gets them; offloading needs checkpointing (it
    offloads the checkpoints: train/long_context.py declines it otherwise)."""
    sw = t.long_context_switches(one_gpu=True)  # the GPU's memory, for a run on one GPU
    return sw["offload_activations"] and t.gradient_checkpointing, sw["chunked_cross_entropy"]


def memory_model(config: Any, run: RunConfig, *, stack: Stack = "loraforge") -> dict[str, float]:
    """Batch-1 memory per sequence length: {'fixed': bytes, 'per_token': bytes, 'quadratic': bytes per
    token², plus the parts}.

    stack="stock": transformers + peft + bitsandbytes as bench/models.build_stock runs it (fp32 upcasts, full
    logits). stack="loraforge": loraforge's build (compute-dtype frozen weights, fused kernels when
    `model.fast_kernels`, chunked loss with the fast kernels or `chunked_cross_entropy`, offloading
    per `training.long_context` / `offload_activations`).
    """
    if stack not in ("stock", "loraforge"):
        raise ValueError(f"stack must be 'stock' or 'loraforge', not {stack!r}")
    g = dims(config)
    act = 2
    stock = stack == "stock"
    offload, chunked_switch = _long_context_parts(run.training) if not stock else (False, False)
    fast = not stock and run.model.fast_kernels
    chunked = not stock and (chunked_switch or fast)
    targets = lora_targets(g, run.lora)

    stream = 4 if stock else act  # the stock stack's fp32 norms and embeddings make the residual stream fp32
    weights = weight_bytes(g, run, act, stream)
    lora = lora_param_count(g, run.lora) * 16
    workspace = dequant_workspace_bytes(g, run, act)
    # the fp32 chunk (the budget, or the row floor's for a large vocabulary) + its compute-dtype copies
    ce_fixed = (logits_chunk_rows(g.V) * g.V * 4 * 2) if chunked else 0
    fixed = weights + lora + workspace + ce_fixed

    checkpoints = (3 * g.h * act) if offload else g.L * g.h * stream
    layer = fused_layer_bytes_per_token(g, act) if fast else sum(layer_bytes_per_token(g, run.lora, stream))
    if fast and run.training.long_context:  # the tiled MLP: its six width-i tensors for one tile only
        layer -= MLP_WIDE_TENSORS * g.i * act
        fixed += MLP_WIDE_TENSORS * g.i * act * MLP_TILE_TOKENS
    lora_act = 2 * run.lora.r * act * len(targets)
    if chunked:
        # the chunked loss's hidden-state gradient and the final norm's tensors, counted with the layer
        layer_phase, loss_phase = layer + lora_act + 3 * g.h * act, 0
    else:
        # full logits: the loss phase and a layer's backward do not overlap; the peak is the larger
        layer_phase, loss_phase = layer + lora_act, g.V * LOGIT_BYTES
    quadratic = 0.0
    if stock and g.kv != g.q:
        quadratic = ATTN_MATH_COPIES * g.nh * 4  # fp32 GQA attention -> SDPA math kernel
    return {"fixed": fixed, "checkpoints": checkpoints, "layer": layer_phase, "loss": loss_phase,
            "quadratic": quadratic, "per_token": checkpoints + max(layer_phase, loss_phase),
            "weights": weights, "lora": lora, "workspace": workspace + ce_fixed,
            "host_per_token": (g.L - 1) * g.h * act if offload else 0.0}


def peak_bytes(config: Any, run: RunConfig, tokens: int, *, stack: Stack = "loraforge") -> float:
    """fixed + checkpoints·s + max(loss phase·s, layer phase·s + quadratic·s²)."""
    mm = memory_model(config, run, stack=stack)
    s = tokens
    return mm["fixed"] + mm["checkpoints"] * s + max(mm["loss"] * s, mm["layer"] * s + mm["quadratic"] * s * s)


def max_trainable_length(config: Any, run: RunConfig, free_bytes: float, *, stack: Stack = "loraforge",
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


def describe_max_length(config: Any, run: RunConfig, free_bytes: float, host_free_bytes: float | None = None) -> str:
    """One line for the memory report: the predicted longest sequence, as configured and in long-context mode."""
    now = max_trainable_length(config, run, free_bytes, host_free_bytes=host_free_bytes)
    lc_run = copy.deepcopy(run)
    lc_run.training.long_context = True
    lc_run.training.offload_activations = lc_run.training.chunked_cross_entropy = None
    lc = max_trainable_length(config, lc_run, free_bytes, host_free_bytes=host_free_bytes)
    mm = memory_model(config, run)
    return (f"memory report: longest trainable sequence at batch 1 ≈ {now:,} tokens as configured "
            f"({mm['per_token'] / 1024:.0f} KiB/token on the device), ≈ {lc:,} with training.long_context=true")


def report_max_length(run: RunConfig, placement: Any, log=print) -> int | None:
    """Log the predicted longest trainable sequence before the model loads; never raises."""
    try:
        config = _model_config(run.model)
        host = None
        if placement.device.type == "cuda":
            import psutil

            host = 0.9 * float(psutil.virtual_memory().available)
        free = free_bytes(placement.device)
        log(describe_max_length(config, run, free, host))
        n = max_trainable_length(config, run, free, host_free_bytes=host)
        if run.data.max_length > n:
            log(f"memory report: data.max_length={run.data.max_length:,} is above that"
                + ("" if run.training.long_context else "; training.long_context=true raises it"))
        return n
    except Exception as e:  # a report, never a reason to stop the run
        log(f"memory report: no length prediction ({type(e).__name__}: {str(e)[:120]})")
        return None
