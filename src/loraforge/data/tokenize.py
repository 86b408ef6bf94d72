"""Segments → input ids and labels, masking everything that is not trained on.

Labels follow the Hugging Face causal-LM convention: `labels[t] = input_ids[t]` where trained, -100
elsewhere; the model shifts them internally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraforge.data.templates import Segments

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def num_labels(self) -> int:
        return sum(1 for v in self.labels if v != IGNORE_INDEX)


def encode_segments(segments: Segments, tokenizer: Any, max_length: int, *, train_on_inputs: bool = False,
                    add_special_tokens: bool = True, append_eos: bool = False) -> Encoded:
    """Tokenize the whole text at once (so tokens merge across segment borders exactly as they will at
    inference), then label each token whose characters overlap a trainable segment.

    `add_special_tokens`: let the tokenizer add its BOS (Alpaca and raw text); chat templates write their
    own. `append_eos`: add the EOS id after the text, labelled, so the model learns to stop.
    """
    text = "".join(s for s, _ in segments)
    spans, pos = [], 0
    for s, trainable in segments:
        if trainable or train_on_inputs:
            spans.append((pos, pos + len(s)))
        pos += len(s)
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    labels: list[int] = []
    span_i = 0
    for tok_id, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        while span_i < len(spans) and spans[span_i][1] <= start:
            span_i += 1
        trained = end > start and span_i < len(spans) and start < spans[span_i][1] and end > spans[span_i][0]
        labels.append(tok_id if trained else IGNORE_INDEX)
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)
