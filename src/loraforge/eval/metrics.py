"""Text-overlap metrics of generated answers against references, all on a 0–1 scale.

BLEU is sacreBLEU's corpus BLEU (13a tokenizer) divided by 100; ROUGE is Google's `rouge-score` with
the Porter stemmer, F-measure averaged over pairs. Both are the standard English implementations, so
our numbers can be compared with papers and other tools.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("References and hypotheses must be lists of strings, not a single string.")
    if len(references) != len(hypotheses):
        raise ValueError(f"Got {len(references)} reference(s) but {len(hypotheses)} hypothesis/hypotheses; "
                         "each generated answer needs exactly one reference.")
    if len(references) == 0:
        raise ValueError("No reference/hypothesis pairs to score.")


def bleu(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU in [0, 1] (sacreBLEU score / 100); empty hypotheses score 0."""
    _check_pairs(references, hypotheses)
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score / 100.0


def rouge(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure in [0, 1], keyed `rouge1`, `rouge2`, `rougeL`."""
    _check_pairs(references, hypotheses)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for ref, hyp in zip(references, hypotheses, strict=True):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: total / len(references) for key, total in totals.items()}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation (any Unicode P* character), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Fraction of pairs equal after `normalize_answer`."""
    _check_pairs(references, hypotheses)
    hits = sum(normalize_answer(r) == normalize_answer(h) for r, h in zip(references, hypotheses, strict=True))
    return hits / len(references)


def text_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """`bleu`, `rouge1`, `rouge2`, `rougeL` and `exact_match` in one dict."""
    return {"bleu": bleu(references, hypotheses), **rouge(references, hypotheses),
            "exact_match": exact_match(references, hypotheses)}
