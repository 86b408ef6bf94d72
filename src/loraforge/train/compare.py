"""`loraforge runs compare RUN...`: how runs differ (config settings, final metrics) and their loss curves.

Reads each run folder's config.yaml and metrics.jsonl (one JSON object per logged step: `step`, `loss`,
`eval_loss`, ...). The table lists only the settings that differ between the runs, then the final numbers;
the HTML page overlays the runs' training and validation loss curves as inline SVG, so it opens anywhere
with nothing beside it.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import ConfigError

# Settings that differ between any two runs without making them different experiments.
_IGNORED = {"training.output_dir", "training.resume_from_checkpoint", "training.overwrite_output_dir"}
COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"]


@dataclass
class RunSummary:
    name: str
    path: Path
    settings: dict[str, Any]  # section.key -> value, from config.yaml
    records: list[dict[str, Any]]  # metrics.jsonl, in order

    def curve(self, metric: str) -> list[tuple[float, float]]:
        return [(r["step"], r[metric]) for r in self.records
                if isinstance(r.get("step"), int | float) and isinstance(r.get(metric), int | float)
                and math.isfinite(r[metric])]

    def final(self) -> dict[str, Any]:
        loss, evals = self.curve("loss"), self.curve("eval_loss")
        steps = [r["step"] for r in self.records if isinstance(r.get("step"), int | float)]
        return {"steps": max(steps, default=None), "final loss": loss[-1][1] if loss else None,
                "final eval_loss": evals[-1][1] if evals else None,
                "best eval_loss": min((v for _, v in evals), default=None)}


def read_run(path: Path) -> RunSummary:
    """A run folder's settings and metrics; a missing or unreadable file is a ConfigError naming it."""
    path = Path(path)
    cfg_file, metrics_file = path / "config.yaml", path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise ConfigError(f"{path}: no metrics.jsonl, so not a run folder (or the run logged nothing yet).")
    settings: dict[str, Any] = {}
    if cfg_file.is_file():
        try:
            data = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{cfg_file}: cannot read it ({e}).") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{cfg_file}: expected a mapping of sections.")
        settings = _flatten(data)
    records = []
    for n, line in enumerate(metrics_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{metrics_file}, line {n}: not JSON ({e.msg}).") from None
        if isinstance(record, dict):
            records.append(record)
    return RunSummary(path.name, path, settings, records)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differences(runs: list[RunSummary]) -> dict[str, list[Any]]:
    """section.key -> each run's value, for the settings that are not the same in every run."""
    keys = dict.fromkeys(k for r in runs for k in r.settings)
    rows = {k: [r.settings.get(k, "-") for r in runs] for k in keys if k not in _IGNORED}
    return {k: v for k, v in rows.items() if any(x != v[0] for x in v)}


def compare_runs(paths: list[Path], html_out: Path | None) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """Read the runs, print the table, write the HTML page; returns (differing settings, final metrics)."""
    if len(paths) < 2:
        raise ConfigError("runs compare needs at least two run folders.")
    runs = [read_run(p) for p in paths]
    names = _unique_names(runs)
    diffs = differences(runs)
    finals = {k: [r.final()[k] for r in runs] for k in runs[0].final()}
    _print_table(names, diffs, finals)
    if html_out is not None:
        Path(html_out).write_text(render_html(runs, names, diffs, finals), encoding="utf-8")
    return diffs, finals


def _unique_names(runs: list[RunSummary]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r.path) for r in runs]  # two folders called `run`: the paths tell them apart


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _print_table(names: list[str], diffs: dict[str, list[Any]], finals: dict[str, list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(names)} runs: the settings that differ, then the final metrics")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for key, values in diffs.items():
        table.add_row(key, *map(_fmt, values))
    if not diffs:
        table.add_row("(settings)", *["same"] * len(names))
    table.add_section()
    for key, values in finals.items():
        table.add_row(key, *map(_fmt, values), style="bold")
    Console(width=200).print(table)


def render_html(runs: list[RunSummary], names: list[str], diffs: dict[str, list[Any]],
                finals: dict[str, list[Any]]) -> str:
    """A self-contained page: the table, and one SVG chart per loss with every run's curve."""
    esc = html.escape
    head = "".join(f'<th style="color:{COLORS[i % len(COLORS)]}">{esc(n)}</th>' for i, n in enumerate(names))
    body = "".join(f"<tr><td>{esc(k)}</td>{''.join(f'<td>{esc(_fmt(v))}</td>' for v in vals)}</tr>"
                   for k, vals in [*diffs.items(), *finals.items()])
    charts = "".join(_svg_chart(metric, [r.curve(metric) for r in runs], names)
                     for metric in ("loss", "eval_loss") if any(r.curve(metric) for r in runs))
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>loraforge runs compare</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:2rem}table{border-collapse:collapse}"
            "td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:right}td:first-child{text-align:left}"
            "</style></head><body><h1>runs compare</h1>"
            f"<table><tr><th></th>{head}</tr>{body}</table>{charts}</body></html>\n")


def _svg_chart(metric: str, curves: list[list[tuple[float, float]]], names: list[str]) -> str:
    """One inline SVG: the curves over a shared step (x) and value (y) range, a legend, the axis ranges."""
    w, h, pad = 640, 320, 48
    points = [p for c in curves for p in c]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    xs, ys = (x1 - x0) or 1, (y1 - y0) or 1

    def xy(p: tuple[float, float]) -> str:
        return f"{pad + (p[0] - x0) / xs * (w - 2 * pad):.1f},{h - pad - (p[1] - y0) / ys * (h - 2 * pad):.1f}"

    lines = []
    for i, (curve, name) in enumerate(zip(curves, names, strict=True)):
        color = COLORS[i % len(COLORS)]
        if curve:
            lines.append(f'<polyline class="curve" data-run="{html.escape(name)}" fill="none" stroke="{color}" '
                         f'stroke-width="1.5" points="{" ".join(map(xy, curve))}"/>')
        lines.append(f'<text x="{w - pad + 4}" y="{pad + 14 * i}" fill="{color}" font-size="11">'
                     f"{html.escape(name)}</text>")
    axes = (f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#999"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#999"/>'
            f'<text x="{pad}" y="{h - pad + 16}" font-size="11">{_fmt(x0)}</text>'
            f'<text x="{w - pad}" y="{h - pad + 16}" font-size="11" text-anchor="end">step {_fmt(x1)}</text>'
            f'<text x="{pad - 4}" y="{h - pad}" font-size="11" text-anchor="end">{_fmt(y0)}</text>'
            f'<text x="{pad - 4}" y="{pad + 4}" font-size="11" text-anchor="end">{_fmt(y1)}</text>')
    return (f'<h2>{html.escape(metric)}</h2><svg xmlns="http://www.w3.org/2000/svg" width="{w + 120}" '
            f'height="{h}" role="img" aria-label="{html.escape(metric)} by step">{axes}{"".join(lines)}</svg>')
