"""profuser export: a run's selected responses and teacher distributions as a datasets dataset."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from profuser.cli import app
from profuser.testing import tiny_recipe


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def run(tiny_root):
    """The tiny recipe to its build stages (both modes)."""
    recipe = tiny_recipe(tiny_root)
    runs = tiny_root / "runs"
    result = cli("run", str(recipe), "--runs-dir", str(runs), "--device", "cpu", "--until", "build")
    assert result.exit_code == 0, result.output
    return runs


def test_export_build_loads_with_load_from_disk(run, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "build-ds"
    result = cli("export", "tiny", "--stage", "build", "--to", str(out), "--runs-dir", str(run), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    ds = load_from_disk(str(out))
    assert len(ds) == record["rows"] > 0 and set(record["modes"]) == {"inference", "training"}
    assert {"id", "mode", "source", "instruction", "response", "input_ids", "labels", "teacher_ids",
            "teacher_logprobs", "teacher_mask"} <= set(ds.column_names)
    data = {r["id"]: r for r in pq.read_table(next((run / "store" / "data").iterdir()) / "train.parquet").to_pylist()}
    for row in ds:
        labelled = [t for t in row["labels"] if t != -100]
        n = len(labelled)
        assert len(row["teacher_ids"]) == len(row["teacher_logprobs"]) == len(row["teacher_mask"]) == n > 0
        assert row["source"] in ("llama", "gemma") and row["instruction"] == data[row["id"]]["instruction"]
        if row["mode"] == "training":  # the ground truth; the inference mode's is the source's own answer
            assert row["response"] == data[row["id"]]["response"]
        logp = np.array(row["teacher_logprobs"], dtype=np.float64)
        for mask, values in zip(row["teacher_mask"], logp):
            if mask:  # log-probabilities: at most 0, and they sum to at most 1
                finite = values[np.isfinite(values)]
                assert (finite <= 1e-5).all() and np.exp(finite).sum() <= 1 + 1e-4


def test_export_select_and_refusals(run, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "select-ds"
    result = cli("export", "tiny", "--stage", "select", "--to", str(out), "--mode", "inference", "--runs-dir", str(run))
    assert result.exit_code == 0, result.output
    ds = load_from_disk(str(out))
    assert set(ds["mode"]) == {"inference"} and "teacher_ids" not in ds.column_names
    for row in ds:  # TRL's conversational format: the instruction, then the chosen response
        assert row["messages"][-2:] == [{"role": "user", "content": row["instruction"]},
                                        {"role": "assistant", "content": row["response"]}]
    stages = json.loads((run / "runs" / "tiny" / "run.json").read_text())["stages"]
    folder = next(s["path"] for s in stages if s["id"] == "select/inference")
    assert len(ds) == pq.read_table(f"{folder}/selection.parquet").num_rows > 0  # one row per selected example
    # one line, no traceback: an existing folder, an unknown stage, an unknown run
    for args, message in ((("--stage", "select", "--to", str(out)), "not an empty folder"),
                          (("--stage", "train", "--to", str(tmp_path / "x")), "unknown stage"),):
        bad = cli("export", "tiny", *args, "--runs-dir", str(run))
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output
    bad = cli("export", "nope", "--stage", "select", "--to", str(tmp_path / "y"), "--runs-dir", str(run))
    assert bad.exit_code != 0 and "no finished run" in bad.output


def test_the_model_card_links_the_export():
    from profuser.training.card import model_card

    card = model_card(title="t", base_model="b", summary={"steps": 1, "world_size": 1, "backend": "none", "phases": []},
                      lineage={"recipe": "tiny", "stages": {}})
    assert "## Training data" in card and "`profuser export tiny --stage build --to DIR`" in card
    assert "datasets.load_from_disk" in card
