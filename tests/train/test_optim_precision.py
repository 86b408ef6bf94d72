"""paged_adamw_8bit, fp16 with a GradScaler, and gradient clipping, run through the real training loop.

Each run hooks the optimizer's step to read the gradients it actually steps on: after clipping they have
norm training.max_grad_norm when the step's norm was above it, and are untouched when it was below.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from trainhelpers import losses, read_metrics

import loraforge.train.trainer as trainer_mod
from loraforge.config import TrainingConfig
from loraforge.train.optim import build_optimizer
from loraforge.train.trainer import LLAMATrainer

bnb = pytest.importorskip("bitsandbytes")
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _grad_norm(params) -> float:
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@pytest.fixture
def stepped_norms(monkeypatch) -> list[float]:
    """The total gradient norm each optimizer step of the run sees (in step order)."""
    norms: list[float] = []

    def build(*args: Any, **kwargs: Any):
        opt = build_optimizer(*args, **kwargs)
        opt.register_step_pre_hook(lambda o, _a, _k: norms.append(
            _grad_norm([p for g in o.param_groups for p in g["params"]])))
        return opt

    monkeypatch.setattr(trainer_mod, "build_optimizer", build)
    return norms


def test_paged_adamw_8bit_on_cpu_keeps_8bit_states_and_says_so():
    notices: list[str] = []
    big = torch.nn.Linear(128, 64, bias=False)  # 8192 elements: bitsandbytes keeps < 4096 in 32 bits
    opt = build_optimizer(big, TrainingConfig(optim="paged_adamw_8bit"), torch.device("cpu"), notice=notices.append)
    assert isinstance(opt, bnb.optim.AdamW8bit) and "AdamW8bit" in notices[0] and "not paged" in notices[0]
    before = big.weight.detach().clone()
    big(torch.randn(4, 128)).pow(2).sum().backward()
    opt.step()
    assert opt.state[big.weight]["state1"].dtype == torch.uint8
    # Adam's first step moves each weight by about lr (1e-4 by default), 8-bit states or not.
    assert (big.weight.detach() - before).abs().mean().item() == pytest.approx(2e-4, rel=0.5)


# Long: a real 3-step run of the loop (~5-20 s on 2 shared cores).
@pytest.mark.long
def test_paged_adamw_8bit_run_and_gradients_below_the_limit_are_untouched(make_config, stepped_norms):
    logs: list[str] = []
    cfg = make_config(max_steps=3, optim="paged_adamw_8bit", max_grad_norm=1e3)
    result = LLAMATrainer.from_config(cfg, log=logs.append).train()
    assert any("paged_adamw_8bit" in m and "AdamW8bit" in m for m in logs), logs
    logged = losses(result.run_dir)
    assert sorted(logged) == [1, 2, 3] and all(math.isfinite(v) for v in logged.values())
    assert logged[3] < logged[1]
    pre_clip = [r["grad_norm"] for r in read_metrics(result.run_dir) if "loss" in r]
    assert stepped_norms == pytest.approx(pre_clip, rel=1e-4)  # below the limit: nothing scaled


@pytest.fixture
def cpu_fp16(monkeypatch) -> None:
    """fp16 mixed precision on the CPU as Accelerate sets it up on a GPU: autocast to fp16 and a GradScaler.

    Accelerate (1.x) leaves both off on the CPU (its fp16 branch is for other devices), while torch has
    CPU fp16 autocast and a CPU GradScaler; this turns them on, so the trainer's scaler path (scaled
    backward, unscale before clipping, skipped steps, the scaler saved in checkpoints) runs here.
    """
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("this torch has no CPU autocast")
    real = trainer_mod.build_accelerator

    def build(cfg, device):
        acc = real(cfg, device)
        if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
            acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu")
        return acc

    monkeypatch.setattr(trainer_mod, "build_accelerator", build)


# Long: a real 3-step run of the loop (~5-20 s on 2 shared cores).
@pytest.mark.long
def test_fp16_with_a_grad_scaler_and_clipping_to_the_limit(make_config, stepped_norms, cpu_fp16, monkeypatch):
    limit = 0.05  # the tiny model's gradients have norm ~0.8 (see the metrics): every step is clipped
    cfg = make_config(max_steps=3, mixed_precision="fp16", max_grad_norm=limit, save_steps=3)
    dtypes: list[torch.dtype] = []
    hooked = trainer_mod.build_optimizer

    def build(model, *args: Any, **kwargs: Any):  # the model exists once the run starts
        q_proj = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
        q_proj.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
        return hooked(model, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "build_optimizer", build)
    trainer = LLAMATrainer.from_config(cfg, log=lambda m: None)
    result = trainer.train()

    assert isinstance(trainer.accelerator.scaler, torch.amp.GradScaler)
    assert dtypes and set(dtypes) == {torch.float16}  # the forward ran under fp16 autocast
    logged = losses(result.run_dir)
    assert sorted(logged) == [1, 2, 3] and all(math.isfinite(v) for v in logged.values())
    pre_clip = [r["grad_norm"] for r in read_metrics(result.run_dir) if "loss" in r]
    assert all(n > 4 * limit for n in pre_clip), pre_clip
    # The optimizer steps on unscaled gradients of norm exactly the limit: clipping a still-scaled
    # gradient (norm ~0.8 x 65536) would also give the limit, but then the logged norm would be scaled too.
    assert stepped_norms == pytest.approx([limit] * 3, rel=1e-3)
    assert trainer.accelerator.scaler.get_scale() > 1
    assert (result.run_dir / "checkpoints" / "step-3" / "scaler.pt").is_file()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_fp16_on_a_gpu_builds_a_grad_scaler_and_trains(device, make_config, stepped_norms):
    cfg = make_config(max_steps=3, mixed_precision="fp16", max_grad_norm=0.05)
    cfg.model.device = device
    trainer = LLAMATrainer.from_config(cfg, log=lambda m: None)
    result = trainer.train()
    assert isinstance(trainer.accelerator.scaler, torch.amp.GradScaler)
    assert all(math.isfinite(v) for v in losses(result.run_dir).values())
    assert stepped_norms and max(stepped_norms) == pytest.approx(0.05, rel=1e-2)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_paged_adamw_8bit_on_a_gpu_is_bitsandbytes_paged_optimizer(device):
    lin = torch.nn.Linear(128, 64, bias=False).to(device)
    opt = build_optimizer(lin, TrainingConfig(optim="paged_adamw_8bit"), torch.device(device), notice=print)
    assert isinstance(opt, bnb.optim.PagedAdamW8bit)
    lin(torch.randn(4, 128, device=device)).pow(2).sum().backward()
    opt.step()
    assert opt.state[lin.weight]["state1"].dtype == torch.uint8
