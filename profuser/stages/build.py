"""The ``build/<mode>`` stage: the trainer's examples of one mode, in the target's tokens.

For every selected example it takes the response (training mode: the ground truth from the data;
inference mode: the chosen source's response, stored by its ``align`` stage), tokenises the whole
conversation with the target (``profuser.chat.encode_chat``, same truncation as ``align``), checks
that the response tokens are exactly those the ``align`` stage put the teacher on, and writes
``examples.parquet`` as docs/architecture.md specifies: ``id``, ``mode``, ``input_ids`` [L],
``labels`` [L] (-100 on the prompt), ``teacher_ids`` [L][k], ``teacher_logits`` [L][k] (-inf
unused), ``teacher_mask`` [L] (False on the prompt), ``gt_length`` (target tokens of the ground-truth
response alone: the length the curricula sort by, the same in both modes).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data import read_records
from ..errors import ArtifactError, DataError, ProfuserError
from ..training.data import SCHEMA as TRAINER_SCHEMA
from .align import list_column, target_max_length

VERSION = "1"
ROWS_PER_GROUP = 256

EXAMPLES_SCHEMA = TRAINER_SCHEMA.insert(1, pa.field("mode", pa.string()))  # what the trainer reads, + the mode


class _Aligned:
    """One source's ``aligned.parquet``, rows fetched by id as numpy arrays."""

    def __init__(self, path, source: str):
        self.source = source
        self.table = pq.read_table(path / "aligned.parquet")
        self.row = {example_id: i for i, example_id in enumerate(self.table["id"].to_pylist())}

    def get(self, example_id: str) -> dict:
        i = self.row[example_id]
        row = self.table.slice(i, 1)
        target_ids = row["target_ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False)  # [n]
        n = len(target_ids)
        ids = row["teacher_ids"].combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)  # [n * k]
        logits = row["teacher_logits"].combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
        k = len(ids) // n if n else 0
        return {
            "response": row["response"][0].as_py(),
            "target_ids": target_ids,
            "teacher_ids": ids.reshape(n, k),
            "teacher_logits": logits.reshape(n, k),
            "teacher_mask": row["teacher_mask"].combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(bool),
        }


def run(ctx) -> dict:
    from ..chat import encode_chat
    from ..models import load_tokenizer

    cfg = ctx.config
    mode = cfg["mode"]
    where = ctx.stage.id
    if mode not in ("training", "inference"):
        raise ProfuserError(f"unknown mode {mode!r} (inference or training)", where=where)
    tokenizer = load_tokenizer(cfg["target"], cache_dir=ctx.runtime.cache_dir)
    max_length = target_max_length(tokenizer, cfg["max_length"])
    records = {r.id: r for r in read_records(ctx.inputs["data"] / "train.parquet")}
    selection = pq.read_table(ctx.inputs["select"] / "selection.parquet", columns=["id", "chosen"])
    aligned = {s: _Aligned(ctx.inputs[f"align/{s}"], s) for s in cfg["sources"]}

    rows: list[dict] = []
    examples = response_tokens = teacher_tokens = 0
    k_seen: set[int] = set()
    with pq.ParquetWriter(ctx.out / "examples.parquet", EXAMPLES_SCHEMA) as sink:
        def flush() -> None:
            if rows:
                sink.write_table(pa.Table.from_arrays([
                    pa.array([r["id"] for r in rows], pa.string()),
                    pa.array([mode] * len(rows), pa.string()),
                    list_column([r["input_ids"] for r in rows], pa.int32()),
                    list_column([r["labels"] for r in rows], pa.int32()),
                    list_column([r["teacher_ids"] for r in rows], pa.int32()),
                    list_column([r["teacher_logits"] for r in rows], pa.float32()),
                    list_column([r["teacher_mask"] for r in rows], pa.bool_()),
                    pa.array([r["gt_length"] for r in rows], pa.int32()),
                ], schema=EXAMPLES_SCHEMA))
                rows.clear()

        for example_id, chosen in zip(selection["id"].to_pylist(), selection["chosen"].to_pylist()):
            if chosen not in aligned:
                raise ProfuserError(f"example {example_id!r}: the chosen source {chosen!r} is not among the sources "
                                    f"({', '.join(cfg['sources'])})", where=where)
            if example_id not in records:
                raise DataError(f"example {example_id!r} is selected but not in the data", where=where)
            if example_id not in aligned[chosen].row:
                raise ArtifactError(f"example {example_id!r} was won by {chosen!r} but align/{mode}/{chosen} has no row for it",
                                    where=where)
            record, row = records[example_id], aligned[chosen].get(example_id)
            if mode == "training" and row["response"] != record.response:
                raise ArtifactError(f"example {example_id!r}: align/{mode}/{chosen} holds another response than the "
                                    "ground truth in the data", where=where)
            response = record.response if mode == "training" else row["response"]
            try:
                enc = encode_chat(tokenizer, record.system, record.instruction, response, max_length=max_length)
            except ProfuserError as exc:
                raise type(exc)(f"example {example_id!r}: {exc.message}", where=where) from None
            input_ids = np.asarray(enc.input_ids, dtype=np.int32)  # [L]
            start = enc.response_start
            if not np.array_equal(input_ids[start:], row["target_ids"]):
                raise ArtifactError(
                    f"example {example_id!r}: the target tokenises the response into {len(input_ids) - start} tokens here "
                    f"but align/{mode}/{chosen} aligned {len(row['target_ids'])} different ones (same target, template and "
                    "max_length needed)", where=where)
            L, k = len(input_ids), row["teacher_ids"].shape[1]
            k_seen.add(k)
            if len(k_seen) > 1:
                raise ArtifactError(f"example {example_id!r}: teachers of different top-k ({sorted(k_seen)}) in one build",
                                    where=where)
            labels = input_ids.copy()
            labels[:start] = -100
            teacher_ids = np.zeros((L, k), dtype=np.int32)  # [L, k]; prompt rows: no teacher
            teacher_logits = np.full((L, k), -np.inf, dtype=np.float32)  # [L, k]
            teacher_mask = np.zeros(L, dtype=bool)  # [L]
            teacher_ids[start:] = row["teacher_ids"]
            teacher_logits[start:] = row["teacher_logits"]
            teacher_mask[start:] = row["teacher_mask"]
            gt_length = len(tokenizer(record.response, add_special_tokens=False)["input_ids"])
            rows.append({"id": example_id, "input_ids": input_ids, "labels": labels, "teacher_ids": teacher_ids,
                         "teacher_logits": teacher_logits, "teacher_mask": teacher_mask, "gt_length": gt_length})
            examples += 1
            response_tokens += L - start
            teacher_tokens += int(teacher_mask.sum())
            if len(rows) >= ROWS_PER_GROUP:
                flush()
        flush()
    return {
        "mode": mode,
        "examples": examples,
        "response_tokens": response_tokens,
        "teacher_share": teacher_tokens / response_tokens if response_tokens else 0.0,
        "max_length": max_length,
    }
