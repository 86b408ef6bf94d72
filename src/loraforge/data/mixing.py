"""Combined mode: several sources in one training set.

Each source is read, split and tokenized on its own (with its own format and column mapping, through the
cache). Then the training examples are drawn:
  weighted: the mixed set keeps the total size of all sources; source i gets round(total × w_i / Σw)
            examples — all of its examples once (in a seeded order) and, if its share is larger than the
            source, repeats; if smaller, a seeded subset.
  balanced: every source is oversampled (whole copies plus a seeded remainder) to the size of the largest,
            so each contributes equally per epoch and no example is discarded.
Validation sets are concatenated unchanged. The log and `DataStats.mix` report what was actually drawn.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from loraforge.config import DataConfig
from loraforge.data.load import load_source
from loraforge.data.types import DataStats, SourceData, SourceSpec
from loraforge.errors import DataError


def draw(n_have: int, n_want: int, rng: random.Random) -> list[int]:
    """n_want indices into range(n_have): whole seeded permutations, then a seeded remainder."""
    out: list[int] = []
    while len(out) + n_have <= n_want:
        perm = list(range(n_have))
        rng.shuffle(perm)
        out += perm
    out += rng.sample(range(n_have), n_want - len(out))
    return out


def mix_counts(sizes: list[int], weights: list[float], mode: str) -> list[int]:
    if mode == "balanced":
        return [max(sizes)] * len(sizes)
    total, wsum = sum(sizes), sum(weights)
    return [max(1, round(total * w / wsum)) for w in weights]


class MixedView(Sequence):
    """Examples drawn from several indexable sources: (source, index) pairs, looked up on access."""

    def __init__(self, parts: list[Sequence[dict[str, Any]]], index: list[tuple[int, int]]):
        self.parts, self.index = parts, index

    @property
    def lengths(self) -> list[int]:
        own = [getattr(p, "lengths", None) for p in self.parts]
        return [int(own[s][i]) if own[s] is not None else len(self.parts[s][i]["input_ids"]) for s, i in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        s, i = self.index[k]
        return self.parts[s][i]


def source_config(cfg: DataConfig, i: int) -> DataConfig:
    """`data.sources[i]` as a single-source DataConfig that reads it as combined mode does: its own path, format,
    column mapping, split and sample cap, the shared rendering settings (template, max_length, ...)."""
    src = cfg.sources[i]
    return dataclasses.replace(cfg, dataset=src.path, format=src.format, column_mapping=src.column_mapping,
                               split=src.split, max_samples=src.max_samples or cfg.max_samples, sources=[])


def mix_sources(cfg: DataConfig, tokenizer: Any) -> SourceData:
    """Load every source of `cfg.sources` and draw the mixed training split (unpacked: packing comes after).

    Each source is read and rendered in its own format (alpaca, chat, CSV with its own column mapping ...).
    The result carries the kind (prompt format) of the heaviest source and the held-out records of every
    source of that kind, for generation-time evaluation; when the kinds differ a note in the stats says so."""
    loaded: list[SourceData] = []
    names: list[str] = []
    for i, src in enumerate(cfg.sources):
        spec = SourceSpec(src.path, src.format, src.column_mapping, src.split, src.max_samples)
        data = load_source(spec, cfg, tokenizer)
        if not len(data.train):
            raise DataError(f"data.sources[{i}] ({src.path!r}): no usable training example "
                            f"({data.stats['train'].line('train')}).")
        loaded.append(data)
        name = src.path if src.path not in names else f"{src.path}#{i}"
        names.append(name)

    sizes = [len(d.train) for d in loaded]
    counts = mix_counts(sizes, [s.weight for s in cfg.sources], cfg.mixing)
    rng = random.Random(cfg.seed)
    index = [(s, j) for s, (have, want) in enumerate(zip(sizes, counts, strict=True)) for j in draw(have, want, rng)]
    rng.shuffle(index)

    stats = {"train": DataStats(), "validation": DataStats()}
    for split in ("train", "validation"):
        for data in loaded:
            stats[split].add(data.stats[split])
        states = {d.stats[split].cache for d in loaded}
        stats[split].cache = states.pop() if len(states) == 1 else "partial"
    total = sum(counts)
    for name, data, have, want in zip(names, loaded, sizes, counts, strict=True):
        stats["train"].sources[name] = want
        stats["train"].mix[name] = {"records": have, "drawn": want, "share": want / total, "format": data.fmt,
                                    "repeated": max(0, want - have), "left_out": max(0, have - want)}
    how = ("balanced: every source oversampled to the largest source's size" if cfg.mixing == "balanced"
           else "weighted: each source's share of the total follows its weight (repeats where the share is "
                "larger than the source, a seeded subset where smaller)")
    stats["train"].notes.append(f"combined mode, {how}")
    for s in stats.values():
        s.first_errors = s.first_errors[:5]

    if all(isinstance(d.train, list) for d in loaded):
        train: Sequence[dict[str, Any]] = [loaded[s].train[j] for s, j in index]
    else:
        train = MixedView([d.train for d in loaded], index)
    validation: Sequence[dict[str, Any]]
    if all(isinstance(d.validation, list) for d in loaded):
        validation = [e for d in loaded for e in d.validation]
    else:
        validation = MixedView([d.validation for d in loaded],
                               [(s, j) for s, d in enumerate(loaded) for j in range(len(d.validation))])
    # Generation-time evaluation needs one prompt format: that of the heaviest source; its held-out
    # records supply the (prompt, reference) pairs.
    main = max(range(len(loaded)), key=lambda s: (counts[s], -s))
    kind = loaded[main].kind
    if len({d.kind for d in loaded}) > 1:
        stats["train"].notes.append(_kinds_note(names, loaded, names[main]))
    records = [r for d in loaded if d.kind == kind for r in d.eval_records]
    return SourceData(train, validation, loaded[main].fmt, kind, stats, records)


def _kinds_note(names: list[str], loaded: list[SourceData], main: str) -> str:
    """Sources of several prompt formats each train in their own; prompts at inference take one of them."""
    by_kind: dict[str, list[str]] = {}
    for name, data in zip(names, loaded, strict=True):
        by_kind.setdefault(data.kind, []).append(f"{name} ({data.fmt})")
    listed = "; ".join(f"{kind}: {', '.join(found)}" for kind, found in by_kind.items())
    kind = next(d.kind for n, d in zip(names, loaded, strict=True) if n == main)
    return (f"the sources mix prompt formats, each trained in its own ({listed}); generation (eval, chat, "
            f"generate, serve) renders prompts as {kind}, the format of the largest share ({main})")
