"""CSFT reads no teacher: a loss without one (``Loss.teacher = False``: sft) on a curriculum of the
training mode alone plans no logits, selection or alignment, and its build holds the same
examples, tokens and labels as a teacher recipe's, with no teacher at any position."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from profuser.cli import app
from profuser.pipeline import plan
from profuser.plugins import Engine
from profuser.recipe import load_recipe
from profuser.testing import tiny_recipe


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def recipes(tiny_root):
    base = tiny_recipe(tiny_root)
    csft = tiny_root / "csft.yaml"
    csft.write_text("extends: tiny.yaml\nname: csft\ncurriculum: sft_only\nloss: sft\n")
    fuse = tiny_root / "fuse.yaml"
    fuse.write_text("extends: tiny.yaml\nname: fuse\ncurriculum: training_only\n")
    mixed = tiny_root / "sft-progressive.yaml"
    mixed.write_text("extends: tiny.yaml\nname: sft-progressive\nloss: sft\n")
    return base, csft, fuse, mixed


def _ids(recipe):
    engine = Engine(entrypoints=False)
    return {s.id: s for s in plan(load_recipe(recipe, registry=engine.registry), engine, device="cpu")}


def test_csft_plans_no_teacher_stage(recipes):
    _, csft, fuse, mixed = recipes
    stages = _ids(csft)
    assert not [i for i in stages if i.startswith(("logits/", "select/", "align/", "generate/", "score/"))]
    assert stages["build/training"].deps == {"data": "data"} and stages["build/training"].config.teacherless
    assert set(stages["train"].deps) == {"build/training"}
    # a teacher loss on the same curriculum, or the sft loss with the inference mode, keeps them
    assert {"logits/training/llama", "select/training", "align/training/gemma"} <= set(_ids(fuse))
    assert "select/inference" in _ids(mixed) and "logits/training/llama" in _ids(mixed)
    # the flag is left out of every other build's key (hashed only when set)
    assert "teacherless" not in _ids(fuse)["build/training"].hashed_config()


def test_csft_builds_the_teacher_recipes_examples_without_a_teacher_and_trains(recipes, tiny_root, tmp_path):
    _, csft, fuse, _ = recipes
    runs = tmp_path / "runs"
    built = {}
    for recipe, until in ((fuse, "build"), (csft, None)):
        result = cli("run", recipe, "--runs-dir", runs, "--device", "cpu", *(("--until", until) if until else ()))
        assert result.exit_code == 0, result.output
        summary = json.loads((runs / "runs" / recipe.stem / "run.json").read_text())
        [build] = [s for s in summary["stages"] if s["id"] == "build/training"]
        with pa.ipc.open_file(f"{build['path']}/examples.arrow") as reader:
            built[recipe.stem] = {r["id"]: r for r in reader.read_all().to_pylist()}
    assert built["csft"].keys() == built["fuse"].keys() and built["csft"]
    for example_id, row in built["csft"].items():
        teacher = built["fuse"][example_id]
        assert row["input_ids"] == teacher["input_ids"] and row["labels"] == teacher["labels"]
        assert row["gt_length"] == teacher["gt_length"] and row["source"] == ""
        n = sum(label != -100 for label in row["labels"])
        assert len(row["teacher_mask"]) == n and not any(row["teacher_mask"])
        assert all(logits == [float("-inf")] for logits in row["teacher_logits"])  # one unused slot
    summary = json.loads((runs / "runs" / "csft" / "run.json").read_text())
    [train] = [s for s in summary["stages"] if s["id"] == "train"]
    assert train["metrics"]["steps"] > 0 and train["metrics"]["final_loss"] > 0
    # its build exports like any other: every example, the ground truth, no source
    from datasets import load_from_disk

    result = cli("export", "csft", "--stage", "build", "--to", tmp_path / "ds", "--runs-dir", runs)
    assert result.exit_code == 0, result.output
    ds = load_from_disk(str(tmp_path / "ds"))
    assert sorted(ds["id"]) == sorted(built["csft"]) and set(ds["source"]) == {""} and set(ds["mode"]) == {"training"}
