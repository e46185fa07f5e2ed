"""The plugin's tests: its phases alone, then a whole run on profuser's tiny models.

Run them with the package installed (``pip install -e .``; its entry point registers it):
``pytest tests``.
"""

import json

from typer.testing import CliRunner

from profuser.cli import app
from profuser.components import CurriculumInput
from profuser.plugins import Engine
from profuser.testing import tiny_recipe


def test_phases_start_with_plain_sft():
    curriculum = Engine().registry.build("curricula", "warmup", {"warmup_epochs": 2})
    phases = curriculum.phases(CurriculumInput(ids=["a"], gt_length={"a": 10}))
    assert [p.name for p in phases] == ["sft-warmup", "inference", "co-fusion"]
    assert phases[0].epochs == 2 and phases[0].beta == 0.0


def test_a_tiny_recipe_trains_through_every_phase(tmp_path):
    recipe = tiny_recipe(tmp_path, {"curriculum.name": "sft_warmup", "curriculum.params.warmup_epochs": 1})
    result = CliRunner().invoke(app, ["run", str(recipe), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    model = (tmp_path / "runs" / "runs" / "tiny" / "model").resolve()
    steps = [json.loads(line) for line in (model.parent / "metrics.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in steps if s["phase_step"] == 1] == ["sft-warmup", "inference", "co-fusion"]
    assert {s["loss/beta"] for s in steps if s["phase"] == "sft-warmup"} == {0.0}
