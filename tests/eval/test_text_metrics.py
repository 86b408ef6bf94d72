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
