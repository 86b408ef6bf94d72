"""Checkpoints that survive a crash, and the state for an exact resume.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `checkpoints/step-N/` only when
complete (rename is atomic on POSIX), with a `COMPLETE` marker written last inside it. A crash mid-save
leaves only a `.tmp-*` folder, which is never loaded and is cleaned up on the next save. Just before the
marker, `manifest.json` records every file's size and sha256, so a checkpoint damaged after it was written
(a truncated copy, a zeroed file, a hand edit) is recognized before it is loaded. Each checkpoint
holds the adapter, optimizer, scheduler, grad scaler, every library's RNG state (one file per process:
dropout masks differ between processes) and the trainer state (step and data position). Tensors are
saved with torch.save and loaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraforge.errors import ConfigError, ResourceError, RunFolderError

MARKER = "COMPLETE"
MANIFEST = "manifest.json"


class DamagedCheckpoint(RunFolderError):
    """A checkpoint whose files are not those that were written (or cannot be read)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    micro_batch: int = 0  # next micro-batch index of the data stream (see sampler.py)
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    elapsed_seconds: float = 0.0
    # data.streaming: where the next micro-batch starts in the stream (data/stream.py's StreamPosition)
    stream_record: int = 0
    stream_row: int = 0


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(root: Path, state: TrainerState, model: Any, optimizer: Any, scheduler: Any,
                    scaler: Any | None = None, extra_files: dict[str, str] | None = None, *,
                    rng_states: list[dict[str, Any]] | None = None,
                    optimizer_states: list[dict[str, Any]] | None = None,
                    adapter_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `root/step-N` atomically and return its path.

    `rng_states` holds one RNG state per process (default: this process's); `optimizer_states` one
    optimizer state per process when the state is sharded (FSDP/ZeRO), else `optimizer` is saved;
    `adapter_state` a full state dict gathered from a sharded model.

    On failure (disk full, I/O error) the partial folder is removed, earlier checkpoints are untouched,
    and a ResourceError says so.
    """
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{state.step}"
    tmp = root / f".tmp-step-{state.step}"
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / "adapter", safe_serialization=True, state_dict=adapter_state)
        if optimizer_states is not None:
            for rank, opt_state in enumerate(optimizer_states):
                torch.save(opt_state, tmp / f"optimizer-rank{rank}.pt")
        else:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        for rank, rng in enumerate(rng_states or [rng_state()]):
            torch.save(rng, tmp / f"rng-rank{rank}.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        files: dict[str, dict[str, Any]] = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
                files[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        _write_synced(tmp / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))
        _write_synced(tmp / MARKER, "ok\n")
        if final.exists():  # a previous run stopped at the same step; the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(e):
            raise
        previous = latest_checkpoint(root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise ResourceError(f"could not write checkpoint {final} ({getattr(e, 'strerror', None) or e}); {kept}. "
                            "Free disk space and resume with --resume.") from e
    return final


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path, size: int | None = None) -> str:
    """sha256 of the file's first `size` bytes (all of it by default), read in 8 MiB blocks."""
    h = hashlib.sha256()
    left = math.inf if size is None else size
    with path.open("rb") as f:
        while left > 0 and (block := f.read(min(left, 1 << 23))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path` by its manifest (None: every file is as written).

    A checkpoint without a manifest (written before loraforge recorded one) is trusted as before: by its
    marker, with unreadable files reported when loading. The manifest may come from someone else's folder,
    so its names are only read inside the checkpoint, as plain files, no more bytes than recorded.
    """
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        entries = [(str(name), int(info["bytes"]), str(info["sha256"])) for name, info in files.items()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} cannot be read ({type(e).__name__}: {e})"
    inside = path.resolve()
    for name, size, digest in entries:
        f = path / name
        try:
            outside = not f.resolve().is_relative_to(inside)
        except (OSError, RuntimeError):  # a symlink loop
            outside = True
        if outside:
            return f"{MANIFEST} names {name!r}, not a file of the checkpoint"
        if not f.is_file():
            return f"{name} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{name} has {actual:,} bytes, {size:,} were written"
        if _sha256(f, size) != digest:
            return f"{name} has changed since it was written (sha256 differs)"
    return None


def is_write_failure(e: BaseException) -> bool:
    """A failed file write, however the library reports it. On a full disk Python raises OSError, but
    torch.save raises RuntimeError from its zip writer ("[enforce fail at inline_container.cc] unexpected
    pos", torch 2.13), and safetensors/tokenizers raise their own errors ending in "(os error 28)"."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return ("(os error " in text or "No space left" in text
            or (isinstance(e, RuntimeError) and any(s in text for s in ("inline_container", "PytorchStreamWriter",
                                                                          "file write failed"))))


def is_complete(path: Path) -> bool:
    """The write finished (the marker is there). Whether the files are still as written is for `damage`
    and the loader to say: a marked checkpoint that lost a file is reported as damaged, not passed over."""
    return (path / MARKER).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Torn or temporary folders are ignored."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith("step-") and p.name[5:].isdigit() and is_complete(p):
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def rotate(root: Path, keep_last: int, best_step: int | None) -> None:
    """Delete all but the last `keep_last` complete checkpoints, never the best one."""
    found = list_checkpoints(root)
    for p in found[:-keep_last] if keep_last else found:
        if best_step is not None and p.name == f"step-{best_step}":
            continue
        # Marker first: a process killed half-way through rmtree leaves a folder that no longer looks
        # complete, so it can never be mistaken for a loadable checkpoint.
        (p / MARKER).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any | None = None, *,
                    rank: int = 0, world_size: int = 1) -> TrainerState:
    """Restore everything saved by save_checkpoint into live objects; returns the trainer state.

    Every file is read before anything is restored, so a damaged checkpoint (DamagedCheckpoint, naming
    the file) leaves the live objects untouched and the caller can fall back to an earlier one. Process
    `rank` takes its own RNG state (and its own optimizer shard when the state was sharded). A run resumed
    with a different number of processes keeps the adapter, optimizer (unsharded), schedule and data
    position, but its dropout masks differ from the uninterrupted run's.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    problem = damage(path)
    if problem:
        raise DamagedCheckpoint(path, problem)
    if (path / "optimizer.pt").is_file():
        opt_file = path / "optimizer.pt"
    else:
        saved_ranks = len(list(path.glob("optimizer-rank*.pt")))
        if saved_ranks == 0:
            raise DamagedCheckpoint(path, "optimizer.pt is missing")
        if saved_ranks != world_size:
            raise ConfigError(f"{path} holds optimizer state sharded over {saved_ranks} processes; resume it "
                              f"with {saved_ranks} processes, not {world_size}.")
        opt_file = path / f"optimizer-rank{rank}.pt"
    rng_file = path / f"rng-rank{rank}.pt"
    device = str(next(model.parameters()).device)
    weights = _read(path, "adapter/adapter_model.safetensors", lambda f: load_file(str(f), device=device))
    opt_state = _read(path, opt_file.name, lambda f: torch.load(f, weights_only=True, map_location="cpu"))
    sched_state = _read(path, "scheduler.pt", lambda f: torch.load(f, weights_only=True))
    scaler_state = _read(path, "scaler.pt", lambda f: torch.load(f, weights_only=True)) \
        if scaler is not None and (path / "scaler.pt").is_file() else None
    rng = _read(path, rng_file.name if rng_file.is_file() else "rng-rank0.pt", _rng_file)
    state = _read(path, "trainer_state.json", _trainer_state)
    try:
        set_peft_model_state_dict(model, weights)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(sched_state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"{path} does not fit this run's model and optimizer ({type(e).__name__}: "
                          f"{str(e)[:300]}); resume with the settings it was trained with (its run folder's "
                          "config.yaml).") from e
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    set_rng_state(rng)
    return state


def _read(path: Path, name: str, reader: Any) -> Any:
    """`reader(path / name)`, any failure to read it reported as a DamagedCheckpoint naming the file."""
    f = path / name
    if not f.is_file():
        raise DamagedCheckpoint(path, f"{name} is missing")
    try:
        return reader(f)
    except Exception as e:  # noqa: BLE001 - torch, safetensors and json each raise their own types
        raise DamagedCheckpoint(path, f"{name} cannot be read ({type(e).__name__}: {str(e)[:200]})") from e


def _rng_file(f: Path) -> dict[str, Any]:
    rng = torch.load(f, weights_only=True)
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= rng.keys():
        raise ValueError("not an RNG state")
    return rng


def _trainer_state(f: Path) -> TrainerState:
    """trainer_state.json, every field of the type TrainerState declares."""
    raw = json.loads(f.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    types = {"int": int, "float": float, "float | None": float, "int | None": int}
    for fd in fields(TrainerState):
        value = raw.get(fd.name, fd.default)
        want = types[str(fd.type)]
        ok = (value is None and "None" in str(fd.type)) or (
            isinstance(value, (int, float) if want is float else int) and not isinstance(value, bool))
        if not ok or (want is int and value is not None and value < 0):
            raise ValueError(f"{fd.name} = {value!r} is not {'a count' if want is int else fd.type}")
    unknown = set(raw) - {fd.name for fd in fields(TrainerState)}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    return TrainerState(**raw)
