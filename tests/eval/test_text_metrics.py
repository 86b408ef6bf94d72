from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from loraforge.eval import bleu, exact_match, rouge
from loraforge.eval.metrics import normalize_answer

REFERENCES = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "LoRA adds low-rank matrices to a frozen model.",
]
HYPOTHESES = [
    "The cat was sitting on the mat.",
    "The capital of France is Paris.",
    "LoRA trains small low-rank matrices beside frozen weights.",
]


def test_bleu_is_sacrebleu_corpus_score_over_100():
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score / 100
    assert 0 < expected < 1
    assert bleu(REFERENCES, HYPOTHESES) == pytest.approx(expected)
    # BLEU is not symmetric (brevity penalty, clipped counts): swapped arguments would give another number.
    assert sacrebleu.corpus_bleu(REFERENCES, [HYPOTHESES]).score / 100 != pytest.approx(expected)


def test_rouge_is_mean_f_measure_of_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_pair = [scorer.score(r, h) for r, h in zip(REFERENCES, HYPOTHESES, strict=True)]
    result = rouge(REFERENCES, HYPOTHESES)
    assert set(result) == {"rouge1", "rouge2", "rougeL"}
    for key in result:
        expected = sum(s[key].fmeasure for s in per_pair) / len(per_pair)
        assert result[key] == pytest.approx(expected)


def test_rouge_uses_the_stemmer():
    refs, hyps = ["The cats were running home"], ["the cat was run home"]
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(refs[0], hyps[0])["rouge1"].fmeasure
    assert rouge(refs, hyps)["rouge1"] > plain


def test_empty_hypotheses_score_zero_without_crashing():
    empty = ["", "", ""]
    assert bleu(REFERENCES, empty) == 0.0
    assert rouge(REFERENCES, empty) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert exact_match(REFERENCES, empty) == 0.0


def test_identical_texts_score_one():
    assert bleu(REFERENCES, REFERENCES) == pytest.approx(1.0)
    assert rouge(REFERENCES, REFERENCES)["rougeL"] == pytest.approx(1.0)
    assert exact_match(REFERENCES, REFERENCES) == 1.0


def test_mismatched_lengths_are_refused_with_the_counts():
    with pytest.raises(ValueError, match="3 reference.*2 hypothes"):
        bleu(REFERENCES, HYPOTHESES[:2])
    with pytest.raises(ValueError, match="3 reference.*2 hypothes"):
        rouge(REFERENCES, HYPOTHESES[:2])
    with pytest.raises(ValueError, match="3 reference.*2 hypothes"):
        exact_match(REFERENCES, HYPOTHESES[:2])


def test_a_bare_string_is_refused():
    with pytest.raises(TypeError, match="lists of strings"):
        bleu("Paris.", "Paris.")


def test_exact_match_normalizes_case_punctuation_and_spaces():
    assert normalize_answer("  Paris,  France! ") == "paris france"
    assert exact_match(["Paris."], ["  paris "]) == 1.0
    assert exact_match(["Paris", "Rome"], ["paris", "The Rome"]) == 0.5


# ---------------------------------------------------------------------------------------------------------
# Bootstrap intervals

BOOT_REFS = ["hi how are you doing today", "i like cats a lot", "the weather is nice today", "see you later",
             "what do you do for fun", "i am a student"] * 5
BOOT_HYPS = ["hi how are you", "i like dogs", "weather is nice", "bye see you", "what is fun", "i am a teacher"] * 5


def test_bootstrap_counts_reproduce_corpus_bleu_and_mean_rouge():
    import numpy as np

    from loraforge.eval.metrics import _PairScores

    point = _PairScores(BOOT_REFS, BOOT_HYPS).metrics(np.arange(len(BOOT_REFS))[None, :])[0]
    assert point[0] == pytest.approx(bleu(BOOT_REFS, BOOT_HYPS), abs=1e-12)
    assert list(point[1:]) == pytest.approx([rouge(BOOT_REFS, BOOT_HYPS)[k] for k in ("rouge1", "rouge2", "rougeL")])


def test_bootstrap_intervals_bracket_the_score_and_are_seeded():
    from loraforge.eval.metrics import bootstrap_intervals

    first = bootstrap_intervals(BOOT_REFS, BOOT_HYPS, resamples=300)
    assert first == bootstrap_intervals(BOOT_REFS, BOOT_HYPS, resamples=300)
    scores = {"bleu": bleu(BOOT_REFS, BOOT_HYPS), **rouge(BOOT_REFS, BOOT_HYPS)}
    for key, (low, high) in first.items():
        assert low <= scores[key] <= high and high - low > 0


def test_paired_bootstrap_of_a_system_against_itself_is_zero_and_a_better_one_is_positive():
    from loraforge.eval.metrics import paired_bootstrap

    same = paired_bootstrap(BOOT_REFS, BOOT_HYPS, BOOT_HYPS, resamples=200)
    assert all(v["difference"] == 0 and v["interval"] == [0, 0] and v["share_higher"] == 0 for v in same.values())
    better = paired_bootstrap(BOOT_REFS, BOOT_HYPS, BOOT_REFS, resamples=200)
    assert all(v["difference"] > 0 and v["interval"][0] > 0 and v["share_higher"] == 1 for v in better.values())


def test_perplexity_interval_is_token_weighted():
    import math

    from loraforge.eval.metrics import perplexity_interval

    nll, tokens = [2.0, 30.0, 4.0, 12.0], [1, 10, 2, 4]
    low, high = perplexity_interval(nll, tokens, resamples=500)
    assert low <= math.exp(sum(nll) / sum(tokens)) <= high
    assert perplexity_interval([6.0] * 4, [3] * 4) == pytest.approx([math.exp(2)] * 2)
    with pytest.raises(ValueError, match="one token count per NLL"):
        perplexity_interval([1.0], [])
