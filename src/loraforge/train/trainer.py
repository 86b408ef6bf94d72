"""`LLAMATrainer`: the one training loop, used by the CLI, the Python API, the demo and the benchmarks.

Read `train()` top to bottom: set up the run folder; load data (bad data fails before the model loads);
load the model and attach LoRA; build optimizer and schedule; resume if asked; then the loop — gather
the micro-batches of one optimizer step, count their labelled tokens, forward/backward each with the loss
normalized by that count, clip, step, log, evaluate, checkpoint — and finally save the adapter.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, RunConfig, TrainingConfig
from loraforge.errors import ResourceError, TrainingError
from loraforge.train import checkpoint as ckpt
from loraforge.train.optim import build_optimizer, build_scheduler
from loraforge.train.progress import TrainProgress
from loraforge.train.sampler import MicroBatchStream
from loraforge.train.tracking import MetricsLog, Trackers


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved at {checkpoint}. "
                         "Continue with --resume.")
        self.signum = signum
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    eval_loss: float | None
    eval_perplexity: float | None
    train_seconds: float
    tokens_per_s: float
    adapter_dir: Path
    run_dir: Path
    best_checkpoint: Path | None
    stopped_early: bool = False
    data_stats: dict[str, Any] = field(default_factory=dict)


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def strategy_plugins(cfg: RunConfig) -> dict[str, Any]:
    """Accelerate plugins for training.distributed_strategy (DDP needs none).

    "auto" leaves the choice to the launcher: `accelerate launch --config_file configs/accelerate/X.yaml`
    sets ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED and Accelerator() reads them.
    """
    strategy = cfg.training.distributed_strategy
    if strategy in ("auto", "ddp") or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return {}
    if strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        # QLoRA under FSDP: the 4-bit weights must be stored in the compute dtype (bnb_4bit_quant_storage,
        # set by the model loader) so FSDP can flatten and shard them with the rest; LoRA layers are wrapped
        # in their own units (peft's policy) so frozen and trainable parameters are not mixed in one flat
        # parameter (the policy is set in setup(), once the model exists); use_orig_params keeps our
        # weight-decay parameter groups; rank 0 loads the weights and broadcasts them
        # (cpu_ram_efficient_loading + sync_module_states), so a 70B model need not fit in every process's RAM.
        return {"fsdp_plugin": FullyShardedDataParallelPlugin(
            sharding_strategy="FULL_SHARD", auto_wrap_policy=None, use_orig_params=True,
            cpu_ram_efficient_loading=True, sync_module_states=True, state_dict_type="FULL_STATE_DICT",
            activation_checkpointing=False)}
    from accelerate.utils import DeepSpeedPlugin

    tcfg = cfg.training
    return {"deepspeed_plugin": DeepSpeedPlugin(
        zero_stage=3 if strategy == "deepspeed_zero3" else 2, gradient_clipping=tcfg.max_grad_norm or None,
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps, zero3_init_flag=False,
        zero3_save_16bit_model=True)}


def environment_info(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    import peft
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "platform": platform.platform(), "device": str(device),
            "world_size": world_size}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class LLAMATrainer:
    """Fine-tune a Llama-family model with LoRA/QLoRA.

    >>> trainer = LLAMATrainer(model_config=ModelConfig(), lora_config=LoRAConfig(), data_config=DataConfig(),
    ...                        training_config=TrainingConfig(max_steps=10), eval_config=EvalConfig())
    >>> result = trainer.train()            # doctest: +SKIP
    >>> trainer.evaluate(test_prompts=["Hi!"], test_references=["Hello!"])  # doctest: +SKIP
    """

    def __init__(self, model_config: ModelConfig | None = None, lora_config: LoRAConfig | None = None,
                 data_config: DataConfig | None = None, training_config: TrainingConfig | None = None,
                 eval_config: EvalConfig | None = None, *, log=None):
        self.config = RunConfig(model=model_config or ModelConfig(), lora=lora_config or LoRAConfig(),
                                data=data_config or DataConfig(), training=training_config or TrainingConfig(),
                                eval=eval_config or EvalConfig())
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.model: Any = None
        self.tokenizer: Any = None
        self.data: Any = None
        self.accelerator: Any = None
        self._signal: int | None = None

    @classmethod
    def from_config(cls, config: RunConfig, **kwargs: Any) -> LLAMATrainer:
        return cls(config.model, config.lora, config.data, config.training, config.eval, **kwargs)

    # ------------------------------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Load tokenizer, data, model and adapter (idempotent)."""
        if self.model is not None:
            return
        from accelerate import Accelerator

        from loraforge.data.pipeline import build_datasets
        from loraforge.model.load import load_base, load_tokenizer, pick_placement, resolve_model_path
        from loraforge.model.lora import attach_lora, parameter_counts
        from loraforge.model.memory import check_fits

        cfg = self.config
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available() and cfg.model.device != "cpu":
            # Under torchrun/accelerate launch each process owns one GPU; pick_placement (and the model's
            # device_map) use the current device, which is cuda:0 for every process unless set here.
            # (model.device=cpu: no GPU is used, and rank 1 on a 1-GPU machine has no cuda:1.)
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        placement = pick_placement(cfg.model)
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
        if not launched and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            # Accelerate keeps its state (device, mixed precision) in process-wide singletons: a second
            # Accelerator(...) with another device or precision raises "AcceleratorState has already been
            # initialized", so a Python-API user training twice in one process (fp32 then bf16, CPU then
            # GPU, the sweep's trials) would fail. Alone in the process, forget the earlier trainer's state
            # (an earlier trainer's accelerator then reports this one's). Under a launcher the state holds
            # the process group and stays. _reset_state is Accelerate's own reset (its test utilities use
            # it, 1.x); hasattr-guarded since it is private.
            from accelerate import state as acc_state

            if hasattr(acc_state.AcceleratorState, "_reset_state"):
                acc_state.AcceleratorState._reset_state(reset_partial_state=True)
            elif hasattr(acc_state.PartialState, "_reset_state"):
                acc_state.PartialState._reset_state()
            if hasattr(acc_state, "GradientState") and hasattr(acc_state.GradientState, "_reset_state"):
                acc_state.GradientState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(cfg.training.mixed_precision, placement.device),
            cpu=placement.device.type == "cpu", **strategy_plugins(cfg))
        # Data first: a malformed record should fail in seconds, before a large model is loaded.
        self.tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model)
        self.data = build_datasets(cfg.data, self.tokenizer, cfg.eval.num_generation_samples)
        for split, stats in self.data.stats.items():
            self.log(f"data  {stats.line(split)}")
            for err in stats.first_errors:
                self.log(f"      skipped: {err}")
        check_fits(cfg, placement, self.log)
        if cfg.training.long_context or placement.device.type == "cuda":
            from loraforge.model.memory import report_max_length

            report_max_length(cfg, placement, self.log)
        torch.manual_seed(cfg.training.seed)
        acc = self.accelerator
        fsdp = acc.distributed_type.name == "FSDP"
        model, _ = load_base(cfg.model, for_training=True, gradient_checkpointing=cfg.training.gradient_checkpointing,
                             placement=placement, sharded=fsdp)
        self.model = attach_lora(model, cfg.lora)
        if acc.distributed_type.name == "FSDP":
            from peft.utils.other import fsdp_auto_wrap_policy

            acc.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(self.model)
        elif acc.distributed_type.name == "DEEPSPEED":
            # We feed batches ourselves (no prepared DataLoader), so DeepSpeed cannot infer these.
            acc.state.deepspeed_plugin.deepspeed_config.update(
                train_micro_batch_size_per_gpu=cfg.training.per_device_train_batch_size,
                gradient_accumulation_steps=cfg.training.gradient_accumulation_steps)
        # The fast kernels read the packed NF4 bytes as uint8; FSDP stores them in the compute dtype.
        if placement.device.type == "cuda" and cfg.model.fast_kernels and not fsdp:
            self._apply_fast_kernels()
        from loraforge.train.long_context import apply_long_context

        apply_long_context(self.model, cfg.training, log=self.log)  # no-op unless long_context / its switches
        trainable, total = parameter_counts(self.model)
        weights = ("4-bit " + cfg.model.bnb_4bit_quant_type if cfg.model.use_4bit else "8-bit" if cfg.model.use_8bit
                   else str(placement.dtype).replace("torch.", ""))
        self.log(f"model {cfg.model.model_name}: {total / 1e6:,.1f}M parameters, {trainable / 1e6:,.2f}M trainable "
                 f"({100 * trainable / total:.2f}%), on {placement.device}, {weights}")

    def _apply_fast_kernels(self) -> None:
        try:
            from loraforge.kernels import patch_model
        except ImportError as e:  # the kernels need triton; a CPU-only install may not have it
            self.log(f"fast kernels unavailable ({e}); using the stock path")
            return
        summary = patch_model(self.model)
        self.log(f"fast kernels: {summary}")
        cfg = self.config
        from loraforge.train.long_context import long_context_switches

        if not summary.get("patched") or not cfg.model.cuda_graphs:
            return
        if not cfg.training.gradient_checkpointing:
            self.log("CUDA graphs: off (they replay checkpointed layers; training.gradient_checkpointing is false)")
        elif long_context_switches(cfg.training).get("offload_activations"):
            self.log("CUDA graphs: off (long-context offloading runs its own checkpoint)")
        elif self.accelerator.num_processes > 1:
            self.log("CUDA graphs: off under several processes (not yet measured with DDP's gradient hooks)")
        else:
            from loraforge.kernels.graphs import enable_graphed_layers

            self._graphs = enable_graphed_layers(self.model, log=self.log)
            self.log("CUDA graphs: on (each checkpointed layer is captured once its batch shape repeats; "
                     "data.packing gives one shape)")

    # ------------------------------------------------------------------------------------------ training

    def train(self, on_eval: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
        """Run the training loop. `on_eval(step, metrics)` is called after every evaluation (the sweep
        uses it to report to Optuna; it may raise to stop the run, e.g. optuna.TrialPruned)."""
        cfg, tcfg = self.config, self.config.training
        run_dir = Path(tcfg.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.setup()
        acc, model = self.accelerator, self.model
        is_main, world = acc.is_main_process, acc.num_processes
        if is_main:
            cfg.save(run_dir / "config.yaml")
            (run_dir / "environment.json").write_text(json.dumps(environment_info(acc.device, world), indent=1))
            stats = {k: asdict(v) for k, v in self.data.stats.items()}
            (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))

        from loraforge.data.collate import PadCollator

        # CUDA graphs replay a captured shape: rows padded to a multiple of 128 give a few shapes that
        # recur (packing gives exactly one); otherwise a multiple of 8 suits the tensor cores.
        multiple = (128 if getattr(self, "_graphs", None) is not None else 8) if acc.device.type == "cuda" else None
        collate = PadCollator(self.tokenizer.pad_token_id, multiple)
        train_set = self.data.train
        # A streamed (on-disk) training set knows its lengths; reading every example to get them would
        # defeat streaming.
        lengths = getattr(train_set, "lengths", None)
        stream = MicroBatchStream(list(lengths) if lengths is not None else [len(e["input_ids"]) for e in train_set],
                                  tcfg.per_device_train_batch_size,
                                  seed=tcfg.seed, world_size=world, rank=acc.process_index,
                                  group_by_length=cfg.data.group_by_length)
        accum = tcfg.gradient_accumulation_steps
        total_steps = tcfg.max_steps if tcfg.max_steps > 0 else max(
            1, math.ceil(tcfg.num_train_epochs * stream.per_epoch / accum))

        if acc.distributed_type.name == "FSDP":  # FSDP shards the model; the optimizer must see its params
            model = acc.prepare(model)
        optimizer = build_optimizer(model, tcfg, acc.device, cfg.lora, notice=self.log)
        scheduler = build_scheduler(optimizer, tcfg, total_steps)
        model, optimizer = acc.prepare(model, optimizer) if acc.distributed_type.name != "FSDP" else (
            model, acc.prepare(optimizer))
        scaler = getattr(acc, "scaler", None)

        ckpt_root = run_dir / "checkpoints"
        state = ckpt.TrainerState()
        resume_from = self._resume_path(ckpt_root)
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, acc.unwrap_model(model), optimizer.optimizer, scheduler, scaler,
                                         rank=acc.process_index, world_size=world)
            self.log(f"resumed from {resume_from} at step {state.step}")
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step if resume_from else None) \
            if is_main else None
        trackers = Trackers(tcfg.report_to, run_dir, tcfg.run_name or run_dir.name, cfg.to_dict()) if is_main else None

        self._signal = None
        self._install_signal_handlers()
        progress = TrainProgress(total_steps, enabled=is_main)
        progress.start(state.step)
        window_nll, window_tokens, window_seen, window_t0 = 0.0, 0, 0, time.perf_counter()
        last_loss: float | None = None
        last_eval: dict[str, float] | None = None
        stopped_early = False
        batches = stream.batches(start=state.micro_batch)
        run_t0 = time.perf_counter() - state.elapsed_seconds
        # DDP/FSDP/ZeRO average gradients over processes; our loss is already divided by the global token
        # count, so scale it back up. DeepSpeed also divides by its accumulation steps inside backward.
        deepspeed = acc.distributed_type.name == "DEEPSPEED"
        loss_scale = world * (accum if deepspeed else 1)
        model.train()
        try:
            while state.step < total_steps:
                # One optimizer step = `accum` micro-batches on each process. Count their labelled tokens
                # first, summed over all processes, so every micro-batch's loss is its summed NLL over that
                # one count: the mean over all labelled tokens of the step, not a mean of per-micro-batch
                # means. The same all-reduce carries the tokens seen and "a signal arrived on some rank",
                # so every rank stops after the same step (a rank that saved alone would deadlock).
                micro = [collate([train_set[i] for i in idx]) for _, idx in (next(batches) for _ in range(accum))]
                state.micro_batch += accum
                counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                                       sum(tokens_in(b, self.tokenizer.pad_token_id) for b in micro),
                                       int(self._signal is not None)], device=acc.device)
                if world > 1:
                    counts = acc.reduce(counts, reduction="sum")
                n_tokens, seen, stop_requested = counts[0], int(counts[1]), bool(counts[2])
                step_nll = torch.zeros((), device=acc.device)
                for k, batch in enumerate(micro):
                    batch = {key: v.to(acc.device) for key, v in batch.items()}
                    sync = k == accum - 1
                    if deepspeed:  # the engine steps inside backward at the boundary Accelerate reports
                        acc.gradient_state._set_sync_gradients(sync)
                    with (nullcontext() if sync or world == 1 else acc.no_sync(model)):
                        loss = self._micro_step_loss(model, batch, n_tokens)
                        step_nll += loss.detach().float() * n_tokens
                        # A non-finite loss still goes through backward (as 0) so the ranks' gradient
                        # all-reduces stay matched; the whole step is dropped below.
                        acc.backward(torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * loss_scale)
                if world > 1:
                    step_nll = acc.reduce(step_nll, reduction="sum")
                step_nll_value = float(step_nll)  # the step's one host sync
                state.step += 1
                state.tokens_seen += seen
                window_seen += seen
                lr = scheduler.get_last_lr()[0]  # the lr this step uses
                if not math.isfinite(step_nll_value):
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()  # keep the schedule aligned with the data position
                    state.nonfinite_in_a_row += 1
                    state.nonfinite_total += 1
                    self.log(f"step {state.step}: non-finite loss, step skipped "
                             f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_total} in total)")
                    if state.nonfinite_in_a_row >= tcfg.max_nonfinite_steps:
                        path = self._save(ckpt_root, state, model, optimizer, scheduler, scaler, run_t0)
                        raise TrainingError(
                            f"{state.nonfinite_in_a_row} non-finite losses in a row at step {state.step}; stopped "
                            f"(checkpoint {path}). Lower training.learning_rate, check the data, or use bf16 "
                            "instead of fp16.")
                    if stop_requested or (world == 1 and self._signal is not None):
                        path = self._save(ckpt_root, state, model, optimizer, scheduler, scaler, run_t0)
                        raise Preempted(self._signal or signal.SIGTERM, path)
                    continue
                state.nonfinite_in_a_row = 0
                grad_norm = acc.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm) \
                    if tcfg.max_grad_norm > 0 else None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                window_nll += step_nll_value
                window_tokens += int(n_tokens)
                last_loss = step_nll_value / max(1, int(n_tokens))
                progress.update(state.step, last_loss, lr)

                if state.step % tcfg.logging_steps == 0 or state.step == total_steps:
                    elapsed = time.perf_counter() - window_t0
                    record = {"step": state.step, "epoch": round(state.micro_batch / stream.per_epoch, 4),
                              "loss": window_nll / max(1, window_tokens), "lr": lr,
                              "grad_norm": float(grad_norm) if grad_norm is not None else None,
                              "tokens_per_s": window_seen / max(elapsed, 1e-9),
                              "elapsed_s": round(time.perf_counter() - run_t0, 2)}
                    if state.nonfinite_total:
                        record["nonfinite_steps"] = state.nonfinite_total
                    if is_main:
                        metrics.write(record)
                        trackers.log(record, state.step)
                        progress.log_line(record)
                    window_nll, window_tokens, window_seen, window_t0 = 0.0, 0, 0, time.perf_counter()

                is_last = state.step == total_steps
                improved = False
                if (tcfg.eval_steps and state.step % tcfg.eval_steps == 0) or is_last:
                    last_eval = self._evaluate_during_training(model, collate)
                    if last_eval:
                        improved = state.best_eval_loss is None or last_eval["eval_loss"] < state.best_eval_loss
                        if improved:
                            state.best_eval_loss, state.best_step = last_eval["eval_loss"], state.step
                            state.evals_without_improvement = 0
                        else:
                            state.evals_without_improvement += 1
                        record = {"step": state.step, **last_eval}
                        if is_main:
                            metrics.write(record)
                            trackers.log(record, state.step)
                            progress.log_line(record)
                        if on_eval is not None:
                            on_eval(state.step, last_eval)
                    if tcfg.early_stopping_patience and state.evals_without_improvement >= tcfg.early_stopping_patience:
                        self.log(f"early stopping at step {state.step}: no improvement in "
                                 f"{state.evals_without_improvement} evaluations")
                        stopped_early = True

                # A new best is always checkpointed, so "keep the last K plus the best" has a best to keep.
                if (tcfg.save_steps and state.step % tcfg.save_steps == 0) or is_last or stopped_early or improved:
                    try:
                        self._save(ckpt_root, state, model, optimizer, scheduler, scaler, run_t0)
                    except ResourceError as e:
                        if is_last:
                            raise
                        self.log(f"warning: {e} Training continues.")
                if stop_requested or (world == 1 and self._signal is not None):
                    path = self._save(ckpt_root, state, model, optimizer, scheduler, scaler, run_t0)
                    raise Preempted(self._signal or signal.SIGTERM, path)
                if stopped_early:
                    break
        except torch.OutOfMemoryError as e:
            raise ResourceError(
                "the GPU ran out of memory during a training step "
                f"(per_device_train_batch_size={tcfg.per_device_train_batch_size}, "
                f"gradient_accumulation_steps={accum}, max_length={cfg.data.max_length}, "
                f"gradient_checkpointing={str(tcfg.gradient_checkpointing).lower()}). Options: lower "
                "training.per_device_train_batch_size (and raise gradient_accumulation_steps to keep the "
                "effective batch), set training.gradient_checkpointing=true, lower data.max_length, "
                "or load the model in 4-bit (model.use_4bit=true).") from e
        finally:
            progress.stop()
            self._restore_signal_handlers()
            if trackers:
                trackers.close()

        train_seconds = time.perf_counter() - run_t0
        adapter_dir = run_dir / "adapter"
        try:
            self._save_adapter(model, adapter_dir)
            if is_main:
                self.tokenizer.save_pretrained(adapter_dir)
                (run_dir / "loraforge_run.json").write_text(json.dumps(
                    {"model_name": cfg.model.model_name, "data_kind": self.data.kind,
                     "template": cfg.data.template, "system_prompt": cfg.data.system_prompt}, indent=1))
        except Exception as e:  # a full disk: tokenizers and safetensors raise their own error types
            if not ckpt.is_write_failure(e):
                raise
            raise ResourceError(f"could not write the adapter to {adapter_dir} ({e}); the checkpoint "
                                f"{ckpt.latest_checkpoint(ckpt_root)} is complete. Free disk space and run the same "
                                "command with --resume to write the adapter.") from e
        if is_main:
            self._plot(run_dir)
        acc.wait_for_everyone()
        best = ckpt_root / f"step-{state.best_step}" if state.best_step is not None else None
        return TrainResult(
            steps=state.step, train_loss=last_loss,
            eval_loss=last_eval["eval_loss"] if last_eval else None,
            eval_perplexity=last_eval["eval_perplexity"] if last_eval else None,
            train_seconds=train_seconds, tokens_per_s=state.tokens_seen / max(train_seconds, 1e-9),
            adapter_dir=adapter_dir, run_dir=run_dir, best_checkpoint=best if best and best.exists() else None,
            stopped_early=stopped_early, data_stats={k: asdict(v) for k, v in self.data.stats.items()})

    def _micro_step_loss(self, model: Any, batch: dict[str, torch.Tensor], n_tokens: torch.Tensor) -> torch.Tensor:
        """Summed NLL of the micro-batch's labelled tokens divided by the step's token count.

        transformers' causal-LM loss divides by `num_items_in_batch` when given, instead of by the
        micro-batch's own count; that is exactly the normalization gradient accumulation needs.
        """
        out = model(**batch, num_items_in_batch=n_tokens, use_cache=False)
        return out.loss

    def _resume_path(self, ckpt_root: Path) -> Path | None:
        choice = self.config.training.resume_from_checkpoint
        if not choice:
            return None
        if choice == "latest":
            path = ckpt.latest_checkpoint(ckpt_root)
            if path is None:
                self.log(f"resume: no complete checkpoint in {ckpt_root}; starting from the beginning")
            return path
        path = Path(choice)
        if not ckpt.is_complete(path):
            from loraforge.errors import ConfigError

            raise ConfigError(f"training.resume_from_checkpoint: {choice!r} is not a complete checkpoint "
                              f"(complete ones: {[p.name for p in ckpt.list_checkpoints(ckpt_root)] or 'none'}).")
        return path

    def _save(self, root: Path, state: ckpt.TrainerState, model: Any, optimizer: Any, scheduler: Any,
              scaler: Any, run_t0: float) -> Path:
        """Write a checkpoint (rank 0 writes; every rank must call this, at the same step)."""
        acc = self.accelerator
        state.elapsed_seconds = time.perf_counter() - run_t0
        path = root / f"step-{state.step}"
        inner = getattr(optimizer, "optimizer", optimizer)
        # Each rank's RNG (dropout differs per rank) and, when the optimizer state is sharded, each
        # rank's optimizer state go to rank 0, which writes the one checkpoint.
        rng = [ckpt.rng_state()]
        opt_state = [inner.state_dict()] if self._sharded() else None
        adapter_state = acc.get_state_dict(model) if self._sharded() else None
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
            opt_state = gather_object(opt_state) if opt_state is not None else None
        if acc.is_main_process:
            path = ckpt.save_checkpoint(root, state, acc.unwrap_model(model), inner, scheduler, scaler,
                                        rng_states=rng, optimizer_states=opt_state, adapter_state=adapter_state)
            ckpt.rotate(root, self.config.training.save_total_limit, state.best_step)
        acc.wait_for_everyone()
        return path

    def _sharded(self) -> bool:
        return self.accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")

    def _save_adapter(self, model: Any, adapter_dir: Path) -> None:
        acc = self.accelerator
        state_dict = acc.get_state_dict(model) if self._sharded() else None  # collective under FSDP/ZeRO-3
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(adapter_dir, safe_serialization=True, state_dict=state_dict)

    def _evaluate_during_training(self, model: Any, collate: Any) -> dict[str, float]:
        from loraforge.eval.perplexity import PerplexityEvaluator

        if not self.data.validation:
            return {}
        bs = self.config.eval.eval_batch_size
        val = self.data.validation
        loader = [collate(val[i:i + bs]) for i in range(0, len(val), bs)]
        model.eval()
        try:
            result = PerplexityEvaluator(model, self.tokenizer).evaluate(loader)
        finally:
            model.train()
        return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"]}

    def _plot(self, run_dir: Path) -> None:
        from loraforge.eval.report import plot_loss_curve

        try:
            plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
        except Exception as e:  # noqa: BLE001 - a failed plot must never lose a finished run
            self.log(f"warning: could not draw the loss curve ({e})")

    def _install_signal_handlers(self) -> None:
        self._previous_handlers = {}

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._signal = signum
            self.log(f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint")

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a server); signals stay as they are
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, h in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, h)

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, test_prompts: list[Any] | None = None,
                 test_references: list[str] | None = None) -> dict[str, Any]:
        """Validation perplexity, and BLEU/ROUGE/exact match of generated answers when prompts are given
        (defaults: the held-out pairs of the validation split)."""
        from loraforge.data.collate import PadCollator
        from loraforge.eval.qualitative import generation_metrics

        self.setup()
        model = self.accelerator.unwrap_model(self.model)
        results: dict[str, Any] = {}
        collate = PadCollator(self.tokenizer.pad_token_id)
        results.update(self._evaluate_during_training(model, collate))
        if test_prompts is None:
            pairs = self.data.eval_pairs
            test_prompts, test_references = [p for p, _ in pairs], [r for _, r in pairs]
        if test_prompts:
            if test_references is None or len(test_references) != len(test_prompts):
                raise ValueError("evaluate: test_references must be given, one per prompt")
            results.update(generation_metrics(model, self.tokenizer, self.data.formatter, test_prompts,
                                              test_references, self.config.eval))
        return results


def tokens_in(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> int:
    """Real (non-padding) tokens in a batch; packed batches carry no attention mask."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if pad_token_id is None:
        return batch["input_ids"].numel()
    return int((batch["input_ids"] != pad_token_id).sum())
