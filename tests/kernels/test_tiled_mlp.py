"""The tiled MLP of long-context runs (kernels/lora.TiledMLP, patch.tile_mlps; float64 on the CPU): the same
outputs and gradients as the whole MLP, the same dropout masks in its recompute, and only X saved."""

import pytest
import torch

from loraforge.kernels.dropout import dropped
from loraforge.kernels.frozen import FrozenWeight
from loraforge.kernels.lora import lora_mlp, tiled_mlp

D = torch.float64


def _p(*shape):
    return torch.randn(*shape, dtype=D, requires_grad=True)


def _mlp():
    torch.manual_seed(1)
    ws = [FrozenWeight(torch.randn(*s, dtype=D), D) for s in ((7, 6), (7, 6), (6, 7))]
    ab = [_p(2, 6), _p(7, 2), None, None, _p(3, 7), _p(6, 3)]  # up has no LoRA
    return ws, (2.0, 0.0, 0.7), ab


def _grads(out, dy, inputs):
    return torch.autograd.grad(out, inputs, dy)


def test_tiles_compute_what_the_whole_mlp_computes():
    ws, scales, ab = _mlp()
    x = _p(2, 11, 6)
    dy = torch.randn(2, 11, 6, dtype=D)
    live = [x, *(p for p in ab if p is not None)]
    whole = lora_mlp(x, ws, scales, ab)
    want = _grads(whole, dy, live)
    for tile in (3, 4, 22, 100):  # uneven last tile, one tile, a tile larger than the input
        tiled = tiled_mlp(x, tile, ws, scales, ab)
        torch.testing.assert_close(tiled, whole)
        for a, b in zip(_grads(tiled, dy, live), want, strict=True):
            torch.testing.assert_close(a, b)
    torch.autograd.gradcheck(lambda x, *p: tiled_mlp(x, 4, ws, scales, [p[0], p[1], None, None, p[2], p[3]]),
                             (x, *(p for p in ab if p is not None)))


def test_each_tile_keeps_its_dropout_masks_in_the_recompute():
    ws, scales, ab = _mlp()
    ps = (0.3, 0.0, 0.5)
    x = _p(1, 10, 6)
    torch.manual_seed(5)
    tiled = tiled_mlp(x, 4, ws, scales, ab, ps)
    torch.manual_seed(5)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # what draw_seed drew for the call
    # tile k uses the call's seed and salts 3k (gate), 3k+2 (down), as the whole MLP's call 0 uses 0 and 2
    pieces = []
    for k, lo in enumerate(range(0, 10, 4)):
        xk = x[0, lo:lo + 4]
        e = xk @ ws[0].weight.t() + 2.0 * (dropped(xk, seed, 3 * k, 0.3) @ ab[0].t()) @ ab[1].t()
        h = torch.nn.functional.silu(e) * (xk @ ws[1].weight.t())
        pieces.append(h @ ws[2].weight.t() + 0.7 * (dropped(h, seed, 3 * k + 2, 0.5) @ ab[4].t()) @ ab[5].t())
    ref = torch.cat(pieces)[None]
    torch.testing.assert_close(tiled, ref)
    dy = torch.randn_like(ref)
    live = [x, ab[0], ab[1], ab[4], ab[5]]
    for a, b in zip(_grads(tiled, dy, live), _grads(ref, dy, live), strict=True):
        torch.testing.assert_close(a, b)


def test_only_the_input_is_saved():
    ws, scales, ab = _mlp()
    x = _p(1, 64, 6)
    def saved_numel(fn) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return sum(sizes)

    saved = {"whole": saved_numel(lambda: lora_mlp(x, ws, scales, ab)),
             "tiled": saved_numel(lambda: tiled_mlp(x, 8, ws, scales, ab))}
    # the whole MLP keeps e and g (64 x 7 each) besides X; the tiles keep X and the LoRA weights only
    assert saved["tiled"] == 64 * 6 + sum(p.numel() for p in ab if p is not None)
    assert saved["whole"] >= saved["tiled"] + 2 * 64 * 7


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    from loraforge.bench.models import make_checkpoint

    return make_checkpoint("tiny", root=str(tmp_path_factory.mktemp("ckpt")), device="cpu")


def test_a_patched_model_tiles_long_inputs_and_trains_the_same(ckpt):
    from tinymodels import lm_batch

    from loraforge.bench.models import build_model, compare, sync_lora
    from loraforge.kernels import patch_model
    from loraforge.kernels.patch import tile_mlps

    whole, tiled = (build_model(ckpt, 8, "all", stock=False, device="cpu") for _ in range(2))
    for m in (whole, tiled):
        patch_model(m, allow_cpu=True)
    assert tile_mlps(tiled, 8) == 2  # both layers
    sync_lora(whole, tiled)
    calls = []
    import loraforge.kernels.lora as lora

    real = lora.TiledMLP.apply
    lora.TiledMLP.apply = lambda *a: calls.append(a[1]) or real(*a)
    try:
        res = compare(whole, tiled, lm_batch(whole.config.vocab_size, 2, 24))
    finally:
        lora.TiledMLP.apply = real
    assert calls and set(calls) == {8}  # 48 tokens > 2 x 8: tiled, in the forward and the recompute
    assert res["loss_rel_diff"] < 1e-3 and res["max_rel_grad_diff"] < 2e-2, res


def test_dora_mlps_are_not_tiled(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from tinymodels import make_tiny_model
    from transformers import AutoModelForCausalLM

    from loraforge.kernels import patch_model
    from loraforge.kernels.patch import tile_mlps

    counts = {}
    for arch, dora in (("llama3", False), ("llama3", True)):
        m = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / f"{arch}{dora}", arch), dtype=torch.float32)
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora,
                                         task_type="CAUSAL_LM"))
        assert patch_model(m, allow_cpu=True)["mlp"] == 2
        counts[(arch, dora)] = tile_mlps(m, 8)
    assert counts == {("llama3", False): 2, ("llama3", True): 0}
