"""Instruction data: row formats, file readers, normalisation, dedup, sampling, splits, and the
parquet files the ``data`` stage writes and every later stage reads.

Dataset sources (``plugins/datasets/``) read rows and turn them into ``Record`` with
``rows_to_records``; the ``data`` stage then dedups, samples and splits with the helpers here.
Everything is deterministic: the same input and seed give the same records in the same order.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import model_validator

from .components import BadRow, Record, StrictModel
from .errors import DataError

Format = Literal["auto", "openorca", "alpaca", "messages", "sharegpt", "columns"]
ROW_FORMATS = ("openorca", "alpaca", "messages", "sharegpt", "columns")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
RECORD_COLUMNS = ("id", "system", "instruction", "response", "meta")
RECORD_SCHEMA = pa.schema([(name, pa.string()) for name in RECORD_COLUMNS])


# --- row formats --------------------------------------------------------------------------------


class ColumnMap(StrictModel):
    """Which field of a row holds what (``format: columns``). ``input`` is appended to the
    instruction after a blank line, as in Alpaca; a row without ``id`` gets a content hash."""

    instruction: str
    response: str
    id: str | None = None
    system: str | None = None
    input: str | None = None


class RowFormatParams(StrictModel):
    """The params every row-reading source shares: the row format and an optional column map."""

    format: Format = "auto"
    columns: ColumnMap | None = None

    @model_validator(mode="after")
    def _columns_go_with_format(self):
        if self.format == "columns" and self.columns is None:
            raise ValueError("format 'columns' needs a `columns:` mapping (instruction, response, ...)")
        if self.columns is not None and self.format not in ("auto", "columns"):
            raise ValueError(f"`columns:` is a format of its own; it cannot be combined with format {self.format!r}")
        return self

    @property
    def row_format(self) -> str:
        return "columns" if self.columns is not None else self.format


def detect_format(row: dict[str, Any]) -> str | None:
    """The row format its keys suggest, or None."""
    keys = set(row)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"question", "response"} <= keys:
        return "openorca"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return None


class _Bad(Exception):
    """A row-level problem: becomes a ``BadRow`` (the recipe's ``on_bad_row`` decides)."""


def _text(row: dict, key: str, *, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise _Bad(f"missing field {key!r}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise _Bad(f"field {key!r} is not a string (got {type(value).__name__})")
    return value


def _join_input(instruction: str, extra: str) -> str:
    # Alpaca's convention: the optional input follows the instruction after a blank line.
    if instruction.strip() and extra.strip():
        return f"{instruction}\n\n{extra}"
    return instruction if instruction.strip() else extra


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "system": "system"}


def _turns(row: dict, key: str, role_key: str, text_key: str, roles: dict[str, str] | None) -> list[tuple[str, str]]:
    turns = row.get(key)
    if turns is None:
        raise _Bad(f"missing field {key!r}")
    if not isinstance(turns, list):
        raise _Bad(f"field {key!r} is not a list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Bad(f"{key}[{i}] is not an object")
        role, text = turn.get(role_key), turn.get(text_key)
        if not isinstance(role, str):
            raise _Bad(f"{key}[{i}] has no {role_key!r}")
        if not isinstance(text, str):
            raise _Bad(f"{key}[{i}] has no {text_key!r} text")
        if roles is not None:
            if role.lower() not in roles:
                raise _Bad(f"{key}[{i}] has unknown {role_key!r} {role!r} (known: {', '.join(sorted(roles))})")
            role = roles[role.lower()]
        out.append((role, text))
    return out


def _from_turns(row: dict, turns: list[tuple[str, str]], consumed: set[str]) -> tuple[str, str, str, dict]:
    """(system, instruction, response, extra meta) of a conversation: the last assistant turn is the
    response, the user turn before it the instruction; earlier turns are kept as ``history``."""
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise _Bad("no assistant turn")
    user = max((i for i, (role, _) in enumerate(turns[:last]) if role == "user"), default=None)
    if user is None:
        raise _Bad("no user turn before the last assistant turn")
    systems = [text for role, text in turns if role == "system"]
    system = systems[0] if systems else _text(row, "system", required=False)
    consumed.add("system")
    history = [{"role": role, "content": text} for role, text in turns[:user] if role != "system"]
    return system, turns[user][1], turns[last][1], ({"history": history} if history else {})


def _convert(row: dict, fmt: str, columns: ColumnMap | None) -> tuple[str | None, str, str, str, dict, set[str]]:
    """(id, system, instruction, response, extra meta, consumed keys) of one row in ``fmt``."""
    extra: dict = {}
    if fmt == "openorca":
        consumed = {"id", "system_prompt", "question", "response"}
        system, instruction, response = _text(row, "system_prompt", required=False), _text(row, "question"), _text(row, "response")
    elif fmt == "alpaca":
        consumed = {"id", "system", "instruction", "input", "output"}
        instruction = _join_input(_text(row, "instruction"), _text(row, "input", required=False))
        system, response = _text(row, "system", required=False), _text(row, "output")
    elif fmt == "messages":
        consumed = {"id", "messages"}
        system, instruction, response, extra = _from_turns(row, _turns(row, "messages", "role", "content", None), consumed)
    elif fmt == "sharegpt":
        consumed = {"id", "conversations"}
        turns = _turns(row, "conversations", "from", "value", _SHAREGPT_ROLES)
        system, instruction, response, extra = _from_turns(row, turns, consumed)
    elif fmt == "columns":
        assert columns is not None
        consumed = {c for c in (columns.instruction, columns.response, columns.id, columns.system, columns.input) if c}
        instruction = _text(row, columns.instruction)
        if columns.input:
            instruction = _join_input(instruction, _text(row, columns.input, required=False))
        system = _text(row, columns.system, required=False) if columns.system else ""
        response = _text(row, columns.response)
        row_id = row.get(columns.id) if columns.id else None
        return (None if row_id is None else str(row_id)), system, instruction, response, extra, consumed
    else:
        raise ValueError(f"unknown row format {fmt!r}")
    row_id = row.get("id")
    return (None if row_id is None else str(row_id)), system, instruction, response, extra, consumed


def content_id(system: str, instruction: str, response: str) -> str:
    """A stable id for a row that has none: a hash of its content."""
    digest = hashlib.sha256(json.dumps([system, instruction, response], ensure_ascii=False).encode()).hexdigest()
    return f"h{digest[:16]}"


def _jsonable(value: Any) -> Any:
    # Parquet and hub rows may hold dates, bytes or decimals: keep them as strings in meta.
    return json.loads(json.dumps(value, default=str, ensure_ascii=False))


def row_to_record(row: Any, fmt: str, where: str, columns: ColumnMap | None = None) -> Record | BadRow:
    """One row in the given format as a ``Record`` (or a ``BadRow`` saying why it is unusable)."""
    if not isinstance(row, dict):
        return BadRow(where, f"row is not an object (got {type(row).__name__})")
    try:
        row_id, system, instruction, response, extra, consumed = _convert(row, fmt, columns)
    except _Bad as exc:
        return BadRow(where, str(exc))
    if not instruction.strip():
        return BadRow(where, "empty instruction")
    if not response.strip():
        return BadRow(where, "empty response")
    meta = {k: _jsonable(v) for k, v in row.items() if k not in consumed}
    meta.update(extra)
    meta["where"] = where
    return Record(row_id if row_id else content_id(system, instruction, response), system, instruction, response, meta)


def rows_to_records(rows: Iterable[tuple[str, Any]], params: RowFormatParams) -> Iterator[Record | BadRow]:
    """Convert ``(where, row)`` pairs. ``format: auto`` decides from the first object row's keys;
    a row that is already a ``BadRow`` (say, an invalid JSON line) passes through."""
    fmt = params.row_format
    for where, row in rows:
        if isinstance(row, BadRow):
            yield row
            continue
        if not isinstance(row, dict):
            yield BadRow(where, f"row is not an object (got {type(row).__name__})")
            continue
        if fmt == "auto":
            fmt = detect_format(row) or ""
            if not fmt:
                raise DataError(
                    f"cannot tell the row format from its fields ({', '.join(sorted(map(str, row))) or 'none'}); "
                    "set `format:` (openorca, alpaca, messages, sharegpt) or a `columns:` mapping",
                    where=where,
                )
        yield row_to_record(row, fmt, where, params.columns)


# --- files --------------------------------------------------------------------------------------


def data_files(path: Path, split: str | None = None) -> list[Path]:
    """The data files a ``path`` names: the file itself, or the data files under a directory
    (recursively, sorted), restricted to ``split`` when given (a folder named ``split`` or a file
    named ``split``, ``split-*``, ``split_*`` or ``split.*``)."""
    if not path.exists():
        raise DataError("file not found", where=str(path))
    if path.is_file():
        if split is not None:
            raise DataError(f"`split: {split}` only applies to a directory of data files", where=str(path))
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES and not p.name.startswith("."))
    if split is not None:
        pattern = re.compile(rf"^{re.escape(split)}([-_.]|$)")
        files = [p for p in files if split in p.relative_to(path).parts[:-1] or pattern.match(p.name)]
    if not files:
        wanted = f" for split {split!r}" if split else ""
        raise DataError(f"no data files ({', '.join(DATA_SUFFIXES)}){wanted} in the directory", where=str(path))
    return files


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of one file: JSONL (one object a line), JSON (an array of rows,
    an object with a ``data`` array, or JSONL named .json) or parquet. ``where`` is ``file:line``
    (``file:row N`` for parquet). An invalid JSONL line comes as a ``BadRow``; a JSON document
    that does not parse at all raises ``DataError``."""
    if not path.is_file():
        raise DataError("file not found", where=str(path))
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json" and not _is_jsonl(text):
        yield from _json_rows(text, path)
    else:
        yield from _jsonl_rows(text, path)


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, BadRow(where, f"invalid JSON: {exc.msg} (column {exc.colno})")


def _is_jsonl(text: str) -> bool:
    """A .json file holding one object per line (many hub datasets name JSONL files .json)."""
    start = _skip_ws(text, 0)
    if not text.startswith("{", start):
        return False
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return False
    return _skip_ws(text, end) < len(text)


_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _json_rows(text: str, path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a JSON array (top level or under ``data``), each located at the line it starts on.
    The stdlib decoder parses each value; this walk only steps over brackets, keys and commas."""
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)

    def fail(pos: int, message: str):
        line, col = lines.at(pos), pos - text.rfind("\n", 0, pos)
        return DataError(f"invalid JSON: {message} (column {col})", where=f"{path}:{line}")

    def expect(pos: int, char: str) -> int:
        pos = _skip_ws(text, pos)
        if not text.startswith(char, pos):
            raise fail(pos, f"expected {char!r}")
        return pos + 1

    def array(pos: int) -> tuple[list[tuple[int, Any]], int]:
        items: list[tuple[int, Any]] = []
        pos = _skip_ws(text, expect(pos, "["))
        if text.startswith("]", pos):
            return items, pos + 1
        while True:
            item, end = decoder.raw_decode(text, pos)
            items.append((pos, item))
            pos = _skip_ws(text, end)
            if text.startswith("]", pos):
                return items, pos + 1
            pos = _skip_ws(text, expect(pos, ","))

    try:
        pos = _skip_ws(text, 0)
        if text.startswith("[", pos):
            items, pos = array(pos)
        elif text.startswith("{", pos):
            items, pos = None, _skip_ws(text, pos + 1)
            while not text.startswith("}", pos):
                key, pos = decoder.raw_decode(text, pos)
                pos = _skip_ws(text, expect(pos, ":"))
                if key == "data" and text.startswith("[", pos):
                    items, pos = array(pos)
                else:
                    _, pos = decoder.raw_decode(text, pos)
                pos = _skip_ws(text, pos)
                if not text.startswith("}", pos):
                    pos = _skip_ws(text, expect(pos, ","))
            pos += 1
            if items is None:
                raise DataError('expected an array of rows or an object with a "data" array', where=str(path))
        else:
            raise DataError('expected an array of rows or an object with a "data" array', where=str(path))
        if _skip_ws(text, pos) < len(text):
            raise fail(_skip_ws(text, pos), "extra data after the end")
    except json.JSONDecodeError as exc:
        raise fail(exc.pos, exc.msg) from None
    for pos, item in items:
        yield f"{path}:{lines.at(pos)}", item


class _LineCounter:
    """Line numbers of increasing offsets in one pass (rows come in file order)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self.pos:
            return self.text.count("\n", 0, pos) + 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"not a readable parquet file: {exc}", where=str(path)) from None
    n = 0
    for batch in file.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:row {n}", row


# --- normalisation, dedup, sampling, splits -----------------------------------------------------


def normalise_text(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: the form two texts are compared in."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dedup_key(record: Record) -> str:
    return hashlib.sha256(f"{normalise_text(record.instruction)}\x00{normalise_text(record.response)}".encode()).hexdigest()


def dedup(records: Iterable[Record]) -> tuple[list[Record], int]:
    """Drop records whose normalised instruction and response repeat an earlier one's; returns
    (kept records in order, number removed)."""
    seen: set[str] = set()
    kept, removed = [], 0
    for record in records:
        key = dedup_key(record)
        if key in seen:
            removed += 1
        else:
            seen.add(key)
            kept.append(record)
    return kept, removed


def unique_ids(records: list[Record]) -> tuple[list[Record], int]:
    """Later stages key everything by id: a repeated id gets ``#2``, ``#3``, ... appended.
    Returns the records and how many were renamed."""
    seen: dict[str, int] = {}
    taken = {r.id for r in records}
    renamed = 0
    for record in records:
        if record.id not in seen:
            seen[record.id] = 1
            continue
        while True:
            seen[record.id] += 1
            candidate = f"{record.id}#{seen[record.id]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        record.id = candidate
        renamed += 1
    return records, renamed


def sample(records: list[Record], n: int | None, seed: int) -> list[Record]:
    """``n`` records drawn uniformly with ``seed``, kept in their original order (all when
    ``n`` is None or not smaller than the number of records)."""
    if n is None or n >= len(records):
        return list(records)
    picked = sorted(random.Random(f"profuser-sample:{seed}").sample(range(len(records)), n))
    return [records[i] for i in picked]


def heldout_count(total: int, heldout: float) -> int:
    """How many of ``total`` records to hold out: a share when ``heldout < 1``, else a count."""
    if heldout < 0:
        raise DataError(f"heldout must not be negative (got {heldout})", where="data.heldout")
    if heldout < 1:
        return math.floor(total * heldout + 0.5)  # half up: 0.1 of 5 holds out 1
    if heldout != int(heldout):
        raise DataError(f"a held-out count must be a whole number (got {heldout}); use a share < 1 for a fraction",
                        where="data.heldout")
    return int(heldout)


def split(records: list[Record], heldout: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held-out): the held-out records are drawn with ``seed``; both keep the input order."""
    k = heldout_count(len(records), heldout)
    if k >= len(records) and records:
        raise DataError(f"holding out {k} of {len(records)} records leaves nothing to train on", where="data.heldout")
    chosen = set(random.Random(f"profuser-heldout:{seed}").sample(range(len(records)), k))
    train = [r for i, r in enumerate(records) if i not in chosen]
    held = [r for i, r in enumerate(records) if i in chosen]
    return train, held


# --- the data stage's files ---------------------------------------------------------------------


def write_records(path: Path, records: list[Record]) -> None:
    """Write records as parquet (id, system, instruction, response, meta as a JSON string)."""
    table = pa.table({
        "id": [r.id for r in records],
        "system": [r.system for r in records],
        "instruction": [r.instruction for r in records],
        "response": [r.response for r in records],
        "meta": [json.dumps(r.meta, sort_keys=True, ensure_ascii=False) for r in records],
    }, schema=RECORD_SCHEMA)
    pq.write_table(table, path)


def read_records(path: str | Path) -> list[Record]:
    """The records of a ``train.parquet`` / ``heldout.parquet`` written by the data stage."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", where=str(path))
    table = pq.read_table(path)
    missing = [c for c in RECORD_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"not a records file: missing column(s) {', '.join(missing)}", where=str(path))
    columns = [table[c].to_pylist() for c in RECORD_COLUMNS]
    return [Record(i, s or "", q, r, json.loads(m) if m else {}) for i, s, q, r, m in zip(*columns)]


# --- answers of the built-in tasks --------------------------------------------------------------

_ANSWER_LINE = re.compile(r"^\s*\**\s*(?:final\s+)?answer\s*\**\s*:\s*\**\s*(.*?)\s*\**\s*$", re.IGNORECASE | re.MULTILINE)


def extract_answer(text: str) -> str | None:
    """The text after the last ``Answer:`` line of a response (None when there is none)."""
    found = _ANSWER_LINE.findall(text)
    return found[-1] if found else None


def normalise_answer(text: str) -> str:
    """Case, spaces, a trailing full stop and surrounding quotes do not count in exact match."""
    text = normalise_text(text).rstrip(".").strip().strip("\"'`").strip()
    return re.sub(r"\s*,\s*", ", ", text)
