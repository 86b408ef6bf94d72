"""bench/train_e2e.py's reading of a run's metrics.jsonl: tokens/s over a window of steps, logged every step or
every few (a record covers the steps since the one before it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_train_e2e", BENCH / "train_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(every: int, seconds) -> tuple[dict, dict]:
    """40 steps of 2,048 tokens, step s taking seconds(s), logged every `every` steps."""
    el, t = {0: 0.0}, 0.0
    for s in range(1, 41):
        t += seconds(s)
        el[s] = t
    by = {s: {"tokens_per_s": 2048 * every / (el[s] - el[s - every]), "elapsed_s": el[s]}
          for s in range(every, 41, every)}
    return by, {0: 0.0, **{s: r["elapsed_s"] for s, r in by.items()}}


@pytest.mark.parametrize("every", [1, 10])
def test_window_rates_agree_however_often_the_run_logs(e2e, every):
    def seconds(s):  # slow first steps (capture, warm-up), then 0.2 s
        return 1.0 if s <= 2 else 0.2

    by, el = _records(every, seconds)
    steady, per_step = e2e._window(by, el, 10, 40)
    assert steady == pytest.approx(2048 / 0.2) and per_step == pytest.approx(2048)
    first10, _ = e2e._window(by, el, 0, 10)
    assert first10 == pytest.approx(2048 * 10 / (2 * 1.0 + 8 * 0.2))


@pytest.mark.parametrize("packing", [True, False])
def test_the_config_packs_only_when_asked(e2e, tmp_path, packing):
    import yaml

    path = e2e._config("model", "data.jsonl", tmp_path / "run", 0.05, 40, {"logging_steps": 10}, packing=packing)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["data"]["packing"] is packing and cfg["training"]["logging_steps"] == 10
