"""Base vs fine-tuned on the same held-out data: perplexity, BLEU, ROUGE, sample answers, one report.

The base model is the fine-tuned one with its adapter disabled (peft's `disable_adapter`), so both are
evaluated on identical weights, data and batches, and the model is loaded once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from loraforge.config import DataConfig, EvalConfig
from loraforge.eval.perplexity import PerplexityEvaluator
from loraforge.eval.qualitative import generation_metrics
from loraforge.eval.report import write_report


def compare(loaded: Any, data_cfg: DataConfig, eval_cfg: EvalConfig, *, out_dir: Path, metrics_jsonl: Path | None,
            meta: dict[str, Any] | None = None, log=print) -> dict[str, Any]:
    """Evaluate `loaded` (a loraforge.infer.load.Loaded) with and without its adapter; write the report."""
    from loraforge.data.collate import PadCollator
    from loraforge.data.pipeline import build_datasets

    model, tokenizer = loaded.model, loaded.tokenizer
    data = build_datasets(data_cfg, tokenizer, eval_cfg.num_generation_samples)
    collate = PadCollator(tokenizer.pad_token_id)
    bs = eval_cfg.eval_batch_size
    loader = [collate(data.validation[i:i + bs]) for i in range(0, len(data.validation), bs)]
    prompts = [p for p, _ in data.eval_pairs]
    references = [r for _, r in data.eval_pairs]
    formatter = loaded.formatter

    results: dict[str, Any] = {}
    for name in ("base", "finetuned"):
        t0 = time.perf_counter()
        ctx = model.disable_adapter() if name == "base" and hasattr(model, "disable_adapter") else _null()
        with ctx:
            ppl = PerplexityEvaluator(model, tokenizer).evaluate(loader)
            gen = generation_metrics(model, tokenizer, formatter, prompts, references, eval_cfg) if prompts else {}
        results[name] = {"perplexity": ppl["perplexity"], "loss": ppl["loss"], "eval_tokens": ppl["tokens"],
                         **{k: v for k, v in gen.items() if k != "generations"},
                         "_generations": gen.get("generations", [])}
        log(f"eval  {name:9s}: perplexity {ppl['perplexity']:.2f} over {ppl['tokens']:,} tokens"
            + (f", BLEU {gen['bleu']:.3f}, ROUGE-L {gen['rougeL']:.3f}" if gen else "")
            + f" ({time.perf_counter() - t0:.0f}s)")
    samples = [{"prompt": _prompt_text(p), "reference": r, "base": b, "finetuned": f}
               for p, r, b, f in zip(prompts, references, results["base"].pop("_generations"),
                                     results["finetuned"].pop("_generations"), strict=True)]
    results["meta"] = meta or {}
    paths = write_report(out_dir, results, str(metrics_jsonl) if metrics_jsonl and metrics_jsonl.is_file() else None,
                         samples)
    results["samples"] = samples
    results["report"] = {k: str(v) for k, v in paths.items()}
    return results


def _prompt_text(prompt: Any) -> str:
    """A chat prompt (list of messages) as readable text for the report."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        return f"{prompt.get('instruction', '')}\n\n{prompt.get('input', '')}".strip()
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def compare_run(run_or_adapter: str | Path, *, out_dir: str | Path | None = None, data: str | None = None,
                eval_overrides: dict[str, Any] | None = None, log=print, trust_remote_code: bool = False
                ) -> dict[str, Any]:
    """`loraforge eval`: load the run's base + adapter, evaluate both on its held-out data, write the report."""
    import dataclasses
    import datetime

    from loraforge.infer.load import load

    loaded = load(run_or_adapter, trust_remote_code=trust_remote_code)
    run = loaded.run
    data_cfg = run.data if run is not None else DataConfig()
    if data:
        data_cfg = dataclasses.replace(data_cfg, dataset=data, sources=[])
    eval_cfg = dataclasses.replace(run.eval if run is not None else EvalConfig(), **(eval_overrides or {}))
    base = Path(run_or_adapter)
    out = Path(out_dir) if out_dir else (base if run is not None else base.parent) / "eval"
    meta = {"model": run.model.model_name if run else "", "adapter": str(loaded.adapter_dir or ""),
            "dataset": data_cfg.dataset, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": str(next(loaded.model.parameters()).device), "fast_path": _fast_path_line(base)}
    metrics = (base / "metrics.jsonl") if run is not None else None
    return compare(loaded, data_cfg, eval_cfg, out_dir=out, metrics_jsonl=metrics, meta=meta, log=log)


def _fast_path_line(run_dir: Path) -> str:
    """How the run trained ("fast path: on (...)" or why it was off), from its loraforge_run.json; shown as text."""
    try:
        line = json.loads((run_dir / "loraforge_run.json").read_text(encoding="utf-8")).get("fast_path")
    except (OSError, ValueError, AttributeError, RecursionError):
        return ""
    return line[:300] if isinstance(line, str) else ""
