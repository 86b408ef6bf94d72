"""FastDecoder with CUDA graphs on a GPU: bf16 greedy tokens equal stock `generate`'s, row for row.

The CPU tests (tests/infer/test_fast_decoder.py) run the same pieces eagerly; here they are captured and
replayed, with attention run eagerly between the graphs. bf16 makes any change of kernel or reduction
order visible in a few dozen tokens of a random model with peaked attention, so equality here means the
graphs replay exactly stock's kernels.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(lora: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                      eos_token_id=None, initializer_range=0.1, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    return _with_lora(model) if lora else model


def _with_lora(model):
    """A LoRA adapter on every linear layer, with B non-zero so that it changes the output."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("lora,lengths", [(False, [40]), (False, [40, 17, 33, 40]), (True, [25, 25, 9])])
def test_graphed_greedy_equals_stock_generate(lora, lengths):
    from loraforge.infer.fast_decode import FastDecoder, left_padded

    model = _model(lora)
    g = torch.Generator().manual_seed(3)
    ids, mask = left_padded([torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths], 0)
    width = ids.shape[1]
    new = 48
    with torch.no_grad():
        ref = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new,
                             do_sample=False, pad_token_id=0)[:, width:].tolist()
    dec = FastDecoder(model, max_rows=4, merged_batches=False)  # batches through the model's own modules
    assert dec.graphs and dec.fused["norm"] is not None and dec.fused["silu_mul"] is not None, dec.fused
    for _ in range(2):  # the first call captures, the second replays the captured graphs
        steps = list(dec.stream(ids, mask, new, key="k"))
        got = [list(c) for c in zip(*steps, strict=True)]
        assert got == ref
    assert dec.captures == 1


def test_decode_kernels_reproduce_eager_bit_for_bit():
    """Every kernel is eager's bit for bit, but norm_one (merged batches) which is within a rounding."""
    from loraforge.infer.decode import DETAIL, self_check

    found = self_check("cuda")
    assert all(v is not None for v in found.values()), (found, DETAIL)


def test_graphed_greedy_equals_stock_generate_on_a_4bit_base(tmp_path):
    """A QLoRA run served as trained: NF4 base (bitsandbytes) + LoRA. The graphs must capture bitsandbytes'
    kernels, or the decoder must fall back to eager pieces; either way the tokens are stock's."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraforge.infer.fast_decode import FastDecoder

    _model(False).save_pretrained(tmp_path / "m")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0}).eval()
    model.generation_config.eos_token_id = None
    model = _with_lora(model)
    for lengths in ([30], [30, 12, 30]):
        width = max(lengths)
        g = torch.Generator().manual_seed(5)
        ids = torch.zeros(len(lengths), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            ids[i, width - n:] = torch.randint(3, 1024, (n,), generator=g)
            mask[i, width - n:] = 1
        with torch.no_grad():
            ref = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=32,
                                 do_sample=False, pad_token_id=0)[:, width:].tolist()
        dec = FastDecoder(model, max_rows=4, merged_batches=False)
        got = [list(c) for c in zip(*dec.stream(ids, mask, 32), strict=True)]
        assert got == ref, (lengths, dec.graphs)
    # Batches from merged weights (the default): the captured graphs compute what the same pieces do eagerly,
    # in pieces and as one graph a step (`whole_step`: attention over every cache column, masked on the device).
    for whole in (False, True):
        merged = {}
        for graphs in (True, False):
            dec = FastDecoder(model, max_rows=4, graphs=graphs, whole_step=whole)
            merged[graphs] = [list(c) for c in zip(*dec.stream(ids, mask, 32, key="k"), strict=True)]
            assert dec._merged, "the batch did not decode from merged weights"
            assert all(st.whole == whole for st in dec._sets.values() if st.merged is not None)
            assert not graphs or all(
                len(st.graphs) == (len(dec._bucket_widths(st)) if st.whole else 1 + len(dec.layers))
                for st in dec._sets.values())
        assert merged[True] == merged[False], whole


def test_merged_batches_one_kernel_norm_is_within_rounding_of_eager():
    """Merged batches take the residual add and RMSNorm in one kernel (its own sum of squares): the first
    decode step's logits stay within bf16 rounding of the three exact kernels', and the tokens match."""
    from loraforge.infer.fast_decode import FastDecoder, left_padded

    model = _model(True)
    g = torch.Generator().manual_seed(4)
    ids, mask = left_padded([torch.randint(3, 1024, (n,), generator=g).tolist() for n in (25, 25, 9)], 0)
    logits, tokens = {}, {}
    for one in (True, False):
        dec = FastDecoder(model, max_rows=4)
        assert dec.fused["norm_one"] is not None, dec.fused
        if not one:
            dec.fused["norm_one"] = None
        dec.keep_logits = True
        tokens[one] = list(dec.stream(ids, mask, 2, key="k"))
        assert dec._merged, "the batch did not decode from merged weights"
        logits[one] = dec.trace[1]  # the first decode step (trace[0] is the prefill's)
    diff = (logits[True] - logits[False]).abs()
    assert float(diff.max()) < 0.03 * float(logits[False].abs().max()), float(diff.max())
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("attention", ["stock", "no-plans"])
def test_rows_joining_mid_flight_replay_what_eager_pieces_compute(attention):
    """Continuous batching with graphs: rows join while others decode (the row count crosses the 1, 2 and
    4 buckets, so sets are captured mid-flight, which must leave the live rows' cache untouched), a long
    prompt shifts the rows right, a full cache drops its oldest columns. Replayed graphs and the same
    pieces run eagerly give the same tokens, row for row; each row's first token is stock's."""
    from tinymodels import run_rows

    from loraforge.infer.fast_decode import FastDecoder

    model = _model(False)
    g = torch.Generator().manual_seed(9)

    def prompt(n):
        return torch.randint(3, 1024, (n,), generator=g).tolist()

    plan = {0: [("a", prompt(20), 24)], 3: [("b", prompt(9), 40)], 6: [("c", prompt(70), 12)],
            9: [("d", prompt(5), 30)], 30: [("e", prompt(11), 20)], 34: [("f", prompt(40), 30)]}
    runs = {}
    for graphs in (True, False):
        # whole_step as the graphs have it by default: eagerly it attends to the same buckets of columns
        dec = FastDecoder(model, max_rows=4, graphs=graphs, min_cache=128, bucket_rows=True, attention=attention,
                          whole_step=True)
        runs[graphs] = run_rows(dec, plan, steps=70)
        assert dec.active() == 0
    assert runs[True] == runs[False]
    assert dec.cache_len == 128
    # Sets captured ahead of traffic (what the server does at start) are the ones the steps then use.
    warm = FastDecoder(model, max_rows=4, min_cache=128, bucket_rows=True, attention=attention)
    warm.warm_up(key="a")
    assert warm.captures == 3  # 1, 2 and 4 rows
    assert run_rows(warm, plan, steps=70) == runs[True]
    assert warm.captures == 3
    for name, p, new in [r for rows in plan.values() for r in rows]:
        assert len(runs[True][name]) == new
        with torch.no_grad():
            first = model.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=1, do_sample=False,
                                   pad_token_id=0)[0, -1].item()
        assert runs[True][name][0] == first
