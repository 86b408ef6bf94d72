"""Evaluation: perplexity, generated-answer metrics (BLEU, ROUGE, exact match) and the comparison report."""

from __future__ import annotations

from loraforge.eval.metrics import bleu, exact_match, rouge, text_metrics
from loraforge.eval.perplexity import PerplexityEvaluator
from loraforge.eval.qualitative import QualitativeEvaluator
from loraforge.eval.report import plot_loss_curve, write_report

__all__ = ["PerplexityEvaluator", "QualitativeEvaluator", "bleu", "exact_match", "plot_loss_curve", "rouge",
           "text_metrics", "write_report"]
