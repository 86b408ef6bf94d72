"""The evaluation report: base vs fine-tuned metrics, the loss curve and sample answers, side by side.

`write_report` writes three files into one folder: `report.md`, `report.html` (self-contained: inline
CSS, the loss curve embedded as a base64 PNG, no external URL, so it can be mailed or archived as one
file) and `eval_results.json`; plus `loss_curve.png` when a training log with losses is given.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from loraforge.errors import DataError

# ----------------------------------------------------------------------------------------------------------
# Metrics: how to name, format and judge each one


@dataclass(frozen=True)
class MetricInfo:
    label: str
    lower_is_better: bool | None  # None: informative only, never colored
    fmt: str


METRICS: dict[str, MetricInfo] = {
    "perplexity": MetricInfo("Perplexity", True, "{:,.2f}"),
    "loss": MetricInfo("Loss (mean token NLL)", True, "{:.4f}"),
    "bleu": MetricInfo("BLEU", False, "{:.3f}"),
    "rouge1": MetricInfo("ROUGE-1", False, "{:.3f}"),
    "rouge2": MetricInfo("ROUGE-2", False, "{:.3f}"),
    "rougeL": MetricInfo("ROUGE-L", False, "{:.3f}"),
    "exact_match": MetricInfo("Exact match", False, "{:.3f}"),
    "tokens": MetricInfo("Labelled tokens scored", None, "{:,.0f}"),
    "eval_tokens": MetricInfo("Labelled tokens scored", None, "{:,.0f}"),
    "n_replies": MetricInfo("Replies scored (BLEU, ROUGE)", None, "{:,.0f}"),
}
HEADLINE = ("perplexity", "bleu", "rougeL")
META_LABELS = {"model": "Base model", "model_name": "Base model", "adapter": "Adapter", "dataset": "Dataset",
               "date": "Date", "device": "Device"}


def metric_info(name: str) -> MetricInfo:
    if name in METRICS:
        return METRICS[name]
    lower = "loss" in name.lower() or "perplexity" in name.lower()
    return MetricInfo(name, True if lower else None, "{:.4g}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_value(name: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return metric_info(name).fmt.format(value)


@dataclass(frozen=True)
class MetricRow:
    name: str
    base: float | None
    finetuned: float | None
    base_interval: tuple[float, float] | None = None  # 95% bootstrap interval over the scored replies
    finetuned_interval: tuple[float, float] | None = None

    @property
    def info(self) -> MetricInfo:
        return metric_info(self.name)

    @property
    def delta(self) -> float | None:
        if self.base is None or self.finetuned is None:
            return None
        if not (math.isfinite(self.base) and math.isfinite(self.finetuned)):
            return None
        return self.finetuned - self.base

    @property
    def relative(self) -> float | None:
        delta = self.delta
        return None if delta is None or self.base == 0 else delta / abs(self.base)

    @property
    def verdict(self) -> str:
        """`better`, `worse` or `same` for the fine-tuned model; `neutral` when there is no direction."""
        delta, lower = self.delta, self.info.lower_is_better
        if delta is None or lower is None:
            return "neutral"
        if delta == 0:
            return "same"
        return "better" if (delta < 0) == lower else "worse"

    def delta_text(self) -> str:
        delta = self.delta
        if delta is None:
            return "—"
        sign = "+" if delta > 0 else "−" if delta < 0 else "±"
        return sign + format_value(self.name, abs(delta))

    def relative_text(self) -> str:
        rel = self.relative
        if rel is None:
            return "—"
        if rel >= 9 and self.base > 0:  # "+8340.9%" reads worse than "×84.4" when a score starts near zero
            return f"×{1 + rel:.1f}"
        sign = "+" if rel > 0 else "−" if rel < 0 else "±"
        return f"{sign}{abs(rel) * 100:.1f}%"


def metric_rows(results: Mapping[str, Any]) -> list[MetricRow]:
    """One row per numeric metric found in `results['base']` or `results['finetuned']`, known ones first."""
    base = results.get("base") or {}
    tuned = results.get("finetuned") or {}
    names = [n for n in METRICS if n in base or n in tuned]
    names += [n for n in [*base, *tuned] if n not in names and n not in METRICS]
    rows = []
    for name in dict.fromkeys(names):
        row = MetricRow(name, _number(base.get(name)), _number(tuned.get(name)),
                        _pair(base.get("intervals"), name), _pair(tuned.get("intervals"), name))
        if row.base is not None or row.finetuned is not None:
            rows.append(row)
    return rows


def _pair(intervals: Any, name: str) -> tuple[float, float] | None:
    """`intervals[name]` as (low, high) when it is a pair of numbers."""
    value = intervals.get(name) if isinstance(intervals, Mapping) else None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = _number(value[0]), _number(value[1])
        if low is not None and high is not None:
            return low, high
    return None


def format_with_interval(name: str, value: float | None, interval: tuple[float, float] | None) -> str:
    """`0.123 [0.101, 0.150]`: the value and, when known, its 95% interval."""
    text = format_value(name, value)
    if interval is None or value is None:
        return text
    return f"{text} [{format_value(name, interval[0])}, {format_value(name, interval[1])}]"


def _interval_note(results: Mapping[str, Any], rows: list[MetricRow]) -> str:
    if not any(r.base_interval or r.finetuned_interval for r in rows):
        return ""
    n = (results.get("finetuned") or {}).get("n_replies") or (results.get("base") or {}).get("n_replies")
    over = f"the {n} held-out replies" if n else "the held-out replies"
    return (f"In brackets: 95% bootstrap interval (1,000 resamples of {over}); where the two intervals overlap "
            "the difference may be chance.")


# ----------------------------------------------------------------------------------------------------------
# Training log and loss curve


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a run's `metrics.jsonl`; a half-written last line (a crash mid-write) is skipped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
        if isinstance(record, dict):
            records.append(record)
    return records


def loss_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` sorted by step; for a step logged twice, the later record wins."""
    # A resumed run replays the steps after its last checkpoint; the later values are the ones kept.
    by_step: dict[float, float] = {}
    for record in records:
        step, value = _number(record.get("step")), _number(record.get(key))
        if step is not None and value is not None and math.isfinite(value):
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def training_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Run facts from the log: last step, final and best losses, mean throughput."""
    summary: dict[str, float | int] = {}
    steps, losses = loss_series(records, "loss")
    if steps:
        summary["steps"] = int(steps[-1]) if steps[-1].is_integer() else steps[-1]
        summary["final_train_loss"] = losses[-1]
    eval_steps, eval_losses = loss_series(records, "eval_loss")
    if eval_steps:
        summary["final_eval_loss"] = eval_losses[-1]
        summary["best_eval_loss"] = min(eval_losses)
    _, throughput = loss_series(records, "tokens_per_s")
    if throughput:
        summary["mean_tokens_per_s"] = sum(throughput) / len(throughput)
    return summary


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centered moving mean (shorter at the ends): smooths without the lag of an EMA."""
    half = window // 2
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - half): i + half + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_loss_curve(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Plot training and eval loss against step from `metrics_jsonl` into `out_png`.

    Returns the PNG path, or None (and writes nothing) when the log holds no loss value.
    """
    records = read_metrics_log(metrics_jsonl)
    steps, losses = loss_series(records, "loss")
    eval_steps, eval_losses = loss_series(records, "eval_loss")
    if not steps and not eval_steps:
        return None

    # Figure + Agg canvas directly rather than pyplot: no global backend switch, safe in notebooks and threads.
    fig = Figure(figsize=(9, 4), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if steps:
        # Per-step losses of small batches are noisy; past 50 points show them faint under a smoothed line.
        window = max(3, len(steps) // 20) | 1
        noisy = len(steps) > 50
        ax.plot(steps, losses, color="#4c72b0", linewidth=1.0 if noisy else 1.8, alpha=0.3 if noisy else 1.0,
                label="train loss (per step)" if noisy else "train loss")
        if noisy:
            ax.plot(steps, moving_average(losses, window), color="#4c72b0", linewidth=2.0,
                    label=f"train loss ({window}-step mean)")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, color="#dd8452", linewidth=2.0, marker="o", markersize=4,
                label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token NLL)")
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(frameon=False)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


# ----------------------------------------------------------------------------------------------------------
# The report


def write_report(out_dir: str | Path, results: Mapping[str, Any], metrics_jsonl: str | Path | None = None,
                 samples: Sequence[Mapping[str, Any]] = ()) -> dict[str, Path]:
    """Write `report.md`, `report.html`, `eval_results.json` (and `loss_curve.png`) into `out_dir`.

    `results` holds `base` and `finetuned` metric dicts and an optional `meta` dict (model, adapter,
    dataset, date, device, ...); `meta['about']`, when given, is a paragraph in plain words on what the task
    is and why the numbers move as they do, printed above the metrics.
    `samples` are dicts with `prompt`, `reference`, `base`, `finetuned`.
    Returns the written paths keyed `markdown`, `html`, `json` and, when plotted, `loss_curve`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(results.get("meta") or {})
    meta.setdefault("date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    about = str(meta.pop("about", "") or "")
    rows = metric_rows(results)
    records = read_metrics_log(metrics_jsonl) if metrics_jsonl else []
    training = training_summary(records)
    curve = plot_loss_curve(metrics_jsonl, out / "loss_curve.png") if metrics_jsonl else None

    paths = {"markdown": out / "report.md", "html": out / "report.html", "json": out / "eval_results.json"}
    note = _interval_note(results, rows)
    paths["markdown"].write_text(_markdown(meta, rows, training, curve, samples, note, about), encoding="utf-8")
    paths["html"].write_text(_html(meta, rows, training, curve, samples, note, about), encoding="utf-8")
    json_meta = {**meta, "about": about} if about else meta
    paths["json"].write_text(json.dumps(_json_results(results, json_meta, rows, training, samples), indent=2,
                                        allow_nan=False, default=str), encoding="utf-8")
    if curve is not None:
        paths["loss_curve"] = curve
    return paths


def _json_results(results: Mapping[str, Any], meta: dict[str, Any], rows: list[MetricRow],
                  training: dict[str, float | int], samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    data = {key: value for key, value in results.items() if key != "meta"}
    data["meta"] = meta
    data["change"] = {r.name: {"absolute": r.delta, "relative": r.relative, "verdict": r.verdict} for r in rows}
    data["training"] = training
    data["samples"] = [dict(s) for s in samples]
    return _finite(data)


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: they become null (a perplexity overflow is still visible in the reports)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _facts(meta: Mapping[str, Any], training: Mapping[str, float | int]) -> list[tuple[str, str]]:
    facts = [(META_LABELS.get(k, k.replace("_", " ").capitalize()), str(v)) for k, v in meta.items()
             if v not in (None, "")]
    labels = {"steps": ("Training steps", "{:,.0f}"), "final_train_loss": ("Final train loss", "{:.4f}"),
              "best_eval_loss": ("Best eval loss", "{:.4f}"),
              "mean_tokens_per_s": ("Mean throughput", "{:,.0f} tokens/s")}
    facts += [(label, fmt.format(training[key])) for key, (label, fmt) in labels.items() if key in training]
    return facts


def _title(meta: Mapping[str, Any]) -> str:
    model = meta.get("model") or meta.get("model_name")
    return f"Evaluation report — {model}" if model else "Evaluation report"


def _sample_text(sample: Mapping[str, Any], key: str) -> str:
    value = sample.get(key)
    return "" if value is None else str(value)


# Markdown ---------------------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    # Markdown renders inline HTML, so model output is escaped; pipes and newlines would break the table.
    return html.escape(text, quote=False).replace("|", "&#124;").replace("\n", "<br>") or "—"


def _markdown(meta: Mapping[str, Any], rows: list[MetricRow], training: Mapping[str, float | int], curve: Path | None,
              samples: Sequence[Mapping[str, Any]], note: str = "", about: str = "") -> str:
    lines = [f"# {_title(meta)}", ""]
    lines += [f"- **{label}:** {_md_cell(value)}" for label, value in _facts(meta, training)]
    if about:
        lines += ["", "## What this measures", "", _md_cell(about)]
    lines += ["", "## Metrics", ""]
    if rows:
        marks = {"better": " ✅", "worse": " ⚠️", "same": "", "neutral": ""}
        lines += ["| Metric | Base | Fine-tuned | Change | Relative |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            arrow = {True: " ↓", False: " ↑", None: ""}[r.info.lower_is_better]
            lines.append(f"| {r.info.label}{arrow} | {format_with_interval(r.name, r.base, r.base_interval)} | "
                         f"{format_with_interval(r.name, r.finetuned, r.finetuned_interval)} | "
                         f"{r.delta_text()}{marks[r.verdict]} | {r.relative_text()} |")
        lines += ["", "↓ lower is better, ↑ higher is better; ✅ the fine-tuned model is better, ⚠️ worse."
                  + (f" {note}" if note else "")]
    else:
        lines.append("No metrics were given.")
    if curve is not None:
        lines += ["", "## Loss curve", "", f"![Training and eval loss by step]({curve.name})"]
    if samples:
        lines += ["", "## Sample answers", "", "| # | Prompt | Reference | Base | Fine-tuned |",
                  "|---:|---|---|---|---|"]
        for i, s in enumerate(samples, start=1):
            cells = [_md_cell(_sample_text(s, k)) for k in ("prompt", "reference", "base", "finetuned")]
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# HTML -------------------------------------------------------------------------------------------------------

CSS = """
:root { --text:#1f2328; --muted:#59636e; --line:#d8dee4; --soft:#f6f8fa; --accent:#2f5dab;
        --good:#1a7f37; --good-bg:#dafbe1; --bad:#cf222e; --bad-bg:#ffebe9; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--text); line-height: 1.55; font-size: 16px;
       font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", "Liberation Sans",
       Arial, sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 40px 32px 64px; }
header { border-bottom: 1px solid var(--line); padding-bottom: 24px; margin-bottom: 8px; }
.kicker { color: var(--accent); font-size: 13px; font-weight: 600; letter-spacing: .08em; text-transform: uppercase; }
h1 { font-size: 30px; line-height: 1.25; margin: 6px 0 18px; overflow-wrap: anywhere; }
h2 { font-size: 21px; margin: 40px 0 14px; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px 28px; margin: 0; }
.facts div { min-width: 0; }
.facts dt { color: var(--muted); font-size: 13px; }
.facts dd { margin: 2px 0 0; font-weight: 500; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); gap: 16px; margin-top: 28px; }
.card { border: 1px solid var(--line); border-radius: 10px; padding: 16px 18px; }
.card .name { color: var(--muted); font-size: 14px; }
.card .values { font-size: 26px; font-weight: 600; font-variant-numeric: tabular-nums; margin: 4px 0; }
.card .values .arrow { color: var(--muted); font-weight: 400; margin: 0 6px; }
.card .base { color: var(--muted); font-weight: 500; }
table { width: 100%; border-collapse: collapse; font-size: 15px; }
th, td { padding: 9px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-size: 13px; color: var(--muted); font-weight: 600; background: var(--soft); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.dir { color: var(--muted); font-size: 13px; margin-left: 4px; }
.better { color: var(--good); }
.worse { color: var(--bad); }
.pill { display: inline-block; padding: 1px 8px; border-radius: 999px; font-weight: 600; }
.pill.better { background: var(--good-bg); }
.pill.worse { background: var(--bad-bg); }
.note { color: var(--muted); font-size: 14px; margin-top: 10px; }
figure { margin: 0; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 10px; }
.sample { border: 1px solid var(--line); border-radius: 10px; margin: 0 0 18px; overflow: hidden; }
.sample .prompt { background: var(--soft); padding: 12px 16px; border-bottom: 1px solid var(--line); }
.sample .answers { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); }
.sample .answers > div { padding: 12px 16px; min-width: 0; }
.sample .answers > div + div { border-left: 1px solid var(--line); }
.label { display: block; font-size: 12px; font-weight: 600; letter-spacing: .06em; text-transform: uppercase;
         color: var(--muted); margin-bottom: 4px; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; font-size: 15px; }
.empty { color: var(--muted); font-style: italic; }
footer { color: var(--muted); font-size: 13px; margin-top: 48px; border-top: 1px solid var(--line); padding-top: 16px; }
@media (max-width: 760px) { .sample .answers { grid-template-columns: 1fr; }
  .sample .answers > div + div { border-left: 0; border-top: 1px solid var(--line); } }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_text(text: str) -> str:
    return f'<p class="text">{_esc(text)}</p>' if text.strip() else '<p class="text empty">(empty)</p>'


def _html(meta: Mapping[str, Any], rows: list[MetricRow], training: Mapping[str, float | int], curve: Path | None,
          samples: Sequence[Mapping[str, Any]], note: str = "", about: str = "") -> str:
    facts = "".join(f"<div><dt>{_esc(label)}</dt><dd>{_esc(value)}</dd></div>"
                    for label, value in _facts(meta, training))
    parts = [(f'<header><div class="kicker">loraforge · base vs fine-tuned</div><h1>{_esc(_title(meta))}</h1>'
              f'<dl class="facts">{facts}</dl>')]

    cards = []
    for r in rows:
        if r.name in HEADLINE and r.finetuned is not None:
            change = (f'<span class="pill {r.verdict}">{_esc(r.relative_text())}</span>'
                      if r.relative is not None else "")
            base = f'<span class="base">{_esc(format_value(r.name, r.base))}</span><span class="arrow">→</span>' \
                if r.base is not None else ""
            cards.append(f'<div class="card"><div class="name">{_esc(r.info.label)}</div>'
                         f'<div class="values">{base}{_esc(format_value(r.name, r.finetuned))}</div>{change}</div>')
    if cards:
        parts.append(f'<div class="cards">{"".join(cards)}</div>')
    parts.append("</header>")

    if about:
        parts.append(f'<section><h2>What this measures</h2><p>{_esc(about)}</p></section>')
    parts.append("<section><h2>Metrics</h2>")
    if rows:
        body = []
        for r in rows:
            arrow = {True: "↓ lower is better", False: "↑ higher is better", None: ""}[r.info.lower_is_better]
            cls = f' {r.verdict}' if r.verdict in ("better", "worse") else ""
            body.append(f'<tr><td>{_esc(r.info.label)}<span class="dir">{arrow}</span></td>'
                        f'<td class="num">{_esc(format_with_interval(r.name, r.base, r.base_interval))}</td>'
                        f'<td class="num">{_esc(format_with_interval(r.name, r.finetuned, r.finetuned_interval))}'
                        '</td>'
                        f'<td class="num{cls}">{_esc(r.delta_text())}</td>'
                        f'<td class="num{cls}">{_esc(r.relative_text())}</td></tr>')
        parts.append('<table><thead><tr><th>Metric</th><th class="num">Base</th><th class="num">Fine-tuned</th>'
                     '<th class="num">Change</th><th class="num">Relative</th></tr></thead>'
                     f'<tbody>{"".join(body)}</tbody></table>'
                     '<p class="note">Green: the fine-tuned model is better on that metric; red: worse. '
                     'Perplexity is exp(mean NLL) over the labelled tokens of the held-out set; BLEU '
                     '(sacreBLEU) and ROUGE (F-measure, stemmed) are on a 0–1 scale. '
                     f'{_esc(note)}</p>')
    else:
        parts.append('<p class="note">No metrics were given.</p>')
    parts.append("</section>")

    if curve is not None:
        data = base64.b64encode(curve.read_bytes()).decode("ascii")
        parts.append('<section><h2>Loss curve</h2><figure>'
                     f'<img alt="Training and eval loss by step" src="data:image/png;base64,{data}">'
                     "</figure></section>")

    if samples:
        parts.append(f"<section><h2>Sample answers <span class=\"dir\">{len(samples)}</span></h2>")
        for i, s in enumerate(samples, start=1):
            answers = "".join(f'<div><span class="label">{label}</span>{_html_text(_sample_text(s, key))}</div>'
                              for key, label in (("reference", "Reference"), ("base", "Base"),
                                                 ("finetuned", "Fine-tuned")))
            parts.append(f'<article class="sample"><div class="prompt"><span class="label">Prompt {i}</span>'
                         f'{_html_text(_sample_text(s, "prompt"))}</div>'
                         f'<div class="answers">{answers}</div></article>')
        parts.append("</section>")

    parts.append(f'<footer>Generated by loraforge · {_esc(meta.get("date", ""))}</footer>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(_title(meta))}</title><style>{CSS}</style></head>"
            f'<body><main>{"".join(parts)}</main></body></html>\n')
