"""Gradient accumulation: the step's loss is the mean over ALL labelled tokens of the accumulated batch.

The optimizer is swapped for plain SGD so the LoRA update after one step is exactly -lr × gradient (Adam's
first step is ~sign(gradient) and would hide a wrong weighting of the examples).
"""

from __future__ import annotations

import pytest
import torch
from trainhelpers import losses

from loraforge.train import trainer as trainer_mod
from loraforge.train.trainer import LLAMATrainer


def _sgd(model, cfg, device, lora=None, notice=print):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)


def _one_step(make_config, monkeypatch, name: str, batch: int, accum: int):
    monkeypatch.setattr(trainer_mod, "build_optimizer", _sgd)
    cfg = make_config(name, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                      max_grad_norm=0.0, learning_rate=0.5)
    t = LLAMATrainer.from_config(cfg, log=lambda m: None)
    t.train()
    weights = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" in n}
    return weights, losses(cfg.training.output_dir)[1], t


def test_num_items_in_batch_reaches_the_loss(make_config):
    """transformers 5.x + peft: passing num_items_in_batch makes the loss sum(NLL) / num_items_in_batch."""
    t = LLAMATrainer.from_config(make_config(), log=lambda m: None)
    t.setup()
    from loraforge.data.collate import PadCollator

    batch = PadCollator(t.tokenizer.pad_token_id)([t.data.train[i] for i in range(3)])
    with torch.no_grad():
        logits = t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                                ignore_index=-100, reduction="sum")
        loss = t._micro_step_loss(t.model, batch, torch.tensor(1000))
    assert loss.item() == pytest.approx(nll.item() / 1000, rel=1e-5)


def test_accumulation_gives_the_same_update(make_config, monkeypatch):
    ref, ref_loss, t = _one_step(make_config, monkeypatch, "b8", 8, 1)
    # The micro-batches of the 4x2 run carry different numbers of labelled tokens, so a mean of
    # per-micro-batch means would weight the examples differently (checked below).
    from loraforge.train.sampler import MicroBatchStream

    order = MicroBatchStream([len(e["input_ids"]) for e in t.data.train], 4, seed=7).epoch_order(0)
    labelled = [sum(x != -100 for x in t.data.train[i]["labels"][1:]) for i in order[:8]]
    counts = [sum(labelled[:4]), sum(labelled[4:])]
    assert counts[0] != counts[1]
    assert any(ref[n].abs().max() > 0 for n in ref)
    for name, batch, accum in (("b4x2", 4, 2),):
        got, loss, _ = _one_step(make_config, monkeypatch, name, batch, accum)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=f"{name}: {n}")


@pytest.mark.long
def test_two_by_four_gives_the_same_update(make_config, monkeypatch):
    ref, ref_loss, _ = _one_step(make_config, monkeypatch, "b8", 8, 1)
    got, loss, _ = _one_step(make_config, monkeypatch, "b2x4", 2, 4)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.long
def test_mean_of_means_would_fail(make_config, monkeypatch):
    """The check above is sensitive: normalizing each micro-batch by its own token count changes the update."""
    ref, _, _ = _one_step(make_config, monkeypatch, "b8", 8, 1)
    accum = 2

    def mean_of_means(self, model, batch, n_tokens):
        return model(**batch, use_cache=False).loss / accum

    monkeypatch.setattr(LLAMATrainer, "_micro_step_loss", mean_of_means)
    got, _, _ = _one_step(make_config, monkeypatch, "bug", 4, accum)
    assert any(not torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6) for n in ref)
