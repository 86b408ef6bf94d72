"""`LLAMATrainer`: the one training loop, used by the CLI, the Python API, the demo and the benchmarks.

`train()` claims the run folder (one run per folder, see runfolder.py); read `_train()` top to bottom:
load data (bad data fails before the model loads); load the model and attach LoRA; write the run
record; build optimizer and schedule; resume if asked; then the loop — one optimizer step
(`_optimizer_step`: count the step's labelled tokens, forward/backward each micro-batch with the loss
normalized by that count, clip, step), log, evaluate, checkpoint — and finally save the adapter. On one
GPU with a fused AdamW the host never waits for a step: its loss is read, and the step logged, a step later
(`_HostCopy`). What several processes need (Accelerate's state, FSDP/DeepSpeed, the collectives) is in distributed.py.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, RunConfig, TrainingConfig
from loraforge.data.collate import PadCollator
from loraforge.errors import ConfigError, ResourceError, RunFolderError, TrainingError
from loraforge.model.card import name_base
from loraforge.train import checkpoint as ckpt
from loraforge.train import preference
from loraforge.train.distributed import (
    bind_process_gpu,
    build_accelerator,
    fit_plugins_to_model,
    gradient_sync,
    is_first_process,
    is_fsdp,
    is_sharded,
    loss_scale,
    sum_over_processes,
)
from loraforge.train.fast_path import FastPath, apply_fast_path, prime_graphs
from loraforge.train.optim import build_optimizer, build_scheduler, drops_steps_on_device, finish_step, unwrapped
from loraforge.train.progress import TrainProgress
from loraforge.train.resume_check import check_resume_config
from loraforge.train.runfolder import claim
from loraforge.train.sampler import MicroBatchStream, StepFeed, StepInputs
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


@dataclass
class _Run:
    """What one call of `train()` works with: the prepared model and optimizer, the resumable state, the logs."""

    model: Any
    optimizer: Any  # Accelerate's wrapper; `.optimizer` is torch's
    scheduler: Any
    scaler: Any  # fp16's loss scaler, or None
    state: ckpt.TrainerState
    ckpt_root: Path
    total_steps: int
    metrics: MetricsLog | None  # None off the main process, as are trackers
    trackers: Trackers | None
    progress: TrainProgress
    t0: float = 0.0  # perf_counter at which the run (including earlier sessions it resumes) started
    saved_step: int | None = None  # the step of the last checkpoint this session wrote
    window: _LogWindow | None = None  # sums since the last logged step
    last_loss: float | None = None  # the last finite step's mean loss


@dataclass
class _StepOutcome:
    """One optimizer step, summed over every process."""

    nll: float  # summed NLL of the step's labelled tokens; not finite = the step was dropped
    tokens: int  # labelled tokens
    seen: int  # real (non-padding) tokens fed
    lr: float  # the lr this step used
    grad_norm: torch.Tensor | _HostCopy | None  # before clipping; None when clipping is off or the step was dropped
    stop_requested: bool  # SIGTERM/SIGINT arrived on some process before the step
    pending: _HostCopy | None = None  # set: `nll` is still on its way from the device (`_settled` reads it)


def _settled(out: Any) -> Any:
    """The step's outcome with `nll` read from its device copy, if it was still pending (a preference step,
    `preference.PreferenceStep`, never is)."""
    if getattr(out, "pending", None) is not None:
        out.nll, out.pending = out.pending.read(), None
    return out


class _HostCopy:
    """A device value on its way to the host (a step's summed loss, a logged step's grad norm): queued right
    after it is computed, read a step later.

    Reading a device value with `float()` waits for everything queued on the stream, not just for the value.
    Read at once, the step's loss makes the host wait for the backward and leaves the GPU idle while the host
    then prepares the next forward (the gap between `loraforge train` and the bench, bench/NOTES.md); read in
    the report made during the next step's backward, the last grad norm waits for that whole backward.
    Copied to pinned memory behind an event, it is read when the copy is long done, waiting for nothing else.
    """

    def __init__(self, value: torch.Tensor) -> None:
        self.event = None
        if value.is_cuda:
            self.host = torch.empty((), dtype=value.dtype, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = value

    def read(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)


@dataclass
class _LogWindow:
    """Sums since the last logged step; the logged loss is their mean over the window's labelled tokens."""

    nll: float = 0.0
    tokens: int = 0
    seen: int = 0
    t0: float = field(default_factory=time.perf_counter)
    extra: dict[str, float] = field(default_factory=dict)  # preference metrics, summed (mean per pair when logged)


class _Deferred:
    """Host work the GPU need not wait for: a step's progress bar, metrics record and console line.

    Reading the step's grad norm and printing through rich take milliseconds; done between two steps, the GPU
    waits for them (bench/NOTES.md: ~28 ms a step on Llama-2-7B when logging every step). The trainer queues
    them here and runs them while the next step's backward is on the GPU, or at once before anything that
    must see them written: a checkpoint, an evaluation, the end, an error.
    """

    def __init__(self) -> None:
        self.calls: list[Callable[[], Any]] = []

    def add(self, call: Callable[[], Any]) -> None:
        self.calls.append(call)

    def run(self) -> None:
        while self.calls:  # a call may queue more (a step's accounting queues its report)
            calls, self.calls = self.calls, []
            for call in calls:
                call()


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


def _quiet_worker(_: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGINT: the main process alone stops the run (finishing the step and
    saving), then ends its workers. A worker killed by a signal sent to the whole process group (Ctrl-C, a
    scheduler's scancel) would otherwise make the loader raise before the checkpoint is written."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LLAMATrainer:
    """Fine-tune a Llama-family model with LoRA/QLoRA.

    >>> trainer = LLAMATrainer(model_config=ModelConfig(), lora_config=LoRAConfig(), data_config=DataConfig(),
    ...                        training_config=TrainingConfig(max_steps=10), eval_config=EvalConfig())
    >>> result = trainer.train()            # doctest: +SKIP
    >>> trainer.evaluate(test_prompts=["Hi!"], test_references=["Hello!"])  # doctest: +SKIP

    `LLAMATrainer.from_config(run_config)` takes a whole `RunConfig` (a loaded YAML file) as it is.
    """

    def __init__(self, model_config: ModelConfig | None = None, lora_config: LoRAConfig | None = None,
                 data_config: DataConfig | None = None, training_config: TrainingConfig | None = None,
                 eval_config: EvalConfig | None = None, *, config: RunConfig | None = None, log=None):
        if config is not None and any(c is not None for c in (model_config, lora_config, data_config,
                                                                training_config, eval_config)):
            raise TypeError("LLAMATrainer: give either config= or the section configs, not both")
        self.config = config or RunConfig(model=model_config or ModelConfig(), lora=lora_config or LoRAConfig(),
                                          data=data_config or DataConfig(),
                                          training=training_config or TrainingConfig(),
                                          eval=eval_config or EvalConfig())
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.model: Any = None
        self.tokenizer: Any = None
        self.data: Any = None
        self.accelerator: Any = None
        self.fast_path = FastPath()  # what the GPU fast path did for this run (setup fills it)
        self._signal: int | None = None  # SIGTERM/SIGINT received during train()
        self._signals = 0  # how many of them
        self._saving = False  # a checkpoint is being written (a second signal then waits for it)
        self._previous_handlers: dict[int, Any] = {}
        self._lagged = False  # a step's loss is read a step later (train() decides; see _HostCopy)

    @classmethod
    def from_config(cls, config: RunConfig, **kwargs: Any) -> LLAMATrainer:
        return cls(config=config, **kwargs)

    # ------------------------------------------------------------------------------------------ set-up

    def setup(self) -> None:
        """Load tokenizer, data, model and adapter (idempotent)."""
        if self.model is not None:
            return
        # transformers, peft and the data pipeline take seconds to import; loaded when a run starts
        from loraforge.data.pipeline import build_datasets
        from loraforge.model.load import (
            load_base,
            load_tokenizer,
            pick_placement,
            published_low_bit,
            resolve_model_path,
        )
        from loraforge.model.lora import attach_lora
        from loraforge.model.memory import check_fits, parameter_counts

        cfg = self.config
        bind_process_gpu(cfg.model)
        placement = pick_placement(cfg.model)
        self.accelerator = acc = build_accelerator(cfg, placement.device)
        # Data first: a malformed record should fail in seconds, before a large model is loaded.
        self.tokenizer = load_tokenizer(resolve_model_path(cfg.model), cfg.model)
        if cfg.training.objective == "sft":
            self.data = build_datasets(cfg.data, self.tokenizer, cfg.eval.num_generation_samples)
        else:  # DPO / ORPO read preference pairs (data/preference.py)
            from loraforge.data.preference import build_preference_datasets

            self.data = build_preference_datasets(cfg.data, self.tokenizer)
        for split, stats in self.data.stats.items():
            self.log(f"data  {stats.line(split)}")
            for err in stats.first_errors:
                self.log(f"      skipped: {err}")
        check_fits(cfg, placement, self.log)
        if kind := published_low_bit(cfg.model):
            self.log(f"warning: {cfg.model.model_name} was published as {kind} GGUF, already 4-bit or less; "
                     "model.use_4bit rounds it again to NF4's grid, which costs quality a bf16 checkpoint would "
                     "not (the embedded model: +21% held-out perplexity before training, +5-6% after). If it fits "
                     "without, set model.use_4bit=false.")
        if cfg.training.long_context or placement.device.type == "cuda":
            from loraforge.model.memory import report_max_length

            report_max_length(cfg, placement, self.log)
        torch.manual_seed(cfg.training.seed)
        fsdp = is_fsdp(acc)
        model, _ = load_base(cfg.model, for_training=True, gradient_checkpointing=cfg.training.gradient_checkpointing,
                             placement=placement, sharded=fsdp)
        self.model = attach_lora(model, cfg.lora)
        fit_plugins_to_model(acc, self.model, cfg.training)
        self.fast_path = apply_fast_path(self.model, cfg, processes=acc.num_processes, sharded=fsdp, log=self.log)
        from loraforge.train.long_context import apply_long_context

        apply_long_context(self.model, cfg.training, log=self.log, processes=acc.num_processes)
        trainable, total = parameter_counts(model.config, cfg.lora)  # the memory report's count too
        weights = ("4-bit " + cfg.model.bnb_4bit_quant_type if cfg.model.use_4bit else "8-bit" if cfg.model.use_8bit
                   else str(placement.dtype).replace("torch.", ""))
        self.log(f"model {cfg.model.model_name}: {total / 1e6:,.1f}M parameters, {trainable / 1e6:,.2f}M trainable "
                 f"({100 * trainable / total:.2f}%), on {placement.device}, {weights}")

    # ------------------------------------------------------------------------------------------ training

    def train(self, on_eval: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
        """Run the training loop. `on_eval(step, metrics)` is called after every evaluation (the sweep
        uses it to report to Optuna; it may raise to stop the run, e.g. optuna.TrialPruned).

        The run folder is claimed first (runfolder.py): locked for this run, and refused when it holds
        another run unless training.resume_from_checkpoint or training.overwrite_output_dir says what to
        do with it. The first process claims it for all (a launcher ends the others if it refuses).
        """
        tcfg = self.config.training
        if self.config.data.streaming and tcfg.objective == "sft" and tcfg.max_steps <= 0:
            raise ConfigError("data.streaming: a stream has no known length, so epochs cannot be counted; set "
                              "training.max_steps (optimizer steps to train for).")
        run_dir = Path(tcfg.output_dir)
        if not is_first_process():
            run_dir.mkdir(parents=True, exist_ok=True)
            return self._train(run_dir, on_eval)
        with claim(run_dir, resume=bool(tcfg.resume_from_checkpoint), overwrite=tcfg.overwrite_output_dir,
                   log=self.log):
            check_resume_config(self.config, run_dir, self.log)  # before config.yaml is rewritten
            return self._train(run_dir, on_eval)

    def _train(self, run_dir: Path, on_eval: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
        cfg, tcfg = self.config, self.config.training
        self.setup()
        if self.accelerator.is_main_process:
            self._write_run_record(run_dir)
        # CUDA graphs replay a captured shape: rows padded to a multiple of 128 give a few shapes that
        # recur (packing gives exactly one); otherwise a multiple of 8 suits the tensor cores.
        multiple = (128 if self.fast_path.graphs is not None else 8) if self.accelerator.device.type == "cuda" else None
        collate = self._collator(multiple)
        streamed = hasattr(self.data.train, "micro_batches")  # data.streaming: a stream, no length (stream.py)
        stream = None if streamed else self._micro_batch_stream()
        accum = tcfg.gradient_accumulation_steps
        total_steps = tcfg.max_steps if tcfg.max_steps > 0 else max(
            1, math.ceil(tcfg.num_train_epochs * stream.per_epoch / accum))
        run = self._start_run(run_dir, total_steps)
        state = run.state
        # Workers (dataloader_num_workers > 0) start here, before the signal handlers they must not inherit.
        batches = self._streamed_batches(collate, state) if streamed else \
            self._train_batches(stream, collate, start=state.micro_batch)
        feed = self._feed(batches, accum)
        self._signal = None
        self._install_signal_handlers()
        run.progress.start(state.step)
        # One device decides a non-finite step alone, so the host need not wait for the step's loss.
        self._lagged = (self.accelerator.num_processes == 1 and tcfg.objective == "sft" and run.scaler is None
                        and drops_steps_on_device(run.optimizer))
        last_eval: dict[str, float] | None = None
        stopped_early = False
        run.model.train()
        if self.fast_path.graphs is not None and state.step < total_steps and tcfg.objective == "sft":
            first = feed.peek()
            n_first = torch.tensor(first.labelled, device=self.accelerator.device)
            prime_graphs(run.model, self.fast_path.graphs,
                         [partial(self._micro_step_loss, run.model, b, n_first)
                          for b in [first.batches[0], *feed.other_shapes(first)]], log=self.log)
        run.t0 = time.perf_counter() - state.elapsed_seconds
        run.window = _LogWindow()  # after the capture: the first record's tokens/s is a step's, as elapsed_s is
        later = _Deferred()  # a step's report, made while the next step's backward runs on the GPU

        def while_backward_runs() -> None:  # the next step's inputs, then the last step's report
            if state.step + 1 < total_steps:
                feed.prefetch()
            later.run()

        try:
            while state.step < total_steps:
                inputs = feed.take()
                state.micro_batch += accum
                if inputs.position is not None:
                    state.stream_record, state.stream_row = inputs.position.record, inputs.position.row
                out = self._optimizer_step(run, inputs, while_backward_runs)
                later.run()  # a preference step does not call `ahead` (after an SFT step nothing is left)
                state.step += 1
                state.tokens_seen += out.seen
                run.window.seen += out.seen
                is_last = state.step == total_steps
                epoch = round(state.micro_batch / stream.per_epoch, 4) if stream else None
                account = partial(self._account, run, later, out, (state.step, epoch, time.perf_counter()), is_last)
                if getattr(out, "pending", None) is not None:
                    later.add(account)  # the loss is read during the next step's backward
                else:
                    account()
                    if not math.isfinite(out.nll):  # a dropped step is neither evaluated nor saved
                        self._stop_if_diverged(run, later)
                        self._stop_if_signalled(run, out.stop_requested)
                        continue
                self._stop_if_diverged(run, later)
                due_eval = bool(tcfg.eval_steps and state.step % tcfg.eval_steps == 0) or is_last
                if due_eval or (tcfg.save_steps and state.step % tcfg.save_steps == 0) or is_last \
                        or out.stop_requested or self._signal is not None:
                    later.run()  # every record up to a checkpoint is written before it

                improved = False
                if due_eval:
                    last_eval = self._evaluate_during_training(run.model, collate)
                    if last_eval:
                        improved = state.best_eval_loss is None or last_eval["eval_loss"] < state.best_eval_loss
                        if improved:
                            state.best_eval_loss, state.best_step = last_eval["eval_loss"], state.step
                            state.evals_without_improvement = 0
                        else:
                            state.evals_without_improvement += 1
                        self._emit(run, {"step": state.step, **last_eval})
                        if on_eval is not None:
                            on_eval(state.step, last_eval)
                    if tcfg.early_stopping_patience and state.evals_without_improvement >= tcfg.early_stopping_patience:
                        self.log(f"early stopping at step {state.step}: no improvement in "
                                 f"{state.evals_without_improvement} evaluations")
                        stopped_early = True

                # A new best is always checkpointed, so "keep the last K plus the best" has a best to keep.
                if (tcfg.save_steps and state.step % tcfg.save_steps == 0) or is_last or stopped_early or improved:
                    try:
                        self._save(run)
                    except ResourceError as e:
                        if is_last:
                            raise
                        self.log(f"warning: {e} Training continues.")
                self._stop_if_signalled(run, out.stop_requested)
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
            later.run()
            run.progress.stop()
            self._restore_signal_handlers()
            if run.trackers:
                run.trackers.close()
        return self._finish(run, run_dir, run.last_loss, last_eval, stopped_early)

    def _write_run_record(self, run_dir: Path) -> None:
        """config.yaml, environment.json and data_stats.json: what the run was, beside its results."""
        acc = self.accelerator
        # The record is what the run was, not what to do with the folder next time: overwriting is not
        # carried over (a later `loraforge train RUN/config.yaml` must not move this run aside unasked).
        record = replace(self.config, training=replace(self.config.training, overwrite_output_dir=False))
        record.save(run_dir / "config.yaml")
        (run_dir / "environment.json").write_text(
            json.dumps(environment_info(acc.device, acc.num_processes), indent=1))
        stats = {k: asdict(v) for k, v in self.data.stats.items()}
        (run_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))

    def _micro_batch_stream(self) -> MicroBatchStream:
        acc, tcfg, train_set = self.accelerator, self.config.training, self.data.train
        # A streamed (on-disk) training set knows its lengths; reading every example to get them would
        # defeat streaming.
        lengths = getattr(train_set, "lengths", None)
        return MicroBatchStream(list(lengths) if lengths is not None else [len(e["input_ids"]) for e in train_set],
                                tcfg.per_device_train_batch_size, seed=tcfg.seed, world_size=acc.num_processes,
                                rank=acc.process_index, group_by_length=self.config.data.group_by_length)

    def _loader(self, dataset: Any, collate: Any, **batching: Any) -> DataLoader:
        """A DataLoader over `dataset` collated by `collate`, in training.dataloader_num_workers processes."""
        # Its own generator: the loader draws a worker seed at every iteration, and from torch's global RNG
        # that draw would shift the dropout masks (and break exact resume, which restores that RNG).
        return DataLoader(dataset, collate_fn=collate, num_workers=self.config.training.dataloader_num_workers,
                          generator=torch.Generator(), worker_init_fn=_quiet_worker, **batching)

    def _feed(self, batches: Iterator[Any], accum: int) -> StepFeed:
        """The steps' inputs, loaded a step ahead: with the examples' offsets where attention takes them, and
        then unpacked SFT batches as one row of their real tokens (sampler.py)."""
        cfg, tcfg = self.config, self.config.training
        offsets = self.fast_path.report.get("packed_attention", "").startswith("on")
        flatten = offsets and tcfg.objective == "sft" and not cfg.data.packing
        most = tcfg.per_device_train_batch_size * cfg.data.max_length  # tokens a micro-batch can hold
        return StepFeed(batches, accum, self.accelerator.device, self.tokenizer.pad_token_id, boundaries=offsets,
                        padding_mask=self.accelerator.device.type != "cuda",
                        flatten_to=1 << (most - 1).bit_length() if flatten else None)

    def _collator(self, multiple: int | None) -> Any:
        """Pads SFT examples, or pairs into one batch of their chosen then rejected sides."""
        if self.config.training.objective == "sft":
            return PadCollator(self.tokenizer.pad_token_id, multiple)
        from loraforge.data.preference import PairCollator  # with the data layer, imported when a run starts

        return PairCollator(self.tokenizer.pad_token_id, multiple)

    def _train_batches(self, stream: MicroBatchStream, collate: Any, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """The collated micro-batches of `stream` from micro-batch `start` on, forever."""
        indices = (idx for _, idx in stream.batches(start=start))
        return iter(self._loader(self.data.train, collate, batch_sampler=indices))

    def _streamed_batches(self, collate: Any, state: ckpt.TrainerState) -> Iterator[Any]:
        """data.streaming: (micro-batch, stream position after it) from the position `state` holds, forever; the
        records are tokenized in training.dataloader_num_workers processes (data/stream.py)."""
        from loraforge.data.stream import StreamPosition, as_is  # with the data layer, imported when a run starts

        acc, train = self.accelerator, self.data.train
        return train.micro_batches(StreamPosition(state.stream_record, state.stream_row),
                                   self.config.training.per_device_train_batch_size, collate,
                                   load=lambda records: self._loader(records, as_is, batch_size=None),
                                   world_size=acc.num_processes, rank=acc.process_index)

    def _start_run(self, run_dir: Path, total_steps: int) -> _Run:
        """Optimizer and schedule, prepared for the strategy; the state resumed if asked; the logs opened."""
        cfg, tcfg, acc = self.config, self.config.training, self.accelerator
        model = self.model
        if is_fsdp(acc):  # FSDP shards the model; the optimizer must see its params
            model = acc.prepare(model)
        optimizer = build_optimizer(model, tcfg, acc.device, cfg.lora, notice=self.log)
        scheduler = build_scheduler(optimizer, tcfg, total_steps)
        model, optimizer = (model, acc.prepare(optimizer)) if is_fsdp(acc) else acc.prepare(model, optimizer)
        scaler = getattr(acc, "scaler", None)

        ckpt_root = run_dir / "checkpoints"
        state, resume_from = self._resume(ckpt_root, acc.unwrap_model(model), optimizer.optimizer, scheduler, scaler)
        is_main = acc.is_main_process
        metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step if resume_from else None) \
            if is_main else None
        trackers = Trackers(tcfg.report_to, run_dir, tcfg.run_name or run_dir.name, cfg.to_dict()) if is_main else None
        return _Run(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state,
                    ckpt_root=ckpt_root, total_steps=total_steps, metrics=metrics, trackers=trackers,
                    progress=TrainProgress(total_steps, enabled=is_main))

    def _optimizer_step(self, run: _Run, inputs: StepInputs, ahead: Callable[[], None] | None) -> _StepOutcome:
        """One optimizer step over `inputs`, this process's micro-batches of the step; a step whose loss is not
        finite is dropped (no update) but still advances the schedule. `ahead` is the host's work that need
        not wait for the device (the next step's inputs, the last step's report): it runs while this step's
        backward does.

        The step's labelled tokens are counted first, summed over all processes, so every micro-batch's loss
        is its summed NLL over that one count: the mean over all labelled tokens of the step, not a mean of
        per-micro-batch means. The same all-reduce carries the tokens seen and "a signal arrived on some
        rank", so every rank stops after the same step (a rank that saved alone would deadlock). Alone, the
        process knows all three on the host and the step starts without waiting for the device.
        """
        acc, model, tcfg = self.accelerator, run.model, self.config.training
        micro = inputs.batches
        if tcfg.objective != "sft":  # DPO / ORPO: the same step over pairs, in train/preference.py
            return preference.optimizer_step(acc, run, micro, tcfg, self._signal is not None)
        if acc.num_processes == 1:
            labelled, seen, stop_requested = inputs.labelled, inputs.seen, self._signal is not None
            # A fill, not torch.tensor: copying a host value to the GPU waits for the stream to drain.
            n_tokens = torch.full((), labelled, dtype=torch.int64, device=acc.device)
        else:
            counts = sum_over_processes(acc, torch.tensor(
                [inputs.labelled, inputs.seen, int(self._signal is not None)], device=acc.device))
            n_tokens, seen, stop_requested = counts[0], int(counts[1]), bool(counts[2])
            labelled = int(n_tokens)
        scale = loss_scale(acc, tcfg.gradient_accumulation_steps)
        step_nll = torch.zeros((), device=acc.device)
        for k, batch in enumerate(micro):
            with gradient_sync(acc, model, sync=k == len(micro) - 1):
                loss = self._micro_step_loss(model, batch, n_tokens)
                step_nll += loss.detach().float() * n_tokens
                # A non-finite loss still goes through backward (as 0) so the ranks' gradient
                # all-reduces stay matched; the whole step is dropped below.
                acc.backward(torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * scale)
        # Lagged, the optimizer drops a non-finite step itself and the loss is read a step later.
        pending = _HostCopy(step_nll) if self._lagged else None
        if ahead is not None:
            ahead()
        outcome = _StepOutcome(nll=math.nan if pending else float(sum_over_processes(acc, step_nll)),
                               tokens=labelled, seen=seen, lr=run.scheduler.get_last_lr()[0], grad_norm=None,
                               stop_requested=stop_requested, pending=pending)
        out = finish_step(acc, run, model, tcfg.max_grad_norm, outcome, loss_on_device=step_nll if pending else None)
        if pending is not None and out.grad_norm is not None:
            # Queued now, not when the report is made during the next step's backward: a copy queued then
            # would wait for that whole backward (measured on an H200: no gain while it was queued there).
            out.grad_norm = _HostCopy(out.grad_norm)
        return out

    def _micro_step_loss(self, model: Any, batch: dict[str, torch.Tensor], n_tokens: torch.Tensor) -> torch.Tensor:
        """Summed NLL of the micro-batch's labelled tokens divided by the step's token count.

        transformers' causal-LM loss divides by `num_items_in_batch` when given, instead of by the
        micro-batch's own count; that is exactly the normalization gradient accumulation needs.
        """
        out = model(**batch, num_items_in_batch=n_tokens, use_cache=False)
        return out.loss

    def _account(self, run: _Run, later: _Deferred, out: _StepOutcome, when: tuple[int, float | None, float],
                 is_last: bool) -> None:
        """A finished step's loss into the log window and its report into `later`; a dropped step is counted.
        Runs at once, or (lagged) during the next step's backward, when its loss has reached the host.
        `when`: the step, its epoch and the perf_counter at which it finished (the window ends there)."""
        state, step = run.state, when[0]
        if not math.isfinite(_settled(out).nll):
            state.nonfinite_in_a_row += 1
            state.nonfinite_total += 1
            self.log(f"step {step}: non-finite loss, step skipped "
                     f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_total} in total)")
            return
        state.nonfinite_in_a_row = 0
        run.window.nll += out.nll
        run.window.tokens += out.tokens
        preference.add_to_window(run.window.extra, out)
        run.last_loss = out.nll / max(1, out.tokens)
        self._queue_report(run, later, out, when, is_last)

    def _stop_if_diverged(self, run: _Run, later: _Deferred) -> None:
        """After training.max_nonfinite_steps dropped steps in a row, save and stop. Lagged, the steps counted
        so far end one step back; the check comes a step later and the checkpoint holds the step after."""
        state = run.state
        if state.nonfinite_in_a_row < self.config.training.max_nonfinite_steps:
            return
        later.run()  # every step's accounting and record, up to this one
        path = self._save(run)
        raise TrainingError(
            f"{state.nonfinite_in_a_row} non-finite losses in a row at step {state.step}; stopped "
            f"(checkpoint {path}). Lower training.learning_rate, check the data, or use bf16 "
            "instead of fp16.")

    def _stop_if_signalled(self, run: _Run, requested: bool) -> None:
        """After a step: if SIGTERM/SIGINT arrived, save a checkpoint and raise Preempted.

        `requested` is the all-reduced flag of the step (every rank agrees on it); alone in the process,
        a signal that landed during the step counts too.
        """
        if requested or (self.accelerator.num_processes == 1 and self._signal is not None):
            # The step's regular checkpoint may just have been written (the signal landed during it).
            path = run.ckpt_root / f"step-{run.state.step}" if run.saved_step == run.state.step else self._save(run)
            raise Preempted(self._signal or signal.SIGTERM, path)

    def _queue_report(self, run: _Run, later: _Deferred, out: _StepOutcome, when: tuple[int, float | None, float],
                      is_last: bool) -> None:
        """Queue the step's progress-bar update and, on a logging step, its metrics record (they run while the
        next step's backward does); a logged step starts a new window."""
        step, _, done = when
        later.add(partial(run.progress.update, step, out.nll / max(1, out.tokens), out.lr))
        if step % self.config.training.logging_steps and not is_last:
            return
        later.add(partial(self._emit, run, self._step_record(run, run.window, out, when)))
        run.window = _LogWindow(t0=done)

    def _step_record(self, run: _Run, window: _LogWindow, out: _StepOutcome,
                     when: tuple[int, float | None, float]) -> dict[str, Any]:
        """The metrics record of a logged step, from its window. `grad_norm` stays on its way (a tensor, or a
        `_HostCopy` when lagged) until `_emit` writes the record."""
        step, epoch, done = when
        record = {"step": step, "epoch": epoch, "loss": window.nll / max(1, window.tokens),
                  "lr": out.lr, "grad_norm": out.grad_norm,
                  "tokens_per_s": window.seen / max(done - window.t0, 1e-9),
                  "elapsed_s": round(done - run.t0, 2),
                  **{k: v / max(1, window.tokens) for k, v in window.extra.items()}}
        if run.state.nonfinite_total:
            record["nonfinite_steps"] = run.state.nonfinite_total
        return record

    def _emit(self, run: _Run, record: dict[str, Any]) -> None:
        """A metrics record to metrics.jsonl, the trackers and the console (the main process writes)."""
        norm = record.get("grad_norm")
        if isinstance(norm, _HostCopy):
            record["grad_norm"] = norm.read()
        elif isinstance(norm, torch.Tensor):
            record["grad_norm"] = float(norm)
        if self.accelerator.is_main_process:
            run.metrics.write(record)
            run.trackers.log(record, record["step"])
            run.progress.log_line(record)

    def _finish(self, run: _Run, run_dir: Path, last_loss: float | None, last_eval: dict[str, float] | None,
                stopped_early: bool) -> TrainResult:
        """Write the adapter (with its tokenizer and run record) and the loss curve; sum the run up."""
        cfg, acc, state = self.config, self.accelerator, run.state
        train_seconds = time.perf_counter() - run.t0
        adapter_dir = run_dir / "adapter"
        try:
            self._save_adapter(run.model, adapter_dir)
            if acc.is_main_process:
                self.tokenizer.save_pretrained(adapter_dir)
                name_base(adapter_dir, cfg.model.model_name)
                (run_dir / "loraforge_run.json").write_text(json.dumps(
                    {"model_name": cfg.model.model_name, "data_kind": self.data.kind,
                     "template": cfg.data.template, "system_prompt": cfg.data.system_prompt,
                     "fast_path": self.fast_path.line}, indent=1))
        except Exception as e:  # a full disk: tokenizers and safetensors raise their own error types
            if not ckpt.is_write_failure(e):
                raise
            raise ResourceError(f"could not write the adapter to {adapter_dir} ({e}); the checkpoint "
                                f"{ckpt.latest_checkpoint(run.ckpt_root)} is complete. Free disk space and run the "
                                "same command with --resume to write the adapter.") from e
        if acc.is_main_process:
            self._plot(run_dir)
        acc.wait_for_everyone()
        best = run.ckpt_root / f"step-{state.best_step}" if state.best_step is not None else None
        return TrainResult(
            steps=state.step, train_loss=last_loss,
            eval_loss=last_eval["eval_loss"] if last_eval else None,
            eval_perplexity=last_eval["eval_perplexity"] if last_eval else None,
            train_seconds=train_seconds, tokens_per_s=state.tokens_seen / max(train_seconds, 1e-9),
            adapter_dir=adapter_dir, run_dir=run_dir, best_checkpoint=best if best and best.exists() else None,
            stopped_early=stopped_early, data_stats={k: asdict(v) for k, v in self.data.stats.items()})

    def _resume(self, ckpt_root: Path, model: Any, optimizer: Any, scheduler: Any,
                scaler: Any) -> tuple[ckpt.TrainerState, Path | None]:
        """The state to start from, restored into the live objects, and the checkpoint it came from.

        With "latest", the newest complete checkpoint whose files are as written: a damaged one is
        skipped with one line saying what is wrong with it. When every complete checkpoint is damaged the
        run stops (RunFolderError) rather than silently starting over; with none at all it starts afresh.
        """
        acc, choice = self.accelerator, self.config.training.resume_from_checkpoint
        if not choice:
            return ckpt.TrainerState(), None
        complete = ckpt.list_checkpoints(ckpt_root)
        if choice == "latest":
            candidates = complete[::-1]
            if not candidates:
                self.log(f"resume: no complete checkpoint in {ckpt_root}; starting from the beginning")
                return ckpt.TrainerState(), None
        elif ckpt.is_complete(Path(choice)):
            candidates = [Path(choice)]
        else:
            raise ConfigError(f"training.resume_from_checkpoint: {choice!r} is not a complete checkpoint "
                              f"(complete ones: {[p.name for p in complete] or 'none'}).")
        damaged: list[ckpt.DamagedCheckpoint] = []
        for path in candidates:
            try:
                state = ckpt.load_checkpoint(path, model, optimizer, scheduler, scaler, rank=acc.process_index,
                                             world_size=acc.num_processes)
            except ckpt.DamagedCheckpoint as e:
                damaged.append(e)
                self.log(f"resume: skipping {path}: damaged, {e.reason}")
                continue
            self.log(f"resumed from {path} at step {state.step}")
            return state, path
        if choice != "latest":
            raise RunFolderError(f"training.resume_from_checkpoint: {damaged[0]}. Choose another checkpoint "
                                 f"(complete ones: {[p.name for p in complete]}), or --resume for the newest "
                                 "intact one.")
        reasons = "; ".join(f"{e.path.name}: {e.reason}" for e in damaged)
        raise RunFolderError(f"no intact checkpoint to resume from in {ckpt_root} ({reasons}). Start afresh with "
                             "--overwrite (the damaged run is moved aside), or resume from a copy of a good "
                             "checkpoint with --resume-from.")

    def _save(self, run: _Run) -> Path:
        """Write a checkpoint (rank 0 writes; every rank must call this, at the same step)."""
        acc, state, root = self.accelerator, run.state, run.ckpt_root
        state.elapsed_seconds = time.perf_counter() - run.t0
        path = root / f"step-{state.step}"
        inner = unwrapped(run.optimizer)
        # Each rank's RNG (dropout differs per rank) and, when the optimizer state is sharded, each
        # rank's optimizer state go to rank 0, which writes the one checkpoint.
        rng = [ckpt.rng_state()]
        opt_state = [inner.state_dict()] if is_sharded(acc) else None
        adapter_state = acc.get_state_dict(run.model) if is_sharded(acc) else None
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
            opt_state = gather_object(opt_state) if opt_state is not None else None
        if acc.is_main_process:
            self._saving = True
            try:
                path = ckpt.save_checkpoint(root, state, acc.unwrap_model(run.model), inner, run.scheduler,
                                            run.scaler, rng_states=rng, optimizer_states=opt_state,
                                            adapter_state=adapter_state)
                ckpt.rotate(root, self.config.training.save_total_limit, state.best_step)
            finally:
                self._saving = False
        acc.wait_for_everyone()
        run.saved_step = state.step
        return path

    def _save_adapter(self, model: Any, adapter_dir: Path) -> None:
        acc = self.accelerator
        state_dict = acc.get_state_dict(model) if is_sharded(acc) else None  # collective under FSDP/ZeRO-3
        if acc.is_main_process:
            acc.unwrap_model(model).save_pretrained(adapter_dir, safe_serialization=True, state_dict=state_dict)

    def _evaluate_during_training(self, model: Any, collate: Any) -> dict[str, float]:
        from loraforge.eval.perplexity import PerplexityEvaluator

        if not self.data.validation:
            return {}
        if self.config.training.objective != "sft":  # held-out pairs: loss, reward accuracy, win rates
            pairs = self._loader(self.data.validation, self._collator(None),
                                 batch_size=self.config.eval.eval_batch_size)
            return preference.evaluate(model, pairs, self.config.training)
        loader = self._loader(self.data.validation, collate, batch_size=self.config.eval.eval_batch_size)
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

        self._signals = 0

        # The second signal waits too: schedulers and impatient hands often signal twice, and stopping
        # in the middle of the checkpoint write would lose the step the first signal asked to save.
        def handler(signum: int, frame: Any) -> None:
            self._signals += 1
            name = signal.Signals(signum).name
            if self._signals == 1:
                self._signal = signum
                self._say(f"{name} received: finishing this step, then saving a checkpoint")
            elif self._signals == 2:
                doing = "the checkpoint being written" if self._saving else "this step, then saving a checkpoint"
                self._say(f"{name} received again: waiting for {doing} (a third signal stops at once, without "
                          "it; the earlier checkpoints stay intact)")
            else:
                raise KeyboardInterrupt

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a server); signals stay as they are
                pass

    def _say(self, message: str) -> None:
        """Log from a signal handler. The signal may land inside a print to the same stream, which Python's
        buffered writer refuses ("reentrant call"); then the message goes straight to stderr's descriptor."""
        try:
            self.log(message)
        except RuntimeError:
            os.write(2, message.encode() + b"\n")

    def _restore_signal_handlers(self) -> None:
        for sig, h in self._previous_handlers.items():
            signal.signal(sig, h)

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, test_prompts: list[Any] | None = None,
                 test_references: list[str] | None = None) -> dict[str, Any]:
        """Validation perplexity, and BLEU/ROUGE/exact match of generated answers when prompts are given
        (defaults: the held-out pairs of the validation split)."""
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
