"""Reports: side-by-side comparisons of variants (the paper's Table 1) and a single run's summary.

``comparison_table`` / ``write_comparison`` take *entries*, one per run of a variant, as
``profuser compare`` builds them::

    {"variant": "profuser", "scores": {"gsm8k": 0.187, ...},          # required (lm-eval's 0-1 scores)
     "seed": 1, "recipe": "recipes/profuser.yaml", "baseline": False,  # optional, below too
     "wall_seconds": 812.4, "cold_seconds": 3600.0,
     "stages_ran": [...], "stages_reused": [...],
     "metrics_path": ".../train/<key>/metrics.jsonl",
     "selections": {"inference": ".../selection.parquet", "training": ...}}

Entries of the same variant (several seeds) are aggregated to mean ± sample std. An entry's
``per_example`` (``{task: {example key: value}}``) or ``per_example_path`` (the evaluate stage's
``per_example.parquet``) gives the paired bootstrap interval of each variant's difference to the
``reference`` and decides what is bold: only a mean that is significantly best against every other
row. Markdown shows percentages for 0-1 scores (as the paper does) and bits per byte as they are;
CSV and JSON keep lm-eval's values. Plots are drawn on bare
matplotlib Figures (the Agg canvas): no display, no global backend change; without matplotlib
(``pip install 'profuser[plots]'``) the reports are written without them and say so.

``write_run_report(run_dir)`` summarises one ``runs/runs/<recipe>/`` from its ``run.json``: stage
timings and cache hits, advantage shares, alignment quality, the training curve, scores.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import statistics
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ArtifactError, import_extra
from .evaluation.stats import bootstrap_mean_ci, paired_delta, pooled
from .evaluation.tasks import PAPER_TASKS, is_family_task, is_fraction, lower_is_better, task_title

__all__ = [
    "comparison_table",
    "read_metrics",
    "run_result_lines",
    "summarise_variants",
    "task_order",
    "terminal_text",
    "write_comparison",
    "write_run_report",
]

AVERAGE = "average"
PLOTS_MISSING = "Plots: not drawn, matplotlib is not installed (pip install 'profuser[plots]')."


def can_plot() -> bool:
    """Whether matplotlib (the ``plots`` extra) is installed; reports leave their PNGs out otherwise."""
    return importlib.util.find_spec("matplotlib") is not None


# --- aggregation ----------------------------------------------------------------------------------


def task_order(entries: Iterable[dict]) -> list[str]:
    """The tasks the entries were scored on: the paper's benchmarks in Table 1's order, then the rest
    in order of appearance."""
    seen: dict[str, None] = {}
    for entry in entries:
        seen.update(dict.fromkeys(entry.get("scores") or {}))
    return [t for t in PAPER_TASKS if t in seen] + [t for t in seen if t not in PAPER_TASKS]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def averages_columns(tasks: list[str]) -> bool:
    """Whether an Average column says anything: it averages at least two columns (those where
    higher is better); over one it would repeat that column."""
    return sum(not lower_is_better(t) and not is_family_task(t) for t in tasks) >= 2


def _entry_average(entry: dict, tasks: list[str]) -> float | None:
    """Mean over the table's tasks; None when the entry misses one (an average over fewer
    benchmarks is not comparable)."""
    scores = entry.get("scores") or {}
    values = [scores.get(t) for t in tasks if not lower_is_better(t) and not is_family_task(t)]
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)


def load_per_example(entry: dict) -> dict[str, dict[str, float]]:
    """``{task: {example key: value}}`` of one entry: inline ``per_example``, else read from
    ``per_example_path`` (empty when it has neither)."""
    if entry.get("per_example") is not None:
        return {t: dict(v) for t, v in entry["per_example"].items()}
    path = entry.get("per_example_path")
    if not path or not Path(path).is_file():
        return {}
    import pyarrow.parquet as pq

    out: dict[str, dict[str, float]] = {}
    table = pq.read_table(path, columns=["task", "id", "value"]).to_pydict()
    for task, key, value in zip(table["task"], table["id"], table["value"]):
        out.setdefault(task, {})[key] = value
    if entry.get("heldout_path") and Path(entry["heldout_path"]).is_file():  # per family: "<task>/<family>"
        from .advantages import read_families, split_by_family

        out.update(split_by_family(out, read_families(Path(entry["heldout_path"]))))
    return out


def resolve_reference(variants: list[dict], reference: str | None) -> str | None:
    """The variant ``reference`` names (a baseline also by its bare label), None for None."""
    if reference is None:
        return None
    names = [v["variant"] for v in variants]
    for name in names:
        if reference in (name, name.removesuffix(" (source)"), name.removesuffix(" (merge)")):
            return name
    raise ArtifactError(f"no variant named {reference!r} to compare against (variants: {', '.join(names)})",
                        where="--reference")


def summarise_variants(entries: list[dict], tasks: list[str] | None = None, *, reference: str | None = None,
                       resamples: int = 10_000, seed: int = 0) -> list[dict[str, Any]]:
    """One dict per variant (in order of first appearance): scores and their std over its entries,
    the average, wall time, which stages ran or were reused, and ``tasks``: per task ``{"mean",
    "std", "n_examples", "seeds", "ci95"}`` (``ci95``: bootstrap interval of the mean over the
    seed-pooled examples) plus, against ``reference`` (a variant name) when given and for every
    other variant, ``"delta": {"mean", "ci95": [lo, hi], "n_examples", "significant"}``. The
    seed-pooled per-example values are kept under ``"_examples"`` (not written to JSON)."""
    tasks = tasks or task_order(entries)
    rows = _summarise(entries, tasks)
    ref = resolve_reference(rows, reference)
    ref_row = next((r for r in rows if r["variant"] == ref), None)
    for row in rows:
        for task in tasks:
            values = row["_examples"].get(task) or {}
            stats = {"mean": row["scores"].get(task), "std": row["std"].get(task), "n_examples": len(values) or None,
                     "seeds": [s for s in row["seeds"] if s is not None],
                     "ci95": list(bootstrap_mean_ci(list(values.values()), resamples=resamples, seed=seed)) if values else None}
            if ref_row is not None and row is not ref_row:
                ref_values = ref_row["_examples"].get(task) or {}
                stats["delta"] = paired_delta(values, ref_values, resamples=resamples, seed=seed) if values and ref_values \
                    else None
            row["tasks"][task] = stats
    return rows


def _summarise(entries: list[dict], tasks: list[str]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict]] = {}
    for entry in entries:
        if "variant" not in entry:
            raise ValueError(f"comparison entry without a 'variant': {sorted(entry)}")
        groups.setdefault(str(entry["variant"]), []).append(entry)
    out = []
    for variant, runs in groups.items():
        scores, std = {}, {}
        for task in tasks:
            scores[task], std[task] = _mean_std([r["scores"][task] for r in runs if (r.get("scores") or {}).get(task) is not None])
        averages = [a for a in (_entry_average(r, tasks) for r in runs) if a is not None]
        avg, avg_std = _mean_std(averages)
        walls = [r["wall_seconds"] for r in runs if r.get("wall_seconds") is not None]
        recipes = list(dict.fromkeys(str(r["recipe"]) for r in runs if r.get("recipe")))
        per_run = [load_per_example(r) for r in runs]
        examples = {t: pooled([p.get(t) or {} for p in per_run]) for t in tasks}
        out.append({
            "variant": variant,
            "recipe": recipes[0] if len(recipes) == 1 else (recipes or None),
            "baseline": any(r.get("baseline") for r in runs),
            "runs": len(runs),
            "seeds": [r.get("seed") for r in runs],
            "scores": scores,
            "std": std,
            AVERAGE: avg,
            "average_std": avg_std,
            "wall_seconds": statistics.fmean(walls) if walls else None,
            "cold_seconds": next((r["cold_seconds"] for r in runs if r.get("cold_seconds") is not None), None),
            "stages_ran": _union(r.get("stages_ran") for r in runs),
            "stages_reused": _union(r.get("stages_reused") for r in runs),
            "tasks": {},
            "_examples": {t: v for t, v in examples.items() if v},
        })
    return out


def _union(lists: Iterable[list | None]) -> list | None:
    items: dict[str, None] = {}
    found = False
    for values in lists:
        if values is not None:
            found = True
            items.update(dict.fromkeys(values))
    return list(items) if found else None


# --- tables ---------------------------------------------------------------------------------------


def _scale(task: str, percent: bool) -> float:
    return 100.0 if percent and (task == AVERAGE or is_fraction(task)) else 1.0


def _digits(task: str, digits: int) -> int:
    return digits if task == AVERAGE or is_fraction(task) else max(digits, 3)  # bits per byte: 3 decimals


def _fmt(value: float | None, std: float | None, scale: float, digits: int) -> str:
    if value is None:
        return "–"
    text = f"{value * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if std is not None else text


def _fmt_delta(delta: dict | None, scale: float, digits: int) -> str:
    if not delta:
        return "–"
    lo, hi = delta["ci95"]
    text = f"{delta['mean'] * scale:+.{digits}f} [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"
    return text + " †" if delta.get("significant") else text


def column_title(task: str) -> str:
    """A column's header; a task where lower is better says so (↓)."""
    if task == AVERAGE:
        return "Average"
    return task_title(task) + (" ↓" if lower_is_better(task) else "")


def significantly_best(rows: list[dict], task: str, *, resamples: int = 10_000, seed: int = 0) -> str | None:
    """The variant whose mean on ``task`` is best and whose paired bootstrap difference to every
    other row excludes 0 in its favour; None when the best is tied or any row cannot be told apart
    (or lacks per-example values)."""
    scored = [r for r in rows if r["scores"].get(task) is not None]
    if len(scored) < 2:
        return None
    sign = -1.0 if lower_is_better(task) else 1.0
    scored.sort(key=lambda r: sign * r["scores"][task], reverse=True)
    best, runner_up = scored[0], scored[1]
    if best["scores"][task] == runner_up["scores"][task]:
        return None
    mine = best["_examples"].get(task)
    if not mine:
        return None
    for other in scored[1:]:
        theirs = other["_examples"].get(task)
        delta = paired_delta(mine, theirs, resamples=resamples, seed=seed) if theirs else None
        if delta is None or not delta["significant"] or sign * delta["mean"] <= 0:
            return None
    return best["variant"]


def comparison_table(entries: list[dict], tasks: list[str] | None = None, *, percent: bool = True, digits: int = 2,
                     reference: str | None = None, variants: list[dict] | None = None) -> str:
    """Markdown table like the paper's Table 1: one row per variant, one column per benchmark plus
    Average; mean ± std where a variant has several entries. With ``reference``, a "Δ vs reference
    [95% CI]" column follows each task († where the interval excludes 0). Bold: only a mean that
    ``significantly_best`` finds (ties and differences the data cannot tell are never bold; the
    Average has no per-example values and is never bold). ``variants``: ``summarise_variants``'
    output, when already computed."""
    tasks = tasks or task_order(entries)
    rows = variants if variants is not None else summarise_variants(entries, tasks, reference=reference)
    ref = resolve_reference(rows, reference)
    best = {t: significantly_best(rows, t) for t in tasks}
    header = ["Model"]
    for t in tasks:
        header.append(column_title(t))
        if ref is not None:
            header.append(f"Δ {column_title(t)} vs {_escape(ref)} [95% CI]")
    average = averages_columns(tasks)
    if average:
        header.append("Average")
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for row in rows:
        cells = [_escape(row["variant"]) + (" (reference)" if row["variant"] == ref else "")]
        for t in tasks:
            scale, dig = _scale(t, percent), _digits(t, digits)
            text = _fmt(row["scores"].get(t), row["std"].get(t), scale, dig)
            cells.append(f"**{text}**" if best[t] == row["variant"] else text)
            if ref is not None:
                cells.append("" if row["variant"] == ref else _fmt_delta((row["tasks"].get(t) or {}).get("delta"), scale, dig))
        if average:
            cells.append(_fmt(row[AVERAGE], row["average_std"], _scale(AVERAGE, percent), digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _plain_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join("–" if row.get(c) is None else _escape(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


# --- comparison files -----------------------------------------------------------------------------


def write_comparison(entries: list[dict], out_dir: str | Path, *, tasks: list[str] | None = None,
                     title: str = "Comparison", reference: str | None = None) -> dict[str, Path]:
    """Write comparison.md / .csv / .json and the PNG plots (scores with their intervals, training
    loss, advantage shares) under ``out_dir``; returns ``{name: path}`` of what was written.
    ``reference``: the variant every other is compared with (paired bootstrap over examples)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = tasks or task_order(entries)
    variants = summarise_variants(entries, tasks, reference=reference)
    ref = resolve_reference(variants, reference)
    written: dict[str, Path] = {}

    public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in variants]
    data = {"tasks": tasks, "titles": {t: task_title(t) for t in tasks},
            "lower_is_better": [t for t in tasks if lower_is_better(t)], "reference": ref,
            "bootstrap": {"resamples": 10_000, "seed": 0, "level": 0.95,
                          "unit": "held-out example (its seeds pooled), paired with the reference"},
            "variants": public, "entries": [{k: v for k, v in e.items() if k != "per_example"} for e in entries],
            "created_at": time.time()}
    written["json"] = out_dir / "comparison.json"
    written["json"].write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    written["csv"] = _write_csv(out_dir / "comparison.csv", variants, tasks)

    plots: list[tuple[str, Path]] = []
    if can_plot() and any(v[AVERAGE] is not None or any(s is not None for s in v["scores"].values()) for v in variants):
        written["scores_png"] = plot_scores(variants, tasks, out_dir / "scores.png", reference=ref)
        plots.append(("Scores per benchmark", written["scores_png"]))
    curves = {}
    for entry in entries:
        path = entry.get("metrics_path")
        if path and Path(path).is_file():
            curves.setdefault(str(entry["variant"]), []).append(read_metrics(path))
    if curves and can_plot():
        written["loss_png"] = plot_loss_curves(curves, out_dir / "loss.png")
        plots.append(("Training loss", written["loss_png"]))
    shares_md = _comparison_shares(entries, out_dir, written)

    units = ", ".join(f"{task_title(t)}: `{_primary_name(t)}`" + (" in %" if is_fraction(t) else ", bits per byte, lower is better")
                      for t in tasks)
    md = [f"# {title}", "", comparison_table(entries, tasks, reference=ref, variants=variants), "",
          f"Primary metric of each task ({units}). "
          + ("Average: mean over the tasks where higher is better, per-family columns not counted again (only for rows with every one of them). "
             if averages_columns(tasks) else "")
          + "Mean ± sample std over seeds where a variant ran more than once. "
          + (f"Δ: the variant minus {ref} over the same held-out examples (each example's seeds pooled), with a paired "
             "bootstrap 95% interval (10,000 resamples of the examples, seed 0); † marks an interval that excludes 0. "
             if ref else "")
          + "Bold: a mean significantly best against every other row (paired bootstrap 95% interval excluding 0); "
          "a tie, or a lead the data cannot tell apart, is not bold.", ""]
    runs = [{"variant": v["variant"], "recipe": v["recipe"] if isinstance(v["recipe"], (str, type(None))) else ", ".join(v["recipe"]),
             "runs": v["runs"], "seeds": ", ".join(str(s) for s in v["seeds"] if s is not None) or None,
             "wall time": _duration(v["wall_seconds"]), "cold time": _duration(v["cold_seconds"]),
             "stages ran": None if v["stages_ran"] is None else len(v["stages_ran"]),
             "stages reused": None if v["stages_reused"] is None else len(v["stages_reused"])}
            for v in variants if not v["baseline"]]
    if runs:
        md += ["## Runs", "", _plain_table(runs), ""]
    if shares_md:
        md += ["## Advantage shares", "", shares_md, ""]
    if plots:
        md += ["## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots] + [""]
    elif not can_plot():
        md += [PLOTS_MISSING, ""]
    written["md"] = out_dir / "comparison.md"
    written["md"].write_text("\n".join(md), encoding="utf-8")
    return written


def _primary_name(task: str) -> str:
    from .evaluation.tasks import KNOWN_TASKS, is_family_task

    parent = task.split("/", 1)[0] if is_family_task(task) else task  # a family's column: its task's metric
    return KNOWN_TASKS[parent].primary if parent in KNOWN_TASKS else "lm-eval's first metric"


def _write_csv(path: Path, variants: list[dict], tasks: list[str]) -> Path:
    fields = ["variant", "recipe", "baseline", "runs", "seeds"]
    fields += [c for t in tasks for c in (t, f"{t}_std", f"{t}_n", f"{t}_delta", f"{t}_delta_lo", f"{t}_delta_hi",
                                        f"{t}_delta_significant")]
    fields += [AVERAGE, "average_std"] if averages_columns(tasks) else []
    fields += ["wall_seconds", "cold_seconds", "stages_ran", "stages_reused"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for v in variants:
            row = {"variant": v["variant"], "recipe": v["recipe"] if not isinstance(v["recipe"], list) else ";".join(v["recipe"]),
                   "baseline": v["baseline"], "runs": v["runs"], "seeds": ";".join(str(s) for s in v["seeds"] if s is not None),
                   AVERAGE: v[AVERAGE], "average_std": v["average_std"], "wall_seconds": v["wall_seconds"],
                   "cold_seconds": v["cold_seconds"],
                   "stages_ran": None if v["stages_ran"] is None else len(v["stages_ran"]),
                   "stages_reused": None if v["stages_reused"] is None else len(v["stages_reused"])}
            for t in tasks:
                row[t], row[f"{t}_std"] = v["scores"].get(t), v["std"].get(t)
                stats = v.get("tasks", {}).get(t) or {}
                delta = stats.get("delta") or {}
                row[f"{t}_n"] = stats.get("n_examples")
                row[f"{t}_delta"] = delta.get("mean")
                row[f"{t}_delta_lo"], row[f"{t}_delta_hi"] = delta.get("ci95") or (None, None)
                row[f"{t}_delta_significant"] = delta.get("significant")
            writer.writerow({k: ("" if val is None else val) for k, val in row.items() if k in fields})
    return path


def _comparison_shares(entries: list[dict], out_dir: Path, written: dict[str, Path]) -> str:
    """Advantage shares of each distinct selection (variants that differ only after ``select``
    share theirs): a table and a plot per distinct selection."""
    try:
        from .analysis import advantage_shares, markdown_table, plot_advantage_shares, shares_table
    except ImportError:
        return ""
    distinct: dict[tuple, list[str]] = {}
    for entry in entries:
        selections = entry.get("selections") or {}
        selections = {m: p for m, p in selections.items() if p and Path(p).exists()}
        if selections:
            key = tuple(sorted((m, str(Path(p).resolve())) for m, p in selections.items()))
            distinct.setdefault(key, [])
            if entry["variant"] not in distinct[key]:
                distinct[key].append(str(entry["variant"]))
    parts = []
    for i, (key, variants) in enumerate(distinct.items()):
        shares = advantage_shares(dict(key))
        name = "advantage_shares.png" if len(distinct) == 1 else f"advantage_shares_{i + 1}.png"
        rows = [{k: (f"{100 * v:.1f}%" if isinstance(v, float) else v) for k, v in row.items()} for row in shares_table(shares)]
        parts += [f"Selection of {', '.join(variants)}:", "", markdown_table(rows), ""]
        if can_plot():
            written[name.removesuffix(".png")] = plot_advantage_shares(shares, out_dir / name)
            parts += [f"![advantage shares]({name})", ""]
    return "\n".join(parts).rstrip()


# --- plots ----------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    Figure = import_extra("matplotlib.figure", "plots", what="plotting").Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


SCORE_PANELS_PER_LINE = 4


def plot_scores(variants: list[dict], tasks: list[str], out_png: str | Path, *, reference: str | None = None) -> Path:
    """One panel per task: each variant's mean with its 95% bootstrap interval as error bars (the
    std over seeds where there are no per-example values); with ``reference``, a second row of
    panels: each variant's difference to it with the paired 95% interval, and the zero line."""
    columns = tasks or [AVERAGE]
    rows = 2 if reference else 1
    Figure = import_extra("matplotlib.figure", "plots", what="plotting").Figure

    n = max(len(variants), 1)
    per_line = min(len(columns), SCORE_PANELS_PER_LINE)  # wrap: a one-line strip of many tasks is unreadable
    lines = -(-len(columns) // per_line)
    fig = Figure(figsize=(max(4.0, 0.45 * n + 1.5) * per_line, 3.4 * rows * lines))
    grid = fig.subplots(rows * lines, per_line, squeeze=False)
    for j in range(len(columns), lines * per_line):  # the last line's empty places
        line, col = divmod(j, per_line)
        for r in range(rows):
            grid[line * rows + r][col].set_visible(False)
    names = [v["variant"] for v in variants]
    for j, task in enumerate(columns):
        scale = _scale(task, True)
        line, col = divmod(j, per_line)
        axes = [grid[line * rows + r][col:col + 1] for r in range(rows)]  # this task's panels, as axes[r][0]
        ax = axes[0][0]
        for i, v in enumerate(variants):
            stats = (v.get("tasks") or {}).get(task) or {}
            mean = v[AVERAGE] if task == AVERAGE else v["scores"].get(task)
            if mean is None:
                continue
            ci = stats.get("ci95")
            if ci:
                err = [[(mean - ci[0]) * scale], [(ci[1] - mean) * scale]]
            else:
                std = v["average_std"] if task == AVERAGE else v["std"].get(task)
                err = [[(std or 0.0) * scale], [(std or 0.0) * scale]]
            ax.errorbar([i], [mean * scale], yerr=err, fmt="o", color=f"C{i % 10}", capsize=3)
        unit = "%" if scale == 100.0 else "bits per byte"
        ax.set_title(column_title(task) + (" (lower is better)" if lower_is_better(task) else ""), fontsize=9)
        ax.set_ylabel(f"{unit}, 95% CI")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        if reference:
            ax = axes[1][0]
            for i, v in enumerate(variants):
                delta = ((v.get("tasks") or {}).get(task) or {}).get("delta")
                if not delta:
                    continue
                lo, hi = delta["ci95"]
                ax.errorbar([i], [delta["mean"] * scale], yerr=[[(delta["mean"] - lo) * scale], [(hi - delta["mean"]) * scale]],
                            fmt="o", color=f"C{i % 10}", capsize=3)
            ax.axhline(0.0, color="grey", linewidth=1, linestyle=":")
            ax.set_title(f"Δ vs {reference}" + (" (below 0: better)" if lower_is_better(task) else ""), fontsize=9)
            ax.set_ylabel(f"Δ {unit}, paired 95% CI")
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    return _save(fig, Path(out_png))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a train stage's ``metrics.jsonl`` (one JSON object per optimizer step)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ArtifactError(f"line {n} is not JSON: {exc.msg}", where=str(path)) from None
    return rows


LOSS_PANELS = (("loss/ce", "Cross-entropy on the response"), ("loss/kl", "KL to the teacher"))


def plot_loss_curves(curves: dict[str, list[list[dict]]], out_png: str | Path, *, title: str = "Training loss") -> Path:
    """The training loss per optimizer step, CE and KL in panels of their own (a run that logs
    neither: its ``loss``): per variant the mean over its runs (seeds), with a band from the
    lowest to the highest run where there are several; each variant's phase boundaries as dotted
    lines in its colour (named when there is one variant). The legend sits below the panels."""
    Figure = import_extra("matplotlib.figure", "plots", what="plotting").Figure

    panels = [(key, name) for key, name in LOSS_PANELS
              if any(_finite(r.get(key)) for runs in curves.values() for rows in runs for r in rows)]
    panels = panels or [("loss", "Loss")]
    fig = Figure(figsize=(4.6 * len(panels) + 0.6, 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    handles = {}
    for i, (variant, runs) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        for ax, (key, _) in zip(axes, panels):
            steps, mean, low, high = _mean_band(runs, key)
            if not steps:
                continue
            line, = ax.plot(steps, mean, color=colour, linewidth=1.4)
            handles.setdefault(variant, line)
            if len(runs) > 1:
                ax.fill_between(steps, low, high, color=colour, alpha=0.18, linewidth=0)
            for step, phase in _boundaries(runs[0]):
                ax.axvline(step - 0.5, color=colour, linestyle=":", linewidth=1)
                if len(curves) == 1:
                    ax.annotate(phase, (step - 0.5, 0.98), xycoords=("data", "axes fraction"), fontsize=7,
                                va="top", ha="left", color="dimgrey")
    from matplotlib.ticker import MaxNLocator

    for ax, (key, name) in zip(axes, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss" if key == "loss" else key.split("/")[-1].upper())
    several = any(len(runs) > 1 for runs in curves.values())
    fig.suptitle(title + (" (mean over seeds, band: lowest to highest)" if several else ""), fontsize=11)
    if handles:
        labels = list(handles)
        extra = [] if len(curves) == 1 else ["dotted: phase boundaries"]
        proxies = list(handles.values())
        if extra:
            from matplotlib.lines import Line2D

            proxies.append(Line2D([], [], color="grey", linestyle=":", linewidth=1))
        fig.legend(proxies, labels + extra, loc="outside lower center", ncol=min(len(labels) + len(extra), 4),
                   fontsize=8, frameon=False)
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _mean_band(runs: list[list[dict]], key: str) -> tuple[list, list, list, list]:
    """Steps, and per step the mean, lowest and highest of ``key`` over the runs that logged it."""
    by_step: dict[int, list[float]] = {}
    for rows in runs:
        for r in rows:
            if r.get("step") is not None and _finite(r.get(key)):
                by_step.setdefault(int(r["step"]), []).append(float(r[key]))
    steps = sorted(by_step)
    return (steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def _boundaries(rows: list[dict]) -> list[tuple[int, str]]:
    """(first step, name) of every phase after the first."""
    found, prev = [], None
    for row in rows:
        if row.get("phase") is None or row.get("step") is None:
            continue
        if prev is not None and _phase(row) != prev:
            found.append((int(row["step"]), str(row["phase"])))
        prev = _phase(row)
    return found


def _phase(row: dict) -> tuple:
    """A curriculum phase: its index tells apart two phases of the same name."""
    return row.get("phase_index"), row.get("phase")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_stage_times(stages: list[dict], out_png: str | Path) -> Path:
    """Horizontal bars of each stage's time (cached stages: the time they took when they ran); the
    legend under the axes, where it covers no bar or label."""
    Figure = import_extra("matplotlib.figure", "plots", what="plotting").Figure

    fig = Figure(figsize=(7.0, 1.4 + 0.28 * len(stages)), layout="constrained")
    ax = fig.subplots()
    ids = [s["id"] for s in stages][::-1]
    rows = stages[::-1]
    ax.barh(ids, [s.get("seconds") or 0.0 for s in rows], color="C0", label="ran")
    ax.barh(ids, [(s.get("build_seconds") or 0.0) if s.get("cached") else 0.0 for s in rows], color="C7",
            alpha=0.6, label="reused (time it took when built)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("seconds")
    ax.set_title("Stage times")
    fig.legend(loc="outside lower center", ncol=2, fontsize=7, frameon=False)
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# --- one run --------------------------------------------------------------------------------------


def _artifact_dir(run_dir: Path, stage: dict) -> Path | None:
    """A stage's artifact directory: the path run.json records, else where the store keeps it
    (the runs directory may have moved since)."""
    recorded = Path(stage.get("path") or "")
    if stage.get("path") and recorded.is_dir():
        return recorded
    store = run_dir.parent.parent / "store" / stage.get("kind", "") / stage.get("key", "")
    return store if store.is_dir() else None


def _scalar_metrics(metrics: dict[str, Any], limit: int = 6) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        if len(parts) == limit:
            break
    more = len([v for v in metrics.values() if isinstance(v, (int, float, str))]) - len(parts)
    return ", ".join(parts) + (f", +{more} more" if more > 0 else "")


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, (int, float, str)) or value is None:
            flat[name] = value
    return flat


def _fmt_cell(value: Any) -> Any:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4g}"
    return value


def write_run_report(run_dir: str | Path, out_dir: str | Path | None = None) -> str:
    """Write ``report.md`` and its PNGs for one run (default: ``<run_dir>/report/``) from
    ``run.json`` and the artifacts it lists; returns the markdown."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "run.json"
    if not summary_path.is_file():
        raise ArtifactError("no run.json: the run has not finished once", where=str(run_dir))
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"unreadable run.json: {exc.msg}", where=str(summary_path)) from None
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    stages: list[dict] = summary.get("stages", [])
    dirs = {s["id"]: _artifact_dir(run_dir, s) for s in stages}
    cached = [s for s in stages if s.get("cached")]

    md = [f"# Run report: {summary.get('recipe', run_dir.name)}", ""]
    started = summary.get("started_at")
    md += [f"- started: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else "- started: –",
           f"- wall time: {_duration(summary.get('seconds')) or '–'}",
           f"- stages: {len(stages)} ({len(stages) - len(cached)} ran, {len(cached)} reused from the cache)",
           f"- compute saved by the cache: {_duration(sum(s.get('build_seconds') or 0.0 for s in cached)) or '0 s'}", ""]

    # stage table and times
    rows = [{"stage": s["id"], "status": "cached" if s.get("cached") else "ran",
             "seconds": f"{s.get('seconds') or 0.0:.1f}", "key": s.get("key"),
             "metrics": _scalar_metrics(s.get("metrics") or {}) or None,
             "artifact": str(dirs[s["id"]]) if dirs[s["id"]] else "missing"} for s in stages]
    md += ["## Stages", "", _plain_table(rows), ""]
    if stages and can_plot():
        plot_stage_times(stages, out_dir / "stage_times.png")
        md += ["![stage times](stage_times.png)", ""]

    # scores
    evals = []
    for s in stages:
        if s.get("kind") == "evaluate" and dirs[s["id"]] and (dirs[s["id"]] / "results.json").is_file():
            results = json.loads((dirs[s["id"]] / "results.json").read_text(encoding="utf-8"))
            evals.append({"variant": results.get("label", s["id"].removeprefix("evaluate/")),
                          "scores": results.get("primary") or {}, "config": results.get("config") or {},
                          "per_example_path": str(dirs[s["id"]] / "per_example.parquet")})
    if evals:
        tasks = task_order(evals)
        md += ["## Scores", "", comparison_table(evals, tasks), ""]
        config = next((e["config"] for e in evals if e["config"]), {})
        notes = [f"{task_title(t)}: {c.get('primary_metric')}, {c.get('num_fewshot')}-shot"
                 + (f", {c.get('samples')} examples" if c.get("samples") is not None else "")
                 + (", chat template" if c.get("chat_template") else "") for t, c in config.items()]
        if notes:
            md += ["In %. " + "; ".join(notes) + ".", ""]
        if can_plot():
            plot_scores(summarise_variants(evals, tasks), tasks, out_dir / "scores.png")
            md += ["![scores](scores.png)", ""]

    # advantage shares
    selections = {s["id"].removeprefix("select/"): dirs[s["id"]] / "selection.parquet" for s in stages
                  if s["id"].startswith("select/") and dirs[s["id"]] and (dirs[s["id"]] / "selection.parquet").is_file()}
    if selections:
        try:
            from .analysis import advantage_shares, markdown_table, plot_advantage_shares, shares_table
        except ImportError:
            pass
        else:
            shares = advantage_shares(selections)
            table = [{k: (f"{100 * v:.1f}%" if isinstance(v, float) else v) for k, v in row.items()} for row in shares_table(shares)]
            md += ["## Advantage shares", "", "Share of examples each source wins, per mode.", "",
                   markdown_table(table), ""]
            if can_plot():
                plot_advantage_shares(shares, out_dir / "advantage_shares.png")
                md += ["![advantage shares](advantage_shares.png)", ""]

    # alignment quality
    aligns = []
    for s in stages:
        if s["id"].startswith("align/") and dirs[s["id"]] and (dirs[s["id"]] / "report.json").is_file():
            report = json.loads((dirs[s["id"]] / "report.json").read_text(encoding="utf-8"))
            aligns.append({"stage": s["id"], **{k: _fmt_cell(v) for k, v in _flatten(report).items()}})
    if aligns:
        columns = list(dict.fromkeys(k for row in aligns for k in row))
        md += ["## Alignment", "", _plain_table(aligns, columns), ""]

    # training curve
    train = next((s for s in stages if s.get("id") == "train"), None)  # not a recipe: model's (spec:train)
    metrics_file = dirs[train["id"]] / "metrics.jsonl" if train and dirs[train["id"]] else None
    if metrics_file and metrics_file.is_file():
        rows = read_metrics(metrics_file)
        phases: dict[tuple, list[dict]] = {}
        for row in rows:
            phases.setdefault(_phase(row), []).append(row)
        table = []
        for (_, name), prow in phases.items():
            losses = [r["loss"] for r in prow if _finite(r.get("loss"))]
            table.append({"phase": name, "steps": len(prow),
                          "first loss": f"{losses[0]:.4f}" if losses else None,
                          "last loss": f"{losses[-1]:.4f}" if losses else None,
                          "min loss": f"{min(losses):.4f}" if losses else None})
        md += ["## Training", "", _plain_table(table), ""]
        if can_plot():
            plot_loss_curves({summary.get("recipe", "run"): [rows]}, out_dir / "loss.png")
            md += ["![training loss](loss.png)", ""]

    if stages and not can_plot():
        md += [PLOTS_MISSING, ""]

    text = "\n".join(md)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    return text


# --- the terminal --------------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row (``\\|`` is a pipe inside a cell)."""
    inner = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def _wrap(text: str, width: int, indent: str = "", hang: str = "") -> list[str]:
    return textwrap.wrap(text, width=max(width, len(hang) + 20), initial_indent=indent, subsequent_indent=hang,
                         break_long_words=True, break_on_hyphens=False) or [indent.rstrip()]


def _table_lines(rows: list[list[str]], width: int) -> list[str]:
    """Aligned columns when they fit in ``width``; else one block per row: its first cell, then
    ``column  value`` lines (long values wrap under themselves, never cell by cell)."""
    header, body = rows[0], rows[1:]
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(header))]
    if sum(widths) + 2 * (len(widths) - 1) <= width:
        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
    key_width = min(max(len(h) for h in header[1:]), width // 3) if len(header) > 1 else 0
    out: list[str] = []
    for row in body:
        out.append(f"{header[0]}: {row[0]}" if header[0] else row[0])
        for key, value in zip(header[1:], row[1:]):
            hang = " " * (2 + key_width + 2)
            out += _wrap(value, width, indent=f"  {key.ljust(key_width)}  ", hang=hang)
    return out


def terminal_text(markdown: str, width: int, base: str | Path | None = None) -> str:
    """A report's markdown for a terminal ``width`` columns wide: tables aligned, or key/value blocks
    when too wide (``profuser report`` at 80 columns); long lines wrapped at spaces; images as their
    path (under ``base``). The file keeps the markdown."""
    lines = markdown.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            rows = [_cells(row) for row in block if not re.fullmatch(r"\|?[\s|:-]+\|?", row.strip())]
            out += _table_lines(rows, width)
            continue
        line = lines[i]
        i += 1
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip())
        if image:
            line = f"{image.group(1)}: {Path(base) / image.group(2) if base else image.group(2)}"
        out += _wrap(line, width, hang="  " if line.startswith("- ") else "") if len(line) > width else [line]
    return "\n".join(out)


# --- the end of `profuser run` --------------------------------------------------------------------


def _interval(per_example: Path, task: str) -> tuple[tuple[float, float] | None, int]:
    """(bootstrap 95% interval of the mean, n) of a task's per-example values; (None, 0) without them."""
    if not per_example.is_file():
        return None, 0
    import pyarrow.parquet as pq

    from .evaluation.stats import bootstrap_mean_ci

    table = pq.read_table(per_example, columns=["task", "value"])
    values = [v for t, v in zip(table["task"].to_pylist(), table["value"].to_pylist()) if t == task and v is not None]
    return (bootstrap_mean_ci(values), len(values)) if values else (None, 0)


def _score_cell(task: str, value: float | None, ci: tuple[float, float] | None, n: int) -> str:
    """``6.25 [0.00, 18.75] n=16``: the score, its interval and the examples it rests on."""
    scale, digits = _scale(task, True), _digits(task, 2)
    text = _fmt(value, None, scale, digits)
    if value is None or ci is None:
        return text
    return f"{text} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}] n={n}"


def run_result_lines(run_dir: str | Path, results: list, recipe=None) -> list[str]:
    """What ``profuser run`` prints when it is done: the evaluate stages' primary scores side by side
    (fused, target, sources), where the model and the report are. Writes the run report
    (``write_run_report``) when the run has a ``run.json``."""
    run_dir = Path(run_dir)
    ran = [r for r in results if not r.cached]
    name = getattr(recipe, "name", None) or run_dir.name
    lines = [f"{name}: {len(ran)} stage(s) ran, {len(results) - len(ran)} reused; run record: {run_dir / 'run.json'}"]
    roles: dict[str, list[str]] = {}
    if recipe is not None:
        roles.setdefault(recipe.target.key, []).append("target")
        for src in recipe.sources:
            roles.setdefault(src.key, []).append("source")
    evals = []
    for r in results:
        path = Path(r.path) / "results.json" if r.kind == "evaluate" else None
        if path is not None and path.is_file():
            primary = json.loads(path.read_text(encoding="utf-8")).get("primary") or {}
            primary = {t: (v, *_interval(Path(r.path) / "per_example.parquet", t)) for t, v in primary.items()}
            label = r.id.removeprefix("evaluate/")
            if label.startswith("merge/"):  # a merge baseline (recipe merges:)
                label, role = label.removeprefix("merge/"), "merge"
            else:
                role = "fused" if label == "fused" else ", ".join(roles.get(label, [])) or "baseline"
            evals.append((label if label == "fused" else f"{label} ({role})", primary))
    evals.sort(key=lambda e: e[0] != "fused")  # the fused model first
    if evals:
        tasks = list(dict.fromkeys(t for _, primary in evals for t in primary))
        heads = [column_title(t) + (" %" if is_fraction(t) else " bits/byte") for t in tasks]
        rows = [[_score_cell(t, *primary.get(t, (None, None, 0))) for t in tasks] for _, primary in evals]
        widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(heads)]
        width = max(len(label) for label, _ in evals)
        lines += ["", "scores, with a bootstrap 95% interval over the n examples ("
                  + "; ".join(f"{task_title(t)}: {_primary_name(t)}" + (", lower is better" if lower_is_better(t) else "")
                              for t in tasks) + "):",
                  "  " + "model".ljust(width) + "".join(f"  {h:>{w}}" for h, w in zip(heads, widths))]
        for (label, _), row in zip(evals, rows):
            lines.append("  " + label.ljust(width) + "".join(f"  {c:>{w}}" for c, w in zip(row, widths)))
    train = next((r for r in results if r.id == "train"), None)
    if train is not None and (Path(train.path) / "model").is_dir():
        lines.append(f"model: {Path(train.path) / 'model'}" + (f" (linked as {run_dir / 'model'})" if (run_dir / "model").exists() else ""))
    if (run_dir / "run.json").is_file():
        write_run_report(run_dir)
        lines.append(f"report: {run_dir / 'report' / 'report.md'}")
    return lines
