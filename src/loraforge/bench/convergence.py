"""Convergence: the same training under each path, then the same held-out perplexity (`loraforge bench --convergence`).

Every arm fine-tunes the embedded SmolLM2-135M-Instruct (real weights) on the embedded chitchat conversations
with configs/demo.yaml's data, LoRA and optimizer settings, for the same number of steps, with the same seed
and so the same data order; only the arm's own switches differ (ARMS). Training is `LLAMATrainer`'s, the
product's one loop; the held-out perplexity is its end-of-run evaluation (eval/perplexity.py) on the same
unpacked validation conversations. Each arm runs in its own process (`python -m loraforge.bench.convergence
--arm NAME ...`), so one arm's GPU state (CUDA graphs, patched modules, allocator) cannot leak into the next.

An arm that does not get what it names fails loudly instead of measuring something else: `fast` without the
fused kernels, `fast-graphs` without CUDA graphs, `stock` with them, a GPU arm on a machine without a GPU.
On the arms flagged `check`, the evaluator is checked once against an independent computation: a fresh
transformers + peft load of the saved adapter in fp32, scored by transformers' own `labels=` loss one
conversation at a time; the two perplexities must agree within CHECK_TOLERANCE.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from loraforge.errors import ConfigError, LoraforgeError, ResourceError

Device = Literal["cpu", "cuda"]
# Steps per arm: the CPU's are the demo's 32 (both arms took 12.8 min on 2 shared cores, one thread each);
# the GPU's aim at every arm within ~6 minutes on an H200.
DEFAULT_STEPS: dict[str, int] = {"cpu": 32, "cuda": 200}
CHECK_TOLERANCE = 1e-3  # relative; both sides are fp32 over the same tokens, so only summation order differs


class ConvergenceError(LoraforgeError):
    """An arm did not run as it says (wrong path, no GPU, a failed check) or its process failed."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration under test: its overrides of the common settings and what must be true of the run."""

    name: str
    device: Device
    overrides: tuple[str, ...]
    fused: bool | None = None  # the fused kernels must be on (True) / off (False); None: not checked
    graphs: bool = False  # CUDA graphs must be on
    check: bool = False  # check the evaluator against stock transformers on this arm
    nf4_rounded_base: bool = False  # dense base whose quantizable weights hold their NF4 round trip
    diagnostic: bool = False  # run by name only, not in `all`
    note: str = ""


_NF4 = ("model.use_4bit=true", "model.bnb_4bit_quant_type=nf4")
_FAST = ("model.fast_kernels=true", "model.cuda_graphs=false")
ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("stock", "cuda", (*_NF4, "model.fast_kernels=false"), fused=False,
        note="transformers + peft + bitsandbytes QLoRA NF4, loraforge's kernels off"),
    Arm("fast", "cuda", (*_NF4, *_FAST), fused=True, note="QLoRA NF4, fused kernels, no CUDA graphs"),
    Arm("fast-graphs", "cuda", (*_NF4, "model.fast_kernels=true", "model.cuda_graphs=true"), fused=True,
        graphs=True, note="QLoRA NF4, fused kernels replayed as CUDA graphs"),
    Arm("bf16-lora", "cuda", ("model.use_4bit=false", "model.dtype=bfloat16", *_FAST), fused=True, check=True,
        note="LoRA on bf16 frozen weights, fused kernels"),
    Arm("nf4-qlora", "cuda", (*_NF4, "model.bnb_4bit_compute_dtype=bfloat16", *_FAST), fused=True,
        note="QLoRA NF4 with bf16 compute, fused kernels: the bf16-lora arm with the base quantized"),
    Arm("long-context", "cuda", (*_NF4, *_FAST, "training.long_context=true"), fused=True,
        note="the fast arm with long_context on (offloaded checkpoints, chunked loss, no materialized mask)"),
    Arm("packing", "cuda", (*_NF4, *_FAST, "data.packing=true"), fused=True,
        note="the fast arm with packing on: rows of several conversations, so fewer, fuller steps"),
    Arm("cpu-fp32-lora", "cpu", ("model.use_4bit=false", "model.dtype=float32"), check=True,
        note="LoRA on fp32 frozen weights on the CPU (the demo's setting)"),
    Arm("cpu-nf4-qlora", "cpu", (*_NF4, "model.bnb_4bit_compute_dtype=float32"),
        note="QLoRA NF4 with fp32 compute on the CPU"),
    # Where an NF4 gap comes from: these train dense LoRA on a base that holds exactly the values NF4 gives the
    # QLoRA arm's base. The QLoRA arm against them is everything but the base's values (the 4-bit kernels,
    # dequantization, compute dtype); the dense arm against them is the base's rounding alone.
    Arm("bf16-lora-nf4-base", "cuda", ("model.use_4bit=false", "model.dtype=bfloat16", *_FAST), fused=True,
        nf4_rounded_base=True, diagnostic=True,
        note="the bf16-lora arm on a base rounded to the NF4 values nf4-qlora computes with"),
    Arm("cpu-fp32-lora-nf4-base", "cpu", ("model.use_4bit=false", "model.dtype=float32"), nf4_rounded_base=True,
        diagnostic=True, note="the cpu-fp32-lora arm on a base rounded to the NF4 values cpu-nf4-qlora uses"),
]}

# (arm, reference arm, allowed relative difference of held-out perplexity): issue 21's criteria.
CRITERIA = [("fast", "stock", 0.01), ("fast-graphs", "stock", 0.01), ("nf4-qlora", "bf16-lora", 0.02),
            ("cpu-nf4-qlora", "cpu-fp32-lora", 0.02)]
# Reported beside the criteria, without a bound: switches that change the computation's order or the batches.
RELATIONS = [("long-context", "fast"), ("packing", "fast"), ("fast", "nf4-qlora"),
             ("nf4-qlora", "bf16-lora-nf4-base"), ("bf16-lora-nf4-base", "bf16-lora"),
             ("cpu-nf4-qlora", "cpu-fp32-lora-nf4-base"), ("cpu-fp32-lora-nf4-base", "cpu-fp32-lora")]


def arms_for(device: Device, names: Sequence[str]) -> list[Arm]:
    """The arms to run on `device`: `all` is every arm of that device, else the names given, in order."""
    if list(names) in (["all"], []):
        return [a for a in ARMS.values() if a.device == device and not a.diagnostic]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ConfigError(f"--arms: unknown arm(s) {unknown}; arms: {', '.join(ARMS)} (or all).")
    wrong = [n for n in names if ARMS[n].device != device]
    if wrong:
        raise ConfigError(f"--arms {wrong} run on {ARMS[wrong[0]].device}, not on --device {device}.")
    return [ARMS[n] for n in names]


def common_overrides(device: Device, steps: int, workdir: Path, arm: str) -> list[str]:
    """What every arm of a device shares on top of configs/demo.yaml: steps, seed, device, logging, no
    intermediate checkpoints, no generation (perplexity is the measure)."""
    out = [f"training.output_dir={workdir / arm}", "training.overwrite_output_dir=true",
           "training.resume_from_checkpoint=null", f"training.max_steps={steps}", "training.seed=42",
           "training.logging_steps=1", "training.save_steps=0", "training.eval_steps=0",
           f"model.device={device}", "eval.num_generation_samples=0"]
    if device == "cuda":
        # CUDA graphs replay checkpointed layers, so every GPU arm checkpoints (the same recomputation for
        # all); more conversations than the demo's 600 so that a few hundred steps stay under two epochs;
        # every held-out conversation (80) is scored.
        return out + ["training.gradient_checkpointing=true", "data.max_samples=2000", "data.max_eval_samples=null"]
    # 2 shared cores train ~5-40 tokens/s: shorter conversations, smaller steps and 24 held-out
    # conversations keep two arms (training, two evaluations, the evaluator check) within ~15 minutes.
    return out + ["data.max_length=128", "training.per_device_train_batch_size=2",
                  "training.gradient_accumulation_steps=2", "data.max_eval_samples=24"]


def arm_config(arm: Arm, steps: int, workdir: Path, extra: Sequence[str] = ()) -> Any:
    """The arm's RunConfig: configs/demo.yaml + the common overrides + `extra` (--set, the same for every arm)
    + the arm's own, last, so that an arm always gets what it names."""
    from loraforge.config import load_config
    from loraforge.demo import demo_config_path

    common = common_overrides(arm.device, steps, workdir, arm.name)
    return load_config(demo_config_path(), common + list(extra) + list(arm.overrides))


# ------------------------------------------------------------------------------------------ one arm (child)


def train_arm(arm: Arm, steps: int, workdir: Path, log: Callable[[str], None],
              extra: Sequence[str] = ()) -> dict[str, Any]:
    """Train one arm in this process and return its record (held-out perplexity, loss curve, timings)."""
    import torch

    from loraforge.bench.device import versions
    from loraforge.train.trainer import LLAMATrainer

    if arm.device == "cuda" and not torch.cuda.is_available():
        raise ResourceError(f"arm {arm.name} runs on a CUDA GPU and none is visible (torch {torch.__version__}); "
                            "nothing was measured. Run the CPU arms with --device cpu.")
    cfg = arm_config(arm, steps, workdir, extra)
    t0 = time.perf_counter()
    trainer = LLAMATrainer.from_config(cfg, log=log)
    with _nf4_rounded_loads(cfg.model) if arm.nf4_rounded_base else contextlib.nullcontext():
        trainer.setup()
    _require_path(arm, trainer, cfg.training.long_context_switches())
    # Before any step LoRA's B is zero, so this is the base model as the arm holds it (NF4 or not): the part
    # of a difference between arms that the quantization alone makes.
    step0 = _held_out(trainer)
    result = trainer.train()
    wall = time.perf_counter() - t0
    if result.eval_perplexity is None:
        raise ConvergenceError(f"arm {arm.name}: the run has no held-out perplexity (empty validation split?).")
    curve = [(r["step"], r["loss"]) for r in _read_jsonl(result.run_dir / "metrics.jsonl") if "loss" in r]
    device_name = torch.cuda.get_device_name() if arm.device == "cuda" else "cpu"
    record = {"arm": arm.name, "held_out_ppl": result.eval_perplexity, "held_out_loss": result.eval_loss,
              "torch_threads": torch.get_num_threads(),
              "step0_held_out_ppl": step0,
              "final_loss": curve[-1][1] if curve else None,
              "final_loss_mean_last_10pct": _tail_mean([v for _, v in curve]), "steps": result.steps,
              "wall_s": round(wall, 1), "train_s": round(result.train_seconds, 1),
              "tokens_per_s": round(result.tokens_per_s, 1), "device": device_name,
              "versions": versions(), "date": datetime.date.today().isoformat(),
              "fast_path": trainer.fast_path.line, "note": arm.note,
              "validation_conversations": len(trainer.data.validation),
              "overrides": list(arm.overrides), "extra_overrides": list(extra), "loss_curve": curve}
    if arm.check:
        record["evaluator_check"] = check_evaluator(cfg, result.adapter_dir, trainer.data.validation,
                                                    trainer.tokenizer.pad_token_id, arm.device)
    return record


@contextlib.contextmanager
def _nf4_rounded_loads(model_cfg: Any) -> Iterator[None]:
    """While set-up runs, every base model loaded gets its quantizable weights rounded to NF4 and back
    (`round_to_nf4`), before LoRA and the fast path go on. The trainer imports `load_base` when it sets up,
    so replacing the module attribute reaches it; nothing in the product changes. Should that stop being
    true, the arm would silently train the unrounded base: a set-up that rounded nothing raises instead."""
    from loraforge.model import load

    original = load.load_base
    rounded_weights: list[int] = []

    def rounded(*args: Any, **kwargs: Any) -> Any:
        model, info = original(*args, **kwargs)
        rounded_weights.append(round_to_nf4(model, nested=model_cfg.use_nested_quant))
        return model, info

    load.load_base = rounded
    try:
        yield
    finally:
        load.load_base = original
    if not sum(rounded_weights):
        raise ConvergenceError("the NF4-rounded base was not made: set-up loaded no model through "
                               "loraforge.model.load.load_base, so nothing was rounded; nothing was measured.")


def quantizable_linears(model: Any) -> dict[str, Any]:
    """name -> module of each layer a 4-bit load quantizes: every nn.Linear but the output embedding, which
    transformers' bitsandbytes loader leaves unquantized."""
    import torch

    skip = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not skip}


def round_to_nf4(model: Any, *, nested: bool, blocksize: int = 64) -> int:
    """Replace, in place, each weight a 4-bit load would quantize (`quantizable_linears`) by bitsandbytes' NF4
    quantize-dequantize of it, in the weight's own dtype. 64 is bitsandbytes' Linear4bit block size. Returns
    how many weights were rounded."""
    import bitsandbytes.functional as bnbf
    import torch

    linears = quantizable_linears(model)
    with torch.no_grad():
        for module in linears.values():
            w = module.weight
            q, state = bnbf.quantize_4bit(w.data, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
            w.copy_(bnbf.dequantize_4bit(q, state).to(w.dtype))
    return len(linears)


def _held_out(trainer: Any) -> float:
    """Held-out perplexity of the trainer's model now, by eval/perplexity.py, on the run's validation split."""
    from loraforge.data.collate import PadCollator
    from loraforge.eval.perplexity import PerplexityEvaluator

    val, bs = trainer.data.validation, trainer.config.eval.eval_batch_size
    collate = PadCollator(trainer.tokenizer.pad_token_id)
    batches = [collate(list(val[i:i + bs])) for i in range(0, len(val), bs)]
    return float(PerplexityEvaluator(trainer.model, trainer.tokenizer).evaluate(batches)["perplexity"])


def _require_path(arm: Arm, trainer: Any, switches: dict[str, bool]) -> None:
    """Refuse to measure an arm whose run did not get the path the arm names."""
    patched = bool(trainer.fast_path.report.get("patched"))
    if arm.fused is not None and patched != arm.fused:
        why = trainer.fast_path.report.get("reason", "")
        raise ConvergenceError(f"arm {arm.name}: the fused kernels are {'on' if patched else 'off'} but the arm "
                               f"needs them {'on' if arm.fused else 'off'} ({why}; {trainer.fast_path.line}).")
    if arm.graphs and trainer.fast_path.graphs is None:
        raise ConvergenceError(f"arm {arm.name}: CUDA graphs did not turn on ({trainer.fast_path.line}); "
                               "see the log above for why.")
    if "training.long_context=true" in arm.overrides and not all(switches.values()):
        raise ConvergenceError(f"arm {arm.name}: long-context switches not all on: {switches}.")


def check_evaluator(cfg: Any, adapter_dir: Path, validation: Sequence[dict], pad_id: int,
                    device: Device) -> dict[str, float]:
    """Our evaluator vs transformers' own loss on a fresh fp32 load of base + saved adapter; raises on a miss."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.data.collate import PadCollator
    from loraforge.eval.perplexity import PerplexityEvaluator
    from loraforge.model.load import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model), dtype=torch.float32,
                                                device_map={"": device})
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    collate = PadCollator(pad_id)
    batches = [collate(list(validation[i:i + 8])) for i in range(0, len(validation), 8)]
    ours = PerplexityEvaluator(model).evaluate(batches)["perplexity"]
    stock = labels_loss_perplexity(model, validation, device)
    rel = abs(ours / stock - 1)
    if rel > CHECK_TOLERANCE:
        raise ConvergenceError(f"evaluator check failed: eval/perplexity.py gives {ours:.4f}, transformers' own "
                               f"loss gives {stock:.4f} (relative difference {rel:.2e} > {CHECK_TOLERANCE}).")
    return {"ours_fp32_reload": ours, "transformers_labels_loss": stock, "relative_difference": rel,
            "tolerance": CHECK_TOLERANCE}


def labels_loss_perplexity(model: Any, conversations: Sequence[dict], device: str) -> float:
    """exp(mean NLL over every labelled token) from transformers' own `labels=` loss, one unpadded
    conversation at a time: no mask, no padding to get wrong, nothing of eval/perplexity.py."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ex in conversations:
            labels = torch.tensor([ex["labels"]], device=device)
            n = int((labels[:, 1:] != -100).sum())
            if n:  # transformers' loss is the mean over these n tokens
                total += float(model(input_ids=torch.tensor([ex["input_ids"]], device=device), labels=labels).loss) * n
                count += n
    return math.exp(total / count)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tail_mean(values: list[float]) -> float | None:
    if not values:
        return None
    tail = values[-max(1, len(values) // 10):]
    return sum(tail) / len(tail)


# ------------------------------------------------------------------------------------------ all arms (parent)


def run_convergence(device: Device, arm_names: Sequence[str], steps: int, out_dir: Path, workdir: Path,
                    log: Callable[[str], None] = print, threads: int | None = None,
                    parallel: int = 1, extra: Sequence[str] = ()) -> tuple[Path, list[dict[str, Any]]]:
    """Run each arm in its own process, then write convergence-<device>-<date>.json and the loss-curve PNG.

    `parallel` > 1 runs that many arms at once (on one GPU the small model's arms are host-bound, so several
    share it with room to spare); held-out perplexity does not depend on it, but then `tokens_per_s` and
    `wall_s` are not speed measurements, and the results say so. `extra`: config overrides for every arm
    (e.g. `data.max_samples=null`), checked here before any arm starts. Returns the JSON path and the records. A
    failed arm is recorded with its error and the others still run; ConvergenceError is raised at the end
    naming every failed arm, after the results are written.
    """
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ResourceError(f"--device cuda: no CUDA GPU is visible here (torch {torch.__version__}); nothing was "
                            "run. The CPU arms run with --device cpu.")
    arms = arms_for(device, arm_names)
    for arm in arms:  # a bad --set fails now (ConfigError, exit 2), not in every child
        arm_config(arm, steps, workdir, extra)
    workdir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    writing = threading.Lock()

    def run(arm: Arm) -> None:
        log(f"── arm {arm.name} ({arm.note}), {steps} steps")
        record = _run_child(arm, steps, workdir, log, threads, extra)
        # Written after every arm: a run cut short (a device call's time limit) keeps the arms it finished.
        with writing:
            done[arm.name] = record
            _write_results(device, [done[a.name] for a in arms if a.name in done], steps, out_dir,
                           complete=len(done) == len(arms), parallel=parallel)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(run, arms))
    records = [done[a.name] for a in arms]
    stem, summary = _write_results(device, records, steps, out_dir, complete=True, parallel=parallel)
    plot_curves(records, stem.with_suffix(".png"),
                title=f"convergence on {summary['device']}, {steps} steps, same data and seed")
    for c in summary["comparisons"]:
        log(c["line"])
    failed = [r for r in records if "error" in r]
    if failed:
        raise ConvergenceError(f"{len(failed)} arm(s) failed: " + "; ".join(f"{r['arm']}: {r['error']}"
                                                                             for r in failed)
                               + f" (results so far: {stem.with_suffix('.json')})")
    return stem.with_suffix(".json"), records


def _write_results(device: Device, records: list[dict[str, Any]], steps: int, out_dir: Path,
                   complete: bool, parallel: int = 1) -> tuple[Path, dict[str, Any]]:
    """convergence-<device>-<date>.json with the arms run so far and the criteria they allow."""
    from loraforge.bench.device import device_tag

    date = datetime.date.today().isoformat()
    tag = records[0].get("device", device) if records else device
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"convergence-{device_tag(tag) if device == 'cuda' else 'cpu'}-{date}"
    summary = {"device": tag, "date": date, "steps": steps, "config": "configs/demo.yaml + common_overrides",
               "complete": complete, "parallel": parallel, "comparisons": compare_arms(records), "arms": records}
    if parallel > 1:
        summary["timing_note"] = (f"{parallel} arms ran at once on one device: tokens_per_s and wall_s are not "
                                  "speed measurements (held-out perplexity does not depend on it)")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return stem, summary


def _run_child(arm: Arm, steps: int, workdir: Path, log: Callable[[str], None],
               threads: int | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    record_path = workdir / f"{arm.name}.record.json"
    record_path.unlink(missing_ok=True)
    src = str(Path(__file__).resolve().parents[2])  # the child imports the same loraforge as this process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "loraforge.bench.convergence", "--arm", arm.name, "--steps", str(steps),
           "--workdir", str(workdir), "--record", str(record_path)] + (["--threads", str(threads)] if threads else [])
    cmd += [f"--set={o}" for o in extra]
    t0 = time.perf_counter()
    log_path = workdir / f"{arm.name}.log"
    lines: list[str] = []
    # The child's output goes to its log file as it comes (a long arm shows progress); the tail is kept for errors.
    with log_path.open("w") as log_file, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                                          stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # type: ignore[union-attr]
            log_file.write(line)
            log_file.flush()
            lines = (lines + [line.rstrip()])[-15:]
    if proc.returncode != 0 or not record_path.is_file():
        tail = "\n".join(lines)
        log(f"arm {arm.name} FAILED (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
        last = lines[-1] if lines else "no output"
        return {"arm": arm.name, "error": f"exit {proc.returncode}: {last}",
                "wall_s": round(time.perf_counter() - t0, 1)}
    record = json.loads(record_path.read_text())
    log(f"arm {arm.name}: held-out ppl {record['step0_held_out_ppl']:.4f} at step 0 → {record['held_out_ppl']:.4f}, "
        f"final loss {record['final_loss']:.4f}, "
        f"{record['wall_s']:.0f}s · {record['fast_path']}")
    return record


def compare_arms(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The criteria and relations whose two arms both ran: relative difference of held-out perplexity."""
    ppl = {r["arm"]: r["held_out_ppl"] for r in records if "held_out_ppl" in r}
    step0 = {r["arm"]: r["step0_held_out_ppl"] for r in records if r.get("step0_held_out_ppl")}
    out = []
    for a, b, *bound in [*CRITERIA, *RELATIONS]:
        if a in ppl and b in ppl:
            rel = ppl[a] / ppl[b] - 1
            item: dict[str, Any] = {"arm": a, "reference": b, "relative_difference": rel}
            verdict = ""
            if bound:
                item["bound"] = bound[0]
                item["within"] = abs(rel) <= bound[0]
                verdict = f" (bound ±{bound[0]:.0%}: {'within' if item['within'] else 'MISSED'})"
            item["line"] = f"{a} vs {b}: held-out ppl {ppl[a]:.4f} vs {ppl[b]:.4f}, {rel:+.2%}{verdict}"
            if a in step0 and b in step0:
                # At step 0 the adapters are zero: the difference the arms' base models alone make.
                rel0 = item["step0_relative_difference"] = step0[a] / step0[b] - 1
                item["line"] += f"; at step 0 {step0[a]:.4f} vs {step0[b]:.4f}, {rel0:+.2%}"
            out.append(item)
    return out


def plot_curves(records: list[dict[str, Any]], out_png: Path, title: str) -> Path | None:
    """Every arm's training loss against step in one PNG (a light moving mean, the raw steps faint)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [(r["arm"], r["loss_curve"], r["held_out_ppl"]) for r in records if r.get("loss_curve")]
    if not curves:
        return None
    fig = Figure(figsize=(9, 5), dpi=130)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for arm, curve, ppl in curves:
        steps, losses = [s for s, _ in curve], [v for _, v in curve]
        window = max(3, len(steps) // 15) | 1
        (line,) = ax.plot(steps, _moving_mean(losses, window), linewidth=1.8,
                          label=f"{arm} (held-out ppl {ppl:.3f})")
        ax.plot(steps, losses, color=line.get_color(), linewidth=0.8, alpha=0.25)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean token NLL; moving mean, raw steps faint)")
    ax.set_title(title)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out_png, format="png")
    return out_png


def _moving_mean(values: list[float], window: int) -> list[float]:
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def main(argv: Sequence[str] | None = None) -> int:
    """Child entry point: train one arm and write its record (the parent reads it)."""
    p = argparse.ArgumentParser(description="Train one convergence arm (run by run_convergence).")
    p.add_argument("--arm", required=True, choices=sorted(ARMS))
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], help="a config override for this arm (KEY=VALUE)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        # On cores shared with other jobs, one thread ran a forward 3x faster than two (13.6 s vs 4.2 s).
        torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    record = train_arm(ARMS[a.arm], a.steps, a.workdir, log=lambda m: print(m, flush=True), extra=a.set)
    a.record.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
