"""Which examples go into which micro-batch: seeded, sharded across processes, resumable by position.

The data stream is one sequence of micro-batches over all epochs. Micro-batch m belongs to epoch
m // per_epoch; each epoch's order is a permutation seeded by (seed, epoch). So the whole stream is a
pure function of (seed, m): resuming at optimizer step s means starting at m = s × accumulation, with
no state beyond the step counter — the property exact resume rests on. A streamed training set
(`data.streaming`, data/stream.py) has no order to permute: its micro-batches come with the stream
position after them, which `StepFeed` hands on with each step for the checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from loraforge.data.packing import boundaries, bucket_batch, bucket_lengths, padding_free, right_padded
from loraforge.kernels.packed import BOUNDARIES_KEY


class MicroBatchStream:
    def __init__(self, lengths: list[int], batch_size: int, *, seed: int, world_size: int = 1, rank: int = 0,
                 group_by_length: bool = False):
        if not lengths:
            raise ValueError("no examples to batch")
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.group_by_length = group_by_length
        per_rank = -(-len(lengths) // world_size)  # ceil: every rank sees the same number of batches
        self.per_epoch = -(-per_rank // batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        n = len(self.lengths)
        order = list(range(n))
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        if self.group_by_length:
            # Sort within windows of 50 batches, then shuffle the batches: similar lengths share a batch
            # (less padding) while the epoch stays randomly ordered.
            window = self.batch_size * self.world_size * 50
            chunks = [sorted(order[i:i + window], key=lambda j: -self.lengths[j]) for i in range(0, n, window)]
            order = [j for c in chunks for j in c]
        # Pad by wrapping around so every rank gets the same count (DDP needs equal step counts).
        total = self.per_epoch * self.batch_size * self.world_size
        order = (order * (total // n + 1))[:total]
        batches = [order[i:i + self.batch_size * self.world_size]
                   for i in range(0, total, self.batch_size * self.world_size)]
        if self.group_by_length:
            random.Random(self.seed * 7 + epoch).shuffle(batches)
        mine = [b[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] for b in batches]
        return [i for b in mine for i in b]

    def batches(self, start: int = 0) -> Iterator[tuple[int, list[int]]]:
        """Yield (global micro-batch index, example indices) forever, starting at index `start`."""
        m = start
        cached_epoch, order = -1, []
        while True:
            epoch, k = divmod(m, self.per_epoch)
            if epoch != cached_epoch:
                order, cached_epoch = self.epoch_order(epoch), epoch
            yield m, order[k * self.batch_size:(k + 1) * self.batch_size]
            m += 1


@dataclass
class StepInputs:
    """One optimizer step's micro-batches, on the device, and their token counts (host integers)."""

    batches: list[dict[str, torch.Tensor]]
    labelled: int  # tokens that carry a label (after the shift): the step's loss denominator
    seen: int  # real (non-padding) tokens fed
    position: Any = None  # streaming: the stream position after the step's last micro-batch


class StepFeed:
    """The training loop's micro-batches, one optimizer step at a time, loaded one step ahead.

    `prefetch()` collates and counts the next step's micro-batches on the host and queues their copy to
    the device; the trainer calls it after queueing a step's backward, so the loader's work runs while
    the GPU computes instead of in the gap between two steps. Counting here, on the host copies, also
    spares the step a device-to-host read of its token counts. Reading ahead does not move the data
    position: the trainer counts micro-batches as it takes them, and a resumed run restarts the stream
    from that count.
    """

    def __init__(self, batches: Iterator[Any], accumulation: int, device: torch.device,
                 pad_token_id: int | None, *, boundaries: bool = False, padding_mask: bool = True,
                 flatten_to: int | None = None):
        self.batches, self.accumulation, self.device, self.pad = batches, accumulation, device, pad_token_id
        # Packed batches also carry their examples' offsets, for a model whose attention takes them
        # instead of a mask (kernels/packed.py): counted here, on the host copy, like the tokens.
        self.boundaries = boundaries
        self.padding_mask = padding_mask  # False: right-padded batches go without it (`without_padding_mask`)
        # With the offsets: right-padded batches go as one row of their real tokens, padded to one of four
        # lengths up to `flatten_to` (`padding_free`), so a step computes no rows of padding and CUDA graphs
        # see few shapes.
        self.flatten_to = flatten_to if boundaries and pad_token_id is not None else None
        self.flattened = False  # whether a batch went flattened yet (packed data never does)
        self._next: StepInputs | None = None

    def prefetch(self) -> None:
        if self._next is None:
            self._next = self._load()

    def peek(self) -> StepInputs:
        self.prefetch()
        return self._next

    def take(self) -> StepInputs:
        self.prefetch()
        out, self._next = self._next, None
        return out

    def _load(self) -> StepInputs:
        micro = [next(self.batches) for _ in range(self.accumulation)]
        position = None
        if isinstance(micro[0], tuple):  # a stream's (micro-batch, position after it)
            position = micro[-1][1]
            micro = [b for b, _ in micro]
        labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        seen = sum(tokens_in(b, self.pad) for b in micro)
        if self.flatten_to:
            flat = [padding_free(b, self.pad, self.flatten_to) for b in micro]
            self.flattened |= any(f is not None for f in flat)
            micro = [f or b for f, b in zip(flat, micro, strict=True)]
        if self.boundaries:
            micro = [self._with_boundaries(b) for b in micro]
        if not self.padding_mask:
            micro = [without_padding_mask(b) for b in micro]
        # From pinned memory the copy is queued behind the running step; from pageable memory the driver
        # may first wait for the stream, and the host with it.
        pin = self.device.type == "cuda"
        on_device = [{k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) for k, v in b.items()}
                     for b in micro]
        return StepInputs(on_device, labelled, seen, position)

    @staticmethod
    def _with_boundaries(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "position_ids" in batch and "attention_mask" not in batch:
            return batch | {BOUNDARIES_KEY: boundaries(batch["position_ids"])}
        return batch

    def other_shapes(self, first: StepInputs) -> list[dict[str, torch.Tensor]]:
        """Stand-in batches, on the device, of every flattened length but the first step's: capturing their
        graphs before step 1 keeps the first steps off the ordinary checkpoint (none unless `first` came
        flattened: packed rows keep their one shape)."""
        if not self.flattened:
            return []
        seen = {tuple(b["input_ids"].shape) for b in first.batches}
        out = [self._with_boundaries(bucket_batch(n, self.pad)) for n in bucket_lengths(self.flatten_to)
               if (1, n) not in seen]
        return [{k: v.to(self.device) for k, v in b.items()} for b in out]


def without_padding_mask(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A right-padded training batch without its attention mask, when that changes no loss or gradient.

    Causal attention already keeps every real token from the padding after it, and the padding's own
    outputs carry no label. Given the mask, transformers reads it on the device to decide whether it may
    skip it: a host wait in every forward (bench/NOTES.md, session 11). A batch padded otherwise (a real
    token after padding, or a labelled padding position) keeps its mask."""
    return {k: v for k, v in batch.items() if k != "attention_mask"} if right_padded(batch) else batch


def tokens_in(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> int:
    """Real (non-padding) tokens in a batch; packed batches carry no attention mask."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if pad_token_id is None:
        return batch["input_ids"].numel()
    return int((batch["input_ids"] != pad_token_id).sum())
