"""CPU throughput: loraforge's LLAMATrainer vs stock transformers `Trainer` + peft, same run.

    python bench/cpu_trainer_compare.py [--steps 6] [--rounds 2] [--batch 4] [--accum 2] [--max-length 128]
                                        [--threads 1]

Both arms fine-tune the embedded SmolLM2-135M-Instruct (fp32 LoRA r=16 on all linear layers, no gradient
checkpointing, torch AdamW, cosine schedule) on the same tokenized chitchat examples, padded by the same
collator, for the same number of optimizer steps. The machine is shared, so the arms run interleaved
(A B A B ...) and the medians are reported. tokens/s counts every non-padding token fed to the model,
measured from the end of step 1 to the end of the last step (step 1 warms the allocator and caches).
Writes bench/results/cpu-trainer-compare-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, TrainingConfig  # noqa: E402


def configs(a: argparse.Namespace, out: Path):
    model = ModelConfig(model_name="smollm2-135m-instruct", use_4bit=False, dtype="float32", device="cpu")
    lora = LoRAConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05)
    data = DataConfig(dataset="chitchat", max_length=a.max_length, max_samples=400, validation_split=0.0)
    training = TrainingConfig(output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch,
                              gradient_accumulation_steps=a.accum, learning_rate=2e-4, optim="adamw_torch",
                              gradient_checkpointing=False, logging_steps=1, save_steps=0, seed=0)
    return model, lora, data, training


def run_loraforge(a: argparse.Namespace, out: Path) -> float:
    from loraforge.train.trainer import LLAMATrainer

    model, lora, data, training = configs(a, out)
    trainer = LLAMATrainer(model, lora, data, training, EvalConfig(num_generation_samples=0), log=lambda m: None)
    trainer.train()
    # metrics.jsonl: one record per step (logging_steps=1) with its window's tokens/s and the run's clock.
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    tokens = sum(r["tokens_per_s"] * (r["elapsed_s"] - p["elapsed_s"]) for p, r in zip(recs, recs[1:], strict=False))
    return tokens / (recs[-1]["elapsed_s"] - recs[0]["elapsed_s"])


def run_hf_trainer(a: argparse.Namespace, out: Path) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from loraforge.data.collate import PadCollator
    from loraforge.data.pipeline import build_datasets
    from loraforge.model.load import load_tokenizer, resolve_model_path

    model_cfg, _, data_cfg, tcfg = configs(a, out)
    path = resolve_model_path(model_cfg)
    tokenizer = load_tokenizer(path, model_cfg)
    train_set = build_datasets(data_cfg, tokenizer, 0).train
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    pad = PadCollator(tokenizer.pad_token_id)
    seen: list[int] = []

    def collate(examples):
        batch = pad([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        seen.append(int(batch["attention_mask"].sum()))
        return batch

    step_end: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            step_end.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(out), max_steps=tcfg.max_steps,
                             per_device_train_batch_size=tcfg.per_device_train_batch_size,
                             gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
                             learning_rate=tcfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=1,
                             weight_decay=0.01, max_grad_norm=0.3, optim="adamw_torch", logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                             remove_unused_columns=False, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train_set, data_collator=collate, callbacks=[Clock()]).train()
    accum = tcfg.gradient_accumulation_steps
    tokens = sum(seen[accum:accum * len(step_end)])  # steps 2..N (Trainer fetches a step's batches up front)
    return tokens / (step_end[-1] - step_end[0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on a shared, oversubscribed CPU, OpenMP threads that wait "
                         "for each other at every barrier make 2-thread steps many times slower than 1-thread ones")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results: dict[str, list[float]] = {"loraforge": [], "hf_trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            order = [("loraforge", run_loraforge), ("hf_trainer", run_hf_trainer)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                tps = fn(a, Path(tmp) / f"{name}-{r}")
                results[name].append(tps)
                print(f"round {r} {name:10s} {tps:8.1f} tokens/s  ({time.perf_counter() - t:.0f}s incl. load)",
                      flush=True)
    summary = {name: round(statistics.median(v), 1) for name, v in results.items()}
    report = {"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "settings": vars(a), "runs": results, "median_tokens_per_s": summary,
              "ratio_loraforge_over_hf": round(summary["loraforge"] / summary["hf_trainer"], 3)}
    print(json.dumps(report, indent=1))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cpu-trainer-compare-{report['date']}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
