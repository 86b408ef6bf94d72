"""Float64 checks of the hand-written autograd in loraforge.kernels (pure-PyTorch paths, CPU)."""

import pytest
import torch

from loraforge.kernels.cross_entropy import causal_lm_loss
from loraforge.kernels.frozen import FrozenWeight
from loraforge.kernels.lora import lora_linears, lora_mlp
from loraforge.kernels.norm import rms_norm

D = torch.float64


def _p(*shape):
    return torch.randn(*shape, dtype=D, requires_grad=True)


def test_lora_linears_gradcheck():
    torch.manual_seed(0)
    x = _p(2, 3, 6)
    ws = [FrozenWeight(torch.randn(o, 6, dtype=D), D) for o in (5, 4, 4)]
    ab = [_p(2, 6), _p(5, 2), None, None, _p(3, 6), _p(4, 3)]  # k has no LoRA
    scales = (2.0, 0.0, 0.5)
    torch.autograd.gradcheck(lambda x, *ab: lora_linears(x, ws, scales, list(ab)),
                             (x, *ab))


def test_lora_mlp_gradcheck_and_matches_reference():
    torch.manual_seed(1)
    x = _p(2, 3, 6)
    wg, wu, wd = torch.randn(7, 6, dtype=D), torch.randn(7, 6, dtype=D), torch.randn(6, 7, dtype=D)
    ws = [FrozenWeight(w, D) for w in (wg, wu, wd)]
    ab = [_p(2, 6), _p(7, 2), _p(2, 6), _p(7, 2), None, None]
    scales = (2.0, 1.5, 0.0)
    torch.autograd.gradcheck(lambda x, *ab: lora_mlp(x, ws, scales, list(ab)), (x, *ab))

    def ref(x, ag, bg, au, bu):
        e = x @ wg.t() + 2.0 * (x @ ag.t()) @ bg.t()
        g = x @ wu.t() + 1.5 * (x @ au.t()) @ bu.t()
        return (torch.nn.functional.silu(e) * g) @ wd.t()

    out = lora_mlp(x, ws, scales, ab)
    torch.testing.assert_close(out, ref(x, *ab[:4]))


def test_lora_mlp_down_lora_grads():
    torch.manual_seed(2)
    x = _p(4, 6)
    ws = [FrozenWeight(torch.randn(*s, dtype=D), D) for s in ((7, 6), (7, 6), (6, 7))]
    ab = [None, None, None, None, _p(3, 7), _p(6, 3)]
    torch.autograd.gradcheck(lambda x, a, b: lora_mlp(x, ws, (0, 0, 0.7), [None] * 4 + [a, b]),
                             (x, ab[4], ab[5]))


def test_rmsnorm_matches_transformers_and_gradcheck():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(3)
    x = _p(2, 5, 8)
    norm = LlamaRMSNorm(8, eps=1e-6).to(D)
    with torch.no_grad():
        norm.weight.normal_()
    norm.weight.requires_grad_(False)
    torch.testing.assert_close(rms_norm(x, norm.weight, 1e-6), norm(x))
    torch.autograd.gradcheck(lambda x: rms_norm(x, norm.weight, 1e-6), (x,))


@pytest.mark.parametrize("num_items", [None, 7])
def test_linear_cross_entropy_matches_stock(num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(4)
    h = _p(2, 6, 8)
    w = torch.randn(11, 8, dtype=D)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :2] = -100
    for chunk_bytes in (4 * 11 * 1, 4 * 11 * 5, 1 << 20):  # 1-row, 5-row and single chunks
        loss = causal_lm_loss(h, w, labels, num_items_in_batch=num_items, chunk_bytes=chunk_bytes, min_rows=1)
        ref = ForCausalLMLoss(h @ w.t(), labels, 11, num_items_in_batch=num_items)
        # transformers computes this loss in fp32 (logits.float()): compare at fp32 tolerance
        torch.testing.assert_close(loss.float(), ref.float())
        g, = torch.autograd.grad(loss * 3, h)
        gr, = torch.autograd.grad(ref * 3, h)
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-6)


def test_nf4_reference_dequant_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from loraforge.kernels.frozen import nf4_dequant_reference

    torch.manual_seed(5)
    w = torch.randn(96, 512, dtype=torch.bfloat16)
    for nested in (True, False):
        q, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
        torch.testing.assert_close(nf4_dequant_reference(q, qs), bnbf.dequantize_4bit(q, qs),
                                   rtol=0, atol=0)


def test_rope_matches_transformers_and_gradcheck():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from loraforge.kernels.rope import apply_rope

    torch.manual_seed(2)
    b, s, hq, hk, d = 2, 5, 4, 2, 8
    q, k = _p(b, s, hq, d), _p(b, s, hk, d)
    ang = torch.randn(b, s, d // 2, dtype=D)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rq, rk = apply_rope(q, k, cos, sin)
    tq, tk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    torch.testing.assert_close(rq.transpose(1, 2), tq)
    torch.testing.assert_close(rk.transpose(1, 2), tk)
    torch.autograd.gradcheck(lambda q, k: apply_rope(q, k, cos, sin), (q, k))
    # cos/sin shared by the batch ([1, S, D]) broadcast the same way
    r1 = apply_rope(q, k, cos[:1], sin[:1])
    t1 = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos[:1], sin[:1])
    torch.testing.assert_close(r1[0].transpose(1, 2), t1[0])
