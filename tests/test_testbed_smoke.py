"""The testbed's smoke version (docs/testbed.md): both specialist recipes, shrunk by -o overrides,
trained on the packaged models, beat the target on their own families. Minutes on a CPU (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from profuser.advantages import read_families, read_outcomes
from profuser.cli import app

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "testbed" / "specialists"
# the smoke version of docs/testbed.md: fewer training and held-out examples, three epochs
SMOKE = {"smollm2": ["-o", "data.source.params.per_family=32", "-o", "curriculum.params.epochs=3",
                     "-o", "data.source.params.heldout_per_family=10", "-o", "evaluate.baselines=true"],
         "gemma3": ["-o", "data.source.params.per_family=24", "-o", "curriculum.params.epochs=3",
                    "-o", "data.source.params.heldout_per_family=10"]}
OWN = {"smollm2": ("sequence", "code_words", "letter_shift"), "gemma3": ("capitals", "largest", "weekday_shift")}


def stage_dir(runs: Path, recipe: str, stage: str) -> Path:
    record = json.loads((runs / "runs" / recipe / "run.json").read_text())
    (found,) = [s for s in record["stages"] if s["id"] == stage]
    return Path(found["path"])


def em(per_example: Path, families: dict[str, str], which: tuple[str, ...]) -> float:
    values = [v for rid, v in read_outcomes(per_example).items() if families.get(rid) in which]
    assert len(values) == 10 * len(which)
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two trainings of packaged models: ~10 minutes alone, longer on a loaded machine
def test_specialists_beat_the_target_on_their_own_families(tmp_path):
    runs = tmp_path / "runs"
    for model, overrides in SMOKE.items():
        result = CliRunner().invoke(app, ["run", str(RECIPES / f"{model}.yaml"), "--runs-dir", str(runs), *overrides])
        assert result.exit_code == 0, result.output
    families = read_families(stage_dir(runs, "testbed-smollm2-specialist", "data") / "heldout.parquet")
    target = stage_dir(runs, "testbed-smollm2-specialist", "evaluate/smollm2") / "per_example.parquet"
    for model, recipe in (("smollm2", "testbed-smollm2-specialist"), ("gemma3", "testbed-gemma3-specialist")):
        specialist = stage_dir(runs, recipe, "evaluate/fused") / "per_example.parquet"
        assert em(specialist, families, OWN[model]) > em(target, families, OWN[model]), model
