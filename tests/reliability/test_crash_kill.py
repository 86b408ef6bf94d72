"""Crash safety: `loraforge train` killed with SIGKILL at random points, again and again, then resumed.

Each kill lands either inside a checkpoint write (the write is slowed on purpose so the kill is certain to
hit it, leaving a half-written file in a `.tmp-step-*` folder) or at a random moment of a training step.
Every restart uses `--resume`. Proven: each restart resumes from the newest checkpoint that is complete
(checked independently of loraforge's marker, by loading every file), never from a torn one; the final
adapter and metrics.jsonl equal those of an uninterrupted run of the same recipe.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from relharness import (
    TrainRecipe,
    adapter_tensors,
    assert_same_adapter,
    assert_same_metrics,
    complete_checkpoints,
    kill,
    logged_steps,
    metrics,
    resume_line,
    torn_checkpoints,
    verify_checkpoint,
    wait_for,
)

SAVE_DELAY = 0.3  # seconds a slowed checkpoint file write pauses half-way (the window a "ckpt" kill aims at)
START_TIMEOUT = 240  # seconds for one process to reach the point of the kill (imports are slow on a busy box)


def step_of(path: Path | None) -> int:
    return int(path.name.split("-")[-1]) if path is not None else 0


def kill_once(recipe: TrainRecipe, run_dir: Path, log: Path, mode: str, rng: random.Random) -> dict:
    """Start a resumed run, kill it with SIGKILL in `mode` ("ckpt" or "step"); return what happened."""
    before = complete_checkpoints(run_dir)
    if before:
        verify_checkpoint(before[-1])  # checked now: the run may rotate it away before it is killed
    resumed = step_of(before[-1] if before else None)
    if resumed >= recipe.max_steps or (mode == "step" and resumed >= recipe.max_steps - 1):
        # An earlier ckpt kill can land just after the final checkpoint's rename (the write's last delay is
        # shorter than the random wait): no step is left to kill in, and the run has nothing to lose.
        return {"mode": mode, "resumed": resumed, "target": None, "torn": [], "newest_after": before[-1].name}
    t0 = time.time()
    proc = recipe.start(run_dir, log, resume=True, save_delay=SAVE_DELAY if mode == "ckpt" else 0.0)
    try:
        if mode == "ckpt":
            # The first checkpoint this process writes: a save step after the resumed one.
            target = resumed + recipe.save_steps - resumed % recipe.save_steps
            target = min(target, recipe.max_steps)
            tmp = run_dir / "checkpoints" / f".tmp-step-{target}"

            def writing() -> bool:  # a file of *this* process's write exists (not a stale torn folder)
                try:
                    files = list(tmp.glob("*.pt")) if tmp.is_dir() else []
                    return any(f.stat().st_mtime >= t0 for f in files)
                except FileNotFoundError:  # the folder was renamed between the listing and the stat
                    return False

            hit = wait_for(lambda: target in logged_steps(log) and writing(), START_TIMEOUT, proc)
            time.sleep(rng.uniform(0, SAVE_DELAY))
        else:
            target = rng.randint(resumed + 1, recipe.max_steps - 1)
            hit = wait_for(lambda: target in logged_steps(log), START_TIMEOUT, proc, interval=0.01)
            time.sleep(rng.uniform(0, 0.6))  # about one step of the tiny model on this machine
        assert hit and proc.poll() is None, (f"run ended before the {mode} kill at step {target}:\n"
                                             f"{log.read_text()[-3000:]}")
        kill(proc)
    finally:
        kill(proc)
    line = resume_line(log)
    assert line is not None, log.read_text()[-3000:]
    if before:
        assert line == f"resumed from {before[-1]} at step {resumed}", (line, before)
    else:
        assert line.startswith("resume: no complete checkpoint"), line
    assert ".tmp-step" not in line
    after = complete_checkpoints(run_dir)
    if after:
        verify_checkpoint(after[-1])  # what the next --resume will load really is complete, even right after a kill
    torn = torn_checkpoints(run_dir)
    if mode == "ckpt":
        assert torn, "the kill was meant to leave a torn checkpoint folder"
        assert after[-1:] == before[-1:], "a torn write must not become the newest checkpoint"
    return {"mode": mode, "resumed": resumed, "target": target, "torn": [p.name for p in torn],
            "newest_after": after[-1].name if after else None}


def crash_and_compare(recipe: TrainRecipe, root: Path, modes: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    baseline_dir, run_dir = root / "uninterrupted", root / "killed"
    # The uninterrupted run goes on beside the kill sequence (both single-threaded) to save wall time.
    baseline = recipe.start(baseline_dir, root / "uninterrupted.log")
    try:
        history = []
        for i, mode in enumerate(modes):
            history.append(kill_once(recipe, run_dir, root / f"kill-{i}.log", mode, rng))
            print(f"kill {i + 1}/{len(modes)}: {history[-1]}")
        final_log = root / "final.log"
        rc = recipe.run(run_dir, final_log, resume=True)
        assert rc == 0, final_log.read_text()[-3000:]
        newest = complete_checkpoints(run_dir)
        line = resume_line(final_log)
        assert line is not None and ".tmp" not in line, line
        assert baseline.wait(timeout=600) == 0, (root / "uninterrupted.log").read_text()[-3000:]
    finally:
        kill(baseline)
    worst = assert_same_adapter(adapter_tensors(run_dir), adapter_tensors(baseline_dir))
    assert_same_metrics(metrics(run_dir), metrics(baseline_dir))
    assert step_of(newest[-1]) == recipe.max_steps
    print(f"{len(modes)} SIGKILLs survived; final adapter max |diff| vs uninterrupted = {worst:g}")
    return history


# ~47 s on 2 cores: `make test` keeps the SIGTERM resume (tests/train/test_resume.py) and the damaged-
# checkpoint resumes; SIGKILL at three and ten random points runs in `make test-long`.
@pytest.mark.long
def test_sigkill_three_times_then_resume_matches_uninterrupted(recipe: TrainRecipe, tmp_path: Path):
    crash_and_compare(recipe, tmp_path, ["ckpt", "step", "ckpt"], seed=11)


@pytest.mark.long
def test_sigkill_ten_times_then_resume_matches_uninterrupted(tmp_path: Path, tiny_model_dir: Path):
    recipe = TrainRecipe.make(tmp_path, tiny_model_dir, max_steps=24)
    rng = random.Random(2024)
    modes = [rng.choice(["ckpt", "step"]) for _ in range(10)]
    history = crash_and_compare(recipe, tmp_path, modes, seed=7)
    assert len(history) == 10
