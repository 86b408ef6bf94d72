"""FastDecoder against stock `generate`: the same greedy tokens, row for row.

On a CPU the decoder runs its step pieces eagerly (no CUDA graph to record), through the same code that the
GPU captures: prefill by `generate`, the static cache filled from it, per-layer pieces, attention over
`cache[:, :, :t]` with the padding mask, tokens read back `lag` steps late. bench/serve_speed.py checks the
graphed path against stock on an H100. Batched steps here run from merged weights (a CPU always merges); in
fp32 on these tiny models their greedy tokens are still stock's (test_merged_decode.py compares the merged
step with the modules' own).
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import run_rows

from loraforge.infer.fast_decode import FastDecoder, _sample, supported


def _tiny(kv_heads: int = 2, lora: bool = False, seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      initializer_range=0.25)  # peaked attention: output sensitive to every position and key
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # every row runs its full length in stock generate too
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))
        with torch.no_grad():  # B starts at zero: make the adapter change the output
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        model.eval()
    return model


def _batch(lengths: list[int], vocab: int = 211, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def _stock(model, ids, mask, new):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def _fast(dec, ids, mask, new, **kw):
    steps = list(dec.stream(ids, mask, new, **kw))
    assert len(steps) == new
    return [list(col) for col in zip(*steps, strict=True)]


@pytest.mark.parametrize("kv_heads,lora,lengths,attn", [
    (4, False, [9], "sdpa"),                 # one stream, multi-head attention
    (2, False, [12, 5, 9], "sdpa"),          # GQA, left padding (a mask on every step)
    (2, True, [7, 7], "sdpa"),               # a LoRA adapter in the projections, no padding
    (2, True, [10, 3, 6, 10], "eager"),      # eager attention (float mask)
])
def test_greedy_tokens_equal_stock_generate(kv_heads, lora, lengths, attn) -> None:
    model = _tiny(kv_heads, lora, attn=attn)
    ids, mask = _batch(lengths)
    new = 24
    ref = _stock(model, ids, mask, new)
    dec = FastDecoder(model, max_rows=4)
    assert not dec.graphs  # CPU: pieces run eagerly
    got = _fast(dec, ids, mask, new, key="a")
    assert got == ref
    # A second batch of another shape reuses the decoder; the first shape again reuses its step set.
    ids2, mask2 = _batch([4, 8], seed=7)
    assert _fast(dec, ids2, mask2, 10, key="a") == _stock(model, ids2, mask2, 10)
    assert _fast(dec, ids, mask, new, key="a") == ref


def test_cache_grows_past_its_first_size() -> None:
    model = _tiny()
    dec = FastDecoder(model, max_rows=2)
    ids, mask = _batch([6, 3])
    _fast(dec, ids, mask, 5)
    assert dec.cache_len == 256
    ids, mask = _batch([200, 150])
    assert _fast(dec, ids, mask, 80) == _stock(model, ids, mask, 80)
    assert dec.cache_len == 512


def test_sampling_with_tiny_top_p_is_greedy_and_otherwise_draws_valid_tokens() -> None:
    model = _tiny()
    ids, mask = _batch([8, 5])
    dec = FastDecoder(model, max_rows=2)
    ref = _stock(model, ids, mask, 12)
    # top_p that keeps only the most likely token: the draw is forced, whatever the temperature
    assert _fast(dec, ids, mask, 12, temperature=0.7, top_p=1e-6) == ref
    torch.manual_seed(0)
    drawn = _fast(dec, ids, mask, 40, temperature=1.5, top_p=0.95)
    flat = [t for row in drawn for t in row]
    assert all(0 <= t < 211 for t in flat)
    assert drawn != _fast(dec, ids, mask, 40)  # sampling at T=1.5 does not follow the greedy path


def test_sampler_follows_the_softmax() -> None:
    """The exponential race picks index i with probability softmax(logits / T)_i (after top-p)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(20000, 1)
    one = torch.ones(1, 1)
    torch.manual_seed(0)
    freq = torch.bincount(_sample(logits, one, one), minlength=5).float() / logits.shape[0]
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015), freq
    # 2.0 and 1.0 carry 0.64 + 0.24: with top_p 0.8 {0, 1} survive, 2.. are cut
    freq = torch.bincount(_sample(logits, one, one * 0.8), minlength=5).float() / logits.shape[0]
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.64 / 0.88) < 0.015
    # per row: the first half at T=1, the second at T=0.25 (sharper), each row its own setting
    temps = torch.cat([torch.ones(10000, 1), torch.full((10000, 1), 0.25)])
    drawn = _sample(logits, temps, one)
    cold = torch.bincount(drawn[10000:], minlength=5).float() / 10000
    assert torch.allclose(cold, (logits[0] / 0.25).softmax(-1), atol=0.015), cold


def test_unsupported_models_are_named() -> None:
    model = _tiny()
    model.generation_config.repetition_penalty = 1.3
    ok, why = supported(model)
    assert not ok and "repetition_penalty" in why
    from transformers import MistralConfig, MistralForCausalLM

    m = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ok, why = supported(m)
    assert not ok and "mistral" in why
    with pytest.raises(ValueError, match="not available"):
        FastDecoder(m)


# ---------------------------------------------------------------------------------------------------------
# Continuous batching: rows join and leave between steps


def _alone(model, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    return _stock(model, ids, torch.ones_like(ids), new)[0]


def test_rows_joining_and_leaving_mid_batch_decode_as_they_would_alone() -> None:
    """A row that joins a running batch (its prompt shorter, then longer than the columns written so far,
    which shifts the others right), and a row that takes the place of one that left, each get the tokens
    stock `generate` gives its prompt alone."""
    model = _tiny()
    g = torch.Generator().manual_seed(3)
    p = {n: torch.randint(3, 211, (n,), generator=g).tolist() for n in (6, 9, 30, 4)}
    dec = FastDecoder(model, max_rows=3)
    plan = {0: [("a", p[6], 12)], 3: [("b", p[9], 20)], 5: [("c", p[30], 8)], 16: [("d", p[4], 10)]}
    got = run_rows(dec, plan, steps=30)
    for name, prompt, new in [row for rows in plan.values() for row in rows]:
        assert got[name] == _alone(model, prompt, new), name
    assert dec.active() == 0


def test_a_full_cache_drops_the_columns_no_row_needs_before_it_grows() -> None:
    """Rows joining one after another move the write column on; when a newcomer would not fit, the
    columns before the oldest live row's start are dropped (no new buffers) and its tokens stay right."""
    model = _tiny()
    g = torch.Generator().manual_seed(5)
    dec = FastDecoder(model, max_rows=2, min_cache=32)
    # a: columns 0-9, leaves at step ~9; b joins at column 14 (its prompt in 9-13) and is live when c,
    # at column 26, needs 7 + 9 + lag columns more than 32 holds: columns 0-8 go, nothing grows.
    plan = {0: [("a", torch.randint(3, 211, (10,), generator=g).tolist(), 8)],
            4: [("b", torch.randint(3, 211, (5,), generator=g).tolist(), 14)],
            12: [("c", torch.randint(3, 211, (7,), generator=g).tolist(), 9)]}
    got = run_rows(dec, plan, steps=26)
    for name, prompt, new in [row for rows in plan.values() for row in rows]:
        assert got[name] == _alone(model, prompt, new), name
    assert dec.cache_len == 32  # compacted, never grown


def test_greedy_and_sampling_rows_share_steps() -> None:
    model = _tiny()
    g = torch.Generator().manual_seed(4)
    greedy_prompt = torch.randint(3, 211, (7,), generator=g).tolist()
    dec = FastDecoder(model, max_rows=2)
    ids = torch.tensor([greedy_prompt])
    out = {"g": dec.join(ids, torch.ones_like(ids), ["g"], [15], key="a")}
    hot = torch.randint(3, 211, (1, 5), generator=g)
    out["s"] = dec.join(hot, torch.ones_like(hot), ["s"], [15], temperature=1.5, top_p=1.0, key="a")
    for i in range(16):
        for step in dec.step() + ([] if i < 15 else dec.drain()):
            for name, tok in step:
                out[name].append(tok)
    assert out["g"][:15] == _alone(model, greedy_prompt, 15)
    assert out["s"][:15] != _alone(model, hot[0].tolist(), 15)  # the sampled row does not follow greedy
    with pytest.raises(ValueError, match="cannot join"):
        dec.join(ids, torch.ones_like(ids), ["x"], [3], key="another adapter")
