"""The report says how the run trained: the fast-path line of its loraforge_run.json, shown as text."""

import json

from loraforge.eval.compare import _fast_path_line
from loraforge.eval.report import write_report


def test_the_run_folders_fast_path_line_is_read_as_text(tmp_path):
    (tmp_path / "loraforge_run.json").write_text(json.dumps(
        {"data_kind": "chat", "fast_path": "fast path: off for this run because X — set Y"}))
    assert _fast_path_line(tmp_path) == "fast path: off for this run because X — set Y"
    for hostile in ('{"fast_path": ["<script>"]}', "not json", '"a string"', '{"fast_path": "' + "x" * 5000 + '"}'):
        (tmp_path / "loraforge_run.json").write_text(hostile)
        assert len(_fast_path_line(tmp_path)) <= 300 and "<script>" not in _fast_path_line(tmp_path)
    assert _fast_path_line(tmp_path / "absent") == ""


def test_the_report_shows_the_fast_path(tmp_path):
    results = {"base": {"perplexity": 30.0}, "finetuned": {"perplexity": 20.0},
               "meta": {"model": "m", "fast_path": "fast path: on (fused LoRA, <b>x</b>)"}}
    write_report(tmp_path, results)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "Fast path" in md and "fast path: on (fused LoRA" in md
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
