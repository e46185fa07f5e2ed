"""The ``generate/<source>`` stage: one response per training instruction from one source model
(the inference mode's candidates), or n of them with a generator whose params set ``n`` > 1.

Prompts are generated in shards written atomically into the partial directory
(``shards/00000.parquet``, ...): a killed stage resumes at the first missing shard; under a
multi-process launch the ranks split the shards. Each shard
has its own seed derived from (``seed``, shard index), so a resumed run writes exactly what an
uninterrupted one would. At the end the shards are joined into ``generations.parquet`` (id,
response) and removed. With n > 1 samples per prompt it also has ``responses`` list<string> [n]
(``response`` stays sample 0, so every reader of one response per source reads that).

Metrics: examples, new tokens (the responses counted with the source's tokenizer, so every
backend is measured the same way), generation seconds and tokens per second, and prompts whose
responses are empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..components import Prompt
from ..data import read_records
from ..errors import ProfuserError
from ..pipeline import rank_and_world, wait_until

VERSION = "1"  # n > 1 (the responses column) comes only from a params n, which is in the key
DISTRIBUTED = True  # under a multi-process launch the ranks split the shards (``run_shards``)
SHARD_SIZE = 32  # prompts per shard, unless the generator says otherwise (``shard_size``)
OUTPUT = "generations.parquet"
_STATS_KEY = b"profuser.stats"


def shard_seed(seed: int, shard: int) -> int:
    digest = hashlib.sha256(f"{seed}:{shard}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def write_table_atomic(table: pa.Table, path: Path, stats: dict[str, Any] | None = None) -> None:
    """Write a parquet file so that it is complete or absent (a kill never leaves half of it);
    ``stats`` go into the file's metadata."""
    if stats is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _STATS_KEY: json.dumps(stats).encode()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def table_stats(path: Path) -> dict[str, Any]:
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(_STATS_KEY, b"{}"))


def _ids(table: pa.Table) -> list[str]:
    return table["id"].to_pylist()


def run_shards(out: Path, keys: list[str], shard_size: int,
               compute: Callable[[int, slice], tuple[pa.Table, dict[str, Any]]],
               key_of: Callable[[pa.Table], list[str]] = _ids, *, split: bool = True,
               poll: float = 1.0) -> list[tuple[pa.Table, dict]] | None:
    """Run ``compute(shard_index, rows)`` for every shard of ``keys`` whose file in ``out/shards``
    is missing or holds other rows (``key_of(table)`` differs: an attempt with other inputs),
    writing each result atomically; return every shard's (table, stats) in order.

    Under a multi-process launch with ``split``, rank r computes shards r, r + W, ...; a shard's
    result depends only on its index (its seed too), never on W. Rank 0 then waits for the other
    ranks' shards and returns them all; the other ranks return None. Without ``split``, rank 0
    computes every shard and the other ranks return None at once."""
    rank, world = rank_and_world()
    if not split:
        if rank > 0:
            return None
        world = 1
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    bounds = [slice(a, min(a + shard_size, len(keys))) for a in range(0, len(keys), shard_size)]

    def path_of(index: int) -> Path:
        return shards / f"{index:05d}.parquet"

    def stored(index: int) -> tuple[pa.Table, dict] | None:
        path = path_of(index)
        if path.is_file():
            table = pq.read_table(path)
            if key_of(table) == keys[bounds[index]]:
                return table, table_stats(path)
        return None

    mine: dict[int, tuple[pa.Table, dict]] = {}  # this rank's shards, kept rather than read back
    for index in range(rank, len(bounds), world):
        if (result := stored(index)) is None:
            result = compute(index, bounds[index])
            write_table_atomic(result[0], path_of(index), result[1])
        mine[index] = result
    if rank > 0:
        return None
    return [mine[i] if i in mine else wait_until(lambda i=i: stored(i), poll) for i in range(len(bounds))]


def finish(out: Path, name: str, results: list[tuple[pa.Table, dict]], schema: pa.Schema, stats: dict) -> None:
    """Join the shards into ``out/name`` (atomically, stats in its metadata), then drop them."""
    tables = [t.select(schema.names).cast(schema) for t, _ in results]
    write_table_atomic(pa.concat_tables(tables) if tables else schema.empty_table(), out / name, stats)
    shutil.rmtree(out / "shards", ignore_errors=True)


def samples_per_prompt(generator) -> int:
    """The generator's ``n`` param (samples per prompt), 1 when it has none."""
    n = getattr(generator.params, "n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ProfuserError(f"n must be a whole number >= 1, not {n!r}", where=f"generator {generator.name}")
    return n


def read_samples(path: Path, ids: list[str] | None = None) -> dict[str, list[str]]:
    """id -> every sample of a ``generations.parquet`` (``[response]`` when it has one per prompt)."""
    names = pq.read_schema(path).names
    column = "responses" if "responses" in names else "response"
    table = pq.read_table(path, columns=["id", column])
    values = table[column].to_pylist()
    return dict(zip(table["id"].to_pylist(), values if column == "responses" else [[v] for v in values]))


def run(ctx) -> dict:
    from ..models import as_spec, load_tokenizer

    cfg = ctx.config
    spec = as_spec(cfg["model"])
    records = read_records(ctx.inputs["data"] / "train.parquet")
    ids = [r.id for r in records]
    final = ctx.out / OUTPUT
    if final.is_file() and pq.read_table(final, columns=["id"])["id"].to_pylist() == ids:
        return table_stats(final)  # finished before a kill that came ahead of the commit

    generator = ctx.build("generators", cfg["generator"])
    tokenizer = load_tokenizer(spec, cache_dir=ctx.runtime.cache_dir)
    prompts = [Prompt(r.id, r.system, r.instruction) for r in records]
    shard_size = int(getattr(generator, "shard_size", SHARD_SIZE))

    n = samples_per_prompt(generator)

    def compute(index: int, rows: slice):
        chunk = prompts[rows]
        started = time.perf_counter()
        responses = generator.generate(spec, chunk, seed=shard_seed(cfg["seed"], index))
        seconds = time.perf_counter() - started
        where = f"generator {cfg['generator']['name']} on {spec.key}"
        if n == 1 and (len(responses) != len(chunk) or not all(isinstance(r, str) for r in responses)):
            raise ProfuserError(f"returned {len(responses)} responses for {len(chunk)} prompts (shard {index})", where=where)
        if n > 1 and (len(responses) != len(chunk) or not all(
                isinstance(r, (list, tuple)) and len(r) == n and all(isinstance(x, str) for x in r) for r in responses)):
            raise ProfuserError(f"n is {n}: must return a list of {n} responses for each of the {len(chunk)} prompts "
                                f"(shard {index})", where=where)
        texts = [x for r in responses for x in r] if n > 1 else responses
        tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in texts]
        stats = {"examples": len(chunk), "new_tokens": sum(tokens), "seconds": seconds,
                 "empty": sum(not r.strip() for r in texts)}
        ctx.log_metrics(index, {**stats, "tokens_per_s": stats["new_tokens"] / max(seconds, 1e-9)})
        columns = {"id": [q.id for q in chunk], "response": [r[0] for r in responses] if n > 1 else responses}
        if n > 1:
            columns["responses"] = pa.array([list(r) for r in responses], pa.list_(pa.string()))
        return pa.table(columns), stats

    try:
        results = run_shards(ctx.out, ids, shard_size, compute, split=generator.data_parallel)
    finally:  # engines that keep GPU memory (vLLM) shut down before the next stage loads a model
        if callable(close := getattr(generator, "close", None)):
            close()
    if results is None:  # another rank than 0: rank 0 joins the shards
        return {}
    totals = {k: sum(s.get(k, 0) for _, s in results) for k in ("examples", "new_tokens", "seconds", "empty")}
    metrics = {
        "model": spec.key,
        "examples": len(ids),
        "new_tokens": totals["new_tokens"],
        "generation_seconds": round(totals["seconds"], 3),
        "tokens_per_s": round(totals["new_tokens"] / totals["seconds"], 2) if totals["seconds"] else 0.0,
        "mean_new_tokens": round(totals["new_tokens"] / (totals["examples"] * n), 2) if totals["examples"] else 0.0,
        "empty_responses": totals["empty"],
    }
    if n > 1:
        metrics["samples_per_prompt"] = n
    fields = [("id", pa.string()), ("response", pa.string())] + ([("responses", pa.list_(pa.string()))] if n > 1 else [])
    finish(ctx.out, OUTPUT, results, pa.schema(fields), metrics)
    return metrics
