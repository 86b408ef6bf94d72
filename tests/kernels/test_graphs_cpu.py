"""Graphed checkpointed layers (kernels/graphs.py) compute what ordinary checkpointing computes.

On a CPU the runner emulates the graphs: the same static buffers, the same bound calls, the same
autograd Function, run eagerly instead of replayed. tests/gpu/test_graphs_gpu.py replays real CUDA
graphs against the same reference.
"""

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from tinymodels import lm_batch  # noqa: E402

from loraforge.bench.models import build_model, lora_params, make_checkpoint, sync_lora  # noqa: E402
from loraforge.kernels import patch_model  # noqa: E402
from loraforge.kernels.graphs import disable_graphed_layers, enable_graphed_layers  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("tiny", root=str(tmp_path_factory.mktemp("ckpt")), device="cpu")


def _batch(vocab, seed, seq=24, pad=False):
    return lm_batch(vocab, 2, seq, seed=seed, pad_from=seq - 6 if pad else None)


def _pair(ckpt, min_repeats=1):
    ref = build_model(ckpt, 4, "all", stock=False, device="cpu")
    graphed = build_model(ckpt, 4, "all", stock=False, device="cpu")
    for m in (ref, graphed):
        assert patch_model(m, allow_cpu=True)["patched"]
    sync_lora(ref, graphed)
    runner = enable_graphed_layers(graphed, emulate=True, min_repeats=min_repeats)
    return ref, graphed, runner


def _grads(model):
    out = {n: p.grad.detach().clone() for n, p in lora_params(model).items()}
    for p in lora_params(model).values():
        p.grad = None
    return out


def _assert_same(g1, g2):
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-7, msg=n)


def test_graphed_layers_match_checkpointing_with_accumulation(ckpt):
    ref, graphed, runner = _pair(ckpt)
    vocab = ref.config.vocab_size
    batches = [_batch(vocab, 1), _batch(vocab, 2)]
    # two micro-batches accumulated: both forwards before the summed backward, so the static input
    # buffer is overwritten between a layer's forward and its backward
    losses = {}
    for name, m in (("ref", ref), ("graphed", graphed)):
        l1, l2 = (m(**b).loss for b in batches)
        (l1 + l2).backward()
        losses[name] = (float(l1), float(l2))
    assert losses["ref"] == pytest.approx(losses["graphed"], rel=1e-6)
    _assert_same(_grads(ref), _grads(graphed))
    n = len(runner.params)
    assert runner.stats.captured == n and not runner.stats.disabled
    assert runner.stats.fallbacks == 0
    assert runner.stats.replays == 4 * n  # 2 forwards + 2 backwards per layer
    assert all(len(p) == 14 for p in runner.params)  # 7 projections x (A, B) per layer


def test_padded_batches_and_new_shapes_get_their_own_signature(ckpt):
    ref, graphed, runner = _pair(ckpt)
    vocab = ref.config.vocab_size
    for b in (_batch(vocab, 3, pad=True), _batch(vocab, 4, seq=16)):
        for m in (ref, graphed):
            m(**b).loss.backward()
        _assert_same(_grads(ref), _grads(graphed))
    assert len(runner.statics) == 2 and runner.stats.fallbacks == 0


def test_a_shape_is_captured_when_it_recurs(ckpt):
    ref, graphed, runner = _pair(ckpt, min_repeats=2)
    vocab = ref.config.vocab_size
    n = len(runner.params)
    for step, seq in enumerate((24, 16, 24)):
        b = _batch(vocab, step, seq=seq)
        for m in (ref, graphed):
            m(**b).loss.backward()
        _assert_same(_grads(ref), _grads(graphed))
    assert runner.stats.captured == n  # 24 was seen twice, 16 once
    assert runner.stats.fallbacks == 2 * n and runner.summary()["signatures"] == 1


def test_falls_back_where_graphs_do_not_apply(ckpt):
    ref, graphed, runner = _pair(ckpt)
    vocab = ref.config.vocab_size
    runner.max_signatures = 1
    for seq in (24, 16):  # the second shape is over the limit: ordinary checkpointing
        b = _batch(vocab, seq, seq=seq)
        for m in (ref, graphed):
            m(**b).loss.backward()
        _assert_same(_grads(ref), _grads(graphed))
    n = len(runner.params)
    assert runner.stats.fallbacks == n and runner.stats.captured == n
    with torch.no_grad():  # no grad: plain forward, nothing replayed
        before = runner.stats.replays
        graphed(**_batch(vocab, 5))
        assert runner.stats.replays == before
    # a trainable parameter replaced after capture: graphs go off for good, results stay right
    lora = lora_params(graphed)
    name = next(iter(lora))
    mod = graphed.get_submodule(name.rsplit(".", 1)[0])
    mod.weight = torch.nn.Parameter(lora[name].detach().clone())
    b = _batch(vocab, 24)
    graphed(**b).loss.backward()
    assert "replaced" in runner.stats.disabled
    disable_graphed_layers(graphed)
    assert not hasattr(graphed, "_loraforge_graphs")


def test_needs_gradient_checkpointing(ckpt):
    m = build_model(ckpt, 4, "all", stock=False, device="cpu")
    m.gradient_checkpointing_disable()
    with pytest.raises(ValueError, match="gradient checkpointing must be on"):
        enable_graphed_layers(m, emulate=True)


def test_dpo_steps_replay_the_graphs_and_the_reference_pass_bypasses_them(ckpt):
    """DPO on the graphed fast path: the policy pass (with grad) runs the captured layers; the reference
    pass (adapter off, no grad) runs eagerly past them, so it never replays a graph holding the adapter."""
    from loraforge.config import TrainingConfig
    from loraforge.train import preference

    ref, graphed, runner = _pair(ckpt)
    vocab = ref.config.vocab_size
    tcfg = TrainingConfig(objective="dpo", beta=0.1)
    n = len(runner.params)
    for step in range(2):  # two pairs (chosen rows first), the same shape twice
        batch = lm_batch(vocab, 4, 24, seed=10 + step)
        batch["labels"][:, :8] = -100  # a shared 8-token prompt carries no label
        losses = {}
        for name, m in (("ref", ref), ("graphed", graphed)):
            loss = preference.pair_forward(m, batch, tcfg)["loss"].sum()
            loss.backward()
            losses[name] = float(loss.detach())
        assert losses["graphed"] == pytest.approx(losses["ref"], rel=1e-6)
        _assert_same(_grads(ref), _grads(graphed))
    assert runner.stats.captured == n and not runner.stats.disabled and runner.stats.fallbacks == 0
    assert runner.stats.replays == 4 * n  # the policy pass only: forward + backward per layer per step


def test_dora_layers_are_graphed_with_their_magnitudes(ckpt):
    """DoRA's magnitudes are parameters of the graphed layers like A and B: same loss and gradients as
    ordinary checkpointing, the 4-bit weights' norms included."""
    from dataclasses import replace

    from loraforge.bench.models import bench_run, load_loraforge

    def build():
        run = bench_run(ckpt, 4, "all", device="cpu")
        m = load_loraforge(replace(run, lora=replace(run.lora, use_dora=True)))
        assert patch_model(m, allow_cpu=True)["dora"]
        return m

    ref, graphed = build(), build()
    sync_lora(ref, graphed)
    runner = enable_graphed_layers(graphed, emulate=True, min_repeats=1)
    batch = _batch(ref.config.vocab_size, 1)
    losses = []
    for m in (ref, graphed):  # twice: the second pass replays the layers the first one captured
        for _ in range(2):
            loss = m(**batch).loss
            loss.backward()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    _assert_same(_grads(ref), _grads(graphed))
    assert runner.stats.captured == len(runner.params) and not runner.stats.disabled
    assert runner.stats.replays > 0 and runner.stats.fallbacks == 0
    assert all(len(p) == 21 for p in runner.params)  # 7 projections x (A, B, magnitude) per layer


@pytest.mark.parametrize("offload_first", [True, False])
def test_graphed_layers_under_the_activation_offloader(ckpt, offload_first):
    """Graphs go beneath the offloader, whichever is enabled first: the graphed layers' saved inputs go to
    host memory (on the CPU a forced copy) and come back for their backward; same loss and gradients."""
    from loraforge.kernels.offload import OffloadedCheckpoint, enable_offloaded_checkpointing

    ref = build_model(ckpt, 4, "all", stock=False, device="cpu")
    both = build_model(ckpt, 4, "all", stock=False, device="cpu")
    for m in (ref, both):
        assert patch_model(m, allow_cpu=True)["patched"]
    sync_lora(ref, both)
    if offload_first:
        off = enable_offloaded_checkpointing(both, force_copy=True, min_bytes=0)
        runner = enable_graphed_layers(both, emulate=True, min_repeats=1)
    else:
        runner = enable_graphed_layers(both, emulate=True, min_repeats=1)
        off = enable_offloaded_checkpointing(both, force_copy=True, min_bytes=0)
    layers = both.base_model.model.model.layers
    assert all(isinstance(layer._gradient_checkpointing_func, OffloadedCheckpoint) for layer in layers)
    batches = [_batch(ref.config.vocab_size, 1), _batch(ref.config.vocab_size, 2)]
    for m in (ref, both):  # the second batch replays what the first one captured
        for b in batches:
            m(**b).loss.backward()
    _assert_same(_grads(ref), _grads(both))
    assert runner.stats.replays > 0 and runner.stats.fallbacks == 0
    # every layer but the last sends its input to the host in each forward, and gets it back
    assert off.stats.offloaded == (len(layers) - 1) * 2 and off.stats.restored == len(layers) * 2
    disable_graphed_layers(both)
    assert all(type(layer._gradient_checkpointing_func.inner).__name__ != "GraphedCheckpoint" for layer in layers)
