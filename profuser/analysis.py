"""Analyses of the paper's Figure 1 from a run's artifacts.

* Figure 1a — *advantage shares*: in each mode, the share of examples each source wins
  (``select/<mode>/selection.parquet``: training mode by Min-CE, inference mode by the RM vote).
* Figure 1b — *response length by system message*: for the most frequent system messages of the
  training data, the mean length of the GT response and of each source's generated response
  (``data/train.parquet`` and ``generate/<src>/generations.parquet``).

Each analysis gives rows (a list of dicts, rendered with ``markdown_table``) and a PNG plot
(matplotlib figures drawn on the Agg canvas, without pyplot: no display and no global backend
change in the caller's process).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from .errors import ArtifactError

__all__ = [
    "advantage_shares",
    "length_by_system",
    "markdown_table",
    "plot_advantage_shares",
    "plot_length_by_system",
    "shares_table",
]

GT = "GT"  # the column of the ground-truth responses in length_by_system rows


def _table_file(path: str | Path, name: str) -> Path:
    """``path`` itself, or ``path/name`` when given an artifact directory."""
    path = Path(path)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise ArtifactError(f"{name} not found", where=str(path))
    return file


# --- Figure 1a: advantage shares ----------------------------------------------------------------


def advantage_shares(selection_paths: dict[str, str | Path]) -> dict[str, dict[str, float]]:
    """``{mode: {source: share of examples it won}}`` from each mode's ``selection.parquet``
    (the file or its artifact directory). Sources that won nothing are listed with 0 (they are
    found in the ``scores`` column); sources keep the order the evaluator listed them in."""
    shares: dict[str, dict[str, float]] = {}
    for mode, path in selection_paths.items():
        file = _table_file(path, "selection.parquet")
        table = pq.read_table(file, columns=["chosen", "scores"])
        chosen = table["chosen"].to_pylist()
        sources: dict[str, None] = {}
        for scores in table["scores"].to_pylist():
            sources.update(dict.fromkeys(json.loads(scores) if scores else {}))
        sources.update(dict.fromkeys(chosen))
        wins = Counter(chosen)
        n = len(chosen)
        shares[mode] = {s: (wins[s] / n if n else 0.0) for s in sources}
    return shares


def shares_table(shares: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per source, one column per mode (share of examples won, 0-1)."""
    sources: dict[str, None] = {}
    for per_mode in shares.values():
        sources.update(dict.fromkeys(per_mode))
    return [{"source": s, **{mode: shares[mode].get(s, 0.0) for mode in shares}} for s in sources]


def plot_advantage_shares(shares: dict[str, dict[str, float]], out_png: str | Path) -> Path:
    """Grouped bars (Figure 1a): per mode, each source's share of won examples, labelled in %."""
    rows = shares_table(shares)
    modes = list(shares)
    width = 0.8 / max(len(rows), 1)
    fig, ax = _figure(max(4.8, 1.6 + 1.8 * len(modes)), 3.4)  # wide enough for the title with one mode
    for j, row in enumerate(rows):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(modes))]
        values = [100 * row[m] for m in modes]
        bars = ax.bar(xs, values, width, label=row["source"])
        ax.bar_label(bars, labels=[f"{v:.0f}%" for v in values], fontsize=8)
    ax.set_xticks(range(len(modes)), [f"{m} mode" for m in modes])
    ax.set_ylabel("examples won (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Advantage of source models by mode", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper right", ncol=max(1, len(rows) // 3))
    return _save(fig, out_png)


# --- Figure 1b: response length by system message -----------------------------------------------


def _length(text: str, unit: str) -> int:
    return len(text.split()) if unit == "words" else len(text)


def length_by_system(
    data_train_path: str | Path,
    generations: dict[str, str | Path],
    *,
    top: int = 5,
    unit: Literal["words", "chars"] = "words",
) -> list[dict[str, Any]]:
    """Mean response length of the GT and of each source, for the ``top`` most frequent system
    messages of the training data (ties: first seen). Rows: ``system_id`` (1 = most frequent, as
    the paper's Table 5 numbers them), ``system`` (the text; "" when there is none),
    ``examples``, ``GT`` and one column per source (None where a source answered none of them)."""
    from .data import read_records

    records = read_records(_table_file(data_train_path, "train.parquet"))
    responses: dict[str, dict[str, str]] = {}
    for source, path in generations.items():
        table = pq.read_table(_table_file(path, "generations.parquet"), columns=["id", "response"])
        responses[source] = dict(zip(table["id"].to_pylist(), table["response"].to_pylist()))

    counts = Counter(r.system for r in records)
    first_seen = {}
    for i, r in enumerate(records):
        first_seen.setdefault(r.system, i)
    systems = sorted(counts, key=lambda s: (-counts[s], first_seen[s]))[:top]
    rows = []
    for rank, system in enumerate(systems, start=1):
        group = [r for r in records if r.system == system]
        row: dict[str, Any] = {"system_id": rank, "system": system, "examples": len(group),
                               GT: sum(_length(r.response, unit) for r in group) / len(group)}
        for source, by_id in responses.items():
            lengths = [_length(by_id[r.id], unit) for r in group if r.id in by_id]
            row[source] = sum(lengths) / len(lengths) if lengths else None
        rows.append(row)
    return rows


def plot_length_by_system(rows: list[dict[str, Any]], out_png: str | Path, *, unit: str = "words") -> Path:
    """Grouped bars (Figure 1b): per system message id, the mean GT and source response lengths."""
    series = [k for k in (rows[0] if rows else {}) if k not in ("system_id", "system", "examples")]
    width = 0.8 / max(len(series), 1)
    fig, ax = _figure(1.6 + 1.2 * max(len(rows), 1), 3.4)
    for j, name in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(rows))]
        ax.bar(xs, [row[name] or 0.0 for row in rows], width, label=name)
    ax.set_xticks(range(len(rows)), [f"#{row['system_id']}\n(n={row['examples']})" for row in rows])
    ax.set_xlabel("system message (by frequency)")
    ax.set_ylabel(f"mean response length ({unit})")
    ax.set_title("Response length by system message")
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, out_png)


# --- output -------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]], *, digits: int = 3, max_chars: int = 60) -> str:
    """A GitHub markdown table of ``rows`` (columns of the first row); floats rounded, long
    text shortened, pipes and newlines escaped."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        text = str(value).replace("\n", " ").replace("|", "\\|")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _figure(width: float, height: float):
    from .errors import import_extra

    Figure = import_extra("matplotlib.figure", "plots", what="plotting").Figure
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=150)  # a bare Figure renders with the Agg canvas
    return out
