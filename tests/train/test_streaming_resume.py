"""data.streaming through the real loop: a run stopped mid-stream and resumed gives the uninterrupted run's
losses and adapter, also over a hub-layout dataset larger than the memory the process may map; a streaming
run without training.max_steps is refused (exit 2)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from trainhelpers import losses, make_records, run_config

from loraforge import cli
from loraforge.config import RunConfig
from loraforge.train.trainer import LLAMATrainer


def _streaming(cfg: RunConfig, **data) -> RunConfig:
    for k, v in {"streaming": True, "validation_split": 0.0, **data}.items():
        setattr(cfg.data, k, v)
    cfg.training.lr_scheduler_type = "constant"  # the cut session's shorter max_steps must not bend the schedule
    cfg.training.eval_steps = 0
    return cfg


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "adapter" / "adapter_model.safetensors")


def _same_run(full: Path, cut: Path, steps: int) -> None:
    want, got = losses(full), losses(cut)
    assert sorted(got) == list(range(1, steps + 1)) and sorted(want) == sorted(got)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), f"step {step}"
    a, b = _adapter(full), _adapter(cut)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


@pytest.mark.long  # ~20 s on 2 shared cores, three runs of the loop; the position logic: tests/data/test_streaming.py
def test_streaming_resume_matches_uninterrupted(tmp_path: Path, tiny_model_dir: Path, data_file: Path) -> None:
    """Packing on, text records cut into several blocks: the saved position includes a packing window's used rows.
    The resumed session runs with 2 workers, the others with none (the position does not depend on them)."""
    texts = tmp_path / "texts.jsonl"
    short = [" ".join(m["content"] for m in r["messages"]) for r in make_records(10)]
    long = [" ".join(["word"] * (20 + 30 * i)) for i in range(4)]  # over max_length=64: several blocks each
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in short + long))
    steps = 6

    def make(name: str, **training) -> RunConfig:
        return _streaming(run_config(tiny_model_dir, texts, tmp_path / name, **training), packing=True)

    full = make("full", max_steps=steps)
    LLAMATrainer.from_config(full, log=lambda m: None).train()
    LLAMATrainer.from_config(make("cut", max_steps=steps // 2), log=lambda m: None).train()
    state = json.loads((tmp_path / "cut" / "checkpoints" / f"step-{steps // 2}" / "trainer_state.json").read_text())
    assert state["stream_record"] > 0 or state["stream_row"] > 0  # mid-stream
    resumed = make("cut", max_steps=steps, resume_from_checkpoint="latest", dataloader_num_workers=2)
    LLAMATrainer.from_config(resumed, log=lambda m: None).train()
    _same_run(tmp_path / "full", tmp_path / "cut", steps)


def test_streaming_without_max_steps_is_refused(tmp_path: Path, tiny_model_dir: Path, data_file: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    cfg = _streaming(run_config(tiny_model_dir, data_file, tmp_path / "run", max_steps=-1))
    cfg.save(tmp_path / "run.yaml")
    monkeypatch.setattr(sys, "argv", ["loraforge", "train", str(tmp_path / "run.yaml")])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "data.streaming" in err and "training.max_steps" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# The child process: warm up on a small copy of the data (every code path of a streaming run mapped once),
# then cap its address space (RLIMIT_AS) at the peak so far (VmPeak) plus HEADROOM, and train: uninterrupted,
# then cut at half way, then resumed. RLIMIT_AS caps virtual memory, of which torch and the libraries map far
# more than they touch (~2.5 GB here), so the cap is laid over the measured peak rather than set to a fixed
# size. Capping at the current size instead (VmSize, ~300 MB below the peak) hung the run (a thread could not
# map its stack), and 32 or 128 MB over the peak now and then left too little for a later run. The room under
# the cap is then ~600 MB, less than the ~920 MB dataset: the child checks that reading it whole fails under
# the cap (after training: a failed read leaves pyarrow's pool holding address space), so the cap is known to
# mean something.
CHILD = """
import json, resource, sys
from loraforge.config import load_config
from loraforge.train.trainer import LLAMATrainer
warm, full, cut, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def train(path, *overrides):
    LLAMATrainer.from_config(load_config(path, list(overrides)), log=lambda m: None).train()
train(warm)
peak = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmPeak:"))
resource.setrlimit(resource.RLIMIT_AS, (peak + headroom, peak + headroom))
train(full)
train(cut, "training.max_steps=%d" % (int(sys.argv[5]) // 2))
train(cut, "training.resume_from_checkpoint=latest")
try:  # the check that the cap means something: the dataset, read whole, does not fit under it
    import pyarrow.parquet as pq
    held = pq.read_table(sys.argv[6]).num_rows
except MemoryError:  # pyarrow's ArrowMemoryError is one
    held = 0
print(json.dumps({"peak": peak, "limit": peak + headroom, "held": held}))
"""
HEADROOM = 256 << 20
ROW_FILLER = 96_000  # bytes of base64 per filler row (an unused column)


def _hub_dataset(folder: Path, shards: int, rows_per_shard: int, every: int) -> int:
    """A hub-layout folder (data/train-0000k-of-0000n.parquet). Row i is a training record when i % every == 0;
    the others carry a large random filler and an empty answer (invalid, skipped), so the stream must read
    through nearly all of the data to find K steps' records. Returns the size on disk."""
    (folder / "data").mkdir(parents=True)
    i = 0
    for k in range(shards):
        rows = []
        for _ in range(rows_per_shard):
            rec = make_records(i // every + 1)[-1]["messages"] if i % every == 0 else None
            rows.append({"instruction": rec[0]["content"] if rec else "filler", "input": "",
                         "output": rec[1]["content"] if rec else "",
                         "notes": base64.b64encode(os.urandom(ROW_FILLER * 3 // 4)).decode()})
            i += 1
        # small row groups: a reader holds one group (a few MB) at a time
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"train-{k:05d}-of-{shards:05d}.parquet",
                       row_group_size=16, compression="none")
    return sum(f.stat().st_size for f in (folder / "data").iterdir())


@pytest.mark.long  # ~90 s: writes ~920 MB of parquet and streams through it three times in one capped process
def test_streaming_resume_over_data_larger_than_the_memory_cap(tmp_path: Path, tiny_model_dir: Path) -> None:
    steps = 6
    big = tmp_path / "big"
    size = _hub_dataset(big, shards=12, rows_per_shard=800, every=800)  # 9,600 rows, 12 of them to train on
    small = tmp_path / "small"
    _hub_dataset(small, shards=2, rows_per_shard=40, every=5)
    assert size > 850 << 20, size
    paths = {}
    for name, data in (("warm", small), ("full", big), ("cut", big)):
        cfg = _streaming(run_config(tiny_model_dir, data, tmp_path / name, max_steps=steps, save_steps=0),
                         skip_invalid=True, max_length=48)
        cfg.training.gradient_accumulation_steps = 1
        cfg.save(tmp_path / f"{name}.yaml")
        paths[name] = str(tmp_path / f"{name}.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", CHILD, paths["warm"], paths["full"], paths["cut"], str(HEADROOM),
                           str(steps), str(big / "data")], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    caps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert caps["limit"] - caps["peak"] < size and caps["held"] == 0, caps  # the data cannot be held whole
    # the runs streamed through most of the data, and the cut session stopped mid-stream: a window starts right
    # after the previous one's record (the last, holding record 8,800 of 9,600, at 8,001)
    positions = {name: json.loads((tmp_path / name / "checkpoints" / f"step-{step}" / "trainer_state.json")
                                  .read_text())["stream_record"] for name, step in (("full", steps), ("cut", 3))}
    assert positions == {"full": 8001, "cut": 3201}, positions
    _same_run(tmp_path / "full", tmp_path / "cut", steps)
