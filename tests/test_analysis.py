"""Figure 1 analyses: advantage shares per mode, response length by system message."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profuser.analysis import (
    advantage_shares,
    length_by_system,
    markdown_table,
    plot_advantage_shares,
    plot_length_by_system,
    shares_table,
)
from profuser.components import Record
from profuser.data import write_records
from profuser.errors import ArtifactError


def write_selection(path, chosen, sources=("vicuna", "llama2", "mpt")):
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "id": [f"e{i}" for i in range(len(chosen))],
        "chosen": chosen,
        "scores": [json.dumps({s: 0.0 for s in sources}) for _ in chosen],
        "detail": ["{}" for _ in chosen],
    }), path / "selection.parquet")
    return path


def test_advantage_shares_per_mode(tmp_path):
    training = write_selection(tmp_path / "training", ["vicuna"] * 7 + ["llama2"] * 3)
    inference = write_selection(tmp_path / "inference", ["vicuna", "llama2", "llama2", "vicuna"])
    # a directory or the file itself
    shares = advantage_shares({"training": training, "inference": inference / "selection.parquet"})
    assert shares == {
        "training": {"vicuna": 0.7, "llama2": 0.3, "mpt": 0.0},  # mpt won nothing but is listed
        "inference": {"vicuna": 0.5, "llama2": 0.5, "mpt": 0.0},
    }
    rows = shares_table(shares)
    assert rows[0] == {"source": "vicuna", "training": 0.7, "inference": 0.5}
    table = markdown_table(rows)
    assert table.splitlines()[0] == "| source | training | inference |"
    assert "| vicuna | 0.700 | 0.500 |" in table
    png = plot_advantage_shares(shares, tmp_path / "plots" / "shares.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_selection_names_the_path(tmp_path):
    with pytest.raises(ArtifactError) as err:
        advantage_shares({"inference": tmp_path})
    assert str(tmp_path) in err.value.where


def test_length_by_system(tmp_path):
    records = [
        Record("a", "Be brief.", "q1", "one two three four"),
        Record("b", "Be brief.", "q2", "one two"),
        Record("c", "", "q3", "x " * 10),
        Record("d", "Think step by step.", "q4", "a b c d e f"),
        Record("e", "Be brief.", "q5", "six words are in this one"),
    ]
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.parquet", records)
    gen = tmp_path / "gen"
    gen.mkdir()
    # the source answered a, b, c, d only
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "response": ["x", "x y z", "one", "1 2 3 4"]}),
                   gen / "generations.parquet")
    rows = length_by_system(data, {"vicuna": gen}, top=2)
    assert [r["system"] for r in rows] == ["Be brief.", ""]  # 3 examples, then 1 (first seen before d)
    assert rows[0] == {"system_id": 1, "system": "Be brief.", "examples": 3, "GT": (4 + 2 + 6) / 3, "vicuna": (1 + 3) / 2}
    assert rows[1]["GT"] == 10 and rows[1]["vicuna"] == 1
    chars = length_by_system(data / "train.parquet", {"vicuna": gen / "generations.parquet"}, top=1, unit="chars")
    assert chars[0]["GT"] == pytest.approx((18 + 7 + 25) / 3)
    png = plot_length_by_system(rows, tmp_path / "len.png")
    assert png.stat().st_size > 1000
    assert "| system_id | system | examples | GT | vicuna |" in markdown_table(rows)
