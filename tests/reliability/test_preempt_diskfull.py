"""Preemption and a full disk.

SIGTERM: the run finishes its step, writes a checkpoint, and exits 143 within about one step plus one
save (plus slack for this shared machine); the checkpoint is complete and `--resume` continues exactly.
Disk full: a checkpoint write that fails (ENOSPC, reported as OSError by Python, as RuntimeError by
torch.save and as SafetensorError by safetensors) removes its partial folder, leaves the previous
checkpoint intact and says so; mid-run the run goes on, at the last step it stops with a ResourceError.
The long variant fills a real tmpfs instead of simulating the error.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from relharness import (
    TrainRecipe,
    adapter_tensors,
    assert_same_adapter,
    assert_same_metrics,
    complete_checkpoints,
    kill,
    logged_steps,
    metrics,
    torn_checkpoints,
    verify_checkpoint,
    wait_for,
)

from loraforge.config import load_config
from loraforge.errors import LoraforgeError, ResourceError
from loraforge.train import checkpoint as ckpt
from loraforge.train.trainer import LLAMATrainer

SLACK = 10.0  # seconds: process scheduling on a machine shared by six engineers


def step_seconds(run_dir: Path) -> float:
    """The slowest logged step of the run (from its own elapsed_s column)."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    times = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    return max(b - a for a, b in zip(times, times[1:], strict=False)) if len(times) > 1 else 1.0


def sigterm_at(recipe: TrainRecipe, run_dir: Path, log: Path, step: int, *, resume: bool = False,
               save_delay: float = 0.0, during_save: bool = False) -> tuple[int, float, str]:
    """Start a run, send SIGTERM after `step` is logged (or inside the next checkpoint write); return
    (exit code, seconds from the signal to the exit, log text)."""
    t0 = time.time()
    proc = recipe.start(run_dir, log, resume=resume, save_delay=save_delay)
    try:
        if during_save:
            tmp = run_dir / "checkpoints" / f".tmp-step-{step}"
            hit = wait_for(lambda: step in logged_steps(log) and any(
                f.stat().st_mtime >= t0 for f in (tmp.glob("*.pt") if tmp.is_dir() else [])), 240, proc)
        else:
            hit = wait_for(lambda: step in logged_steps(log), 240, proc, interval=0.01)
        assert hit and proc.poll() is None, log.read_text()[-3000:]
        t_sig = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        return rc, time.monotonic() - t_sig, log.read_text()
    finally:
        kill(proc)


def test_sigterm_saves_a_complete_checkpoint_and_exits_143_in_bounded_time(recipe: TrainRecipe, tmp_path: Path):
    run_dir = tmp_path / "run"
    rc, seconds, text = sigterm_at(recipe, run_dir, tmp_path / "term.log", step=3)
    assert rc == 143, text[-3000:]
    assert "SIGTERM received" in text and "Traceback" not in text
    saved = re.search(r"checkpoint saved at (\S+)\. Continue with --resume", text)
    assert saved, text[-2000:]
    path = Path(saved.group(1))
    newest = complete_checkpoints(run_dir)[-1]
    assert path == newest and not torn_checkpoints(run_dir)
    verify_checkpoint(path)
    stopped = int(path.name.split("-")[1])
    assert stopped in (3, 4), "the run must stop right after the step in progress"
    assert max(logged_steps(tmp_path / "term.log")) == stopped
    bound = step_seconds(run_dir) + SLACK
    print(f"SIGTERM → exit 143 in {seconds:.2f} s (bound {bound:.1f} s), checkpoint {path.name}")
    assert seconds < bound


def _trainer(recipe: TrainRecipe, run_dir: Path, logs: list[str], *overrides: str) -> LLAMATrainer:
    cfg = load_config(None, [*recipe.args(run_dir)[1:], *overrides])
    return LLAMATrainer.from_config(cfg, log=logs.append)


def _enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", path)


# How each library reports a full disk (seen on tmpfs with torch 2.13 and safetensors 0.7): Python's own
# writes raise OSError; torch.save raises a RuntimeError from its zip writer; safetensors a SafetensorError.
def _torch_full(path: str) -> Exception:
    return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _safetensors_full(path: str) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("error", [_enospc, _torch_full, _safetensors_full], ids=["oserror", "torch", "safetensors"])
def test_disk_full_during_checkpoint_keeps_previous_and_says_so(recipe: TrainRecipe, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, error):
    monkeypatch.setenv("LORAFORGE_CACHE", str(recipe.cache))
    torch.set_num_threads(1)
    import peft.peft_model

    failing: set[str] = set()
    real_save, real_st = torch.save, peft.peft_model.safe_save_file

    def full(path: object) -> bool:
        return any(f"/.tmp-step-{s}/" in str(path) for s in failing)

    def save(obj, f, *a, **k):
        if full(f) and error is not _safetensors_full:
            raise error(str(f))
        return real_save(obj, f, *a, **k)

    def save_file(tensors, filename, *a, **k):
        if full(filename) and error is _safetensors_full:
            raise error(str(filename))
        return real_st(tensors, filename, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)  # peft's own binding of it

    if error is _enospc:
        # Mid-run: the step-4 checkpoint cannot be written; training goes on and step 6 is saved.
        run_dir, logs = tmp_path / "mid", []
        failing.add("4")
        _trainer(recipe, run_dir, logs, "training.max_steps=6").train()
        warning = next((ln for ln in logs if "could not write checkpoint" in ln), None)
        assert warning is not None, logs
        assert f"{run_dir / 'checkpoints' / 'step-4'}" in warning and "step-2 is intact" in warning
        assert "Training continues" in warning
        assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2", "step-6"]
        assert not torn_checkpoints(run_dir)
        failing.clear()

    # At the last step: the run stops with a ResourceError that names the intact checkpoint.
    run_dir, logs = tmp_path / "last", []
    failing.add("4")
    with pytest.raises(ResourceError) as info:
        _trainer(recipe, run_dir, logs, "training.max_steps=4").train()
    msg = str(info.value)
    assert f"{run_dir / 'checkpoints' / 'step-2'} is intact" in msg and "--resume" in msg, msg
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2"]
    assert not torn_checkpoints(run_dir)
    verify_checkpoint(complete_checkpoints(run_dir)[-1])


@pytest.fixture
def tmpfs(tmp_path: Path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.long
@pytest.mark.parametrize("free_kib", [4, 16, 64, 160])
def test_real_full_tmpfs_keeps_previous_checkpoint_and_resume_finishes(recipe: TrainRecipe, tmp_path: Path,
                                                                       tmpfs: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       free_kib: int):
    """A 4 MiB tmpfs filled right after the first checkpoint, to a few KiB free: the next checkpoint writes
    really fail, at different files depending on the space left (adapter, optimizer, RNG state)."""
    monkeypatch.setenv("LORAFORGE_CACHE", str(recipe.cache))
    torch.set_num_threads(1)
    run_dir, logs = tmpfs / "run", []
    filler = tmpfs / "filler"
    real_rotate = ckpt.rotate

    def rotate_then_fill(root, keep_last, best_step):
        real_rotate(root, keep_last, best_step)
        if not filler.exists():
            free = shutil.disk_usage(tmpfs).free
            with filler.open("wb") as f:
                f.write(b"\0" * max(0, free - free_kib * 1024))

    monkeypatch.setattr(ckpt, "rotate", rotate_then_fill)
    with pytest.raises(LoraforgeError) as info:
        _trainer(recipe, run_dir, logs, "training.max_steps=6").train()
    msg = str(info.value)
    print("disk full:", msg)
    assert isinstance(info.value, ResourceError)
    newest = complete_checkpoints(run_dir)[-1]  # step-2, or step-6 when only the final adapter did not fit
    assert re.search(rf"{re.escape(str(newest))} is (intact|complete)", msg), msg
    verify_checkpoint(newest)
    assert not torn_checkpoints(run_dir)

    # Space freed: --resume continues from step-2 and finishes like an uninterrupted run.
    filler.unlink()
    monkeypatch.setattr(ckpt, "rotate", real_rotate)
    logs.clear()
    _trainer(recipe, run_dir, logs, "training.max_steps=6", "training.resume_from_checkpoint=latest").train()
    assert f"resumed from {newest} at step {newest.name.split('-')[1]}" in logs, logs
    ref_dir = tmp_path / "ref"
    _trainer(recipe, ref_dir, [], "training.max_steps=6").train()
    assert_same_adapter(adapter_tensors(run_dir), adapter_tensors(ref_dir))
    assert_same_metrics(metrics(run_dir), metrics(ref_dir))


@pytest.mark.long
def test_sigterm_inside_a_checkpoint_write_then_resume_is_exact(recipe: TrainRecipe, tmp_path: Path):
    """SIGTERM while a checkpoint is being written (slowed on purpose), twice, then --resume to the end."""
    run_dir = tmp_path / "run"
    rc, seconds, text = sigterm_at(recipe, run_dir, tmp_path / "t1.log", step=4, save_delay=0.3, during_save=True)
    assert rc == 143 and "Traceback" not in text, text[-3000:]
    rc, seconds2, text = sigterm_at(recipe, run_dir, tmp_path / "t2.log", step=8, resume=True, save_delay=0.3,
                                    during_save=True)
    assert rc == 143 and "Traceback" not in text, text[-3000:]
    assert not torn_checkpoints(run_dir)
    for ck in complete_checkpoints(run_dir):
        verify_checkpoint(ck)
    assert recipe.run(run_dir, tmp_path / "final.log", resume=True) == 0
    ref = tmp_path / "ref"
    assert recipe.run(ref, tmp_path / "ref.log") == 0
    print(f"SIGTERM inside a checkpoint write → exit 143 in {seconds:.2f} s and {seconds2:.2f} s")
    assert_same_adapter(adapter_tensors(run_dir), adapter_tensors(ref))
    assert_same_metrics(metrics(run_dir), metrics(ref))
