"""Right-padded training batches go to a GPU without their attention mask: transformers reads a given mask
on the device to decide whether it may skip it, a host wait in every forward. Without it, causal attention
gives the same loss and gradients."""

from __future__ import annotations

import torch
from trainhelpers import token_examples

from loraforge.data.collate import PadCollator
from loraforge.train.sampler import StepFeed, without_padding_mask


def test_only_right_padded_batches_lose_their_mask():
    batch = PadCollator(0)(token_examples([6, 9, 3], 50))
    assert "attention_mask" not in without_padding_mask(batch)
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))  # a real token after padding
    labelled_pad = dict(batch, labels=batch["input_ids"].clone())  # a padding position with a label
    for kept in (left, labelled_pad):
        assert without_padding_mask(kept)["attention_mask"] is kept["attention_mask"]


def test_the_feed_counts_real_tokens_then_drops_the_mask():
    batch = PadCollator(0)(token_examples([6, 9, 3], 50))
    step = StepFeed(iter([batch]), 1, torch.device("cpu"), 0, padding_mask=False).take()
    assert "attention_mask" not in step.batches[0] and step.seen == 18 and step.labelled == 4 + 7 + 1


def test_same_loss_and_gradients_without_the_mask(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = PadCollator(model.config.pad_token_id or 0)(token_examples([20, 7, 13, 2], model.config.vocab_size))
    results = []
    for b in (batch, without_padding_mask(batch)):
        model.zero_grad(set_to_none=True)
        out = model(**b)
        out.loss.backward()
        results.append((out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, logits, grads), (loss2, logits2, grads2) = results
    real = batch["attention_mask"].bool()
    assert torch.allclose(loss, loss2, rtol=1e-5) and torch.allclose(logits[real], logits2[real], atol=1e-4)
    assert not torch.allclose(logits[~real], logits2[~real], atol=1e-4)  # the padding's outputs did change
    for g, g2 in zip(grads, grads2, strict=True):
        assert torch.allclose(g, g2, rtol=1e-4, atol=1e-6)
