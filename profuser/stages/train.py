"""The ``train`` stage: fuse into the target through the curriculum's phases (``profuser.training``).

Reads ``build/<mode>/examples.arrow`` for the modes the curriculum uses and, for curricula that
rank examples by the target's own reward (``rm_split``), ``select/inference/selection.parquet``
(the raw ``rm_scores`` of the target's answer, present when the target is one of the sources
and reward models scored it). Checkpoints live under
the stage's partial directory, which survives a kill, so a re-run resumes mid-phase; the finished
artifact keeps ``model/`` (save_pretrained + tokenizer + README.md card with the recipe and
lineage; the tokenizer keeps the chat template it was trained with), ``metrics.jsonl`` and ``tb/``
(``train.report_to``: the trackers, from the run's recipe, not the key: a cached training is not
logged again).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ..artifacts import SELECTION_FILE, read_selection
from ..components import MODES
from ..recipe import TrainSpec
from . import ModelIdentity, Ref, StageConfig

VERSION = "4"  # 2: loss normalised over the global batch's labelled tokens; 3: rm_split by reward scores, SimulFuse w1 = 0.1;
# 4: mixed phases step over instructions (both modes of an id in one step, epochs count ids) and the loss is
# Eq. 5, each mode's token mean over the global batch
DISTRIBUTED = True  # every rank of a torchrun/accelerate launch trains; the runner lets rank 0 seal it
SELECTION = "select/inference"  # input role: the inference-mode selection (the target's rewards), when planned


def build_role(mode: str) -> str:
    """The input role of one mode's build stage."""
    return f"build/{mode}"


class Config(StageConfig):
    target: ModelIdentity
    target_key: str
    loss: Ref
    curriculum: Ref
    train: TrainSpec
    recipe_name: str
    sources: list[str]  # source keys
    card_recipe: str  # the recipe text of the model card: hashed, so a shared key never embeds another recipe

    # where a run reports and publishes (trackers, the Hub), not what it trains: read, never hashed
    NOT_HASHED: ClassVar[dict[str, Any]] = {"train": set(TrainSpec.NOT_HASHED)}


def run(ctx) -> dict:
    from ..training import train

    cfg = ctx.config
    examples = {mode: ctx.inputs[build_role(mode)] / "examples.arrow" for mode in MODES if build_role(mode) in ctx.inputs}
    selection = ctx.inputs.get(SELECTION)
    target_reward = read_target_reward(selection / SELECTION_FILE, cfg.target_key) if selection else None
    lineage = {
        "recipe": cfg.recipe_name,
        "target": {"key": cfg.target_key, **cfg.target},
        "sources": cfg.sources,
        "stages": {"train": ctx.out.name.removesuffix(".partial"),
                   **{role: path.name for role, path in sorted(ctx.inputs.items())}},  # cache keys
    }
    card = {
        "title": f"{cfg.target_key} fused by profuser ({cfg.recipe_name})",
        "recipe": cfg.card_recipe,
        "lineage": lineage,
    }
    summary = train(
        cfg.target, examples, ctx.build("losses", cfg.loss), ctx.build("curricula", cfg.curriculum),
        cfg.train, ctx.out,
        target_reward=target_reward, callbacks=[ctx.log_metrics], card=card,
        device=ctx.runtime.device, cache_dir=ctx.runtime.cache_dir, progress=ctx.runtime.progress,
        run_name=cfg.recipe_name, engine=ctx.engine,
    )
    return {key: summary[key] for key in ("steps", "final_loss", "tokens", "seconds", "world_size", "backend", "phases", "resumed_from")}


def read_target_reward(path: Path, target_key: str) -> dict[str, dict[str, float] | float] | None:
    """id -> the reward models' raw scores of the target's own answer, ``{rm: score}`` with the
    strongest first (the ``rm_scores`` column; from ``detail.rm_scores`` in selections written
    before it); or None when the target was not a candidate (not among the sources).

    A selection without reward-model scores (an evaluator such as ``reference``) gives the
    evaluator's own score of the target as a plain number. ``rm_vote``'s own scores are vote
    counts and are never read as a reward."""
    rewards: dict[str, dict[str, float] | float] = {}
    for example_id, row in read_selection(path, scores=True).items():
        if row.rm_scores is not None:
            per_rm = row.rm_scores
        else:
            detail = row.detail or {}
            per_rm = detail.get("rm_scores") if isinstance(detail, dict) else None
            if per_rm is None:  # no reward models: the evaluator's own score
                score = (row.scores or {}).get(target_key)
                if score is not None:
                    rewards[example_id] = float(score)
                continue
            strongest = detail.get("strongest")  # rm_vote records it; put it first
            per_rm = {rm: per_rm[rm] for rm in sorted(per_rm, key=lambda rm: rm != strongest)}
        scores = {rm: float(by_source[target_key]) for rm, by_source in per_rm.items() if target_key in by_source}
        if scores:
            rewards[example_id] = scores
    return rewards or None
