"""profuser.testing.tiny_recipe: a valid recipe on the tiny models, overridable like ``-o``, that
a plugin's end-to-end test runs (the example package's own tests do, installed as a user would)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from profuser.errors import RecipeError
from profuser.plugins import Engine
from profuser.recipe import load_recipe
from profuser.testing import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "profuser-warmup-curriculum"
ANSWER_AWARE = REPO / "docs" / "examples" / "profuser-answer-aware"




def test_tiny_recipe_is_valid_and_small(tiny_root):
    recipe = load_recipe(tiny_recipe(tiny_root), registry=Engine(entrypoints=False).registry)
    assert [s.key for s in recipe.sources] == ["llama", "gemma"]
    assert recipe.target.ref == str(tiny_root / "models" / "tiny-llama")
    assert recipe.data.source.params["n"] <= 16 and recipe.evaluate.tasks == ["profuser_heldout"]
    assert recipe.evaluate.baselines is False


def test_overrides_are_dotted_like_dash_o(tiny_root):
    path = tiny_recipe(tiny_root, {"loss.params.temperature": 1.5, "train.lr": 0.01}, **{"sources.1.label": "gem", "seed": 3})
    raw = yaml.safe_load(path.read_text())
    assert raw["loss"] == {"name": "fuse_kl", "params": {"temperature": 1.5}}
    assert raw["train"]["lr"] == 0.01 and raw["sources"][1]["label"] == "gem" and raw["seed"] == 3
    recipe = load_recipe(path, registry=Engine(entrypoints=False).registry)
    assert recipe.loss.params == {"temperature": 1.5} and [s.key for s in recipe.sources] == ["llama", "gem"]


def test_the_recipes_own_name_is_an_override_like_any_field(tiny_root):
    raw = yaml.safe_load(tiny_recipe(tiny_root, name="tiny-layerwise").read_text())
    assert raw["name"] == "tiny-layerwise" and "params" not in raw
    assert load_recipe(tiny_recipe(tiny_root, name="b"), registry=Engine(entrypoints=False).registry).name == "b"


def test_naming_another_component_drops_the_defaults_params(tiny_root):
    raw = yaml.safe_load(tiny_recipe(tiny_root, **{"inference_mode.evaluator.name": "reference",
                                              "curriculum.params.w1": 0.3, "curriculum.name": "simultaneous"}).read_text())
    assert raw["inference_mode"]["evaluator"] == {"name": "reference", "params": {}}
    # the name is applied first whatever the order given, so the new component keeps its params
    assert raw["curriculum"] == {"name": "simultaneous", "params": {"w1": 0.3}}
    assert raw["inference_mode"]["reward_models"][0]["label"] == "judge"


@pytest.mark.parametrize("path", ["sources.5.label", "train.lr.x"])
def test_a_bad_override_is_one_line(tiny_root, path):
    with pytest.raises(RecipeError) as err:
        tiny_recipe(tiny_root, **{path: 1})
    [line] = err.value.lines()
    assert line.startswith(f"tiny_recipe: {path}: ")


@pytest.mark.parametrize(("example", "passed"), [(EXAMPLE, 2), (ANSWER_AWARE, 4)], ids=lambda x: getattr(x, "name", x))
def test_the_example_package_runs_its_own_end_to_end_test(tmp_path, example, passed):
    """docs/examples/profuser-warmup-curriculum and profuser-answer-aware (meta, n samples per
    prompt, in-phase order, a loss needing the mode), installed, pass their tests: a tiny_recipe
    trains with their components, discovered through their entry points."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(example)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site), "PROFUSER_DISABLE_ENTRYPOINTS": ""}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "--basetemp", str(tmp_path / "pytest"), str(example / "tests")],
                          check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{passed} passed" in done.stdout
