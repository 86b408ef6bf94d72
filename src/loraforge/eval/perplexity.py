"""Perplexity of a causal LM over a held-out set: exp(mean negative log-likelihood per labelled token).

The mean is taken over every labelled token of the whole set (token-weighted), not over batches: a
mean of per-batch losses over-weights batches with few labelled tokens. The NLL is summed from the logits in float32
here rather than read from `model(...).loss`, which is already a per-batch mean (and in bf16/fp16
on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from loraforge.errors import DataError
from loraforge.model.runtime import eval_mode, model_device
from loraforge.progress import track

IGNORE_INDEX = -100


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sum of token NLL and the number of labelled tokens for unshifted HF-style labels.

    `logits` is (batch, seq, vocab) and `labels` (batch, seq) with -100 where not scored; the label at
    position t is predicted by the logits at t-1, so position 0 is never scored.
    """
    shift_labels = labels[:, 1:].to(logits.device)
    mask = shift_labels != IGNORE_INDEX
    n_tokens = int(mask.sum())
    if n_tokens == 0:
        return 0.0, 0
    # Select the scored rows before the float32 cast: (tokens, vocab) instead of (batch, seq, vocab),
    # which at a 128k vocabulary is the difference between megabytes and gigabytes.
    scored = logits[:, :-1][mask].float()
    nll = F.cross_entropy(scored, shift_labels[mask], reduction="sum")
    return float(nll), n_tokens


def _perplexity(total_nll: float, n_tokens: int) -> float:
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return math.inf


class PerplexityEvaluator:
    """Perplexity of `model` on labelled batches or on one long text (strided sliding window)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def evaluate(self, dataloader: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float | int]:
        """`loss` (mean token NLL), `perplexity` and `tokens` (labelled tokens counted) over all batches.

        Batches are dicts with `input_ids`, `attention_mask` and unshifted `labels` (-100 = not scored);
        `position_ids` is passed on when present (packed sequences). The model is put in eval mode and
        returned to its previous mode afterwards.
        """
        total_nll, total_tokens = 0.0, 0
        with eval_mode(self.model), torch.no_grad():
            for batch in track(dataloader, "perplexity"):
                nll, n = self._batch_nll(batch)
                total_nll += nll
                total_tokens += n
        if total_tokens == 0:
            raise DataError(
                "Perplexity: the evaluation set has no labelled tokens (every label is -100). "
                "Check that the validation examples keep their responses after truncation, "
                "or train/evaluate on all tokens."
            )
        return {"loss": total_nll / total_tokens, "perplexity": _perplexity(total_nll, total_tokens),
                "tokens": total_tokens}

    def compute_perplexity(self, dataloader: Iterable[Mapping[str, torch.Tensor]]) -> float:
        """exp(total NLL / labelled tokens) over the whole dataloader."""
        return float(self.evaluate(dataloader)["perplexity"])

    def evaluate_sliding(self, text_or_ids: str | list[int] | torch.Tensor, max_length: int,
                         stride: int) -> dict[str, float | int]:
        """`loss`, `perplexity` and `tokens` of one long sequence, scored in windows of `max_length`.

        Windows start every `stride` tokens; each window scores only the tokens the previous windows
        did not, so every token is counted at most once and, with `stride < max_length`, tokens 1..N-1
        are counted exactly once with at least `max_length - stride` tokens of context. With
        `stride == max_length` (no overlap) the first token of each window has no context and is skipped.
        """
        if not 0 < stride <= max_length:
            raise ValueError(f"Sliding perplexity needs 0 < stride <= max_length; got stride={stride}, "
                             f"max_length={max_length}.")
        ids = self._to_ids(text_or_ids)
        seq_len = ids.size(0)
        device = model_device(self.model)
        total_nll, total_tokens = 0.0, 0
        prev_end = 0
        with eval_mode(self.model), torch.no_grad():
            for begin in range(0, seq_len, stride):
                end = min(begin + max_length, seq_len)
                window = ids[begin:end].unsqueeze(0).to(device)
                labels = window.clone()
                # Score only tokens past the previous window's end; earlier ones are context.
                labels[:, : prev_end - begin] = IGNORE_INDEX
                logits = _logits(self.model(input_ids=window, attention_mask=torch.ones_like(window)))
                nll, n = summed_nll(logits, labels)
                total_nll += nll
                total_tokens += n
                prev_end = end
                if end == seq_len:
                    break
        if total_tokens == 0:
            raise DataError(f"Sliding perplexity: the text has {seq_len} token(s); at least 2 are needed.")
        return {"loss": total_nll / total_tokens, "perplexity": _perplexity(total_nll, total_tokens),
                "tokens": total_tokens}

    def compute_perplexity_sliding(self, text_or_ids: str | list[int] | torch.Tensor, max_length: int,
                                   stride: int) -> float:
        """Perplexity of one text longer than the context, by the strided sliding window."""
        return float(self.evaluate_sliding(text_or_ids, max_length, stride)["perplexity"])

    def _batch_nll(self, batch: Mapping[str, torch.Tensor]) -> tuple[float, int]:
        device = model_device(self.model)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        labels = batch["labels"]
        if int((labels[:, 1:] != IGNORE_INDEX).sum()) == 0:
            return 0.0, 0  # nothing to score: skip the forward pass
        return summed_nll(_logits(self.model(**inputs)), labels)

    def _to_ids(self, text_or_ids: str | list[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(text_or_ids, str):
            if self.tokenizer is None:
                raise ValueError("Sliding perplexity of a string needs a tokenizer; pass token ids instead.")
            return torch.tensor(self.tokenizer(text_or_ids)["input_ids"], dtype=torch.long)
        ids = torch.as_tensor(text_or_ids, dtype=torch.long)
        if ids.dim() == 2 and ids.size(0) == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"Sliding perplexity takes one sequence; got ids of shape {tuple(ids.shape)}.")
        return ids


def _logits(output: Any) -> torch.Tensor:
    # HF models return a ModelOutput; a bare module may return the logits tensor itself.
    return output if isinstance(output, torch.Tensor) else output.logits
