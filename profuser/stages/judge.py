"""The ``judge/<reference>`` stage: the win rate's reference answers, judged once.

``profuser_heldout_winrate`` compares each evaluated model's answer to a held-out prompt with the
answer of ``evaluate.judge.reference`` (default: the target). Those answers and the judge's scores
of them are the same for every evaluation that shares the data, the reference, the generator, the
judge and the prompt limit (the fused model of every seed and variant, the baselines), so this
stage computes them once per store and every evaluate stage reads them (input ``judge``).

Writes ``answers.parquet``: id, response, score (float64), in the held-out file's order, at most
``limit`` prompts. Metrics: prompts and the mean score.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from ..artifacts import table_stats, write_table_atomic
from ..evaluation.judged import REFERENCE_ANSWERS, answer_and_score, heldout_prompts
from ..recipe import ModelSpec
from . import ModelIdentity, Ref, StageConfig

VERSION = "1"
DATA = "data"  # input role: the data stage (heldout.parquet)


class Config(StageConfig):
    model: ModelIdentity  # the reference
    generator: Ref
    reward_model: Ref
    limit: int | None  # at most this many held-out prompts (evaluate.limit of the win rate)


def run(ctx) -> dict:
    cfg = ctx.config
    final = ctx.out / REFERENCE_ANSWERS
    if final.is_file():
        return table_stats(final)  # finished before a kill that came ahead of the commit
    prompts = heldout_prompts(Path(ctx.inputs[DATA]) / "heldout.parquet", cfg.limit)
    answers, scores = answer_and_score(ModelSpec(**cfg.model), prompts,
                                       generator=ctx.build("generators", cfg.generator),
                                       judge=ctx.build("reward_models", cfg.reward_model))
    stats = {"prompts": len(prompts), "mean_score": sum(scores) / len(scores)}  # the manifest has the seconds
    write_table_atomic(pa.table({"id": [p.id for p in prompts], "response": answers, "score": scores},
                                schema=pa.schema([("id", pa.string()), ("response", pa.string()), ("score", pa.float64())])),
                       final, stats)
    return stats
