"""Parameter groups, schedules, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from trainhelpers import losses, read_metrics

from loraforge.config import LoRAConfig, TrainingConfig
from loraforge.train.optim import build_optimizer, build_scheduler, lr_lambda, param_groups
from loraforge.train.trainer import LLAMATrainer


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)  # weight decays, bias does not
        self.input_layernorm = torch.nn.LayerNorm(4)  # a norm's weight and bias: no decay
        self.lora_A = torch.nn.Parameter(torch.ones(2, 4))
        self.lora_B = torch.nn.Parameter(torch.ones(4, 2))
        self.frozen = torch.nn.Parameter(torch.ones(4, 4), requires_grad=False)


def _group_of(groups, p):
    return next(g for g in groups if any(q is p for q in g["params"]))


def test_no_weight_decay_on_biases_and_norms_and_loraplus_lr():
    m, cfg = Toy(), TrainingConfig(weight_decay=0.1, learning_rate=1e-3)
    groups = param_groups(m, cfg, LoRAConfig(loraplus_lr_ratio=16.0))
    assert _group_of(groups, m.proj.weight)["weight_decay"] == 0.1
    assert _group_of(groups, m.lora_A)["weight_decay"] == 0.1
    for p in (m.proj.bias, m.input_layernorm.weight, m.input_layernorm.bias):
        assert _group_of(groups, p)["weight_decay"] == 0.0
    assert _group_of(groups, m.lora_B)["lr"] == pytest.approx(16e-3)
    assert _group_of(groups, m.lora_A)["lr"] == pytest.approx(1e-3)
    assert not any(q is m.frozen for g in groups for q in g["params"])
    assert all(g["lr"] == 1e-3 for g in param_groups(m, cfg, LoRAConfig()))  # no LoRA+: one lr


def test_loraplus_b_moves_further_in_a_real_step():
    m = Toy()
    cfg = TrainingConfig(weight_decay=0.0, learning_rate=1e-2, optim="adamw_torch")
    opt = build_optimizer(m, cfg, torch.device("cpu"), LoRAConfig(loraplus_lr_ratio=16.0), notice=lambda s: None)
    before_a, before_b = m.lora_A.detach().clone(), m.lora_B.detach().clone()
    (m.lora_B @ m.lora_A).sum().backward()
    opt.step()
    # Adam's first step moves each weight by ~lr: B's lr is 16x A's.
    ratio = (before_b - m.lora_B).abs().mean() / (before_a - m.lora_A).abs().mean()
    assert ratio.item() == pytest.approx(16, rel=1e-3)


def test_paged_optimizer_falls_back_on_cpu_with_a_notice():
    notices = []
    opt = build_optimizer(Toy(), TrainingConfig(), torch.device("cpu"), notice=notices.append)
    assert isinstance(opt, torch.optim.AdamW) and "paged_adamw_32bit" in notices[0]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules_with_warmup(kind):
    total, warmup = 20, 4
    f = lr_lambda(kind, warmup, total)
    assert [f(s) for s in range(warmup)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(warmup) == pytest.approx(1.0)
    mid = {"cosine": 0.5 * (1 + math.cos(math.pi * 0.5)), "linear": 0.5, "constant": 1.0}[kind]
    assert f(warmup + (total - warmup) // 2) == pytest.approx(mid)
    assert f(total) == pytest.approx({"cosine": 0.0, "linear": 0.0, "constant": 1.0}[kind], abs=1e-12)
    sched = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.5),
                            TrainingConfig(lr_scheduler_type=kind, warmup_ratio=0.2, learning_rate=0.5), total)
    assert sched.get_last_lr()[0] == pytest.approx(0.5 * 0.25)  # warmup of ceil(0.2 x 20) = 4 steps


def test_seed_makes_a_run_repeatable_and_logged_lr_is_the_one_used(make_config):
    runs = []
    for name in ("a", "b"):
        cfg = make_config(name, max_steps=4, lora_dropout=0.2, warmup_ratio=0.5, lr_scheduler_type="linear")
        LLAMATrainer.from_config(cfg, log=lambda m: None).train()
        runs.append(losses(cfg.training.output_dir))
    assert runs[0] == runs[1]  # bit-identical
    lrs = [r["lr"] for r in read_metrics(cfg.training.output_dir) if "lr" in r]
    # warmup ceil(0.5 x 4) = 2 steps: 0.5, 1.0 of the peak; then linear decay over the 2 steps left: 1, 0.5
    assert lrs == pytest.approx([0.5e-2, 1e-2, 1e-2, 0.5e-2])
