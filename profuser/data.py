"""Instruction data: row formats, file readers, normalisation, dedup, sampling, splits, and the
parquet files the ``data`` stage writes and every later stage reads.

Dataset sources (``plugins/datasets/``) read rows and turn them into ``Record`` with
``rows_to_records``; the ``data`` stage then dedups, samples and splits with the helpers here.
Everything is deterministic: the same input and seed give the same records in the same order.
"""

from __future__ import annotations

import codecs
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
from pydantic import Field, model_validator

from .components import BadRow, Record, StrictModel
from .errors import DataError

Format = Literal["auto", "openorca", "alpaca", "messages", "sharegpt", "orca_best", "columns"]
ROW_FORMATS = ("openorca", "alpaca", "messages", "sharegpt", "orca_best", "columns")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
RECORD_COLUMNS = ("id", "system", "instruction", "response", "meta")
RECORD_SCHEMA = pa.schema([(name, pa.string()) for name in RECORD_COLUMNS])


# --- row formats --------------------------------------------------------------------------------


class ColumnMap(StrictModel):
    """Which field of a row holds what (``format: columns``). A value is a field name or a dotted
    path into nested rows (``cluster.samples.0.output``: integers index lists). ``input`` is
    appended to the instruction after a blank line, as in Alpaca; a row without ``id`` gets a
    content hash. ``messages`` names a field holding a whole conversation instead of
    ``instruction`` and ``response``: a list of ``{role, content}`` (OpenAI) or ``{from, value}``
    (ShareGPT) turns, read as ``format: messages`` / ``sharegpt`` read theirs."""

    instruction: str | None = None
    response: str | None = None
    id: str | None = None
    system: str | None = None
    input: str | None = None
    messages: str | None = None

    @model_validator(mode="after")
    def _one_layout(self):
        if self.messages is not None:
            both = [name for name in ("instruction", "response", "input") if getattr(self, name) is not None]
            if both:
                raise ValueError(f"`messages` holds the whole conversation: drop {', '.join(both)}")
        elif self.instruction is None or self.response is None:
            raise ValueError("name `instruction` and `response` (or `messages`, a field holding the turns)")
        return self


class RowFormatParams(StrictModel):
    """The params every row-reading source shares: the row format, an optional column map, and
    which samples of an Orca-Best cluster become records."""

    format: Format = "auto"
    columns: ColumnMap | None = None
    samples: Literal["one", "all"] = Field(
        default="one", description="orca_best: one sample per cluster (drawn with data.seed), or all of them")

    @model_validator(mode="after")
    def _columns_go_with_format(self):
        if self.format == "columns" and self.columns is None:
            raise ValueError("format 'columns' needs a `columns:` mapping (instruction, response, ...)")
        if self.columns is not None and self.format not in ("auto", "columns"):
            raise ValueError(f"`columns:` is a format of its own; it cannot be combined with format {self.format!r}")
        if self.samples != "one" and self.format not in ("auto", "orca_best"):
            raise ValueError(f"`samples:` applies to format 'orca_best', not {self.format!r}")
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
    if {"instruction", "cluster"} <= keys:
        return "orca_best"
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


def _from_turns(row: dict, turns: list[tuple[str, str]], consumed: set[str],
                system: str | None = None) -> tuple[str, str, str, dict]:
    """(system, instruction, response, extra meta) of a conversation: the last assistant turn is the
    response, the user turn before it the instruction; earlier turns are kept as ``history``
    (``[{role, content}]``, every stage reads them as the conversation's context and labels its
    assistant turns). ``system``: the system text when the row has no system turn (default: its
    ``system`` field)."""
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise _Bad("no assistant turn")
    user = max((i for i, (role, _) in enumerate(turns[:last]) if role == "user"), default=None)
    if user is None:
        raise _Bad("no user turn before the last assistant turn")
    systems = [text for role, text in turns if role == "system"]
    if systems:
        system = systems[0]
    elif system is None:
        system = _text(row, "system", required=False)
    consumed.add("system")
    history = [{"role": role, "content": text} for role, text in turns[:user] if role != "system"]
    return system, turns[user][1], turns[last][1], ({"history": history} if history else {})


def _column_turns(row: dict, path: str) -> list[tuple[str, str]]:
    """The turns of a ``columns: {messages: PATH}`` field: OpenAI (``role``/``content``) or
    ShareGPT (``from``/``value``) turns, told apart by the first turn's keys."""
    value = _lookup(row, path)
    if value is _MISSING or value is None:
        raise _Bad(f"missing field {path!r}")
    first = value[0] if isinstance(value, list) and value else None
    sharegpt = isinstance(first, dict) and "from" in first and "role" not in first
    holder = {path: value}
    if sharegpt:
        return _turns(holder, path, "from", "value", _SHAREGPT_ROLES)
    return _turns(holder, path, "role", "content", None)


_MISSING = object()


def _lookup(row: dict, path: str) -> Any:
    """The value at ``path`` in a row: a top-level field of that exact name, else a dotted path
    (``cluster.samples.0.output``; an integer segment indexes a list). ``_MISSING`` when the
    last segment is absent; a broken path before it is a ``_Bad`` naming the segment."""
    if path in row or "." not in path:
        return row.get(path, _MISSING)
    value: Any = row
    parts = path.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "the row"
        if isinstance(value, dict):
            if part not in value:
                if i == len(parts) - 1:
                    return _MISSING
                raise _Bad(f"missing field {path!r}: {here} has no field {part!r}")
            value = value[part]
        elif isinstance(value, list):
            if not re.fullmatch(r"-?\d+", part):
                raise _Bad(f"missing field {path!r}: {here} is a list, {part!r} is not an index")
            index = int(part)
            if not -len(value) <= index < len(value):
                raise _Bad(f"missing field {path!r}: {here} has {len(value)} item(s), no index {index}")
            value = value[index]
        else:
            raise _Bad(f"missing field {path!r}: {here} is {_kind(value)}, not an object or list")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _path_text(row: dict, path: str, *, required: bool = True) -> str:
    value = _lookup(row, path)
    if value is _MISSING or value is None:
        if required:
            raise _Bad(f"missing field {path!r}")
        return ""
    if not isinstance(value, str):
        raise _Bad(f"field {path!r} is not a string (got {type(value).__name__})")
    return value


def _orca_best_samples(row: dict) -> list:
    """The ``cluster.samples`` list of an Orca-Best row (checked to be a non-empty list)."""
    cluster = row.get("cluster")
    if cluster is None:
        raise _Bad("missing field 'cluster'")
    if not isinstance(cluster, dict):
        raise _Bad(f"field 'cluster' is not an object (got {type(cluster).__name__})")
    found = cluster.get("samples")
    if found is None:
        raise _Bad("missing field 'cluster.samples'")
    if not isinstance(found, list):
        raise _Bad(f"field 'cluster.samples' is not a list (got {type(found).__name__})")
    if not found:
        raise _Bad("field 'cluster.samples' is empty")
    return found


def _cluster_texts(samples: list) -> list:
    return [[s.get("input"), s.get("output")] if isinstance(s, dict) else s for s in samples]


def orca_best_pick(system: str, samples: list, seed: int) -> int:
    """Which sample of a cluster ``format: orca_best`` keeps: a hash of the seed and the cluster's
    content, so the choice does not depend on where the row sits in the file. Only inputs and
    outputs count: a parquet copy that adds null fields to some samples picks the same one."""
    content = json.dumps([system, _cluster_texts(samples)], default=str, ensure_ascii=False)
    digest = hashlib.sha256(f"profuser-orca-best:{seed}\x00{content}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % len(samples)


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
        paths = [c for c in (columns.instruction, columns.response, columns.id, columns.system, columns.input,
                             columns.messages) if c]
        # a nested path consumes its whole top-level field: meta would otherwise repeat the text
        consumed = {p if p in row else p.split(".", 1)[0] for p in paths}
        if columns.messages:
            system, instruction, response, extra = _from_turns(
                row, _column_turns(row, columns.messages), set(),
                _path_text(row, columns.system, required=False) if columns.system else "")
            row_id = _lookup(row, columns.id) if columns.id else None
            return (None if row_id in (None, _MISSING) else str(row_id)), system, instruction, response, extra, consumed
        instruction = _path_text(row, columns.instruction)
        if columns.input:
            instruction = _join_input(instruction, _path_text(row, columns.input, required=False))
        system = _path_text(row, columns.system, required=False) if columns.system else ""
        response = _path_text(row, columns.response)
        row_id = _lookup(row, columns.id) if columns.id else None
        return (None if row_id in (None, _MISSING) else str(row_id)), system, instruction, response, extra, consumed
    else:
        raise ValueError(f"unknown row format {fmt!r}")
    row_id = row.get("id")
    return (None if row_id is None else str(row_id)), system, instruction, response, extra, consumed


def _orca_best(row: dict, samples: str, seed: int) -> list[tuple[str | None, str, str, str, dict, set[str]]]:
    """The converted samples of an Orca-Best row (system = the row's ``instruction``, instruction =
    a sample's ``input``, response = its ``output``): the seeded pick, or every sample."""
    system = _text(row, "instruction", required=False)
    found = _orca_best_samples(row)
    picked = range(len(found)) if samples == "all" else [orca_best_pick(system, found, seed)]
    base = None if row.get("id") is None else str(row["id"])
    if base is None and samples == "all":
        # siblings share a prefix: a hash of the whole cluster (one sample keeps its content hash)
        base = content_id(system, json.dumps(_cluster_texts(found), default=str, ensure_ascii=False), "")
    out = []
    for i in picked:
        name = f"cluster.samples.{i}"
        if not isinstance(found[i], dict):
            raise _Bad(f"field {name!r} is not an object (got {type(found[i]).__name__})")
        instruction, response = _path_text(row, f"{name}.input"), _path_text(row, f"{name}.output")
        extra = {k: _jsonable(v) for k, v in found[i].items() if k not in ("input", "output")}
        extra["sample"] = i
        row_id = f"{base}.{i}" if samples == "all" else base
        out.append((row_id, system, instruction, response, extra, {"id", "instruction", "cluster"}))
    return out


def content_id(system: str, instruction: str, response: str) -> str:
    """A stable id for a row that has none: a hash of its content."""
    digest = hashlib.sha256(json.dumps([system, instruction, response], ensure_ascii=False).encode()).hexdigest()
    return f"h{digest[:16]}"


def _jsonable(value: Any) -> Any:
    # Parquet and hub rows may hold dates, bytes or decimals: keep them as strings in meta.
    return json.loads(json.dumps(value, default=str, ensure_ascii=False))


# a JSON "\ud800" escape decodes to half a UTF-16 pair: no encoder (parquet, a tokenizer) takes it
_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate(field: str, text: str) -> str | None:
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return (f"field {field!r} holds a lone surrogate (\\u{ord(found.group()):04x} at character {found.start() + 1}): "
            "not valid Unicode text; fix or drop that escape")


def _record(row: dict, where: str, converted: tuple) -> Record | BadRow:
    row_id, system, instruction, response, extra, consumed = converted
    if not instruction.strip():
        return BadRow(where, "empty instruction")
    if not response.strip():
        return BadRow(where, "empty response")
    meta = {k: _jsonable(v) for k, v in row.items() if k not in consumed}
    meta.update(extra)
    for field, text in (("id", str(row_id or "")), ("system", system), ("instruction", instruction),
                        ("response", response), *((f"meta.{k}", json.dumps(v, ensure_ascii=False)) for k, v in meta.items())):
        if problem := _surrogate(field, text):
            return BadRow(where, problem)
    meta["where"] = where
    return Record(row_id if row_id else content_id(system, instruction, response), system, instruction, response, meta)


def row_to_records(row: Any, fmt: str, where: str, columns: ColumnMap | None = None, *,
                   samples: str = "one", seed: int = 0) -> list[Record | BadRow]:
    """The records of one row in the given format: one, except ``orca_best`` with ``samples:
    all`` (one per sample, each id suffixed ``.N``); a ``BadRow`` saying why a row is unusable."""
    if not isinstance(row, dict):
        return [BadRow(where, f"row is not an object (got {type(row).__name__})")]
    try:
        converted = _orca_best(row, samples, seed) if fmt == "orca_best" else [_convert(row, fmt, columns)]
    except _Bad as exc:
        return [BadRow(where, str(exc))]
    return [_record(row, where, c) for c in converted]


def row_to_record(row: Any, fmt: str, where: str, columns: ColumnMap | None = None, *, seed: int = 0) -> Record | BadRow:
    """One row in the given format as a ``Record`` (or a ``BadRow`` saying why it is unusable)."""
    return row_to_records(row, fmt, where, columns, seed=seed)[0]


def rows_to_records(rows: Iterable[tuple[str, Any]], params: RowFormatParams, *, seed: int = 0) -> Iterator[Record | BadRow]:
    """Convert ``(where, row)`` pairs. ``format: auto`` decides from the first object row's keys;
    a row that is already a ``BadRow`` (say, an invalid JSON line) passes through. ``seed`` (the
    recipe's ``data.seed``) picks the sample of an Orca-Best cluster."""
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
                    "set `format:` (openorca, alpaca, messages, sharegpt, orca_best) or a `columns:` mapping",
                    where=where,
                )
        yield from row_to_records(row, fmt, where, params.columns, samples=params.samples, seed=seed)


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
    (``file:row N`` for parquet). An invalid JSONL line, or a row with bytes that are not UTF-8,
    comes as a ``BadRow``; a file that is not JSON at all (CSV, binary, another encoding
    throughout, a JSON document that does not parse) raises ``DataError`` saying what it is."""
    if not path.is_file():
        raise DataError("file not found", where=str(path))
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    if path.suffix.lower() in _OTHER_FORMATS:
        sep = ", sep='\\t'" if path.suffix.lower() == ".tsv" else ""
        raise DataError(f"{_OTHER_FORMATS[path.suffix.lower()]} file: expected JSONL (.jsonl), JSON (.json) or parquet; "
                        f"{_CONVERT.format(sep=sep)}", where=str(path))
    text = _decode(path)
    if path.suffix == ".json" and not _is_jsonl(text):
        yield from _json_rows(text, path)
    else:
        yield from _jsonl_rows(text, path)


_OTHER_FORMATS = {".csv": "a CSV", ".tsv": "a TSV", ".xlsx": "an Excel", ".xls": "an Excel", ".arrow": "an Arrow"}
_CONVERT = "convert it, e.g. pandas.read_csv(file{sep}).to_json('rows.jsonl', orient='records', lines=True)"
_EXPECTED = "expected one JSON object per line (.jsonl), a JSON array of rows (.json) or parquet"
# bytes that are not UTF-8, kept as lone surrogates by errors="surrogateescape"
_UNDECODED = re.compile("[\udc80-\udcff]")


def _decode(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 stay as markers that ``_undecoded`` reports per row.
    A file in another Unicode encoding, or not text at all, is refused here with one line."""
    raw = path.read_bytes()
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if raw.startswith(bom):
            raise DataError(f"the file is {name} text; expected UTF-8 (re-save it as UTF-8)", where=str(path))
    head = raw[:4096]
    if b"\x00" in head:
        if raw.startswith(b"PAR1"):
            raise DataError("the file is parquet: name it .parquet", where=str(path))
        # UTF-16 without a BOM: ASCII text with a NUL beside every character
        if head.count(b"\x00") * 3 > len(head) and (head[1::2].count(0) * 2 > len(head[1::2]) or head[::2].count(0) * 2 > len(head[::2])):
            raise DataError("the file looks like UTF-16 text; expected UTF-8 (re-save it as UTF-8)", where=str(path))
        raise DataError(f"binary data, not text; {_EXPECTED}", where=str(path))
    return raw.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")


def _undecoded(text: str, start: int = 0, end: int | None = None) -> str | None:
    """'not UTF-8 text: byte 0xE9 at column N' for the first byte of ``text[start:end]`` that was
    not UTF-8, or None."""
    found = _UNDECODED.search(text, start, len(text) if end is None else end)
    if found is None:
        return None
    column = found.start() - text.rfind("\n", 0, found.start())
    return f"not UTF-8 text: byte 0x{ord(found.group()) - 0xDC00:02X} at column {column}"


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[str, Any]]:
    # Bad lines before the first good one wait: when no line is a JSON value the file is not
    # JSONL at all, and one line saying what it is beats a bad row per line.
    pending: list[tuple[str, BadRow]] = []
    seen_good = False
    check = _UNDECODED.search(text) is not None  # one scan of the file spares one per line
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        item: tuple[str, Any]
        problem = _undecoded(line) if check else None
        if problem:
            item, good = (where, BadRow(where, problem)), False
        else:
            try:
                item, good = (where, json.loads(line)), True
            except json.JSONDecodeError as exc:
                item, good = (where, BadRow(where, f"invalid JSON: {exc.msg} (column {exc.colno})")), False
        if seen_good:
            yield item
        elif good:
            seen_good = True
            yield from pending
            pending.clear()
            yield item
        else:
            pending.append(item)
    if pending:
        raise _not_jsonl(text, path, pending)


def _not_jsonl(text: str, path: Path, bad: list[tuple[str, BadRow]]) -> DataError:
    """The one error of a file none of whose lines is JSON: what it looks like, what was expected."""
    first_where, first = bad[0]
    if all(b.message.startswith("not UTF-8") for _, b in bad):
        return DataError(f"{first.message}, and so is every other line: the file is in another encoding "
                         "(Latin-1, Windows-1252?); re-save it as UTF-8", where=first_where)
    looks = _looks_like(text)
    if looks:
        hint = _convert_hint(looks)
        return DataError(f"not JSON: the file looks like {looks}; {_EXPECTED}{hint}", where=str(path))
    return DataError(f"no line of the file is valid JSON ({first.message}); {_EXPECTED}", where=first_where)


def _convert_hint(looks: str | None) -> str:
    if looks and looks.startswith(("CSV", "TSV")):
        return "; " + _CONVERT.format(sep=", sep='\\t'" if looks.startswith("TSV") else "")
    return ""


def _looks_like(text: str) -> str | None:
    """What a text that is not JSON seems to be (CSV, TSV, YAML, HTML/XML, plain text) and how to
    convert it, or None when it starts like JSON."""
    lines = [line.strip() for line in text.splitlines() if line.strip()][:5]
    if not lines or lines[0][0] in "{[":
        return None
    first = lines[0] if len(lines[0]) <= 60 else lines[0][:57] + "..."
    shown = first.encode("ascii", "backslashreplace").decode()
    if lines[0][0] == "<":
        return f"HTML or XML (first line {shown!r})"
    if "\t" in lines[0]:
        return f"TSV (first line {shown!r})"
    if "," in lines[0]:
        return f"CSV (first line {shown!r})"
    if lines[0] == "---" or re.match(r"^[\w-]+:(\s|$)", lines[0]):
        return f"YAML (first line {shown!r})"
    return f"plain text (first line {shown!r})"


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
        if _UNDECODED.match(text, pos):  # a byte that is not UTF-8 outside any string
            return DataError(_undecoded(text, pos), where=f"{path}:{line}")
        return DataError(f"invalid JSON: {message} (column {col})", where=f"{path}:{line}")

    def expect(pos: int, char: str) -> int:
        pos = _skip_ws(text, pos)
        if not text.startswith(char, pos):
            raise fail(pos, f"expected {char!r}")
        return pos + 1

    def array(pos: int) -> tuple[list[tuple[int, int, Any]], int]:
        items: list[tuple[int, int, Any]] = []
        pos = _skip_ws(text, expect(pos, "["))
        if text.startswith("]", pos):
            return items, pos + 1
        while True:
            item, end = decoder.raw_decode(text, pos)
            items.append((pos, end, item))
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
            looks = _looks_like(text)
            hint = _convert_hint(looks)
            raise DataError(f'not JSON{f": the file looks like {looks}" if looks else ""}; expected an array of rows '
                            f'or an object with a "data" array{hint}', where=str(path))
        if _skip_ws(text, pos) < len(text):
            raise fail(_skip_ws(text, pos), "extra data after the end")
    except json.JSONDecodeError as exc:
        raise fail(exc.pos, exc.msg) from None
    check = _UNDECODED.search(text) is not None
    undecoded = [_undecoded(text, pos, end) if check else None for pos, end, _ in items]
    if items and all(undecoded):
        first = f"{path}:{lines.at(items[0][0])}"
        raise DataError(f"{undecoded[0]}, and so is every other row: the file is in another encoding "
                        "(Latin-1, Windows-1252?); re-save it as UTF-8", where=first)
    for (pos, _, item), problem in zip(items, undecoded):
        where = f"{path}:{lines.at(pos)}"
        yield where, (BadRow(where, problem) if problem else item)


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
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:  # a writer that did not check its strings: find the rows one by one
            rows = [_parquet_row(batch, i) for i in range(batch.num_rows)]
        for row in rows:
            n += 1
            where = f"{path}:row {n}"
            yield where, (BadRow(where, row.message) if isinstance(row, BadRow) else row)


def _parquet_row(batch: pa.RecordBatch, i: int) -> Any:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as exc:
        return BadRow("", f"not UTF-8 text: byte 0x{exc.object[exc.start]:02X}")


# --- normalisation, dedup, sampling, splits -----------------------------------------------------


def normalise_text(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: the form two texts are compared in."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dedup_key(record: Record) -> str:
    text = f"{normalise_text(record.instruction)}\x00{normalise_text(record.response)}"
    history = record.meta.get("history") if isinstance(record.meta, dict) else None
    if isinstance(history, list) and history:  # a conversation repeats another only with the same earlier turns
        text += "\x00" + json.dumps([normalise_text(m.get("content", "")) if isinstance(m, dict) else str(m)
                                     for m in history], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def dedup(records: Iterable[Record]) -> tuple[list[Record], int]:
    """Drop records whose normalised instruction and response (and a conversation's earlier
    turns) repeat an earlier one's; returns (kept records in order, number removed)."""
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
    if heldout == SOURCE_SPLIT:
        raise DataError("a count is not known before the source is read", where="data.heldout")
    if heldout < 0:
        raise DataError(f"heldout must not be negative (got {heldout})", where="data.heldout")
    if heldout < 1:
        return math.floor(total * heldout + 0.5)  # half up: 0.1 of 5 holds out 1
    if heldout != int(heldout):
        raise DataError(f"a held-out count must be a whole number (got {heldout}); use a share < 1 for a fraction",
                        where="data.heldout")
    return int(heldout)


SOURCE_SPLIT = "source"  # data.heldout: the dataset source marks its held-out records
HELDOUT_MARKS = ("heldout", "test")  # meta.split values that mean held out


def split_marked(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(train, held-out) as the dataset source marked them (``meta.split``); both keep the input order.
    A fixed held-out pool lets recipes with different training data be scored on the same examples."""
    held = [r for r in records if r.meta.get("split") in HELDOUT_MARKS]
    if not held:
        raise DataError(f"data.heldout is '{SOURCE_SPLIT}' but none of the {len(records)} records has meta.split "
                        f"{' or '.join(HELDOUT_MARKS)}", where="data.heldout")
    train = [r for r in records if r.meta.get("split") not in HELDOUT_MARKS]
    if not train:
        raise DataError(f"every one of the {len(records)} records is marked held out: nothing to train on",
                        where="data.heldout")
    return train, held


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
