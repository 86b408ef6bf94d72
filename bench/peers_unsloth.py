"""Unsloth's arms of bench/peers.py, one per process: the timed training step, one step at one length under a
memory cap (the context search's probe), and Unsloth + TRL SFT end to end. Each prints one result line
(peers_common.RESULT) and exits.

    python bench/peers_unsloth.py step --path CKPT [--batch 4 --seq 512 --warmup 3 --steps 20]
    python bench/peers_unsloth.py fits --path CKPT --n N --cap-gib 80
    python bench/peers_unsloth.py sft --path CKPT --data TEXT.jsonl --out RUN_DIR [--steps 40 --batch 4 --seq 512]

The model is Unsloth's QLoRA as its documentation recommends it: `FastLanguageModel.from_pretrained(...,
load_in_4bit=True)` (NF4, double quant, bf16 compute), `get_peft_model(r=16, lora_alpha=32, lora_dropout=0,
bias="none", all seven projections, use_gradient_checkpointing="unsloth")`. The checkpoint folder needs a
tokenizer (Unsloth loads one with every model): bench/peers_arms.py `make --word-tokenizer` writes one.
Run it with the working directory where Unsloth may write its compiled cache (bench/peers.py uses its work
folder).
"""

import argparse
import dataclasses
import inspect
import json
import os
import time
from pathlib import Path

T0 = time.perf_counter()  # the SFT arm's own clock, from before the imports
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no download of usage statistics
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Unsloth first: it patches transformers, peft and TRL as they are imported, so nothing may import them before.
# isort: off
import unsloth  # noqa: E402, F401
from unsloth import FastLanguageModel  # noqa: E402
import torch  # noqa: E402
# isort: on
from peers_common import (  # noqa: E402
    cap_memory,
    fits,
    loaded_versions,
    random_batches,
    run_arm,
    step_arguments,
    time_steps,
    trainable,
    window_rate,
)

R = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIBS = ("unsloth", "unsloth_zoo", "trl", "torch", "transformers", "peft", "bitsandbytes", "triton", "xformers",
        "flash_attn", "datasets")


def load(path: str, max_seq_length: int, seed: int = 0):
    """(model, tokenizer, settings): Unsloth's QLoRA model with LoRA attached, as its docs recommend."""
    t = time.perf_counter()
    # use_exact_model_name: a local folder, never to be mapped to a hub repository of a similar name.
    # max_seq_length: Unsloth's forward cuts longer inputs to it, so it is the step's length.
    model, tok = FastLanguageModel.from_pretrained(model_name=path, max_seq_length=max_seq_length,
                                                   dtype=torch.bfloat16, load_in_4bit=True, use_exact_model_name=True)
    model = FastLanguageModel.get_peft_model(model, r=R, lora_alpha=2 * R, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=seed)
    settings = {"load_in_4bit": True, "dtype": "bfloat16", "max_seq_length": max_seq_length, "r": R,
                "lora_alpha": 2 * R, "lora_dropout": 0, "target_modules": TARGETS,
                "use_gradient_checkpointing": "unsloth", "load_s": round(time.perf_counter() - t, 1),
                "attn": getattr(model.config, "_attn_implementation", None),
                "alloc_conf": {k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}}
    return model, tok, settings


def step(a: argparse.Namespace) -> dict:
    import bitsandbytes as bnb  # after Unsloth, like everything it patches

    model, _, settings = load(a.path, a.seq)
    model.train()  # from_pretrained returns eval mode, where checkpointing is skipped
    opt = bnb.optim.PagedAdamW32bit(trainable(model), lr=2e-4)
    out = time_steps(model, opt, random_batches(model.config.vocab_size, a.batch, a.seq), a.warmup, a.steps)
    return {**out, "optimizer": "bitsandbytes PagedAdamW32bit", "load_s": settings.pop("load_s"),
            "unsloth_settings": settings, "versions": loaded_versions(LIBS)}


def probe(a: argparse.Namespace) -> dict:
    """One training step at batch 1 x n under the cap; OOM is ok=False. Its own process, since an OOM inside
    Unsloth's kernels can leave the process unusable."""
    import bitsandbytes as bnb

    cap = cap_memory(a.cap_gib)
    model, _, settings = load(a.path, a.n)
    model.train()
    opt = bnb.optim.PagedAdamW32bit(trainable(model), lr=2e-4)
    x = torch.randint(0, model.config.vocab_size, (1, a.n), generator=torch.Generator().manual_seed(a.n)).cuda()

    def one_step() -> None:  # the stock baseline's one-step fit test
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = fits(one_step, a.n)
    return {**res, "load_s": settings.pop("load_s"), "cap": cap, "unsloth_settings": settings,
            "versions": loaded_versions(LIBS)}


class _TokenCount:
    """Tokens the model reads, counted at its embedding (padding excluded), kept on the GPU until asked."""

    def __init__(self, pad_id: int | None):
        self.pad_id, self.total = pad_id, None

    def __call__(self, module, args) -> None:
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            return
        n = ids.ne(self.pad_id).sum() if self.pad_id is not None else torch.tensor(ids.numel(), device=ids.device)
        self.total = n if self.total is None else self.total + n

    def value(self) -> int:
        return int(self.total) if self.total is not None else 0


def sft(a: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, tok, settings = load(a.path, a.seq, seed=42)
    eos = tok.eos_token or ""
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    data = Dataset.from_list([{"text": r["text"] + eos} for r in rows])
    counter = _TokenCount(tok.pad_token_id)
    try:
        hook = model.get_input_embeddings().register_forward_pre_hook(counter)
    except Exception:  # noqa: BLE001 - then the trainer's own count stands in
        hook = None
    counted: dict[int, tuple[float, float]] = {}  # step -> (seconds, tokens read at the embedding)
    seen: dict[int, tuple[float, float]] = {}  # step -> (seconds, the trainer's num_input_tokens_seen)
    history: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            counted[0] = (time.perf_counter(), float(counter.value()))
            seen[0] = (counted[0][0], 0.0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            now, logs = time.perf_counter(), logs or {}
            if "loss" in logs:  # a training step's log (logging_steps=1: every step; reading the loss syncs)
                counted[state.global_step] = (now, float(counter.value()))
                n = getattr(state, "num_input_tokens_seen", 0) or logs.get("num_input_tokens_seen", 0)
                if n:
                    seen[state.global_step] = (now, float(n))
            history.append({"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, int | float)}})

    wanted = dict(output_dir=str(Path(a.out) / "trainer"), max_steps=a.steps, per_device_train_batch_size=a.batch,
                  gradient_accumulation_steps=1, learning_rate=2e-4, weight_decay=0.01, warmup_steps=2,
                  lr_scheduler_type="cosine", max_grad_norm=0.3, optim="paged_adamw_32bit", logging_steps=1,
                  save_strategy="no", report_to="none", bf16=True, fp16=False, seed=42, max_length=a.seq,
                  max_seq_length=a.seq, packing=True, dataset_text_field="text", include_num_input_tokens_seen=True,
                  disable_tqdm=True)
    # Only the fields this TRL's SFTConfig has (max_length vs max_seq_length moved between versions).
    known = _fields(SFTConfig)
    cfg = SFTConfig(**{k: v for k, v in wanted.items() if k in known})
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=data, args=cfg, callbacks=[Clock()])
    out = trainer.train()
    adapter = Path(a.out) / "adapter"
    model.save_pretrained(str(adapter))
    to_adapter_s = time.perf_counter() - T0
    if hook is not None:
        hook.remove()
    by_hook = counter.value() > 0
    marks = counted if by_hook else seen
    last = max(marks) if marks else 0
    return {**_rates(marks, last), "tokens_counted_by": "embedding hook" if by_hook else "trainer",
            "trainer_window_tokens_per_s": _rates(seen, last)["tokens_per_s"],
            "trainer_tokens_per_s": next((x["train_tokens_per_second"] for x in reversed(history)
                                          if "train_tokens_per_second" in x), None),
            "train_s": out.metrics.get("train_runtime"), "steps": out.global_step,
            "to_adapter_s": round(to_adapter_s, 1), "adapter_saved": any(adapter.glob("adapter_model.*")),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "loss_first": next((x["loss"] for x in history if "loss" in x), None),
            "loss_last": next((x["loss"] for x in reversed(history) if "loss" in x), None),
            "records": len(rows), "packed_rows": _len(trainer.train_dataset),
            "packing": getattr(trainer.args, "packing", None), "padding_free": getattr(trainer, "padding_free", None),
            "sft_config": {k: v for k, v in wanted.items() if k in known and k != "output_dir"},
            "sft_config_dropped": sorted(k for k in wanted if k not in known),
            "load_s": settings.pop("load_s"), "unsloth_settings": settings, "versions": loaded_versions(LIBS)}


def _fields(cls) -> set[str]:
    try:
        return {f.name for f in dataclasses.fields(cls)}
    except TypeError:  # not a dataclass (a patched stand-in): its keyword arguments
        return set(inspect.signature(cls).parameters)


def _len(data) -> int | None:
    try:
        return len(data)
    except TypeError:  # a streamed dataset
        return None


def _rates(marks: dict[int, tuple[float, float]], last: int) -> dict:
    """tokens/s over steps 11..last and 1..10, and tokens per step over 11..last, as bench/train_e2e.py
    measures `loraforge train` (None where the marks do not reach)."""
    rate, first10 = window_rate(marks, 10, last), window_rate(marks, 0, 10)
    per_step = (marks[last][1] - marks[10][1]) / (last - 10) if rate is not None else None
    return {"tokens_per_s": round(rate) if rate else None, "first10_tokens_per_s": round(first10) if first10 else None,
            "tokens_per_step": round(per_step) if per_step else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    step_arguments(sub.add_parser("step"))
    p = sub.add_parser("fits")
    p.add_argument("--path", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--cap-gib", type=float, default=80.0)
    p = sub.add_parser("sft")
    p.add_argument("--path", required=True)
    p.add_argument("--data", required=True, help="JSONL of {'text': ...} records (bench/peers.py writes it)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    run_arm({"step": lambda: step(a), "fits": lambda: probe(a), "sft": lambda: sft(a)}[a.cmd])


if __name__ == "__main__":
    main()
