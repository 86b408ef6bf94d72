"""`loraforge data preview`: examples exactly as training sees them, trained-on tokens highlighted,
plus token-length statistics and the record counts."""

from __future__ import annotations

from typing import Any

import numpy as np

from loraforge.config import DataConfig, ModelConfig
from loraforge.data.pipeline import DataStats, SourceSpec, load_source
from loraforge.data.tokenize import IGNORE_INDEX

TRAINED_STYLE = "black on green3"


def length_stats(lengths: list[int], max_length: int, truncated: int) -> dict[str, float]:
    a = np.asarray(lengths, dtype=np.int64)
    return {"examples": len(a), "min": int(a.min()), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max()), "max_length": max_length,
            "truncated": truncated}


def render_example(example: dict[str, list[int]], tokenizer: Any):
    """A rich Text of the decoded tokens; labelled ones in TRAINED_STYLE."""
    from rich.text import Text

    text = Text()
    for tok, lab in zip(example["input_ids"], example["labels"], strict=True):
        piece = tokenizer.decode([tok], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text.append(piece, style=TRAINED_STYLE if lab != IGNORE_INDEX else None)
    return text


def preview(source: str, *, fmt: str = "auto", n: int = 3, max_length: int = 512,
            model: str = "smollm2-135m-instruct", console: Any = None) -> dict[str, Any]:
    """Print `n` rendered examples of `source` and its length statistics; return the statistics."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    from loraforge.model.load import load_tokenizer, resolve_model_path

    console = console or Console()
    mcfg = ModelConfig(model_name=model, use_4bit=False)
    tokenizer = load_tokenizer(resolve_model_path(mcfg), mcfg)
    cfg = DataConfig(dataset=source, format=fmt, max_length=max_length, validation_split=0.0,  # type: ignore[arg-type]
                     skip_invalid=True)  # a preview shows bad records counted, not a stop
    data = load_source(SourceSpec(source, fmt), cfg, tokenizer)
    stats: DataStats = data.stats["train"]

    console.print(f"[bold]{source}[/] · format {data.fmt} · tokenizer {model} · max_length {max_length} · "
                  f"[{TRAINED_STYLE}] trained-on tokens [/]")
    for i in range(min(n, len(data.train))):
        ex = data.train[i]
        n_lab = sum(1 for v in ex["labels"] if v != IGNORE_INDEX)
        console.print(Panel(render_example(ex, tokenizer), title=f"example {i}",
                            subtitle=f"{len(ex['input_ids'])} tokens, {n_lab} trained on", title_align="left"))
    if not len(data.train):
        console.print("[red]no usable example[/]")
        return {"counts": stats}
    lengths = [int(x) for x in getattr(data.train, "lengths", [len(e["input_ids"]) for e in data.train])]
    ls = length_stats(lengths, max_length, stats.truncated)
    table = Table(title="token lengths", title_justify="left")
    for col in ("examples", "min", "median", "p95", "max", f"truncated at {max_length}"):
        table.add_column(col, justify="right")
    table.add_row(str(ls["examples"]), str(ls["min"]), f"{ls['median']:.0f}", f"{ls['p95']:.0f}", str(ls["max"]),
                  f"{ls['truncated']} ({100 * ls['truncated'] / max(1, stats.used):.1f}%)")
    console.print(table)
    console.print(stats.line("records"), markup=False, highlight=False)
    for err in stats.first_errors:
        console.print(f"  skipped: {err}", markup=False, highlight=False)
    return {"lengths": ls, "counts": stats}
