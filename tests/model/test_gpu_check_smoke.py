"""bench/model_gpu_check.py runs end to end on the CPU with tiny shapes (the GPU run is the real check)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.long
def test_model_gpu_check_tiny_cpu(tmp_path: Path) -> None:
    script = runpy.run_path(str(ROOT / "bench" / "model_gpu_check.py"))
    assert script["main"](["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("memory-*-cpu.json")
    cases = json.loads(result.read_text())
    assert [c["case"] for c in cases][:2] == ["tiny-r16-all-4x64", "tiny-r8-qv-2x128"]
    assert all("estimate_gib" in c and "measured_gib" in c for c in cases), cases
    embedded = cases[-1]
    assert embedded["case"].startswith("smollm2-135m-qlora-trainer") and embedded["loss_falling"], embedded
