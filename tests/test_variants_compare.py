"""The seed summary's layer-wise variant in `profuser compare`: beside progressive fusion it gets the
same statistics as any variant (per-seed scores, mean, std, a paired delta with its 95% interval)
and shares every stage before train (tests/test_compare.py covers compare's mechanics)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from profuser.cli import app
from profuser.testing import tiny_recipe

TASK = "profuser_heldout_bpb"


@pytest.mark.slow  # two variants x two seeds of the whole tiny method: 11 min at load ~7 on 2 cores
def test_layerwise_beside_progressive_gets_the_same_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tiny = tiny_recipe(tmp_path, {"evaluate.tasks": [TASK]})  # progressive, the default curriculum
    base, layerwise = tmp_path / "progressive.yaml", tmp_path / "layerwise.yaml"
    base.write_text(f"extends: {tiny.name}\nname: progressive\n", encoding="utf-8")
    layerwise.write_text(f"extends: {tiny.name}\nname: layerwise\n"
                         "curriculum: {name: layerwise, params: {first_blocks: 0.5}}\n", encoding="utf-8")
    out, runs = tmp_path / "cmp", tmp_path / "runs"
    result = CliRunner().invoke(app, ["compare", str(base), str(layerwise), "--seeds", "0,1", "--reference", "progressive",
                                      "--out", str(out), "--runs-dir", str(runs), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "comparison.json").read_text())
    by_name = {v["variant"]: v["tasks"][TASK] for v in data["variants"]}
    ref, lw = by_name["progressive"], by_name["layerwise"]
    assert set(lw) == set(ref) | {"delta"}  # the reference's statistics, and a delta against it
    assert lw["seeds"] == ref["seeds"] == [0, 1] and lw["n_examples"] == ref["n_examples"] >= 1
    assert lw["std"] is not None
    lo, hi = lw["delta"]["ci95"]
    assert lo <= lw["delta"]["mean"] <= hi
    # a different curriculum of the same modes: only its training and the fused evaluation run
    for entry in data["entries"]:
        if entry.get("recipe") == str(layerwise):
            assert sorted(entry["stages_ran"]) == ["evaluate/fused", "train"], entry
    assert "layerwise" in (out / "comparison.md").read_text()
