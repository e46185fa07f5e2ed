"""The trainer's data: the build stage's ``examples.arrow`` files, the seeded order of each phase,
and micro-batches padded into the tensors a ``Loss`` reads.

Every example is addressed by a global row number (the modes' files laid end to end). A phase
draws units (``Phase.draws``): instructions, each with every part's example of its id (both
modes in a co-fusion phase, as Eq. 5 sums them), or single examples (the per-mode ablation); its
epochs and the global batch count units. A phase's order is the curriculum's ``order_examples``
per epoch over the units (by default a fresh permutation) given an rng seeded by ``(seed, phase
index, epoch)`` only, so it is the same on every rank, for every world size and after a resume:
the trainer needs nothing but ``(phase, step)`` to know which examples come next.

Extra columns a loss asks for (``Loss.needs``): ``source``, ``category`` and ``teacher_logz`` are
read from the file (the build stage writes the last two only for such a loss), and so are the four
``all_teacher_*`` columns of ``all_teachers``; ``example_id`` and ``mode`` are known anyway.

Each example's statistics (``STATS_SCHEMA``, build since version 3) are read in the same pass as
the ids and kept as columns; curricula get them as ``ExampleStats`` (``CurriculumInput.stats``,
``PhaseExamples.stats``). A file without them gives the label count as ``response_length`` and
NaN / empty values for the rest.

Memory stays flat however many examples there are: a file is read one chunk at a time (an Arrow
IPC record batch, one example each as the build stage writes them; or a parquet row group), never
whole. Loading keeps per example only its id, GT length and whether it has a label to train on; a
micro-batch reads just the chunks of its rows. Reads go through ordinary file reads, not a memory
map: mapped pages a pass has touched stay in the process's resident set, read buffers are freed.

Teacher rows: the build stage stores them at labelled positions only (``len(teacher_mask)`` = the
number of labels other than -100); a file with a row at every position (``len(teacher_mask)`` = L,
the layout of build before version 2 and of hand-written files) is read too. ``collate`` expands
both into the same [b, T, k] tensors, the prompt positions empty (id 0, logit -inf, mask False).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pyarrow import ipc

from ..artifacts import IGNORE_INDEX
from ..components import (
    LOSS_NEEDS,
    MODES,
    Curriculum,
    CurriculumInput,
    Draws,
    ExampleStats,
    Phase,
    PhaseExamples,
)
from ..errors import DataError, ProfuserError

IGNORE = IGNORE_INDEX
SCHEMA = pa.schema([  # the columns the trainer reads, in the types it reads them as
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),  # [L]
    ("labels", pa.list_(pa.int32())),  # [L]
    ("teacher_ids", pa.list_(pa.list_(pa.int32()))),  # [n][k], n = labelled positions (or L)
    ("teacher_logits", pa.list_(pa.list_(pa.float32()))),  # [n][k]
    ("teacher_mask", pa.list_(pa.bool_())),  # [n]
    ("gt_length", pa.int32()),
])
COLUMNS = tuple(SCHEMA.names)
# optional columns, read only when a loss needs them: category at the teacher rows' positions
EXTRA_SCHEMA = pa.schema([("source", pa.string()), ("category", pa.list_(pa.int8())),
                          ("teacher_logz", pa.list_(pa.float32()))])
FILE_NEEDS = tuple(EXTRA_SCHEMA.names)  # the needs that come from the file
# the ``all_teachers`` need's columns, written by build only for such a loss: every source's teacher
# at the teacher rows, [n][S][k] and [n][S] (sources in recipe order), and its scores [S]
ALL_TEACHERS_SCHEMA = pa.schema([
    ("all_teacher_ids", pa.list_(pa.list_(pa.list_(pa.int32())))),  # [n][S][k]
    ("all_teacher_logits", pa.list_(pa.list_(pa.list_(pa.float32())))),  # [n][S][k]
    ("all_teacher_mask", pa.list_(pa.list_(pa.bool_()))),  # [n][S]
    ("all_teacher_scores", pa.list_(pa.float32())),  # [S], NaN where the evaluator gave none
])
OPTIONAL_SCHEMA = pa.schema([*EXTRA_SCHEMA, *ALL_TEACHERS_SCHEMA])
# every example's statistics (build since version 3), what a curriculum sees as ExampleStats: the
# chosen source, the response's target tokens, the teacher's mean entropy and top-1 probability,
# and the selection's scores / rm_scores JSON texts (null where none)
STATS_SCHEMA = pa.schema([("source", pa.string()), ("response_length", pa.int32()), ("teacher_entropy", pa.float32()),
                          ("teacher_top1", pa.float32()), ("scores", pa.string()), ("rm_scores", pa.string())])
NO_CATEGORY = -1
CACHED_CHUNKS = 8  # decoded chunks kept (parquet row groups of hand-written files hold many rows)


class _Chunks:
    """A file of examples read one chunk at a time: an Arrow IPC file's record batches (the build
    stage's ``examples.arrow``) or a parquet file's row groups."""

    def __init__(self, path: Path, extra: tuple[str, ...] = ()):
        self.path = path
        if not path.is_file():
            raise DataError("examples file not found (run the build stage first)", where=str(path))
        try:
            if path.suffix == ".parquet":
                self._parquet = pq.ParquetFile(path)
                self._ipc = None
                schema = self._parquet.schema_arrow
                sizes = [self._parquet.metadata.row_group(i).num_rows for i in range(self._parquet.num_row_groups)]
            else:
                self._parquet = None
                self._ipc = ipc.open_file(pa.OSFile(str(path), "r"))
                schema = self._ipc.schema
                sizes = None
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"unreadable examples file: {exc}", where=str(path)) from None
        missing = [c for c in COLUMNS if c not in schema.names]
        if missing:
            raise DataError(f"missing column(s) {', '.join(missing)} (see docs/architecture.md)", where=str(path))
        lacking = [c for c in extra if c not in schema.names]
        if lacking:
            raise DataError(f"the loss needs column(s) {', '.join(lacking)}, which this examples file lacks (the build "
                            "stage writes them when the recipe's loss declares them in needs)", where=str(path))
        self.columns = COLUMNS + tuple(extra)
        self._schema = pa.schema([*SCHEMA, *(OPTIONAL_SCHEMA.field(c) for c in extra)])
        self._fields = [schema.get_field_index(c) for c in COLUMNS]
        self._file_schema = schema
        self.stats_columns = tuple(c for c in STATS_SCHEMA.names if c in schema.names)  # none before build 3
        if sizes is None:  # IPC: rows per record batch from the batches' headers (ids only decoded)
            ids_only = ipc.open_file(pa.OSFile(str(path), "r"), options=ipc.IpcReadOptions(included_fields=[self._fields[0]]))
            sizes = [ids_only.get_batch(i).num_rows for i in range(ids_only.num_record_batches)]
        self.starts = np.zeros(len(sizes) + 1, dtype=np.int64)  # [chunks + 1] first row of each chunk
        np.cumsum(sizes, out=self.starts[1:])
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def _cast(self, table: pa.Table, columns: tuple[str, ...]) -> pa.Table:
        try:
            return table.select(list(columns)).cast(pa.schema([
                self._schema.field(c) if c in self._schema.names else STATS_SCHEMA.field(c) for c in columns]))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"unexpected column types: {exc}", where=str(self.path)) from None

    def read(self, chunk: int) -> pa.Table:
        """One chunk, every column the trainer reads, in the trainer's types."""
        if chunk in self._cache:
            self._cache.move_to_end(chunk)
            return self._cache[chunk]
        if self._parquet is not None:
            table = self._parquet.read_row_group(chunk, columns=list(self.columns))
        else:
            table = pa.Table.from_batches([self._ipc.get_batch(chunk)])
        table = self._cache[chunk] = self._cast(table, self.columns)
        if len(self._cache) > CACHED_CHUNKS:
            self._cache.popitem(last=False)
        return table

    def scan(self, columns: tuple[str, ...]):
        """Every chunk's ``columns``, in order (the other columns are not read)."""
        if self._parquet is not None:
            for i in range(self._parquet.num_row_groups):
                yield self._cast(self._parquet.read_row_group(i, columns=list(columns)), columns)
            return
        fields = [self._file_schema.get_field_index(c) for c in columns]
        reader = ipc.open_file(pa.OSFile(str(self.path), "r"), options=ipc.IpcReadOptions(included_fields=fields))
        for i in range(reader.num_record_batches):
            yield self._cast(pa.Table.from_batches([reader.get_batch(i)]), columns)


class ExampleSet:
    """The examples of every mode, addressed by global row number; rows are read when collated."""

    def __init__(self, files: dict[str, _Chunks], max_length: int, needs: frozenset[str] = frozenset()):
        unknown = sorted(set(needs) - set(LOSS_NEEDS))
        if unknown:
            raise ProfuserError(f"unknown loss needs {', '.join(unknown)} (valid: {', '.join(LOSS_NEEDS)})")
        self.needs = frozenset(needs)
        self.modes = [m for m in MODES if m in files] + [m for m in files if m not in MODES]
        self.files = {m: files[m] for m in self.modes}
        self.max_length = max_length
        sizes = [files[m].num_rows for m in self.modes]
        self.offsets = dict(zip(self.modes, np.cumsum([0, *sizes[:-1]]).tolist()))  # mode -> first global row
        self.ids: dict[str, pa.Array] = {}
        self.gt_length: dict[str, np.ndarray] = {}
        self.trainable: dict[str, np.ndarray] = {}
        self.stats: dict[str, dict[str, pa.Array]] = {}  # mode -> STATS_SCHEMA column -> [rows]
        for m in self.modes:  # one streamed pass over the small columns; the teacher columns stay on disk
            ids, lengths, trainable, labelled = [], [], [], []
            stats: dict[str, list[pa.Array]] = {c: [] for c in files[m].stats_columns}
            for table in files[m].scan(("id", "labels", "gt_length", *stats)):
                ids.append(table.column("id").combine_chunks())
                lengths.append(table.column("gt_length").to_numpy())
                # an example trains only if a label survives truncation at a predictable position [1, max_length)
                trainable.append(_has_label(table.column("labels"), max_length))
                for c, chunks in stats.items():
                    chunks.append(table.column(c).combine_chunks())
                if "response_length" not in stats:  # a file built before version 3: count the labels
                    values, row, _ = _flat(table.column("labels"))
                    is_label = values.to_numpy(zero_copy_only=False) != IGNORE
                    labelled.append(np.bincount(row[is_label], minlength=table.num_rows).astype(np.int32))
            self.ids[m] = pa.concat_arrays(ids) if ids else pa.array([], pa.string())
            self.gt_length[m] = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
            self.trainable[m] = np.concatenate(trainable) if trainable else np.zeros(0, bool)
            n = len(self.ids[m])
            missing = {"response_length": pa.array(np.concatenate(labelled) if labelled else np.zeros(0, np.int32)),
                       "teacher_entropy": pa.array(np.full(n, np.nan, np.float32)),
                       "teacher_top1": pa.array(np.full(n, np.nan, np.float32))}
            self.stats[m] = {c: pa.concat_arrays(stats[c]) if stats.get(c) else
                             missing.get(c, pa.nulls(n, STATS_SCHEMA.field(c).type)) for c in STATS_SCHEMA.names}

    @classmethod
    def load(cls, paths: dict[str, str | Path], max_length: int, needs: frozenset[str] = frozenset()) -> ExampleSet:
        """``paths``: mode -> ``examples.arrow`` (or a parquet file with the same columns);
        ``needs``: the loss's (``Loss.needs``), the extra entries ``collate`` adds."""
        extra = tuple(c for c in FILE_NEEDS if c in needs)
        if "all_teachers" in needs:
            extra += tuple(ALL_TEACHERS_SCHEMA.names)
        files = {mode: _Chunks(Path(path), extra) for mode, path in paths.items()}
        if not files:
            raise ProfuserError("no examples to train on: the train stage needs build/inference and/or build/training")
        return cls(files, max_length, needs)

    def __len__(self) -> int:
        return sum(f.num_rows for f in self.files.values())

    def curriculum_input(self, target_reward: dict[str, float] | None = None, **batching: int) -> CurriculumInput:
        """Ids of every mode (first seen first) and their GT length; the training mode's length wins,
        as its response is the GT itself."""
        ids: dict[str, None] = {}
        gt_length: dict[str, int] = {}
        for mode in sorted(self.modes, key=lambda m: m != "training"):
            for i, n in zip(self.ids[mode].to_pylist(), self.gt_length[mode].tolist()):
                gt_length.setdefault(i, int(n))
        for mode in self.modes:
            ids.update(dict.fromkeys(self.ids[mode].to_pylist()))
        stats: dict[str, dict[str, ExampleStats]] = {}
        for mode in self.modes:
            every = np.arange(self.files[mode].num_rows) + self.offsets[mode]
            for i, s in zip(self.ids[mode].to_pylist(), self.example_stats(every)):
                stats.setdefault(i, {})[mode] = s
        return CurriculumInput(ids=list(ids), gt_length=gt_length, target_reward=target_reward, stats=stats, **batching)

    def example_stats(self, rows: np.ndarray) -> list[ExampleStats]:
        """The build stage's statistics of each global row (``ExampleStats``)."""
        rows = np.asarray(rows, dtype=np.int64)
        out: list = [None] * len(rows)
        for mode in self.modes:
            start = self.offsets[mode]
            at = np.flatnonzero((rows >= start) & (rows < start + self.files[mode].num_rows))
            if not len(at):
                continue
            local = pa.array(rows[at] - start)
            columns = [self.stats[mode][c].take(local).to_pylist() for c in STATS_SCHEMA.names]
            for j, (source, length, entropy, top1, scores, rm_scores) in zip(at.tolist(), zip(*columns)):
                out[j] = ExampleStats(source=source or "", response_length=int(length),
                                      teacher_entropy=float(entropy), teacher_top1=float(top1),
                                      scores=_json_dict(scores, "scores", self.files[mode].path),
                                      rm_scores=_json_dict(rm_scores, "rm_scores", self.files[mode].path))
        return out

    def rows(self, mode: str, ids: list[str] | None = None) -> np.ndarray:
        """Global rows of ``mode`` (all, or those whose id is in ``ids``) that have a label to train on."""
        if mode not in self.files:
            raise ProfuserError(f"the curriculum uses {mode}-mode examples, but none were built (missing build/{mode})")
        keep = self.trainable[mode].copy()
        if ids is not None:
            keep &= pc.is_in(self.ids[mode], value_set=pa.array(list(ids), pa.string())).to_numpy(zero_copy_only=False)
        return np.flatnonzero(keep) + self.offsets[mode]

    def locate(self, row: int) -> tuple[str, int]:
        for mode in reversed(self.modes):
            if row >= self.offsets[mode]:
                return mode, row - self.offsets[mode]
        raise IndexError(row)

    def example_id(self, row: int) -> str:
        mode, i = self.locate(int(row))
        return self.ids[mode][i].as_py()

    def describe(self, rows: np.ndarray) -> tuple[list[str], list[str], list[int]]:
        """Id, mode and GT length of each global row (vectorised per mode: a phase may hold many)."""
        ids: list = [None] * len(rows)
        modes: list = [None] * len(rows)
        lengths = np.zeros(len(rows), dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        for mode in self.modes:
            start = self.offsets[mode]
            at = np.flatnonzero((rows >= start) & (rows < start + self.files[mode].num_rows))
            local = rows[at] - start
            for j, i in zip(at.tolist(), self.ids[mode].take(pa.array(local)).to_pylist()):
                ids[j] = i
                modes[j] = mode
            lengths[at] = self.gt_length[mode][local]
        return ids, modes, lengths.tolist()

    def _take(self, located: list[tuple[str, int]]) -> pa.Table:
        """The rows (mode, local row), in this order, read chunk by chunk."""
        parts, order = [], []
        for mode in self.modes:
            file = self.files[mode]
            local = [(j, i) for j, (m, i) in enumerate(located) if m == mode]
            chunks = np.searchsorted(file.starts, [i for _, i in local], side="right") - 1
            for c in np.unique(chunks):  # one read per chunk
                picked = [(j, i) for (j, i), ch in zip(local, chunks) if ch == c]
                parts.append(file.read(int(c)).take([i - int(file.starts[c]) for _, i in picked]))
                order.extend(j for j, _ in picked)
        return pa.concat_tables(parts).take(np.argsort(order))

    def collate(self, rows: np.ndarray, weights: np.ndarray, pad_id: int, *, packed: bool = False) -> dict:
        """Micro-batch of ``rows`` right-padded to its longest example (at most ``max_length``).

        Tensors (b examples, T positions, k teacher slots), indexed like ``input_ids`` (unshifted):
        input_ids, attention_mask, labels [b, T] int64; teacher_ids [b, T, k] int64; teacher_logits
        [b, T, k] float32 (-inf unused); teacher_mask [b, T] bool; weight [b] float32. Also ``ids``
        and ``modes`` (lists) for logging, and what the loss needs (``LOSS_NEEDS``).

        ``packed`` (``train.packing``): the same examples laid end to end in R <= b rows (``pack``)."""
        located = [self.locate(int(r)) for r in rows]
        table = self._take(located)

        lengths = np.minimum(pc.list_value_length(table.column("input_ids")).to_numpy(), self.max_length)
        b, t = len(rows), int(lengths.max())
        input_ids = _pad2(table.column("input_ids"), t, pad_id, np.int64)
        labels = _pad2(table.column("labels"), t, IGNORE, np.int64)
        position = _teacher_positions(table, [self.files[m].path for m, _ in located])  # [teacher rows]
        teacher_mask = _pad2(table.column("teacher_mask"), t, False, np.bool_, position)
        teacher_ids = _pad3(table.column("teacher_ids"), t, 0, np.int64, position)
        teacher_logits = _pad3(table.column("teacher_logits"), t, -np.inf, np.float32, position)
        attention_mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)  # [b, T]
        assert input_ids.shape == (b, t) and teacher_ids.shape[:2] == (b, t)
        extra: dict = {}
        if "example_id" in self.needs:
            extra["example_id"] = table.column("id").to_pylist()
        if "mode" in self.needs:
            extra["mode"] = [m for m, _ in located]
        if "source" in self.needs:
            extra["source"] = table.column("source").to_pylist()
        if "category" in self.needs:  # stored like the teacher rows, so it goes to the same positions
            extra["category"] = torch.from_numpy(_pad2(table.column("category"), t, NO_CATEGORY, np.int64, position))
        if "teacher_logz" in self.needs:
            extra["teacher_logz"] = torch.from_numpy(_pad2(table.column("teacher_logz"), t, np.nan, np.float32, position))
        if "all_teachers" in self.needs:
            extra.update(_all_teachers(table, t, position, [self.files[m].path for m, _ in located]))
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "teacher_ids": torch.from_numpy(teacher_ids),
            "teacher_logits": torch.from_numpy(teacher_logits),
            "teacher_mask": torch.from_numpy(teacher_mask),
            "weight": torch.as_tensor(weights, dtype=torch.float32),
            "ids": table.column("id").to_pylist(),
            "modes": [m for m, _ in located],
            **extra,
        }
        return pack(batch, pad_id) if packed else batch


# --- packing (train.packing) -------------------------------------------------------------------

# a packed row's tail (after its last example): what each per-position entry holds there, as on
# an unpacked batch's padding; ``input_ids`` takes the batch's own pad id
PACK_FILL = {"attention_mask": 0, "labels": IGNORE, "teacher_ids": 0, "teacher_logits": -math.inf,
             "teacher_mask": False, "category": NO_CATEGORY, "teacher_logz": math.nan, "all_teacher_ids": 0,
             "all_teacher_logits": -math.inf, "all_teacher_mask": False}


def pack_rows(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(row, offset)`` of each example laid end to end: first-fit decreasing into rows as long as
    the longest example, so a packed batch never holds more positions (nor a row longer) than the
    padded one; ties keep their order, so the layout depends on the lengths only."""
    lengths = np.asarray(lengths, dtype=np.int64)
    capacity = int(lengths.max()) if len(lengths) else 0
    row = np.zeros(len(lengths), np.int64)
    offset = np.zeros(len(lengths), np.int64)
    fill: list[int] = []
    for e in np.argsort(-lengths, kind="stable").tolist():
        r = next((r for r, used in enumerate(fill) if used + lengths[e] <= capacity), len(fill))
        if r == len(fill):
            fill.append(0)
        row[e], offset[e] = r, fill[r]
        fill[r] += int(lengths[e])
    return row, offset


def pack(batch: dict, pad_id: int) -> dict:
    """A padded micro-batch (``collate``) with its examples laid end to end in R rows of T positions.

    Per-position entries ([b, T, ...]: ``input_ids``, ``labels``, the teacher's, ``category``,
    ``teacher_logz``, the ``all_teachers`` tensors) move to their example's place; per-example
    entries (``weight`` [b], ``all_teacher_scores`` [b, S], the lists) stay as they are. Added:
    ``position_ids`` [R, T], 0.. within each example (and again over a row's tail), from which
    transformers' masking keeps attention within each example when the model gets no
    ``attention_mask``; ``example`` [R, T] int64, the example at each position (-1 on the tail).
    ``attention_mask`` [R, T] marks the examples' tokens (for counting; the model is not given it).
    Each example's first label is dropped (IGNORE): position 0 of a padded row predicts nothing
    either, and here the previous example would predict it."""
    lengths = batch["attention_mask"].sum(1)  # [b]
    b = len(lengths)
    row, offset = pack_rows(lengths.numpy())
    rows = int(row.max()) + 1 if b else 0
    used = np.bincount(row, weights=lengths.numpy(), minlength=rows).astype(np.int64)  # [R] positions taken
    t = int(used.max()) if b else 0
    src_example = torch.from_numpy(np.repeat(np.arange(b), lengths.numpy()))  # every example's positions
    src_pos = torch.from_numpy(_within(lengths.numpy()))
    dst_row = torch.from_numpy(row)[src_example]
    dst_pos = torch.from_numpy(offset)[src_example] + src_pos
    out = dict(batch)
    for name, value in batch.items():
        if name != "input_ids" and name not in PACK_FILL:
            continue
        fill = pad_id if name == "input_ids" else PACK_FILL[name]
        packed = torch.full((rows, t, *value.shape[2:]), fill, dtype=value.dtype)
        packed[dst_row, dst_pos] = value[src_example, src_pos]
        out[name] = packed
    out["labels"][torch.from_numpy(row), torch.from_numpy(offset)] = IGNORE
    example = torch.full((rows, t), -1, dtype=torch.int64)
    example[dst_row, dst_pos] = src_example
    tail = torch.arange(t)[None, :] - torch.from_numpy(used)[:, None]  # 0.. from each row's end of examples
    position_ids = tail.clamp_min(0)
    position_ids[dst_row, dst_pos] = src_pos
    out["position_ids"], out["example"] = position_ids, example
    return out


def labelled_per_example(batch: dict) -> torch.Tensor:
    """[examples] the labels each example of a micro-batch trains on (its position 0 predicts
    nothing), padded or packed."""
    labelled = batch["labels"] != IGNORE
    if "example" in batch:
        return torch.bincount(batch["example"][labelled], minlength=len(batch["modes"]))
    return labelled[:, 1:].sum(1)


def _json_dict(text: str | None, column: str, path: Path) -> dict:
    """A statistics column's JSON text as a dict ({} where null)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{column}: unreadable JSON ({exc})", where=str(path)) from None
    if not isinstance(value, dict):
        raise DataError(f"{column}: a JSON object expected, got {type(value).__name__}", where=str(path))
    return value


def _flat(col) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column as (values, row of each value, position of each value within its row)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(col)
    return values, np.repeat(np.arange(len(lengths)), lengths), _within(lengths)


def _within(lengths: np.ndarray) -> np.ndarray:
    """0..n-1 inside each group of the given lengths, concatenated: [2, 3] -> [0, 1, 0, 1, 2]."""
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def _teacher_positions(table: pa.Table, paths: list[Path]) -> np.ndarray:
    """The position (in ``input_ids``) of every teacher row of ``table``, flat over its rows: the
    labelled positions in order, or 0..L-1 for a row stored at every position."""
    length = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    stored = pc.list_value_length(table.column("teacher_mask")).to_numpy(zero_copy_only=False).astype(np.int64)
    values, row, pos = _flat(table.column("labels"))
    is_label = values.to_numpy(zero_copy_only=False) != IGNORE
    labelled = np.bincount(row[is_label], minlength=len(length))
    dense = stored == length
    bad = ~dense & (stored != labelled)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataError(f"example {table.column('id')[r].as_py()!r}: {stored[r]} teacher rows for {length[r]} positions, "
                        f"{labelled[r]} of them labelled (one row per labelled position, or per position)", where=str(paths[r]))
    label_pos = pos[is_label]  # flat over rows, in order
    label_start = np.cumsum(labelled) - labelled  # [b] where each row's labelled positions start in label_pos
    owner = np.repeat(np.arange(len(stored)), stored)  # [teacher rows] the example of each
    position = _within(stored)  # a row at every position: its index
    sparse = ~dense[owner]
    position[sparse] = label_pos[label_start[owner[sparse]] + position[sparse]]
    return position


def _pad2(col, t: int, fill, dtype, position: np.ndarray | None = None) -> np.ndarray:
    """list<x> [b][L] -> [b, t], truncated at t, ``fill`` beyond each row. ``position``: where each
    value goes in its row (default: its index)."""
    values, row, pos = _flat(col)
    pos = pos if position is None else position
    out = np.full((len(col), t), fill, dtype=dtype)
    keep = pos < t
    out[row[keep], pos[keep]] = values.to_numpy(zero_copy_only=False)[keep]
    return out


def _pad3(col, t: int, fill, dtype, position: np.ndarray | None = None) -> np.ndarray:
    """list<list<x>> [b][n][k] -> [b, t, K] with K the widest slot list, ``fill`` where absent.
    ``position``: the position of each of the n inner lists (default: its index)."""
    inner, row, pos = _flat(col)
    pos = pos if position is None else position
    values, slot_owner, slot = _flat(inner)  # slot_owner: index into inner (a (row, pos) pair)
    k = int(slot.max()) + 1 if len(slot) else 1
    out = np.full((len(col), t, k), fill, dtype=dtype)
    r, p = row[slot_owner], pos[slot_owner]
    keep = p < t
    out[r[keep], p[keep], slot[keep]] = values.to_numpy(zero_copy_only=False)[keep]
    return out


def _all_teachers(table: pa.Table, t: int, position: np.ndarray, paths: list[Path]) -> dict[str, torch.Tensor]:
    """The ``all_teachers`` entries of a micro-batch: every source's teacher rows put at the same
    positions as the chosen teacher's ([b, T, S, k], [b, T, S]; empty: id 0, -inf, False) and the
    scores [b, S]. Every example must hold S sources (one recipe's builds) and k slots each."""
    b = table.num_rows
    scores_col = table.column("all_teacher_scores").combine_chunks()
    per_example = pc.list_value_length(scores_col).to_numpy(zero_copy_only=False)
    stored = pc.list_value_length(table.column("teacher_mask")).to_numpy(zero_copy_only=False)
    rows_of = pc.list_value_length(table.column("all_teacher_mask")).to_numpy(zero_copy_only=False)
    s = int(per_example[0]) if b else 0
    bad = np.flatnonzero((per_example != s) | (rows_of != stored))
    if len(bad):
        r = int(bad[0])
        raise DataError(f"example {table.column('id')[r].as_py()!r}: {per_example[r]} source scores and "
                        f"{rows_of[r]} rows of every source's teacher, expected {s} and {stored[r]} (one per "
                        "teacher row)", where=str(paths[r]))
    scores = pc.list_flatten(scores_col).to_numpy(zero_copy_only=False).astype(np.float32).reshape(b, s)
    owner = np.repeat(np.arange(b), stored.astype(np.int64))  # [teacher rows] the example of each
    n = len(owner)

    def dense(column: str, tail: int, levels: int, dtype) -> np.ndarray:
        values = table.column(column).combine_chunks()
        for _ in range(levels):
            values = pc.list_flatten(values)
        flat = values.to_numpy(zero_copy_only=False)
        if flat.size != n * s * tail:  # a ragged source list or top-k: not what build writes
            raise DataError(f"{column}: {flat.size} values for {n} teacher rows of {s} sources x {tail}",
                            where=str(paths[0]))
        return flat.astype(dtype).reshape(n, s, tail)

    mask = dense("all_teacher_mask", 1, 2, np.bool_)[..., 0]  # [rows, S]
    inner = pc.list_flatten(pc.list_flatten(table.column("all_teacher_ids").combine_chunks()))
    k = int(pc.max(pc.list_value_length(inner)).as_py() or 1) if len(inner) else 1
    ids = dense("all_teacher_ids", k, 3, np.int64)
    logits = dense("all_teacher_logits", k, 3, np.float32)
    keep = position < t
    out_ids = np.zeros((b, t, s, k), dtype=np.int64)
    out_logits = np.full((b, t, s, k), -np.inf, dtype=np.float32)
    out_mask = np.zeros((b, t, s), dtype=np.bool_)
    at = (owner[keep], position[keep])
    out_ids[at], out_logits[at], out_mask[at] = ids[keep], logits[keep], mask[keep]
    return {"all_teacher_ids": torch.from_numpy(out_ids), "all_teacher_logits": torch.from_numpy(out_logits),
            "all_teacher_mask": torch.from_numpy(out_mask), "all_teacher_scores": torch.from_numpy(scores)}


def _has_label(labels: pa.ChunkedArray, max_length: int) -> np.ndarray:
    """[rows] bool: a label at a position 1 <= t < max_length (position 0 predicts nothing)."""
    values, row, pos = _flat(labels)
    ok = (values.to_numpy(zero_copy_only=False) != IGNORE) & (pos >= 1) & (pos < max_length)
    return np.bincount(row[ok], minlength=len(labels)) > 0


# --- phases -------------------------------------------------------------------------------------


@dataclass
class PhasePlan:
    """A phase resolved against the data: its examples, their weights and its optimizer steps.

    A phase draws units (``Phase.draws``): with ``instructions`` an id with every row of it
    (both modes' examples: Eq. 5 sums them per instruction), with ``examples`` each row alone.
    Epochs and the global batch count units: a step holds ``global_batch`` of them."""

    index: int
    phase: Phase
    rows: np.ndarray  # [n] global rows (a row twice if two parts name it)
    weights: np.ndarray  # [n] the part's mode weight times the example's own (PhasePart.example_weights)
    samples: int  # round(epochs * units): units drawn in the phase
    steps: int  # ceil(samples / global batch)
    examples: PhaseExamples | None = None  # what the curriculum's ``order`` sees: one entry per unit
    members: np.ndarray | None = None  # [n] indices into rows, grouped by unit (None: each row its own)
    starts: np.ndarray | None = None  # [units + 1] where each unit's members start

    def __post_init__(self):
        if self.members is None:
            self.members = np.arange(len(self.rows))
            self.starts = np.arange(len(self.rows) + 1)

    @property
    def units(self) -> int:
        return len(self.starts) - 1

    def draws(self, seed: int, global_batch: int, curriculum: Curriculum | None = None) -> np.ndarray:
        """The phase's ``steps * global_batch`` units, in order: the curriculum's order of each epoch
        (default: a seeded permutation), the last epoch cut short for fractional epochs, and the last
        batch filled up with the phase's first draws so that every step (and every rank) gets a full
        batch."""
        n = self.units
        if n == 0 or self.samples == 0:
            return np.zeros(0, np.int64)
        orders = []
        for epoch in range(math.ceil(self.samples / n)):
            rng = np.random.default_rng([seed, self.index, epoch])
            if curriculum is None or self.examples is None:
                orders.append(rng.permutation(n))
            else:
                orders.append(_checked_order(curriculum, self.examples, rng, epoch))
        idx = np.concatenate(orders)[: self.samples]
        return np.resize(idx, self.steps * global_batch)  # np.resize repeats from the start

    def expand(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (row, weight) of every member of ``units``, unit by unit (a unit's rows in part order)."""
        units = np.asarray(units, dtype=np.int64)
        counts = self.starts[units + 1] - self.starts[units]
        take = self.members[np.repeat(self.starts[units], counts) + _within(counts)]
        return self.rows[take], self.weights[take]

    def order(self, seed: int, global_batch: int, curriculum: Curriculum | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every (row, weight) the phase draws, flat: ``expand(draws(...))``."""
        return self.expand(self.draws(seed, global_batch, curriculum))


def _checked_order(curriculum: Curriculum, examples: PhaseExamples, rng: np.random.Generator, epoch: int) -> np.ndarray:
    n = len(examples.ids)
    where = f"curriculum {curriculum.name or type(curriculum).__name__}, phase {examples.phase.name!r}, epoch {epoch}"
    try:
        order = np.asarray(curriculum.order_examples(examples, rng, epoch))
    except ProfuserError:
        raise
    except Exception as exc:  # a plugin's bug must name the plugin, not end in a traceback
        raise ProfuserError(f"order_examples() failed: {type(exc).__name__}: {exc}", where=where) from exc
    if order.shape != (n,) or not np.issubdtype(order.dtype, np.integer) or not np.array_equal(np.sort(order), np.arange(n)):
        flat = order.reshape(-1)
        valid = np.unique(flat[(flat >= 0) & (flat < n)]) if np.issubdtype(order.dtype, np.integer) else ()
        raise ProfuserError(f"order_examples() must return a permutation of range({n}) (each row once), got "
                            f"{flat.size} value(s), {len(valid)} distinct row(s)", where=where)
    return order.astype(np.int64)


def phase_units(phase: Phase, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(members, starts)``: the rows (of ``ids``, one per row of the phase, in part order) grouped
    into the units ``phase.draws`` names, numbered by first appearance."""
    draws = getattr(phase, "draws", "instructions")
    if draws not in get_args(Draws):
        raise ProfuserError(f"phase {phase.name!r}: draws {draws!r} (valid: {', '.join(get_args(Draws))})",
                            where="curriculum")
    if draws == "examples":
        return np.arange(len(ids)), np.arange(len(ids) + 1)
    number: dict[str, int] = {}
    unit = np.fromiter((number.setdefault(i, len(number)) for i in ids), dtype=np.int64, count=len(ids))
    starts = np.zeros(len(number) + 1, dtype=np.int64)
    np.cumsum(np.bincount(unit, minlength=len(number)), out=starts[1:])
    return np.argsort(unit, kind="stable"), starts


def plan_phases(phases: list[Phase], data: ExampleSet, global_batch: int, *, micro_batch_size: int | None = None,
                world_size: int = 1) -> list[PhasePlan]:
    plans = []
    for index, phase in enumerate(phases):
        rows, weights = [], []
        for part in phase.parts:
            found = data.rows(part.mode, part.ids)
            rows.append(found)
            weight = np.full(len(found), part.weight, dtype=np.float32)
            if part.example_weights:
                weight *= _example_weights(part.example_weights, data.describe(found)[0], phase.name)
            weights.append(weight)
        rows_ = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        weights_ = np.concatenate(weights) if weights else np.zeros(0, np.float32)
        ids, modes, lengths = data.describe(rows_)
        members, starts = phase_units(phase, ids)
        units = len(starts) - 1
        samples = round(phase.epochs * units) if units else 0
        head = members[starts[:-1]]  # the first row of each unit stands for it
        examples = PhaseExamples(
            phase=phase, index=index, ids=[ids[j] for j in head], modes=[modes[j] for j in head],
            weights=weights_[head].tolist(), gt_length=[lengths[j] for j in head], batch_size=global_batch,
            micro_batch_size=micro_batch_size or global_batch, world_size=world_size, stats=data.example_stats(rows_[head]))
        plans.append(PhasePlan(index, phase, rows_, weights_, samples, math.ceil(samples / global_batch), examples,
                               members, starts))
    return plans


def planned_steps(phases: list[Phase], ids: list[str], global_batch: int) -> list[int]:
    """Optimizer steps of each phase when every mode holds an example of every id in ``ids`` (the
    cost estimate's assumption; the trainer counts the examples that exist and have a label)."""
    steps = []
    for phase in phases:
        drawn: list[str] = []
        for part in phase.parts:
            drawn.extend(ids if part.ids is None else part.ids)
        units = len(phase_units(phase, drawn)[1]) - 1
        steps.append(math.ceil(round(phase.epochs * units) / global_batch) if units else 0)
    return steps


def _example_weights(by_id: dict[str, float], ids: list[str], phase: str) -> np.ndarray:
    """[n] the factor of each id (1 where absent); a negative or non-finite factor is an error."""
    out = np.ones(len(ids), dtype=np.float32)
    for j, i in enumerate(ids):
        w = by_id.get(i, 1.0)
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ProfuserError(f"phase {phase!r}: example weight of {i!r} is {w!r} (a finite number >= 0 needed)",
                                where="curriculum")
        out[j] = w
    return out
