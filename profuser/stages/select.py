"""The ``select/<mode>`` stage: gather each example's candidates and let the advantage evaluator
pick the advantaged source (training mode: Min-CE over teacher-forced NLLs; inference mode: the
reward-model vote over generations, or reference scoring)."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from ..components import Candidates, SourceNLL
from ..data import read_records
from ..errors import ProfuserError

VERSION = "1"


def run(ctx) -> dict:
    cfg = ctx.config
    evaluator = ctx.build("evaluators", cfg["evaluator"])
    sources: list[str] = cfg["sources"]
    records = read_records(ctx.inputs["data"] / "train.parquet")
    candidates = {r.id: Candidates(id=r.id, reference=r.response, system=r.system, instruction=r.instruction) for r in records}

    if "nll" in evaluator.needs:
        for source in sources:
            for example_id, nll in _nll_table(ctx.inputs[f"logits/{source}"]).items():
                if example_id in candidates:
                    candidates[example_id].nll[source] = nll
    if "responses" in evaluator.needs or "scores" in evaluator.needs:
        for source in sources:
            table = pq.read_table(ctx.inputs[f"generate/{source}"] / "generations.parquet", columns=["id", "response"])
            for example_id, response in zip(table["id"].to_pylist(), table["response"].to_pylist()):
                if example_id in candidates:
                    candidates[example_id].responses[source] = response
    if "scores" in evaluator.needs:
        for rm in cfg["reward_models"]:
            table = pq.read_table(ctx.inputs[f"score/{rm}"] / "scores.parquet", columns=["id", "source", "score"])
            for example_id, source, score in zip(*(table[c].to_pylist() for c in ("id", "source", "score"))):
                if example_id in candidates:
                    candidates[example_id].scores.setdefault(rm, {})[source] = score

    examples = list(candidates.values())
    choices = evaluator.select(examples)
    if len(choices) != len(examples):
        raise ProfuserError(f"returned {len(choices)} choices for {len(examples)} examples", where=f"evaluator {cfg['evaluator']['name']}")
    table = pa.table({
        "id": [e.id for e in examples],
        "chosen": [c.chosen for c in choices],
        "scores": [json.dumps(c.scores) for c in choices],
        "detail": [json.dumps(c.detail, default=str) for c in choices],
    })
    pq.write_table(table, ctx.out / "selection.parquet")
    wins = Counter(c.chosen for c in choices)
    return {"examples": len(examples), "win_share": {s: wins.get(s, 0) / max(len(examples), 1) for s in sources}}


def _nll_table(path) -> dict[str, SourceNLL]:
    from ..logits_store import LogitsReader

    return LogitsReader(path).nll_table()
