"""Unpacked batches on the fast path go as one row of their real tokens (`padding_free`): the same loss and
gradients as the right-padded rows, a few row lengths for CUDA graphs, and the feed counts tokens as before."""

from __future__ import annotations

import torch
from trainhelpers import token_examples

from loraforge.data.collate import PadCollator
from loraforge.data.packing import bucket_lengths, padding_free
from loraforge.kernels.packed import BOUNDARIES_KEY
from loraforge.train.sampler import StepFeed


def test_rows_laid_end_to_end_then_padded_to_a_bucket():
    assert bucket_lengths(2048) == [256, 512, 1024, 2048] and bucket_lengths(512) == [128, 256, 512]
    examples = token_examples([6, 9, 3], 50)
    batch = PadCollator(0, 8)(examples)
    one = padding_free(batch, 0, 2048)
    assert set(one) == {"input_ids", "labels", "position_ids"} and one["input_ids"].shape == (1, 256)
    ids, labels, pos = (one[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    assert ids[:18] == [t for e in examples for t in e["input_ids"]] and set(ids[18:]) == {0}
    assert pos == [*range(6), *range(9), *range(3), *range(256 - 18)]  # the padding: an example of its own
    # each example's first label is never scored (as the unpacked label shift never scores it)
    assert labels[:18] == [t for e in examples for t in [-100, *e["labels"][1:]]] and set(labels[18:]) == {-100}
    assert padding_free(PadCollator(0)(token_examples([300, 200], 50)), 0, 2048)["input_ids"].shape == (1, 512)


def test_only_plain_right_padded_batches_are_flattened():
    batch = PadCollator(0)(token_examples([6, 9, 3], 50))
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))
    labelled_pad = dict(batch, labels=batch["input_ids"].clone())
    packed = {k: v for k, v in batch.items() if k != "attention_mask"} | {"position_ids": batch["input_ids"] * 0}
    for other in (left, labelled_pad, packed):
        assert padding_free(other, 0, 2048) is None


def test_same_loss_and_gradients_as_the_padded_rows(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = PadCollator(model.config.pad_token_id or 0)(token_examples([20, 7, 13, 2], model.config.vocab_size))
    results = []
    for b in (batch, padding_free(batch, model.config.pad_token_id or 0, 256)):
        model.zero_grad(set_to_none=True)
        out = model(**b, use_cache=False)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (loss2, grads2) = results
    assert torch.allclose(loss, loss2, rtol=1e-5)
    for g, g2 in zip(grads, grads2, strict=True):
        assert torch.allclose(g, g2, rtol=1e-4, atol=1e-6)


def test_the_feed_flattens_counts_and_gives_offsets():
    batch = PadCollator(0, 128)(token_examples([6, 9, 3], 50))
    feed = StepFeed(iter([batch]), 1, torch.device("cpu"), 0, boundaries=True, padding_mask=False, flatten_to=1024)
    step = feed.take()
    b = step.batches[0]
    assert b["input_ids"].shape == (1, 128) and "attention_mask" not in b
    assert step.seen == 18 and step.labelled == 4 + 7 + 1
    assert b[BOUNDARIES_KEY][:5].tolist() == [0, 6, 15, 18, 128]
    # stand-ins of the other lengths, to capture their graphs before step 1
    assert [s["input_ids"].shape[1] for s in feed.other_shapes(step)] == [256, 512, 1024]
    # packed rows are never flattened, and keep their one shape: no stand-ins
    packed = {"input_ids": torch.ones(2, 64, dtype=torch.long), "labels": torch.ones(2, 64, dtype=torch.long),
              "position_ids": torch.arange(64).repeat(2, 1)}
    feed = StepFeed(iter([packed]), 1, torch.device("cpu"), 0, boundaries=True, padding_mask=False, flatten_to=1024)
    step = feed.take()
    assert step.batches[0]["input_ids"].shape == (2, 64) and feed.other_shapes(step) == []
    # without the offsets (no flash varlen attention) the rows stay padded
    plain = StepFeed(iter([batch]), 1, torch.device("cpu"), 0, padding_mask=False, flatten_to=1024).take()
    assert plain.batches[0]["input_ids"].shape == (3, 128)
