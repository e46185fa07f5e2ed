"""The win rate's judge (evaluate.judge: a reward model and a generator) is keyed like any other
component the evaluate stages build: a third-party judge by its code, so an edit in place
recomputes every evaluation that ran it; a built-in judge keeps the keys evaluations had."""

from __future__ import annotations

import importlib
import sys

import pytest

from profuser.fingerprint import FingerprintCache
from profuser.pipeline import plan, stage_key_inputs
from profuser.plugins import Engine
from profuser.recipe import load_recipe
from profuser.testing import tiny_recipe

JUDGE = '''
from profuser import hookimpl
from profuser.components import RewardModel

from .weights import SCALE


class LengthJudge(RewardModel):
    name = "length_judge"

    def score(self, items):
        return [SCALE * len(item.response) for item in items]


@hookimpl
def profuser_register_reward_models(register):
    register(LengthJudge)
'''


@pytest.fixture
def package(tmp_path, monkeypatch):
    """``myjudges``: a third-party reward model that imports a sibling module."""
    root = tmp_path / "site" / "myjudges"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "judge.py").write_text(JUDGE)
    (root / "weights.py").write_text("SCALE = 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    module = importlib.import_module("myjudges.judge")
    yield root, module
    for name in [m for m in sys.modules if m == "myjudges" or m.startswith("myjudges.")]:
        del sys.modules[name]


def judged(root, reward_model, **more):
    return tiny_recipe(root, **{"evaluate.tasks": ["profuser_heldout", "profuser_heldout_winrate"],
                                "evaluate.baselines": True, "evaluate.judge": {"reward_model": reward_model}, **more})


def _keys(recipe_file, engine, tmp_path):
    stages = plan(load_recipe(recipe_file, registry=engine.registry), engine, device="cpu")
    return stage_key_inputs(stages, engine, FingerprintCache(tmp_path / "fp.json"))


def test_editing_a_third_party_judge_recomputes_the_evaluations_only(package, tmp_path, tiny_root):
    root, module = package
    engine = Engine(entrypoints=False, extra_plugins=[("myjudges", module)])
    recipe = judged(tiny_root, {"name": "length_judge"})
    before, inputs = _keys(recipe, engine, tmp_path)
    evaluations = {s for s in inputs if s.startswith(("evaluate/", "judge/"))}
    assert evaluations == {"judge/llama", "evaluate/fused", "evaluate/llama", "evaluate/gemma"}
    for stage in evaluations:
        assert set(inputs[stage]["code"]) == {"reward_models:length_judge"}
        assert "generators:hf" not in inputs[stage]["versions"]  # built-in: profuser's version keys it
    assert not any("code" in inputs[s] for s in inputs if s not in evaluations)
    (root / "weights.py").write_text("SCALE = 2.0\n")  # a module the judge imports, edited in place
    after, _ = _keys(recipe, engine, tmp_path)
    assert {s for s in before if before[s] != after[s]} == evaluations


def test_a_builtin_judge_keeps_the_keys_evaluations_had(tmp_path, tiny_root):
    engine = Engine(entrypoints=False)
    recipe = judged(tiny_root, {"name": "judge", "params": {"model": str(tiny_root / "models" / "tiny-llama")}})
    stages = plan(load_recipe(recipe, registry=engine.registry), engine, device="cpu")
    evaluations = [s for s in stages if s.kind in ("evaluate", "judge")]
    assert evaluations and all(s.components == [] for s in evaluations)
    _, inputs = stage_key_inputs(stages, engine, FingerprintCache(tmp_path / "fp.json"))
    for stage in evaluations:  # what an evaluation hashed before judges were listed: profuser's version, the stage's
        assert set(inputs[stage.id]["versions"]) == {"profuser", "stage"} and "code" not in inputs[stage.id]


def test_the_reference_is_answered_once_for_every_evaluation(tmp_path, tiny_root):
    """One judge/<reference> stage per recipe, read by every evaluation; recipes that differ in
    what they train share its key, so a store answers and judges the reference once."""
    engine = Engine(entrypoints=False)
    judge = {"name": "judge", "params": {"model": str(tiny_root / "models" / "tiny-llama")}}
    base = judged(tiny_root, judge)
    other = tiny_root / "other.yaml"
    other.write_text("extends: tiny.yaml\nname: other\ncurriculum: csft\n")
    keys = {}
    for name, recipe in (("a", base), ("b", other)):
        stages = plan(load_recipe(recipe, registry=engine.registry), engine, device="cpu")
        [answers] = [s for s in stages if s.kind == "judge"]
        assert answers.id == "judge/llama" and answers.config.limit is None
        assert {s.id for s in stages if s.deps.get("judge") == answers.id} == {"evaluate/fused", "evaluate/llama", "evaluate/gemma"}
        keys[name] = stage_key_inputs(stages, engine, FingerprintCache(tmp_path / "fp.json"))[0]
    assert keys["a"]["judge/llama"] == keys["b"]["judge/llama"] and keys["a"]["train"] != keys["b"]["train"]
    # without the win rate: no judge stage, and the evaluations read nothing more than they did
    plain = plan(load_recipe(tiny_recipe(tiny_root, **{"evaluate.tasks": ["profuser_heldout"], "evaluate.baselines": True}),
                             registry=engine.registry), engine, device="cpu")
    assert not [s for s in plain if s.kind == "judge"]
    assert all(set(s.deps) <= {"model", "data"} for s in plain if s.kind == "evaluate")
