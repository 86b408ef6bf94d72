"""The measured tables in README.md and docs/ are what scripts/doc_figures.py renders from bench/results."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "doc_figures.py"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("doc_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_docs_equal_the_scripts_output(figures, capsys: pytest.CaptureFixture) -> None:
    assert figures.main(["--check"]) == 0, capsys.readouterr().err


def test_a_changed_record_or_a_hand_edit_is_caught(figures) -> None:
    readme = figures.ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    edited = text.replace("| 3,157 |", "| 3,999 |", 1)  # a number typed over in the README
    assert edited != text
    assert figures.render(edited, readme, set()) == text  # rendering puts the record's number back
    distributed = figures.ROOT / "docs" / "distributed.md"
    text = distributed.read_text(encoding="utf-8")
    for typed, measured in (("| 8.73 |", "| 9.99 |"), ("| 153–168 ms |", "| ~160 ms |")):
        edited = text.replace(typed, measured, 1)
        assert edited != text
        assert figures.render(edited, distributed, set()) == text
    with pytest.raises(SystemExit, match="no renderer"):
        figures.render("<!-- figure: nope (x) -->\n| a |\n<!-- /figure -->", readme, set())
