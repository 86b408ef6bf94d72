"""Run folders: one run per folder, checkpoints verified before use, a second SIGTERM waits for the save.

- A folder holding an earlier run is refused (exit 2) unless `--resume` continues it or `--overwrite`
  moves it aside; the resumed run is the right one (its adapter equals an uninterrupted run's).
- A second `loraforge train` into a folder a run is training into is refused, naming the first's PID.
- A damaged latest checkpoint (each file truncated, emptied, overwritten with random bytes or removed;
  bad JSON) is skipped with one line naming what is wrong, and the run resumes exactly from the newest
  intact one. With no intact checkpoint left: exit 2, no traceback.
- SIGTERM twice inside a checkpoint write: the write finishes (exit 143, complete checkpoint); three
  times: exit 130 at once, the earlier checkpoints intact. Either way `--resume` ends where an
  uninterrupted run ends.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
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

from loraforge.config import load_config
from loraforge.errors import LoraforgeError, RunFolderError
from loraforge.train import checkpoint as ckpt
from loraforge.train.runfolder import FolderLock
from loraforge.train.trainer import LLAMATrainer

START_TIMEOUT = 240  # seconds for a process to reach a step (imports are slow on a busy shared machine)


def _step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _newest_step(run_dir: Path) -> int:
    return _step(complete_checkpoints(run_dir)[-1])


# long: four CLI runs in subprocesses (~70 s); test_runfolder.py covers the same rules in-process in make test
@pytest.mark.long
def test_a_folder_holding_a_run_is_refused_overwritten_or_resumed(tmp_path: Path, tiny_model_dir: Path):
    recipe = TrainRecipe.make(tmp_path, tiny_model_dir, max_steps=8)
    earlier = TrainRecipe.make(tmp_path, tiny_model_dir, max_steps=10, extra=["training.seed=5"])
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    reference = recipe.start(ref_dir, tmp_path / "ref.log")  # uninterrupted, beside the rest
    try:
        # An earlier run (another seed, further along) fills the folder.
        assert earlier.run(run_dir, tmp_path / "earlier.log") == 0, (tmp_path / "earlier.log").read_text()[-3000:]
        earlier_rows = metrics(run_dir)
        before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))

        # A new run without --resume or --overwrite: refused, naming the folder and the ways on; nothing touched.
        rc = recipe.run(run_dir, tmp_path / "refused.log")
        text = (tmp_path / "refused.log").read_text()
        assert rc == 2 and "Traceback" not in text, text[-3000:]
        assert f"{run_dir} holds another run" in text and "--resume" in text and "--overwrite" in text, text
        assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before
        assert metrics(run_dir) == earlier_rows

        # --overwrite: the earlier run moves aside whole; the new run starts in an empty folder. Stopped
        # by SIGTERM after step 3, so its newest checkpoint (step 4) is older than the earlier run's (10).
        log = tmp_path / "overwrite.log"
        proc = recipe.start(run_dir, log, flags=("--overwrite",))
        try:
            assert wait_for(lambda: 3 in logged_steps(log), START_TIMEOUT, proc, interval=0.01), log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
        finally:
            kill(proc)
        aside = list(tmp_path.glob("run.old-*"))
        assert len(aside) == 1 and f"moved the earlier run in {run_dir} to {aside[0]}" in log.read_text()
        assert metrics(aside[0]) == earlier_rows
        assert [p.name for p in complete_checkpoints(aside[0])] == ["step-8", "step-10"]
        stopped = _newest_step(run_dir)  # the step in progress when the signal came: 3 or 4
        assert stopped in (3, 4) and all(_step(p) <= 4 for p in complete_checkpoints(run_dir))

        # --resume continues this run, not the earlier one, and ends where the uninterrupted run ends.
        assert recipe.run(run_dir, tmp_path / "resume.log", resume=True) == 0
        newest = run_dir / "checkpoints" / f"step-{stopped}"
        assert resume_line(tmp_path / "resume.log") == f"resumed from {newest} at step {stopped}"
        assert reference.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        kill(reference)
    assert_same_adapter(adapter_tensors(run_dir), adapter_tensors(ref_dir))
    assert_same_metrics(metrics(run_dir), metrics(ref_dir))


# long: two concurrent trainer subprocesses (~30 s); the lock itself is unit-tested in test_runfolder.py
@pytest.mark.long
def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(recipe: TrainRecipe, tmp_path: Path):
    run_dir = tmp_path / "run"
    long_run = TrainRecipe(recipe.model_dir, recipe.data, recipe.cache, max_steps=400, save_steps=100)
    first = long_run.start(run_dir, tmp_path / "first.log")
    try:
        assert wait_for(lambda: 1 in logged_steps(tmp_path / "first.log"), START_TIMEOUT, first, interval=0.05)
        # --resume, so the only reason to refuse is the folder being in use.
        rc = recipe.run(run_dir, tmp_path / "second.log", resume=True)
        text = (tmp_path / "second.log").read_text()
        assert rc == 2 and "Traceback" not in text, text[-3000:]
        assert f"{run_dir} is in use" in text and f"pid {first.pid} " in text, text
        assert first.poll() is None, "the first run must go on undisturbed"
    finally:
        kill(first)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one run's lines only
    FolderLock(run_dir).release()  # a killed holder leaves its lock file, but not its lock


# ------------------------------------------------------------------------------ damaged checkpoints

FILES = ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.pt", "scheduler.pt",
         "rng-rank0.pt", "trainer_state.json"]


def _damage(f: Path, kind: str) -> None:
    data = f.read_bytes()
    if kind == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif kind == "zero-byte":
        f.write_bytes(b"")
    elif kind == "random":
        f.write_bytes(random.Random(len(data)).randbytes(len(data)))
    elif kind == "bad-json":
        f.write_text('{"step": 6,')
    elif kind == "wrong-json":
        f.write_text('{"step": "six"}')
    else:
        assert kind == "missing"
        f.unlink()


CASES = [(name, kind) for name in FILES for kind in ("truncated", "zero-byte", "random", "missing")]
CASES += [("trainer_state.json", "bad-json"), ("adapter/adapter_config.json", "bad-json"),
          ("manifest.json", "bad-json"), ("manifest.json", "random")]
# Checkpoints written before loraforge recorded manifests: damage is found when the files are read.
OLD_CASES = [("adapter/adapter_model.safetensors", "truncated"), ("optimizer.pt", "zero-byte"),
             ("optimizer.pt", "missing"), ("scheduler.pt", "random"), ("rng-rank0.pt", "truncated"),
             ("trainer_state.json", "bad-json"), ("trainer_state.json", "wrong-json")]


def _trainer(recipe: TrainRecipe, run_dir: Path, logs: list[str], *overrides: str) -> LLAMATrainer:
    cfg = load_config(None, [*recipe.args(run_dir)[1:], "training.max_steps=6", "training.save_total_limit=3",
                             *overrides])
    return LLAMATrainer.from_config(cfg, log=logs.append)


@pytest.fixture(scope="module")
def finished(recipe: TrainRecipe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of 6 steps with checkpoints at steps 2, 4 and 6."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAFORGE_CACHE", str(recipe.cache))
        run_dir = tmp_path_factory.mktemp("finished") / "run"
        _trainer(recipe, run_dir, []).train()
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2", "step-4", "step-6"]
    return run_dir


def _damaged_copy(finished: Path, tmp_path: Path, name: str, kind: str, *, old: bool = False) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "adapter")  # written again by the resumed run: compared below
    if old:
        for p in complete_checkpoints(run_dir):
            (p / ckpt.MANIFEST).unlink()
    _damage(run_dir / "checkpoints" / "step-6" / name, kind)
    return run_dir


# Each case trains and resumes a run (~6 s on 2 cores): `make test` takes one damage of each kind and of
# each file class; `make test-long` takes all of them.
DEFAULT = {("adapter/adapter_model.safetensors", "truncated", False), ("optimizer.pt", "zero-byte", False),
           ("rng-rank0.pt", "random", False), ("scheduler.pt", "missing", False),
           ("trainer_state.json", "bad-json", False), ("manifest.json", "random", False),
           ("optimizer.pt", "missing", True)}


def _damage_cases() -> list:
    cases = [(*c, False) for c in CASES] + [(*c, True) for c in OLD_CASES]
    return [pytest.param(*c, id=("old-" if c[2] else "") + f"{c[0]}-{c[1]}",
                         marks=() if c in DEFAULT else pytest.mark.long) for c in cases]


@pytest.mark.parametrize(("name", "kind", "old"), _damage_cases())
def test_a_damaged_checkpoint_is_skipped_and_the_run_resumes_exactly_from_the_previous(
        recipe: TrainRecipe, finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, kind: str,
        old: bool):
    monkeypatch.setenv("LORAFORGE_CACHE", str(recipe.cache))
    run_dir = _damaged_copy(finished, tmp_path, name, kind, old=old)
    logs: list[str] = []
    _trainer(recipe, run_dir, logs, "training.resume_from_checkpoint=latest").train()
    damaged, intact = run_dir / "checkpoints" / "step-6", run_dir / "checkpoints" / "step-4"
    skipped = [ln for ln in logs if ln.startswith("resume: skipping")]
    assert len(skipped) == 1 and skipped[0].startswith(f"resume: skipping {damaged}: damaged, {name}"), logs
    if kind == "missing":
        assert f"{name} is missing" in skipped[0], skipped
    assert f"resumed from {intact} at step 4" in logs, logs
    assert_same_adapter(adapter_tensors(run_dir), adapter_tensors(finished))
    assert_same_metrics(metrics(run_dir), metrics(finished))
    verify_checkpoint(damaged)  # step 6 written again, whole
    assert ckpt.damage(damaged) is None


def test_checkpoints_without_a_manifest_still_load(recipe: TrainRecipe, finished: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(recipe.cache))
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    shutil.rmtree(run_dir / "adapter")
    for p in complete_checkpoints(run_dir):
        (p / ckpt.MANIFEST).unlink()
    (run_dir / "checkpoints" / "step-6").rename(run_dir / "checkpoints" / "gone")
    logs: list[str] = []
    _trainer(recipe, run_dir, logs, "training.resume_from_checkpoint=latest").train()
    assert f"resumed from {run_dir / 'checkpoints' / 'step-4'} at step 4" in logs and not any(
        "skipping" in ln for ln in logs), logs
    assert_same_adapter(adapter_tensors(run_dir), adapter_tensors(finished))


def test_a_named_damaged_checkpoint_is_a_clear_error(recipe: TrainRecipe, finished: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(recipe.cache))
    run_dir = _damaged_copy(finished, tmp_path, "optimizer.pt", "zero-byte")
    step6 = run_dir / "checkpoints" / "step-6"
    with pytest.raises(RunFolderError) as info:
        _trainer(recipe, run_dir, [], f"training.resume_from_checkpoint={step6}").train()
    assert f"checkpoint {step6} is damaged: optimizer.pt has 0 bytes" in str(info.value), info.value
    FolderLock(run_dir).release()  # the error released the folder


def test_no_intact_checkpoint_exits_2_naming_each(recipe: TrainRecipe, finished: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    ckpts = run_dir / "checkpoints"
    _damage(ckpts / "step-2" / "trainer_state.json", "bad-json")
    _damage(ckpts / "step-4" / "adapter" / "adapter_model.safetensors", "truncated")
    _damage(ckpts / "step-6" / "optimizer.pt", "missing")
    log = tmp_path / "resume.log"
    rc = recipe.run(run_dir, log, resume=True)
    text = log.read_text()
    assert rc == 2 and "Traceback" not in text, text[-3000:]
    for step, what in ((6, "optimizer.pt is missing"), (4, "adapter/adapter_model.safetensors has "),
                       (2, "trainer_state.json has ")):
        assert f"resume: skipping {ckpts / f'step-{step}'}: damaged, {what}" in text, text
    error = re.search(r"error: (.*)", text, re.S).group(1)
    assert "no intact checkpoint" in error and "--overwrite" in error, error
    assert len(complete_checkpoints(run_dir)) == 3  # nothing deleted


# ------------------------------------------------------------------------------ signals during a save

SAVE_DELAY = 1.0  # seconds each slowed torch.save pauses half-way; a checkpoint makes three of them


def _signals_inside_the_save(recipe: TrainRecipe, run_dir: Path, log: Path, step: int, count: int, *,
                             resume: bool) -> tuple[int, str]:
    """Start a run; once it writes the checkpoint of `step`, send it SIGTERM `count` times, 0.2 s apart."""
    t0 = time.time()
    proc = recipe.start(run_dir, log, resume=resume, save_delay=SAVE_DELAY)
    tmp = run_dir / "checkpoints" / f".tmp-step-{step}"
    try:
        writing = wait_for(lambda: step in logged_steps(log) and any(
            f.stat().st_mtime >= t0 for f in (tmp.glob("*.pt") if tmp.is_dir() else [])), START_TIMEOUT, proc)
        assert writing and proc.poll() is None, log.read_text()[-3000:]
        for _ in range(count):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        assert tmp.is_dir(), "the signals were meant to land inside the checkpoint write"
        return proc.wait(timeout=120), log.read_text()
    finally:
        kill(proc)


@pytest.mark.long  # ~42 s on 2 cores (a real process, a slowed save): in `make test-long`
def test_a_second_sigterm_during_the_save_waits_for_it_a_third_stops_at_once(recipe: TrainRecipe,
                                                                             tmp_path: Path):
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    reference = recipe.start(ref_dir, tmp_path / "ref.log")
    try:
        # Three signals inside the step-4 write: out at once (130), the torn write ignored, step 2 intact.
        rc, text = _signals_inside_the_save(recipe, run_dir, tmp_path / "three.log", 4, 3, resume=False)
        assert rc == 130 and "Traceback" not in text, text[-3000:]
        assert "SIGTERM received again: waiting for the checkpoint being written" in text, text[-3000:]
        assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2"] and torn_checkpoints(run_dir)
        verify_checkpoint(complete_checkpoints(run_dir)[-1])

        # Two signals inside the step-6 write of the resumed run: the write finishes, exit 143.
        rc, text = _signals_inside_the_save(recipe, run_dir, tmp_path / "two.log", 6, 2, resume=True)
        assert rc == 143 and "Traceback" not in text, text[-3000:]
        assert "SIGTERM received again: waiting for the checkpoint being written" in text, text[-3000:]
        saved = re.search(r"checkpoint saved at (\S+)\. Continue with --resume", text)
        assert saved and Path(saved.group(1)) == run_dir / "checkpoints" / "step-6", text[-3000:]
        assert complete_checkpoints(run_dir)[-1].name == "step-6" and not torn_checkpoints(run_dir)
        verify_checkpoint(complete_checkpoints(run_dir)[-1])
        assert ckpt.damage(complete_checkpoints(run_dir)[-1]) is None

        assert recipe.run(run_dir, tmp_path / "final.log", resume=True) == 0
        assert resume_line(tmp_path / "final.log") == f"resumed from {run_dir / 'checkpoints' / 'step-6'} at step 6"
        assert reference.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        kill(reference)
    assert_same_adapter(adapter_tensors(run_dir), adapter_tensors(ref_dir))
    assert_same_metrics(metrics(run_dir), metrics(ref_dir))


def test_the_lock_is_released_when_training_fails(recipe: TrainRecipe, tmp_path: Path):
    run_dir = tmp_path / "run"
    bad = load_config(None, [*recipe.args(run_dir)[1:], f"data.dataset={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(LoraforgeError):
        LLAMATrainer.from_config(bad, log=lambda m: None).train()
    FolderLock(run_dir).release()
