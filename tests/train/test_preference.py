"""DPO / ORPO on the one loop, on the 2-layer random Llama: the losses against a hand computation, the
reference = the base with the adapter off, accumulation 1x8 = 8x1, exact resume, what is logged."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from trainhelpers import WORDS, read_metrics, run_config

from loraforge.config import TrainingConfig
from loraforge.errors import ConfigError, TrainingError
from loraforge.train import preference
from loraforge.train import trainer as trainer_mod
from loraforge.train.trainer import LLAMATrainer


@pytest.fixture
def pair_file(tmp_path: Path) -> Path:
    """Pairs whose chosen answers differ in length (so micro-batches differ in tokens, not in pairs)."""
    rows = []
    for i in range(24):
        w = WORDS[i % len(WORDS)]
        rows.append({"prompt": f"Say {w}, {1 + i % 7} times.", "chosen": " ".join([w] * (1 + (i * 5) % 7)) + ".",
                     "rejected": "No." if i % 2 else "I would rather not say it."})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def make_pref(tmp_path: Path, tiny_model_dir: Path, pair_file: Path):
    def make(name: str = "run", objective: str = "dpo", lora_dropout: float = 0.0, **training):
        cfg = run_config(tiny_model_dir, pair_file, tmp_path / name, lora_dropout=lora_dropout, **training)
        return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, objective=objective))

    return make


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_config_validates_the_preference_fields():
    for bad in ({"beta": 0.0}, {"label_smoothing": 0.5}, {"orpo_lambda": -1.0}, {"objective": "ppo"}):
        with pytest.raises(ConfigError):
            TrainingConfig(**bad)


def test_losses_equal_a_hand_computation():
    policy = torch.tensor([-3.0, -5.0, -4.0, -4.5], dtype=torch.float64)  # 2 pairs: chosen rows, then rejected
    reference = torch.tensor([-3.5, -4.0, -3.0, -5.0], dtype=torch.float64)
    counts = torch.tensor([3, 4, 2, 5])
    cfg = TrainingConfig(objective="dpo", beta=0.2, label_smoothing=0.1)
    out = preference.pair_losses(policy, counts, reference, cfg)
    for i, (pc, pr, rc, rr) in enumerate([(-3.0, -4.0, -3.5, -3.0), (-5.0, -4.5, -4.0, -5.0)]):
        h = 0.2 * ((pc - rc) - (pr - rr))
        assert out["loss"][i].item() == pytest.approx(-0.9 * _log_sigmoid(h) - 0.1 * _log_sigmoid(-h), rel=1e-12)
        assert out["reward_margin"][i].item() == pytest.approx(h, rel=1e-12)
        assert out["reward_accuracy"][i].item() == (1.0 if h > 0 else 0.0)
    cfg = TrainingConfig(objective="orpo", orpo_lambda=0.3)
    out = preference.pair_losses(policy, counts, None, cfg)
    for i, (pc, pr, nc, nr) in enumerate([(-3.0, -4.0, 3, 2), (-5.0, -4.5, 4, 5)]):
        lc, lr = pc / nc, pr / nr
        odds = (lc - math.log(1 - math.exp(lc))) - (lr - math.log(1 - math.exp(lr)))
        assert out["loss"][i].item() == pytest.approx(-lc - 0.3 * _log_sigmoid(odds), rel=1e-12)
    # A tie (policy = reference, as at the start of DPO) counts half.
    tie = preference.pair_losses(reference, counts, reference, TrainingConfig(objective="dpo"))
    assert tie["reward_accuracy"].tolist() == [0.5, 0.5]
    assert tie["loss"][0].item() == pytest.approx(math.log(2))


def test_chunked_log_probs_and_their_gradients_match_log_softmax():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    upstream = torch.randn(7, dtype=torch.float64, generator=g)
    got = preference.LinearLogProbs.apply(hidden, weight, targets, 3)
    (got * upstream).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).squeeze(1)
    (want * upstream).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gh, hidden.grad)
    torch.testing.assert_close(gw, weight.grad)


# long: sets up a trainer and loads the base model a second time (~5 s)
@pytest.mark.long
def test_reference_is_the_base_model_with_the_adapter_off(make_pref, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    t = LLAMATrainer.from_config(make_pref(), log=lambda m: None)
    t.setup()
    with torch.no_grad():  # a trained-looking adapter, so policy and reference differ
        for n, p in t.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = t._collator(None)([t.data.train[i] for i in range(3)])
    ref, counts = preference.reference_logps(t.model, batch)
    policy, _ = preference.sequence_logps(t.model, batch)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    want = torch.where(mask, torch.log_softmax(logits.double(), -1).gather(2, labels.clamp(min=0)[..., None])[..., 0],
                       0.0).sum(1)
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == mask.sum(1).tolist()
    assert (policy - ref).abs().max() > 1e-3


def _sgd(model, cfg, device, lora=None, notice=print):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)


# long: two runs per objective on the tiny model (7-20 s on 2 shared cores)
@pytest.mark.long
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_accumulation_1x8_equals_8x1(make_pref, monkeypatch, objective):
    monkeypatch.setattr(trainer_mod, "build_optimizer", _sgd)
    runs = {}
    for batch, accum in ((8, 1), (1, 8)):
        cfg = make_pref(f"{objective}-{batch}x{accum}", objective, max_steps=1, per_device_train_batch_size=batch,
                        gradient_accumulation_steps=accum, max_grad_norm=0.0, learning_rate=0.5)
        t = LLAMATrainer.from_config(cfg, log=lambda m: None)
        if objective == "dpo":  # B = 0 at init makes DPO's first gradient on A zero: start from a live adapter
            t.setup()
            torch.manual_seed(3)
            with torch.no_grad():
                for n, p in t.model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.05)
        t.train()
        weights = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" in n}
        runs[(batch, accum)] = weights, read_metrics(cfg.training.output_dir)[0]
    (w1, m1), (w8, m8) = runs[(8, 1)], runs[(1, 8)]
    for key in preference.METRICS:
        assert m8[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    for n in w1:
        torch.testing.assert_close(w8[n], w1[n], rtol=1e-4, atol=1e-6)


# long: a 4-step run with evaluations, then a resumed run (~10 s)
@pytest.mark.long
def test_logged_metrics_eval_and_exact_resume(make_pref):
    cfg = make_pref("dpo", max_steps=4, save_steps=1, lora_dropout=0.1, eval_steps=2)
    full = LLAMATrainer.from_config(cfg, log=lambda m: None)
    result = full.train()
    records = read_metrics(cfg.training.output_dir)
    steps = [r for r in records if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"} <= set(r)
        assert 0.0 <= r["reward_accuracy"] <= 1.0 and r["logps_chosen"] < 0
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval_reward_accuracy", "eval_win_rate", "eval_base_win_rate", "eval_perplexity"} <= set(evals[-1])
    assert result.eval_perplexity == evals[-1]["eval_perplexity"]
    final = {n: p.detach().clone() for n, p in full.model.named_parameters() if "lora_" in n}
    step4 = steps[-1]["loss"]

    # Resume from step 3 in the same folder (dropout on: the RNG restore matters) and redo step 4.
    resumed_cfg = dataclasses.replace(cfg, training=dataclasses.replace(
        cfg.training, resume_from_checkpoint=str(Path(cfg.training.output_dir) / "checkpoints" / "step-3")))
    again = LLAMATrainer.from_config(resumed_cfg, log=lambda m: None)
    again.train()
    redone = [r for r in read_metrics(cfg.training.output_dir) if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in redone] == [1, 2, 3, 4]
    assert redone[-1]["loss"] == step4
    for n, p in again.model.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p.detach(), final[n], rtol=0, atol=0)


# long: two short runs (~6 s)
@pytest.mark.long
def test_orpo_runs_and_the_nan_guard_stops(make_pref, monkeypatch):
    cfg = make_pref("orpo", "orpo", max_steps=2)
    LLAMATrainer.from_config(cfg, log=lambda m: None).train()
    assert "reward_accuracy" in read_metrics(cfg.training.output_dir)[0]

    def nan_forward(model, batch, tcfg):
        out = real(model, batch, tcfg)
        return {**out, "loss": out["loss"] * float("nan")}

    real = preference.pair_forward
    monkeypatch.setattr(preference, "pair_forward", nan_forward)
    with pytest.raises(TrainingError, match="non-finite"):
        LLAMATrainer.from_config(make_pref("nan", max_steps=5, max_nonfinite_steps=2), log=lambda m: None).train()


# long: a preempted DPO run and its resume, then a two-trial DPO sweep (~25 s)
@pytest.mark.long
def test_sigterm_trackers_and_the_sweep_work_for_dpo(make_pref, monkeypatch, tmp_path):
    """What the SFT loop has keeps working under DPO: SIGTERM saves a resumable checkpoint, TensorBoard
    receives the preference metrics, and a sweep optimizes the held-out DPO loss."""
    import os
    import signal

    import yaml

    from loraforge.config import load_config
    from loraforge.train.sweep import run_sweep
    from loraforge.train.trainer import Preempted

    pytest.importorskip("tensorboard")
    cfg = make_pref("tb", max_steps=4, report_to=["tensorboard"])
    real, calls = preference.pair_forward, []

    def sigterm_on_the_third_forward(model, batch, tcfg):  # micro-batch 3 = step 2's first (2 per step)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch, tcfg)

    monkeypatch.setattr(preference, "pair_forward", sigterm_on_the_third_forward)
    with pytest.raises(Preempted) as stopped:
        LLAMATrainer.from_config(cfg, log=lambda m: None).train()
    assert Path(stopped.value.checkpoint).name == "step-2"
    monkeypatch.setattr(preference, "pair_forward", real)
    resumed = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, resume_from_checkpoint="latest"))
    result = LLAMATrainer.from_config(resumed, log=lambda m: None).train()
    assert [r["step"] for r in read_metrics(result.run_dir) if "loss" in r and "eval_loss" not in r] == [1, 2, 3, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    assert {"loss", "reward_accuracy", "reward_margin", "eval_loss"} <= set(acc.Tags()["scalars"])

    base = make_pref("base", max_steps=4)
    base.save(tmp_path / "base.yaml")
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"training.beta": {"low": 0.05, "high": 0.5}}))
    out = tmp_path / "sweep"
    best = run_sweep(tmp_path / "base.yaml", [], trials=2, space=tmp_path / "space.yaml", out=out,
                     log=lambda m: None)
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 2 and all(r["state"] in ("COMPLETE", "PRUNED") for r in rows)
    assert best["best_value"] == min(r["eval_loss"] for r in rows if r["state"] == "COMPLETE")
    assert load_config(out / "best.yaml").training.objective == "dpo"
