"""Helpers of the reliability suite: run `loraforge train` as a real process, kill it, read what it left.

Every loop here is bounded in count and in time; every process started is waited for or killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinymodels import chat_records, write_jsonl

HERE = Path(__file__).parent
# Runs the real CLI (`loraforge.cli.main`) after optionally slowing checkpoint writes (faultcli.py), so a
# kill can land inside one on purpose instead of by luck.
FAULT_CLI = [sys.executable, str(HERE / "faultcli.py")]
VOLATILE = ("elapsed_s", "tokens_per_s")  # metrics fields that depend on the wall clock


@dataclass
class TrainRecipe:
    """A small but real run: tiny random Llama, chat data, LoRA dropout on, checkpoints every 2 steps."""

    model_dir: Path
    data: Path
    cache: Path
    max_steps: int = 12
    save_steps: int = 2
    extra: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, root: Path, model_dir: Path, **kw: Any) -> TrainRecipe:
        data = write_jsonl(root / "chat.jsonl", chat_records(24))
        return cls(model_dir=model_dir, data=data, cache=root / "cache", **kw)

    def args(self, run_dir: Path) -> list[str]:
        # model.device=cpu: the resume checks need bit-reproducible runs, which a GPU does not give.
        return ["train", f"model.model_name={self.model_dir}", "model.use_4bit=false", "model.device=cpu",
                f"data.dataset={self.data}", "data.max_length=64", "data.validation_split=0",
                "lora.lora_dropout=0.1", "lora.r=4", "training.per_device_train_batch_size=2",
                "training.gradient_accumulation_steps=2", "training.learning_rate=5e-3",
                "training.logging_steps=1", f"training.max_steps={self.max_steps}",
                f"training.save_steps={self.save_steps}", "training.save_total_limit=2",
                "eval.num_generation_samples=0", f"training.output_dir={run_dir}", *self.extra]

    def env(self, save_delay: float = 0.0) -> dict[str, str]:
        # One thread: a run must be bit-reproducible across processes, and the machine is shared.
        return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "LORAFORGE_CACHE": str(self.cache), "NO_COLOR": "1", "COLUMNS": "200",
                "LORAFORGE_TEST_SAVE_DELAY": str(save_delay)}

    def start(self, run_dir: Path, log: Path, *, resume: bool = False, save_delay: float = 0.0,
              flags: tuple[str, ...] = ()) -> subprocess.Popen:
        cmd = [*FAULT_CLI, *self.args(run_dir), *(["--resume"] if resume else []), *flags]
        with log.open("w") as f:
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env(save_delay),
                                    start_new_session=True)

    def run(self, run_dir: Path, log: Path, *, resume: bool = False, timeout: float = 300,
            flags: tuple[str, ...] = ()) -> int:
        proc = self.start(run_dir, log, resume=resume, flags=flags)
        try:
            return proc.wait(timeout=timeout)
        finally:
            kill(proc)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill the process (only this one, by its pid) if it still runs, and reap it."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.002) -> bool:
    """Poll `predicate` until true (True), the process exits or `timeout` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(interval)
    return False


def logged_steps(log: Path) -> list[int]:
    return [int(m) for m in re.findall(r"^step=(\d+) ", log.read_text(errors="replace"), re.M)]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """What loraforge itself accepts as complete: `step-N` folders holding the COMPLETE marker."""
    from loraforge.train.checkpoint import list_checkpoints

    return list_checkpoints(run_dir / "checkpoints")


def torn_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(root.glob(".tmp-step-*")) if root.is_dir() else []


def resume_line(log: Path) -> str | None:
    """The trainer's own account of where it resumed: 'resumed from PATH at step N' or 'no complete ...'."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("resumed from ") or line.startswith("resume: no complete checkpoint"):
            return line
    return None


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def adapter_tensors(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-6) -> float:
    """Same tensor names and shapes, values within `atol`; returns the largest difference."""
    assert sorted(a) == sorted(b)
    worst = 0.0
    for name in a:
        assert a[name].shape == b[name].shape, name
        worst = max(worst, float((a[name].float() - b[name].float()).abs().max()))
    assert worst <= atol, f"adapters differ by {worst:g} (> {atol:g})"
    return worst


def assert_same_metrics(a: list[dict[str, Any]], b: list[dict[str, Any]], rtol: float = 1e-5) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b], "the logged steps differ"
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys(), (ra, rb)
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                assert abs(va - vb) <= rtol * max(1.0, abs(vb)), (k, ra, rb)
            else:
                assert va == vb, (k, ra, rb)


def verify_checkpoint(path: Path) -> None:
    """Independently of loraforge's COMPLETE marker: every file of the checkpoint loads in full."""
    import torch
    from safetensors.torch import load_file

    assert ".tmp" not in path.name, path
    load_file(str(path / "adapter" / "adapter_model.safetensors"))
    json.loads((path / "adapter" / "adapter_config.json").read_text())
    json.loads((path / "trainer_state.json").read_text())
    for f in sorted(path.glob("*.pt")):
        torch.load(f, weights_only=True)
    assert (path / "optimizer.pt").is_file() and (path / "scheduler.pt").is_file(), path
