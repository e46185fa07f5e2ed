"""Keys follow code: a third-party component is keyed by the source of its module and of the
modules it imports from its own package, so an edit in place (no version bump) recomputes
exactly the stages that use it; built-in components keep their explicit versions."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from profuser.fingerprint import FingerprintCache, source_hash
from profuser.pipeline import KEY_INPUTS, Runner, Runtime, plan, stage_key_inputs
from profuser.plugins import Engine
from profuser.recipe import load_recipe
from profuser.testing import tiny_recipe

LOSS = '''
from profuser import hookimpl
from profuser.components import Loss
from profuser.losses import sft_loss

from .weights import SCALE


class ConfidenceKL(Loss):
    name = "confidence_kl"

    def __call__(self, logits, batch, *, beta=None):
        loss, parts = sft_loss(logits, batch)
        return loss * SCALE, parts


@hookimpl
def profuser_register_losses(register):
    register(ConfidenceKL)
'''


@pytest.fixture
def package(tmp_path, monkeypatch):
    """``mylosses``: a third-party package with a loss that imports a sibling module."""
    root = tmp_path / "site" / "mylosses"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "loss.py").write_text(LOSS)
    (root / "weights.py").write_text("SCALE = 1.0\n")
    (root / "unrelated.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    module = importlib.import_module("mylosses.loss")
    yield root, module
    for name in [m for m in sys.modules if m == "mylosses" or m.startswith("mylosses.")]:
        del sys.modules[name]


def _keys(recipe_file, engine, tmp_path):
    stages = plan(load_recipe(recipe_file, registry=engine.registry), engine)
    return stage_key_inputs(stages, engine, FingerprintCache(tmp_path / "fp.json"))


def test_editing_a_third_party_loss_recomputes_train_and_evaluate_only(package, tmp_path, tiny_root):
    root, module = package
    engine = Engine(entrypoints=False, extra_plugins=[("mylosses", module)])
    recipe = tiny_recipe(tiny_root, **{"loss.name": "confidence_kl"})
    before, inputs = _keys(recipe, engine, tmp_path)
    assert set(inputs["train"]["code"]) == {"losses:confidence_kl"}
    assert not any("code" in inputs[s] for s in inputs if s != "train")  # built-ins keep their versions
    (root / "loss.py").write_text(LOSS.replace("loss * SCALE", "loss * SCALE * 2"))  # in place, no version bump
    after, _ = _keys(recipe, engine, tmp_path)
    assert {s for s in before if before[s] != after[s]} == {"train", "evaluate/fused"}
    (root / "weights.py").write_text("SCALE = 0.5\n")  # a module the loss imports from its package
    again, _ = _keys(recipe, engine, tmp_path)
    assert {s for s in after if after[s] != again[s]} == {"train", "evaluate/fused"}
    (root / "unrelated.py").write_text("X = 2\n")  # imported by nothing the loss uses
    assert _keys(recipe, engine, tmp_path)[0] == again


def test_dry_run_says_which_component_code_changed(package, tmp_path, tiny_root, monkeypatch):
    root, module = package
    monkeypatch.setenv("PROFUSER_CACHE", str(tmp_path / "cache"))
    engine = Engine(entrypoints=False, extra_plugins=[("mylosses", module)])
    recipe = load_recipe(tiny_recipe(tiny_root, **{"loss.name": "confidence_kl"}), registry=engine.registry)
    runtime = Runtime(runs_dir=tmp_path / "runs", progress=False)
    first = Runner(recipe, engine, runtime, echo=lambda _: None)
    first.run_dir.mkdir(parents=True)
    (first.run_dir / KEY_INPUTS).write_text(json.dumps(first.key_inputs))  # as run() leaves it
    (root / "weights.py").write_text("SCALE = 3.0\n")
    why = Runner(recipe, engine, runtime, echo=lambda _: None).reasons()
    assert why["train"] == ["loss 'confidence_kl' code changed"]
    assert why["evaluate/fused"] == ["upstream train changed"]


def test_source_hash_follows_relative_and_absolute_imports_within_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "pkgx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from ..b import f\nimport pkgx.c\nimport json\n")
    (pkg / "b.py").write_text("def f(): return 1\n")
    (pkg / "c.py").write_text("Y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("pkgx.sub.a")
        first = source_hash("pkgx.sub.a")
        for name, text in (("b.py", "def f(): return 2\n"), ("c.py", "Y = 2\n")):
            (pkg / name).write_text(text)
            now = source_hash("pkgx.sub.a")
            assert now != first
            first = now
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "pkgx"]:
            del sys.modules[name]


def test_the_run_records_what_each_key_hashed(tmp_path):
    """run() leaves runs/<name>/key_inputs.json; a later --until keeps the other stages' entries."""
    from test_pipeline import toy_run

    from profuser.recipe import Recipe, load_raw

    engine = Engine(entrypoints=False)
    recipe = Recipe.model_validate(load_raw(Path(__file__).resolve().parents[1] / "recipes" / "profuser.yaml"))
    runner, _ = toy_run(tmp_path, engine, recipe)
    recorded = json.loads((runner.run_dir / KEY_INPUTS).read_text())
    assert set(recorded) == {"a", "b", "c"} and recorded["b"]["deps"] == {"up": runner.keys["a"]}
    assert recorded["a"]["code"] == {"stage:": source_hash("toy_stages")}  # a test's own stage module
    runner, _ = toy_run(tmp_path, engine, recipe, b_value="B", until="b")
    assert runner.reasons() == {}  # all ran
    after = json.loads((runner.run_dir / KEY_INPUTS).read_text())
    assert after["c"] == recorded["c"] and after["b"]["config"]["value"] == "B"


@pytest.mark.slow
def test_a_run_after_the_edit_recomputes_train_and_evaluate_only(package, tmp_path, tiny_root, monkeypatch):
    """The whole tiny pipeline, then the loss edited in place: the rerun reuses data..build."""
    root, module = package
    monkeypatch.setenv("PROFUSER_CACHE", str(tmp_path / "cache"))
    engine = Engine(entrypoints=False, extra_plugins=[("mylosses", module)])
    recipe = load_recipe(tiny_recipe(tiny_root, **{"loss.name": "confidence_kl"}), registry=engine.registry)
    runtime = Runtime(runs_dir=tmp_path / "runs", progress=False, isolate_stages=False)
    first = Runner(recipe, engine, runtime, echo=lambda _: None).run()
    assert not any(r.cached for r in first)
    (root / "weights.py").write_text("SCALE = 0.5\n")
    importlib.reload(sys.modules["mylosses.weights"])
    importlib.reload(module)  # the new code runs too (a new process would import it)
    again = Runner(recipe, engine, runtime, echo=lambda _: None)
    assert {sid for sid, why in again.reasons().items()} == {"train", "evaluate/fused"}
    second = {r.id: r.cached for r in again.run()}
    assert {sid for sid, cached in second.items() if not cached} == {"train", "evaluate/fused"}
