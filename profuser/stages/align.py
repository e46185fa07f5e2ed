"""The ``align/<mode>/<source>`` stage: put one source's distributions on the target's tokens.

For every example this source won (``select``: ``chosen == source_key``; with ``all_examples`` in
its config, every selected example: a loss that needs all sources' teachers), in data order, it reads
the source's stored top-k logits on the response (``logits`` store, by id), tokenises the same conversation with the
target (``profuser.chat.encode_chat``: same chat formatting and truncation as the ``build`` stage),
aligns the two tokenisations of the response with the recipe's aligner and projects the source's
distributions onto the target vocabulary (``profuser.alignment.project``).

Memory does not grow with the data: the data file is streamed (``iter_records``) in chunks of
``CHUNK_RECORDS`` records; a chunk's examples are read from the store in storage order (the
logits stage sorts each such chunk by length, so this decodes each record batch once) and written
in data order, in row groups of ``ROWS_PER_GROUP``.

Writes ``aligned.parquet``, one row per example in data order (what lets ``build`` merge the
sources' files in one sequential pass): ``id``, ``response``, ``target_ids`` [n] (the
target's labelled tokens: the response's, and those of a conversation's labelled earlier
assistant turns before them), ``teacher_ids`` [n][k], ``teacher_logits`` [n][k] (raw, -inf unused),
``teacher_mask`` [n], ``category`` [n] (int8 codes of ``alignment.CATEGORIES``), and
``report.json``: the category shares and the aligner's speed (target tokens per second). With
``columns: [teacher_logz]`` in its config (a loss that needs it) also ``teacher_logz`` [n], the
teacher logits' log-partition (``alignment.Teacher.logz``).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from ..alignment import AlignmentCounts, ProjectionParams, project, vocab_map
from ..artifacts import CHUNK_RECORDS, iter_chunks, iter_records, list_column, read_selection
from ..chat import conversation_history, response_of, target_max_length
from ..components import Mode, Tokenized
from ..errors import ArtifactError, DataError, ProfuserError
from . import ModelIdentity, Ref, StageConfig

VERSION = "2"  # 2: rows in data order (1: in the logits store's order)
ROWS_PER_GROUP = 256  # examples per parquet row group: bounds the memory of a write

ALIGNED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("response", pa.string()),
    ("target_ids", pa.list_(pa.int32())),  # [n]
    ("teacher_ids", pa.list_(pa.list_(pa.int32()))),  # [n][k]
    ("teacher_logits", pa.list_(pa.list_(pa.float32()))),  # [n][k]
    ("teacher_mask", pa.list_(pa.bool_())),  # [n]
    ("category", pa.list_(pa.int8())),  # [n]
])


# input roles: the source's logits store, the selection of this mode, the data stage
LOGITS, SELECTION, DATA = "logits", "select", "data"
EXTRA_COLUMNS = ("teacher_logz",)  # what a loss may ask this stage for (Loss.needs)


class Config(StageConfig):
    mode: Mode
    aligner: Ref
    target: ModelIdentity
    source: ModelIdentity
    source_key: str
    max_length: int  # train.max_length: the target's truncation, as build's
    columns: list[str] = Field(default_factory=list)  # extra columns (EXTRA_COLUMNS) the loss needs; hashed only when any
    # every selected example, not only those this source won (a loss that needs all_teachers); hashed only when set
    all_examples: bool = False

    OMITTED_WHEN_UNSET = ("columns", "all_examples")


def won_ids(select_dir, source_key: str) -> list[str]:
    """The ids this source won, in the selection's (data) order."""
    return [i for i, s in read_selection(select_dir).items() if s.chosen == source_key]


def selected_ids(select_dir) -> list[str]:
    """Every selected example, whichever source won it (``all_examples``), in data order."""
    return list(read_selection(select_dir))


def run(ctx) -> dict:
    from tqdm.auto import tqdm

    from ..chat import encode_chat
    from ..logits_store import LogitsReader
    from ..models import load_tokenizer

    cfg = ctx.config
    mode, source_key = cfg.mode, cfg.source_key
    where = ctx.stage.id
    aligner = ctx.build("aligners", cfg.aligner)
    params = aligner.params if isinstance(aligner.params, ProjectionParams) else ProjectionParams()
    cache_dir = ctx.runtime.cache_dir
    target_tok = load_tokenizer(cfg.target, cache_dir=cache_dir, engine=ctx.engine)
    source_tok = load_tokenizer(cfg.source, cache_dir=cache_dir, engine=ctx.engine)
    vmap = vocab_map(source_tok, target_tok, cache_dir=cache_dir)
    max_length = target_max_length(target_tok, cfg.max_length)

    every = cfg.all_examples  # a loss that needs every source's teacher: else as before
    ids = selected_ids(ctx.inputs[SELECTION]) if every else won_ids(ctx.inputs[SELECTION], source_key)
    why = "is selected" if every else f"was won by {source_key!r}"
    reader = LogitsReader(ctx.inputs[LOGITS])
    counts = AlignmentCounts()
    align_seconds = 0.0
    source_tokens = 0
    rows: list[dict] = []

    def align_one(record: dict) -> dict:
        nonlocal align_seconds, source_tokens
        example_id = record["id"]
        ex = reader.get(example_id)
        # a conversation: the store holds its labelled turns' text (chat.labelled_text), the response last
        history = conversation_history(record["meta"])
        try:
            response = response_of(ex.response, history)
            enc = encode_chat(target_tok, record["system"] or "", record["instruction"], response,
                              max_length=max_length, history=history)
        except ProfuserError as exc:
            raise type(exc)(f"example {example_id!r}: {exc.message}", where=f"{where} (target)") from None
        target_ids = np.asarray(enc.label_ids, dtype=np.int32)  # [n]
        target = Tokenized(ex.response, target_ids, enc.response_offsets,
                           target_tok.convert_ids_to_tokens(target_ids.tolist()))
        source = Tokenized(ex.response, ex.token_ids, ex.offsets, source_tok.convert_ids_to_tokens(ex.token_ids.tolist()))
        t0 = time.perf_counter()
        try:
            starts, ends = aligner.align(target, source)
        except Exception as exc:  # an aligner's failure must name the example it failed on
            raise ProfuserError(f"example {example_id!r}: aligner {cfg.aligner.name!r} failed: "
                                f"{type(exc).__name__}: {exc}", where=where) from exc
        align_seconds += time.perf_counter() - t0
        teacher = project(target_ids, ex.token_ids, ex.topk_ids, ex.topk_logits, ex.logz, ex.nll, starts, ends,
                          vmap, params)
        counts.add(teacher.category)
        source_tokens += ex.n_tokens
        return {"id": example_id, "response": response, "target_ids": target_ids, "teacher": teacher}

    with_logz = "teacher_logz" in cfg.columns  # only for a loss that needs it: else as before
    schema = ALIGNED_SCHEMA.append(pa.field("teacher_logz", pa.list_(pa.float32()))) if with_logz else ALIGNED_SCHEMA
    with pq.ParquetWriter(ctx.out / "aligned.parquet", schema) as sink:
        def flush() -> None:
            if rows:
                sink.write_table(pa.Table.from_arrays([
                    pa.array([r["id"] for r in rows], pa.string()),
                    pa.array([r["response"] for r in rows], pa.string()),
                    list_column([r["target_ids"] for r in rows], pa.int32()),
                    list_column([r["teacher"].ids for r in rows], pa.int32()),
                    list_column([r["teacher"].logits for r in rows], pa.float32()),
                    list_column([r["teacher"].mask for r in rows], pa.bool_()),
                    list_column([r["teacher"].category for r in rows], pa.int8()),
                    *([list_column([r["teacher"].logz for r in rows], pa.float32())] if with_logz else []),
                ], schema=schema))
                rows.clear()

        for example_id in ids:
            if example_id not in reader:
                raise ArtifactError(f"example {example_id!r} {why} but is not in the logits store of {source_key!r}",
                                    where=where)
        won = set(ids)
        # on stderr, and only on a terminal (disable=None): stdout and every --json stay clean
        bar = tqdm(total=len(ids), unit="ex", desc=where, disable=(not ctx.runtime.progress) or None, mininterval=1.0)
        for chunk in iter_chunks(iter_records(ctx.inputs[DATA] / "train.parquet", ["id", "system", "instruction", "meta"]),
                                 CHUNK_RECORDS):
            todo = []
            for record in chunk:
                if record["id"] in won:
                    won.discard(record["id"])
                    todo.append(record)
            # the store is length-sorted within chunks of prompts (the logits stage): read this
            # chunk's examples in storage order, so each record batch is decoded once, and write
            # them in data order
            done: dict[str, dict] = {}
            for record in sorted(todo, key=lambda r: reader.position(r["id"])):
                done[record["id"]] = align_one(record)
                bar.update()
            for record in todo:
                rows.append(done.pop(record["id"]))
                if len(rows) >= ROWS_PER_GROUP:
                    flush()
        flush()
        bar.close()
    if won:
        missing = next(i for i in ids if i in won)
        raise DataError(f"example {missing!r} is selected but not in the data", where=where)
    vmap.save()

    report = {
        "mode": mode,
        "source": source_key,
        "aligner": cfg.aligner.name,
        "projection": params.model_dump(),
        "examples": len(ids),
        "target_tokens": counts.tokens,
        "source_tokens": source_tokens,
        "align_seconds": align_seconds,
        "tokens_per_second": counts.tokens / align_seconds if align_seconds > 0 else 0.0,
        **counts.shares(),
    }
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return report
