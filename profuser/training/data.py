"""The trainer's data: ``build/<mode>/examples.parquet`` tables, the seeded order of each phase, and
micro-batches padded into the tensors a ``Loss`` reads.

Every example is addressed by a global row number (the modes' tables laid end to end). A phase's
order is a fresh permutation per epoch drawn from ``(seed, phase index, epoch)`` only, so it is the
same on every rank, for every world size and after a resume: the trainer needs nothing but
``(phase, step)`` to know which examples come next. The tables are held as Arrow buffers (no Python
objects per token); a micro-batch is gathered with ``take`` and padded with numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..components import MODES, CurriculumInput, Phase
from ..errors import DataError, ProfuserError

IGNORE = -100
SCHEMA = pa.schema([  # the columns the trainer reads, in the types it reads them as
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),  # [L]
    ("labels", pa.list_(pa.int32())),  # [L]
    ("teacher_ids", pa.list_(pa.list_(pa.int32()))),  # [L][k]
    ("teacher_logits", pa.list_(pa.list_(pa.float32()))),  # [L][k]
    ("teacher_mask", pa.list_(pa.bool_())),  # [L]
    ("gt_length", pa.int32()),
])
COLUMNS = tuple(SCHEMA.names)


class ExampleSet:
    """The examples of every mode, addressed by global row number."""

    def __init__(self, tables: dict[str, pa.Table], max_length: int):
        self.modes = [m for m in MODES if m in tables] + [m for m in tables if m not in MODES]
        self.tables = {m: tables[m] for m in self.modes}
        self.max_length = max_length
        sizes = [tables[m].num_rows for m in self.modes]
        self.offsets = dict(zip(self.modes, np.cumsum([0, *sizes[:-1]]).tolist()))  # mode -> first global row
        self.ids = {m: tables[m].column("id").to_pylist() for m in self.modes}
        # an example trains only if a label survives truncation at a predictable position [1, max_length)
        self.trainable = {m: _has_label(tables[m].column("labels"), max_length) for m in self.modes}

    @classmethod
    def load(cls, paths: dict[str, str | Path], max_length: int) -> ExampleSet:
        tables = {}
        for mode, path in paths.items():
            path = Path(path)
            if not path.is_file():
                raise DataError("examples file not found (run the build stage first)", where=str(path))
            table = pq.read_table(path)
            missing = [c for c in COLUMNS if c not in table.column_names]
            if missing:
                raise DataError(f"missing column(s) {', '.join(missing)} (see docs/architecture.md)", where=str(path))
            try:  # one schema for every mode, so that a micro-batch may mix them
                tables[mode] = table.select(list(COLUMNS)).cast(SCHEMA).combine_chunks()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise DataError(f"unexpected column types: {exc}", where=str(path)) from None
        if not tables:
            raise ProfuserError("no examples to train on: the train stage needs build/inference and/or build/training")
        return cls(tables, max_length)

    def __len__(self) -> int:
        return sum(t.num_rows for t in self.tables.values())

    def curriculum_input(self, target_reward: dict[str, float] | None = None) -> CurriculumInput:
        """Ids of every mode (first seen first) and their GT length; the training mode's length wins,
        as its response is the GT itself."""
        ids: dict[str, None] = {}
        gt_length: dict[str, int] = {}
        for mode in sorted(self.modes, key=lambda m: m != "training"):
            lengths = self.tables[mode].column("gt_length").to_pylist()
            for i, n in zip(self.ids[mode], lengths):
                gt_length.setdefault(i, int(n))
        for mode in self.modes:
            ids.update(dict.fromkeys(self.ids[mode]))
        return CurriculumInput(ids=list(ids), gt_length=gt_length, target_reward=target_reward)

    def rows(self, mode: str, ids: list[str] | None = None) -> np.ndarray:
        """Global rows of ``mode`` (all, or those whose id is in ``ids``) that have a label to train on."""
        if mode not in self.tables:
            raise ProfuserError(f"the curriculum uses {mode}-mode examples, but none were built (missing build/{mode})")
        keep = self.trainable[mode].copy()
        if ids is not None:
            wanted = set(ids)
            keep &= np.fromiter((i in wanted for i in self.ids[mode]), bool, len(self.ids[mode]))
        return np.flatnonzero(keep) + self.offsets[mode]

    def locate(self, row: int) -> tuple[str, int]:
        for mode in reversed(self.modes):
            if row >= self.offsets[mode]:
                return mode, row - self.offsets[mode]
        raise IndexError(row)

    def example_id(self, row: int) -> str:
        mode, i = self.locate(int(row))
        return self.ids[mode][i]

    def collate(self, rows: np.ndarray, weights: np.ndarray, pad_id: int) -> dict:
        """Micro-batch of ``rows`` right-padded to its longest example (at most ``max_length``).

        Tensors (b examples, T positions, k teacher slots), indexed like ``input_ids`` (unshifted):
        input_ids, attention_mask, labels [b, T] int64; teacher_ids [b, T, k] int64; teacher_logits
        [b, T, k] float32 (-inf unused); teacher_mask [b, T] bool; weight [b] float32. Also ``ids``
        and ``modes`` (lists) for logging."""
        located = [self.locate(int(r)) for r in rows]
        parts = []
        for mode in self.modes:  # one take per table, then back into the requested order
            local = [(j, i) for j, (m, i) in enumerate(located) if m == mode]
            if local:
                parts.append(([j for j, _ in local], self.tables[mode].take([i for _, i in local])))
        order = np.argsort(np.concatenate([np.asarray(js) for js, _ in parts]))
        table = pa.concat_tables([t for _, t in parts]).take(order)

        lengths = np.minimum(pc.list_value_length(table.column("input_ids")).to_numpy(), self.max_length)
        b, t = len(rows), int(lengths.max())
        input_ids = _pad2(table.column("input_ids"), t, pad_id, np.int64)
        labels = _pad2(table.column("labels"), t, IGNORE, np.int64)
        teacher_mask = _pad2(table.column("teacher_mask"), t, False, np.bool_)
        teacher_ids = _pad3(table.column("teacher_ids"), t, 0, np.int64)
        teacher_logits = _pad3(table.column("teacher_logits"), t, -np.inf, np.float32)
        attention_mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)  # [b, T]
        assert input_ids.shape == (b, t) and teacher_ids.shape[:2] == (b, t)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "teacher_ids": torch.from_numpy(teacher_ids),
            "teacher_logits": torch.from_numpy(teacher_logits),
            "teacher_mask": torch.from_numpy(teacher_mask),
            "weight": torch.as_tensor(weights, dtype=torch.float32),
            "ids": table.column("id").to_pylist(),
            "modes": [m for m, _ in located],
        }


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


def _pad2(col, t: int, fill, dtype) -> np.ndarray:
    """list<x> [b][L] -> [b, t], truncated at t, ``fill`` beyond each row."""
    values, row, pos = _flat(col)
    out = np.full((len(col), t), fill, dtype=dtype)
    keep = pos < t
    out[row[keep], pos[keep]] = values.to_numpy(zero_copy_only=False)[keep]
    return out


def _pad3(col, t: int, fill, dtype) -> np.ndarray:
    """list<list<x>> [b][L][k] -> [b, t, K] with K the widest slot list, ``fill`` where absent."""
    inner, row, pos = _flat(col)
    values, slot_owner, slot = _flat(inner)  # slot_owner: index into inner (a (row, pos) pair)
    k = int(slot.max()) + 1 if len(slot) else 1
    out = np.full((len(col), t, k), fill, dtype=dtype)
    r, p = row[slot_owner], pos[slot_owner]
    keep = p < t
    out[r[keep], p[keep], slot[keep]] = values.to_numpy(zero_copy_only=False)[keep]
    return out


def _has_label(labels: pa.ChunkedArray, max_length: int) -> np.ndarray:
    """[rows] bool: a label at a position 1 <= t < max_length (position 0 predicts nothing)."""
    values, row, pos = _flat(labels)
    ok = (values.to_numpy(zero_copy_only=False) != IGNORE) & (pos >= 1) & (pos < max_length)
    return np.bincount(row[ok], minlength=len(labels)) > 0


# --- phases -------------------------------------------------------------------------------------


@dataclass
class PhasePlan:
    """A phase resolved against the data: its examples, their weights and its optimizer steps."""

    index: int
    phase: Phase
    rows: np.ndarray  # [n] global rows (a row twice if two parts name it)
    weights: np.ndarray  # [n] the part's mode weight
    samples: int  # round(epochs * n): examples drawn in the phase
    steps: int  # ceil(samples / global batch)

    def order(self, seed: int, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The phase's ``steps * global_batch`` (row, weight) draws: one seeded permutation per
        epoch, the last epoch cut short for fractional epochs, and the last batch filled up with
        the phase's first draws so that every step (and every rank) gets a full batch."""
        n = len(self.rows)
        perms = [np.random.default_rng([seed, self.index, epoch]).permutation(n) for epoch in range(math.ceil(self.samples / n))]
        idx = np.concatenate(perms)[: self.samples]
        idx = np.resize(idx, self.steps * global_batch)  # np.resize repeats from the start
        return self.rows[idx], self.weights[idx]


def plan_phases(phases: list[Phase], data: ExampleSet, global_batch: int) -> list[PhasePlan]:
    plans = []
    for index, phase in enumerate(phases):
        rows, weights = [], []
        for part in phase.parts:
            found = data.rows(part.mode, part.ids)
            rows.append(found)
            weights.append(np.full(len(found), part.weight, dtype=np.float32))
        rows_ = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        samples = round(phase.epochs * len(rows_)) if len(rows_) else 0
        plans.append(PhasePlan(index, phase, rows_, np.concatenate(weights) if weights else np.zeros(0, np.float32),
                               samples, math.ceil(samples / global_batch)))
    return plans
