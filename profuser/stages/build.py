"""The ``build/<mode>`` stage: the trainer's examples of one mode, in the target's tokens.

For every selected example, in data order, it takes the response (training mode: the ground truth
from the data; inference mode: the chosen source's response, stored by its ``align`` stage),
tokenises the whole conversation with the target (``profuser.chat.encode_chat``, same truncation
as ``align``), checks that the response tokens are exactly those the ``align`` stage put the
teacher on, and writes ``examples.arrow`` as docs/architecture.md specifies: ``id``, ``mode``,
``input_ids`` [L], ``labels`` [L] (-100 on the prompt), ``teacher_ids`` [n][k], ``teacher_logits``
[n][k] (-inf unused) and ``teacher_mask`` [n] at the n labelled positions only (the response;
the trainer's ``collate`` puts them back at their positions), ``gt_length`` (target tokens of the
ground-truth response alone: the length the curricula sort by, the same in both modes).
With ``columns`` in its config (the extra columns the recipe's loss needs, ``Loss.needs``) it also
writes ``category`` [n] (the alignment category code of each labelled position, int8) and/or
``teacher_logz`` [n] (the teacher logits' log-partition, float32, which its align stages then
write); ``source`` (the chosen source's key) is always written, with the statistics below. With
``all_teachers: true`` (a loss with the ``all_teachers`` need; its align stages then aligned every
source on every selected example's response) it also writes every source's teacher at the same
rows, sources in recipe order: ``all_teacher_ids`` / ``all_teacher_logits`` [n][S][k],
``all_teacher_mask`` [n][S], and ``all_teacher_scores`` [S] (the evaluator's score of each source
in the selection, NaN where none). With ``teacherless: true`` (a loss that reads no teacher on the
training mode alone: CSFT) it reads the data alone: every training example, the ground truth as
the response, no teacher at any position (one unused slot, ``teacher_mask`` False), no source.

Every example also carries its statistics (``STATS_SCHEMA``, what a curriculum sees as
``components.ExampleStats``), computed here once: ``source`` (the chosen source), ``response_length``
(target tokens of the response trained on), ``teacher_entropy`` / ``teacher_top1`` (the mean, over
the positions with a teacher, of the entropy in nats and of the top-1 probability of the stored
top-k renormalised at temperature 1; NaN where no position has one), and the selection's ``scores``
(the evaluator's per source, on its own scale: Min-CE's reduced NLL, rm_vote's votes) and
``rm_scores`` (every reward model's raw score per source, strongest first; null where none ran),
both as the selection's JSON text.

One pass, flat memory: the data file and every source's ``aligned.parquet`` (in data order too)
are streamed side by side; only the selection's id -> source map and its score texts are held. The output is an Arrow
IPC file of one record batch per example (zstd), so that the trainer reads any example alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc
from pydantic import Field

from ..artifacts import IGNORE_INDEX, Selected, iter_records, list_column, read_selection
from ..chat import conversation_history, target_max_length
from ..components import Mode
from ..errors import ArtifactError, DataError, ProfuserError
from ..training.data import ALL_TEACHERS_SCHEMA, EXTRA_SCHEMA, NO_CATEGORY, STATS_SCHEMA
from ..training.data import SCHEMA as TRAINER_SCHEMA
from . import ModelIdentity, StageConfig

# 3: every example's statistics (STATS_SCHEMA); 2: examples.arrow, teacher rows at labelled positions only
# (1: examples.parquet, a row per position)
VERSION = "3"
EXAMPLES_FILE = "examples.arrow"
COMPRESSION = "zstd"

# what the trainer reads, + the mode, + every example's statistics
EXAMPLES_SCHEMA = pa.schema([*TRAINER_SCHEMA.insert(1, pa.field("mode", pa.string())), *STATS_SCHEMA])
EXTRA_COLUMNS = tuple(EXTRA_SCHEMA.names)  # what a loss may ask this stage for (Loss.needs)
DATA, SELECTION = "data", "select"  # input roles: the data stage, the selection of this mode


def align_role(source: str) -> str:
    """The input role of one source's align stage (of this build's mode)."""
    return f"align/{source}"


class Config(StageConfig):
    mode: Mode
    target: ModelIdentity
    max_length: int  # train.max_length: the target's truncation, as align's
    sources: list[str]  # source keys: one align stage each
    columns: list[str] = Field(default_factory=list)  # extra columns (EXTRA_SCHEMA's) the loss needs; hashed only when any
    # every source's teacher too (ALL_TEACHERS_SCHEMA: a loss that needs all_teachers); hashed only when set
    all_teachers: bool = False
    teacherless: bool = False  # no selection, no teacher: every example of the data (CSFT); hashed only when set

    OMITTED_WHEN_UNSET = ("columns", "all_teachers", "teacherless")


class _Aligned:
    """One source's ``aligned.parquet`` read forward a row group at a time; ``next(id)`` returns
    the next row as numpy arrays, which must be that example's (both sides are in data order)."""

    def __init__(self, path, source: str, where: str, every: bool = False):
        self.source, self.where, self.name = source, where, f"align/{where.split('/')[-1]}/{source}"
        self.why = "is selected" if every else f"was won by {source!r}"  # every: all_teachers aligns every example
        self._rows = self._iter(path / "aligned.parquet")
        self._pending: dict | None = next(self._rows, None)

    @staticmethod
    def _iter(path) -> Iterator[dict]:
        for batch in pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False).iter_batches(batch_size=64):
            starts = batch.column("target_ids").offsets.to_numpy()
            target_ids = batch.column("target_ids").flatten().to_numpy(zero_copy_only=False)  # [tokens]
            mask = batch.column("teacher_mask").flatten().to_numpy(zero_copy_only=False).astype(bool)
            category = batch.column("category").flatten().to_numpy(zero_copy_only=False).astype(np.int8)
            logz = (batch.column("teacher_logz").flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                    if "teacher_logz" in batch.schema.names else None)
            inner = batch.column("teacher_ids").flatten()  # [tokens] lists of k
            ids = inner.flatten().to_numpy(zero_copy_only=False)
            logits = batch.column("teacher_logits").flatten().flatten().to_numpy(zero_copy_only=False)
            slot = inner.offsets.to_numpy()  # [tokens + 1] into ids / logits
            for row, (example_id, response) in enumerate(zip(batch.column("id").to_pylist(), batch.column("response").to_pylist())):
                a, b = int(starts[row] - starts[0]), int(starts[row + 1] - starts[0])
                first, last = int(slot[a] - slot[0]), int(slot[b] - slot[0])
                n = b - a
                k = (last - first) // n if n else 0
                yield {"id": example_id, "response": response, "target_ids": target_ids[a:b],
                       "teacher_ids": ids[first:last].reshape(n, k), "teacher_logits": logits[first:last].reshape(n, k),
                       "teacher_mask": mask[a:b], "category": category[a:b],
                       "teacher_logz": logz[a:b] if logz is not None else None}

    def next(self, example_id: str) -> dict:
        row = self._pending
        if row is None or row["id"] != example_id:
            raise ArtifactError(f"example {example_id!r} {self.why} but {self.name} has no row for it"
                                + (f" (its next row is {row['id']!r})" if row else ""), where=self.where)
        self._pending = next(self._rows, None)
        return row

    def check_done(self) -> None:
        if self._pending is not None:
            raise ArtifactError(f"{self.name} has a row for example {self._pending['id']!r}, which "
                                + ("is not selected" if self.why == "is selected" else "it did not win")
                                + " (or which is not in the data)", where=self.where)


def _source_scores(selection: dict[str, Selected], sources: list[str], where: str) -> dict[str, np.ndarray]:
    """id -> [S] float32, the evaluator's score of each source (``Choice.scores``), NaN where none."""
    out = {}
    for example_id, selected in selection.items():
        scores = selected.scores or {}
        try:
            out[example_id] = np.array([float(scores.get(s, np.nan)) for s in sources], dtype=np.float32)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"example {example_id!r}: unreadable scores {scores!r} ({exc})", where=where) from None
    return out


def _selection_texts(path, where: str) -> dict[str, tuple[str | None, str | None]]:
    """id -> the selection's ``scores`` and ``rm_scores`` JSON texts, as stored (None: no such column)."""
    path = path / "selection.parquet" if path.is_dir() else path
    try:
        names = pq.read_schema(path).names
        columns = [c for c in ("scores", "rm_scores") if c in names]
        table = pq.read_table(path, columns=["id", *columns])
    except (OSError, pa.ArrowInvalid) as exc:
        raise ArtifactError(f"unreadable selection: {exc}", where=where) from None
    values = [table[c].to_pylist() if c in columns else [None] * table.num_rows for c in ("scores", "rm_scores")]
    return dict(zip(table["id"].to_pylist(), zip(*values)))


def teacher_stats(logits: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The mean entropy (nats) and top-1 probability of the teacher rows ``logits`` [n, k] (raw,
    -inf unused) where ``mask`` [n], each row's top-k renormalised at temperature 1; NaN, NaN when
    no row has a teacher."""
    rows = logits[np.asarray(mask, dtype=bool)].astype(np.float64)  # [m, k]
    rows = rows[np.isfinite(rows).any(axis=1)] if rows.size else rows.reshape(0, 1)
    if not len(rows):
        return float("nan"), float("nan")
    shifted = rows - rows.max(axis=1, keepdims=True)
    p = np.exp(shifted)  # exp(-inf) = 0: unused slots drop out
    z = p.sum(axis=1, keepdims=True)
    p /= z
    logp = np.where(p > 0, shifted - np.log(z), 0.0)
    entropy = -(p * logp).sum(axis=1)
    return float(entropy.mean()), float(p.max(axis=1).mean())


def _nested3(array: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """One example's [n, S, k] array as a list<list<list<T>>> column of one row."""
    n, s, k = array.shape
    values = pa.array(np.ascontiguousarray(array).reshape(-1), type=value_type)
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, n * s * k + 1, k, dtype=np.int32)), values)
    middle = pa.ListArray.from_arrays(pa.array(np.arange(0, n * s + 1, s, dtype=np.int32)), inner)
    return pa.ListArray.from_arrays(pa.array(np.array([0, n], dtype=np.int32)), middle)


def _all_teachers(example_id: str, chosen: str, row: dict, rows: dict[str, dict], scores: np.ndarray,
                  mode: str, where: str) -> list[pa.Array]:
    """The ``all_teacher_*`` columns of one example: every source's aligned teacher on the chosen
    response (``rows``, recipe order), which must be the same response in the same target tokens."""
    k = row["teacher_ids"].shape[1]
    for source, other in rows.items():
        if other["response"] != row["response"] or not np.array_equal(other["target_ids"], row["target_ids"]):
            raise ArtifactError(f"example {example_id!r}: align/{mode}/{source} aligned another response than "
                                f"align/{mode}/{chosen} (every source must be aligned on the chosen one)", where=where)
        if other["teacher_ids"].shape[1] != k:
            raise ArtifactError(f"example {example_id!r}: teachers of different top-k "
                                f"({chosen}: {k}, {source}: {other['teacher_ids'].shape[1]}) in one build", where=where)
    ids = np.stack([r["teacher_ids"] for r in rows.values()], axis=1)  # [n, S, k]
    logits = np.stack([r["teacher_logits"] for r in rows.values()], axis=1)  # [n, S, k]
    mask = np.stack([r["teacher_mask"] for r in rows.values()], axis=1)  # [n, S]
    return [_nested3(ids.astype(np.int32), pa.int32()), _nested3(logits.astype(np.float32), pa.float32()),
            list_column([np.ascontiguousarray(mask, dtype=bool)], pa.bool_()), list_column([scores], pa.float32())]


def _no_teacher(labelled: np.ndarray) -> dict:
    """An aligned row without a teacher (teacherless builds): at each labelled position one unused
    top-k slot (id 0, logit -inf, as a position the aligner could not map) and no teacher."""
    n = len(labelled)
    return {"target_ids": labelled, "teacher_ids": np.zeros((n, 1), np.int32), "teacher_logits": np.full((n, 1), -np.inf, np.float32),
            "teacher_mask": np.zeros(n, dtype=bool), "category": np.full(n, NO_CATEGORY, np.int8), "teacher_logz": None}


def run(ctx) -> dict:
    from ..chat import encode_chat
    from ..models import load_tokenizer

    cfg = ctx.config
    mode = cfg.mode
    where = ctx.stage.id
    tokenizer = load_tokenizer(cfg.target, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
    max_length = target_max_length(tokenizer, cfg.max_length)
    every = cfg.all_teachers  # a loss that reads every source's teacher: else as before
    if cfg.teacherless:  # every example, no source chosen
        selection = {}
        texts_by_id: dict[str, tuple[str | None, str | None]] = {}
    else:
        try:  # the scores (JSON) are decoded only for all_teachers
            selection = read_selection(ctx.inputs[SELECTION], scores=every)
        except ValueError as exc:
            raise ArtifactError(f"unreadable selection scores ({exc})", where=where) from None
        texts_by_id = _selection_texts(ctx.inputs[SELECTION], where)  # the statistics' scores, as stored
    chosen_by_id = {i: s.chosen for i, s in selection.items()}
    scores_by_id = _source_scores(selection, cfg.sources, where) if every else {}
    del selection
    for example_id, chosen in chosen_by_id.items():
        if chosen not in cfg.sources:
            raise ProfuserError(f"example {example_id!r}: the chosen source {chosen!r} is not among the sources "
                                f"({', '.join(cfg.sources)})", where=where)
    aligned = {s: _Aligned(ctx.inputs[align_role(s)], s, where, every) for s in cfg.sources}
    extra = [c for c in EXTRA_SCHEMA.names if c in cfg.columns]  # only what the loss needs
    unknown = sorted(set(cfg.columns) - set(extra))
    extra = [c for c in extra if c not in STATS_SCHEMA.names]  # source: always written, with the statistics
    if unknown:
        raise ProfuserError(f"unknown column(s) {', '.join(unknown)} (build writes {', '.join(EXTRA_SCHEMA.names)})",
                            where=where)
    schema = pa.schema([*EXAMPLES_SCHEMA, *(EXTRA_SCHEMA.field(c) for c in extra), *(ALL_TEACHERS_SCHEMA if every else [])])

    examples = response_tokens = teacher_tokens = 0
    k_seen: set[int] = set()
    options = ipc.IpcWriteOptions(compression=COMPRESSION)
    with ipc.new_file(str(ctx.out / EXAMPLES_FILE), schema, options=options) as sink:
        from tqdm.auto import tqdm  # progress on stderr, only on a terminal: --json stays clean

        records = iter_records(ctx.inputs[DATA] / "train.parquet", ["id", "system", "instruction", "response", "meta"])
        for record in tqdm(records, unit="ex", desc=ctx.stage.id, disable=(not ctx.runtime.progress) or None,
                           mininterval=1.0):
            example_id = record["id"]
            chosen = "" if cfg.teacherless else chosen_by_id.pop(example_id, None)
            if chosen is None:
                continue
            if cfg.teacherless:
                row = None  # no teacher: its empty rows are made below, once the response is tokenised
            elif every:  # every source aligned every example: read them all, in step
                rows = {s: a.next(example_id) for s, a in aligned.items()}
                row = rows[chosen]
            else:
                row = aligned[chosen].next(example_id)
            if row is not None and mode == "training" and row["response"] != record["response"]:
                raise ArtifactError(f"example {example_id!r}: align/{mode}/{chosen} holds another response than the "
                                    "ground truth in the data", where=where)
            response = record["response"] if mode == "training" or row is None else row["response"]
            history = conversation_history(record["meta"])  # a conversation's earlier turns: context, and labelled
            try:
                enc = encode_chat(tokenizer, record["system"] or "", record["instruction"], response, max_length=max_length,
                                  history=history)
            except ProfuserError as exc:
                raise type(exc)(f"example {example_id!r}: {exc.message}", where=where) from None
            input_ids = np.asarray(enc.input_ids, dtype=np.int32)  # [L]
            start = enc.response_start
            labelled = np.asarray(enc.label_ids, dtype=np.int32)  # [n]
            if row is None:
                row = _no_teacher(labelled)
            if not np.array_equal(labelled, row["target_ids"]):
                raise ArtifactError(
                    f"example {example_id!r}: the target tokenises the response into {len(labelled)} tokens here "
                    f"but align/{mode}/{chosen} aligned {len(row['target_ids'])} different ones (same target, template and "
                    "max_length needed)", where=where)
            k = row["teacher_ids"].shape[1]
            k_seen.add(k)
            if len(k_seen) > 1:
                raise ArtifactError(f"example {example_id!r}: teachers of different top-k ({sorted(k_seen)}) in one build",
                                    where=where)
            labels = input_ids.copy()
            if enc.positions is None:
                labels[:start] = IGNORE_INDEX  # the labelled positions are start..L-1, where the teacher rows go
            else:  # a conversation's labelled assistant turns, where the teacher rows go
                labels[:] = IGNORE_INDEX
                labels[enc.positions] = input_ids[enc.positions]
            gt_length = len(tokenizer(record["response"], add_special_tokens=False)["input_ids"])
            columns = {"category": list_column([row["category"]], pa.int8())}
            if "teacher_logz" in extra:
                if row["teacher_logz"] is None:
                    raise ArtifactError(f"align/{mode}/{chosen} has no teacher_logz column (its config lacks "
                                        "columns: [teacher_logz])", where=where)
                columns["teacher_logz"] = list_column([row["teacher_logz"]], pa.float32())
            entropy, top1 = teacher_stats(row["teacher_logits"], row["teacher_mask"])
            scores_text, rm_text = texts_by_id.get(example_id, (None, None))
            teachers = _all_teachers(example_id, chosen, row, rows, scores_by_id.pop(example_id), mode, where) if every else []
            sink.write_batch(pa.RecordBatch.from_arrays([
                pa.array([example_id], pa.string()),
                pa.array([mode], pa.string()),
                list_column([input_ids], pa.int32()),
                list_column([labels], pa.int32()),
                list_column([np.ascontiguousarray(row["teacher_ids"], dtype=np.int32)], pa.int32()),
                list_column([np.ascontiguousarray(row["teacher_logits"], dtype=np.float32)], pa.float32()),
                list_column([row["teacher_mask"]], pa.bool_()),
                pa.array([gt_length], pa.int32()),
                pa.array([chosen], pa.string()),  # the statistics (STATS_SCHEMA)
                pa.array([len(labelled)], pa.int32()),
                pa.array([entropy], pa.float32()),
                pa.array([top1], pa.float32()),
                pa.array([scores_text], pa.string()),
                pa.array([rm_text], pa.string()),
                *(columns[c] for c in extra),
                *teachers,
            ], schema=schema))
            examples += 1
            response_tokens += len(labelled)
            teacher_tokens += int(row["teacher_mask"].sum())
    if chosen_by_id:
        raise DataError(f"example {next(iter(chosen_by_id))!r} is selected but not in the data", where=where)
    for source in aligned.values():
        source.check_done()
    return {
        "mode": mode,
        "examples": examples,
        "response_tokens": response_tokens,
        "teacher_share": teacher_tokens / response_tokens if response_tokens else 0.0,
        "max_length": max_length,
    }
