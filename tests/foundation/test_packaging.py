"""What a plain (non-editable) `pip install` gets: the ready-made configs ship inside the package.

The repository keeps configs/ at the top, where users look; src/loraforge/configs/ is the copy that goes
into the wheel. The first test keeps the two equal; the second builds the wheel, installs it into a fresh
venv and runs the installed `loraforge` there, outside the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.yaml"))}


def test_shipped_configs_equal_the_repository_configs() -> None:
    top, shipped = _tree(REPO / "configs"), _tree(REPO / "src" / "loraforge" / "configs")
    assert top, "configs/ should hold ready-to-run files"
    assert sorted(top) == sorted(shipped), "configs/ and src/loraforge/configs/ list different files: copy them"
    changed = [name for name in top if top[name] != shipped[name]]
    assert not changed, f"edit both copies: configs/ and src/loraforge/configs/ differ in {changed}"


def test_ready_made_config_paths_resolve_outside_a_checkout(tmp_path: Path, monkeypatch) -> None:
    from loraforge.config import load_config, shipped_config

    monkeypatch.chdir(tmp_path)  # no configs/ here: the README's `configs/demo.yaml` is the shipped one
    assert load_config("configs/demo.yaml") == load_config(shipped_config("demo.yaml"))


# Long: building the wheel and a venv takes ~20-40 s on 2 cores.
@pytest.mark.long
def test_wheel_install_runs_demo_help_and_config(tmp_path: Path) -> None:
    src = tmp_path / "src-copy"  # built from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("loraforge-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from this environment's site-packages, appended after the venv's own: a plain
    # path in a .pth file, so this environment's editable loraforge (its own .pth) is not picked up.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"COLUMNS": "120", "NO_COLOR": "1"}
    away = tmp_path / "elsewhere"  # no configs/ and no src/ here
    away.mkdir()

    def run(*cmd: str) -> str:
        out = subprocess.run(list(cmd), capture_output=True, text=True, env=env, cwd=away, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    where = run(str(py), "-c", "import loraforge, loraforge.demo as d, loraforge.config as c; "
                               "print(loraforge.__file__); print(d.demo_config_path()); "
                               "c.load_config('configs/demo.yaml'); c.load_config(d.demo_config_path())")
    package_file, demo_yaml = where.split()
    assert Path(package_file).is_relative_to(site) and Path(demo_yaml).is_relative_to(site), where
    assert "--steps" in run(str(venv / "bin" / "loraforge"), "demo", "--help")
    assert "training.max_steps" in run(str(venv / "bin" / "loraforge"), "config")
