"""Reports: side-by-side comparisons of variants (the paper's Table 1) and a single run's summary.

``comparison_table`` / ``write_comparison`` take *entries*, one per run of a variant, as
``profuser compare`` builds them::

    {"variant": "profuser", "scores": {"gsm8k": 0.187, ...},          # required (lm-eval's 0-1 scores)
     "seed": 1, "recipe": "recipes/profuser.yaml", "baseline": False,  # optional, below too
     "wall_seconds": 812.4, "cold_seconds": 3600.0,
     "stages_ran": [...], "stages_reused": [...],
     "metrics_path": ".../train/<key>/metrics.jsonl",
     "selections": {"inference": ".../selection.parquet", "training": ...}}

Entries of the same variant (several seeds) are aggregated to mean ± sample std. Markdown shows
percentages (as the paper does); CSV and JSON keep lm-eval's 0-1 values. Plots are drawn on bare
matplotlib Figures (the Agg canvas): no display, no global backend change.

``write_run_report(run_dir)`` summarises one ``runs/runs/<recipe>/`` from its ``run.json``: stage
timings and cache hits, advantage shares, alignment quality, the training curve, scores.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .evaluation.tasks import PAPER_TASKS, task_title

__all__ = [
    "comparison_table",
    "read_metrics",
    "summarise_variants",
    "task_order",
    "write_comparison",
    "write_run_report",
]

AVERAGE = "average"


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


def _entry_average(entry: dict, tasks: list[str]) -> float | None:
    """Mean over the table's tasks; None when the entry misses one (an average over fewer
    benchmarks is not comparable)."""
    scores = entry.get("scores") or {}
    values = [scores.get(t) for t in tasks]
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)


def summarise_variants(entries: list[dict], tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """One dict per variant (in order of first appearance): scores and their std over its entries,
    the average, wall time, and which stages ran or were reused."""
    tasks = tasks or task_order(entries)
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


def _fmt(value: float | None, std: float | None, percent: bool, digits: int) -> str:
    if value is None:
        return "–"
    scale = 100.0 if percent else 1.0
    text = f"{value * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if std is not None else text


def comparison_table(entries: list[dict], tasks: list[str] | None = None, *, percent: bool = True, digits: int = 2) -> str:
    """Markdown table like the paper's Table 1: one row per variant, one column per benchmark plus
    Average; mean ± std where a variant has several entries; the best mean of each column in bold."""
    tasks = tasks or task_order(entries)
    rows = summarise_variants(entries, tasks)
    columns = [*tasks, AVERAGE]
    scale = 100.0 if percent else 1.0
    shown = lambda v: None if v is None else round(v * scale, digits)
    best = {}
    for col in columns:
        values = [shown(r["scores"].get(col) if col != AVERAGE else r[AVERAGE]) for r in rows]
        values = [v for v in values if v is not None]
        best[col] = max(values) if values else None
    header = ["Model", *(task_title(t) for t in tasks), "Average"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * len(columns)]
    for row in rows:
        cells = [_escape(row["variant"])]
        for col in columns:
            value, std = (row[AVERAGE], row["average_std"]) if col == AVERAGE else (row["scores"].get(col), row["std"].get(col))
            text = _fmt(value, std, percent, digits)
            cells.append(f"**{text}**" if value is not None and shown(value) == best[col] else text)
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
                     title: str = "Comparison") -> dict[str, Path]:
    """Write comparison.md / .csv / .json and the PNG plots (scores, training loss, advantage
    shares) under ``out_dir``; returns ``{name: path}`` of what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = tasks or task_order(entries)
    variants = summarise_variants(entries, tasks)
    written: dict[str, Path] = {}

    data = {"tasks": tasks, "titles": {t: task_title(t) for t in tasks}, "variants": variants, "entries": entries,
            "created_at": time.time()}
    written["json"] = out_dir / "comparison.json"
    written["json"].write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    written["csv"] = _write_csv(out_dir / "comparison.csv", variants, tasks)

    plots: list[tuple[str, Path]] = []
    if any(v[AVERAGE] is not None or any(s is not None for s in v["scores"].values()) for v in variants):
        written["scores_png"] = plot_scores(variants, tasks, out_dir / "scores.png")
        plots.append(("Scores per benchmark", written["scores_png"]))
    curves = {}
    for entry in entries:
        path = entry.get("metrics_path")
        if path and Path(path).is_file():
            curves.setdefault(str(entry["variant"]), []).append(read_metrics(path))
    if curves:
        written["loss_png"] = plot_loss_curves(curves, out_dir / "loss.png")
        plots.append(("Training loss", written["loss_png"]))
    shares_md = _comparison_shares(entries, out_dir, written)

    md = [f"# {title}", "", comparison_table(entries, tasks), "",
          "Primary metric of each task in % (" + ", ".join(f"{task_title(t)}: `{_primary_name(t)}`" for t in tasks) + "). "
          "Average: mean over the columns (only for rows with every column). "
          "Mean ± sample std over seeds where a variant ran more than once; best of each column in bold.", ""]
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
    written["md"] = out_dir / "comparison.md"
    written["md"].write_text("\n".join(md), encoding="utf-8")
    return written


def _primary_name(task: str) -> str:
    from .evaluation.tasks import KNOWN_TASKS

    return KNOWN_TASKS[task].primary if task in KNOWN_TASKS else "lm-eval's first metric"


def _write_csv(path: Path, variants: list[dict], tasks: list[str]) -> Path:
    fields = ["variant", "recipe", "baseline", "runs", "seeds"]
    fields += [c for t in tasks for c in (t, f"{t}_std")] + [AVERAGE, "average_std", "wall_seconds", "cold_seconds",
                                                              "stages_ran", "stages_reused"]
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
            writer.writerow({k: ("" if val is None else val) for k, val in row.items()})
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
        written[name.removesuffix(".png")] = plot_advantage_shares(shares, out_dir / name)
        rows = [{k: (f"{100 * v:.1f}%" if isinstance(v, float) else v) for k, v in row.items()} for row in shares_table(shares)]
        parts += [f"Selection of {', '.join(variants)}:", "", markdown_table(rows), "", f"![advantage shares]({name})", ""]
    return "\n".join(parts).rstrip()


# --- plots ----------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_scores(variants: list[dict], tasks: list[str], out_png: str | Path) -> Path:
    """Grouped bars: per benchmark (and the average), one bar per variant, error bars = std."""
    columns = [*tasks, AVERAGE]
    n = max(len(variants), 1)
    width = 0.8 / n
    fig, ax = _figure(max(5.0, 1.1 * len(columns) * max(1.0, n / 3)), 3.8)
    for j, v in enumerate(variants):
        values = [(v[AVERAGE] if c == AVERAGE else v["scores"].get(c)) for c in columns]
        stds = [(v["average_std"] if c == AVERAGE else v["std"].get(c)) for c in columns]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(columns))]
        ax.bar(xs, [100 * (x or 0.0) for x in values], width, label=v["variant"],
               yerr=[100 * (s or 0.0) for s in stds] if any(s is not None for s in stds) else None, capsize=2)
    ax.set_xticks(range(len(columns)), [task_title(c) if c != AVERAGE else "Average" for c in columns], fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title("Scores per benchmark")
    ax.legend(fontsize=7, frameon=False, ncols=min(n, 4), loc="upper center", bbox_to_anchor=(0.5, -0.1))
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


def plot_loss_curves(curves: dict[str, list[list[dict]]], out_png: str | Path, *, title: str = "Training loss") -> Path:
    """Loss per optimizer step; one colour per variant (its seeds share it), phase changes marked
    when there is a single run."""
    fig, ax = _figure(6.4, 3.8)
    colours = [f"C{i % 10}" for i in range(len(curves))]
    single = sum(len(runs) for runs in curves.values()) == 1
    for colour, (variant, runs) in zip(colours, curves.items()):
        for k, rows in enumerate(runs):
            points = [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss")) and r.get("step") is not None]
            if points:
                ax.plot(*zip(*points), color=colour, alpha=0.9 if len(runs) == 1 else 0.6, linewidth=1.2,
                        label=variant if k == 0 else None)
        if single:
            rows = runs[0]
            for prev, row in zip([{}, *rows], rows):
                if row.get("phase") is not None and _phase(row) != _phase(prev) and row.get("step") is not None:
                    ax.axvline(row["step"], color="grey", linestyle=":", linewidth=1)
                    ax.annotate(str(row.get("phase")), (row["step"], 1), xycoords=("data", "axes fraction"),
                                fontsize=7, va="top", ha="left", color="grey")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)
    return _save(fig, Path(out_png))


def _phase(row: dict) -> tuple:
    """A curriculum phase: its index tells apart two phases of the same name."""
    return row.get("phase_index"), row.get("phase")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_stage_times(stages: list[dict], out_png: str | Path) -> Path:
    """Horizontal bars of each stage's time (cached stages: the time they took when they ran)."""
    fig, ax = _figure(6.4, 0.8 + 0.28 * len(stages))
    ids = [s["id"] for s in stages][::-1]
    rows = stages[::-1]
    ax.barh(ids, [s.get("seconds") or 0.0 for s in rows], color="C0", label="ran")
    ax.barh(ids, [(s.get("build_seconds") or 0.0) if s.get("cached") else 0.0 for s in rows], color="C7",
            alpha=0.6, label="reused (time it took when built)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("seconds")
    ax.set_title("Stage times")
    ax.legend(fontsize=7, frameon=False)
    return _save(fig, Path(out_png))


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
    if stages:
        plot_stage_times(stages, out_dir / "stage_times.png")
        md += ["![stage times](stage_times.png)", ""]

    # scores
    evals = []
    for s in stages:
        if s.get("kind") == "evaluate" and dirs[s["id"]] and (dirs[s["id"]] / "results.json").is_file():
            results = json.loads((dirs[s["id"]] / "results.json").read_text(encoding="utf-8"))
            evals.append({"variant": results.get("label", s["id"].removeprefix("evaluate/")),
                          "scores": results.get("primary") or {}, "config": results.get("config") or {}})
    if evals:
        tasks = task_order(evals)
        md += ["## Scores", "", comparison_table(evals, tasks), ""]
        config = next((e["config"] for e in evals if e["config"]), {})
        notes = [f"{task_title(t)}: {c.get('primary_metric')}, {c.get('num_fewshot')}-shot"
                 + (f", {c.get('samples')} examples" if c.get("samples") is not None else "")
                 + (", chat template" if c.get("chat_template") else "") for t, c in config.items()]
        if notes:
            md += ["In %. " + "; ".join(notes) + ".", ""]
        plot_scores(summarise_variants(evals, tasks), tasks, out_dir / "scores.png")
        md += ["![scores](scores.png)", ""]

    # advantage shares
    selections = {s["id"].removeprefix("select/"): dirs[s["id"]] / "selection.parquet" for s in stages
                  if s.get("kind") == "select" and dirs[s["id"]] and (dirs[s["id"]] / "selection.parquet").is_file()}
    if selections:
        try:
            from .analysis import advantage_shares, markdown_table, plot_advantage_shares, shares_table
        except ImportError:
            pass
        else:
            shares = advantage_shares(selections)
            table = [{k: (f"{100 * v:.1f}%" if isinstance(v, float) else v) for k, v in row.items()} for row in shares_table(shares)]
            plot_advantage_shares(shares, out_dir / "advantage_shares.png")
            md += ["## Advantage shares", "", "Share of examples each source wins, per mode.", "",
                   markdown_table(table), "", "![advantage shares](advantage_shares.png)", ""]

    # alignment quality
    aligns = []
    for s in stages:
        if s.get("kind") == "align" and dirs[s["id"]] and (dirs[s["id"]] / "report.json").is_file():
            report = json.loads((dirs[s["id"]] / "report.json").read_text(encoding="utf-8"))
            aligns.append({"stage": s["id"], **{k: _fmt_cell(v) for k, v in _flatten(report).items()}})
    if aligns:
        columns = list(dict.fromkeys(k for row in aligns for k in row))
        md += ["## Alignment", "", _plain_table(aligns, columns), ""]

    # training curve
    train = next((s for s in stages if s.get("kind") == "train"), None)
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
        plot_loss_curves({summary.get("recipe", "run"): [rows]}, out_dir / "loss.png")
        md += ["## Training", "", _plain_table(table), "", "![training loss](loss.png)", ""]

    text = "\n".join(md)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    return text
