"""Fast batched decoding of Llama-family models: stock's own kernels, replayed as CUDA graphs.

Why not `generate(cache_implementation="static")` + `torch.compile`: measured on an H100
(bench/results/serve-diag-*.json) it does 120 tokens/s for one stream where the weights allow ~220 —
`generate` still runs its Python loop and a device sync per token — and inductor's fused kernels round
differently from the eager ones, so greedy output drifts from stock `generate` at the first near-tie.

What this module does instead, per decode step of a batch of B rows:
- The prompt is prefilled by stock `generate(max_new_tokens=1)` itself (same kernels, same masks, same
  first token), and its KV cache is copied into static buffers [rows, kv_heads, L, head_dim].
- Each step then runs the model's own modules (norms, projections with their LoRA adapters, RoPE, MLP,
  head) — the same ops in the same order as the model's forward — captured once per (adapter, rows,
  sampling) as 33 CUDA graphs for a 32-layer model: one piece from each layer's attention output to the
  next layer's query. Between pieces the attention itself runs eagerly through the model's own attention
  function over `cache[:, :, :t]`, so it sees exactly the keys, values and mask the stock dynamic cache
  would give it (a graph would bake in the length t). Per token that is ~33 graph launches and 32
  attention calls instead of ~600 kernel launches and a Python `generate` loop.
- Sampling happens in the last piece (temperature, top-p, exponential-race sampling, per row); the next
  tokens go to pinned host memory asynchronously and the host reads a step's tokens two steps later, so
  the GPU never waits for the Python that streams, stops and detokenizes.

Rows come and go between steps (continuous batching): `join()` prefills new prompts and places their
keys right-aligned at the current column, so every row writes the same column each step; a prompt longer
than that column shifts the others right; `leave()` frees a row; the cache is compacted (columns no row
needs any more are dropped) or grown only when a new row would not fit. `stream()` is the one-batch form.

Greedy decoding of one row is therefore bit-identical to stock `generate` (tested on CPU against
`generate`; measured on the GPU by bench/serve_speed.py). Steps of more than one row run their projections
from merged weights instead (`merged_batches`, infer/merged_weights.py): per layer one q/k/v GEMM, o, one
gate/up GEMM and down, from a 16-bit copy of base + the active adapter — the merged model's numbers, where
the model's own QLoRA modules spend ~7 kernels per projection. Stock batched `generate` does not reproduce
itself (bench/results/generate-server-*.json), so batches had no bit-exact reference to keep. On a CPU, or
with `graphs=False`, the same pieces run eagerly, which is how the tests exercise this module without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from loraforge.infer import merged_weights
from loraforge.infer.merged_weights import MergedWeights, Unmergeable

log = logging.getLogger(__name__)

_SUPPORTED = ("llama",)
# Generation-config settings that add logits processors the graphed step does not apply (temperature,
# top_p and top_k are set per request by the server, so the model's defaults for them do not matter).
_UNSUPPORTED_GEN = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
                    "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
                    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                    "min_length": 0, "min_new_tokens": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
                    "eta_cutoff": 0.0}


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows padded on the left: every prompt ends in the last column,
    where generation continues."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _causal_lm(model):
    """The transformers CausalLM inside a peft model (adapters injected), or the model itself."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def supported(model) -> tuple[bool, str]:
    """Whether FastDecoder can run this model, and if not, why (the caller falls back to `generate`)."""
    lm = _causal_lm(model)
    cfg = getattr(lm, "config", None)
    if getattr(cfg, "model_type", None) not in _SUPPORTED:
        return False, f"architecture {getattr(cfg, 'model_type', None)!r} is not Llama"
    inner = getattr(lm, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return False, "no model.layers / model.rotary_emb"
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False, f"attention implementation {cfg._attn_implementation!r}"
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return False, "dynamic RoPE scaling changes the rotary table with the length"
    gen = getattr(lm, "generation_config", None)
    for key, neutral in _UNSUPPORTED_GEN.items():
        v = getattr(gen, key, None)
        if v is not None and v != neutral:
            return False, f"generation_config.{key}={v!r} needs a logits processor"
    return True, "ok"


@dataclass
class _Step:
    """The tensors one decode step reads and writes. Under CUDA graphs they are the graphs' static
    inputs/outputs: pieces read what the previous piece left here, at fixed addresses."""

    rows: int
    h: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    q: list = field(default_factory=list)  # per layer: the query after RoPE [B, H, 1, D]
    a: list = field(default_factory=list)  # per layer: the attention output [B, 1, H, D] (static, eager-filled)
    graphs: list | None = None
    pool: object = None
    q_layout: tuple = ()  # (shape, strides) of eager RoPE's query output, which the fused kernel writes
    merged: MergedWeights | None = None  # the projections' merged weights (batches), or None: the modules'
    whole: bool = False  # one graph a step: attention over a bucket of columns, masked on the device
    width: int = 0  # a whole step's bucket width: graph b attends to the first (b + 1) · width columns
    mask: torch.Tensor | None = None  # the whole step's additive mask [rows, 1, 1, cache_len]
    logits: list = field(default_factory=list)  # per whole-step graph, the logits it writes (keep_logits)


@dataclass
class _Row:
    """A row of the batch: who it belongs to, and which cache columns it uses."""

    owner: object
    start: int  # its first valid column (columns before it are another row's history, masked out)
    end: int  # the column after the last one it can write (prompt + max_new_tokens + lag)
    sample: bool


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class FastDecoder:
    """Decodes a changing batch of prompts with a static KV cache and graphed layer pieces.

    One instance per model, driven by one thread: `join()` rows, `step()` until their tokens are in,
    `leave()` them — or `stream()` for one fixed batch. `max_rows` bounds the batch; graphs are captured
    per (adapter, rows, sampling) — with `bucket_rows`, rows rounded up to a power of two, so that a
    server whose batch changes every few steps captures a handful of sets, not one per row count — and
    kept for up to `max_graph_sets` combinations. The cache grows in powers of two (at least `min_cache`
    columns) when the rows need it.

    `attention`: "stock" runs attention through whatever SDPA kernel stock picks — on an H100 that is
    cuDNN, which builds an execution plan for every new (rows, length) pair, ~30 ms a step until the plan
    exists. "no-plans" keeps stock's choice for one row without a mask, the case where greedy output is
    stock's bit for bit, and gives batches FlashAttention / memory-efficient attention, which need no plan:
    a server whose batch and length change every step would otherwise pay the plan on almost every step
    (bench/results/generate-server-*-continuous*.json).

    `merged_batches`: steps of more than one row take their projections from a merged 16-bit copy of the
    weights, built on the first such step of an adapter key and kept for the two most recent keys. None:
    when the copy takes at most 1/3 of the free device memory (always on a CPU); False: never (every step
    runs the model's own modules); True: whatever the memory.

    `whole_step`: a merged batch's step is one CUDA graph instead of 33 pieces with eager attention between
    them. Eager attention reads exactly the columns written so far, a length that changes every step and so
    cannot be captured; a whole step instead reads a bucket of columns (up to 8 graphs per step set, each
    reading one more eighth of the cache, at least 64 columns), those past the step's column masked by a
    mask made on the device from `slot`. It spares the host ~65 launches a step, which bound a 16-row step
    on an H200 (bench/NOTES.md, session 11). None: with graphs (eagerly it would only read more columns)."""

    def __init__(self, model, *, max_rows: int = 16, graphs: bool | None = None, max_graph_sets: int = 24,
                 fused_kernels: bool = True, min_cache: int = 256, lag: int = 2, bucket_rows: bool = False,
                 attention: str = "stock", merged_batches: bool | None = None, whole_step: bool | None = None):
        ok, why = supported(model)
        if not ok:
            raise ValueError(f"fast decoding is not available for this model: {why}")
        self.model = model
        self.lm = _causal_lm(model)
        self.inner = self.lm.model
        self.layers = list(self.inner.layers)
        self.cfg = self.lm.config
        self.device = next(self.lm.parameters()).device
        self.dtype = self.inner.embed_tokens.weight.dtype
        self.graphs = (self.device.type == "cuda") if graphs is None else (graphs and self.device.type == "cuda")
        self.max_rows, self.max_graph_sets, self.min_cache = max_rows, max_graph_sets, min_cache
        self.lag, self.bucket_rows = lag, bucket_rows
        self.whole_step = self.graphs if whole_step is None else whole_step
        if attention not in ("stock", "no-plans"):
            raise ValueError(f"attention={attention!r}: 'stock' or 'no-plans'")
        self.attention = attention
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = self.cfg.num_key_value_heads
        self.heads = self.cfg.num_attention_heads
        modeling = sys.modules[type(attn).__module__]
        self._rope = modeling.apply_rotary_pos_emb
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._attn = ALL_ATTENTION_FUNCTIONS.get_interface(self.cfg._attn_implementation,
                                                          modeling.eager_attention_forward)
        self.cache_len = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None  # [max_rows, cache_len] bool: which columns a row attends to
        self.cols: torch.Tensor | None = None  # [cache_len] column numbers (a whole step's mask)
        dev = self.device
        self.tok = torch.zeros(max_rows, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_rows, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)  # the column this step writes (= self.t)
        self.next = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.temperature = torch.ones(max_rows, 1, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(max_rows, 1, dtype=torch.float32, device=dev)
        self.greedy = torch.ones(max_rows, dtype=torch.bool, device=dev)
        self.rows: list[_Row | None] = [None] * max_rows
        self.clean = [True] * max_rows  # no masked column in [0, t): lets a batch run without a mask
        self.t = 0  # columns written so far; the next step writes column t
        self.key: object = None  # the adapter the current rows decode with
        pinned = self.device.type == "cuda"
        self._host = [torch.zeros(max_rows, dtype=torch.long, pin_memory=pinned) for _ in range(lag + 2)]
        self._launched = 0
        self._pending: deque = deque()  # (event, host buffer, owners) of steps launched, not yet read
        self._sets: OrderedDict[tuple, _Step] = OrderedDict()  # (key, rows, sample, merged) -> step set
        self.captures = 0
        self.merged_batches = merged_batches
        # Keys whose merged copy is kept: two lets a server alternate between two adapters without rebuilding
        # (a 7B copy is ~13 GB), and the memory rule still applies to the second.
        self.max_merged_keys = 2
        self._merged: OrderedDict[object, MergedWeights] = OrderedDict()  # adapter key -> its merged copy
        self._unmerged: dict[object, str] = {}  # keys whose batches run the modules, and why (logged once)
        # Which exact fused kernels (infer/decode.py) this GPU may use; None: the model's eager ops.
        self.fused: dict[str, int | None] = {"norm": None, "norm_one": None, "rope": None, "silu_mul": None}
        if self.device.type == "cuda" and fused_kernels:
            self.fused = self._check_fused()
        # Diagnostics (bench/decode_diag.py): keep each step's fp32 logits, to find the first step that
        # differs from stock's.
        self.keep_logits = False
        self.logits: torch.Tensor | None = None
        self.trace: list[torch.Tensor] = []

    def _check_fused(self) -> dict[str, int | None]:
        """infer/decode.py's self-check, then each kernel once more against this model's own modules
        (its RMSNorm, its RoPE function, its MLP activation). A kernel is used only where both are exact."""
        # Imported here: it loads Triton (seconds), which only a decoder on a GPU needs.
        from loraforge.infer import decode

        self._decode = decode
        found = decode.self_check(self.device, self.dtype)
        layer = self.layers[0]
        g = torch.Generator(device=self.device).manual_seed(1)
        with torch.no_grad():
            h = (torch.randn(4, 1, self.cfg.hidden_size, generator=g, device=self.device) * 2).to(self.dtype)
            d = torch.randn(4, 1, self.cfg.hidden_size, generator=g, device=self.device).to(self.dtype)
            norm = layer.input_layernorm
            if found["norm"] is not None and not (hasattr(norm, "variance_epsilon") and torch.equal(
                    decode.rms_norm(h, d, norm.weight, norm.variance_epsilon, found["norm"])[1], norm(h + d))):
                found["norm"] = found["norm_one"] = None
            if found["norm_one"] is not None and not decode.within_rounding(
                    decode.rms_norm_one(h, d, norm.weight, norm.variance_epsilon, found["norm_one"])[1], norm(h + d)):
                found["norm_one"] = None
            act = getattr(layer.mlp, "act_fn", None)
            if found["silu_mul"] is not None and not (
                    all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")) and act is not None
                    and torch.equal(decode.silu_mul(h, d, found["silu_mul"]), act(h) * d)):
                found["silu_mul"] = None
            if found["rope"] is not None:
                rows, hd = 4, self.head_dim
                q = torch.randn(rows, 1, self.heads * hd, generator=g, device=self.device).to(self.dtype)
                k = torch.randn(rows, 1, self.kv_heads * hd, generator=g, device=self.device).to(self.dtype)
                pos = torch.randint(0, 4000, (rows, 1), generator=g, device=self.device)
                cos, sin = self.inner.rotary_emb(q, pos)
                shape = (rows, 1, -1, hd)
                ref_q, ref_k = self._rope(q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), cos, sin)
                kc = torch.zeros(rows, self.kv_heads, 4, hd, dtype=self.dtype, device=self.device)
                out = torch.empty_strided(ref_q.shape, ref_q.stride(), dtype=self.dtype, device=self.device)
                decode.rope_cache(q, k, k, cos, sin, out, kc, torch.zeros_like(kc),
                                  torch.tensor([2], device=self.device))
                if not (torch.equal(out, ref_q) and torch.equal(kc[:, :, 2:3], ref_k)):
                    found["rope"] = None
        log.info("fast decode kernels (None: eager ops): %s", found)
        return found

    # ---------------------------------------------------------------------------------------------------
    # The pieces of one decode step (the model's own modules, in the order its forward calls them)

    def _norm(self, module, h: torch.Tensor, delta: torch.Tensor | None,
              merged: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, module(h + delta)): the residual add and the RMSNorm after it, as the decoder layer
        does them — in 3 kernels instead of 9 when infer/decode.py reproduces them exactly here, and in one
        for a merged batch, whose results are not stock's bit for bit anyway (its weights are merged)."""
        if merged and self.fused["norm_one"] is not None:
            return self._decode.rms_norm_one(h, delta, module.weight, module.variance_epsilon, self.fused["norm_one"])
        if self.fused["norm"] is not None:
            return self._decode.rms_norm(h, delta, module.weight, module.variance_epsilon, self.fused["norm"])
        if delta is not None:
            h = h + delta
        return h, module(h)

    def _pre_attention(self, st: _Step, i: int, h: torch.Tensor, delta: torch.Tensor | None) -> None:
        """Residual add (the previous layer's MLP output), input norm, q/k/v, RoPE, cache write."""
        st.h, x = self._norm(self.layers[i].input_layernorm, h, delta, st.merged is not None)
        q, k, v = self._qkv(st, i, x)
        if self.fused["rope"] is not None:
            out = torch.empty_strided(*st.q_layout, dtype=q.dtype, device=q.device)
            st.q[i] = self._decode.rope_cache(q, k, v, st.cos, st.sin, out, self.k[i], self.v[i], self.slot)
            return
        shape = (st.rows, 1, -1, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        q, k = self._rope(q, k, st.cos, st.sin)
        self.k[i][: st.rows].index_copy_(2, self.slot, k)
        self.v[i][: st.rows].index_copy_(2, self.slot, v)
        st.q[i] = q

    def _qkv(self, st: _Step, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query, key and value projections [rows, 1, heads·D]: the modules', or one merged GEMM split."""
        if st.merged is None:
            attn = self.layers[i].self_attn
            return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        w = st.merged.layers[i]
        return F.linear(x, w.qkv, w.qkv_bias).split(w.qkv_split, dim=-1)  # views: the RoPE kernel reads them

    def _post_attention(self, st: _Step, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o_proj, residual add, post-attention norm, MLP. Returns (residual, MLP output): the second
        residual add is left to the next norm, which fuses it."""
        layer = self.layers[i]
        a = st.a[i].reshape(st.rows, 1, -1).contiguous()
        mlp = layer.mlp
        if st.merged is not None:
            w = st.merged.layers[i]
            h, x = self._norm(layer.post_attention_layernorm, h, F.linear(a, w.o, w.o_bias), True)
            gate, up = F.linear(x, w.gate_up, w.gate_up_bias).split(w.intermediate, dim=-1)
            if self.fused["silu_mul"] is not None:  # reads the two halves in place: one kernel, eager's two
                return h, F.linear(self._decode.silu_mul(gate, up, self.fused["silu_mul"]), w.down, w.down_bias)
            return h, F.linear(mlp.act_fn(gate) * up, w.down, w.down_bias)
        h, x = self._norm(layer.post_attention_layernorm, h, layer.self_attn.o_proj(a))
        if self.fused["silu_mul"] is not None:
            act = self._decode.silu_mul(mlp.gate_proj(x), mlp.up_proj(x), self.fused["silu_mul"])
            return h, mlp.down_proj(act)
        return h, mlp(x)

    def _first_piece(self, st: _Step) -> None:
        if st.whole:  # the columns this step attends to: its rows' valid ones up to the one it writes
            keep = self.valid[: st.rows, None, None, :] & (self.cols <= self.slot)
            st.mask = torch.zeros(keep.shape, dtype=self.dtype, device=self.device).masked_fill_(~keep, self._fill())
        h = self.inner.embed_tokens(self.tok[: st.rows])
        st.cos, st.sin = self.inner.rotary_emb(h, self.pos[: st.rows])
        self._pre_attention(st, 0, h, None)

    def _piece(self, st: _Step, i: int, sample: bool) -> None:
        """Layer i-1's attention output → layer i's query (or, after the last layer, the next tokens)."""
        h, m = self._post_attention(st, i - 1, st.h)
        if i < len(self.layers):
            self._pre_attention(st, i, h, m)
            return
        st.h, x = self._norm(self.inner.norm, h, m, st.merged is not None)
        logits = self.lm.lm_head(x)[:, -1, :].to(torch.float32)  # as generate() takes them
        if self.keep_logits:
            self.logits = logits
        nxt = torch.argmax(logits, dim=-1)
        if sample:  # rows that decode greedily keep the argmax; the others draw
            r = st.rows
            nxt = torch.where(self.greedy[:r], nxt, _sample(logits, self.temperature[:r], self.top_p[:r]))
        self.next[: st.rows].copy_(nxt)
        self.tok[: st.rows, 0].copy_(nxt)
        self.pos[: st.rows].add_(1)
        self.slot.add_(1)

    def _attention(self, st: _Step, i: int, t: int, mask: torch.Tensor | None) -> None:
        attn = self.layers[i].self_attn
        if st.whole:  # t columns (a bucket's, under graphs), st.mask hiding the ones this step does not attend to
            mask = st.mask[..., :t]
        k, v = self.k[i][: st.rows, :, :t], self.v[i][: st.rows, :, :t]
        out, _ = self._attn(attn, st.q[i], k, v, mask, dropout=0.0, scaling=attn.scaling)
        st.a[i].copy_(out)

    # ---------------------------------------------------------------------------------------------------
    # Static state: cache buffers and captured step sets

    def _resize(self, length: int, keep: bool) -> None:
        """Cache buffers of at least `length` columns (a power of two, at least `min_cache`), keeping the
        columns written so far when `keep`. New buffers void every captured graph (graphs hold addresses)."""
        new_len = max(self.min_cache, _pow2(length))
        if new_len <= self.cache_len:
            return
        old_k, old_v, old_valid = self.k, self.v, self.valid
        self._sets.clear()
        self.k = self.v = []
        if not keep:
            old_k = old_v = old_valid = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        shape = (self.max_rows, self.kv_heads, new_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.valid = torch.ones(self.max_rows, new_len, dtype=torch.bool, device=self.device)
        self.cols = torch.arange(new_len, device=self.device)
        if old_k is not None:
            for new, old in zip((*self.k, *self.v), (*old_k, *old_v), strict=True):
                new[:, :, : self.t].copy_(old[:, :, : self.t])
            self.valid[:, : old_valid.shape[1]].copy_(old_valid)
        self.cache_len = new_len

    def _shift(self, d: int) -> None:
        """Moves every row's columns [0, t) by d: right (d > 0) to make room for a longer prompt, or left
        (d < 0) to drop the -d first columns, which no row attends to any more."""
        t, lo = self.t, max(0, -d)
        for buf in (*self.k, *self.v):
            buf[:, :, lo + d: t + d].copy_(buf[:, :, lo:t].clone())
        self.valid[:, lo + d: t + d] = self.valid[:, lo:t].clone()
        if d > 0:
            self.valid[:, :d] = False
        self.t = t + d
        self.valid[:, self.t:] = True  # columns the next steps write, for every row
        for r in self.rows:
            if r is not None:
                r.start += d
                r.end += d
        self.slot.fill_(self.t)

    def _make_room(self, width: int, budget: int) -> None:
        """Columns for rows with `width` prompt columns joining at column t, each writing up to `budget`
        more. The rows in the batch move right when the prompt is longer than t; when the cache would
        have to grow, the columns before every row's start are dropped first."""
        live = [r for r in self.rows if r is not None]
        if not live:
            self.t = width
            self._resize(width + budget, keep=False)
            self.valid.fill_(True)
            self.slot.fill_(width)
            return

        def need() -> int:
            return max(0, width - self.t) + max(max(r.end for r in live), self.t + budget)

        if need() > self.cache_len and (m := min(r.start for r in live)) > 0:
            self._shift(-m)
        if need() > self.cache_len:
            self._resize(need(), keep=True)
        if width > self.t:
            self._shift(width - self.t)

    def _new_step(self, rows: int, merged: MergedWeights | None) -> _Step:
        n = len(self.layers)
        st = _Step(rows, q=[None] * n, merged=merged, whole=self.whole_step and merged is not None,
                   width=min(self.cache_len, max(64, self.cache_len // 8)))
        # The layout eager RoPE gives the query (TensorIterator's choice for a transposed view): the fused
        # kernel writes the same strides, so attention sees the same tensor (on a CPU twin of the shapes).
        hd, heads = self.head_dim, self.heads
        q = torch.empty(rows, 1, heads * hd).view(rows, 1, heads, hd).transpose(1, 2)
        k = torch.empty(rows, 1, self.kv_heads * hd).view(rows, 1, self.kv_heads, hd).transpose(1, 2)
        cs = torch.empty(rows, 1, hd)
        q_ref = self._rope(q, k, cs, cs)[0]
        st.q_layout = (tuple(q_ref.shape), q_ref.stride())
        st.a = [torch.zeros(rows, 1, self.heads, self.head_dim, dtype=self.dtype, device=self.device)
                for _ in range(n)]
        return st

    def _eager_step(self, st: _Step, t: int, mask, sample: bool) -> None:
        self._first_piece(st)
        for i in range(len(self.layers)):
            self._attention(st, i, t, mask)
            self._piece(st, i + 1, sample)

    def _set_for(self, rows: int, sample: bool) -> _Step:
        """The step set of this many rows for the current key: merged weights for a batch where allowed."""
        merged = self._merged_for(self.key) if rows > 1 else None
        return self._step_set((self.key, rows, sample, merged is not None), rows, sample, merged)

    def _step_set(self, key: tuple, rows: int, sample: bool, merged: MergedWeights | None) -> _Step:
        st = self._sets.get(key)
        if st is not None:
            self._sets.move_to_end(key)
            return st
        st = self._new_step(rows, merged)
        if self.graphs:
            try:
                self._capture(st, sample)
            except Exception as e:  # noqa: BLE001 - e.g. a quantized layer whose kernels cannot be captured
                # The same pieces still run eagerly (the ops of the model's forward): slower, never wrong.
                log.warning("CUDA graph capture of the decode step failed (%s: %s); decoding without graphs",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                torch.cuda.synchronize()
                self.graphs = False
                st = self._new_step(rows, merged)
        self._sets[key] = st
        if len(self._sets) > self.max_graph_sets:
            self._sets.popitem(last=False)
        return st

    def _capture(self, st: _Step, sample: bool) -> None:
        """33 graphs for a 32-layer model (or one whole step per bucket of columns), one memory pool,
        captured in replay order. Warm-up steps on a side stream first (lazy cuBLAS/cuDNN set-up, such as an
        attention plan for each length, must not happen inside a capture). They write cache column 0 and the
        step inputs, which rows already decoding still need: they are put back after."""
        saved = (self.tok.clone(), self.pos.clone(), self.slot.clone())
        column0 = [buf[:, :, 0].clone() for buf in (*self.k, *self.v)]
        self.slot.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        widths = self._bucket_widths(st)
        with torch.cuda.stream(side):
            for t in (widths or [1]) * 2:
                self.slot.zero_()
                self._eager_step(st, t, None, sample)
        torch.cuda.current_stream().wait_stream(side)
        self.slot.zero_()
        st.pool = torch.cuda.graph_pool_handle()
        st.graphs = []
        if st.whole:
            pieces = [partial(self._eager_step, st, t, None, sample) for t in widths]
        else:
            pieces = [partial(self._first_piece, st)]
            pieces += [partial(self._piece, st, i, sample) for i in range(1, len(self.layers) + 1)]
        for piece in pieces:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=st.pool):
                piece()
            st.graphs.append(g)
            if st.whole:
                st.logits.append(self.logits)
        torch.cuda.synchronize()
        self.tok.copy_(saved[0])
        self.pos.copy_(saved[1])
        self.slot.copy_(saved[2])
        for buf, col in zip((*self.k, *self.v), column0, strict=True):
            buf[:, :, 0].copy_(col)
        self.captures += 1

    def _bucket_widths(self, st: _Step) -> list[int]:
        """The columns each whole-step graph attends to (none for a step in pieces)."""
        return list(range(st.width, self.cache_len + 1, st.width)) if st.whole else []

    def _backends(self, rows: int, mask):
        """The SDPA kernels attention may use this step (see `attention`)."""
        if self.attention == "stock" or self.device.type != "cuda" or (rows == 1 and mask is None):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def warm_up(self, key: object = None, length: int | None = None) -> None:
        """Captures the greedy step set of every row count `step()` can use, ahead of traffic (a capture
        takes a second or two on a 7B model: a server would otherwise spend it on a request's time)."""
        if self.active() or not self.graphs:
            return
        self._resize(length or self.min_cache, keep=False)
        self.key = key
        for r in sorted({self._rows_for(n) for n in range(1, self.max_rows + 1)}):
            self._set_for(r, False)

    def _rows_for(self, top: int) -> int:
        """The rows a step computes when row `top - 1` is the last in use (rows that left below it compute,
        unread): with `bucket_rows` and graphs, rounded up to a power of two (at most max_rows)."""
        return min(_pow2(top), self.max_rows) if self.bucket_rows and self.graphs else top

    def _replay_step(self, st: _Step, t: int, mask, sample: bool) -> None:
        if st.whole:  # the narrowest bucket of columns that holds the t this step attends to (eager too)
            b = (t - 1) // st.width
            t = (b + 1) * st.width
            if st.graphs is not None:
                st.graphs[b].replay()
                self.logits = st.logits[b]
                return
        if st.graphs is None:
            self._eager_step(st, t, mask, sample)
            return
        st.graphs[0].replay()
        for i in range(len(self.layers)):
            self._attention(st, i, t, mask)
            st.graphs[i + 1].replay()

    # ---------------------------------------------------------------------------------------------------
    # Merged weights for batched steps (per adapter key, a small LRU)

    def _merged_for(self, key: object) -> MergedWeights | None:
        """The merged copy of the key's weights, built on its first batched step (the model's active adapter
        is the key's, as for the graphs); None where batches run the model's own modules."""
        w = self._merged.get(key)
        if w is not None:
            self._merged.move_to_end(key)
            return w
        if self.merged_batches is False or key in self._unmerged:
            return None
        try:
            size = merged_weights.merged_size(self.layers, self.dtype)
        except Unmergeable as e:
            return self._refuse(key, str(e))
        while len(self._merged) >= max(self.max_merged_keys, 1):
            self._drop_merged(next(iter(self._merged)))
        if self.merged_batches is None:
            ok, why = merged_weights.fits(size, self.device)
            if not ok and self._merged:  # the other keys' copies are what takes the room: measure without them
                self.release_merged()
                ok, why = merged_weights.fits(size, self.device)
            if not ok:
                return self._refuse(key, why)
        start = time.perf_counter()
        w = merged_weights.build(self.layers, self.dtype)
        self._merged[key] = w
        log.info("fast decode: merged %s weights for batches of %r: %.2f GiB in %.2f s", self.dtype, key,
                 w.nbytes / 2**30, time.perf_counter() - start)
        return w

    def _refuse(self, key: object, why: str) -> None:
        self._unmerged[key] = why
        log.warning("fast decode: batches of %r run the model's own modules, not merged weights: %s", key, why)

    def _drop_merged(self, key: object) -> None:
        """Drops a key's merged weights and the step sets whose graphs hold their addresses."""
        del self._merged[key]
        for s in [s for s in self._sets if s[0] == key and s[3]]:
            del self._sets[s]
        if self.device.type == "cuda":  # so that the next memory check sees the room as free
            torch.cuda.empty_cache()

    def release_merged(self) -> None:
        """Drops every key's merged weights (and their step sets); a later batched step builds them again."""
        for key in list(self._merged):
            self._drop_merged(key)

    # ---------------------------------------------------------------------------------------------------
    # Rows: join, step, leave

    def active(self) -> int:
        """How many rows are decoding."""
        return sum(r is not None for r in self.rows)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, temperature: float, top_p: float):
        """Stock `generate(max_new_tokens=1)`: the first token and the prompt's keys and values, exactly as
        stock decoding would start."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.cfg)
        except TypeError:  # older signature
            cache = DynamicCache()
        gen = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        pad = getattr(self.lm.generation_config, "pad_token_id", None)
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, past_key_values=cache,
                                  return_dict_in_generate=True, pad_token_id=0 if pad is None else pad,
                                  output_logits=self.keep_logits, **gen)
        if self.keep_logits:
            self.trace = [out.logits[0].float()]
        return out.sequences[:, -1], list(_cache_layers(cache))

    @torch.no_grad()
    def join(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, owners: list, max_new_tokens: list[int],
             *, temperature: float = 0.0, top_p: float = 1.0, key: object = None) -> list[int]:
        """Prefills these left-padded prompts (one sampling setting) and adds them to the batch; returns
        their first tokens. `owners` name the rows in what `step()` returns; a row may make up to its
        `max_new_tokens` (the cache is sized for that). `key` names the adapter the model has active: rows
        of one adapter decode together, so a different key can join only an empty batch."""
        n, width = input_ids.shape
        if len(owners) != n or len(max_new_tokens) != n:
            raise ValueError(f"{n} prompts, {len(owners)} owners, {len(max_new_tokens)} max_new_tokens")
        if not self.active():
            self._reset(key)
        elif key != self.key:
            raise ValueError(f"rows for {key!r} cannot join rows decoding with {self.key!r}")
        free = [i for i, r in enumerate(self.rows) if r is None]
        if n > len(free):
            raise ValueError(f"{n} rows do not fit: {len(free)} of max_rows={self.max_rows} are free")
        slots = free[:n]
        sample = temperature > 0
        mask = attention_mask.to(self.device)
        first, layers = self._prefill(input_ids.to(self.device), mask, temperature, top_p)
        self._make_room(width, max(max_new_tokens) + self.lag)
        t, lo = self.t, self.t - width
        idx = torch.tensor(slots, device=self.device)
        for i, (k, v) in enumerate(layers):
            self.k[i][:, :, lo:t].index_copy_(0, idx, k)
            self.v[i][:, :, lo:t].index_copy_(0, idx, v)
        valid = torch.ones(n, self.cache_len, dtype=torch.bool, device=self.device)
        valid[:, :lo] = False
        valid[:, lo:t] = mask.bool()
        self.valid.index_copy_(0, idx, valid)
        self.tok[:, 0].index_copy_(0, idx, first)
        self.pos[:, 0].index_copy_(0, idx, mask.long().sum(-1))  # generate(): cumsum(mask) - 1, next token
        self.greedy.index_fill_(0, idx, not sample)
        self.temperature.index_fill_(0, idx, temperature if sample else 1.0)
        self.top_p.index_fill_(0, idx, top_p if sample else 1.0)
        pads = (mask == 0).sum(-1).tolist()
        for j, slot in enumerate(slots):
            self.rows[slot] = _Row(owners[j], lo + pads[j], t + max_new_tokens[j] + self.lag, sample)
        self._refresh_clean()
        return first.tolist()

    def _refresh_clean(self) -> None:
        # A batch whose rows all see every column [0, t) runs attention without a mask, as stock does
        self.clean = self.valid[:, : self.t].all(-1).tolist()

    def leave(self, owner: object) -> None:
        """Frees the row of `owner` (its tokens still in flight are returned by later steps, and ignored)."""
        for i, r in enumerate(self.rows):
            if r is not None and r.owner is owner:
                self.rows[i] = None

    @torch.no_grad()
    def step(self) -> list[list[tuple[object, int]]]:
        """Launches one decode step of the batch and returns the steps whose tokens are in by now, those
        launched `lag` steps ago: per step, the (owner, token) of each row it decoded."""
        used = [i for i, r in enumerate(self.rows) if r is not None]
        if not used:
            return self.drain()
        rows = self._rows_for(used[-1] + 1)
        sample = any(self.rows[i].sample for i in used)
        if self.t >= self.cache_len:  # a row kept past the end it joined with
            self._make_room(0, 1)
            self._refresh_clean()
        st = self._set_for(rows, sample)
        mask = None if st.whole or all(self.clean[:rows]) else self._mask(self.valid[:rows], self.t + 1)
        with self._backends(rows, mask):
            self._replay_step(st, self.t + 1, mask, sample)
        self.t += 1
        host = self._host[self._launched % len(self._host)]
        self._launched += 1
        host[:rows].copy_(self.next[:rows], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        if self.keep_logits:
            self.trace.append(self.logits[:rows].clone())
        self._pending.append((event, host, rows, [r.owner if r is not None else None for r in self.rows[:rows]]))
        done = []
        while len(self._pending) > self.lag:
            done.append(self._read(self._pending.popleft()))
        return done

    def drain(self) -> list[list[tuple[object, int]]]:
        """The tokens of every step launched and not yet returned (waits for them)."""
        done = [self._read(p) for p in self._pending]
        self._pending.clear()
        return done

    @staticmethod
    def _read(pending: tuple) -> list[tuple[object, int]]:
        event, host, rows, owners = pending
        if event is not None:
            event.synchronize()
        return [(o, tok) for o, tok in zip(owners, host[:rows].tolist(), strict=True) if o is not None]

    def _reset(self, key: object) -> None:
        self.key = key
        self.t = 0
        self.clean = [True] * self.max_rows
        self._pending.clear()
        self.greedy.fill_(True)
        self.temperature.fill_(1.0)
        self.top_p.fill_(1.0)

    def _fill(self) -> float:
        """A masked column's additive value: what eager attention adds (transformers' finfo.min), or what SDPA
        turns the bool mask transformers gives it into (-inf; `convert_boolean_attn_mask`)."""
        return torch.finfo(self.dtype).min if self.cfg._attn_implementation == "eager" else float("-inf")

    def _mask(self, valid: torch.Tensor, t: int) -> torch.Tensor:
        """The [B, 1, 1, t] additive mask of the step, made once a step here instead of in each layer's SDPA
        call."""
        m = valid[:, None, None, :t]
        return torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill_(~m, self._fill())

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
               temperature: float = 0.0, top_p: float = 1.0, key: object = None) -> Iterator[list[int]]:
        """One fixed batch: yields, per generated position, the B rows' tokens (the first from the
        prefill). Rows are never stopped early here: the caller reads each row up to its own end and
        closes the generator (or breaks) once every row is done."""
        if self.active():
            raise RuntimeError("stream() needs the decoder to itself, and rows are decoding")
        rows = input_ids.shape[0]
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows > max_rows={self.max_rows}")
        owners = list(range(rows))
        yield self.join(input_ids, attention_mask, owners, [max_new_tokens] * rows, temperature=temperature,
                        top_p=top_p, key=key)
        launched, emitted = 0, 1
        try:
            while emitted < max_new_tokens:
                last = launched >= max_new_tokens - 1
                done = self.drain() if last else self.step()
                launched += not last
                for step in done:
                    yield [tok for _, tok in step]
                    emitted += 1
                if last:
                    break
        finally:
            for o in owners:
                self.leave(o)
            self._pending.clear()


def _sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row: temperature, then top-p as transformers' TopPLogitsWarper cuts, then a draw by the
    exponential race (argmax of p / Exp(1), which picks index i with probability p_i) — no host sync,
    graph-safe. `temperature` and `top_p` are [rows, 1] (or broadcast to it)."""
    scores = logits / temperature
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - top_p)
    drop[..., -1:] = False  # keep at least the most likely token
    scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(dim=-1)


def _cache_layers(cache) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            yield layer.keys, layer.values
    else:  # transformers < 4.56
        yield from zip(cache.key_cache, cache.value_cache, strict=True)
