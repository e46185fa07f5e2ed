"""The ``train`` stage: fuse into the target through the curriculum's phases (``profuser.training``).

Reads ``build/<mode>/examples.parquet`` for the modes the curriculum uses and, for curricula that
rank examples by the target's own reward (``rm_split``), ``select/inference/selection.parquet``
(``scores[target_key]``, present when the target is one of the sources). Checkpoints live under
the stage's partial directory, which survives a kill, so a re-run resumes mid-phase; the finished
artifact keeps ``model/`` (save_pretrained + tokenizer + README.md card with the recipe and
lineage), ``metrics.jsonl`` and ``tb/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from ..components import MODES
from ..errors import DataError
from ..recipe import TrainSpec
from ..training import train

VERSION = "2"  # 2: loss normalised over the global batch's labelled tokens
DISTRIBUTED = True  # every rank of a torchrun/accelerate launch trains; the runner lets rank 0 seal it


def run(ctx) -> dict:
    cfg = ctx.config
    examples = {mode: ctx.inputs[f"build/{mode}"] / "examples.parquet" for mode in MODES if f"build/{mode}" in ctx.inputs}
    selection = ctx.inputs.get("select/inference")
    target_reward = read_target_reward(selection / "selection.parquet", cfg["target_key"]) if selection else None
    lineage = {
        "recipe": cfg["recipe_name"],
        "target": {"key": cfg["target_key"], **cfg["target"]},
        "sources": [source.key for source in ctx.recipe.sources],
        "stages": {"train": ctx.out.name.removesuffix(".partial"),
                   **{role: path.name for role, path in sorted(ctx.inputs.items())}},  # cache keys
    }
    card = {
        "title": f"{cfg['target_key']} fused by profuser ({cfg['recipe_name']})",
        "recipe": yaml.safe_dump(ctx.recipe.model_dump(mode="json"), sort_keys=False),
        "lineage": lineage,
    }
    summary = train(
        cfg["target"], examples, ctx.build("losses", cfg["loss"]), ctx.build("curricula", cfg["curriculum"]),
        TrainSpec(**cfg["train"]), ctx.out,
        target_reward=target_reward, callbacks=[ctx.log_metrics], card=card,
        device=ctx.runtime.device, cache_dir=ctx.runtime.cache_dir, progress=ctx.runtime.progress,
    )
    return {key: summary[key] for key in ("steps", "final_loss", "tokens", "seconds", "world_size", "backend", "phases", "resumed_from")}


def read_target_reward(path: Path, target_key: str) -> dict[str, float] | None:
    """id -> the target's own score in the inference-mode selection, or None when the target was
    not a candidate (not among the sources)."""
    if not path.is_file():
        raise DataError("selection file not found", where=str(path))
    table = pq.read_table(path, columns=["id", "scores"])
    rewards = {}
    for example_id, scores in zip(table.column("id").to_pylist(), table.column("scores").to_pylist()):
        score = json.loads(scores).get(target_key) if scores else None
        if score is not None:
            rewards[example_id] = float(score)
    return rewards or None
