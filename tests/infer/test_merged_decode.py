"""FastDecoder's batched steps from merged weights (infer/merged_weights.py) against the model's own modules.

On a CPU the merged step runs in fp32, through the same pieces a GPU captures as graphs. W·x + s·B(A·x) and
(W + s·B·A)·x differ only in fp32 rounding (a few ulps per dot product of 64-96 terms), so the logits agree
to ~1e-6 relative; 1e-5 of the logits' scale leaves room for that and would still catch a wrong scale, a
missing bias or another adapter's delta (each moves logits by ~1e-1 here).
"""

from __future__ import annotations

import logging

import pytest
import torch

from loraforge.infer import merged_weights
from loraforge.infer.fast_decode import FastDecoder, left_padded

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny(*, bias: bool = False, adapters: tuple[str, ...] = ("x",)):
    """A 2-layer random Llama (GQA) with LoRA adapters on every projection, B non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.25,
                      attention_bias=bias, mlp_bias=bias)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    if bias:
        with torch.no_grad():  # transformers zeroes linear biases at init: make them count
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL, lora_bias=bias)
    model = get_peft_model(model, LoraConfig(**lora), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, LoraConfig(**lora))
    with torch.no_grad():
        for i, name in enumerate(adapters):
            g = torch.Generator().manual_seed(10 + i)
            for n, p in model.named_parameters():
                if f"lora_B.{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.set_adapter(adapters[0])
    return model.eval()


def _batch(lengths: list[int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return left_padded([torch.randint(3, 211, (n,), generator=g).tolist() for n in lengths], 0)


def _decode(dec: FastDecoder, ids, mask, new: int, key: object = "x") -> list[list[int]]:
    steps = list(dec.stream(ids, mask, new, key=key))
    return [list(col) for col in zip(*steps, strict=True)]


def _stock(model, ids, mask, new: int) -> list[list[int]]:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def _merged_and_modules(model, ids, mask, new: int) -> tuple[dict[bool, list], dict[bool, list]]:
    """(tokens, per-step logits) of the batch decoded from merged weights (True) and through the model's own
    modules (False); checks each decoder used the weights it was asked to."""
    traces, tokens = {}, {}
    for merged in (True, False):
        dec = FastDecoder(model, max_rows=4, merged_batches=merged)
        dec.keep_logits = True
        tokens[merged] = _decode(dec, ids, mask, new)
        traces[merged] = dec.trace
        assert bool(dec._merged) == merged
    return tokens, traces


@pytest.mark.parametrize("bias", [False, True])
def test_merged_batch_logits_match_the_modules_step(bias: bool) -> None:
    """Every step's logits of a padded 3-row batch, merged against the model's own LoRA modules (with biases:
    q/k/v/o and MLP biases and peft's lora_bias, which the adapter's forward scales)."""
    model = _tiny(bias=bias)
    ids, mask = _batch([9, 4, 7])
    tokens, traces = _merged_and_modules(model, ids, mask, 12)
    assert tokens[True] == tokens[False]
    assert len(traces[True]) == 12
    for got, ref in zip(traces[True][1:], traces[False][1:], strict=True):  # [0] is the prefill, shared
        scale = ref.abs().max()
        assert (got - ref).abs().max() <= 1e-5 * scale, float((got - ref).abs().max() / scale)
    # ...and the merged copy is what makes them differ at all (not a step that ignores it)
    assert any(not torch.equal(a, b) for a, b in zip(traces[True][1:], traces[False][1:], strict=True))


def test_merged_batch_tokens_equal_the_exact_path_and_one_row_stays_stock() -> None:
    model = _tiny()
    ids, mask = _batch([10, 3, 6, 10], seed=2)
    exact = FastDecoder(model, max_rows=4, merged_batches=False)
    dec = FastDecoder(model, max_rows=4)  # auto: a CPU always merges
    assert _decode(dec, ids, mask, 20) == _decode(exact, ids, mask, 20) == _stock(model, ids, mask, 20)
    assert list(dec._merged) == ["x"] and not exact._merged
    # One row runs the modules (no merged step set), bit-identical to generate
    one, one_mask = _batch([9], seed=3)
    assert _decode(dec, one, one_mask, 20) == _stock(model, one, one_mask, 20)
    assert all(not merged for (_, rows, _, merged) in dec._sets if rows == 1)
    assert any(merged for (_, rows, _, merged) in dec._sets if rows > 1)


def _continuous(dec: FastDecoder, steps: int) -> tuple[dict, list[torch.Tensor]]:
    """Rows joining a running batch with prompts of other lengths, one leaving: {owner: tokens}, and each
    step's logits."""
    dec.keep_logits = True
    got: dict = {}
    ids, mask = _batch([9, 4], seed=4)
    for owner, tok in zip("ab", dec.join(ids, mask, ["a", "b"], [steps] * 2), strict=True):
        got[owner] = [tok]
    for i in range(steps):
        if i == 3:  # longer prompts than the batch's history: the rows move right
            ids, mask = _batch([14, 6], seed=5)
            for owner, tok in zip("cd", dec.join(ids, mask, ["c", "d"], [steps] * 2), strict=True):
                got[owner] = [tok]
        if i == 6:
            dec.leave("b")
        for step in dec.step():
            for owner, tok in step:
                got[owner].append(tok)
    for step in dec.drain():
        for owner, tok in step:
            got[owner].append(tok)
    return got, dec.trace


def test_whole_step_attention_over_every_column_decodes_the_same() -> None:
    """`whole_step`: attention over a bucket of columns (64 here, of a 256-column cache, beyond the columns
    written so far) with a mask made from `slot` on the device gives the pieces' logits (masked columns add
    exact zeros; only the sums' order may differ) and tokens, while rows join with longer prompts and leave."""
    model = _tiny()
    decs = {whole: FastDecoder(model, max_rows=4, whole_step=whole) for whole in (False, True)}
    (tokens, trace), (tokens_w, trace_w) = (_continuous(decs[whole], 10) for whole in (False, True))
    assert [(st.whole, st.width) for st in decs[True]._sets.values()] == [(True, 64)] * len(decs[True]._sets)
    assert decs[True].cache_len == 256 and decs[True]._bucket_widths(next(iter(decs[True]._sets.values()))) == [
        64, 128, 192, 256]
    assert not any(st.whole for st in decs[False]._sets.values())
    assert tokens_w == tokens and len(tokens["c"]) == 11 - 3
    assert len(trace_w) == len(trace) >= 8
    for got, ref in zip(trace_w, trace, strict=True):
        assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_adapter_switch_builds_the_new_keys_weights() -> None:
    """Rows of adapter y after rows of x: y's merged copy is built and y's tokens come out (the exact
    path's for y, not x's); with room for one key, x's copy and the step sets that used it are dropped."""
    model = _tiny(adapters=("x", "y"))
    ids, mask = _batch([8, 5, 8], seed=4)
    exact = FastDecoder(model, max_rows=4, merged_batches=False)
    dec = FastDecoder(model, max_rows=4)
    dec.max_merged_keys = 1
    out = {}
    for name in ("x", "y"):
        model.set_adapter(name)
        out[name] = _decode(dec, ids, mask, 16, key=name)
        assert out[name] == _decode(exact, ids, mask, 16, key=name), name
        assert list(dec._merged) == [name]
        assert {k for k, _, _, merged in dec._sets if merged} == {name}
    assert out["x"] != out["y"]
    # Two keys fit by default: switching back and forth keeps both copies
    dec.max_merged_keys = 2
    model.set_adapter("x")
    kept = dec._merged["y"]
    assert _decode(dec, ids, mask, 16, key="x") == out["x"]
    assert set(dec._merged) == {"x", "y"} and dec._merged["y"] is kept
    dec.release_merged()
    assert not dec._merged and not any(merged for *_, merged in dec._sets)


def test_memory_guard_refusal_keeps_the_modules_for_batches(monkeypatch, caplog) -> None:
    """Free memory too small for the copy: batches run the model's own modules (the old behaviour, so the
    exact path's tokens) and the reason is logged once; merged_batches=True builds regardless."""
    model = _tiny()
    size = merged_weights.merged_size(FastDecoder(model).layers, torch.float32)
    monkeypatch.setattr(merged_weights, "free_memory", lambda device: 2 * size)  # the copy needs <= 1/3
    ids, mask = _batch([7, 7, 4], seed=5)
    exact = FastDecoder(model, max_rows=4, merged_batches=False)
    dec = FastDecoder(model, max_rows=4)
    with caplog.at_level(logging.WARNING, logger="loraforge.infer.fast_decode"):
        for _ in range(2):
            assert _decode(dec, ids, mask, 10) == _decode(exact, ids, mask, 10)
    assert not dec._merged and "1/3" in dec._unmerged["x"]
    assert sum("not merged weights" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(merged_weights, "free_memory", lambda device: 3 * size)  # exactly 1/3: fits
    dec = FastDecoder(model, max_rows=4)
    _decode(dec, ids, mask, 3)
    assert list(dec._merged) == ["x"]
    forced = FastDecoder(model, max_rows=4, merged_batches=True)
    monkeypatch.setattr(merged_weights, "free_memory", lambda device: 0)
    _decode(forced, ids, mask, 3)
    assert list(forced._merged) == ["x"]


def test_merged_projection_is_what_the_lora_layer_computes() -> None:
    """One merged (weight, bias) per projection gives the LoRA layer's output, and q/k/v, gate/up are stacked
    in that order with the split sizes the decoder uses."""
    model = _tiny(bias=True)
    layer = FastDecoder(model).layers[1]
    x = torch.randn(3, 1, 64)
    with torch.no_grad():
        for proj in (layer.self_attn.k_proj, layer.mlp.down_proj):
            w, b = merged_weights.merged_projection(proj, torch.float32)
            xin = x if proj.in_features == 64 else torch.randn(3, 1, proj.in_features)
            torch.testing.assert_close(torch.nn.functional.linear(xin, w, b), proj(xin), rtol=1e-5, atol=1e-5)
        m = merged_weights.build([layer], torch.float32).layers[0]
        q, k, v = torch.nn.functional.linear(x, m.qkv, m.qkv_bias).split(m.qkv_split, dim=-1)
        assert m.qkv_split == (64, 32, 32)
        torch.testing.assert_close(v, layer.self_attn.v_proj(x), rtol=1e-5, atol=1e-5)
        gate, up = torch.nn.functional.linear(x, m.gate_up, m.gate_up_bias).split(m.intermediate, dim=-1)
        torch.testing.assert_close(up, layer.mlp.up_proj(x), rtol=1e-5, atol=1e-5)


def test_merged_batch_from_an_nf4_base_matches_the_qlora_modules() -> None:
    """A QLoRA layout (bitsandbytes NF4 base under peft's Linear4bit LoRA wrapper): the merged copy is the
    dequantized NF4 weight + the delta, so its logits are the QLoRA modules' up to fp32 rounding. bitsandbytes'
    CPU kernel repacks the weight on its first forward (a layout dequantize_4bit does not read; a GPU never
    repacks), so it is turned off here, and the decoder refuses to merge a repacked weight."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False,
                      initializer_range=0.25)  # in_features multiples of bitsandbytes' 64-value blocks
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    for layer in model.model.layers:
        for parent, name in [(layer.self_attn, n) for n in ALL[:4]] + [(layer.mlp, n) for n in ALL[4:]]:
            lin = getattr(parent, name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
            q = q.to("cpu")  # quantizes (bitsandbytes does it when the parameter moves)
            q.support_avx512bf16_for_cpu = False
            setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # what from_pretrained sets: peft then wraps with its bnb Linear4bit
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ALL),
                           adapter_name="x")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.eval()
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids, mask = _batch([8, 5, 8], seed=6)
    tokens, traces = _merged_and_modules(model, ids, mask, 8)
    assert tokens[True] == tokens[False]
    for got, ref in zip(traces[True][1:], traces[False][1:], strict=True):
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    layers = list(model.base_model.model.model.layers)
    weight = layers[0].self_attn.q_proj.get_base_layer().weight
    weight.quant_state.packing_format_for_cpu = True  # as bitsandbytes marks a repacked weight
    with pytest.raises(merged_weights.Unmergeable, match="repacked"):
        merged_weights.merged_size(layers, torch.float32)
    weight.quant_state.packing_format_for_cpu = False
