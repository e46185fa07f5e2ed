"""The ``score/<reward model>`` stage: one reward model scores every source's response to every
training instruction. One stage per reward model, so adding a reward model to a recipe scores
with that one only, and the generations are reused.

Items are scored in shards written atomically (as in ``generate``), so a killed stage resumes
and the ranks of a multi-process launch split them.
Writes ``scores.parquet``: id, source, score (float64; higher is better, on this reward model's
own scale). Metrics: items, seconds, items per second, and per source the mean score and the
share of examples this reward model alone would give it (its vote).
"""

from __future__ import annotations

import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from ..components import Judged
from ..data import read_records
from ..errors import ArtifactError, ProfuserError
from .generate import finish, run_shards, table_stats

VERSION = "1"
DISTRIBUTED = True  # under a multi-process launch the ranks split the shards (``run_shards``)
SHARD_SIZE = 256  # items (example × source) per shard
OUTPUT = "scores.parquet"


def run(ctx) -> dict:
    cfg = ctx.config
    sources: list[str] = cfg["sources"]
    rm_name = cfg["reward_model"]["name"]
    records = read_records(ctx.inputs["data"] / "train.parquet")

    keys: list[tuple[str, str]] = []  # (id, source), item order
    items: list[Judged] = []
    for source in sources:
        path = ctx.inputs[f"generate/{source}"] / "generations.parquet"
        if not path.is_file():
            raise ArtifactError("generations.parquet not found", where=str(path.parent))
        table = pq.read_table(path, columns=["id", "response"])
        responses = dict(zip(table["id"].to_pylist(), table["response"].to_pylist()))
        missing = [r.id for r in records if r.id not in responses]
        if missing:
            raise ProfuserError(f"no generation for {len(missing)} example(s), e.g. {missing[0]!r}",
                                where=f"source {source} ({path})")
        for r in records:
            keys.append((r.id, source))
            items.append(Judged(r.system, r.instruction, responses[r.id], r.id))
    row_keys = [f"{i}\t{s}" for i, s in keys]  # what identifies a shard's rows
    final = ctx.out / OUTPUT
    if final.is_file() and _keys(pq.read_table(final, columns=["id", "source"])) == row_keys:
        return table_stats(final)  # finished before a kill that came ahead of the commit

    rm = ctx.build("reward_models", cfg["reward_model"])

    def compute(index: int, rows: slice):
        started = time.perf_counter()
        scores = rm.score(items[rows])
        seconds = time.perf_counter() - started
        if len(scores) != rows.stop - rows.start:
            raise ProfuserError(f"returned {len(scores)} scores for {rows.stop - rows.start} items (shard {index})",
                                where=f"reward model {rm_name}")
        ctx.log_metrics(index, {"items": len(scores), "seconds": seconds})
        table = pa.table({"id": [i for i, _ in keys[rows]], "source": [s for _, s in keys[rows]],
                          "score": pa.array([float(x) for x in scores], pa.float64())})
        return table, {"items": len(scores), "seconds": seconds}

    results = run_shards(ctx.out, row_keys, SHARD_SIZE, compute, key_of=_keys, split=rm.data_parallel)
    if results is None:  # another rank than 0: rank 0 joins the shards
        return {}
    seconds = sum(s["seconds"] for _, s in results)
    by_example: dict[str, dict[str, float]] = {}
    for table, _ in results:
        for i, s, score in zip(table["id"].to_pylist(), table["source"].to_pylist(), table["score"].to_pylist()):
            by_example.setdefault(i, {})[s] = score
    votes = Counter(max(per, key=per.get) for per in by_example.values())  # first listed source on equal scores
    metrics = {
        "reward_model": rm_name,
        "items": len(items),
        "seconds": round(seconds, 3),
        "items_per_s": round(len(items) / seconds, 2) if seconds else 0.0,
        "mean_score": {s: _mean([per[s] for per in by_example.values()]) for s in sources},
        "vote_share": {s: votes.get(s, 0) / len(by_example) if by_example else 0.0 for s in sources},
    }
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("score", pa.float64())])
    finish(ctx.out, OUTPUT, results, schema, metrics)
    return metrics


def _keys(table: pa.Table) -> list[str]:
    return [f"{i}\t{s}" for i, s in zip(table["id"].to_pylist(), table["source"].to_pylist())]


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6) if values else 0.0
