"""`loraforge launch`: the `accelerate launch` command line for the common multi-GPU / multi-node cases."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from loraforge.config import shipped_config
from loraforge.errors import ConfigError

ACCELERATE_CONFIGS = shipped_config("accelerate")
STRATEGY_FILES = {"ddp": "ddp-1node.yaml", "fsdp": "fsdp-qlora.yaml", "deepspeed_zero3": "deepspeed-zero3.yaml"}


def launch_command(config: Path | None, overrides: list[str], *, processes: int, nodes: int = 1, node_rank: int = 0,
                   main_address: str | None = None, main_port: int = 29500, strategy: str = "ddp",
                   cpu: bool = False) -> list[str]:
    """Build `accelerate launch ... -m loraforge.cli train CONFIG OVERRIDES` (processes = per node)."""
    if nodes > 1 and not main_address:
        raise ConfigError("--nodes > 1 needs --main-address (the address of node 0, reachable from every node).")
    if processes < 1:
        raise ConfigError("--processes must be at least 1.")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes * nodes),
           "--num_machines", str(nodes), "--machine_rank", str(node_rank)]
    if cpu:
        cmd += ["--cpu"]
    elif strategy in ("fsdp", "deepspeed_zero3") and (ACCELERATE_CONFIGS / STRATEGY_FILES[strategy]).is_file():
        cmd += ["--config_file", str(ACCELERATE_CONFIGS / STRATEGY_FILES[strategy])]
    elif processes * nodes > 1:
        cmd += ["--multi_gpu"]
    if nodes > 1:
        cmd += ["--main_process_ip", main_address, "--main_process_port", str(main_port), "--rdzv_backend", "c10d"]
    train = ["-m", "loraforge.cli", "train", *([str(config)] if config else []), *overrides]
    if strategy != "ddp":
        train.append(f"training.distributed_strategy={strategy}")
    return cmd + train


def show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)
