"""DPO speed: loraforge's preference step vs TRL's DPOTrainer, each arm alone in its own process.

    python bench/dpo_speed.py [--out DIR] [--steps 10] [--warmup 3]      # GPU: Llama-2-7B shape, QLoRA
    python bench/dpo_speed.py --tiny                                      # CPU smoke test, tiny shape, fp32

Case: random weights of the Llama-2-7B shape, QLoRA (NF4 double quant, bf16 compute), LoRA r=16 alpha 32 on
all linear layers, 2 pairs per step, each side 512 tokens (128 prompt + 384 answer), beta 0.1. The vocabulary
is the embedded SmolLM2 tokenizer's (49,152 instead of Llama-2's 32,000), so that TRL, which tokenizes text,
and loraforge, which takes token ids, see the same tokens; both arms use the same checkpoint.

- loraforge: the model as `loraforge train` builds it (bench.models.build_loraforge: fast path, CUDA graphs
  where the trainer turns them on), train/preference.py's forward (reference = adapter off, both sides in
  one batch, chunked log-probs), fused paged AdamW 32-bit.
- trl: TRL's documented QLoRA set-up: the 4-bit model from bench.models.build_stock (peft +
  bitsandbytes, prepare_model_for_kbit_training, gradient checkpointing), `DPOTrainer` with the peft model
  and no ref_model (TRL then also uses the adapter-off model as reference), paged_adamw_32bit, bf16.
  Skipped with a message when `import trl` fails.

Writes dpo-<date>-<device>.json: records {"case", "arm", "tokens_per_s", "peak_gib", "device", "versions",
"date"}; tokens_per_s counts both sides of every pair (4 x 512 = 2,048 tokens a step).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from loraforge.bench.device import device_tag, require_cuda, stamp  # noqa: E402
from loraforge.bench.models import ROOT, SHAPES, bench_run, build_loraforge, build_stock, lora_params  # noqa: E402
from loraforge.config import TrainingConfig  # noqa: E402
from loraforge.train import preference  # noqa: E402

PAIRS, PROMPT, ANSWER = 2, 128, 384


def make_checkpoint(tiny: bool, device: str, tokenizer_dir: str | None = None) -> str:
    """Random bf16 (fp32 tiny) weights of the case's shape with the embedded tokenizer (or the one in
    `tokenizer_dir`: a GPU machine without the embedded model's package), written once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loraforge.model.embedded import resolve_embedded

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or resolve_embedded("smollm2-135m-instruct"))
    shape = "tiny" if tiny else "llama2-7b"
    root = tempfile.gettempdir() + "/loraforge-dpo-ckpt" if tiny else ROOT
    path = f"{root}/{shape}-vocab{len(tokenizer)}"
    if Path(path, "config.json").exists():
        return path
    spec = {**SHAPES[shape], "vocab_size": len(tokenizer)}
    cfg = AutoConfig.for_model("llama", **spec, tie_word_embeddings=False,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(torch.float32 if tiny else torch.bfloat16)
    model.save_pretrained(path, max_shard_size="50GB")
    tokenizer.save_pretrained(path)
    return path


def _batch(vocab: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """PAIRS pairs as one batch (chosen rows first); the prompt is shared, the answers differ."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (PAIRS, PROMPT), generator=g).repeat(2, 1)
    answers = torch.randint(0, vocab, (2 * PAIRS, ANSWER), generator=g)
    ids = torch.cat([prompt, answers], 1)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "labels": labels}.items()}


def _loraforge(path: str, tiny: bool, warm: int, steps: int) -> dict:
    device = "cpu" if tiny else "cuda"
    run = bench_run(path, 16, "all", device=device, quant=not tiny)
    model, _ = build_loraforge(run, allow_cpu=tiny, log=lambda _: None)
    params = list(lora_params(model).values())
    if tiny:
        opt = torch.optim.AdamW(params, lr=2e-4)
    else:
        from loraforge.train.optim import fused_paged_adamw_32bit

        opt = fused_paged_adamw_32bit(params, lr=2e-4)
    tcfg = TrainingConfig(objective="dpo", beta=0.1)
    batches = [_batch(model.config.vocab_size, device, s) for s in range(4)]

    def step(i: int) -> None:
        loss = preference.pair_forward(model, batches[i % 4], tcfg)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, warm, steps, device)


def _trl(path: str, tiny: bool, warm: int, steps: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device = "cpu" if tiny else "cuda"
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = build_stock(path, 16, "all", device=device, quant=not tiny)
    # Text long enough that TRL's truncation (TRL 1.x: prompt + answer cut to max_length, keeping the start)
    # gives PROMPT + ANSWER tokens a side, as the loraforge arm has.
    g = torch.Generator().manual_seed(0)
    words = lambda n: tokenizer.decode(torch.randint(100, 20000, (n,), generator=g).tolist())  # noqa: E731
    rows = [{"prompt": words(PROMPT), "chosen": words(ANSWER * 2), "rejected": words(ANSWER * 2)}
            for _ in range(PAIRS * (warm + steps))]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=PAIRS,
                     max_steps=warm + steps, learning_rate=2e-4, beta=0.1, max_length=PROMPT + ANSWER,
                     bf16=not tiny, optim="adamw_torch" if tiny else "paged_adamw_32bit",
                     gradient_checkpointing=True, logging_steps=1000, save_strategy="no", report_to=[],
                     use_cpu=tiny)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    # build_stock returns a peft model already; TRL is given the base and the peft config, as its docs show.
    trainer = DPOTrainer(model=model.unload() if hasattr(model, "unload") else model, args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=peft_cfg,
                         callbacks=[Clock()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times.append(time.perf_counter())
    step_s = (times[-1] - times[warm]) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"step_s": step_s, "peak_gib": peak}


def _timed(step, warm: int, steps: int, device: str) -> dict:
    for i in range(warm):
        step(i)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(warm + i)
    if device == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    gc.collect()
    return {"step_s": step_s, "peak_gib": peak}


def one_arm(arm: str, tiny: bool, warm: int, steps: int, tokenizer_dir: str | None = None) -> dict:
    path = make_checkpoint(tiny, "cpu" if tiny else "cuda", tokenizer_dir)
    t = (_trl if arm == "trl" else _loraforge)(path, tiny, warm, steps)
    case = f"dpo-{'tiny' if tiny else 'llama2-7b'}-{'fp32-' if tiny else 'qlora-nf4-'}r16-all-{PAIRS}pairs-2x512"
    return {"case": case, "arm": arm, "tokens_per_s": round(2 * PAIRS * (PROMPT + ANSWER) / t["step_s"], 1),
            "step_s": round(t["step_s"], 4), "peak_gib": round(t["peak_gib"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny shape (fp32, no 4-bit)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded SmolLM2's)")
    ap.add_argument("--arm", choices=["trl", "loraforge"], help="run one arm here and print its record (internal)")
    a = ap.parse_args()
    if a.arm:
        print(json.dumps(one_arm(a.arm, a.tiny, a.warmup, a.steps, a.tokenizer)), flush=True)
        return
    if not a.tiny:
        require_cuda("the DPO speed benchmark")
    rows = []
    for arm in ("loraforge", "trl"):
        if arm == "trl":
            try:
                import trl  # noqa: F401
            except ImportError:
                print("trl arm skipped: `import trl` failed (pip install trl to compare)", flush=True)
                continue
        cmd = [sys.executable, __file__, "--arm", arm, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        cmd += ["--tokenizer", a.tokenizer] if a.tokenizer else []
        done = subprocess.run(cmd + (["--tiny"] if a.tiny else []), capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{arm} arm failed:\n{done.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    name = "cpu" if a.tiny else torch.cuda.get_device_name(0)
    meta = stamp(name)
    rows = [{**r, **meta} for r in rows]
    out = Path(a.out) / f"dpo-{meta['date']}-{device_tag(name)}{'-tiny' if a.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
