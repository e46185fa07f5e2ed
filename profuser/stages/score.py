"""The ``score/<reward model>`` stage: one reward model scores every source's response to every
training instruction. One stage per reward model, so adding a reward model to a recipe scores
with that one only, and the generations are reused.

Items are scored in shards written atomically (as in ``generate``), so a killed stage resumes
and the ranks of a multi-process launch split them.
Writes ``scores.parquet``: id, source, score (float64; higher is better, on this reward model's
own scale). Where the generations hold n > 1 samples per prompt, every sample is scored: ``score``
is sample 0's and ``sample_scores`` list<float64> [n] has each sample's. Metrics: items, seconds, items per second, and per source the mean score and the
share of examples this reward model alone would give it (its vote).
"""

from __future__ import annotations

import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from ..artifacts import finish, read_samples, run_shards, table_stats
from ..components import Judged
from ..data import read_records
from ..errors import ArtifactError, ProfuserError
from . import Ref, StageConfig

VERSION = "1"
DISTRIBUTED = True  # under a multi-process launch the ranks split the shards (``run_shards``)
SHARD_SIZE = 256  # items (example × source) per shard
OUTPUT = "scores.parquet"
DATA = "data"  # input role: the data stage


def generations_role(source: str) -> str:
    """The input role of one source's generate stage."""
    return f"generate/{source}"


class Config(StageConfig):
    reward_model: Ref
    sources: list[str]  # source keys, in the recipe's order


def run(ctx) -> dict:
    cfg = ctx.config
    sources = cfg.sources
    rm_name = cfg.reward_model.name
    records = read_records(ctx.inputs[DATA] / "train.parquet")

    keys: list[tuple[str, str, int]] = []  # (id, source, sample), item order
    items: list[Judged] = []
    for source in sources:
        path = ctx.inputs[generations_role(source)] / "generations.parquet"
        if not path.is_file():
            raise ArtifactError("generations.parquet not found", where=str(path.parent))
        samples = read_samples(path)
        missing = [r.id for r in records if not samples.get(r.id)]
        if missing:
            raise ProfuserError(f"no generation for {len(missing)} example(s), e.g. {missing[0]!r}",
                                where=f"source {source} ({path})")
        for r in records:
            for j, response in enumerate(samples[r.id]):
                keys.append((r.id, source, j))
                items.append(Judged(r.system, r.instruction, response, r.id))
    multi = any(j for _, _, j in keys)  # n > 1: items are samples, and a shard's rows name them
    row_keys = [_key(i, s, j, multi) for i, s, j in keys]  # what identifies a shard's rows
    final = ctx.out / OUTPUT
    pairs = list(dict.fromkeys(_key(i, s, 0, False) for i, s, _ in keys))  # the final file's rows
    if final.is_file() and _keys(pq.read_table(final, columns=["id", "source"])) == pairs:
        return table_stats(final)  # finished before a kill that came ahead of the commit

    rm = ctx.build("reward_models", cfg.reward_model)

    def compute(index: int, rows: slice):
        started = time.perf_counter()
        scores = rm.score(items[rows])
        seconds = time.perf_counter() - started
        if len(scores) != rows.stop - rows.start:
            raise ProfuserError(f"returned {len(scores)} scores for {rows.stop - rows.start} items (shard {index})",
                                where=f"reward model {rm_name}")
        ctx.log_metrics(index, {"items": len(scores), "seconds": seconds})
        columns = {"id": [i for i, _, _ in keys[rows]], "source": [s for _, s, _ in keys[rows]],
                   "score": pa.array([float(x) for x in scores], pa.float64())}
        if multi:
            columns["sample"] = pa.array([j for _, _, j in keys[rows]], pa.int32())
        return pa.table(columns), {"items": len(scores), "seconds": seconds}

    results = run_shards(ctx.out, row_keys, SHARD_SIZE, compute, key_of=_keys, split=rm.data_parallel)
    if results is None:  # another rank than 0: rank 0 joins the shards
        return {}
    seconds = sum(s["seconds"] for _, s in results)
    by_example: dict[str, dict[str, float]] = {}  # sample 0's score
    for table, _ in results:
        sample = table["sample"].to_pylist() if multi else [0] * table.num_rows
        for i, s, j, score in zip(table["id"].to_pylist(), table["source"].to_pylist(), sample, table["score"].to_pylist()):
            if j == 0:
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
    if multi:  # one row per (id, source) as with one sample, each sample's score in a list
        joined = pa.concat_tables([t for t, _ in results])
        per: dict[tuple[str, str], list[float]] = {}
        for i, s, score in zip(*(joined[c].to_pylist() for c in ("id", "source", "score"))):
            per.setdefault((i, s), []).append(score)  # samples come in order
        schema = schema.append(pa.field("sample_scores", pa.list_(pa.float64())))
        results = [(pa.table({"id": [i for i, _ in per], "source": [s for _, s in per],
                              "score": pa.array([v[0] for v in per.values()], pa.float64()),
                              "sample_scores": pa.array(list(per.values()), pa.list_(pa.float64()))}), {})]
    finish(ctx.out, OUTPUT, results, schema, metrics)
    return metrics


def _key(example_id: str, source: str, sample: int, multi: bool) -> str:
    return f"{example_id}\t{source}\t{sample}" if multi else f"{example_id}\t{source}"


def _keys(table: pa.Table) -> list[str]:
    if "sample" in table.column_names:
        return [_key(i, s, j, True) for i, s, j in zip(*(table[c].to_pylist() for c in ("id", "source", "sample")))]
    return [_key(i, s, 0, False) for i, s in zip(table["id"].to_pylist(), table["source"].to_pylist())]


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6) if values else 0.0
