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
- Sampling happens in the last piece (temperature, top-p, exponential-race sampling); the next tokens
  go to pinned host memory asynchronously and the host reads a step's tokens two steps later, so the
  GPU never waits for the Python that streams, stops and detokenizes.

Greedy decoding is therefore bit-identical to stock `generate` for the rows and masks it handles (tested
on CPU against `generate`; measured on the GPU by bench/serve_speed.py). On a CPU, or with `graphs=False`,
the same pieces run eagerly, which is how the tests exercise this module without a GPU.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

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


class FastDecoder:
    """Decodes batches of left-padded prompts with a static KV cache and graphed layer pieces.

    One instance per model; `stream()` is not re-entrant (the server's single worker thread calls it).
    `max_rows` bounds the batch; the cache grows (in powers of two) to the longest prompt + new tokens
    seen, and graphs are kept for up to `max_graph_sets` (adapter, rows, sampling) combinations."""

    def __init__(self, model, *, max_rows: int = 16, graphs: bool | None = None, max_graph_sets: int = 24,
                 fused_kernels: bool = True):
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
        self.max_rows, self.max_graph_sets = max_rows, max_graph_sets
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
        dev = self.device
        self.tok = torch.zeros(max_rows, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_rows, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.next = torch.zeros(max_rows, dtype=torch.long, device=dev)
        self.temperature = torch.ones(1, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(1, dtype=torch.float32, device=dev)
        self._sets: OrderedDict[tuple, _Step] = OrderedDict()
        self.captures = 0
        # Which exact fused kernels (kernels/decode.py) this GPU may use; None: the model's eager ops.
        self.fused: dict[str, int | None] = {"norm": None, "rope": None, "silu_mul": None}
        if self.device.type == "cuda" and fused_kernels:
            self.fused = self._check_fused()
        # Diagnostics (bench/decode_diag.py): keep each step's fp32 logits, to find the first step that
        # differs from stock's.
        self.keep_logits = False
        self.logits: torch.Tensor | None = None

    def _check_fused(self) -> dict[str, int | None]:
        """kernels/decode.py's self-check, then each kernel once more against this model's own modules
        (its RMSNorm, its RoPE function, its MLP activation). A kernel is used only where both are exact."""
        from loraforge.kernels import decode

        found = decode.self_check(self.device, self.dtype)
        layer = self.layers[0]
        g = torch.Generator(device=self.device).manual_seed(1)
        with torch.no_grad():
            h = (torch.randn(4, 1, self.cfg.hidden_size, generator=g, device=self.device) * 2).to(self.dtype)
            d = torch.randn(4, 1, self.cfg.hidden_size, generator=g, device=self.device).to(self.dtype)
            norm = layer.input_layernorm
            if found["norm"] is not None and not (hasattr(norm, "variance_epsilon") and torch.equal(
                    decode.rms_norm(h, d, norm.weight, norm.variance_epsilon, found["norm"])[1], norm(h + d))):
                found["norm"] = None
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

    def _norm(self, module, h: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, module(h + delta)): the residual add and the RMSNorm after it, as the decoder layer
        does them — in 3 kernels instead of 9 when kernels/decode.py reproduces them exactly here."""
        if self.fused["norm"] is not None:
            from loraforge.kernels import decode

            return decode.rms_norm(h, delta, module.weight, module.variance_epsilon, self.fused["norm"])
        if delta is not None:
            h = h + delta
        return h, module(h)

    def _pre_attention(self, st: _Step, i: int, h: torch.Tensor, delta: torch.Tensor | None) -> None:
        """Residual add (the previous layer's MLP output), input norm, q/k/v, RoPE, cache write."""
        layer = self.layers[i]
        attn = layer.self_attn
        st.h, x = self._norm(layer.input_layernorm, h, delta)
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if self.fused["rope"] is not None:
            from loraforge.kernels import decode

            out = torch.empty_strided(*st.q_layout, dtype=q.dtype, device=q.device)
            st.q[i] = decode.rope_cache(q, k, v, st.cos, st.sin, out, self.k[i], self.v[i], self.slot)
            return
        shape = (st.rows, 1, -1, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        q, k = self._rope(q, k, st.cos, st.sin)
        self.k[i][: st.rows].index_copy_(2, self.slot, k)
        self.v[i][: st.rows].index_copy_(2, self.slot, v)
        st.q[i] = q

    def _post_attention(self, st: _Step, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o_proj, residual add, post-attention norm, MLP. Returns (residual, MLP output): the second
        residual add is left to the next norm, which fuses it."""
        layer = self.layers[i]
        a = st.a[i].reshape(st.rows, 1, -1).contiguous()
        h, x = self._norm(layer.post_attention_layernorm, h, layer.self_attn.o_proj(a))
        mlp = layer.mlp
        if self.fused["silu_mul"] is not None:
            from loraforge.kernels import decode

            act = decode.silu_mul(mlp.gate_proj(x), mlp.up_proj(x), self.fused["silu_mul"])
            return h, mlp.down_proj(act)
        return h, mlp(x)

    def _first_piece(self, st: _Step) -> None:
        h = self.inner.embed_tokens(self.tok[: st.rows])
        st.cos, st.sin = self.inner.rotary_emb(h, self.pos[: st.rows])
        self._pre_attention(st, 0, h, None)

    def _piece(self, st: _Step, i: int, sample: bool) -> None:
        """Layer i-1's attention output → layer i's query (or, after the last layer, the next tokens)."""
        h, m = self._post_attention(st, i - 1, st.h)
        if i < len(self.layers):
            self._pre_attention(st, i, h, m)
            return
        st.h, x = self._norm(self.inner.norm, h, m)
        logits = self.lm.lm_head(x)[:, -1, :].to(torch.float32)  # as generate() takes them
        if self.keep_logits:
            self.logits = logits
        nxt = self._sample(logits) if sample else torch.argmax(logits, dim=-1)
        self.next[: st.rows].copy_(nxt)
        self.tok[: st.rows, 0].copy_(nxt)
        self.pos[: st.rows].add_(1)
        self.slot.add_(1)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-p as transformers' TopPLogitsWarper cuts, then a draw by the exponential
        race (argmax of p / Exp(1), which picks index i with probability p_i) — no host sync, graph-safe."""
        scores = logits / self.temperature
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - self.top_p)
        drop[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = scores.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_(1)
        return (probs / race).argmax(dim=-1)

    def _attention(self, st: _Step, i: int, t: int, mask: torch.Tensor | None) -> None:
        attn = self.layers[i].self_attn
        k, v = self.k[i][: st.rows, :, :t], self.v[i][: st.rows, :, :t]
        out, _ = self._attn(attn, st.q[i], k, v, mask, dropout=0.0, scaling=attn.scaling)
        st.a[i].copy_(out)

    # ---------------------------------------------------------------------------------------------------
    # Static state: cache buffers and captured step sets

    def _ensure_cache(self, length: int) -> None:
        if length <= self.cache_len:
            return
        new_len = max(256, 1 << (length - 1).bit_length())
        self._sets.clear()  # graphs captured against the old buffers are no longer valid
        self.k = self.v = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        shape = (self.max_rows, self.kv_heads, new_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.cache_len = new_len

    def _new_step(self, rows: int) -> _Step:
        n = len(self.layers)
        st = _Step(rows, q=[None] * n)
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

    def _step_set(self, key: tuple, rows: int, sample: bool) -> _Step:
        st = self._sets.get(key)
        if st is not None:
            self._sets.move_to_end(key)
            return st
        st = self._new_step(rows)
        if self.graphs:
            try:
                self._capture(st, sample)
            except Exception as e:  # noqa: BLE001 - e.g. a quantized layer whose kernels cannot be captured
                # The same pieces still run eagerly (the ops of the model's forward): slower, never wrong.
                log.warning("CUDA graph capture of the decode step failed (%s: %s); decoding without graphs",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                torch.cuda.synchronize()
                self.graphs = False
                st = self._new_step(rows)
        self._sets[key] = st
        if len(self._sets) > self.max_graph_sets:
            self._sets.popitem(last=False)
        return st

    def _capture(self, st: _Step, sample: bool) -> None:
        """33 graphs for a 32-layer model, one memory pool, captured in replay order. A warm-up step on a
        side stream first (lazy cuBLAS/cuDNN set-up must not happen inside a capture); it writes cache
        slot 0, which the prefill copy overwrites."""
        saved = (self.tok.clone(), self.pos.clone(), self.slot.clone())
        self.slot.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.slot.zero_()
                self._eager_step(st, 1, None, sample)
        torch.cuda.current_stream().wait_stream(side)
        self.slot.zero_()
        st.pool = torch.cuda.graph_pool_handle()
        st.graphs = []
        n = len(self.layers)
        for i in range(n + 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=st.pool):
                if i == 0:
                    self._first_piece(st)
                else:
                    self._piece(st, i, sample)
            st.graphs.append(g)
        torch.cuda.synchronize()
        self.tok.copy_(saved[0])
        self.pos.copy_(saved[1])
        self.slot.copy_(saved[2])
        self.captures += 1

    def _replay_step(self, st: _Step, t: int, mask, sample: bool) -> None:
        if st.graphs is None:
            self._eager_step(st, t, mask, sample)
            return
        st.graphs[0].replay()
        for i in range(len(self.layers)):
            self._attention(st, i, t, mask)
            st.graphs[i + 1].replay()

    # ---------------------------------------------------------------------------------------------------
    # Decoding

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
               temperature: float = 0.0, top_p: float = 1.0, key: object = None,
               lag: int = 2) -> Iterator[list[int]]:
        """Yields, per generated position, the B rows' tokens (the first from the prefill). Left-padded
        input. Rows are never stopped early here: the caller reads each row up to its own end and
        closes the generator (or breaks) once every row is done. `key` names the active adapter, whose
        graphs differ from another adapter's."""
        rows, width = input_ids.shape
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows > max_rows={self.max_rows}")
        sample = temperature > 0
        ids = input_ids.to(self.device)
        mask2d = attention_mask.to(self.device)
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.cfg)
        except TypeError:  # older signature
            cache = DynamicCache()
        gen = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if sample else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        pad = getattr(self.lm.generation_config, "pad_token_id", None)
        out = self.model.generate(input_ids=ids, attention_mask=mask2d, max_new_tokens=1, past_key_values=cache,
                                  return_dict_in_generate=True, pad_token_id=0 if pad is None else pad,
                                  output_logits=self.keep_logits, **gen)
        first = out.sequences[:, -1]
        self.trace = [out.logits[0].float()] if self.keep_logits else []
        yield first.tolist()
        if max_new_tokens <= 1:
            return
        self._ensure_cache(width + max_new_tokens)
        st = self._step_set((key, rows, sample), rows, sample)
        for i, layer_cache in enumerate(_cache_layers(cache)):
            k, v = layer_cache
            self.k[i][:rows, :, :width].copy_(k)
            self.v[i][:rows, :, :width].copy_(v)
        del cache, out
        self.tok[:rows, 0].copy_(first)
        self.pos[:rows, 0].copy_(mask2d.long().sum(-1))  # generate(): cumsum(mask) - 1 for the next token
        self.slot.fill_(width)
        if sample:
            self.temperature.fill_(temperature)
            self.top_p.fill_(top_p)
        padded = bool((mask2d == 0).any())
        full_mask = None
        if padded:  # the bool [B, 1, 1, t] mask transformers builds for SDPA/eager from the padding mask
            full_mask = torch.ones(rows, self.cache_len, dtype=torch.bool, device=self.device)
            full_mask[:, :width] = mask2d.bool()
        host = torch.empty(max_new_tokens, rows, dtype=torch.long, pin_memory=self.device.type == "cuda")
        events: list = []
        steps = max_new_tokens - 1
        done_upto = 0
        for s in range(steps):
            t = width + s + 1
            m = None if full_mask is None else self._mask(full_mask, t)
            self._replay_step(st, t, m, sample)
            host[s].copy_(self.next[:rows], non_blocking=True)
            if self.keep_logits:
                self.trace.append(self.logits[:rows].clone())
            if self.device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record()
                events.append(ev)
            while done_upto <= s - lag or (s == steps - 1 and done_upto <= s):
                if events:
                    events[done_upto].synchronize()
                yield host[done_upto].tolist()
                done_upto += 1

    def _mask(self, full_mask: torch.Tensor, t: int) -> torch.Tensor:
        m = full_mask[:, None, None, :t]
        if self.cfg._attn_implementation == "eager":  # eager attention adds a float mask
            return torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~m, torch.finfo(self.dtype).min)
        return m


def _cache_layers(cache) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            yield layer.keys, layer.values
    else:  # transformers < 4.56
        yield from zip(cache.key_cache, cache.value_cache, strict=True)
