"""The plugin engine: registration hooks, duplicates, entry-point discovery, did-you-mean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import Field

from profuser import hookimpl
from profuser.components import (
    KINDS,
    NEEDS,
    AdvantageEvaluator,
    Curriculum,
    DatasetSource,
    Phase,
    PhasePart,
    Record,
    StrictModel,
)
from profuser.errors import PluginError, RecipeError
from profuser.plugins import Engine, params_problems, reset_engine
from profuser.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "profuser-warmup-curriculum"


class OneShot(Curriculum):
    name = "one_shot"
    aliases = ("oneshot",)
    modes = ("training",)

    def phases(self, data):
        return [Phase("only", 1.0, [PhasePart("training")])]


def _plugin(module_name: str, cls=OneShot, **register_kwargs):
    """A module registering ``cls`` through the hook of its kind (curricula for non-components)."""
    module = types.ModuleType(module_name)
    hook = f"profuser_register_{getattr(cls, 'kind', '') or 'curricula'}"

    def register_it(register):
        register(cls, **register_kwargs)

    register_it.__name__ = hook
    setattr(module, hook, hookimpl(register_it))
    return module


def test_throwaway_plugin_registers_component_with_alias():
    engine = Engine(entrypoints=False, extra_plugins=[("throwaway", _plugin("throwaway"))])
    info = engine.registry.get("curricula", "oneshot")
    assert info.cls is OneShot and info.name == "one_shot" and info.plugin == "throwaway"
    assert "curricula:one_shot" in [f"{c.kind}:{c.name}" for c in engine.plugins["throwaway"].components]
    # the throwaway plugin is gone from a fresh engine
    assert "one_shot" not in Engine(entrypoints=False).registry.names("curricula")


def test_duplicate_name_names_both_plugins():
    with pytest.raises(PluginError) as err:
        Engine(entrypoints=False, extra_plugins=[("first", _plugin("first")), ("second", _plugin("second"))])
    assert "'first'" in err.value.message and "'second'" in err.value.message


def test_registering_a_non_component_is_an_error_naming_the_plugin():
    with pytest.raises(PluginError) as err:
        Engine(entrypoints=False, extra_plugins=[("bad", _plugin("bad", cls=dict, name="x"))])
    assert "plugin bad" in err.value.lines()[0]


def test_unknown_name_suggests_the_closest():
    engine = Engine(entrypoints=False, extra_plugins=[("throwaway", _plugin("throwaway"))])
    with pytest.raises(PluginError, match="did you mean 'one_shot'"):
        engine.registry.get("curricula", "one_shot_")


def test_builtins_cover_every_kind_without_entry_points():
    engine = Engine(entrypoints=False)
    assert all(p.builtin for p in engine.plugins.values())
    missing = [kind for kind in KINDS if not engine.registry.names(kind)]
    assert missing == []


def test_every_builtin_params_model_forbids_unknown_fields():
    engine = Engine(entrypoints=False)
    for info in engine.registry.components():
        assert info.cls.Params.model_config.get("extra") == "forbid", f"{info.kind}:{info.name}"


def test_example_package_is_discovered_through_its_entry_point(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "PROFUSER_DISABLE_ENTRYPOINTS": ""}
    out = subprocess.run([sys.executable, "-m", "profuser.cli", "plugins", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    rows = {row["plugin"]: row for row in json.loads(out)}
    assert rows["warmup"]["builtin"] is False
    assert rows["warmup"]["version"] == "0.1.0"
    assert rows["warmup"]["components"] == ["curricula:sft_warmup"]
    # and the switch that turns third-party discovery off works
    env["PROFUSER_DISABLE_ENTRYPOINTS"] = "1"
    out = subprocess.run([sys.executable, "-m", "profuser.cli", "plugins", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "warmup" not in {row["plugin"] for row in json.loads(out)}


def test_the_answer_aware_example_package_registers_its_three_components(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE.parent / "profuser-answer-aware")], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "PROFUSER_DISABLE_ENTRYPOINTS": ""}
    out = subprocess.run([sys.executable, "-m", "profuser.cli", "plugins", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    row = {row["plugin"]: row for row in json.loads(out)}["answer_aware"]
    assert row["builtin"] is False and row["version"] == "0.1.0"
    assert set(row["components"]) == {"evaluators:answer_aware", "curricula:length_batches", "losses:mode_scaled_kl"}


# --- profuser components: any text, in full ------------------------------------------------------


class Bracketed(Curriculum):
    """A curriculum whose text rich would read as markup: [/INST] and [bold]x[/bold].

    Its second paragraph must be printed too, not only the first line.
    """

    name = "bracketed"
    modes = ("training",)

    class Params(StrictModel):
        template: str = Field(default="<s>[INST] {instruction} [/INST]", description="a [/closing] tag")

    def phases(self, data):
        return [Phase("only", 1.0, [PhasePart("training")])]


def _cli(*args, engine=None):
    from typer.testing import CliRunner

    from profuser.cli import app

    reset_engine(engine or Engine(entrypoints=False))
    try:
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "100"})
    finally:
        reset_engine(None)


@pytest.mark.parametrize("kind", [None, *KINDS])
def test_components_renders_every_kind(kind):
    result = _cli("components", *(["--kind", kind] if kind else []))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    engine = Engine(entrypoints=False)
    for info in engine.registry.components(kind):
        assert info.name in result.output


def test_components_prints_brackets_as_is_and_whole_docstrings():
    engine = Engine(entrypoints=False, extra_plugins=[("brackets", _plugin("brackets", cls=Bracketed))])
    result = _cli("components", "--kind", "curricula", engine=engine)
    assert result.exit_code == 0, result.output
    assert "[/INST] and [bold]x[/bold]" in result.output
    assert "Its second paragraph must be printed too" in result.output
    assert "params.template: string = '<s>[INST] {instruction} [/INST]'  a [/closing] tag" in result.output
    # the built-in reward models' templates hold [/INST] too
    result = _cli("components", "--kind", "reward_models")
    assert result.exit_code == 0 and "[/INST]" in result.output


def test_components_json_keeps_its_shape():
    result = _cli("components", "--kind", "losses", "--json")
    rows = json.loads(result.output)
    assert {tuple(sorted(r)) for r in rows} == {("aliases", "doc", "kind", "name", "params", "plugin")}
    kl = next(r for r in rows if r["name"] == "fuse_kl")
    assert "\n" not in kl["doc"] and kl["params"]["properties"]["beta"]["default"] == 0.5


# --- did you mean, disabled entry points, needs ---------------------------------------------------


def test_param_typo_gets_did_you_mean(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {REPO / 'recipes' / 'profuser.yaml'}\n"
                      "curriculum: {name: bracketed, params: {templte: x}}\nloss: {name: fuse_kl, params: {bta: 1, zzz: 2}}\n")
    engine = Engine(entrypoints=False, extra_plugins=[("brackets", _plugin("brackets", cls=Bracketed))])
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, registry=engine.registry)
    lines = err.value.lines()
    assert f"{recipe}: curriculum.params.templte: unknown field; did you mean template?" in lines
    assert f"{recipe}: loss.params.bta: unknown field; did you mean beta?" in lines
    assert f"{recipe}: loss.params.zzz: unknown field" in lines


def test_param_typo_in_a_nested_model_gets_did_you_mean():
    class Inner(StrictModel):
        phase_fraction: float = 0.5

    class Outer(StrictModel):
        inner: list[Inner] | None = None

    problems = params_problems(Outer, {"inner": [{"phse_fraction": 1}]})
    assert problems == [("inner.0.phse_fraction", "unknown field; did you mean phase_fraction?")]
    assert params_problems(Outer, {"inner": [{"phase_fraction": 1}]}) == []


def test_unknown_component_says_entry_points_are_off():
    with pytest.raises(PluginError, match="plugins from installed packages are off"):
        Engine(entrypoints=False).registry.get("curricula", "sft_warmup")
    with pytest.raises(PluginError) as err:
        Engine(entrypoints=True).registry.get("curricula", "no_such_curriculum")
    assert "are off" not in err.value.message


class MetaEvaluator(AdvantageEvaluator):
    name = "meta_eval"
    mode = "inference"
    needs = frozenset({"meta"})

    def select(self, examples):
        return []


@pytest.mark.parametrize("mode, needs, bad", [("inference", {"meta"}, "'meta'"), ("training", {"responses"}, "'responses'"),
                                              ("training", "nll", "set of names"), ("both", {"nll"}, "'both'")])
def test_registration_rejects_needs_no_stage_provides(mode, needs, bad):
    cls = type("Odd", (MetaEvaluator,), {"mode": mode, "needs": needs})
    with pytest.raises(PluginError) as err:
        Engine(entrypoints=False, extra_plugins=[("odd", _plugin("odd", cls=cls, name="odd"))])
    # the one line names the plugin and the offending value
    [line] = err.value.lines()
    assert line.startswith("plugin odd: evaluator 'odd'") and bad in line


def test_builtin_evaluators_needs_are_valid():
    for info in Engine(entrypoints=False).registry.components("evaluators"):
        assert set(info.cls.needs) <= set(NEEDS[info.cls.mode])


@pytest.mark.parametrize("mode, need", [(m, n) for m in NEEDS for n in NEEDS[m]])
def test_every_valid_need_is_filled_by_the_select_stage(tmp_path, monkeypatch, mode, need):
    """NEEDS is what the select stage really provides: an evaluator needing only ``need`` sees it."""
    from profuser.components import Candidates, Choice, Record
    from profuser.data import write_records
    from profuser.stages import Ref, select

    seen: list[Candidates] = []

    class Probe(AdvantageEvaluator):
        name = "probe"

        def select(self, examples):
            seen.extend(examples)
            return [Choice(chosen="a", scores={}) for _ in examples]

    Probe.mode, Probe.needs = mode, frozenset({need})
    engine = Engine(entrypoints=False, extra_plugins=[("probe", _plugin("probe", cls=Probe))])
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.parquet", [Record("x1", "", "say hi", "hi")])
    inputs = {"data": data}
    for source in ("a", "b"):
        gen = tmp_path / f"gen-{source}"
        gen.mkdir()
        pq.write_table(pa.table({"id": ["x1"], "response": [f"hi from {source}"]}), gen / "generations.parquet")
        inputs[f"generate/{source}"] = gen
        inputs[f"logits/{source}"] = tmp_path / f"logits-{source}"
    scored = tmp_path / "score"
    scored.mkdir()
    pq.write_table(pa.table({"id": ["x1", "x1"], "source": ["a", "b"], "score": [0.5, 0.25]}), scored / "scores.parquet")
    inputs["score/rm"] = scored
    # the whole reference is covered ("hi": 2 bytes), so no per-token NLL is read from a store
    monkeypatch.setattr(select, "_nll_table", lambda path: pa.table({"id": ["x1"], "nll_sum": [1.0], "n_tokens": [2],
                                                                      "n_bytes": [2]}))
    config = select.Config(mode=mode, evaluator=Ref(name="probe"), sources=["a", "b"], reward_models=["rm"])
    ctx = types.SimpleNamespace(config=config, inputs=inputs, out=tmp_path,
                                build=lambda kind, ref: engine.registry.build(kind, ref.name, ref.params))
    select.run(ctx)
    [candidates] = seen
    field = {"nll": "nll", "responses": "responses", "scores": "scores"}[need]
    assert sorted(getattr(candidates, field)) == (["rm"] if need == "scores" else ["a", "b"])


class ShardedDataset(DatasetSource):
    """A third-party source reading several local files and a folder of notes."""

    name = "sharded"
    path_params = ("shards", "notes")

    class Params(StrictModel):
        shards: list[str]
        notes: str | None = None
        label: str = "x"  # not a path: left alone

    def records(self):
        for i, shard in enumerate(self.params.shards):
            yield Record(f"r{i}", "", Path(shard).read_text(encoding="utf-8").strip(), "ok")


def test_a_dataset_plugins_path_params_follow_the_recipe_file(tmp_path):
    """Declared path params resolve against the folder of the recipe file that wrote them (through
    extends:, like the file source's path), remote values and other params stay, and validation
    names a missing one by its field."""
    base, mine = tmp_path / "shared" / "recipes", tmp_path / "mine"
    (base / "data").mkdir(parents=True)
    mine.mkdir()
    (base / "data" / "a.txt").write_text("first\n")
    (base / "notes").mkdir()
    (base / "parent.yaml").write_text(
        f"extends: {REPO / 'recipes' / 'profuser.yaml'}\n"
        "data: {source: {name: sharded, params: {shards: [data/a.txt, 'hf:org/remote'], notes: notes, label: data/a.txt}}}\n")
    (mine / "r.yaml").write_text("extends: ../shared/recipes/parent.yaml\n")
    engine = Engine(entrypoints=False, extra_plugins=[("sharded", _plugin("sharded", cls=ShardedDataset))])
    recipe = load_recipe(mine / "r.yaml", registry=engine.registry)
    params = recipe.data.source.params
    assert params["shards"] == [str(base / "data" / "a.txt"), "hf:org/remote"]
    assert params["notes"] == str(base / "notes") and params["label"] == "data/a.txt"
    source = engine.registry.build("datasets", "sharded", {"shards": params["shards"][:1]})
    assert [r.instruction for r in source.records()] == ["first"]  # from anywhere: the path is absolute

    (mine / "bad.yaml").write_text("extends: ../shared/recipes/parent.yaml\n"
                                   "data: {source: {params: {shards: [../shared/recipes/data/a.txt, missing.txt]}}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(mine / "bad.yaml", registry=engine.registry)
    assert [line for line in err.value.lines() if "data.source" in line] == [
        f"{mine / 'bad.yaml'}: data.source.params.shards.1: file not found: missing.txt"]
