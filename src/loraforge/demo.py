"""`loraforge demo`: the whole job once, on the embedded model and data, on a CPU.

Fine-tune SmolLM2-135M-Instruct with LoRA, one adapter on two held-in tasks mixed half and half: chitchat
conversations, and the question task (quote the one question of a short chat message, built from chitchat
conversations the demo uses nowhere else; see `question_examples`). Then evaluate base and fine-tuned on the
same held-out data of each task (perplexity, BLEU, ROUGE, sample replies), print both tables and write the run
folder: config.yaml, adapter/, metrics.jsonl, loss_curve.png, report.html (chitchat), question-task/report.html,
results.json and demo-<date>.json (the figures with their 95% bootstrap intervals and the paired
fine-tuned − base differences, in the form bench/results keeps: the question task at the top level, chitchat
under `chitchat`).

Why two tasks: a chitchat reply is one human's answer among many good ones, so BLEU and ROUGE against it stay
near their floor for any model and move within their intervals, while perplexity, which scores the human
replies themselves, shows the fine-tuning. The question task has one right answer, so BLEU and ROUGE show it.
Both are scored on 48 held-out replies (eval.num_generation_samples), greedy, at most eval.max_new_tokens (24:
about twice a chitchat reply's median length, and a quoted question is shorter).

`loraforge demo --dpo` (`run_dpo_demo`): preference training once. Honest pairs from chitchat: the prompt is
a conversation's first user turn, the chosen answer the real human reply, the rejected answer the base
model's own greedy reply to the same prompt (generated once and cached under $LORAFORGE_CACHE/dpo-demo).
The held-out pairs share no prompt with the training ones. DPO teaches the model to prefer the human's reply
over its own; held-out reward accuracy (0.5 at step 0: policy = reference, every pair a tie) rises, and the
figures go to the console, report.html, results.json and dpo-demo-<date>.json (bench/results form).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loraforge.config import RunConfig, load_config, shipped_config


def demo_config_path() -> Path:
    """configs/demo.yaml, as shipped inside the package (a wheel install has it too)."""
    return shipped_config("demo.yaml")


def run_demo(out: Path = Path("runs/demo"), steps: int | None = None) -> dict:
    from loraforge.data.mixing import source_config
    from loraforge.data.pipeline import build_datasets
    from loraforge.eval.compare import compare
    from loraforge.infer.load import Loaded
    from loraforge.train.trainer import LLAMATrainer

    console = Console(stderr=True)
    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
    # The demo's folder is its own: an earlier demo run there is moved aside (to <out>.old-<time>).
    overrides = [f"training.output_dir={out}", "training.resume_from_checkpoint=null",
                 "training.overwrite_output_dir=true"] + ([f"training.max_steps={steps}"] if steps else [])
    cfg = load_config(demo_config_path(), overrides)
    console.rule("[bold]loraforge demo")
    t0 = time.perf_counter()
    task = build_question_task(cfg, log=say)
    # One adapter learns both: the config's conversations and the question task, mixed by weight.
    sources = [{"path": cfg.data.dataset, "format": cfg.data.format},
               {"path": str(task.train), "format": "chat", "weight": QUESTION_WEIGHT}]
    cfg = load_config(demo_config_path(), overrides + [f"data.sources={json.dumps(sources)}"])
    say(f"model {cfg.model.model_name} · data {cfg.data.dataset} + the question task · LoRA r={cfg.lora.r} "
        f"{cfg.lora.target_modules} · {cfg.training.max_steps} steps of "
        f"{cfg.training.per_device_train_batch_size}×{cfg.training.gradient_accumulation_steps} examples")
    trainer = LLAMATrainer.from_config(cfg, log=say)
    result = trainer.train()

    console.rule("[bold]evaluation: base vs fine-tuned, same held-out data")
    model = trainer.accelerator.unwrap_model(trainer.model)
    loaded = Loaded(model, trainer.tokenizer, cfg, result.adapter_dir, trainer.data.kind, trainer.data.formatter)
    # "data" is filled in per task below (the key keeps its place among the report's facts).
    meta = {"model": cfg.model.model_name, "adapter": str(result.adapter_dir), "data": "",
            "device": str(trainer.accelerator.device), "train_seconds": round(result.train_seconds, 1),
            "fast_path": trainer.fast_path.line}
    chat_cfg = source_config(cfg.data, 0)
    question_cfg = dataclasses.replace(source_config(cfg.data, 1), validation_dataset=str(task.held_out))
    reports = {}
    for name, data_cfg, folder in (("question", question_cfg, out / "question-task"), ("chitchat", chat_cfg, out)):
        say(f"{name}: {TASK_TITLES[name]}")
        reports[name] = compare(loaded, data_cfg, cfg.eval, out_dir=folder, metrics_jsonl=out / "metrics.jsonl",
                                meta={**meta, "data": TASK_DATA[name].format(dataset=cfg.data.dataset),
                                      "task": TASK_TITLES[name],
                                      "about": f"{TASK_NOTES[name]} {REPORT_LINKS[name]}"},
                                log=say)
    base, ft = reports["chitchat"]["base"], reports["chitchat"]["finetuned"]
    results = {
        "base_perplexity": base["perplexity"], "finetuned_perplexity": ft["perplexity"],
        "perplexity_ratio": ft["perplexity"] / base["perplexity"],
        "train_seconds": result.train_seconds, "total_seconds": time.perf_counter() - t0,
        "steps": result.steps, "tokens_per_s": result.tokens_per_s,
        **{f"{k}_{name}": reports["chitchat"][name][k] for name in ("base", "finetuned")
           for k in ("bleu", "rouge1", "rouge2", "rougeL") if k in reports["chitchat"][name]},
        "bleu": ft.get("bleu"), "rouge1": ft.get("rouge1"), "rouge2": ft.get("rouge2"), "rougeL": ft.get("rougeL"),
        "question_task": {f"{k}_{name}": reports["question"][name].get(k) for name in ("base", "finetuned")
                          for k in ("perplexity", *SCORES)},
        "data": result.data_stats, "report": reports["chitchat"]["report"]["html"],
        "question_report": reports["question"]["report"]["html"],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    validation = {"chitchat": build_datasets(chat_cfg, trainer.tokenizer, 0).validation,
                  "question": build_datasets(question_cfg, trainer.tokenizer, 0).validation}
    summary = demo_summary(model, trainer.tokenizer, validation, reports, cfg, task, time.perf_counter() - t0)
    summary_path = out / f"demo-{summary['date']}.json"
    summary_path.write_text(json.dumps(summary, indent=1))
    results["summary"] = str(summary_path)
    for name in ("question", "chitchat"):
        _print_summary(console, name, reports[name], summary if name == "question" else summary["chitchat"])
    _print_footer(console, results)
    return results


# ----------------------------------------------------------------------------------------------------------
# The question task: a second held-out task, whose answer follows from its prompt.
#
# A chitchat reply is one human's answer among many good ones, so BLEU and ROUGE against it sit near their floor
# for any model (bench/results/demo-2026-12-03-20steps-48replies.json: BLEU 0.002 -> 0.006, ROUGE within noise,
# while perplexity halved). Here a reply is right or wrong: the prompt is an instruction and a chat message of a
# few lines, one of them a question; the answer is that line, word for word. The base model answers the
# question instead (measured: 16 of 16 probes); the fine-tuned one has seen a few dozen examples.

QUESTION_PROMPT = "Quote the question in this chat message, word for word."
QUESTION_TRAIN = 600  # examples written; the mix draws about half of each step's examples from them
QUESTION_HELD_OUT = 48  # scored: as many as the chitchat replies
QUESTION_WEIGHT = 1.0  # the question examples' share of the mix, relative to the conversations' 1
MAX_LINE_WORDS = 15
QUESTION_RECIPE = 2  # bump when the way examples are built changes (the cache key includes it)
TASK_TITLES = {"question": "quote the question of a held-out chat message (its answer follows from the prompt)",
               "chitchat": "reply to a held-out chitchat conversation (one human reply as the reference)"}
# What each report's data is: the question task's examples come from its own conversations, not the held-out ones.
TASK_DATA = {"question": "the question task, built from {dataset} conversations used nowhere else in the demo",
             "chitchat": "{dataset} conversations held out from training"}
TASK_NOTES = {
    "question": "Each prompt asks the model to quote, word for word, the one question among the 2-4 lines of a "
                "chat message from a conversation that training never saw; the reference is that line. The base "
                "model answers the question, or chats about it, instead of quoting it, so its words barely "
                "overlap the reference; the fine-tuned model learnt the task from the few dozen examples of it "
                "in its 20 steps and quotes the line, mostly exactly. BLEU and ROUGE measure this task well "
                "because it has one right answer.",
    "chitchat": "Each prompt is a held-out conversation up to one of its first replies; the reference is what the "
                "human actually wrote. Perplexity scores those human replies themselves and falls as the model "
                "learns their register. BLEU and ROUGE compare one generated reply with one human reply among "
                "many good ones, so they stay near their floor for any model: the fine-tuned model's short, "
                "casual replies share a few more words with the references than the base model's long assistant "
                "answers, but by less than 48 replies can tell apart from chance (see the intervals).",
}
REPORT_LINKS = {"question": "The chitchat conversations' table is in ../report.html.",
                "chitchat": "The question task's table, where BLEU and ROUGE do show what fine-tuning learnt, is in "
                            "question-task/report.html."}


@dataclass(frozen=True)
class QuestionTask:
    """The question task's files: training and held-out examples come from different conversations."""

    train: Path
    held_out: Path
    n_train: int
    n_held_out: int


def question_of(message: str) -> str | None:
    """The one question line of a 2-4 line message whose lines are short, else None."""
    lines = [line.strip() for line in message.split("\n") if line.strip()]
    questions = [line for line in lines if line.endswith("?") and len(line.split()) >= 3]
    if 2 <= len(lines) <= 4 and len(questions) == 1 and all(len(line.split()) <= MAX_LINE_WORDS for line in lines):
        return questions[0]
    return None


def question_examples(cfg: RunConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training, held-out) examples of the question task, built from the conversations of `cfg.data.dataset`
    that the demo does not use otherwise: neither held out nor among the first data.max_samples training ones.
    Conversations are taken in the split's order; the first ones give the held-out examples, the next ones the
    training examples, so no conversation gives both; a message met twice is used once."""
    from loraforge.data.load import read_source
    from loraforge.data.split import split_records

    train_raw, _ = split_records(read_source(cfg.data.dataset, cfg.data.split), cfg.data)
    held_out: list[dict[str, Any]] = []
    train: list[dict[str, Any]] = []
    seen: set[str] = set()
    for record in train_raw[cfg.data.max_samples or 0:]:
        part = held_out if len(held_out) < QUESTION_HELD_OUT else train
        if len(train) >= QUESTION_TRAIN:
            break
        for message in record.data.get("messages", []) if isinstance(record.data, dict) else []:
            text = "\n".join(line.strip() for line in message["content"].split("\n") if line.strip())
            question = question_of(text)
            if question and text not in seen:
                seen.add(text)
                part.append({"messages": [{"role": "user", "content": f"{QUESTION_PROMPT}\n\n{text}"},
                                          {"role": "assistant", "content": question}]})
    return train[:QUESTION_TRAIN], held_out[:QUESTION_HELD_OUT]


def build_question_task(cfg: RunConfig, log=print) -> QuestionTask:
    """Write (or find in the cache, $LORAFORGE_CACHE/demo-question) the question task's two JSONL files."""
    from loraforge.errors import DataError
    from loraforge.model.embedded import cache_root

    d = cfg.data
    key = hashlib.sha256(json.dumps([d.dataset, d.split, d.seed, d.validation_split, d.max_samples, QUESTION_PROMPT,
                                     QUESTION_TRAIN, QUESTION_HELD_OUT, MAX_LINE_WORDS, QUESTION_RECIPE]).encode()
                         ).hexdigest()[:16]
    folder = cache_root() / "demo-question" / key
    files = {"held_out": folder / "held_out.jsonl", "train": folder / "train.jsonl"}
    if not all(f.is_file() for f in files.values()):
        train, held_out = question_examples(cfg)
        if not train or not held_out:
            raise DataError(f"data.dataset {d.dataset!r}: the demo's question task found {len(train)} training and "
                            f"{len(held_out)} held-out messages of 2-4 short lines with one question; it needs both.")
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in (("held_out", held_out), ("train", train)):
            tmp = files[name].with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
            tmp.replace(files[name])  # train last: a folder with both files is complete
    counts = {k: len(f.read_text(encoding="utf-8").splitlines()) for k, f in files.items()}
    log(f"question task: {counts['train']} training and {counts['held_out']} held-out examples → {folder}")
    return QuestionTask(files["train"], files["held_out"], counts["train"], counts["held_out"])


SCORES = ("bleu", "rouge1", "rouge2", "rougeL")


def demo_summary(model: Any, tokenizer: Any, validation: dict[str, Any], reports: dict[str, dict], cfg: Any,
                 task: QuestionTask, wall_s: float) -> dict[str, Any]:
    """The demo's figures with their 95% bootstrap intervals, in the form bench/results keeps: the question
    task's at the top level, the conversations' under `chitchat`. Each has perplexity over its held-out
    examples, BLEU/ROUGE over the generated replies and the paired fine-tuned − base difference of each score."""
    out: dict[str, Any] = {"wall_s": round(wall_s, 1), "steps": cfg.training.max_steps,
                           "date": datetime.date.today().isoformat(), "model": cfg.model.model_name,
                           "dataset": cfg.data.sources[0].path, "device": str(next(model.parameters()).device),
                           "decoding": {k: getattr(cfg.eval, k) for k in ("decoding", "max_new_tokens",
                                                                           "repetition_penalty")},
                           "question_task": {"prompt": QUESTION_PROMPT, "train_examples": task.n_train,
                                             "held_out_examples": task.n_held_out, "weight": QUESTION_WEIGHT}}
    for name in ("question", "chitchat"):
        part = {"task": TASK_TITLES[name], **_task_summary(model, tokenizer, validation[name], reports[name]),
                "note": TASK_NOTES[name]}
        if name == "question":
            out.update(part)
        else:
            out["chitchat"] = part
    return out


def _task_summary(model: Any, tokenizer: Any, validation: Any, report: dict) -> dict[str, Any]:
    from loraforge.eval.metrics import paired_bootstrap, perplexity_interval

    per_example = _per_example_nll(model, tokenizer, validation)
    samples = report["samples"]
    out: dict[str, Any] = {"n_replies": len(samples), "n_conversations": len(per_example["finetuned"][0])}
    for name, key in (("base", "base"), ("fine_tuned", "finetuned")):
        r = report[key]
        nll, tokens = per_example[key]
        out[name] = {"perplexity": r["perplexity"], **{k: r[k] for k in SCORES if k in r},
                     "intervals": {"perplexity": perplexity_interval(nll, tokens), **r.get("intervals", {})}}
    if samples:
        out["fine_tuned_minus_base"] = paired_bootstrap([s["reference"] for s in samples],
                                                        [s["base"] for s in samples],
                                                        [s["finetuned"] for s in samples])
    return out


def _per_example_nll(model: Any, tokenizer: Any, validation: Any) -> dict[str, tuple[list[float], list[int]]]:
    """Summed NLL and labelled tokens of each held-out example, base (adapter off) and fine-tuned."""
    import torch

    from loraforge.data.collate import PadCollator
    from loraforge.eval.perplexity import summed_nll
    from loraforge.model.runtime import eval_mode, model_device

    collate, device = PadCollator(tokenizer.pad_token_id), model_device(model)
    out: dict[str, tuple[list[float], list[int]]] = {}
    for key in ("base", "finetuned"):
        nll: list[float] = []
        tokens: list[int] = []
        ctx = model.disable_adapter() if key == "base" else _Nothing()
        with ctx, eval_mode(model), torch.no_grad():
            for i in range(0, len(validation), 8):
                batch = collate(list(validation[i:i + 8]))
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                for row in range(logits.size(0)):
                    n, t = summed_nll(logits[row:row + 1], batch["labels"][row:row + 1])
                    nll.append(n)
                    tokens.append(t)
        out[key] = (nll, tokens)
    return out


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def _print_summary(console: Console, name: str, report: dict, summary: dict) -> None:
    n = report["finetuned"].get("n_replies")
    table = Table(title=f"{TASK_TITLES[name]}: base vs fine-tuned on {summary['n_conversations']} held-out "
                        f"examples" + (f", BLEU/ROUGE over {n} replies" if n else "") + "; 95% bootstrap intervals")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    table.add_column("fine-tuned − base (share of resamples higher)", justify="right")
    diffs = summary.get("fine_tuned_minus_base", {})
    for key, label in [("perplexity", "perplexity ↓"), ("bleu", "BLEU ↑"), ("rouge1", "ROUGE-1 ↑"),
                       ("rouge2", "ROUGE-2 ↑"), ("rougeL", "ROUGE-L ↑")]:
        if key in report["base"]:
            cells = [_with_interval(summary, part, key, report[rk][key])
                     for part, rk in (("base", "base"), ("fine_tuned", "finetuned"))]
            d = diffs.get(key)
            delta = (f"{d['difference']:+.3f} [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}] "
                     f"({d['share_higher']:.2f})" if d else f"{report['finetuned'][key] - report['base'][key]:+.3f}")
            table.add_row(label, *cells, delta)
    console.print(table)
    console.print(TASK_NOTES[name], style="dim")
    answers = Table(title=f"{name}: replies to held-out prompts", show_lines=True)
    for col in ("prompt (last turn)", "reference", "base", "fine-tuned"):
        answers.add_column(col, overflow="fold", ratio=1)
    for s in report["samples"][:4]:  # the report has them all
        last = s["prompt"].rsplit("user: ", 1)[-1]
        answers.add_row(last[-200:], s["reference"][:200], s["base"][:200], s["finetuned"][:200])
    console.print(answers)


def _print_footer(console: Console, results: dict) -> None:
    console.print(f"chitchat perplexity {results['base_perplexity']:.2f} → {results['finetuned_perplexity']:.2f} "
                  f"({results['perplexity_ratio']:.2f}× the base) · trained in {results['train_seconds']:.0f}s · "
                  f"total {results['total_seconds']:.0f}s")
    console.print(f"run folder: {Path(results['report']).parent}  (report.html: chitchat, question-task/report.html: "
                  f"the question task, results.json, {Path(results.get('summary', 'demo.json')).name}, adapter/, "
                  "loss_curve.png)")


def _with_interval(summary: dict | None, name: str, key: str, value: float) -> str:
    interval = ((summary or {}).get(name, {}).get("intervals") or {}).get(key)
    fmt = "{:.2f}" if key == "perplexity" else "{:.3f}"
    text = fmt.format(value)
    return f"{text} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]" if interval else text



# ----------------------------------------------------------------------------------------------------------
# loraforge demo --dpo

# Sized for two shared CPU cores (bench/results/dpo-cpu-demo-2026-12-03.json): the cost is generating the
# rejected replies and the pairs' forward/backward passes, both linear in pairs × tokens.
TRAIN_PAIRS = 40  # one pass of 5 steps × 8 pairs: the held-out accuracy is up by then (measured)
HELD_OUT_PAIRS = 32  # at 0.9 its 95% interval is about [0.76, 0.97]
MAX_CHARS = 120  # prompts and human replies longer than this are left out: short pairs are fast pairs
MAX_NEW_TOKENS = 16  # the base model's reply is cut here; its assistant style shows in the first words
GENERATION_BATCH = 36
PAIR_RECIPE = 2  # bump when the way pairs are built changes (the cache key includes it)


@dataclass(frozen=True)
class DemoPairs:
    """The demo's pairs files: training and held-out pairs never share a prompt."""

    train: Path
    held_out: Path
    n_train: int
    n_held_out: int
    seconds: float  # spent building them; 0 when found in the cache
    cached: bool


def dpo_config_path() -> Path:
    return demo_config_path().with_name("demo-dpo.yaml")


def _prompt_key(text: str) -> str:
    """'Hello?', 'hello!' and 'Hello' are one prompt (chitchat opens 193 conversations with 'Hello?')."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def _prompts(n: int, seed: int) -> list[tuple[list[dict[str, str]], str]]:
    """(first user turn, the human's reply) of `n` chitchat conversations, in a seeded random order. Each
    opens with a different first turn (see _prompt_key: the first conversation in the file wins), so no
    held-out prompt repeats a training one; both texts are at most MAX_CHARS long."""
    from loraforge.data.chitchat import load_chitchat

    by_prompt: dict[str, tuple[list[dict[str, str]], str]] = {}
    for _, messages in load_chitchat():
        if len(messages) < 2 or messages[0]["role"] != "user":
            continue
        prompt, reply = messages[0]["content"], messages[1]["content"]
        key = _prompt_key(prompt)
        if key and len(prompt) <= MAX_CHARS and 2 <= len(reply.strip()) and len(reply) <= MAX_CHARS:
            by_prompt.setdefault(key, ([messages[0]], reply))
    picked = list(by_prompt.values())
    random.Random(seed).shuffle(picked)
    return picked[:n]


def _base_replies(cfg: RunConfig, prompts: list[list[dict[str, str]]]) -> list[str]:
    """The base model's own greedy reply to each prompt, as a user of it would see it."""
    from loraforge.data.templates import prompt_formatter
    from loraforge.infer.generation import Decoding, encode, generate_batch
    from loraforge.model.load import load_base

    model, tokenizer = load_base(cfg.model, for_training=False)
    fmt = prompt_formatter("chat", tokenizer)
    encoded = [encode(tokenizer, fmt(p)) for p in prompts]
    # Batches of similar prompt lengths: less left padding pushed through the model.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    # The repetition penalty keeps greedy decoding from looping.
    replies = generate_batch(model, tokenizer, [encoded[i] for i in order],
                             Decoding(max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=1.1),
                             batch_size=GENERATION_BATCH)
    out = [""] * len(order)
    for i, reply in zip(order, replies, strict=True):
        out[i] = reply
    return out


def build_demo_pairs(cfg: RunConfig, n_train: int = TRAIN_PAIRS, n_held_out: int = HELD_OUT_PAIRS,
                     log=print) -> DemoPairs:
    """Write (or find in the cache, $LORAFORGE_CACHE/dpo-demo) the demo's training and held-out pairs:
    the prompt a conversation's first user turn, chosen the human's real reply, rejected the base model's
    own greedy reply. The first `n_held_out` pairs of the shuffled prompts are held out."""
    from loraforge.model.embedded import cache_root

    key = hashlib.sha256(json.dumps([cfg.model.model_name, n_train, n_held_out, cfg.data.seed, MAX_CHARS,
                                     MAX_NEW_TOKENS, PAIR_RECIPE]).encode()).hexdigest()[:16]
    folder = cache_root() / "dpo-demo" / key
    files = {"held_out": folder / "held_out.jsonl", "train": folder / "train.jsonl"}
    if all(f.is_file() for f in files.values()):
        log(f"pairs: {folder} (cached)")
        counts = {k: len(f.read_text(encoding="utf-8").splitlines()) for k, f in files.items()}
        return DemoPairs(files["train"], files["held_out"], counts["train"], counts["held_out"], 0.0, True)
    t0 = time.perf_counter()
    prompts = _prompts(n_train + n_held_out, cfg.data.seed)
    replies = _base_replies(cfg, [p for p, _ in prompts])
    rows = [{"prompt": p[0]["content"], "chosen": human, "rejected": reply}
            for (p, human), reply in zip(prompts, replies, strict=True)
            if reply.strip() and reply.strip() != human.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("held_out", rows[:n_held_out]), ("train", rows[n_held_out:])):
        tmp = files[name].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        tmp.replace(files[name])  # train last: a folder with both files is complete
    seconds = time.perf_counter() - t0
    n_out = min(n_held_out, len(rows))
    log(f"pairs: {len(rows) - n_out} for training and {n_out} held out, built from chitchat in {seconds:.0f}s "
        f"→ {folder}")
    return DemoPairs(files["train"], files["held_out"], len(rows) - n_out, n_out, seconds, False)


def run_dpo_demo(out: Path = Path("runs/demo-dpo"), steps: int | None = None) -> dict[str, Any]:
    """Build the pairs, measure the held-out pairs, train DPO, measure them again; print the figures and
    write the run folder (report.html, results.json, dpo-demo-<date>.json in bench/results form)."""
    from loraforge.eval.report import write_report
    from loraforge.train.trainer import LLAMATrainer

    console = Console(stderr=True)
    say = lambda m: console.print(m, highlight=False, markup=False)  # noqa: E731
    overrides = [f"training.output_dir={out}", "training.resume_from_checkpoint=null",
                 "training.overwrite_output_dir=true"] + ([f"training.max_steps={steps}"] if steps else [])
    cfg = load_config(dpo_config_path(), overrides)
    console.rule("[bold]loraforge demo --dpo")
    t0 = time.perf_counter()
    pairs = build_demo_pairs(cfg, log=say)
    # The held-out pairs come as their own file: data.validation_split does not apply.
    cfg = load_config(dpo_config_path(), overrides + [f"data.dataset={pairs.train}",
                                                      f"data.validation_dataset={pairs.held_out}"])
    t = cfg.training
    say(f"model {cfg.model.model_name} · LoRA r={cfg.lora.r} {cfg.lora.target_modules} · DPO beta={t.beta} · "
        f"{t.max_steps} steps of {t.per_device_train_batch_size}×{t.gradient_accumulation_steps} pairs at lr "
        f"{t.learning_rate:g} · {pairs.n_train} training pairs, {pairs.n_held_out} held out")
    trainer = LLAMATrainer.from_config(cfg, log=say)
    trainer.setup()
    # Before: DPO's implicit reward beta * (policy - reference) is 0 for every side at step 0 when the adapter
    # starts at zero (policy = reference): every held-out pair is a tie, counted as half. An evaluation pass
    # would only confirm it (two minutes on a busy 2-core machine), so it runs only when the adapter does not.
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = ({"eval_reward_accuracy": 0.5, "eval_reward_margin": 0.0} if starts_at_reference(model)
              else trainer.evaluate())
    evals: list[dict[str, float]] = []
    result = trainer.train(on_eval=lambda step, metrics: evals.append(metrics))
    after = evals[-1]  # the loop's own evaluation at its last step
    summary = dpo_summary(cfg, pairs, before, after, result.steps, steps, out, t0)
    (out / f"dpo-demo-{summary['date']}.json").write_text(json.dumps(summary, indent=1))
    report = {"base": {"reward_accuracy": before["eval_reward_accuracy"], "win_rate": after["eval_base_win_rate"],
                       "perplexity": after["eval_base_perplexity"]},
              "finetuned": {"reward_accuracy": after["eval_reward_accuracy"], "win_rate": after["eval_win_rate"],
                            "perplexity": after["eval_perplexity"]},
              "meta": {"model": cfg.model.model_name, "adapter": str(result.adapter_dir), "objective": "dpo",
                       "dataset": f"{pairs.n_train} training, {pairs.n_held_out} held-out pairs: {pairs.train.parent}",
                       "reward accuracy 95% interval (Wilson)": summary["reward_accuracy_after_interval"],
                       "reward margin": f"{after['eval_reward_margin']:+.3f}",
                       "wall time": f"{summary['wall_s']:.0f}s",
                       "device": summary["device"]}}
    paths = write_report(out, report, out / "metrics.jsonl")
    results = {**summary, "report": str(paths["html"]), "adapter": str(result.adapter_dir),
               "pairs": str(pairs.train.parent)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    _print_dpo_summary(console, summary, out)
    return results


BEFORE_NOTE = ("reward_accuracy_before: DPO's held-out reward accuracy at step 0. The implicit reward "
               "beta * (policy - reference) is 0 for every side then (every LoRA B matrix starts at zero, checked), "
               "so every pair is a tie, counted as half: 0.5 by construction, measured only when the adapter does "
               "not start at zero. win_rate_base is the base model's own preference: "
               "the share of held-out pairs where it gives the human reply a higher mean token log-prob than its "
               "own reply.")


def dpo_summary(cfg: RunConfig, pairs: DemoPairs, before: dict[str, float], after: dict[str, float], steps_done: int,
                steps_asked: int | None, out: Path, t0: float) -> dict[str, Any]:
    """The demo's figures in the form bench/results keeps: what ran, where, and what it measured."""
    import peft
    import psutil
    import torch
    import transformers

    t = cfg.training
    n = pairs.n_held_out
    proc = psutil.Process()
    cpu = proc.cpu_times()
    command = "loraforge demo --dpo" + (f" --out {out}" if out != Path("runs/demo-dpo") else "") \
        + (f" --steps {steps_asked}" if steps_asked else "")
    return {
        "date": datetime.date.today().isoformat(), "command": command,
        "device": _cpu_model(), "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "model": cfg.model.model_name, "lora": {"r": cfg.lora.r, "alpha": cfg.lora.lora_alpha,
                                                "targets": cfg.lora.target_modules},
        "train_pairs": pairs.n_train, "held_out_pairs": n, "steps": steps_done,
        "pairs_per_step": t.per_device_train_batch_size * t.gradient_accumulation_steps,
        "beta": t.beta, "lr": t.learning_rate, "max_length": cfg.data.max_length,
        "rejected": f"base model's greedy reply, at most {MAX_NEW_TOKENS} new tokens, repetition penalty 1.1",
        "reward_accuracy_before": before["eval_reward_accuracy"],
        "reward_accuracy_before_measured": "eval_loss" in before,
        "reward_accuracy_after": after["eval_reward_accuracy"],
        "reward_accuracy_after_interval": wilson_interval(after["eval_reward_accuracy"], n),
        "reward_margin_before": before["eval_reward_margin"], "reward_margin_after": after["eval_reward_margin"],
        "win_rate_base": after["eval_base_win_rate"], "win_rate_finetuned": after["eval_win_rate"],
        "perplexity_human_replies_base": after["eval_base_perplexity"],
        "perplexity_human_replies_finetuned": after["eval_perplexity"],
        "pairs_seconds": round(pairs.seconds, 1), "pairs_cached": pairs.cached,
        "demo_s": round(time.perf_counter() - t0, 1),
        # The whole process, interpreter start and imports included, as `time loraforge demo --dpo` shows it.
        "wall_s": round(time.time() - proc.create_time(), 1), "cpu_s": round(cpu.user + cpu.system, 1),
        "note": BEFORE_NOTE,
    }


def starts_at_reference(model: Any) -> bool:
    """Every LoRA B matrix is zero: the model is its base exactly, as peft's default initialisation leaves it."""
    return all(not p.any() for name, p in model.named_parameters() if "lora_B" in name)


def wilson_interval(share: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a share measured on `n` pairs (ties, which count half, only at step 0)."""
    if n <= 0:
        return [0.0, 1.0]
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _print_dpo_summary(console: Console, s: dict[str, Any], out: Path) -> None:
    low, high = s["reward_accuracy_after_interval"]
    table = Table(title=f"{s['held_out_pairs']} held-out pairs (no prompt seen in training): the human's reply "
                        "(chosen) vs the base model's own (rejected)")
    table.add_column("")
    table.add_column("before (base)", justify="right")
    table.add_column("after DPO", justify="right")
    table.add_row("DPO reward accuracy ↑", f"{s['reward_accuracy_before']:.3f}",
                  f"{s['reward_accuracy_after']:.3f} [{low:.3f}, {high:.3f}]")
    table.add_row("DPO reward margin ↑", f"{s['reward_margin_before']:+.3f}", f"{s['reward_margin_after']:+.3f}")
    table.add_row("win rate: mean log-prob prefers the human reply ↑", f"{s['win_rate_base']:.3f}",
                  f"{s['win_rate_finetuned']:.3f}")
    table.add_row("perplexity of the human replies ↓", f"{s['perplexity_human_replies_base']:.1f}",
                  f"{s['perplexity_human_replies_finetuned']:.1f}")
    console.print(table)
    console.print("Before = step 0: the implicit reward beta·(policy − reference) is 0 for both sides of every pair "
                  "(a tie, counted as half). In brackets: 95% Wilson interval.", style="dim")
    console.print(f"{s['steps']} steps of {s['pairs_per_step']} pairs · pairs built in {s['pairs_seconds']:.0f}s"
                  f"{' (cached)' if s['pairs_cached'] else ''} · {s['wall_s']:.0f}s wall, {s['cpu_s']:.0f}s CPU on "
                  f"{s['cpu_cores']} cores ({s['device']})")
    console.print(f"run folder: {out}  (report.html, results.json, dpo-demo-{s['date']}.json, adapter/)")
