"""Top-k logits store: what a source model predicted at every response token.

Per example and per response token it keeps the NLL of the actual token (natural log, T = 1),
the top-k raw logits (float16) with their int32 vocabulary ids, and the log-partition
``logz = logsumexp(all logits)`` at T = 1 — enough to rebuild the top-k distribution at any
temperature or top-p without re-running the model (App. A; ``profuser.teacher`` does that).
Each example also keeps its response text, its token ids and their character offsets in the
response, which the aligners need.

Format: shards ``shard-NNNNN.arrow`` in the Arrow IPC *file* format, one row per example, list
columns over the example's tokens. Why Arrow IPC and not parquet: a shard is memory-mapped and a
record batch is located through the file footer, so a reader decodes only the batch it needs and
hands out numpy views of Arrow buffers (never Python lists); without compression the views point
straight into the mapped file (true zero copy). Buffers are zstd-compressed by default, because
the raw layout is ~80 bytes per token at k = 10 (ids 40 + logits 20 + nll/logz 8 + token id 4 +
offsets 8) and zstd brings it under the 64-byte budget (see docs/benchmarks.md); decompression
then happens once per record batch into Arrow's memory pool, from a positional read of that
batch alone (a compressed shard is not memory-mapped: touched pages of a map stay in the
process's RSS, ~7 kB per example read). ``compression=None`` trades disk for zero-copy reads
(mapped: the pages a scan touches count in RSS until the kernel needs them back).

Writes are resumable: a shard is written to a temporary name and renamed when complete, so after
a kill the stage reopens the writer, skips the ids of finished shards and recomputes the rest.
``close()`` writes ``nll.parquet`` (id, nll_sum, n_tokens, n_bytes, truncated), the per-example
summary the Min-CE evaluator reads, and ``store.json`` (top-k, counts, sizes).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc

from .components import SourceNLL
from .errors import ArtifactError, ModelError, ProfuserError

FORMAT_VERSION = "1"
SHARD_GLOB = "shard-*.arrow"
NLL_TABLE = "nll.parquet"
SUMMARY = "store.json"
FLOAT16_MAX = float(np.finfo(np.float16).max)


def _schema(top_k: int, *, model: str, compression: str | None) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("response", pa.string()),
            ("nll_sum", pa.float64()),  # sum of `nll`, accumulated in float64
            ("n_tokens", pa.int32()),
            ("n_bytes", pa.int64()),  # UTF-8 bytes of the response the tokens cover
            ("truncated", pa.int32()),  # response tokens dropped by max_length
            ("token_ids", pa.list_(pa.int32())),  # [n]
            ("offsets", pa.list_(pa.list_(pa.int32(), 2))),  # [n, 2] char offsets in `response`
            ("nll", pa.list_(pa.float32())),  # [n]
            ("logz", pa.list_(pa.float32())),  # [n]
            ("topk_ids", pa.list_(pa.list_(pa.int32(), top_k))),  # [n, k]
            ("topk_logits", pa.list_(pa.list_(pa.float16(), top_k))),  # [n, k], descending
        ],
        metadata={
            "profuser.logits_store": FORMAT_VERSION,
            "top_k": str(top_k),
            "model": model,
            "compression": compression or "none",
        },
    )


@dataclass
class LogitsExample:
    """One example's stored predictions. Arrays are read-only views of the shard's buffers."""

    id: str
    response: str
    token_ids: np.ndarray  # [n] int32
    offsets: np.ndarray  # [n, 2] int32, char offsets of each token in `response`
    nll: np.ndarray  # [n] float32, -log p(token) at T = 1
    topk_ids: np.ndarray  # [n, k] int32
    topk_logits: np.ndarray  # [n, k] float16, raw logits, descending
    logz: np.ndarray  # [n] float32, logsumexp of the full logits at T = 1

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


# --- writing ------------------------------------------------------------------------------------


class LogitsWriter:
    """Buffers examples and writes them as shards of about ``shard_tokens`` tokens.

    ``model`` names the source in error messages. Ids already stored in finished shards of
    ``out_dir`` (an earlier, killed attempt) are in ``done_ids``; callers skip them. Several
    processes may write into one ``out_dir`` with distinct ``part`` suffixes (``-r1``: the shards
    of rank 1); one of them calls ``close()`` once every shard is there.
    Use as a context manager, or call ``close()``: a with-block that fails still writes the
    complete examples it buffered, so that a rerun resumes after them.
    """

    def __init__(self, out_dir: str | Path, top_k: int, *, model: str = "model", compression: str | None = "zstd",
                 shard_tokens: int = 1 << 16, batch_tokens: int = 4096, part: str = ""):
        if top_k <= 0:
            raise ProfuserError(f"top_k must be positive, got {top_k}", where=f"model {model}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.top_k = top_k
        self.model = model
        self.compression = compression
        self.shard_tokens = shard_tokens
        self.batch_tokens = batch_tokens
        self.schema = _schema(top_k, model=model, compression=compression)
        self._rows: list[dict] = []
        self._pending_tokens = 0
        self._closed = False
        self.part = part
        for stale in self.out_dir.glob(f".shard-*{part}.arrow.tmp*"):  # a shard a killed run did not finish
            stale.unlink()
        self.done_ids: set[str] = set()
        self._scanned: set[str] = set()
        self.rescan()
        # names are shard-NNNNN.arrow or shard-NNNNN-rR.arrow
        self._next_shard = 1 + max((int(name.removesuffix(".arrow").split("-")[1]) for name in self._scanned), default=-1)

    def rescan(self) -> None:
        """Add the ids of shards that appeared since the last scan (other processes' shards) to
        ``done_ids``."""
        for shard in sorted(self.out_dir.glob(SHARD_GLOB)):
            if shard.name in self._scanned:
                continue
            schema, ids = _shard_ids(shard)
            stored_k = int(schema.metadata.get(b"top_k", b"0"))
            if stored_k != self.top_k:
                raise ArtifactError(f"shard {shard.name} holds top-{stored_k} logits, this run stores top-{self.top_k}",
                                    where=str(self.out_dir))
            self._scanned.add(shard.name)
            self.done_ids.update(ids)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.done_ids

    def add(self, example_id: str, response: str, token_ids, offsets, nll, topk_ids, topk_logits, logz,
            *, truncated: int = 0) -> None:
        """Store one example: arrays over its n response tokens (see ``LogitsExample``)."""
        if self._closed:
            raise ProfuserError("add() after close()", where=f"model {self.model}")
        where = f"model {self.model}"
        if example_id in self.done_ids:
            raise ProfuserError(f"example {example_id!r} is already stored", where=where)
        token_ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        n = len(token_ids)
        offsets = np.asarray(offsets, dtype=np.int32)
        nll = np.asarray(nll, dtype=np.float32)
        logz = np.asarray(logz, dtype=np.float32)
        topk_ids = np.asarray(topk_ids, dtype=np.int32)
        topk_logits = np.asarray(topk_logits, dtype=np.float32)
        k = self.top_k
        shapes = {"offsets": (offsets, (n, 2)), "nll": (nll, (n,)), "logz": (logz, (n,)),
                  "topk_ids": (topk_ids, (n, k)), "topk_logits": (topk_logits, (n, k))}
        for name, (array, shape) in shapes.items():
            if array.shape != shape:
                raise ProfuserError(f"example {example_id!r}: {name} has shape {array.shape}, expected {shape} "
                                    f"({n} tokens, top-{k})", where=where)
        # NaN/inf mean the model computed garbage (fp16 overflow, broken weights): never store it.
        # -inf is allowed among the top-k logits only (a vocabulary with fewer than k live tokens).
        for name, array in (("nll", nll), ("logz", logz)):
            if not np.isfinite(array).all():
                bad = int(np.flatnonzero(~np.isfinite(array))[0])
                raise ModelError(f"example {example_id!r}: non-finite {name} ({array[bad]}) at response token {bad}; "
                                 "the model's logits contain NaN/inf", where=where)
        bad_logits = np.isnan(topk_logits) | (topk_logits == np.inf)
        if bad_logits.any():
            row = int(np.flatnonzero(bad_logits.any(axis=1))[0])
            raise ModelError(f"example {example_id!r}: NaN/inf among the top-{k} logits at response token {row}", where=where)
        if (np.abs(topk_logits[np.isfinite(topk_logits)]) > FLOAT16_MAX).any():
            raise ModelError(f"example {example_id!r}: a logit exceeds the float16 range (±{FLOAT16_MAX:g}) the store uses",
                             where=where)
        if n and (offsets.min() < 0 or offsets.max() > len(response)):
            raise ProfuserError(f"example {example_id!r}: token offsets fall outside the response "
                                f"({len(response)} characters)", where=where)
        # bytes of what the tokens cover: the whole response, or the prefix that survived truncation
        covered = response if not truncated else response[: int(offsets[:, 1].max()) if n else 0]
        self._rows.append({
            "id": example_id, "response": response, "nll_sum": float(nll.sum(dtype=np.float64)), "n_tokens": n,
            "n_bytes": len(covered.encode("utf-8")), "truncated": int(truncated),
            "token_ids": token_ids, "offsets": offsets, "nll": nll, "logz": logz,
            "topk_ids": topk_ids, "topk_logits": topk_logits.astype(np.float16),
        })
        self.done_ids.add(example_id)
        self._pending_tokens += n
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        """Write the buffered examples as one shard (temporary name, then an atomic rename)."""
        if not self._rows:
            return
        name = f"shard-{self._next_shard:05d}{self.part}.arrow"
        final = self.out_dir / name
        tmp = self.out_dir / f".{name}.tmp{os.getpid()}"
        options = ipc.IpcWriteOptions(compression=self.compression)
        with ipc.new_file(str(tmp), self.schema, options=options) as sink:
            for group in _groups(self._rows, self.batch_tokens):
                sink.write_batch(_record_batch(group, self.schema, self.top_k))
        os.replace(tmp, final)
        self._scanned.add(name)
        self._next_shard += 1
        self._rows = []
        self._pending_tokens = 0

    def close(self) -> dict:
        """Flush, then write ``nll.parquet`` and ``store.json``; returns the summary."""
        if self._closed:
            return json.loads((self.out_dir / SUMMARY).read_text())
        self.flush()
        self._closed = True
        shards = sorted(self.out_dir.glob(SHARD_GLOB))
        parts = [_read_columns(s, ["id", "nll_sum", "n_tokens", "n_bytes", "truncated"]) for s in shards]
        table = pa.concat_tables(parts) if parts else pa.table(
            {"id": pa.array([], pa.string()), "nll_sum": pa.array([], pa.float64()), "n_tokens": pa.array([], pa.int32()),
             "n_bytes": pa.array([], pa.int64()), "truncated": pa.array([], pa.int32())})
        tmp = self.out_dir / f".{NLL_TABLE}.tmp{os.getpid()}"
        pq.write_table(table, tmp)
        os.replace(tmp, self.out_dir / NLL_TABLE)
        n_tokens = int(table["n_tokens"].to_numpy().sum())
        shard_bytes = sum(s.stat().st_size for s in shards)
        summary = {
            "format": FORMAT_VERSION, "model": self.model, "top_k": self.top_k, "compression": self.compression or "none",
            "examples": table.num_rows, "tokens": n_tokens, "shards": len(shards), "shard_bytes": shard_bytes,
            "bytes_per_token": shard_bytes / n_tokens if n_tokens else 0.0,
        }
        tmp = self.out_dir / f".{SUMMARY}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
        os.replace(tmp, self.out_dir / SUMMARY)
        return summary

    def __enter__(self) -> LogitsWriter:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the complete examples for the rerun; no summary for an unfinished store
            self.flush()


def _groups(rows: list[dict], batch_tokens: int) -> Iterator[list[dict]]:
    """Consecutive rows in record batches of about ``batch_tokens`` tokens (the unit a reader decodes)."""
    group: list[dict] = []
    tokens = 0
    for row in rows:
        group.append(row)
        tokens += row["n_tokens"]
        if tokens >= batch_tokens:
            yield group
            group, tokens = [], 0
    if group:
        yield group


def _list_column(arrays: list[np.ndarray], value_type: pa.DataType, width: int | None) -> pa.Array:
    """A list<T> (width None) or list<fixed_size_list<T, width>> column from per-row numpy arrays."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    values = pa.array(flat, type=value_type)
    if width is not None:
        values = pa.FixedSizeListArray.from_arrays(values, width)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _record_batch(rows: list[dict], schema: pa.Schema, top_k: int) -> pa.RecordBatch:
    column = lambda name: [r[name] for r in rows]
    return pa.RecordBatch.from_arrays([
        pa.array(column("id"), pa.string()),
        pa.array(column("response"), pa.string()),
        pa.array(column("nll_sum"), pa.float64()),
        pa.array(column("n_tokens"), pa.int32()),
        pa.array(column("n_bytes"), pa.int64()),
        pa.array(column("truncated"), pa.int32()),
        _list_column(column("token_ids"), pa.int32(), None),
        _list_column(column("offsets"), pa.int32(), 2),
        _list_column(column("nll"), pa.float32(), None),
        _list_column(column("logz"), pa.float32(), None),
        _list_column(column("topk_ids"), pa.int32(), top_k),
        _list_column(column("topk_logits"), pa.float16(), top_k),
    ], schema=schema)


def _open(path: Path, fields: list[int] | None = None, *, mapped: bool = True) -> ipc.RecordBatchFileReader:
    """``mapped=False`` reads with positional reads instead of a memory map: the pages of a
    mapped file stay resident (and in the process's RSS) once touched, so a scan of a compressed
    store, where mapping saves no copy, would grow by the store's size."""
    try:
        source = pa.memory_map(str(path), "r") if mapped else pa.OSFile(str(path), "rb")
        return ipc.open_file(source, options=ipc.IpcReadOptions(included_fields=fields))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"unreadable logits shard {path.name}: {exc}", where=str(path.parent)) from None


def _read_columns(path: Path, names: list[str]) -> pa.Table:
    """Only the named columns of a shard (others are not decompressed)."""
    reader = _open(path)
    fields = [reader.schema.get_field_index(n) for n in names]
    return _open(path, fields).read_all()


def _shard_ids(path: Path) -> tuple[pa.Schema, list[str]]:
    reader = _open(path)
    if reader.schema.metadata is None or b"profuser.logits_store" not in reader.schema.metadata:
        raise ArtifactError(f"{path.name} is not a profuser logits shard", where=str(path.parent))
    return reader.schema, _read_columns(path, ["id"])["id"].to_pylist()


# --- reading ------------------------------------------------------------------------------------


def _np(array: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a primitive Arrow array without nulls."""
    return array.to_numpy(zero_copy_only=True)


class _Batch:
    """Numpy views over one decoded record batch: flat token arrays + per-row token offsets."""

    def __init__(self, batch: pa.RecordBatch, top_k: int):
        self.ids = batch.column("id")
        self.responses = batch.column("response")
        token_ids = batch.column("token_ids")
        self.starts = _np(token_ids.offsets)  # [rows + 1] into the flat token arrays
        base = int(self.starts[0])
        self.starts = self.starts - base if base else self.starts
        self.token_ids = _np(token_ids.flatten())
        self.offsets = self._fixed(batch.column("offsets"), 2)
        self.nll = _np(batch.column("nll").flatten())
        self.logz = _np(batch.column("logz").flatten())
        self.topk_ids = self._fixed(batch.column("topk_ids"), top_k)
        self.topk_logits = self._fixed(batch.column("topk_logits"), top_k)

    @staticmethod
    def _fixed(column: pa.ListArray, width: int) -> np.ndarray:
        return _np(column.flatten().flatten()).reshape(-1, width)  # [tokens, width]

    def example(self, row: int) -> LogitsExample:
        a, b = int(self.starts[row]), int(self.starts[row + 1])
        return LogitsExample(
            id=self.ids[row].as_py(), response=self.responses[row].as_py(),
            token_ids=self.token_ids[a:b], offsets=self.offsets[a:b], nll=self.nll[a:b],
            topk_ids=self.topk_ids[a:b], topk_logits=self.topk_logits[a:b], logz=self.logz[a:b],
        )


class LogitsReader:
    """Read a store written by ``LogitsWriter`` (an artifact directory of shards).

    ``get(id)`` decodes the record batch holding the example and returns numpy views of it (the
    last ``cache_batches`` batches, ~4k tokens each, stay decoded); iterating reads every batch
    once, in storage order.
    """

    def __init__(self, path: str | Path, cache_batches: int = 16):
        self.path = Path(path)
        self._shards = sorted(self.path.glob(SHARD_GLOB))
        self.compression = "none"
        self.model = ""
        top_ks = set()
        if not self._shards:  # legitimate when a source won no example; store.json says so
            try:
                summary = json.loads((self.path / SUMMARY).read_text())
            except (OSError, json.JSONDecodeError):
                raise ArtifactError("no logits shards (shard-*.arrow) and no store.json here", where=str(self.path)) from None
            top_ks.add(int(summary["top_k"]))
            self.model = summary.get("model", "")
        self._readers: list[ipc.RecordBatchFileReader] = []
        self._where: dict[str, tuple[int, int, int]] = {}  # id -> (shard, batch, row)
        self.ids: list[str] = []
        for s, shard in enumerate(self._shards):
            reader = _open(shard)
            meta = reader.schema.metadata or {}
            if b"profuser.logits_store" not in meta:
                raise ArtifactError(f"{shard.name} is not a profuser logits shard", where=str(self.path))
            top_ks.add(int(meta[b"top_k"]))
            self.compression = meta.get(b"compression", b"none").decode()
            self.model = meta.get(b"model", b"").decode()
            # a compressed batch is decoded into new memory anyway: read it, do not map it
            self._readers.append(reader if self.compression == "none" else _open(shard, mapped=False))
            ids_only = _open(shard, [reader.schema.get_field_index("id")])
            for b in range(ids_only.num_record_batches):
                for r, example_id in enumerate(ids_only.get_batch(b).column(0).to_pylist()):
                    if example_id in self._where:
                        raise ArtifactError(f"example {example_id!r} is stored twice", where=str(self.path))
                    self._where[example_id] = (s, b, r)
                    self.ids.append(example_id)
        if len(top_ks) != 1:
            raise ArtifactError(f"shards disagree on top-k: {sorted(top_ks)}", where=str(self.path))
        self.top_k: int = top_ks.pop()
        self._cache: OrderedDict[tuple[int, int], _Batch] = OrderedDict()
        self._cache_batches = cache_batches

    def __reduce__(self):
        # memory maps do not pickle: a worker process (DataLoader, multiprocessing) reopens the store
        return (type(self), (self.path, self._cache_batches))

    @property
    def zero_copy(self) -> bool:
        """Whether arrays point into the memory-mapped files (uncompressed shards) rather than decoded copies."""
        return self.compression == "none"

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._where

    def _batch(self, shard: int, batch: int) -> _Batch:
        key = (shard, batch)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        decoded = _Batch(self._readers[shard].get_batch(batch), self.top_k)
        self._cache[key] = decoded
        if len(self._cache) > self._cache_batches:
            self._cache.popitem(last=False)
        return decoded

    def position(self, example_id: str) -> tuple[int, int, int]:
        """(shard, record batch, row) of a stored example: reading ids sorted by it decodes each
        batch once."""
        try:
            return self._where[example_id]
        except KeyError:
            raise ArtifactError(f"example {example_id!r} is not in the logits store", where=str(self.path)) from None

    def get(self, example_id: str) -> LogitsExample:
        try:
            shard, batch, row = self._where[example_id]
        except KeyError:
            raise ArtifactError(f"example {example_id!r} is not in the logits store", where=str(self.path)) from None
        return self._batch(shard, batch).example(row)

    def __iter__(self) -> Iterator[LogitsExample]:
        for s, reader in enumerate(self._readers):
            for b in range(reader.num_record_batches):
                decoded = _Batch(reader.get_batch(b), self.top_k)  # not cached: a scan would evict everything
                for row in range(len(decoded.ids)):
                    yield decoded.example(row)

    def nll_arrow(self) -> pa.Table:
        """id, nll_sum, n_tokens, n_bytes of every stored example, as Arrow columns (compact: ~30
        bytes an example), from ``nll.parquet`` when written."""
        path = self.path / NLL_TABLE
        columns = ["id", "nll_sum", "n_tokens", "n_bytes"]
        if path.is_file():
            return pq.read_table(path, columns=columns)
        if not self._shards:
            return pa.table({"id": pa.array([], pa.string()), "nll_sum": pa.array([], pa.float64()),
                             "n_tokens": pa.array([], pa.int32()), "n_bytes": pa.array([], pa.int64())})
        return pa.concat_tables(_read_columns(s, columns) for s in self._shards)

    def nll_table(self) -> dict[str, SourceNLL]:
        """id -> the source's total NLL of the stored response (from ``nll.parquet`` when written)."""
        table = self.nll_arrow()
        return {i: SourceNLL(nll_sum=s, n_tokens=t, n_bytes=b) for i, s, t, b in zip(
            table["id"].to_pylist(), table["nll_sum"].to_pylist(), table["n_tokens"].to_pylist(), table["n_bytes"].to_pylist())}
