"""`loraforge demo --dpo`: preference training once, on the embedded model and data, on a CPU.

Honest pairs from chitchat: the prompt is a conversation's first user turn, the chosen answer the real
human reply, the rejected answer the base model's own greedy reply to the same prompt (generated once and
cached under $LORAFORGE_CACHE/dpo-demo). DPO then teaches the model to prefer the human's reply over its
own; the held-out pairs' reward accuracy (0.5 at the start: policy = reference, every pair a tie) and
win rate are measured before and after, and written with the perplexity of the held-out human replies to
the run folder's report.html and results.json.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any

from loraforge.config import RunConfig, load_config
from loraforge.demo import demo_config_path

DEMO_PAIRS = 320
PAIR_RECIPE = 1  # bump when the way pairs are built changes (the cache key includes it)
MAX_NEW_TOKENS = 48


def dpo_config_path() -> Path:
    return demo_config_path().with_name("demo-dpo.yaml")


def _prompts(n: int, seed: int) -> list[tuple[list[dict[str, str]], str]]:
    """(first user turn, the human's reply) of `n` chitchat conversations, short enough for the demo."""
    from loraforge.data.chitchat import load_chitchat

    picked = []
    for _, messages in load_chitchat():
        if len(messages) >= 2 and messages[0]["role"] == "user" and 2 <= len(messages[1]["content"]) <= 200 \
                and len(messages[0]["content"]) <= 200:
            picked.append(([messages[0]], messages[1]["content"]))
    random.Random(seed).shuffle(picked)
    return picked[:n]


def build_demo_pairs(cfg: RunConfig, n: int = DEMO_PAIRS, log=print) -> Path:
    """Write (or find in the cache) the demo's pairs file and return its path."""
    from loraforge.model.embedded import cache_root

    key = hashlib.sha256(json.dumps([cfg.model.model_name, n, cfg.data.seed, MAX_NEW_TOKENS, PAIR_RECIPE]).encode())
    path = cache_root() / "dpo-demo" / f"pairs-{key.hexdigest()[:16]}.jsonl"
    if path.is_file():
        log(f"pairs: {path} (cached)")
        return path
    from loraforge.data.templates import prompt_formatter
    from loraforge.infer.generation import Decoding, encode, generate_batch
    from loraforge.model.load import load_base

    t0 = time.perf_counter()
    prompts = _prompts(n, cfg.data.seed)
    model, tokenizer = load_base(cfg.model, for_training=False)
    fmt = prompt_formatter("chat", tokenizer)
    encoded = [encode(tokenizer, fmt(p)) for p, _ in prompts]
    # Greedy, as a user of the base model would see it; the repetition penalty keeps it from looping.
    replies = generate_batch(model, tokenizer, encoded, Decoding(max_new_tokens=MAX_NEW_TOKENS,
                                                                 repetition_penalty=1.1), batch_size=16)
    rows = [{"prompt": p, "chosen": human, "rejected": reply}
            for (p, human), reply in zip(prompts, replies, strict=True)
            if reply.strip() and reply.strip() != human.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    log(f"pairs: {len(rows)} built from chitchat in {time.perf_counter() - t0:.0f}s → {path}")
    return path


def run_dpo_demo(out: Path = Path("runs/demo-dpo"), steps: int | None = None) -> dict[str, Any]:
    from rich.console import Console

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
    cfg = load_config(dpo_config_path(), overrides + [f"data.dataset={pairs}"])
    trainer = LLAMATrainer.from_config(cfg, log=say)
    trainer.setup()
    before = trainer.evaluate()
    say(f"held-out pairs before: reward accuracy {before['eval_reward_accuracy']:.3f}, win rate "
        f"{before['eval_win_rate']:.3f}")
    t_train = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t_train
    after = trainer.evaluate()
    results = {"reward_accuracy_before": before["eval_reward_accuracy"],
               "reward_accuracy_after": after["eval_reward_accuracy"],
               "reward_margin_after": after["eval_reward_margin"],
               "win_rate_base": after["eval_base_win_rate"], "win_rate_finetuned": after["eval_win_rate"],
               "perplexity_base": after["eval_base_perplexity"], "perplexity_finetuned": after["eval_perplexity"],
               "held_out_pairs": len(trainer.data.validation), "train_pairs": len(trainer.data.train),
               "steps": result.steps, "train_seconds": round(train_s, 1),
               "wall_s": round(time.perf_counter() - t0, 1), "pairs_file": str(pairs)}
    report = {"base": {"perplexity": after["eval_base_perplexity"], "win_rate": after["eval_base_win_rate"],
                       "reward_accuracy": before["eval_reward_accuracy"]},
              "finetuned": {"perplexity": after["eval_perplexity"], "win_rate": after["eval_win_rate"],
                            "reward_accuracy": after["eval_reward_accuracy"]},
              "meta": {"model": cfg.model.model_name, "adapter": str(result.adapter_dir), "dataset": str(pairs),
                       "objective": "dpo", "device": str(trainer.accelerator.device)}}
    paths = write_report(out, report, out / "metrics.jsonl")
    results["report"] = str(paths["html"])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    say(f"reward accuracy {results['reward_accuracy_before']:.3f} → {results['reward_accuracy_after']:.3f} · "
        f"win rate {results['win_rate_base']:.3f} (base) → {results['win_rate_finetuned']:.3f} · perplexity of "
        f"the human replies {results['perplexity_base']:.1f} → {results['perplexity_finetuned']:.1f} · "
        f"{results['wall_s']:.0f}s in all · {paths['html']}")
    return results
