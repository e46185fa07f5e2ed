"""Artifact I/O that several stages share: streamed reads of parquet files, list columns, atomic
table writes with their stats, shards split across the ranks of a launch, selection reads, and
the ignore index.

Stages import from here, never from each other.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError
from .runtime import rank_and_world, wait_until
from .store import temporary_name

IGNORE_INDEX = -100  # a label the loss skips (the prompt's positions), as transformers' losses
# data records per pass, the logits stage's chunk: its stores are sorted by length within such
# chunks, so align reads a chunk's examples from a few consecutive record batches
CHUNK_RECORDS = 512
_STATS_KEY = b"profuser.stats"
T = TypeVar("T")


def list_column(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """A list<T> column from [n_i] arrays, or list<list<T>> from [n_i, k] arrays."""
    nested = bool(arrays) and arrays[0].ndim == 2
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    outer = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=outer[1:])
    if not arrays:
        values = pa.array([], type=value_type)
    else:
        values = pa.array(np.concatenate([a.reshape(-1) for a in arrays]), type=value_type)
    if nested:
        k = arrays[0].shape[1]
        inner = np.arange(0, int(lengths.sum()) * k + 1, k, dtype=np.int32)
        values = pa.ListArray.from_arrays(pa.array(inner), values)
    return pa.ListArray.from_arrays(pa.array(outer), values)


def iter_records(path, columns: list[str], batch_rows: int = 1024) -> Iterator[dict]:
    """The rows of a parquet file (``columns`` of them) as dicts, streamed: buffered reads of a
    few pages at a time, so a file of one large row group (as the data stage writes) is never
    held whole (pre-buffering, pyarrow's default, reads whole column chunks: 100k records of
    2 kB held 0.36 GB peak with it, 0.15 GB without, the same as 10k)."""
    try:
        source = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"unreadable: {exc}", where=str(path)) from None
    missing = [c for c in columns if c not in source.schema_arrow.names]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}", where=str(path))
    for batch in source.iter_batches(batch_size=batch_rows, columns=columns):
        yield from batch.to_pylist()


def iter_chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_table_atomic(table: pa.Table, path: Path, stats: dict[str, Any] | None = None) -> None:
    """Write a parquet file so that it is complete or absent (a kill never leaves half of it);
    ``stats`` go into the file's metadata."""
    if stats is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), _STATS_KEY: json.dumps(stats).encode()})
    tmp = temporary_name(path)
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


def read_samples(path: Path, ids: list[str] | None = None) -> dict[str, list[str]]:
    """id -> every sample of a ``generations.parquet`` (``[response]`` when it has one per prompt)."""
    names = pq.read_schema(path).names
    column = "responses" if "responses" in names else "response"
    table = pq.read_table(path, columns=["id", column])
    values = table[column].to_pylist()
    return dict(zip(table["id"].to_pylist(), values if column == "responses" else [[v] for v in values]))


SELECTION_FILE = "selection.parquet"  # what a select stage writes


@dataclass(frozen=True)
class Selected:
    """One example's row of a ``selection.parquet``."""

    chosen: str  # the advantaged source's key
    sample: int = 0  # which of its samples won (n > 1 samples per prompt; else 0)
    # with ``scores=True`` (JSON decoded; None where the file has no such column):
    scores: dict[str, Any] | None = None  # the evaluator's own scores per source
    detail: dict[str, Any] | None = None
    rm_scores: dict[str, dict[str, float]] | None = None  # {rm: {source: raw score}}, strongest first


def read_selection(path: Path, *, scores: bool = False) -> dict[str, Selected]:
    """id -> ``Selected`` of a select stage's artifact (its directory, or the file itself), in the
    file's order (the data's). The score columns are read and decoded only with ``scores``."""
    path = Path(path)
    if path.is_dir():
        path = path / SELECTION_FILE
    if not path.is_file():
        raise DataError("selection file not found", where=str(path))
    names = pq.read_schema(path).names
    columns = ["id", "chosen", *(c for c in ("sample", *(("scores", "detail", "rm_scores") if scores else ()))
                                 if c in names)]
    table = pq.read_table(path, columns=columns)
    ids, chosen = table["id"].to_pylist(), table["chosen"].to_pylist()
    samples = table["sample"].to_pylist() if "sample" in names else [0] * len(ids)
    decoded = {c: [json.loads(v or "{}") for v in table[c].to_pylist()] if c in columns else [None] * len(ids)
               for c in ("scores", "detail", "rm_scores")}
    del table
    return {i: Selected(c, j, s, d, r) for i, c, j, s, d, r in
            zip(ids, chosen, samples, decoded["scores"], decoded["detail"], decoded["rm_scores"])}
