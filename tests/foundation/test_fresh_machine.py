"""What differs between machines and must not matter: the locale, a home folder that cannot be written.

Each test runs the real CLI in a subprocess with the environment of such a machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraforge.cli", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", env={**env, "COLUMNS": "120", "NO_COLOR": "1"},
                          timeout=300)


def _non_ascii_run(tmp_path: Path, model_dir: Path) -> tuple[Path, Path]:
    data = tmp_path / "données.jsonl"
    data.write_text(json.dumps({"instruction": "Übersetze: naïve café", "input": "", "output": "Café naïf, ça va ✓"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model: {{model_name: '{model_dir}'}}\ndata: {{dataset: '{data}', max_length: 64}}\n",
                   encoding="utf-8")
    return data, cfg


@pytest.mark.parametrize("locale", ["C", "POSIX"])
def test_non_ascii_configs_and_data_under_a_plain_locale(tmp_path: Path, embedded_model_dir: Path, locale: str):
    _, cfg = _non_ascii_run(tmp_path, embedded_model_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONUTF8", "PYTHONIOENC"))}
    out = run_cli("data", "preview", "--config", str(cfg), "-n", "1", env={**env, "LC_ALL": locale, "LANG": locale})
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "naïve café" in out.stdout and "ça va ✓" in out.stdout and "données.jsonl" in out.stdout


def test_a_home_folder_that_cannot_be_written(tmp_path: Path, embedded_model_dir: Path):
    _, cfg = _non_ascii_run(tmp_path, embedded_model_dir)
    home = tmp_path / "home-is-a-file"
    home.write_text("")  # nothing can be created under it, even by root
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "LORAFORGE_CACHE", "HF_HOME")}
    out = run_cli("data", "preview", "--config", str(cfg), "-n", "1", "--all",
                  env={**env, "HOME": str(home), "MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "every training record" in out.stdout
