"""Sequence packing: several examples in one row of at most `max_length` tokens, with no attention
across examples.

Each packed row carries `position_ids` that restart at 0 for every example. transformers (checked in
5.17 and 5.23, `masking_utils._preprocess_mask_arguments` / `find_packed_sequence_indices`) turns
restarting position ids into a block-diagonal causal mask for sdpa, eager and flex attention, and
flash-attention 2 reads them as variable-length boundaries — but only when `attention_mask` is None and
there is no KV cache. A 2D all-ones mask, or a forward call without `use_cache=False` (the model then
makes a DynamicCache), silently disables the detection and lets examples attend to each other. So packed
batches carry no `attention_mask` (see `PadCollator`), and must be run with `use_cache=False`.
The first label of every example is set to -100: in a pack it would be predicted from the previous
example's last token; unpacked, the model's label shift never scores it either, so the packed loss equals
the unpacked one.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from loraforge.data.tokenize import IGNORE_INDEX


def pack_groups(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: lists of example indices whose lengths sum to <= max_length.

    Longest first, each into the fullest row that still has room (a sorted list of free space and
    bisect: O(n log n) plus list inserts), which typically fills rows to well over 90%.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    free: list[tuple[int, int]] = []  # (free tokens, row id), sorted
    rows: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length {max_length}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def pack_examples(examples: Sequence[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Concatenate examples into one row with restarting position ids (first label of each masked)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [IGNORE_INDEX, *e["labels"][1:]] if n else []
        positions += range(n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class PackedView(Sequence):
    """Packed rows over an indexable dataset (a list or a TokenStore), built on access."""

    def __init__(self, base: Sequence[dict[str, Any]], groups: list[list[int]]):
        self.base = base
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return pack_examples([self.base[j] for j in self.groups[i]])


def pack_dataset(examples: Sequence[dict[str, Any]], max_length: int, lengths: Sequence[int] | None = None):
    """Packed rows: a list when `examples` is a list (in memory anyway), else a lazy `PackedView`."""
    if lengths is None:
        lengths = [len(e["input_ids"]) for e in examples]
    groups = pack_groups(lengths, max_length)
    if isinstance(examples, list):
        return [pack_examples([examples[j] for j in g]) for g in groups]
    return PackedView(examples, groups)


def boundaries(position_ids: torch.Tensor, *, min_capacity: int = 64) -> torch.Tensor:
    """Where each example of a packed batch starts, its rows laid end to end: int32 offsets, then the
    total, as variable-length attention takes them (cu_seqlens).

    An example starts wherever the position ids do not step by one, as transformers reads them
    (`find_packed_sequence_indices`), and at every row's first token. The list is padded with the total
    (empty examples) to a power-of-two capacity of at least 64, so that CUDA graphs see one shape for
    ordinary batches: with 16, 4x512 Alpaca batches came in two shapes and the second one's capture
    (a step on the ordinary checkpoint, then the capture) made the first 10 steps 2x slower
    (train-e2e-2026-12-03-h200-s10-call3.json). An empty example costs the kernel next to nothing.
    On the host, from the host copy: the device never has to report a count.
    """
    rows, length = position_ids.shape
    prev = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=1)
    starts = position_ids - prev != 1
    starts[:, 0] = True
    at = starts.reshape(-1).nonzero().flatten()
    capacity = max(min_capacity, 1 << (len(at) - 1).bit_length())
    out = torch.full((capacity + 1,), rows * length, dtype=torch.int32)
    out[:len(at)] = at
    return out


def right_padded(batch: dict[str, torch.Tensor]) -> bool:
    """Each row's real tokens come first and the padding after them carries no label: the layout in which
    dropping the padding changes no loss or gradient."""
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    if mask is None or labels is None:
        return False
    return bool((mask[:, :-1] >= mask[:, 1:]).all()) and bool((labels[mask == 0] == IGNORE_INDEX).all())


def bucket_lengths(top: int) -> list[int]:
    """The row lengths `padding_free` pads to: `top` (a power of two) and its halves down to an eighth of it,
    so that CUDA graphs see at most four shapes, each at most twice the tokens it holds (or 128)."""
    return sorted({max(128, top >> i) for i in range(4)})


def padding_free(batch: dict[str, torch.Tensor], pad_token_id: int, top: int) -> dict[str, torch.Tensor] | None:
    """A right-padded batch's rows laid end to end in one row, as a packed row is (position ids restarting at
    every example, each example's first label -100), then padded to the shortest of `bucket_lengths(top)`
    that holds them. The padding is an example of its own, unlabelled. The loss and gradients are the
    unpacked batch's (every example attends only to itself, and the label shift scores the same tokens);
    the step computes the real tokens and a little padding instead of rows × the longest row.
    None when the batch is not a plain right-padded SFT batch."""
    if set(batch) != {"input_ids", "attention_mask", "labels"} or not right_padded(batch):
        return None
    lengths = batch["attention_mask"].sum(1).tolist()
    total = sum(lengths)
    length = next((b for b in bucket_lengths(top) if b >= total), -(-total // 128) * 128)
    ids = torch.full((1, length), pad_token_id, dtype=batch["input_ids"].dtype)
    labels = torch.full((1, length), IGNORE_INDEX, dtype=batch["labels"].dtype)
    positions = torch.zeros((1, length), dtype=torch.long)
    at = 0
    for row, n in enumerate(lengths):
        if n == 0:
            continue
        ids[0, at:at + n] = batch["input_ids"][row, :n]
        labels[0, at + 1:at + n] = batch["labels"][row, 1:n]
        positions[0, at:at + n] = torch.arange(n)
        at += n
    positions[0, at:] = torch.arange(length - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def bucket_batch(length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A stand-in flattened batch of one bucket's length (examples of 128 tokens, every label set), to
    capture that shape's CUDA graphs before step 1; its gradients are dropped."""
    ids = torch.full((1, length), pad_token_id, dtype=torch.long)
    positions = (torch.arange(length) % 128).unsqueeze(0)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}
