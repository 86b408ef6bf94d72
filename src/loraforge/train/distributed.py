"""What the trainer does for Accelerate and for several processes: one home for the distributed fix-ups.

Alone in a process (the Python API, the sweep, a CPU run) every function here is a pass-through or
forgets an earlier run's state; under `torchrun`/`accelerate launch` they bind each process to its GPU,
configure FSDP/DeepSpeed for a LoRA model, and keep the ranks' collectives matched step by step.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from loraforge.config import ModelConfig, RunConfig, TrainingConfig


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def is_first_process() -> bool:
    """Whether this is the job's process 0 (also when alone), known before Accelerate is set up: launchers
    give each process its global RANK."""
    return int(os.environ.get("RANK", "0")) == 0


def bind_process_gpu(model_cfg: ModelConfig) -> None:
    """Under a launcher each process owns one GPU: make it the current device.

    pick_placement (and the model's device_map) use the current device, which is cuda:0 for every process
    unless set here. With model.device=cpu no GPU is used, and rank 1 on a 1-GPU machine has no cuda:1.
    """
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available() and model_cfg.device != "cpu":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    """training.mixed_precision for Accelerate: "auto" = bf16 where the GPU has it, else fp16; none on the CPU."""
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
        # parameter (the policy is set by fit_plugins_to_model, once the model exists); use_orig_params keeps
        # our weight-decay parameter groups; rank 0 loads the weights and broadcasts them
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


def forget_earlier_accelerator() -> None:
    """Alone in the process, reset Accelerate's process-wide state so another Accelerator(...) can be made.

    Accelerate keeps its state (device, mixed precision) in process-wide singletons: a second
    Accelerator(...) with another device or precision raises "AcceleratorState has already been
    initialized", so a Python-API user training twice in one process (fp32 then bf16, CPU then GPU, the
    sweep's trials) would fail. An earlier trainer's accelerator then reports this one's state. Under a
    launcher the state holds the process group and stays. _reset_state is Accelerate's own reset (its test
    utilities use it, 1.x); hasattr-guarded since it is private.
    """
    if launched() or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from accelerate import state as acc_state

    if hasattr(acc_state.AcceleratorState, "_reset_state"):
        acc_state.AcceleratorState._reset_state(reset_partial_state=True)
    elif hasattr(acc_state.PartialState, "_reset_state"):
        acc_state.PartialState._reset_state()
    if hasattr(acc_state, "GradientState") and hasattr(acc_state.GradientState, "_reset_state"):
        acc_state.GradientState._reset_state()


def build_accelerator(cfg: RunConfig, device: torch.device) -> Any:
    """The run's Accelerator: its precision, the CPU when the model is placed there, and the strategy's plugin."""
    # Imported when a run starts, so that importing the trainer (loraforge.LLAMATrainer) stays light.
    from accelerate import Accelerator

    forget_earlier_accelerator()
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.training.mixed_precision, device),
                       cpu=device.type == "cpu", **strategy_plugins(cfg))


def is_fsdp(acc: Any) -> bool:
    return acc.distributed_type.name == "FSDP"


def is_deepspeed(acc: Any) -> bool:
    return acc.distributed_type.name == "DEEPSPEED"


def is_sharded(acc: Any) -> bool:
    """FSDP or DeepSpeed: state dicts are collectives, and optimizer state lives in pieces on every rank."""
    return is_fsdp(acc) or is_deepspeed(acc)


def fit_plugins_to_model(acc: Any, model: Any, tcfg: TrainingConfig) -> None:
    """Settings the FSDP/DeepSpeed plugins can only take once the LoRA model exists."""
    if is_fsdp(acc):
        # peft's policy wraps each LoRA layer in its own unit (see strategy_plugins)
        from peft.utils.other import fsdp_auto_wrap_policy

        acc.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    elif is_deepspeed(acc):
        # We feed batches ourselves (no prepared DataLoader), so DeepSpeed cannot infer these.
        acc.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=tcfg.per_device_train_batch_size,
            gradient_accumulation_steps=tcfg.gradient_accumulation_steps)


def sum_over_processes(acc: Any, values: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) over the processes; one process returns `values` as they are."""
    return acc.reduce(values, reduction="sum") if acc.num_processes > 1 else values


def loss_scale(acc: Any, accumulation_steps: int) -> int:
    """Factor on the backward loss that undoes the strategies' own averaging.

    DDP/FSDP/ZeRO average gradients over processes; our loss is already divided by the global token count,
    so scale it back up. DeepSpeed also divides by its accumulation steps inside backward.
    """
    return acc.num_processes * (accumulation_steps if is_deepspeed(acc) else 1)


def gradient_sync(acc: Any, model: Any, sync: bool) -> AbstractContextManager:
    """Context for one micro-batch's forward and backward: gradients are all-reduced only when `sync`
    (the step's last micro-batch); the others accumulate locally under no_sync."""
    if is_deepspeed(acc):  # the engine steps inside backward at the boundary Accelerate reports
        acc.gradient_state._set_sync_gradients(sync)
    return nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(model)
