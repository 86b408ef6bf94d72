"""Packed rows without a mask (kernels/packed.py, data/packing.boundaries, the trainer's feed), on the CPU.

torch's varlen attention is CUDA-only, so here the patched model runs `attend_reference` in its place
(the same offsets, one causal SDPA per example): this checks the offsets, the wiring through the model's
forward and that no mask is built. tests/gpu/test_fast_path.py checks the CUDA kernel itself.
"""

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from loraforge.bench.models import build_model, make_checkpoint, one_step_grads, sync_lora  # noqa: E402
from loraforge.data.collate import PadCollator  # noqa: E402
from loraforge.data.packing import boundaries, pack_examples  # noqa: E402
from loraforge.kernels import packed, patch_model  # noqa: E402
from loraforge.kernels.packed import BOUNDARIES_KEY  # noqa: E402
from loraforge.train.sampler import StepFeed  # noqa: E402


def _packed_batch(vocab: int, lengths: list[list[int]], width: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for row in lengths:
        examples = []
        for n in row:
            ids = torch.randint(0, vocab, (n,), generator=g).tolist()
            examples.append({"input_ids": ids, "labels": ids})
        rows.append(pack_examples(examples))
    return PadCollator(0, width)(rows)


def test_boundaries_are_where_transformers_sees_examples_start():
    from transformers.masking_utils import find_packed_sequence_indices

    batch = _packed_batch(100, [[5, 9, 1, 3], [7, 4]], 24)  # rows of 18 and 11 tokens, padded to 24
    cu = boundaries(batch["position_ids"])
    # row 0: 0, 5, 14, 15, then its padding (18); row 1 from 24: 24, 31, then its padding (35)
    assert cu.dtype == torch.int32 and cu[:9].tolist() == [0, 5, 14, 15, 18, 24, 31, 35, 48]
    assert cu.shape == (65,) and (cu[8:] == 48).all()  # capacity 64, padded with the total
    seq = find_packed_sequence_indices(batch["position_ids"])
    flat_starts = torch.cat([torch.ones(2, 1, dtype=torch.bool), seq.diff(dim=1) != 0], 1).reshape(-1)
    assert flat_starts.nonzero().flatten().tolist() == cu[:8].tolist()
    many = torch.arange(4).repeat(2, 40)  # 80 examples of 4 tokens: the next capacity
    assert boundaries(many).shape == (129,) and boundaries(many)[79] == 316


def test_reference_attention_equals_the_block_diagonal_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 24, 16, generator=g) for h in (4, 2, 2))
    position_ids = _packed_batch(100, [[5, 9, 1, 3], [7, 4]], 24)["position_ids"]
    cu = boundaries(position_ids)
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff().long())[:48].view(2, 24)
    mask = (doc[:, :, None] == doc[:, None, :]) & torch.ones(24, 24, dtype=torch.bool).tril()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask[:, None], scale=0.3,
                                                            enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(packed.attend_reference(q, k, v, cu, 0.3), want, rtol=1e-5, atol=1e-5)


def test_check_is_off_without_cuda():
    assert packed.check(torch.device("cpu"), True) == "off (CUDA only)"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("tiny", root=str(tmp_path_factory.mktemp("ckpt")), device="cpu")


def test_patched_model_with_offsets_builds_no_mask_and_trains_the_same(ckpt, monkeypatch):
    import transformers.masking_utils as mu

    calls = {"attend": 0, "mask": 0}

    def attend(*a):
        calls["attend"] += 1
        return packed.attend_reference(*a)

    real_find = mu.find_packed_sequence_indices

    def find(*a, **k):
        calls["mask"] += 1
        return real_find(*a, **k)

    monkeypatch.setattr(packed, "attend", attend)  # the patch binds it at patch time
    monkeypatch.setattr(mu, "find_packed_sequence_indices", find)
    masked, fast = (build_model(ckpt, 8, "all", stock=False, device="cpu") for _ in range(2))
    for m in (masked, fast):
        patch_model(m, allow_cpu=True)
    sync_lora(masked, fast)
    batch = _packed_batch(masked.config.vocab_size, [[5, 9, 1, 3], [7, 4, 6]], 24)
    loss, grads = one_step_grads(masked, batch)
    assert calls == {"attend": 0, "mask": 1}  # without offsets: transformers' block-diagonal mask
    fast.base_model.model._loraforge_packed = True
    loss2, grads2 = one_step_grads(fast, batch | {BOUNDARIES_KEY: boundaries(batch["position_ids"])})
    # both layers took the offsets (again in the checkpoint's recompute), and no mask was built
    assert calls == {"attend": 4, "mask": 1}
    assert abs(loss2 - loss) < 1e-3 * abs(loss)
    for name, g in grads.items():
        assert (grads2[name] - g).norm() <= 2e-2 * g.norm() + 1e-8, name
    # the offsets matter: one example per row attends across the boundaries, and the loss moves
    whole = torch.tensor([0, 24, 48] + [48] * 62, dtype=torch.int32)
    assert abs(one_step_grads(fast, batch | {BOUNDARIES_KEY: whole})[0] - loss) > 1e-3 * abs(loss)


def test_the_feed_adds_offsets_to_packed_batches_only():
    packed_batch = _packed_batch(100, [[5, 9], [7]], 16)
    padded = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long),
              "labels": torch.ones(2, 8, dtype=torch.long)}
    for on in (True, False):
        feed = StepFeed(iter([packed_batch, padded]), 1, torch.device("cpu"), 0, boundaries=on)
        first, second = feed.take().batches[0], feed.take().batches[0]
        assert (BOUNDARIES_KEY in first) == on and BOUNDARIES_KEY not in second
        if on:
            assert first[BOUNDARIES_KEY][:4].tolist() == [0, 5, 14, 16]


def test_unpacked_rows_without_a_mask_build_none_and_train_as_with_it(ckpt, monkeypatch):
    """A right-padded batch whose mask the trainer dropped: the patched forward passes a placeholder, so
    transformers builds no mask (and reads nothing on the device); attention runs causal; loss and gradients
    are those of the same batch with its mask."""
    import transformers.masking_utils as mu

    from loraforge.train.sampler import without_padding_mask

    reads = {"n": 0}
    real_find = mu.find_packed_sequence_indices

    def find(*a, **k):
        reads["n"] += 1
        return real_find(*a, **k)

    monkeypatch.setattr(mu, "find_packed_sequence_indices", find)
    masked, fast = (build_model(ckpt, 8, "all", stock=False, device="cpu") for _ in range(2))
    for m in (masked, fast):
        patch_model(m, allow_cpu=True)
    sync_lora(masked, fast)
    assert fast.base_model.model._loraforge_causal
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, masked.config.vocab_size, (n,), generator=g).tolist() for n in (20, 9, 14)]
    batch = PadCollator(0, 8)([{"input_ids": r, "labels": r} for r in rows])
    loss, grads = one_step_grads(masked, batch)
    bare = without_padding_mask(batch)
    assert "attention_mask" not in bare
    loss2, grads2 = one_step_grads(fast, bare)
    assert reads["n"] == 0
    assert abs(loss2 - loss) < 1e-3 * abs(loss)
    for name, grad in grads.items():
        assert (grads2[name] - grad).norm() <= 2e-2 * grad.norm() + 1e-8, name
    fast.base_model.model._loraforge_causal = False  # without the placeholder transformers asks, and reads
    one_step_grads(fast, bare)
    assert reads["n"] == 1
