"""LoRA dropout inside the fused nodes (kernels/dropout.py, kernels/lora.py): the mask, the gradients, and
CUDA-graph replays that see the forward's masks again (emulated on the CPU; the tests marked `cuda`
at the end replay real graphs and check the Triton kernel, and are skipped without a GPU)."""

import os

import pytest
import torch

from loraforge.kernels import _triton
from loraforge.kernels.dropout import _threshold, draw_seed, dropped, keep_mask, seeds_from
from loraforge.kernels.frozen import FrozenWeight
from loraforge.kernels.lora import lora_linears, lora_mlp

D = torch.float64


def _p(*shape):
    return torch.randn(*shape, dtype=D, requires_grad=True)


def test_mask_is_a_function_of_seed_and_salt():
    seed = torch.tensor(123456789012345, dtype=torch.int64)
    n = 1 << 18
    m = keep_mask(seed, 0, n, 0.1)
    assert torch.equal(m, keep_mask(seed.clone(), 0, n, 0.1))  # regenerated, not stored
    assert abs(m.float().mean().item() - 0.9) < 0.005
    others = [keep_mask(seed, 1, n, 0.1), keep_mask(seed + 1, 0, n, 0.1), keep_mask(seed + 2**32, 0, n, 0.1)]
    for o in others:  # another salt or either half of another seed: an unrelated mask
        agree = (m == o).float().mean().item()
        assert abs(agree - (0.9**2 + 0.1**2)) < 0.005
    assert keep_mask(seed, 0, 64, 0.0).all()
    x = torch.randn(7, 9, dtype=torch.bfloat16)
    y = dropped(x, seed, 3, 0.25)
    k = keep_mask(seed, 3, x.numel(), 0.25).view(7, 9)
    assert torch.equal(y, torch.where(k, x.float() / 0.75, 0.0).to(torch.bfloat16))


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(7)
    a = draw_seed("cpu")
    torch.manual_seed(7)
    assert torch.equal(a, draw_seed("cpu")) and a.dtype == torch.int64 and a.dim() == 0


def _seeded(fn, seed=torch.tensor(42)):
    """fn under a fixed seed, salts from 0 on every call (what gradcheck's repeated calls need)."""
    def run(*args):
        with seeds_from(seed):
            return fn(*args)
    return run


def test_lora_linears_with_dropout_gradcheck_and_reference():
    torch.manual_seed(0)
    x = _p(2, 3, 6)
    ws = [FrozenWeight(torch.randn(o, 6, dtype=D), D) for o in (5, 4, 4)]
    ab = [_p(2, 6), _p(5, 2), None, None, _p(3, 6), _p(4, 3)]
    scales, ps = (2.0, 0.0, 0.5), (0.3, 0.0, 0.5)
    f = _seeded(lambda x, *ab: lora_linears(x, ws, scales, list(ab), ps))
    torch.autograd.gradcheck(f, (x, *ab))
    # peft's formula with the same masks: base(x) + B(A(drop(x))) * s, the base path undropped
    q, _, v = f(x, *ab)
    seed = torch.tensor(42)
    torch.testing.assert_close(q, x @ ws[0].weight.t() + 2.0 * (dropped(x, seed, 0, 0.3) @ ab[0].t()) @ ab[1].t())
    torch.testing.assert_close(v, x @ ws[2].weight.t() + 0.5 * (dropped(x, seed, 2, 0.5) @ ab[4].t()) @ ab[5].t())


def test_lora_mlp_with_dropout_gradcheck_and_reference():
    torch.manual_seed(1)
    x = _p(2, 3, 6)
    wg, wu, wd = torch.randn(7, 6, dtype=D), torch.randn(7, 6, dtype=D), torch.randn(6, 7, dtype=D)
    ws = [FrozenWeight(w, D) for w in (wg, wu, wd)]
    ab = [_p(2, 6), _p(7, 2), _p(2, 6), _p(7, 2), _p(3, 7), _p(6, 3)]
    scales, ps = (2.0, 1.5, 0.7), (0.2, 0.4, 0.3)
    f = _seeded(lambda x, *ab: lora_mlp(x, ws, scales, list(ab), ps))
    torch.autograd.gradcheck(f, (x, *ab))
    seed = torch.tensor(42)
    ag, bg, au, bu, ad, bd = ab
    e = x @ wg.t() + 2.0 * (dropped(x, seed, 0, 0.2) @ ag.t()) @ bg.t()
    g = x @ wu.t() + 1.5 * (dropped(x, seed, 1, 0.4) @ au.t()) @ bu.t()
    h = torch.nn.functional.silu(e) * g
    torch.testing.assert_close(f(x, *ab), h @ wd.t() + 0.7 * (dropped(h, seed, 2, 0.3) @ ad.t()) @ bd.t())


def test_no_dropout_draws_no_seed():
    """p = 0 is the dropout-free path: no seed drawn, the RNG stream as it was before dropout existed."""
    x = torch.randn(4, 6)
    ws = [FrozenWeight(torch.randn(5, 6), torch.float32)]
    ab = [torch.randn(2, 6), torch.randn(5, 2)]
    state = torch.get_rng_state()
    lora_linears(x, ws, (1.0,), ab, (0.0,))
    lora_linears(x, ws, (1.0,), ab)
    assert torch.equal(state, torch.get_rng_state())
    lora_linears(x, ws, (1.0,), ab, (0.1,))
    assert not torch.equal(state, torch.get_rng_state())
    with seeds_from(torch.tensor(1)) as src:
        lora_linears(x, ws, (1.0,), ab, (0.0,))
    assert src.users == 0


# ------------------------------------------------------------------ the mask's definition and statistics

_M32 = 0xFFFFFFFF


def _lowbias32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def _spec_keep(seed: int, salt: int, n: int, p: float) -> list[bool]:
    """The mask as dropout.py's docstring defines it, in Python integers (no int64 tricks)."""
    sa, sb = (salt * 0x9E3779B1) & _M32, (salt * 0x7F4A7C15 + 1) & _M32
    lo, hi = seed & _M32, (seed >> 32) & _M32
    mul = _lowbias32_int(_lowbias32_int(lo ^ sa) ^ hi) | 1
    add = _lowbias32_int(_lowbias32_int(hi ^ sb) ^ lo)
    out = []
    for i in range(n):
        h = _lowbias32_int(((i // 2) * mul + add) & _M32)  # one hash per pair of elements
        out.append((h >> 16 if i % 2 else h & 0xFFFF) >= round(p * 65536))
    return out


def test_mask_is_the_documented_pair_hash():
    for seed, salt, p in ((42, 0, 0.5), (2**62 - 1, 2**20 + 3, 0.05), (123456789012345, 7, 0.1)):
        got = keep_mask(torch.tensor(seed), salt, 301, p).tolist()
        assert got == _spec_keep(seed, salt, 301, p), (seed, salt, p)
    assert _threshold(0.05) == 3277  # p is exact to 1/65536: 0.05 drops 3277/65536 = 0.050003


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_is_one_minus_p(p):
    n = 1 << 20
    rate = keep_mask(torch.tensor(987654321987), 5, n, p).double().mean().item()
    assert abs(rate - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack((a.flatten().double(), b.flatten().double())))[0, 1].item()


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_neighbours_are_uncorrelated(p):
    """The two halves of one hash, the pairs either side of a pair boundary, and rows one apart."""
    m = keep_mask(torch.tensor(31337), 2, 1 << 20, p)
    rows = m.view(1024, 1024)
    for a, b in ((m[0::2], m[1::2]), (m[1:-1:2], m[2::2]), (rows[:-1], rows[1:])):
        assert abs(_corr(a, b)) < 0.01


def test_other_salts_and_seeds_draw_unrelated_masks():
    """Not merely different: unrelated to the first mask at the same place and one pair or row on (a seed
    added to the counter unmixed would make seed + 1's mask the first one shifted by a pair)."""
    seed, n = torch.tensor(2**40 + 12345), 1 << 18
    m = keep_mask(seed, 0, n, 0.5)
    for other in (keep_mask(seed, 1, n, 0.5), keep_mask(seed + 1, 0, n, 0.5), keep_mask(seed + 2**32, 0, n, 0.5),
                  keep_mask(seed + 1, 1, n, 0.5)):
        assert not torch.equal(m, other)
        for shift in (0, 2, 512):
            assert abs(_corr(m[shift:], other[: n - shift])) < 0.02, shift


# ------------------------------------------------------------------ the Triton kernels on the CPU
# Triton's interpreter (TRITON_INTERPRET=1, fp32 only: its bf16 is broken) runs the very kernels on CPU
# tensors, so the GPU's mask is checked bit for bit without a GPU. Skipped in ordinary runs.

interpreter = pytest.mark.skipif(not (_triton.AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
                                 reason="needs Triton's interpreter (TRITON_INTERPRET=1)")


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    from loraforge.kernels import dropout as D

    monkeypatch.setattr(D, "_triton_on", lambda t: True)  # the kernels take CPU tensors
    monkeypatch.setattr(D, "_sm_count", lambda device: 4)  # small enough that the GEMMs split
    for name in ("dropout", "dropout32", "dropout_mm"):
        monkeypatch.setitem(_triton.ENABLED, name, True)
    return D


_SEEDS = (torch.tensor(2**62 - 1), torch.tensor(123456789012345), torch.tensor(0))


@interpreter
def test_element_kernels_equal_the_twin_in_the_interpreter(kernels_on_cpu):
    D = kernels_on_cpu
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 7), (7, 9), (37, 410)):  # odd sizes: a last pair cut short
        x = torch.randn(*shape, generator=g) + 3  # no zeros: a dropped element shows
        acc = torch.randn(*shape, generator=g)
        for seed, (salt, p) in zip(_SEEDS, ((0, 0.05), (6, 0.5), (2**20 + 3, 0.9)), strict=True):
            ref = D._dropped_torch(x, seed, salt, p)
            for kernel32 in (False, True):  # the int64 fallback, then the uint32 kernel dropped_add_ needs
                _triton.ENABLED["dropout32"] = kernel32
                assert torch.equal(D.dropped(x, seed, salt, p), ref), (shape, int(seed), salt, p, kernel32)
            got = D.dropped_add_(acc.clone(), x, seed, salt, p, 0.5)
            assert torch.equal(got, acc + 0.5 * ref), (shape, int(seed), salt, p)


@interpreter
def test_gemm_kernels_draw_the_twins_mask_in_the_interpreter(kernels_on_cpu):
    """With an identity for the other factor, each GEMM returns drop(x) itself (fp32 sums of one product and
    zeros are exact), so its mask is compared bit for bit: even and odd `in` (pairs straddle rows), split
    reductions (520 columns, 300 rows)."""
    D = kernels_on_cpu
    g = torch.Generator().manual_seed(1)
    draws = ((_SEEDS[0], 1, 0.1), (_SEEDS[1], 3, 0.5), (_SEEDS[2], 2**20, 0.05))
    for i, (t, k) in enumerate(((40, 64), (37, 63), (5, 520), (300, 64), (9, 9))):
        x = torch.randn(t, k, generator=g) + 3
        seed, salt, p = draws[i % 3]
        ref = D._dropped_torch(x, seed, salt, p)
        assert torch.equal(D.dropped_mm(x, torch.eye(k), seed, salt, p), ref), (t, k, p)
        assert torch.equal(D.dropped_t_mm(torch.eye(t), x, seed, salt, p), ref), (t, k, p)
        assert torch.equal(D.dropped_addmm_(torch.zeros(t, k), torch.eye(t), x, seed, salt, p, 1.0), ref), (t, k, p)


# ------------------------------------------------------------------ graphs (emulated) with dropout

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from tinymodels import lm_batch  # noqa: E402

from loraforge.bench.models import build_model, lora_params, make_checkpoint, sync_lora  # noqa: E402
from loraforge.kernels import patch_model  # noqa: E402
from loraforge.kernels.graphs import enable_graphed_layers  # noqa: E402
from loraforge.kernels.offload import decoder_layers  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("tiny", root=str(tmp_path_factory.mktemp("ckpt")), device="cpu")


def _with_dropout(model, p):
    """What peft builds for lora_dropout=p (bench.build_model builds p = 0)."""
    for mod in model.modules():
        if hasattr(mod, "lora_dropout") and "default" in mod.lora_dropout:
            mod.lora_dropout["default"] = torch.nn.Dropout(p)
    return model


def _one_seed_per_layer(model):
    """Reference for the graphed run: each layer's LoRA calls share one seed drawn before the layer runs
    (what the graph runner does), kept for the ordinary checkpoint's recompute."""
    for layer in decoder_layers(model):
        def checkpoint(fn, *args, _inner=layer._gradient_checkpointing_func, **kwargs):
            seed = draw_seed(args[0].device)

            def seeded(*a, **k):
                with seeds_from(seed):
                    return fn(*a, **k)
            return _inner(seeded, *args, **kwargs)
        layer._gradient_checkpointing_func = checkpoint


def _grads(model):
    out = {n: p.grad.detach().clone() for n, p in lora_params(model).items()}
    for p in lora_params(model).values():
        p.grad = None
    return out


def test_graphed_layers_replay_the_forwards_masks(ckpt):
    ref = _with_dropout(build_model(ckpt, 4, "all", stock=False, device="cpu"), 0.2)
    graphed = _with_dropout(build_model(ckpt, 4, "all", stock=False, device="cpu"), 0.2)
    for m in (ref, graphed):
        assert patch_model(m, allow_cpu=True)["lora_dropout"] == 0.2
    sync_lora(ref, graphed)
    _one_seed_per_layer(ref)
    runner = enable_graphed_layers(graphed, emulate=True, min_repeats=1)
    vocab = ref.config.vocab_size
    batches = [lm_batch(vocab, 2, 24, seed=1), lm_batch(vocab, 2, 24, seed=2)]
    losses = {}
    for name, m in (("ref", ref), ("graphed", graphed)):
        torch.manual_seed(5)
        l1, l2 = (m(**b).loss for b in batches)  # both forwards before the backward: seeds must be kept
        (l1 + l2).backward()
        losses[name] = (l1.item(), l2.item())
    assert losses["ref"] == pytest.approx(losses["graphed"], rel=1e-6)
    g_ref, g_graphed = _grads(ref), _grads(graphed)
    for n in g_ref:
        torch.testing.assert_close(g_graphed[n], g_ref[n], rtol=1e-5, atol=1e-7, msg=n)
    assert runner.stats.captured == 2 and runner.stats.fallbacks == 0
    assert all(g.seeded for g in runner.graphs.values())
    # and dropout is really on: another seed, another loss
    torch.manual_seed(6)
    assert graphed(**batches[0]).loss.item() != pytest.approx(losses["graphed"][0], rel=1e-6)


def test_graphed_layers_without_dropout_draw_nothing(ckpt):
    m = build_model(ckpt, 4, "all", stock=False, device="cpu")
    patch_model(m, allow_cpu=True)
    runner = enable_graphed_layers(m, emulate=True, min_repeats=1)
    b = lm_batch(m.config.vocab_size, 2, 16)
    m(**b).loss.backward()
    state = torch.get_rng_state()
    m(**b).loss.backward()
    assert torch.equal(state, torch.get_rng_state())
    assert runner.stats.replays and not any(g.seeded for g in runner.graphs.values())


# ------------------------------------------------------------------ on a GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
def test_triton_dropout_is_bit_exact_with_its_twin():
    from loraforge.kernels import _triton
    from loraforge.kernels.dropout import _dropped_torch, _dropped_triton

    assert _triton.AVAILABLE
    g = torch.Generator(device="cuda").manual_seed(0)
    seeds = [draw_seed("cuda"), torch.tensor(2**62 - 1, device="cuda"), torch.tensor(0, device="cuda")]
    for shape in ((1, 7), (37, 4100), (513, 11008)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.randn(*shape, device="cuda", generator=g).to(dtype)
            for seed in seeds:
                for salt, p in ((0, 0.05), (1, 0.1), (6, 0.5), (2**20 + 3, 0.9)):
                    a, b = _dropped_triton(x, seed, salt, p), _dropped_torch(x, seed, salt, p)
                    assert torch.equal(a, b), (shape, dtype, int(seed), salt, p)


@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory):
    return make_checkpoint("tiny", root=str(tmp_path_factory.mktemp("ckpt")), device="cuda")


@pytest.mark.gpu
@cuda
def test_cuda_graphs_with_dropout_match_ordinary_checkpointing(gpu_ckpt):
    ref = _with_dropout(build_model(gpu_ckpt, 16, "all", stock=False), 0.1)
    graphed = _with_dropout(build_model(gpu_ckpt, 16, "all", stock=False), 0.1)
    for m in (ref, graphed):
        assert patch_model(m)["patched"]
    sync_lora(ref, graphed)
    _one_seed_per_layer(ref)
    runner = enable_graphed_layers(graphed, min_repeats=1)
    batch = lm_batch(ref.config.vocab_size, 3, 96, device="cuda")
    grads = {}
    for step in range(3):  # step 1 captures, then replays; the same seeds drawn in the same order
        for name, m in (("ref", ref), ("graphed", graphed)):
            torch.manual_seed(step)
            loss = m(**batch).loss
            loss.backward()
            grads[name] = (loss.item(), _grads(m))
        assert grads["graphed"][0] == pytest.approx(grads["ref"][0], rel=2e-3)
        for n, g in grads["ref"][1].items():
            rel = float((grads["graphed"][1][n].float() - g.float()).norm() / g.float().norm())
            assert rel < 1e-2, (step, n, rel)
    assert runner.stats.captured == 2 and not runner.stats.disabled
    assert all(g.seeded for g in runner.graphs.values())


@pytest.mark.gpu
@cuda
def test_dropout_inside_the_lora_gemms_matches_its_twins():
    """dropped_mm / dropped_t_mm / dropped_addmm_ draw the mask in their own tiles; at p = 0.5 a mask
    that differs from `dropped`'s by a single element in 10⁴ would move the results far beyond 1e-2."""
    from loraforge.kernels import _triton
    from loraforge.kernels import dropout as D

    assert _triton.AVAILABLE and D._mm_enabled(torch.empty(1, device="cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    seed = draw_seed("cuda")

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    for t, k, r in ((37, 4100, 16), (2048, 4096, 16), (513, 11008, 8), (300, 1000, 64), (9000, 256, 16)):
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(t, k, device="cuda", generator=g).to(dtype)
            a = (torch.randn(r, k, device="cuda", generator=g) / k**0.5).to(dtype)
            d = torch.randn(t, r, device="cuda", generator=g).to(dtype)
            for salt, p in ((0, 0.05), (3, 0.5)):
                xd = D._dropped_torch(x, seed, salt, p).float()
                assert rel(D.dropped_mm(x, a, seed, salt, p), xd @ a.float().t()) < 1e-2, (t, k, r, dtype, p)
                assert rel(D.dropped_t_mm(d, x, seed, salt, p), d.float().t() @ xd) < 1e-2, (t, k, r, dtype, p)
                term = 0.7 * D._dropped_torch(d @ a, seed, salt, p).float()
                zero = torch.zeros(t, k, device="cuda", dtype=dtype)  # the term alone, no rounding of a sum
                assert rel(D.dropped_addmm_(zero, d, a, seed, salt, p, 0.7), term) < 1e-2, (t, k, r, dtype, p)
                acc = torch.randn(t, k, device="cuda", generator=g).to(dtype)
                got = D.dropped_addmm_(acc.clone(), d, a, seed, salt, p, 0.7).float()
                assert torch.allclose(got, acc.float() + term, rtol=1e-2, atol=1e-2), (t, k, r, dtype, p)


@pytest.mark.gpu
@cuda
def test_gemm_kernels_draw_the_twins_mask_bit_for_bit_on_gpu():
    """As the interpreter test, on the GPU's compiled kernels: with an identity for the other factor each GEMM
    returns drop(x) itself (bf16 products are exact in the fp32 sums), so the pair hash and its interleave
    are checked bit for bit, for even and odd `in`."""
    from loraforge.kernels import _triton
    from loraforge.kernels import dropout as D

    assert _triton.AVAILABLE and D._mm_enabled(torch.empty(1, device="cuda"))
    g = torch.Generator(device="cuda").manual_seed(1)
    for t, k in ((40, 64), (37, 63), (200, 130)):
        x = (torch.randn(t, k, device="cuda", generator=g) + 3).to(torch.bfloat16)
        eye_k = torch.eye(k, device="cuda", dtype=torch.bfloat16)
        eye_t = torch.eye(t, device="cuda", dtype=torch.bfloat16)
        for seed, salt, p in ((draw_seed("cuda"), 1, 0.05), (torch.tensor(2**62 - 1, device="cuda"), 3, 0.5)):
            ref = D._dropped_torch(x, seed, salt, p)
            assert torch.equal(D.dropped_mm(x, eye_k, seed, salt, p), ref), (t, k, p)
            assert torch.equal(D.dropped_t_mm(eye_t, x, seed, salt, p), ref.float()), (t, k, p)
            zero = torch.zeros(t, k, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(D.dropped_addmm_(zero, eye_t, x, seed, salt, p, 1.0), ref), (t, k, p)
