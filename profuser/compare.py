"""``profuser compare``: run several recipes against one artifact store and put them side by side.

The recipes share every stage whose key they share (an ablation that changes only the curriculum
reuses data, generation, scoring, logits, selection, alignment and build), so the suite costs the
shared stages once plus each variant's own.

Seeds (``--seeds 0,1,2``) set ``train.seed`` only: the training order of examples, dropout and any
sampling in the loss. The data split, the sources' generations, reward scores, logits, selections
and alignment stay those of the recipe's own ``seed`` and are computed once for all seeds, so a
seed reruns ``train`` and ``evaluate/fused`` and nothing else; the baselines (target, sources) are
evaluated once. The spread over seeds is then the spread of training, the quantity a variant's
method decides.

A recipe's ``merges:`` (mergekit baselines, the paper's Table 3) are rows like the baselines:
``<label> (merge)``, evaluated once with the recipe's evaluate block.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from .pipeline import Runner, Runtime
from .plugins import Engine
from .recipe import load_recipe
from .store import atomic_write_text


def _scores(result_dir: Path) -> dict[str, float]:
    results = json.loads((result_dir / "results.json").read_text())
    return results.get("primary", {})


def _per_example(result_dir: Path) -> str | None:
    path = result_dir / "per_example.parquet"
    return str(path) if path.is_file() else None


def _with_families(entry: dict, by_id: dict) -> dict:
    """The entry with its held-out scores per family (``profuser_heldout/<family>``: rows' meta.task)
    and the path that splits its per-example values alike (``heldout_path``), when rows have families."""
    from .advantages import read_families, read_outcomes, split_by_family

    heldout = Path(by_id["data"].path) / "heldout.parquet" if "data" in by_id else None
    if heldout is None or not heldout.is_file() or not entry.get("per_example_path"):
        return entry
    families = read_families(heldout)
    split = split_by_family({task: read_outcomes(Path(entry["per_example_path"]), task)
                             for task in entry.get("scores", {})}, families)
    if split:
        entry["scores"] = {**entry["scores"], **{t: sum(v.values()) / len(v) for t, v in split.items()}}
        entry["heldout_path"] = str(heldout)
    return entry


def seed_overrides(seed: int | None) -> list[str]:
    """What a comparison seed changes: the training seed only (the stages before train are shared)."""
    return [] if seed is None else [f"train.seed={seed}"]


def run_comparison(recipes: list[Path], engine: Engine, runtime: Runtime, *, overrides: list[str] = (),
                   seeds: list[int] = (), echo=print, held: contextlib.ExitStack | None = None) -> dict:
    """Run every recipe (each seed) with ``engine``'s plugins, then return the comparison entries and
    the suite timing.

    Every recipe is planned, and every stage of every plan leased, before the first runs: `runs --gc`
    cannot collect a later recipe's cached inputs while an earlier one runs, nor an earlier one's
    artifacts before the comparison is recorded. The leases are released on return, or, given
    ``held``, when the caller closes it (after recording the comparison)."""
    started = time.time()
    planned = [(path, seed, Runner(load_recipe(path, [*overrides, *seed_overrides(seed)], registry=engine.registry),
                                   engine, runtime, echo=echo))
               for path in recipes for seed in seeds or [None]]
    # each distinct stage once (seeds and variants share most): one descriptor per key, not per plan
    stages = {(s.kind, runner.keys[s.id]): runner.store for _, _, runner in planned
              for s in runner.stages if s.id in runner.selected}
    with contextlib.ExitStack() as own:
        stack = own if held is None else held
        for (kind, key), store in stages.items():
            stack.callback(store.lease([(kind, key)]).release)
        return _run_planned(planned, echo, started)


def _run_planned(planned: list[tuple[Path, int | None, Runner]], echo, started: float) -> dict:
    entries: list[dict] = []
    baselines: dict[str, dict] = {}
    ran_once: dict[str, float] = {}  # stage key -> seconds, over the whole suite
    used: set[tuple[str, str]] = set()  # (kind, key) of every stage the comparison reads
    for path, seed, runner in planned:
        recipe = runner.recipe
        t0 = time.time()
        echo(f"== {recipe.name}" + (f" (seed {seed})" if seed is not None else ""))
        results = runner.run()
        if seed is not None and (runner.run_dir / "run.json").is_file():
            # every seed keeps its own record (run.json is the last seed's), so `runs --gc --all`
            # keeps every seed's trained model and evaluation
            record = runner.run_dir / "seeds" / str(seed) / "run.json"
            record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(record, (runner.run_dir / "run.json").read_text())
        used.update((r.kind, r.key) for r in results)
        by_id = {r.id: r for r in results}
        for r in results:
            if not r.cached:
                ran_once[r.key] = r.seconds
        entry = {
            "variant": recipe.name,
            "cold_seconds": sum(r.build_seconds for r in results),  # this recipe alone, nothing cached
            "recipe": str(path),
            "seed": seed,
            "wall_seconds": time.time() - t0,
            "stages_ran": [r.id for r in results if not r.cached],
            "stages_reused": [r.id for r in results if r.cached],
            "scores": _scores(Path(by_id["evaluate/fused"].path)) if "evaluate/fused" in by_id else {},
            "per_example_path": _per_example(Path(by_id["evaluate/fused"].path)) if "evaluate/fused" in by_id else None,
            "metrics_path": str(Path(by_id["train"].path) / "metrics.jsonl") if "train" in by_id else None,
            "selections": {mode: str(Path(by_id[f"select/{mode}"].path) / "selection.parquet")
                           for mode in ("inference", "training") if f"select/{mode}" in by_id},
        }
        entries.append(_with_families(entry, by_id))
        for r in results:
            label = r.id.removeprefix("evaluate/")
            if r.kind == "evaluate" and label != "fused" and label not in baselines:
                merged = label.startswith("merge/")  # evaluate/merge/<label>: a merge baseline
                variant = f"{label.removeprefix('merge/')} (merge)" if merged else f"{label} (source)"
                baselines[label] = _with_families({"variant": variant, "recipe": None, "seed": None,
                                                   "scores": _scores(Path(r.path)), "baseline": True,
                                                   "per_example_path": _per_example(Path(r.path))}, by_id)
    return {
        "entries": list(baselines.values()) + entries,
        "suite_seconds": time.time() - started,
        "stage_seconds_once": sum(ran_once.values()),
        "cold_seconds_each_alone": sum(e["cold_seconds"] for e in entries),
        "stages": sorted(used),
    }
