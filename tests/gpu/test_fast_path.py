"""The fast path on CUDA matches the stock peft/bitsandbytes path (tiny Llama, NF4 + double quant)."""

import pytest
import torch
from tinymodels import lm_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from loraforge.bench.models import make_checkpoint

    return make_checkpoint("tiny", root=str(tmp_path_factory.mktemp("ckpt")), device="cuda")


def _batch(vocab, pad):
    return lm_batch(vocab, 3, 96, pad_from=70 if pad else None, unlabeled_prefix=9 if pad else 0, device="cuda")


@pytest.mark.parametrize("r,targets,pad", [(16, "all", False), (8, "qv", True)])
def test_fast_path_matches_stock(ckpt, r, targets, pad):
    from loraforge.bench.models import build_model, compare, sync_lora
    from loraforge.kernels import is_supported, patch_model

    stock = build_model(ckpt, r, targets, stock=True)
    fast = build_model(ckpt, r, targets, stock=False)
    assert is_supported(fast) == (True, "ok")
    s = patch_model(fast)
    assert s["patched"] and s["mlp"] == 2 and s["attention"] == 2 and not s["skipped"], s
    assert all(v.startswith("on") for v in s["triton"].values()), s["triton"]
    sync_lora(stock, fast)
    res = compare(stock, fast, _batch(stock.config.vocab_size, pad))
    assert res["loss_rel_diff"] < 1e-2, res
    assert res["max_rel_grad_diff"] < 5e-2, res


def test_triton_dequant_is_bit_exact():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from loraforge.kernels import _triton
    from loraforge.kernels.frozen import nf4_dequant_reference

    # Seeds 4 and 5 drew matrices where a fused multiply-add on the nested scale differed by one bf16 step.
    for seed in range(8):
        torch.manual_seed(seed)
        w = torch.randn(1000, 4096, device="cuda", dtype=torch.bfloat16)
        for nested in (True, False):
            q, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
            ref = bnbf.dequantize_4bit(q, qs)
            assert torch.equal(_triton.nf4_dequant(q, qs, torch.bfloat16), ref), (seed, nested)
            assert torch.equal(nf4_dequant_reference(q, qs), ref), (seed, nested)


def test_triton_elementwise_match_torch():
    from loraforge.kernels import _triton
    from loraforge.kernels.norm import _rmsnorm_bwd_torch, _rmsnorm_fwd_torch

    x = torch.randn(513, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    y, r = _triton.rmsnorm_fwd(x, w, 1e-5)
    y2, r2 = _rmsnorm_fwd_torch(x, w, 1e-5)
    torch.testing.assert_close(y, y2, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(r, r2)
    torch.testing.assert_close(_triton.rmsnorm_bwd(dy, x, w, r), _rmsnorm_bwd_torch(dy, x, w, r2),
                               rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("pad", [False, True])
def test_cuda_graphs_match_eager_fast_path_and_stock(ckpt, pad):
    """Real CUDA graphs (captured on the second sighting of a shape) against the eager fast path
    (same kernels, ordinary checkpointing) and against the stock stack, over steps with an optimizer."""
    from loraforge.bench.models import build_model, compare, lora_params, sync_lora
    from loraforge.kernels import patch_model
    from loraforge.kernels.graphs import enable_graphed_layers

    stock = build_model(ckpt, 16, "all", stock=True)
    eager = build_model(ckpt, 16, "all", stock=False)
    graphed = build_model(ckpt, 16, "all", stock=False)
    for m in (eager, graphed):
        assert patch_model(m)["patched"]
    runner = enable_graphed_layers(graphed)
    sync_lora(eager, graphed)
    batch = _batch(eager.config.vocab_size, pad)
    opts = {id(m): torch.optim.AdamW(list(lora_params(m).values()), lr=1e-3) for m in (eager, graphed)}
    losses = {id(m): [] for m in (eager, graphed)}
    alive = {}
    for _ in range(4):  # step 1 eager, step 2 captures, steps 3-4 replay
        for m in (eager, graphed):
            # the previous step's loss (and so its autograd graph) is still referenced, as in a
            # training loop's `loss` variable: capture must not depend on its AccumulateGrad nodes
            loss = m(**batch).loss
            loss.backward()
            opts[id(m)].step()
            opts[id(m)].zero_grad(set_to_none=True)
            losses[id(m)].append(float(loss.detach()))
            alive[id(m)] = loss
    s = runner.summary()
    assert s["captured"] == 2 and s["replays"] >= 8 and not s["disabled"], s
    torch.testing.assert_close(losses[id(graphed)], losses[id(eager)], rtol=2e-3, atol=0)
    sync_lora(eager, graphed)
    res = compare(eager, graphed, batch)  # graphed replays here: same weights, one step's grads
    assert res["max_rel_grad_diff"] < 1e-2, res
    sync_lora(stock, graphed)
    res = compare(stock, graphed, batch)
    assert res["loss_rel_diff"] < 1e-2 and res["max_rel_grad_diff"] < 5e-2, res


def test_triton_rope_matches_torch_twin():
    from loraforge.kernels import _triton
    from loraforge.kernels.rope import _rope_torch

    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(3, 50, 8, 128, device="cuda", generator=g).to(torch.bfloat16)
    ang = torch.randn(3, 50, 64, device="cuda", generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(torch.bfloat16), torch.cat([ang.sin()] * 2, -1).to(torch.bfloat16)
    for inv in (False, True):
        for c, s in ((cos, sin), (cos[:1].contiguous(), sin[:1].contiguous())):
            a, b = _triton.rope(x, c, s, inv), _rope_torch(x, c, s, inv)
            assert (a.float() - b.float()).abs().max() <= 1e-2, (inv, c.shape)


def test_packed_rows_take_varlen_attention_under_graphs(ckpt):
    """Packed rows with their offsets (kernels/packed.py): flash varlen attention, captured in the layer
    graphs, computes what transformers' block-diagonal mask computes, and no mask is built."""
    from loraforge.bench.models import build_model, one_step_grads, sync_lora
    from loraforge.data.collate import PadCollator
    from loraforge.data.packing import boundaries, pack_examples
    from loraforge.kernels import patch_model
    from loraforge.kernels.graphs import enable_graphed_layers
    from loraforge.kernels.packed import BOUNDARIES_KEY

    masked = build_model(ckpt, 16, "all", stock=False)
    graphed = build_model(ckpt, 16, "all", stock=False)
    for m in (masked, graphed):
        s = patch_model(m)
        assert s["packed_attention"].startswith("on"), s["packed_attention"]
    runner = enable_graphed_layers(graphed)
    sync_lora(masked, graphed)
    g = torch.Generator().manual_seed(3)

    def example(n):
        ids = torch.randint(0, masked.config.vocab_size, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": ids}

    rows = [pack_examples([example(n) for n in row]) for row in ([30, 50, 16], [90, 6], [40] * 3)]
    batch = {k: v.cuda() for k, v in PadCollator(0, 128)(rows).items()}
    with_cu = batch | {BOUNDARIES_KEY: boundaries(batch["position_ids"].cpu()).cuda()}
    loss, grads = one_step_grads(masked, batch)
    for _ in range(3):  # eager, capture, replay
        loss2, grads2 = one_step_grads(graphed, with_cu)
    assert runner.summary()["replays"] >= 2 and not runner.summary()["disabled"], runner.summary()
    assert abs(loss2 - loss) < 1e-2 * abs(loss)
    for name, gm in grads.items():
        assert (grads2[name] - gm).norm() <= 5e-2 * gm.norm(), name


def test_unpacked_rows_laid_end_to_end_train_as_padded_rows(ckpt):
    """`padding_free` (what the trainer feeds the fast path for unpacked data): the rows' real tokens in one
    row, padded to a bucket, with their offsets, under the layer graphs — the loss and gradients of the same
    rows right-padded with their mask."""
    from loraforge.bench.models import build_model, one_step_grads, sync_lora
    from loraforge.data.collate import PadCollator
    from loraforge.data.packing import boundaries, padding_free
    from loraforge.kernels import patch_model
    from loraforge.kernels.graphs import enable_graphed_layers
    from loraforge.kernels.packed import BOUNDARIES_KEY

    padded = build_model(ckpt, 16, "all", stock=False)
    flat = build_model(ckpt, 16, "all", stock=False)
    for m in (padded, flat):
        assert patch_model(m)["packed_attention"].startswith("on")
    runner = enable_graphed_layers(flat)
    sync_lora(padded, flat)
    g = torch.Generator().manual_seed(4)
    examples = []
    for n in (30, 90, 6, 41):
        ids = torch.randint(0, padded.config.vocab_size, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    batch = PadCollator(0, 128)(examples)
    one = padding_free(batch, 0, 1024)
    assert one["input_ids"].shape == (1, 256)
    one[BOUNDARIES_KEY] = boundaries(one["position_ids"])
    loss, grads = one_step_grads(padded, {k: v.cuda() for k, v in batch.items()})
    for _ in range(3):  # eager, capture, replay
        loss2, grads2 = one_step_grads(flat, {k: v.cuda() for k, v in one.items()})
    assert runner.summary()["replays"] >= 2 and not runner.summary()["disabled"], runner.summary()
    assert abs(loss2 - loss) < 1e-2 * abs(loss)
    for name, gm in grads.items():
        assert (grads2[name] - gm).norm() <= 5e-2 * gm.norm(), name
