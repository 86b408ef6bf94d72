"""Tiny real components built in the tests: a WordLevel tokenizer with a chat template, a random Llama,
and a sub-second LoRA fine-tune of it whose log and scores feed the report tests."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraforge.eval import PerplexityEvaluator, QualitativeEvaluator

# Prompt / answer pairs; the last one carries HTML so the report tests can check escaping.
PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Where did the cat sit?", "The cat sat on the mat."),
    ("What does LoRA do?", "LoRA adapts a frozen model with low rank matrices."),
    ("Say hello to the user.", "Hello there! How can I help you today?"),
    ("Write <b>bold</b> & 'quotes'", "<b>bold</b> & 'quotes' done."),
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def alpaca(prompt: str) -> str:
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE, pad: bool = True) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    corpus = [alpaca(p) + a for p, a in PAIRS] + ["user assistant system : A dog runs in the park."]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    # Like Llama's tokenizer: BOS in front of every encoded text unless add_special_tokens=False.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>" if pad else None)
    tok.chat_template = chat_template
    return tok


def build_llama(vocab_size: int, seed: int = 0, initializer_range: float = 0.2, **overrides) -> LlamaForCausalLM:
    # initializer_range 0.2 rather than Llama's 0.02: logits with a real spread, so greedy choices are not
    # near-ties that float noise could flip, and a short LoRA run can visibly lower the loss.
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0, initializer_range=initializer_range,
                         **overrides)
    return LlamaForCausalLM(config).float().eval()


def supervised_batch(tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]],
                     pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch with the prompt and padding masked to -100, as the data pipeline builds it."""
    rows = []
    for prompt, answer in pairs:
        p = tokenizer(alpaca(prompt))["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    width = max(pad_to or 0, max(len(ids) for ids, _ in rows))
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, labels in rows:
        pad = width - len(ids)
        batch["input_ids"].append(ids + [tokenizer.pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(ids) + [0] * pad)
        batch["labels"].append(labels + [-100] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


@dataclass
class TinyRun:
    results: dict
    metrics_jsonl: Path
    samples: list[dict]


def run_tiny_finetune(out_dir: Path, steps: int = 40) -> TinyRun:
    """LoRA-train the tiny Llama on PAIRS, logging like the trainer, then evaluate base and fine-tuned."""
    tokenizer = build_tokenizer()
    base = build_llama(len(tokenizer))
    tuned = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "gate_proj", "up_proj", "down_proj"]))
    batch = supervised_batch(tokenizer, PAIRS)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=2e-2)
    metrics_jsonl = out_dir / "metrics.jsonl"
    evaluator = PerplexityEvaluator(tuned, tokenizer)
    with metrics_jsonl.open("w") as log:
        for step in range(1, steps + 1):
            tuned.train()
            start = time.perf_counter()
            loss = tuned(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            record = {"step": step, "loss": loss.item(), "lr": 2e-2,
                      "tokens_per_s": batch["attention_mask"].sum().item() / (time.perf_counter() - start)}
            if step % 10 == 0:
                record["eval_loss"] = evaluator.evaluate([batch])["loss"]
            log.write(json.dumps(record) + "\n")

    prompts = [p for p, _ in PAIRS]
    references = [a for _, a in PAIRS]
    results: dict = {"meta": {"model": "tiny-llama-2L-32d (random init)", "adapter": "LoRA r=8, all linear",
                              "dataset": f"{len(PAIRS)} prompt/answer pairs", "device": "cpu"}}
    samples = [{"prompt": p, "reference": a} for p, a in PAIRS]
    for name, model in (("base", base), ("finetuned", tuned)):
        ppl = PerplexityEvaluator(model, tokenizer).evaluate([batch])
        qual = QualitativeEvaluator(model, tokenizer, template=alpaca)
        scores = qual.evaluate(prompts, references, max_length=16, num_beams=1)
        results[name] = {"perplexity": ppl["perplexity"], "loss": ppl["loss"],
                         **{k: v for k, v in scores.items() if k != "generations"}}
        for sample, answer in zip(samples, scores["generations"], strict=True):
            sample[name] = answer
    return TinyRun(results, metrics_jsonl, samples)
