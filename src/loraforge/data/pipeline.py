"""From `DataConfig` to tokenized train/validation sets, with an account of every record.

`build_datasets` loads the configured source (load.py: read, split, tokenize, or take from the cache) or, in
combined mode (`data.sources`), loads each source and mixes them (mixing.py); then packs the training split
(`data.packing`, last), picks the held-out (prompt, reference) pairs for generation-time evaluation and the
prompt formatter. In streaming mode the training split stays a stream (stream.py). The data types are in
types.py.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from loraforge import progress
from loraforge.config import DataConfig
from loraforge.data.load import load_source, load_stream
from loraforge.data.mixing import mix_sources
from loraforge.data.packing import pack_dataset
from loraforge.data.templates import load_user_template, prompt_formatter
from loraforge.data.types import DataBundle, DataStats, SourceSpec
from loraforge.errors import DataError


def make_eval_pairs(records: list[dict[str, Any]], n: int, seed: int) -> list[tuple[Any, str]]:
    """Held-out (prompt, reference) pairs: for chat, the conversation up to one assistant turn."""
    rng = random.Random(seed)
    pairs: list[tuple[Any, str]] = []
    for rec in records:
        if len(pairs) >= n:
            break
        if "instruction" in rec:
            pairs.append((rec["instruction"] if not rec["input"] else rec, rec["output"]))
        elif "messages" in rec:
            turns = [i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant" and m["content"].strip()]
            if turns:
                i = rng.choice(turns[:3])  # an early turn keeps the prompt short
                pairs.append((rec["messages"][:i], rec["messages"][i]["content"]))
    return pairs


def finish_train_split(train: Sequence[dict], cfg: DataConfig, stats: DataStats) -> Sequence[dict]:
    """Packing, when on, is the last step (after mixing): rows of whole examples, ≤ max_length each."""
    if not cfg.packing:
        return train
    lengths = getattr(train, "lengths", None)
    packed = pack_dataset(train, cfg.max_length, lengths)
    stats.packed_rows = len(packed)
    return packed


def build_datasets(cfg: DataConfig, tokenizer: Any, num_eval_pairs: int = 8) -> DataBundle:
    """Read, split, tokenize (or take from the cache), mix (combined mode), pack. Streaming mode (`data.streaming`)
    leaves the training split as a stream (stream.py), tokenized and packed as training reads it."""
    if cfg.streaming:
        if cfg.sources:
            raise DataError("data.streaming: combined mode (data.sources) is not streamed; set data.streaming=false "
                            "(data.memory_map=true keeps large sources on disk), or stream one source.")
        spec = SourceSpec(cfg.dataset, cfg.format, cfg.column_mapping, cfg.split, cfg.max_samples)
        data = load_stream(spec, cfg, tokenizer)
        pairs = make_eval_pairs(data.eval_records, num_eval_pairs, cfg.seed)
        formatter = prompt_formatter(data.kind, tokenizer, load_user_template(cfg.template), cfg.system_prompt)
        return DataBundle(data.train, data.validation, data.kind, pairs, data.stats, formatter)
    # Each text tokenized counts a step (tokenize.encode_segments); a bar appears if it takes over 2 s.
    with progress.counting("tokenizing the dataset"):
        if cfg.sources:
            data = mix_sources(cfg, tokenizer)
        else:
            spec = SourceSpec(cfg.dataset, cfg.format, cfg.column_mapping, cfg.split, cfg.max_samples)
            data = load_source(spec, cfg, tokenizer)
            if not len(data.train):
                raise DataError(f"data.dataset: no usable training example in {cfg.dataset!r} "
                                f"({data.stats['train'].line('train')}). Check data.max_length and the records' "
                                "fields.")
    train = finish_train_split(data.train, cfg, data.stats["train"])
    pairs = make_eval_pairs(data.eval_records, num_eval_pairs, cfg.seed)
    formatter = prompt_formatter(data.kind, tokenizer, load_user_template(cfg.template), cfg.system_prompt)
    return DataBundle(train, data.validation, data.kind, pairs, data.stats, formatter)
