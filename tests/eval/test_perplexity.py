from __future__ import annotations

import itertools
import math

import pytest
import torch
from eval_components import PAIRS, build_llama, supervised_batch

from loraforge.errors import DataError
from loraforge.eval import PerplexityEvaluator

# A bigram "model" whose next-token distribution depends only on the current token: P[current, next].
# Its logits are log P, so every token's NLL can be written down by hand.
P = torch.tensor([[0.5, 0.25, 0.25],
                  [0.1, 0.2, 0.7],
                  [0.6, 0.3, 0.1]])


class Bigram(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("log_p", P.log())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_p[input_ids]


def nll(prev: int, nxt: int) -> float:
    return -math.log(P[prev, nxt].item())


def batch(ids: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor(ids)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.tensor(labels)}


def test_hand_computed_perplexity_with_prompt_masked_and_shifted_labels():
    # Sequence 0 1 2 0 with the prompt "0 1" masked: scored are 2 after 1 and 0 after 2.
    data = [batch([[0, 1, 2, 0]], [[-100, -100, 2, 0]])]
    expected_loss = (nll(1, 2) + nll(2, 0)) / 2  # -(log 0.7 + log 0.6) / 2
    result = PerplexityEvaluator(Bigram()).evaluate(data)
    assert result["tokens"] == 2
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert PerplexityEvaluator(Bigram()).compute_perplexity(data) == pytest.approx(math.exp(expected_loss), rel=1e-6)


def test_token_weighted_over_the_whole_set_not_mean_of_batches():
    # Batch A: one cheap token (0 after 2, p=0.6). Batch B: five dearer ones.
    a = batch([[2, 0]], [[-100, 0]])
    b = batch([[0, 1, 0, 1, 0, 2]], [[-100, 1, 0, 1, 0, 2]])
    nll_a = [nll(2, 0)]
    nll_b = [nll(0, 1), nll(1, 0), nll(0, 1), nll(1, 0), nll(0, 2)]
    global_mean = (sum(nll_a) + sum(nll_b)) / 6
    mean_of_batch_means = (sum(nll_a) / 1 + sum(nll_b) / 5) / 2
    assert abs(global_mean - mean_of_batch_means) > 0.3  # the test can tell the two apart

    result = PerplexityEvaluator(Bigram()).evaluate([a, b])
    assert result["tokens"] == 6
    assert result["perplexity"] == pytest.approx(math.exp(global_mean), rel=1e-6)


def test_no_labelled_tokens_is_a_clear_error():
    with pytest.raises(DataError, match="no labelled tokens"):
        PerplexityEvaluator(Bigram()).evaluate([batch([[0, 1, 2]], [[-100, -100, -100]])])


def test_padding_and_batching_do_not_change_perplexity(tokenizer):
    model = build_llama(len(tokenizer))
    evaluator = PerplexityEvaluator(model, tokenizer)
    one_by_one = evaluator.evaluate([supervised_batch(tokenizer, [pair]) for pair in PAIRS])
    all_at_once = evaluator.evaluate([supervised_batch(tokenizer, PAIRS)])
    extra_padding = evaluator.evaluate([supervised_batch(tokenizer, PAIRS, pad_to=60)])
    uneven = evaluator.evaluate([supervised_batch(tokenizer, PAIRS[:2], pad_to=40),
                                 supervised_batch(tokenizer, PAIRS[2:])])
    for other in (all_at_once, extra_padding, uneven):
        assert other["tokens"] == one_by_one["tokens"]
        assert other["perplexity"] == pytest.approx(one_by_one["perplexity"], rel=1e-5)


def test_masked_trailing_tokens_do_not_count(tokenizer):
    # Tokens after the answer that carry no label (attended, unlike padding) change no scored position.
    model = build_llama(len(tokenizer))
    plain = supervised_batch(tokenizer, PAIRS[:1])
    extra = {k: v.clone() for k, v in plain.items()}
    tail = torch.tensor([[5, 6, 7, 8]])
    extra["input_ids"] = torch.cat([extra["input_ids"], tail], dim=1)
    extra["attention_mask"] = torch.cat([extra["attention_mask"], torch.ones_like(tail)], dim=1)
    extra["labels"] = torch.cat([extra["labels"], torch.full_like(tail, -100)], dim=1)
    evaluator = PerplexityEvaluator(model, tokenizer)
    assert evaluator.compute_perplexity([extra]) == pytest.approx(evaluator.compute_perplexity([plain]), rel=1e-5)


def test_agrees_with_transformers_loss_on_one_batch(tokenizer):
    model = build_llama(len(tokenizer))
    data = supervised_batch(tokenizer, PAIRS)
    with torch.no_grad():
        hf_loss = model(**data).loss.item()  # HF's mean over the same shifted, masked tokens
    assert PerplexityEvaluator(model).evaluate([data])["loss"] == pytest.approx(hf_loss, rel=1e-5)


def test_eval_mode_during_and_training_mode_restored(tokenizer):
    # With dropout 0.5 in train mode the two results would differ.
    model = build_llama(len(tokenizer), attention_dropout=0.5).train()
    evaluator = PerplexityEvaluator(model)
    data = [supervised_batch(tokenizer, PAIRS)]
    assert evaluator.compute_perplexity(data) == evaluator.compute_perplexity(data)
    assert model.training


@pytest.mark.parametrize(("max_length", "stride"), [(4, 1), (5, 2), (8, 3), (50, 10)])
def test_sliding_window_counts_each_token_once(max_length, stride):
    # For a bigram model context beyond one token is irrelevant, so any window must give the exact
    # full-sequence value, and every token but the first is scored exactly once.
    ids = [0, 1, 2, 0, 0, 2, 1, 1, 0, 2, 2, 1, 0, 1, 2, 0, 1]
    expected = sum(nll(a, b) for a, b in itertools.pairwise(ids)) / (len(ids) - 1)
    result = PerplexityEvaluator(Bigram()).evaluate_sliding(ids, max_length=max_length, stride=stride)
    assert result["tokens"] == len(ids) - 1
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_sliding_without_overlap_skips_window_starts():
    ids = list(range(3)) * 4  # 12 tokens, windows [0:4] [4:8] [8:12]
    result = PerplexityEvaluator(Bigram()).evaluate_sliding(ids, max_length=4, stride=4)
    assert result["tokens"] == 3 * 3


def test_sliding_on_text_matches_full_context_when_it_fits(tokenizer):
    model = build_llama(len(tokenizer))
    text = " ".join(answer for _, answer in PAIRS)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    full = PerplexityEvaluator(model).evaluate([{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                  "labels": ids}])
    sliding = PerplexityEvaluator(model, tokenizer).evaluate_sliding(text, max_length=256, stride=128)
    assert sliding["tokens"] == ids.shape[1] - 1
    assert sliding["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    # A shorter window sees less context, so on a real model the value moves, but every token still counts once.
    short = PerplexityEvaluator(model, tokenizer).evaluate_sliding(text, max_length=8, stride=4)
    assert short["tokens"] == ids.shape[1] - 1


def test_sliding_rejects_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        PerplexityEvaluator(Bigram()).evaluate_sliding([0, 1, 2], max_length=4, stride=5)
