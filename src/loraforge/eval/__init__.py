"""Evaluation: perplexity, generated-answer metrics (BLEU, ROUGE, exact match) and the comparison report."""

from __future__ import annotations

from loraforge.eval.perplexity import PerplexityEvaluator

__all__ = ["PerplexityEvaluator"]
