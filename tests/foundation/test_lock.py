"""requirements.lock (what `make` installs) against pyproject.toml (what users install from) and the
environment the suite runs in: the three must agree, or a green CI would not mean what it says."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, which the lock is made for
ROOT = Path(__file__).parents[2]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_declared_dependency_is_locked_inside_its_range() -> None:
    lock = _lock()
    for req in _declared():
        if req.marker and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in lock, f"pyproject.toml needs {req} but requirements.lock has no {name}: run `make lock`"
        assert req.specifier.contains(lock[name], prereleases=True), \
            f"requirements.lock pins {name}=={lock[name]}, outside pyproject.toml's {req}: run `make lock`"


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="not in a virtual environment: nothing was installed "
                    "from the lock")
def test_the_environment_is_exactly_the_lock() -> None:
    lock = _lock()
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}
    # torch's local label (+cpu) names the build, not the release.
    wrong = {name: str(installed.get(name)) for name, version in lock.items()
             if name not in installed or Version(installed[name].public) != version}
    assert not wrong, f"installed versions differ from requirements.lock ({len(wrong)}): {wrong}; run `make test` " \
                      "again to reinstall (the .venv stamp follows the lock)"
