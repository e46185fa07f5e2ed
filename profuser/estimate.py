"""``profuser run --dry-run``: the plan and what it will cost, before any model loads.

Counts come from the data stage's artifact when it is cached, else from reading the dataset
source (no model needed). Token counts of text not yet tokenised are estimated at 4 characters
per token, and say so.
"""

from __future__ import annotations

import math

from .components import BadRow, CurriculumInput, Record
from .data import read_records

CHARS_PER_TOKEN = 4  # rough for English BPE/SentencePiece text; only used before tokenising
BYTES_PER_TOKEN = 64  # logits store at k = 10 (see docs/benchmarks.md, "Logits store")


def _train_records(runner) -> tuple[list[Record], bool]:
    artifact = runner.store.get("data", runner.keys["data"], verify=False)
    if artifact is not None:
        return read_records(artifact.path / "train.parquet"), True
    spec = runner.recipe.data
    source = runner.engine.registry.build("datasets", spec.source.name, spec.source.params)
    records = [r for r in source.records() if not isinstance(r, BadRow)]
    if spec.sample:
        records = records[: spec.sample]
    heldout = round(len(records) * spec.heldout) if spec.heldout < 1 else int(spec.heldout)
    return records[: max(len(records) - heldout, 0)], False


def estimate_plan(runner) -> dict:
    recipe = runner.recipe
    records, exact = _train_records(runner)
    n = len(records)
    gt_tokens = {r.id: max(1, math.ceil(len(r.response) / CHARS_PER_TOKEN)) for r in records}
    stage_ids = {s.id for s in runner.stages}
    n_sources = len(recipe.sources)
    max_new = int(recipe.inference_mode.generator.params.get("max_new_tokens", 256))
    generate = n * n_sources * max_new if "select/inference" in stage_ids else 0
    forced_training = sum(gt_tokens.values()) * n_sources if "select/training" in stage_ids else 0
    forced_inference = n * max_new if "select/inference" in stage_ids else 0
    curriculum = runner.engine.registry.build("curricula", recipe.curriculum.name, recipe.curriculum.params)
    try:
        phases = curriculum.phases(CurriculumInput(ids=list(gt_tokens), gt_length=gt_tokens,
                                                   target_reward={i: 0.0 for i in gt_tokens}))
    except Exception as exc:  # a curriculum that needs real rewards cannot be estimated ahead
        phases, phase_note = [], f"unknown before scoring ({exc})"
    else:
        phase_note = ""
    steps = 0
    for phase in phases:
        items = sum(len(part.ids) if part.ids is not None else n for part in phase.parts)
        steps += math.ceil(phase.epochs * items / recipe.train.batch_size)
    status = runner.status()
    return {
        "recipe": recipe.name,
        "stages": [{"id": s.id, "key": key, "cached": cached} for s, key, cached in status],
        "estimate": {
            "training examples": f"{n}" + ("" if exact else " (from the dataset source; the data stage has not run)"),
            "tokens to generate (upper bound)": f"{generate:,}",
            "tokens to teacher-force (≈)": f"{forced_training + forced_inference:,}",
            "logits stored (≈)": f"{(forced_training + forced_inference) * BYTES_PER_TOKEN / 2**20:.1f} MiB",
            "optimizer steps": phase_note or f"{steps} over {len(phases)} phase(s)",
            "stages to run": f"{sum(not c for _, _, c in status)} of {len(status)}",
        },
    }
