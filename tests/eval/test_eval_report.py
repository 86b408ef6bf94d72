from __future__ import annotations

import json
import re

import pytest

from loraforge.errors import DataError
from loraforge.eval import plot_loss_curve, write_report
from loraforge.eval.report import MetricRow, format_value, loss_series, read_metrics_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_from_a_real_tiny_run(tiny_run, tmp_path):
    paths = write_report(tmp_path / "report", tiny_run.results, tiny_run.metrics_jsonl, tiny_run.samples)
    assert set(paths) == {"markdown", "html", "json", "loss_curve"}
    assert all(p.is_file() for p in paths.values())
    assert paths["loss_curve"].read_bytes().startswith(PNG_MAGIC)

    page = paths["html"].read_text()
    # Self-contained: no external resource of any kind, the curve inline.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    assert "data:image/png;base64," in page
    # The numbers, formatted as in the table.
    base, tuned = tiny_run.results["base"], tiny_run.results["finetuned"]
    for metrics in (base, tuned):
        assert f"{metrics['perplexity']:,.2f}" in page
        assert f"{metrics['bleu']:.3f}" in page
        assert f"{metrics['rougeL']:.3f}" in page
    # The fine-tuned model is better on perplexity here, so that change is marked better.
    assert tuned["perplexity"] < base["perplexity"]
    assert re.search(r'class="num better">−[\d,.]+</td>', page)
    # Model output is escaped: the sample's HTML shows as text and does not become markup.
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &#x27;quotes&#x27;" in page
    assert "<b>bold</b>" not in page

    markdown = paths["markdown"].read_text()
    assert f"{tuned['perplexity']:,.2f}" in markdown and "![Training and eval loss by step](loss_curve.png)" in markdown
    assert "<b>bold</b>" not in markdown

    saved = json.loads(paths["json"].read_text())
    assert saved["finetuned"]["perplexity"] == pytest.approx(tuned["perplexity"])
    assert saved["change"]["perplexity"]["verdict"] == "better"
    assert saved["training"]["steps"] == 40
    assert saved["samples"][0]["reference"] == tiny_run.samples[0]["reference"]


def test_report_without_log_or_samples(tmp_path):
    results = {"base": {"perplexity": 12.0}, "finetuned": {"perplexity": float("inf")}}
    paths = write_report(tmp_path, results, None, [])
    assert "loss_curve" not in paths
    assert "∞" in paths["html"].read_text()
    assert json.loads(paths["json"].read_text())["finetuned"]["perplexity"] is None  # strict JSON, no Infinity


@pytest.mark.parametrize(("name", "base", "tuned", "verdict"), [
    ("perplexity", 10.0, 8.0, "better"),
    ("loss", 2.0, 2.5, "worse"),
    ("bleu", 0.2, 0.4, "better"),
    ("rougeL", 0.5, 0.4, "worse"),
    ("eval_loss", 1.0, 0.9, "better"),  # unknown names containing "loss" are lower-is-better
    ("tokens", 100.0, 120.0, "neutral"),
    ("bleu", 0.3, 0.3, "same"),
])
def test_change_direction(name, base, tuned, verdict):
    assert MetricRow(name, base, tuned).verdict == verdict


def test_change_text():
    row = MetricRow("perplexity", 20.0, 15.0)
    assert (row.delta_text(), row.relative_text()) == ("−5.00", "−25.0%")
    assert MetricRow("bleu", 0.0, 0.5).relative_text() == "—"  # no relative change from zero
    assert format_value("perplexity", 12345.678) == "12,345.68"


def test_log_reading_survives_a_crash_and_a_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.8}, {"step": 3, "loss": 2.4},
             # resumed from the step-2 checkpoint: step 3 is logged again and must replace the first value
             {"step": 3, "loss": 2.2}, {"step": 4, "loss": 2.0, "eval_loss": 2.1}]
    log.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 5, "lo')  # half-written last line
    records = read_metrics_log(log)
    assert loss_series(records, "loss") == ([1, 2, 3, 4], [3.0, 2.5, 2.2, 2.0])
    assert loss_series(records, "eval_loss") == ([2, 4], [2.8, 2.1])
    assert plot_loss_curve(log, tmp_path / "curve.png").read_bytes().startswith(PNG_MAGIC)


def test_log_with_a_broken_middle_line_names_the_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\nnot json\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(DataError, match="metrics.jsonl, line 2"):
        read_metrics_log(log)


def test_plot_returns_none_for_a_log_without_losses(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "lr": 0.0002}\n')
    assert plot_loss_curve(log, tmp_path / "curve.png") is None
    assert not (tmp_path / "curve.png").exists()


def test_intervals_are_shown_beside_the_means(tmp_path):
    results = {"base": {"bleu": 0.1, "n_replies": 64, "intervals": {"bleu": [0.05, 0.15]}},
               "finetuned": {"bleu": 0.3, "n_replies": 64, "intervals": {"bleu": [0.2, 0.4], "rouge1": "bad"}}}
    paths = write_report(tmp_path, results, None, [])
    for kind in ("markdown", "html"):
        text = paths[kind].read_text()
        assert "0.100 [0.050, 0.150]" in text and "0.300 [0.200, 0.400]" in text
        assert "95% bootstrap interval (1,000 resamples of the 64 held-out replies)" in text
    assert json.loads(paths["json"].read_text())["finetuned"]["intervals"]["bleu"] == [0.2, 0.4]


def test_what_the_task_is_comes_before_the_metrics_and_not_among_the_facts(tmp_path):
    about = "Each prompt asks for the one question of a <chat> message; the reference is that line."
    results = {"base": {"bleu": 0.1}, "finetuned": {"bleu": 0.6}, "meta": {"model": "m", "about": about}}
    paths = write_report(tmp_path, results, None, [])
    markdown = paths["markdown"].read_text()
    assert "## What this measures" in markdown and "**About:**" not in markdown
    assert markdown.index("&lt;chat&gt; message") < markdown.index("## Metrics")
    page = paths["html"].read_text()
    assert page.index("What this measures") < page.index("<h2>Metrics") and "&lt;chat&gt;" in page
    assert json.loads(paths["json"].read_text())["meta"]["about"] == about
