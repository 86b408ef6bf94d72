"""Text-overlap metrics of generated answers against references, all on a 0–1 scale.

BLEU is sacreBLEU's corpus BLEU (13a tokenizer) divided by 100; ROUGE is Google's `rouge-score` with
the Porter stemmer, F-measure averaged over pairs. Both are the standard English implementations, so
our numbers can be compared with papers and other tools.

`bootstrap_intervals` gives each metric's spread over the pairs: a percentile bootstrap that resamples the
pairs (with replacement) and recomputes the corpus metric, BLEU from resampled n-gram counts rather than
from an average of sentence BLEUs. `paired_bootstrap` does the same for the difference of two systems on
the same references, resampling both with the same indices.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SCORED = ("bleu", *ROUGE_TYPES)


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


class _PairScores:
    """Per-pair sufficient statistics: BLEU's n-gram counts (summed over any subset they give that subset's
    corpus BLEU) and each pair's ROUGE F-measures (averaged)."""

    def __init__(self, references: Sequence[str], hypotheses: Sequence[str]) -> None:
        _check_pairs(references, hypotheses)
        self._bleu = BLEU()
        # sacreBLEU 2.x keeps the per-segment counts behind these two methods (corpus_score is their sum
        # followed by the score); a test checks that the full sample reproduces `bleu()` exactly.
        self.bleu_stats = np.asarray(self._bleu._extract_corpus_statistics(list(hypotheses), [list(references)]),
                                     dtype=np.int64)
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
        scores = [scorer.score(r, h) for r, h in zip(references, hypotheses, strict=True)]
        self.rouge = {k: np.asarray([s[k].fmeasure for s in scores]) for k in ROUGE_TYPES}

    def metrics(self, idx: np.ndarray) -> np.ndarray:
        """(resamples, 4) array of bleu, rouge1, rouge2, rougeL, one row per row of pair indices `idx`."""
        sums = self.bleu_stats[idx].sum(axis=1)  # (resamples, counts)
        bleu = [self._bleu._compute_score_from_stats(row.tolist()).score / 100.0 for row in sums]
        return np.column_stack([bleu, *(self.rouge[k][idx].mean(axis=1) for k in ROUGE_TYPES)])


def _resample(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def bootstrap_intervals(references: Sequence[str], hypotheses: Sequence[str], *, resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """Percentile bootstrap interval `[low, high]` of `bleu`, `rouge1`, `rouge2`, `rougeL` over the pairs."""
    scores = _PairScores(references, hypotheses).metrics(_resample(len(references), resamples, seed))
    return {k: _interval(scores[:, i], level) for i, k in enumerate(SCORED)}


def paired_bootstrap(references: Sequence[str], base: Sequence[str], tuned: Sequence[str], *, resamples: int = 1000,
                     level: float = 0.95, seed: int = 0) -> dict[str, dict[str, float | list[float]]]:
    """`tuned - base` per metric: the difference on all pairs, its interval, and the share of resamples in
    which `tuned` scores higher (both systems scored on the same resampled references)."""
    idx = _resample(len(references), resamples, seed)
    full = np.arange(len(references))[None, :]
    a, b = _PairScores(references, base), _PairScores(references, tuned)
    diff = b.metrics(idx) - a.metrics(idx)
    point = (b.metrics(full) - a.metrics(full))[0]
    return {k: {"difference": float(point[i]), "interval": _interval(diff[:, i], level),
                "share_higher": float((diff[:, i] > 0).mean())} for i, k in enumerate(SCORED)}


def perplexity_interval(nll: Sequence[float], tokens: Sequence[int], *, resamples: int = 1000, level: float = 0.95,
                        seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the token-weighted perplexity exp(sum nll / sum tokens), resampling
    the examples (per-example summed NLL and labelled-token counts)."""
    nll_a, tok_a = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if len(nll_a) == 0 or len(nll_a) != len(tok_a):
        raise ValueError(f"perplexity_interval needs one token count per NLL and at least one; got {len(nll_a)} "
                         f"NLL(s) and {len(tok_a)} count(s).")
    idx = _resample(len(nll_a), resamples, seed)
    return _interval(np.exp(nll_a[idx].sum(axis=1) / np.maximum(tok_a[idx].sum(axis=1), 1)), level)
