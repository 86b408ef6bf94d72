"""One run per output folder: a run claims its folder, and nothing else writes into it meanwhile.

A folder "holds a run" once training has produced something of its own there: a checkpoint (complete or
torn), an adapter, logged metrics or the run's facts (`loraforge_run.json`). A new run is refused such a
folder unless it continues that run (resume) or moves it aside first (overwrite, to `<dir>.old-<time>`):
mixing two runs' checkpoints lets rotation delete the new ones and a later resume continue the old one.
What a run writes before its first step (config.yaml, environment.json, data_stats.json, .lock) does not
count, so a run that failed on bad data can simply be started again.

While a run trains it holds an exclusive `flock` on `<dir>/.lock`, which names its PID and host. The
kernel drops the lock when the process ends however it ends (even SIGKILL), so a stale file never blocks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from loraforge.errors import RunFolderError

LOCK = ".lock"


def held_run(run_dir: Path) -> list[str]:
    """What in `run_dir` belongs to a run (empty: no run there yet)."""
    found = []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith(("step-", ".tmp-step-")) for p in ckpts.iterdir()):
        found.append("checkpoints/")
    adapter = run_dir / "adapter"
    if adapter.is_dir() and any(adapter.iterdir()):
        found.append("adapter/")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if (run_dir / "loraforge_run.json").exists():
        found.append("loraforge_run.json")
    return found


class FolderLock:
    """An exclusive flock on `<run_dir>/.lock`, held until `release()` (or the process ends)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.unsupported: str | None = None  # why the filesystem gave no lock, when it did not
        try:
            # No O_TRUNC: until the lock is ours, the file names the process that holds it.
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"cannot write in the run folder {run_dir} ({e.strerror}); choose a folder "
                                 "you can write to (--output-dir).") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise RunFolderError(f"{run_dir} is in use: {_holder(self.path)} is training into it. Wait for it "
                                 "to finish or stop it, or choose another folder (--output-dir).") from None
        except OSError as e:  # a filesystem without locks (some FUSE mounts): train, but say so
            self.unsupported = e.strerror or str(e)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n")

    def release(self) -> None:
        if self._fd is not None:
            if not self.unsupported:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)  # closing alone would keep the lock while forked data workers hold the fd
            self._fd = None


def _holder(lock: Path) -> str:
    """Who holds `lock`, from what it wrote into the file (it writes right after taking the lock)."""
    info = None
    for _ in range(20):  # the holder may be between taking the lock and writing its name: up to 1 s
        try:
            info = json.loads(lock.read_text(encoding="utf-8")[:4096])
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            break
        time.sleep(0.05)
    if not isinstance(info, dict):
        return "another process"
    pid, host, started = info.get("pid"), info.get("host"), info.get("started")
    return f"another loraforge run (pid {pid} on {host}, started {started})"


def move_aside(run_dir: Path) -> Path:
    """Rename `run_dir` to `<run_dir>.old-<time>` (a free name) and return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    try:
        os.rename(run_dir, aside)
    except OSError as e:
        raise RunFolderError(f"could not move the earlier run in {run_dir} aside to {aside} ({e.strerror}); "
                             "move or delete it yourself, or choose another folder (--output-dir).") from e
    return aside


@contextmanager
def claim(run_dir: Path, *, resume: bool, overwrite: bool, log: Callable[[str], None]) -> Iterator[None]:
    """Hold `run_dir` for one run: locked, and free of any other run, for the duration of the block.

    A folder holding a run is continued (`resume`), moved aside first (`overwrite`), or refused.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(run_dir)  # before looking inside: another process may be about to write there
    if lock.unsupported:
        log(f"warning: cannot lock {lock.path} ({lock.unsupported}); nothing stops a second run from "
            "writing into this folder at the same time")
    try:
        held = held_run(run_dir)
        if held and overwrite:
            aside = move_aside(run_dir)
            run_dir.mkdir(exist_ok=True)
            old, lock = lock, FolderLock(run_dir)
            old.release()
            log(f"moved the earlier run in {run_dir} to {aside}")
        elif held and not resume:
            raise RunFolderError(
                f"{run_dir} holds another run ({', '.join(held)}). Continue it with --resume "
                "(training.resume_from_checkpoint=latest), start afresh with --overwrite "
                f"(training.overwrite_output_dir=true; the earlier run is moved to {run_dir.name}.old-<time>), "
                "or choose another folder (--output-dir).")
        yield
    finally:
        lock.release()
