"""Dataset sources (file, hub), row formats, bad rows, dedup/sample/split and the data stage."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from profuser.components import BadRow, Record
from profuser.data import (
    dedup,
    extract_answer,
    heldout_count,
    normalise_answer,
    read_records,
    sample,
    split,
    unique_ids,
    write_records,
)
from profuser.errors import DataError
from profuser.pipeline import Runtime, Stage, StageContext
from profuser.plugins import Engine
from profuser.recipe import DataSpec, deep_merge, load_raw, resolve_path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def engine():
    return Engine(entrypoints=False)


def read(engine, params, name="file"):
    return list(engine.registry.build("datasets", name, params).records())


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


ORCA = [
    {"id": "niv.1", "system_prompt": "You are an AI assistant.", "question": "What is 2+2?", "response": "4", "src": "niv"},
    {"id": "niv.2", "system_prompt": "", "question": "Name a colour.", "response": "Blue."},
]


# --- formats ------------------------------------------------------------------------------------


def test_openorca_jsonl(engine, tmp_path):
    path = write_jsonl(tmp_path / "orca.jsonl", ORCA)
    first, second = read(engine, {"path": str(path)})
    assert first == Record("niv.1", "You are an AI assistant.", "What is 2+2?", "4", {"src": "niv", "where": f"{path}:1"})
    assert (second.id, second.system, second.response) == ("niv.2", "", "Blue.")
    assert read(engine, {"path": str(path), "format": "openorca"}) == [first, second]


def test_alpaca_json_array_and_data_object(engine, tmp_path):
    rows = [{"instruction": "Summarise.", "input": "A long text.", "output": "Short."},
            {"instruction": "Say hi.", "input": "", "output": "Hi!", "category": "greeting"}]
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(rows, indent=2))
    records = read(engine, {"path": str(array)})
    assert [r.instruction for r in records] == ["Summarise.\n\nA long text.", "Say hi."]
    assert [r.system for r in records] == ["", ""]
    assert records[1].meta["category"] == "greeting"
    # each row is located at the line it starts on
    lines = array.read_text().splitlines()
    assert [int(r.meta["where"].rsplit(":", 1)[1]) for r in records] == [i + 1 for i, l in enumerate(lines) if l == "  {"]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": rows, "notes": {"x": [1, 2]}}))
    assert [(r.instruction, r.response) for r in read(engine, {"path": str(wrapped), "format": "alpaca"})] == \
        [(r.instruction, r.response) for r in records]


def test_ids_are_stable_content_hashes_when_rows_have_none(engine, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Q", "output": "A"}, {"instruction": "Q2", "output": "A"}]))
    ids = [r.id for r in read(engine, {"path": str(path)})]
    assert ids == [r.id for r in read(engine, {"path": str(path)})] and len(set(ids)) == 2


def test_messages_and_sharegpt(engine, tmp_path):
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]}])
    (record,) = read(engine, {"path": str(messages)})
    assert (record.system, record.instruction, record.response) == ("Be brief.", "2+2?", "4")
    assert record.meta["history"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"id": 7, "conversations": [
        {"from": "system", "value": "Sys"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])
    (record,) = read(engine, {"path": str(sharegpt), "format": "sharegpt"})
    assert record == Record("7", "Sys", "Q", "A", {"where": f"{sharegpt}:1"})


def test_parquet_file_and_split_directory(engine, tmp_path):
    folder = tmp_path / "ds" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ORCA[:1]), folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ORCA[1:]), folder / "test-00000-of-00001.parquet")
    (record,) = read(engine, {"path": str(folder / "train-00000-of-00001.parquet")})
    assert record.id == "niv.1" and record.meta["where"].endswith("train-00000-of-00001.parquet:row 1")
    assert [r.id for r in read(engine, {"path": str(tmp_path / "ds"), "split": "test"})] == ["niv.2"]
    assert [r.id for r in read(engine, {"path": str(tmp_path / "ds")})] == ["niv.2", "niv.1"]  # sorted file names
    with pytest.raises(DataError, match="split 'validation'"):
        read(engine, {"path": str(tmp_path / "ds"), "split": "validation"})


def test_column_mapping(engine, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"uid": 5, "sys": "S", "prompt": "Translate", "ctx": "bonjour", "chosen": "hello", "rejected": "bye"}])
    params = {"path": str(path), "columns": {"id": "uid", "system": "sys", "instruction": "prompt", "input": "ctx", "response": "chosen"}}
    (record,) = read(engine, params)
    assert record == Record("5", "S", "Translate\n\nbonjour", "hello", {"rejected": "bye", "where": f"{path}:1"})
    with pytest.raises(ValidationError, match="columns"):
        engine.registry.build("datasets", "file", {"path": str(path), "format": "columns"})
    with pytest.raises(ValidationError, match="cannot be combined"):
        engine.registry.build("datasets", "file", {**params, "format": "alpaca"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        engine.registry.build("datasets", "file", {"path": str(path), "colums": {}})


def test_unknown_format_names_the_row(engine, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError) as err:
        read(engine, {"path": str(path)})
    assert err.value.where == f"{path}:1" and "completion, prompt" in err.value.message


# --- bad rows -----------------------------------------------------------------------------------


def test_bad_rows_name_file_and_line(engine, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        ORCA[0],
        {"id": "b", "system_prompt": "", "response": "no question"},
        "{not json",
        "[1, 2]",
        {"id": "c", "system_prompt": "", "question": "Q", "response": "   "},
        {"id": "d", "question": "Q", "response": 3},
        "",
        ORCA[1],
    ])
    items = read(engine, {"path": str(path)})
    bad = [(b.where, b.message) for b in items if isinstance(b, BadRow)]
    assert [w for w, _ in bad] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    assert bad[0][1] == "missing field 'question'"
    assert bad[1][1].startswith("invalid JSON")
    assert bad[2][1] == "row is not an object (got list)"
    assert bad[3][1] == "empty response"
    assert bad[4][1] == "field 'response' is not a string (got int)"
    assert [r.id for r in items if isinstance(r, Record)] == ["niv.1", "niv.2"]


def test_bad_conversations(engine, tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", [
        {"conversations": [{"from": "human", "value": "Q"}]},
        {"conversations": [{"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "robot", "value": "A"}]},
        {"conversations": "Q: A"},
    ])
    messages = [b.message for b in read(engine, {"path": str(path)})]
    assert messages[0] == "no assistant turn"
    assert messages[1] == "no user turn before the last assistant turn"
    assert "unknown 'from' 'robot'" in messages[2]
    assert messages[3] == "field 'conversations' is not a list of turns"


def test_broken_json_document_and_missing_file(engine, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match="invalid JSON") as err:
        read(engine, {"path": str(broken)})
    assert err.value.where == f"{broken}:3"
    not_rows = tmp_path / "obj.json"
    not_rows.write_text('{"rows": []}')
    with pytest.raises(DataError, match='"data" array'):
        read(engine, {"path": str(not_rows)})
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        read(engine, {"path": str(missing)})
    assert err.value.where == str(missing) and err.value.message == "file not found"


def test_json_named_jsonl_is_read_line_by_line(engine, tmp_path):
    path = write_jsonl(tmp_path / "lines.json", ORCA)
    assert [r.meta["where"] for r in read(engine, {"path": str(path)})] == [f"{path}:1", f"{path}:2"]


# --- dedup, sampling, split ---------------------------------------------------------------------


def records(n: int) -> list[Record]:
    return [Record(f"r{i}", "", f"question {i}", f"answer {i}") for i in range(n)]


def test_dedup_on_normalised_instruction_and_response():
    rows = [Record("a", "", "What is  2+2?", "Four."), Record("b", "other system", "what is 2+2?", "four."),
            Record("c", "", "What is 2+2?", "Four, really."), Record("d", "", "ＷＨＡＴ is 2+2?\n", " Four. ")]
    kept, removed = dedup(rows)
    assert [r.id for r in kept] == ["a", "c"] and removed == 2


def test_unique_ids():
    rows = [Record("x", "", "1", "1"), Record("x", "", "2", "2"), Record("x#2", "", "3", "3"), Record("x", "", "4", "4")]
    renamed_rows, renamed = unique_ids(rows)
    assert [r.id for r in renamed_rows] == ["x", "x#3", "x#2", "x#4"] and renamed == 2


def test_sample_is_seeded_and_keeps_order():
    rows = records(50)
    a, b, c = sample(rows, 10, 0), sample(rows, 10, 0), sample(rows, 10, 1)
    assert a == b and a != c and len(a) == 10
    assert [r.id for r in a] == sorted((r.id for r in a), key=lambda i: int(i[1:]))
    assert sample(rows, 80, 0) == rows and sample(rows, None, 0) == rows


def test_split_share_and_count():
    rows = records(40)
    train, held = split(rows, 0.25, 3)
    assert (len(train), len(held)) == (30, 10) and split(rows, 0.25, 3) == (train, held)
    assert {r.id for r in train} | {r.id for r in held} == {r.id for r in rows} and not {r.id for r in train} & {r.id for r in held}
    assert split(rows, 0.25, 4)[1] != held
    assert len(split(rows, 7, 0)[1]) == 7 and len(split(rows, 0, 0)[1]) == 0
    assert heldout_count(5, 0.1) == 1 and heldout_count(100, 0.1) == 10 and heldout_count(9, 3.0) == 3
    with pytest.raises(DataError, match="whole number"):
        heldout_count(10, 2.5)
    with pytest.raises(DataError, match="nothing to train"):
        split(rows, 40, 0)


def test_records_parquet_round_trip(tmp_path):
    rows = [Record("a", "sys", "q", "r", {"answer": "4", "nested": {"k": [1, 2]}}), Record("b", "", "q2", "r2")]
    write_records(tmp_path / "x.parquet", rows)
    assert read_records(tmp_path / "x.parquet") == rows
    assert pq.read_schema(tmp_path / "x.parquet").names == ["id", "system", "instruction", "response", "meta"]
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "y.parquet")


def test_extract_answer():
    assert extract_answer("Step 1: ...\n\nAnswer: 42") == "42"
    assert extract_answer("answer: 1\nFinal answer: **Paris.**") == "Paris."
    assert extract_answer("no final line") is None
    assert normalise_answer(" Paris. ") == normalise_answer("paris") == "paris"
    assert normalise_answer("3,5 ,9") == "3, 5, 9"


# --- hub ----------------------------------------------------------------------------------------


def test_hub_source_on_a_local_dataset_dir(engine, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "hubds" / "data"
    folder.mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", [{"instruction": "Q1", "input": "", "output": "A1"},
                                         {"instruction": "Q2", "input": "x", "output": ""}])
    items = read(engine, {"name": str(tmp_path / "hubds"), "split": "train"}, name="hub")
    assert items[0].instruction == "Q1" and items[0].meta["where"] == f"{tmp_path / 'hubds'}[train]:1"
    assert items[1] == BadRow(f"{tmp_path / 'hubds'}[train]:2", "empty response")
    with pytest.raises(DataError) as err:
        read(engine, {"name": str(tmp_path / "hubds"), "split": "nosuchsplit"}, name="hub")
    assert "hubds[nosuchsplit]" in err.value.where
    # Orca-Best's nested rows come through `datasets` as nested dicts and lists: the same mapping
    nested = tmp_path / "orcabest" / "data"
    nested.mkdir(parents=True)
    (nested / "train.jsonl").write_text(ORCA_BEST.read_text(encoding="utf-8"), encoding="utf-8")
    source = engine.registry.build("datasets", "hub", {"name": str(tmp_path / "orcabest"), "format": "orca_best"})
    source.data_seed = 3
    from_hub = list(source.records())
    from_file = engine.registry.build("datasets", "file", {"path": str(ORCA_BEST), "format": "orca_best"})
    from_file.data_seed = 3
    assert [(r.id, r.system, r.instruction, r.response) for r in from_hub] == \
        [(r.id, r.system, r.instruction, r.response) for r in from_file.records()]


# --- the data stage -----------------------------------------------------------------------------


def run_stage(engine, out: Path, **data) -> dict:
    from profuser.stages import data as stage

    spec = DataSpec(**data).model_dump()
    ctx = StageContext(stage=Stage("data", "data", {"data": spec}), inputs={}, out=out, runtime=Runtime(),
                       engine=engine)
    out.mkdir(parents=True, exist_ok=True)
    return stage.run(ctx)


def test_stage_fail_vs_skip(engine, tmp_path):
    rows = [{"id": f"r{i}", "system_prompt": "", "question": f"Q{i}", "response": f"A{i}"} for i in range(20)]
    rows[3] = {"id": "r3", "question": "Q3"}
    rows[8] = "[]"
    rows += [dict(rows[0], id="copy"), dict(rows[1], id="r2", question="Other")]  # a content duplicate, a repeated id
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    source = {"name": "file", "params": {"path": str(path)}}
    with pytest.raises(DataError) as err:
        run_stage(engine, tmp_path / "fail", source=source)
    assert "2 of 22 rows are unusable" in err.value.message
    assert f"{path}:4: missing field 'response'" in err.value.message and f"{path}:9: row is not an object" in err.value.message

    out = tmp_path / "skip"
    metrics = run_stage(engine, out, source=source, on_bad_row="skip", heldout=4, seed=1)
    assert metrics == {"rows_read": 22, "bad_rows_skipped": 2, "duplicates_removed": 1, "ids_renamed": 1,
                       "records": 19, "train": 15, "heldout": 4}
    train, held = read_records(out / "train.parquet"), read_records(out / "heldout.parquet")
    ids = {r.id for r in train + held}
    assert len(ids) == 19 and "r2#2" in ids and "copy" not in ids
    stats = json.loads((out / "stats.json").read_text())
    assert stats["bad_rows_skipped"] == 2 and stats["bad_rows"][0]["where"] == f"{path}:4"
    # deterministic: the same spec gives the same files
    run_stage(engine, tmp_path / "again", source=source, on_bad_row="skip", heldout=4, seed=1)
    for name in ("train.parquet", "heldout.parquet"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_stage_sample_and_builtin(engine, tmp_path):
    metrics = run_stage(engine, tmp_path / "b", source={"name": "builtin_tasks", "params": {"n": 30}}, sample=20, heldout=0.25)
    assert (metrics["records"], metrics["train"], metrics["heldout"]) == (30, 15, 5)
    held = read_records(tmp_path / "b" / "heldout.parquet")
    assert all(extract_answer(r.response) == r.meta["answer"] for r in held)


def test_file_fingerprint_follows_the_content_not_the_file(engine, tmp_path):
    import hashlib
    import os
    import shutil

    path = write_jsonl(tmp_path / "d.jsonl", ORCA)
    source = engine.registry.build("datasets", "file", {"path": str(path)})
    first = source.fingerprint()
    assert first == {"d.jsonl": hashlib.sha256(path.read_bytes()).hexdigest()}  # the data stage's key, as before
    os.utime(path, ns=(1, 1))  # touched: the same content
    assert source.fingerprint() == first
    moved = tmp_path / "elsewhere" / "d.jsonl"
    moved.parent.mkdir()
    shutil.move(path, moved)
    assert engine.registry.build("datasets", "file", {"path": str(moved)}).fingerprint() == first
    write_jsonl(moved, [dict(ORCA[0], response="5"), ORCA[1]])  # edited in place
    assert engine.registry.build("datasets", "file", {"path": str(moved)}).fingerprint() != first

    folder = tmp_path / "folder"
    (folder / "train").mkdir(parents=True)
    write_jsonl(folder / "train" / "a.jsonl", ORCA)
    write_jsonl(folder / "b.jsonl", ORCA[:1])
    hashes = engine.registry.build("datasets", "file", {"path": str(folder)}).fingerprint()
    assert sorted(hashes) == ["b.jsonl", "train/a.jsonl"]  # by path under the folder
    assert engine.registry.build("datasets", "builtin_tasks", {"n": 5}).fingerprint() == {}  # the base's default


# --- recipes and the real files -----------------------------------------------------------------


def test_switching_component_does_not_inherit_params():
    base = {"data": {"source": {"name": "builtin_tasks", "params": {"n": 72}}, "heldout": 24}}
    merged = deep_merge(base, {"data": {"source": {"name": "file", "params": {"path": "x.jsonl"}}}})
    assert merged == {"data": {"source": {"name": "file", "params": {"path": "x.jsonl"}}, "heldout": 24}}
    same = deep_merge(base, {"data": {"source": {"name": "builtin_tasks", "params": {"seed": 3}}}})
    assert same["data"]["source"]["params"] == {"n": 72, "seed": 3}

@pytest.mark.parametrize("name, fmt, expected", [("orca-sample", "openorca", 284), ("alpaca-sample", "alpaca", 999)])
def test_example_recipes_read_the_shared_files(engine, name, fmt, expected):
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    file = RECIPES / "examples" / f"{name}.yaml"
    # only the data section: the rest of the recipe is the default's (validated by test_recipe)
    spec = DataSpec(**load_raw(file)["data"])
    assert spec.source.name == "file" and spec.source.params["format"] == fmt
    assert set(spec.source.params) == {"path", "format"}  # nothing inherited from builtin_tasks
    params = {**spec.source.params, "path": str(resolve_path(spec.source.params["path"], file))}
    items = read(engine, params)
    assert len(items) == expected and all(isinstance(r, Record) for r in items)
    assert all(r.instruction.strip() and r.response.strip() for r in items)
    if fmt == "openorca":
        assert items[0].id == "orca-dpo-val.0" and items[0].system.startswith("You are an AI assistant.")
    else:
        with_input = [r for r in items if "\n\n" in r.instruction]
        assert with_input and all(r.system == "" for r in items)


# --- Orca-Best and nested rows ------------------------------------------------------------------

ORCA_BEST = Path(__file__).resolve().parent / "data" / "orca-best-mini.jsonl"


def orca_best_rows() -> list[dict]:
    return [json.loads(line) for line in ORCA_BEST.read_text(encoding="utf-8").splitlines()]


def test_orca_best_one_seeded_sample_per_cluster(engine, tmp_path):
    rows = orca_best_rows()
    source = engine.registry.build("datasets", "file", {"path": str(ORCA_BEST), "format": "orca_best"})
    records = list(source.records())
    assert len(records) == len(rows) == 12 and all(isinstance(r, Record) for r in records)
    for record, row in zip(records, rows):
        sample = row["cluster"]["samples"][record.meta["sample"]]
        assert (record.system, record.instruction, record.response) == (row["instruction"], sample["input"], sample["output"])
        assert record.meta["num_samples"] == row["num_samples"] and "cluster" not in record.meta
    assert read(engine, {"path": str(ORCA_BEST)}) == records  # format: auto recognises the rows
    # the pick follows the seed ...
    picks = {}
    for seed in range(6):
        source.data_seed = seed
        picks[seed] = [r.meta["sample"] for r in source.records()]
    assert len({tuple(p) for p in picks.values()}) > 1 and picks[0] == [r.meta["sample"] for r in records]
    # ... and not the row order
    shuffled = write_jsonl(tmp_path / "reversed.jsonl", rows[::-1])
    again = read(engine, {"path": str(shuffled), "format": "orca_best"})
    assert sorted((r.system, r.instruction) for r in again) == sorted((r.system, r.instruction) for r in records)


def test_orca_best_all_samples_get_suffixed_ids(engine, tmp_path):
    records = read(engine, {"path": str(ORCA_BEST), "format": "orca_best", "samples": "all"})
    assert len(records) == sum(row["num_samples"] for row in orca_best_rows()) == 20
    assert len({r.id for r in records}) == 20
    first, second = records[:2]  # the first cluster has two samples: one prefix, suffixes .0 and .1
    assert first.id.endswith(".0") and second.id == first.id[:-2] + ".1" and second.meta["sample"] == 1
    path = write_jsonl(tmp_path / "ids.jsonl", [{"id": "c7", "instruction": "", "num_samples": 2, "cluster": {"samples": [
        {"input": "Q1", "output": "A1", "score": 0.5}, {"input": "Q2", "output": "A2"}]}}])
    records = read(engine, {"path": str(path), "samples": "all"})
    assert [(r.id, r.system, r.instruction, r.response) for r in records] == [("c7.0", "", "Q1", "A1"), ("c7.1", "", "Q2", "A2")]
    assert records[0].meta == {"num_samples": 2, "score": 0.5, "sample": 0, "where": f"{path}:1"}
    assert read(engine, {"path": str(path)})[0].id == "c7"  # one sample keeps the row's id
    with pytest.raises(ValidationError, match="applies to format 'orca_best'"):
        engine.registry.build("datasets", "file", {"path": str(path), "format": "alpaca", "samples": "all"})


def test_orca_best_bad_nesting_names_file_line_and_field(engine, tmp_path):
    good = orca_best_rows()[1]
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good,
        {"instruction": "S", "num_samples": 1},
        {"instruction": "S", "cluster": [{"input": "Q", "output": "A"}]},
        {"instruction": "S", "cluster": {"size": 2}},
        {"instruction": "S", "cluster": {"samples": []}},
        {"instruction": "S", "cluster": {"samples": ["Q: A"]}},
        {"instruction": "S", "cluster": {"samples": [{"input": "Q"}]}},
        {"instruction": "S", "cluster": {"samples": [{"input": "Q", "output": ["A"]}]}},
        {"instruction": 3, "cluster": {"samples": [{"input": "Q", "output": "A"}]}},
    ])
    items = read(engine, {"path": str(path), "format": "orca_best"})
    assert isinstance(items[0], Record)
    assert [(b.where, b.message) for b in items[1:]] == [(f"{path}:{n}", m) for n, m in [
        (2, "missing field 'cluster'"),
        (3, "field 'cluster' is not an object (got list)"),
        (4, "missing field 'cluster.samples'"),
        (5, "field 'cluster.samples' is empty"),
        (6, "field 'cluster.samples.0' is not an object (got str)"),
        (7, "missing field 'cluster.samples.0.output'"),
        (8, "field 'cluster.samples.0.output' is not a string (got list)"),
        (9, "field 'instruction' is not a string (got int)"),
    ]]
    source = {"name": "file", "params": {"path": str(path), "format": "orca_best"}}
    with pytest.raises(DataError, match="8 of 9 rows are unusable"):
        run_stage(engine, tmp_path / "fail", source=source, heldout=0)
    assert run_stage(engine, tmp_path / "skip", source=source, heldout=0, on_bad_row="skip")["bad_rows_skipped"] == 8


def test_orca_best_stage_draws_with_the_data_seed(engine, tmp_path):
    source = {"name": "file", "params": {"path": str(ORCA_BEST), "format": "orca_best"}}
    texts = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 3)):
        run_stage(engine, tmp_path / name, source=source, heldout=0, seed=seed)
        texts[name] = (tmp_path / name / "train.parquet").read_bytes()
    assert texts["a"] == texts["b"] and texts["a"] != texts["c"]


def test_dotted_column_paths(engine, tmp_path):
    row = {"uid": {"n": 4}, "sys": "S", "cluster": {"samples": [{"input": "Q0", "output": "A0"}, {"input": "Q1", "output": "A1"}]},
           "a.b": "flat key with a dot", "extra": 1}
    path = write_jsonl(tmp_path / "nested.jsonl", [row])
    columns = {"id": "uid.n", "system": "sys", "instruction": "cluster.samples.1.input", "response": "cluster.samples.-1.output"}
    (record,) = read(engine, {"path": str(path), "columns": columns})
    # a nested path consumes its top-level field; the rest stays in meta
    assert record == Record("4", "S", "Q1", "A1", {"a.b": "flat key with a dot", "extra": 1, "where": f"{path}:1"})
    (record,) = read(engine, {"path": str(path), "columns": {"instruction": "a.b", "response": "cluster.samples.0.output"}})
    assert (record.instruction, record.response) == ("flat key with a dot", "A0")  # an exact key wins over a path

    def problem(**mapping):
        (bad,) = read(engine, {"path": str(path), "columns": {"instruction": "sys", **mapping}})
        assert isinstance(bad, BadRow) and bad.where == f"{path}:1"
        return bad.message

    assert problem(response="cluster.sample.0.output") == "missing field 'cluster.sample.0.output': cluster has no field 'sample'"
    assert problem(response="cluster.samples.5.output") == "missing field 'cluster.samples.5.output': cluster.samples has 2 item(s), no index 5"
    assert problem(response="cluster.samples.first.output") == \
        "missing field 'cluster.samples.first.output': cluster.samples is a list, 'first' is not an index"
    assert problem(response="sys.text") == "missing field 'sys.text': sys is a str, not an object or list"
    assert problem(response="cluster.samples.0.answer") == "missing field 'cluster.samples.0.answer'"
    assert problem(response="cluster.samples.0") == "field 'cluster.samples.0' is not a string (got dict)"
    assert problem(response="nope.x") == "missing field 'nope.x': the row has no field 'nope'"


# --- bytes and files that are not JSON ----------------------------------------------------------


def test_non_utf8_bytes_are_bad_rows(engine, tmp_path):
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in ORCA]
    bad_line = json.dumps({"id": "x", "question": "Caf\u00e9?", "response": "Oui"}, ensure_ascii=False).encode("latin-1")
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join([lines[0], bad_line, lines[1]]) + b"\n")
    items = read(engine, {"path": str(path)})
    column = bad_line.index(b"\xe9") + 1
    assert items[1] == BadRow(f"{path}:2", f"not UTF-8 text: byte 0xE9 at column {column}")
    assert [r.id for r in items if isinstance(r, Record)] == ["niv.1", "niv.2"]
    source = {"name": "file", "params": {"path": str(path)}}
    with pytest.raises(DataError, match=r"1 of 3 rows are unusable") as err:
        run_stage(engine, tmp_path / "fail", source=source, heldout=0)
    assert f"{path}:2: not UTF-8 text" in err.value.message
    assert run_stage(engine, tmp_path / "skip", source=source, heldout=0, on_bad_row="skip")["bad_rows_skipped"] == 1
    # a JSON array: the row holding the byte is the bad one, located at its first line
    array = tmp_path / "array.json"
    array.write_bytes(b"[\n" + lines[0] + b",\n" + bad_line + b"\n]\n")
    assert read(engine, {"path": str(array)})[1] == BadRow(f"{array}:3", f"not UTF-8 text: byte 0xE9 at column {column}")


def parquet_bytes(rows) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("name, data, where, message", [
    ("latin1.jsonl", "\n".join(['{"question": "Caf\u00e9?", "response": "Oui"}'] * 3).encode("latin-1"), ":1",
     "not UTF-8 text: byte 0xE9 at column 18, and so is every other line: the file is in another encoding"),
    ("latin1.json", '[{"question": "Caf\u00e9?", "response": "Oui"}]'.encode("latin-1"), ":1",
     "not UTF-8 text: byte 0xE9 at column 19, and so is every other row"),
    ("utf16.jsonl", '{"question": "a", "response": "b"}\n'.encode("utf-16"), "", "the file is UTF-16 text; expected UTF-8"),
    ("utf16.json", '[{"question": "a", "response": "b"}]'.encode("utf-16-le"), "", "the file looks like UTF-16 text"),
    ("blob.jsonl", bytes(range(256)) * 4, "", "binary data, not text; expected one JSON object per line"),
    ("table.jsonl", parquet_bytes(ORCA), "", "the file is parquet: name it .parquet"),
    ("rows.jsonl", b"id,question,response\n1,What is 2+2?,4\n2,\"Name a colour.\",Blue\n", "",
     "not JSON: the file looks like CSV (first line 'id,question,response'); expected one JSON object per line"),
    ("rows.json", b"id\tquestion\tresponse\n1\tWhat is 2+2?\t4\n", "",
     "not JSON: the file looks like TSV (first line 'id\\tquestion\\tresponse'); expected an array of rows"),
    ("rows.csv", b"id,question,response\n", "", "a CSV file: expected JSONL (.jsonl), JSON (.json) or parquet; convert it"),
    ("recipe.jsonl", b"question: hi\nresponse: there\n", "", "not JSON: the file looks like YAML"),
    ("page.jsonl", b"<!DOCTYPE html>\n<html></html>\n", "", "not JSON: the file looks like HTML or XML"),
    ("python.jsonl", b"{'question': 'a', 'response': 'b'}\n", ":1",
     "no line of the file is valid JSON (invalid JSON: Expecting property name enclosed in double quotes (column 2))"),
])
def test_files_that_are_not_utf8_json_fail_with_one_line(engine, tmp_path, name, data, where, message):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        read(engine, {"path": str(path)})
    assert err.value.where == f"{path}{where}" and err.value.message.startswith(message)
    assert "\n" not in err.value.message


def test_parquet_with_invalid_utf8_strings(engine, tmp_path):
    # arrow checks strings when it builds them, so write the bytes as binary and relabel them as strings
    question = pa.array([b"What is 2+2?", b"Caf\xe9?"], pa.binary()).view(pa.string())
    table = pa.table({"question": question, "response": pa.array(["4", "Oui"])})
    pq.write_table(table, tmp_path / "x.parquet")
    first, second = read(engine, {"path": str(tmp_path / "x.parquet")})
    assert first.instruction == "What is 2+2?" and second == BadRow(f"{tmp_path / 'x.parquet'}:row 2", "not UTF-8 text: byte 0xE9")


# --- the example recipe, through the CLI --------------------------------------------------------


def test_orca_best_example_recipe_runs_until_data(tmp_path, engine):
    from typer.testing import CliRunner

    from profuser.cli import app
    from profuser.recipe import load_recipe

    recipe = RECIPES / "examples" / "orca-best.yaml"
    assert load_recipe(recipe, registry=engine.registry).data.source.params["format"] == "orca_best"
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(recipe), "--until", "data", "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    (artifact,) = (runs / "store" / "data").iterdir()
    train, held = read_records(artifact / "train.parquet"), read_records(artifact / "heldout.parquet")
    assert (len(train), len(held)) == (9, 3)
    rows = {row["instruction"] + "\x00" + s["input"]: s["output"] for row in orca_best_rows() for s in row["cluster"]["samples"]}
    assert all(rows[r.system + "\x00" + r.instruction] == r.response for r in train + held)
    # the same recipe on a CSV file: one line, no traceback, a non-zero exit
    csv = tmp_path / "rows.jsonl"
    csv.write_text("instruction,cluster\nS,Q\n")
    result = CliRunner().invoke(app, ["run", str(recipe), "--until", "data", "--runs-dir", str(runs),
                                      "-o", f"data.source.params.path={csv}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"error {csv}: not JSON: the file looks like CSV" in result.output


def test_stage_progress_on_a_terminal_only(engine, tmp_path, monkeypatch, capsys):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    rows = [{"id": f"r{i}", "question": f"Q{i}", "response": f"A{i}"} for i in range(30)]
    source = {"name": "file", "params": {"path": str(write_jsonl(tmp_path / "d.jsonl", rows))}}
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run_stage(engine, tmp_path / "tty", source=source)
    assert "data: " in terminal.getvalue() and "30row" in terminal.getvalue().replace(" ", "")
    piped = io.StringIO()  # not a terminal (a pipe, a file, --json captured): no bar
    monkeypatch.setattr(sys, "stderr", piped)
    run_stage(engine, tmp_path / "pipe", source=source)
    assert piped.getvalue() == "" and capsys.readouterr().out == ""
