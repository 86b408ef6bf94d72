"""The patched model computes what stock peft computes, in fp32 on the CPU: Llama, Mistral (sliding window),
Qwen2 (q/k/v biases, per-layer sliding window), Qwen3 (q/k norms), Gemma 2 (GeGLU, four norms of the
form x̂·(1 + w), attention and final logit soft-capping), Gemma 3 (q/k norms, local and global RoPE) and
Phi-3 (fused qkv and gate_up projections), with and without LoRA dropout.

The fused nodes regenerate dropout masks from a seed (kernels/dropout.py), so peft's `nn.Dropout`
cannot draw the same ones; instead each peft dropout module is replaced by one that applies the mask the
fast path used for that projection (recorded on the fast model's run). Same masks, so loss and every
LoRA gradient must agree to fp32 rounding.
"""

import pytest
import torch

pytest.importorskip("peft")

from tinymodels import ARCHS, lm_batch, make_tiny_model  # noqa: E402

from loraforge.bench.models import compare, lora_params, sync_lora  # noqa: E402
from loraforge.kernels import dropout as dropout_mod  # noqa: E402
from loraforge.kernels import patch as patch_mod  # noqa: E402
from loraforge.kernels.dropout import dropped  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN2 = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
             max_window_layers=1)  # layer 0 full attention, layer 1 a window of 8
LLAMA_BIAS = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
QWEN3 = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
             num_attention_heads=4, num_key_value_heads=2, layer_types=["full_attention", "sliding_attention"],
             use_sliding_window=True, sliding_window=8)
# Gemma: soft-capping low enough to bend these small logits, norms' weights away from 0 (see _nonzero_norms)
GEMMA2 = dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
              num_attention_heads=4, num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=16,
              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
GEMMA3 = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
              num_attention_heads=4, num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=16,
              layer_types=["sliding_attention", "full_attention"])
PHI3 = dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
NEW_ARCHS = {"qwen3": QWEN3, "gemma2": GEMMA2, "gemma3": GEMMA3, "phi3": PHI3}
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
# Mistral and Phi-3: a window shorter than the batch, so it shows in the mask. Gemma: eager attention,
# the one that soft-caps (SDPA cannot), as transformers recommends for Gemma 2.
OVERRIDES = {"mistral": {"sliding_window": 8}, "gemma2": {"attn_implementation": "eager"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, embedded_model_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(ARCHS, "qwen2", QWEN2)
        mp.setitem(ARCHS, "llama_bias", LLAMA_BIAS)
        for name, spec in NEW_ARCHS.items():
            mp.setitem(ARCHS, name, spec)
        return {a: make_tiny_model(tmp_path_factory.mktemp(a), a, tokenizer_dir=embedded_model_dir)
                for a in ("llama3", "mistral", "qwen2", "llama_bias", *NEW_ARCHS)}


@pytest.fixture
def fp32_fast_path(monkeypatch):
    """The fast path in the model's own fp32 (on a GPU it runs bf16 and downcasts fp32 copies)."""
    monkeypatch.setattr(patch_mod, "_compute_dtype", lambda base: torch.float32)


def _nonzero_norms(model):
    """Gemma initialises its norm weights to 0 (scale 1 + w = 1): draw them, so x̂·(1 + w) is tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _build(path, arch, dropout, targets=None, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = targets or TARGETS.get(arch, ALL)
    kw = {"attn_implementation": "sdpa", **OVERRIDES.get(arch, {})}
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    if arch.startswith("gemma"):
        _nonzero_norms(m)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                     task_type="CAUSAL_LM", **lora))
    m.train()
    return m


def _pair(tiny, arch, dropout, targets=None, **lora):
    stock, fast = _build(tiny[arch], arch, dropout, targets, **lora), _build(tiny[arch], arch, dropout, targets, **lora)
    s = patch_mod.patch_model(fast, allow_cpu=True)
    assert s["patched"] and s["attention"] == 2 and s["mlp"] == 2 and not s["skipped"], s
    sync_lora(stock, fast)
    return stock, fast


class _SameMask(torch.nn.Module):
    """Stands in for peft's nn.Dropout: applies the mask the fused path drew for this projection."""

    def __init__(self, seed: int, salt: int, p: float):
        super().__init__()
        self.seed, self.salt, self.p = torch.tensor(seed), salt, p

    def forward(self, x):
        return dropped(x, self.seed, self.salt, self.p)


def _record_masks(monkeypatch):
    """(seed, salt, p) of each mask the fused path applies, in order of first use."""
    seen: dict = {}
    real = dropout_mod.dropped  # the twins of the fused dropout GEMMs all draw through `dropped`

    def spy(t, seed, salt, p):
        seen.setdefault((int(seed), salt), p)
        return real(t, seed, salt, p)

    monkeypatch.setattr(dropout_mod, "dropped", spy)
    return seen


def _dropout_modules(model, targets):
    """peft's dropout modules in forward order (Phi-3 declares o_proj before qkv_proj)."""
    found = [(n, m.lora_dropout) for n, m in model.named_modules()
             if hasattr(m, "lora_dropout") and "default" in m.lora_dropout]

    def order(item):
        name = item[0]
        layer = int(name.split("layers.")[1].split(".")[0])
        return layer, targets.index(name.rsplit(".", 1)[-1])

    return [d for _, d in sorted(found, key=order)]


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "llama_bias", *NEW_ARCHS])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_patched_matches_stock_peft(tiny, fp32_fast_path, monkeypatch, arch, dropout):
    stock, fast = _pair(tiny, arch, dropout)
    batch = lm_batch(stock.config.vocab_size, 2, 24, pad_from=18, unlabeled_prefix=3)
    masks = _record_masks(monkeypatch)
    ls, gs = _one_step(fast, batch)
    if dropout:
        # q, k, v, o, gate, up, down of each layer (Phi-3: qkv, o, gate_up, down), in forward order =
        # peft's module order; the checkpoint's recompute and the backward drew no new masks
        assert len(masks) == len(TARGETS.get(arch, ALL)) * 2 and set(masks.values()) == {dropout}
        for dmod, (seed, salt) in zip(_dropout_modules(stock, TARGETS.get(arch, ALL)), masks, strict=True):
            dmod["default"] = _SameMask(seed, salt, dropout)
    else:
        assert not masks
    lr, gr = _one_step(stock, batch)
    assert ls == pytest.approx(lr, rel=1e-5)
    for n in gr:
        torch.testing.assert_close(gs[n], gr[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "llama_bias", "phi3"])
def test_dora_matches_stock_peft(tiny, fp32_fast_path, arch):
    """DoRA (no dropout) on the fast path: the fused node's output times m / ‖W + s·B A‖ (kernels/dora.py)
    against peft's DoRA, with frozen biases (Qwen2, Llama with attention_bias) and Phi-3's fused
    projections; the magnitudes drawn away from ‖W‖ so that the scale is not 1."""
    stock, fast = _pair(tiny, arch, 0.0, use_dora=True)
    assert fast._loraforge_patch_summary["dora"]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for (n, p), q in zip(lora_params(stock).items(), lora_params(fast).values(), strict=True):
            if "magnitude" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                q.copy_(p)
        fast_params = dict(fast.named_parameters())
        for n, p in stock.named_parameters():  # HF initialises biases to 0: draw them, so they count
            if n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                fast_params[n].copy_(p)
    batch = lm_batch(stock.config.vocab_size, 2, 24, pad_from=18, unlabeled_prefix=3)
    lr, gr = _one_step(stock, batch)
    ls, gs = _one_step(fast, batch)
    assert any("magnitude" in n for n in gs)
    assert ls == pytest.approx(lr, rel=1e-5)
    for n in gr:
        torch.testing.assert_close(gs[n], gr[n], rtol=1e-4, atol=1e-6, msg=n)


def _one_step(model, batch):
    params = lora_params(model)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return loss.item(), grads


def test_dropout_is_deterministic_and_off_in_eval(tiny, fp32_fast_path):
    stock, fast = _pair(tiny, "llama3", 0.1)
    batch = lm_batch(stock.config.vocab_size, 2, 24)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(_one_step(fast, batch))
    assert runs[0][0] == runs[1][0] and runs[0][0] != runs[2][0]
    for n in runs[0][1]:
        assert torch.equal(runs[0][1][n], runs[1][1][n]), n
    # eval mode: no mask, no RNG drawn, and the loss of stock peft in eval mode (nn.Dropout is identity)
    fast.eval(), stock.eval()
    state = torch.get_rng_state()
    res = compare(stock, fast, batch)
    assert torch.equal(state, torch.get_rng_state())
    assert res["loss_rel_diff"] < 1e-5 and res["max_rel_grad_diff"] < 1e-4, res


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3"])
def test_attention_gets_the_stock_arguments(tiny, fp32_fast_path, monkeypatch, arch):
    """The attention function sees what stock attention passes it: sliding_window for Mistral (from the
    config) and Qwen2 (per layer), none for Llama; q/k/v as stock computes them."""
    from transformers.modeling_utils import AttentionInterface

    calls = []
    sdpa = AttentionInterface._global_mapping["sdpa"]

    def spy(module, q, k, v, mask, **kwargs):
        calls.append((module.layer_idx, q.detach().clone(), k.detach().clone(), v.detach().clone(),
                      {n: x for n, x in kwargs.items() if n not in ("position_ids", "use_cache")}))
        return sdpa(module, q, k, v, mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)
    stock, fast = _pair(tiny, arch, 0.0)
    batch = lm_batch(stock.config.vocab_size, 2, 24)
    with torch.no_grad():
        stock(**batch), fast(**batch)
    assert len(calls) == 4
    for (li, *qkv_s, kw_s), (lf, *qkv_f, kw_f) in zip(calls[:2], calls[2:], strict=True):
        assert li == lf and kw_s == kw_f, (kw_s, kw_f)
        for a, b in zip(qkv_s, qkv_f, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    windows = [kw.get("sliding_window", "absent") for *_, kw in calls[:2]]
    assert windows == {"llama3": ["absent"] * 2, "mistral": [8, 8], "qwen2": [None, 8], "qwen3": [None, 8],
                       "gemma3": [8, None], "phi3": [8, 8]}[arch]


def test_generation_with_a_kv_cache_runs_the_stock_attention(tiny, fp32_fast_path):
    """transformers 5 passes the cache as `cache=`: the patched attention must hand such calls to the stock
    forward, which updates the cache (a patched forward that ignored it generated from no context)."""
    stock, fast = _pair(tiny, "llama3", 0.0)
    for m in (stock, fast):
        m.eval()
    prompt = lm_batch(stock.config.vocab_size, 1, 8)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(fast.generate(input_ids=prompt, **kw), stock.generate(input_ids=prompt, **kw))
