"""The typed seam between the planner and the stages: each stage module owns a pydantic ``Config``
(what it reads, what its key hashes), names its own input roles, reads the selection through one
reader, and gets the engine and runtime passed in (no process-wide ``get_engine()`` below the CLI)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from profuser_plugins.losses.fuse_kl import FuseKL
from pydantic import ValidationError

from profuser import hookimpl
from profuser.artifacts import read_selection
from profuser.components import BuiltinModel, Curriculum, Phase
from profuser.errors import DataError, ModelError
from profuser.pipeline import STAGE_KINDS, Runner, Stage, plan, stage_keys
from profuser.plugins import Engine
from profuser.recipe import Recipe, load_raw, load_recipe
from profuser.runtime import Runtime, runtime_of
from profuser.stages import StageConfig
from profuser.testing import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine():
    return Engine(entrypoints=False)


def recipe_with(**fields) -> Recipe:
    raw = load_raw(REPO / "recipes" / "profuser.yaml")
    for name, value in fields.items():  # one level deep: train={"lr": ...} keeps the other train fields
        raw[name] = {**raw[name], **value} if isinstance(raw.get(name), dict) else value
    return Recipe.model_validate(raw)


def test_every_stage_module_owns_a_frozen_strict_config():
    for kind in STAGE_KINDS:
        config = importlib.import_module(f"profuser.stages.{kind}").Config
        assert issubclass(config, StageConfig), kind
        assert config.model_config["frozen"] and config.model_config["extra"] == "forbid", kind


def test_plan_builds_each_stage_its_modules_config_and_the_keys_are_stable(engine):
    recipe = recipe_with()
    stages = plan(recipe, engine)
    assert {s.kind for s in stages} >= {"data", "generate", "score", "select", "logits", "align", "build", "train", "evaluate"}
    for stage in stages:
        assert type(stage.config) is stage.code().Config, stage.id
        with pytest.raises(ValidationError):  # frozen: a stage cannot change what its key says it read
            stage.config.__setattr__(next(iter(type(stage.config).model_fields)), None)
    keys = stage_keys(stages, engine)
    assert keys == stage_keys(plan(recipe_with(), engine), engine)  # the same recipe, the same keys
    # a config handed over as a mapping (tests, old callers) is validated into the same Config
    again = [Stage(s.id, s.kind, s.hashed_config(), s.deps, s.components) for s in stages]
    assert stage_keys(again, engine) == keys


def test_fields_left_out_of_the_key_are_still_read_from_the_config(engine):
    """train's NOT_HASHED options (trackers, the Hub) reach the stage through its Config; only
    what changes the model changes the key."""
    base, trackers, lr = (plan(recipe_with(**fields), engine) for fields in ({}, {"train": {"report_to": []}},
                                                                             {"train": {"lr": 1e-4}}))
    train = {s.id: s for s in trackers}["train"]
    assert train.config.train.report_to == [] and "report_to" not in train.hashed_config()["train"]
    key = lambda stages: stage_keys(stages, engine)["train"]
    assert key(trackers) == key(base) != key(lr)
    base = {s.id: s for s in base}["train"]
    assert "curriculum:" in base.config.card_recipe  # the card's recipe text is in the config, so in the key


class LogzLoss(FuseKL):
    """fuse_kl declaring two extra columns: only planned here (which configs gain them)."""

    name = "seam_logz"
    aliases = ()  # fuse_kl's belong to fuse_kl
    needs = frozenset({"teacher_logz", "source"})


class LogzPlugin:
    @hookimpl
    def profuser_register_losses(self, register):
        register(LogzLoss)


def test_extra_columns_are_hashed_only_when_a_loss_asks_for_them(engine):
    plain = {s.id: s for s in plan(recipe_with(), engine)}
    logz_engine = Engine(entrypoints=False, extra_plugins=[("seam-logz", LogzPlugin())])
    logz = {s.id: s for s in plan(recipe_with(loss={"name": "seam_logz"}), logz_engine)}
    assert "columns" not in plain["build/training"].hashed_config() and plain["build/training"].config.columns == []
    assert logz["build/training"].hashed_config()["columns"] == ["source", "teacher_logz"]
    align_id = next(i for i in logz if i.startswith("align/training/"))
    assert logz[align_id].config.columns == ["teacher_logz"]
    assert "columns" not in plain[align_id].hashed_config()


def test_the_planner_uses_the_roles_the_stages_read(engine):
    from profuser.stages import align, build, logits, score, select, train

    stages = {s.id: s for s in plan(recipe_with(), engine)}
    keys = [s.key for s in recipe_with().sources]
    assert {build.align_role(k) for k in keys} <= stages["build/training"].deps.keys()
    assert {train.build_role("training"), train.build_role("inference"), train.SELECTION} == stages["train"].deps.keys()
    assert {select.logits_role(k) for k in keys} | {select.DATA} == stages["select/training"].deps.keys()
    assert {score.generations_role(k) for k in keys} <= next(s for s in stages.values() if s.kind == "score").deps.keys()
    assert stages[f"logits/inference/{keys[0]}"].deps.keys() == {logits.DATA, logits.GENERATIONS, logits.SELECTION}
    assert stages[f"align/training/{keys[0]}"].deps.keys() == {align.LOGITS, align.SELECTION, align.DATA}


def test_one_selection_reader(tmp_path):
    pq.write_table(pa.table({"id": ["b", "a"], "chosen": ["x", "y"], "scores": ['{"x": 1}', '{"y": 2}'],
                             "detail": ["{}", "{}"], "sample": pa.array([0, 2], pa.int32())}), tmp_path / "selection.parquet")
    rows = read_selection(tmp_path)
    assert list(rows) == ["b", "a"] and rows["a"].chosen == "y" and rows["a"].sample == 2 and rows["a"].scores is None
    assert read_selection(tmp_path / "selection.parquet", scores=True)["a"].scores == {"y": 2}
    with pytest.raises(DataError, match="selection file not found"):
        read_selection(tmp_path / "nowhere")


class OldStyle(Curriculum):
    """A third-party component written before the runtime was passed in: ``__init__(self, params)``."""

    name = "old_style"
    modes = ("training",)

    def __init__(self, params):
        super().__init__(params)
        self.device_at_init = runtime_of(self).device  # the runtime is there before __init__ runs

    def phases(self, data):
        return [Phase("training", 1, {"training": 1.0})]


class OldStylePlugin:
    @hookimpl
    def profuser_register_curricula(self, register):
        register(OldStyle)


def test_the_registry_builds_components_with_their_runtime():
    engine = Engine(entrypoints=False, extra_plugins=[("old-style", OldStylePlugin())])
    runtime = Runtime(device="cpu:1")
    component = engine.registry.build("curricula", "old_style", {}, runtime=runtime)
    assert component.runtime is runtime and component.device_at_init == "cpu:1"
    assert engine.registry.build("curricula", "old_style").runtime is None  # made on its own: runtime_of's defaults


def test_layerwise_takes_its_schedule_from_the_registry_that_builds_it():
    """A schedule only an ``Engine(extra_plugins=...)`` knows resolves: no process-wide engine."""
    engine = Engine(entrypoints=False, extra_plugins=[("old-style", OldStylePlugin())])
    layerwise = engine.registry.build("curricula", "layerwise", {"schedule": {"name": "old_style"}})
    assert isinstance(layerwise.schedule, OldStyle) and layerwise.modes == ("training",)
    info = engine.registry.get("curricula", "layerwise")
    assert info.params_problems({"schedule": {"name": "old_style"}}) == []  # recipe validation: the same registry
    assert Engine(entrypoints=False).registry.get("curricula", "layerwise").params_problems({"schedule": {"name": "old_style"}})


def test_a_builtin_model_without_an_engine_is_refused_naming_the_ref():
    from profuser.models import resolve_model

    with pytest.raises(ModelError) as error:
        resolve_model({"ref": "builtin:smollm2-135m-instruct"})
    assert error.value.lines() == [f"builtin:smollm2-135m-instruct: {error.value.message}"]
    assert "engine" in error.value.message


def test_no_get_engine_below_the_cli():
    """Library code takes the engine it is given; only the command line's edge builds the
    process-wide one (plugins.py defines it)."""
    edges = {"profuser/cli.py", "profuser/plugins.py"}
    found = [str(p.relative_to(REPO)) for folder in ("profuser", "plugins") for p in (REPO / folder).rglob("*.py")
             if re.search(r"\bget_engine\(", p.read_text(encoding="utf-8")) and str(p.relative_to(REPO)) not in edges]
    assert found == []


def test_nothing_in_the_stages_reads_the_recipe():
    for path in (REPO / "profuser" / "stages").glob("*.py"):
        assert "ctx.recipe" not in path.read_text(encoding="utf-8"), path.name


def _builtin_plugin(dirs: dict[str, Path]):
    class TinyBuiltins:
        @hookimpl
        def profuser_register_models(self, register):
            for arch, folder in dirs.items():
                register(type(f"Tiny{arch}", (BuiltinModel,), {"resolve": lambda self, root, f=folder: f}),
                         name=f"seam-tiny-{arch}")

    return TinyBuiltins()


def test_a_builtin_model_of_an_extra_plugin_resolves_through_the_pipeline(tmp_path, monkeypatch):
    """docs/plugins.md: an ``Engine(extra_plugins=...)`` that registers a ``builtin:`` model runs
    a recipe naming it — the logits stage loads it, align and build load its tokenizer."""
    import profuser.plugins

    path = tiny_recipe(tmp_path, **{"target.ref": "builtin:seam-tiny-llama", "sources.0.ref": "builtin:seam-tiny-llama",
                                    "sources.1.ref": "builtin:seam-tiny-gemma", "inference_mode.reward_models.0.params.model":
                                    "builtin:seam-tiny-llama"})
    models = tmp_path / "models"
    engine = Engine(entrypoints=False, extra_plugins=[("seam-builtins", _builtin_plugin(
        {"llama": models / "tiny-llama", "gemma": models / "tiny-gemma"}))])

    def no_global_engine():
        raise AssertionError("get_engine() called below the CLI")

    monkeypatch.setattr(profuser.plugins, "get_engine", no_global_engine)
    recipe = load_recipe(path, registry=engine.registry)
    runner = Runner(recipe, engine, Runtime(runs_dir=tmp_path / "runs", device="cpu", progress=False, isolate_stages=False),
                    until="build/training", echo=lambda _: None)
    results = {r.id: r for r in runner.run()}
    assert results["build/training"].metrics["examples"] > 0
    assert results["logits/training/gemma"].metrics["examples"] == results["build/training"].metrics["examples"]
