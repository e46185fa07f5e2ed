"""Which source holds which advantage, before any fusion: per family of held-out tasks (a row's
``meta.task``), the exact match of the target and of each source with a 95 % interval, and each
source minus the target (paired bootstrap over the family's examples, as ``compare`` does).

Fusion can only transfer what a source knows and the target does not. ``profuser advantages
RECIPE`` runs (or reuses) the recipe's baseline evaluations (``evaluate/<target>``,
``evaluate/<source>``: ``evaluate.baselines: true`` with ``profuser_heldout`` among the tasks) and
nothing else, then tabulates them. A setting is *valid for fusion* when each source is ahead of
the target on some family (an interval excluding 0) and no source is ahead on every family.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .evaluation.stats import paired_delta
from .evaluation.tasks import HELDOUT_TASK

ALL = "all"  # the family row that pools every held-out example
SPLIT_TASKS = (HELDOUT_TASK,)  # the tasks `compare` also reports per family, as "<task>/<family>"


def family_task(task: str, family: str) -> str:
    return f"{task}/{family}"


def split_by_family(per_example: dict[str, dict[str, float]], families: dict[str, str]) -> dict[str, dict[str, float]]:
    """``{"<task>/<family>": {row id: value}}`` for each task of ``SPLIT_TASKS`` in ``per_example``
    (``{task: {row id: value}}``), one per family of its rows; empty when the rows have no family."""
    out: dict[str, dict[str, float]] = {}
    for task in SPLIT_TASKS:
        for rid, value in (per_example.get(task) or {}).items():
            if rid in families:
                out.setdefault(family_task(task, families[rid]), {})[rid] = value
    return dict(sorted(out.items()))


def wilson_ci(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion, in % (not degenerate at 0 or n successes, unlike a
    bootstrap of 0/1 values)."""
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return 100.0 * float(ci.low), 100.0 * float(ci.high)


def read_families(heldout: Path) -> dict[str, str]:
    """``{row id: family}`` of a data stage's ``heldout.parquet`` (rows without ``meta.task``: no family)."""
    import pyarrow.parquet as pq

    table = pq.read_table(heldout, columns=["id", "meta"])
    out: dict[str, str] = {}
    for rid, meta in zip(table.column("id").to_pylist(), table.column("meta").to_pylist()):
        task = (json.loads(meta) if meta else {}).get("task")
        if task is not None:
            out[rid] = str(task)
    return out


def read_outcomes(per_example: Path, task: str = HELDOUT_TASK) -> dict[str, float]:
    """``{row id: value}`` of one task in an evaluate stage's ``per_example.parquet``."""
    import pyarrow.parquet as pq

    table = pq.read_table(per_example, columns=["task", "id", "value"])
    return {rid: float(v) for t, rid, v in zip(table.column("task").to_pylist(), table.column("id").to_pylist(),
                                               table.column("value").to_pylist()) if t == task}


def advantage_table(outcomes: dict[str, dict[str, float]], families: dict[str, str], target: str) -> dict[str, Any]:
    """The advantage map from each model's outcomes (``{model: {row id: 0/1}}``): ``{"target": name,
    "families": {family: {model: {"em", "ci95", "n"}}}, "deltas": {family: {source: paired delta vs the
    target}}, "valid": bool, "why": str}``; em and intervals in %."""
    if target not in outcomes:
        raise ValueError(f"no outcomes for the target {target!r}")
    by_family: dict[str, list[str]] = defaultdict(list)
    for rid, family in families.items():
        if all(rid in o for o in outcomes.values()):
            by_family[family].append(rid)
    table: dict[str, dict[str, Any]] = {}
    deltas: dict[str, dict[str, Any]] = {}
    for family in [*sorted(by_family), ALL]:
        ids = [i for f in sorted(by_family) for i in by_family[f]] if family == ALL else by_family[family]
        if not ids:
            continue
        table[family] = {}
        for name, values in outcomes.items():
            hits = sum(values[i] for i in ids)
            table[family][name] = {"em": 100.0 * hits / len(ids), "ci95": list(wilson_ci(round(hits), len(ids))),
                                   "n": len(ids)}
        deltas[family] = {}
        for name, values in outcomes.items():
            if name == target:
                continue
            d = paired_delta({i: 100.0 * values[i] for i in ids}, {i: 100.0 * outcomes[target][i] for i in ids})
            deltas[family][name] = d
    sources = [n for n in outcomes if n != target]
    ahead = {s: sorted(f for f in deltas if f != ALL and deltas[f][s] and deltas[f][s]["significant"]
                       and deltas[f][s]["mean"] > 0) for s in sources}
    n_families = len([f for f in table if f != ALL])
    problems = [f"{s} is ahead of the target on no family" for s in sources if not ahead[s]]
    problems += [f"{s} is ahead of the target on every family" for s in sources if ahead[s] and len(ahead[s]) == n_families]
    return {"target": target, "families": table, "deltas": deltas, "ahead": ahead, "valid": not problems and bool(sources),
            "why": "; ".join(problems) if problems else ("no source" if not sources else
                                                          "each source is ahead on some family, none on all")}


def baseline_stage_ids(recipe) -> dict[str, str]:
    """``{model label: evaluate stage id}`` of the target and each source; one line naming the field
    when the recipe does not evaluate them on the held-out tasks."""
    if HELDOUT_TASK not in recipe.evaluate.tasks:
        raise RecipeError([("evaluate.tasks", f"advantages are measured by {HELDOUT_TASK}: add it")])
    if not recipe.evaluate.baselines:
        raise RecipeError([("evaluate.baselines", "advantages need the target and sources evaluated: set it to true")])
    labels = [recipe.target.key, *(s.key for s in recipe.sources)]
    return {label: f"evaluate/{label}" for label in dict.fromkeys(labels)}


def measure(runner) -> dict[str, Any]:
    """Run ``runner``'s baseline evaluations (and what they need: the data stage) and tabulate them."""
    from .pipeline import upstream

    ids = baseline_stage_ids(runner.recipe)
    runner.selected = upstream(runner.stages, set(ids.values()))
    results = {r.id: r for r in runner.run()}
    data = Path(results["data"].path) / "heldout.parquet"
    families = read_families(data)
    outcomes = {label: read_outcomes(Path(results[sid].path) / "per_example.parquet") for label, sid in ids.items()}
    return advantage_table(outcomes, families, runner.recipe.target.key)


def markdown(table: dict[str, Any]) -> str:
    """The advantage map as a markdown table: a row per family, a column per model, each source's
    difference to the target with its interval († when it excludes 0)."""
    models = list(next(iter(table["families"].values())))
    sources = [m for m in models if m != table["target"]]
    head = ["family", "n", *(f"{m} (target)" if m == table["target"] else m for m in models),
            *(f"{s} − target" for s in sources)]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for family, row in table["families"].items():
        cells = [family, str(next(iter(row.values()))["n"])]
        cells += [f"{row[m]['em']:.1f} [{row[m]['ci95'][0]:.1f}, {row[m]['ci95'][1]:.1f}]" for m in models]
        for s in sources:
            d = table["deltas"][family].get(s)
            cells.append("–" if d is None else f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"
                         + (" †" if d["significant"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    verdict = "valid" if table["valid"] else "not valid"
    lines.append("")
    lines.append(f"Exact match in % with 95 % Wilson intervals; differences: paired bootstrap 95 % intervals, † excludes 0. "
                 f"For fusion the setting is **{verdict}**: {table['why']}.")
    return "\n".join(lines)
