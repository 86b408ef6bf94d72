"""`loraforge demo`: the whole job once, on the embedded model and data, on a CPU.

Fine-tune SmolLM2-135M-Instruct with LoRA on held-in chitchat conversations, then evaluate base and
fine-tuned on the same held-out conversations (perplexity, BLEU, ROUGE, sample replies), print them side
by side and write the run folder: config.yaml, adapter/, metrics.jsonl, loss_curve.png, report.html and
results.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraforge.config import load_config, shipped_config


def demo_config_path() -> Path:
    """configs/demo.yaml, as shipped inside the package (a wheel install has it too)."""
    return shipped_config("demo.yaml")


def run_demo(out: Path = Path("runs/demo"), steps: int | None = None) -> dict:
    from loraforge.eval.compare import compare
    from loraforge.infer.load import Loaded
    from loraforge.train.trainer import LLAMATrainer

    console = Console(stderr=True)
    # The demo's folder is its own: an earlier demo run there is moved aside (to <out>.old-<time>).
    overrides = [f"training.output_dir={out}", "training.resume_from_checkpoint=null",
                 "training.overwrite_output_dir=true"] + ([f"training.max_steps={steps}"] if steps else [])
    cfg = load_config(demo_config_path(), overrides)
    console.rule("[bold]loraforge demo")
    console.print(f"model {cfg.model.model_name} · data {cfg.data.dataset} · LoRA r={cfg.lora.r} "
                  f"{cfg.lora.target_modules} · {cfg.training.max_steps} steps of "
                  f"{cfg.training.per_device_train_batch_size}×{cfg.training.gradient_accumulation_steps} examples")
    t0 = time.perf_counter()
    trainer = LLAMATrainer.from_config(cfg, log=lambda m: console.print(m, highlight=False, markup=False))
    result = trainer.train()

    console.rule("[bold]evaluation: base vs fine-tuned, same held-out conversations")
    model = trainer.accelerator.unwrap_model(trainer.model)
    loaded = Loaded(model, trainer.tokenizer, cfg, result.adapter_dir, trainer.data.kind, trainer.data.formatter)
    meta = {"model": cfg.model.model_name, "adapter": str(result.adapter_dir), "dataset": cfg.data.dataset,
            "device": str(trainer.accelerator.device), "train_seconds": round(result.train_seconds, 1)}
    report = compare(loaded, cfg.data, cfg.eval, out_dir=out, metrics_jsonl=out / "metrics.jsonl", meta=meta,
                     log=lambda m: console.print(m, highlight=False, markup=False))
    base, ft = report["base"], report["finetuned"]
    results = {
        "base_perplexity": base["perplexity"], "finetuned_perplexity": ft["perplexity"],
        "perplexity_ratio": ft["perplexity"] / base["perplexity"],
        "train_seconds": result.train_seconds, "total_seconds": time.perf_counter() - t0,
        "steps": result.steps, "tokens_per_s": result.tokens_per_s,
        **{f"{k}_{name}": report[name][k] for name in ("base", "finetuned")
           for k in ("bleu", "rouge1", "rouge2", "rougeL") if k in report[name]},
        "bleu": ft.get("bleu"), "rouge1": ft.get("rouge1"), "rouge2": ft.get("rouge2"), "rougeL": ft.get("rougeL"),
        "data": result.data_stats, "report": report["report"]["html"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    _print_summary(console, report, results)
    return results


def _print_summary(console: Console, report: dict, results: dict) -> None:
    table = Table(title="base vs fine-tuned (held-out chitchat conversations)")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    for key, label in [("perplexity", "perplexity ↓"), ("bleu", "BLEU ↑"), ("rouge1", "ROUGE-1 ↑"),
                       ("rouge2", "ROUGE-2 ↑"), ("rougeL", "ROUGE-L ↑")]:
        if key in report["base"]:
            table.add_row(label, f"{report['base'][key]:.3f}", f"{report['finetuned'][key]:.3f}")
    console.print(table)
    answers = Table(title="replies to held-out prompts", show_lines=True)
    for col in ("last user turn", "reference", "base", "fine-tuned"):
        answers.add_column(col, overflow="fold", ratio=1)
    for s in report["samples"]:
        last = s["prompt"].rsplit("user: ", 1)[-1]
        answers.add_row(last[-200:], s["reference"][:200], s["base"][:200], s["finetuned"][:200])
    console.print(answers)
    console.print(f"perplexity {results['base_perplexity']:.2f} → {results['finetuned_perplexity']:.2f} "
                  f"({results['perplexity_ratio']:.2f}× the base) · trained in {results['train_seconds']:.0f}s · "
                  f"total {results['total_seconds']:.0f}s")
    console.print(f"run folder: {Path(results['report']).parent}  "
                  "(report.html, results.json, adapter/, loss_curve.png)")
