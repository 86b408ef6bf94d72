"""Packing: a packed batch gives the same loss, and each token the same logits, as the examples unpacked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tinymodels import alpaca_records, chat_records, write_jsonl

from loraforge.config import DataConfig
from loraforge.data.collate import PadCollator
from loraforge.data.packing import pack_dataset, pack_examples, pack_groups
from loraforge.data.pipeline import build_datasets


def summed_loss(model, batch) -> tuple[float, int]:
    n = int((batch["labels"][:, 1:] != -100).sum())
    out = model(**batch, num_items_in_batch=torch.tensor(n), use_cache=False)
    return float(out.loss) * n, n


def test_pack_groups_fit_and_cover() -> None:
    lengths = [5, 9, 3, 7, 2, 8, 1, 10]
    groups = pack_groups(lengths, 10)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert len(groups) == 5  # 45 tokens in rows of 10: the best possible


@pytest.fixture(scope="module")
def examples(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("pack")
    a = build_datasets(DataConfig(dataset=str(write_jsonl(tmp / "a.jsonl", alpaca_records(6))),
                                  validation_split=0.0), tokenizer).train
    c = build_datasets(DataConfig(dataset=str(write_jsonl(tmp / "c.jsonl", chat_records(4))),
                                  validation_split=0.0), tokenizer).train
    return list(a) + list(c)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tiny_model_dir: Path, tokenizer, examples, attn: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32).eval()
    collate = PadCollator(tokenizer.pad_token_id)
    packed = pack_dataset(examples, 160)
    assert len(packed) < len(examples)
    pbatch = collate(packed)
    assert "attention_mask" not in pbatch  # a 2D mask would switch off transformers' packed-sequence masking
    with torch.no_grad():
        nll_packed, n_packed = summed_loss(model, pbatch)
        nll_plain, n_plain = summed_loss(model, collate(examples))
    assert n_packed == n_plain
    assert nll_packed == pytest.approx(nll_plain, rel=1e-5)
    # the same with an all-ones attention mask shows what goes wrong without the packed mask
    leaky = dict(pbatch, attention_mask=torch.ones_like(pbatch["input_ids"]))
    with torch.no_grad():
        nll_leaky, _ = summed_loss(model, leaky)
    # (a random tiny model is nearly uniform, so the leak is small in loss, yet far above float noise)
    assert abs(nll_leaky - nll_plain) > 100 * max(abs(nll_packed - nll_plain), 1e-4)


def test_logits_do_not_depend_on_pack_neighbours(tiny_model_dir: Path, examples) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a, b, c = examples[0], examples[1], examples[-1]

    def logits(rows):
        batch = PadCollator(0)(rows)
        batch.pop("labels")
        with torch.no_grad():
            return model(**batch, use_cache=False).logits  # a cache also switches the detection off

    alone = logits([b])[0, : len(b["input_ids"])]
    after_a = logits([pack_examples([a, b])])[0, len(a["input_ids"]):]
    after_c = logits([pack_examples([c, b])])[0, len(c["input_ids"]):]
    torch.testing.assert_close(after_a, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after_c, alone, rtol=1e-4, atol=1e-4)
    # and a batch of packed rows of different lengths (padding as its own block) changes nothing either
    two = logits([pack_examples([a, b]), pack_examples([c])])
    torch.testing.assert_close(two[0, len(a["input_ids"]):len(a["input_ids"]) + len(b["input_ids"])], alone,
                               rtol=1e-4, atol=1e-4)


def test_build_datasets_packs_train_only(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_records(20))
    data = build_datasets(DataConfig(dataset=str(path), packing=True, max_length=128, validation_split=0.2), tokenizer)
    s = data.stats["train"]
    assert s.packed_rows == len(data.train) < s.examples
    assert all(len(r["input_ids"]) <= 128 and "position_ids" in r for r in data.train)
    assert sum(r["position_ids"].count(0) for r in data.train) == s.examples
    assert "position_ids" not in data.validation[0]
