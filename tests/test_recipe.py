"""Recipes: extends + overrides, and every kind of mistake reported as `path: message`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from profuser.components import StrictModel
from profuser.errors import RecipeError
from profuser.recipe import (
    ComponentRef,
    ModelSpec,
    Recipe,
    Slot,
    apply_overrides,
    component_fields,
    deep_merge,
    load_raw,
    load_recipe,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# some recipes/examples/ point at the team's ../shared data, which a user's clone does not have
RECIPES = sorted(str(p) for p in (REPO / "recipes").rglob("*.yaml")
                 if "configs" not in p.parts and ("shared/data" not in p.read_text() or SHARED_DATA.is_dir()))


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base(tmp_path):
    return write(tmp_path / "base.yaml", """
        name: base
        target: {ref: some/target}
        sources: [{ref: some/target}, {ref: other/source}]
        data: {source: {name: builtin_tasks, params: {n: 10}}, heldout: 2}
        train: {lr: 1.0e-5, batch_size: 8}
    """)


def test_extends_deep_merges_and_overrides_win(tmp_path, base, registry):
    child = write(tmp_path / "child.yaml", """
        extends: base.yaml
        name: child
        train: {batch_size: 4}
    """)
    recipe = load_recipe(child, ["train.lr=3e-5", "sources.1.label=src2", "data.source.params.n=12"], registry=registry)
    assert recipe.name == "child"
    assert recipe.train.batch_size == 4 and recipe.train.lr == 3e-5  # merged, then overridden
    assert [s.key for s in recipe.sources] == ["target", "src2"]
    assert recipe.data.source.params == {"n": 12}


def test_merge_and_override_helpers():
    assert deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}
    assert apply_overrides({"a": {}}, ["a.b.c=[1, 2]", "x=true"]) == {"a": {"b": {"c": [1, 2]}}, "x": True}
    with pytest.raises(RecipeError, match="path.to.field=value"):
        apply_overrides({}, ["novalue"])


def test_circular_extends(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="circular"):
        load_raw(tmp_path / "a.yaml")


def test_schema_problems_are_listed_with_their_paths(tmp_path, base, registry):
    bad = write(tmp_path / "bad.yaml", """
        extends: base.yaml
        seed: many
        train: {learning_rate: 1.0}
    """)
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, registry=registry)
    problems = dict(err.value.problems)
    assert problems["train.learning_rate"] == "unknown field: did you mean train.lr?"
    assert "seed" in problems


def test_component_problems_are_listed_with_their_paths(tmp_path, base, registry):
    bad = write(tmp_path / "bad.yaml", """
        extends: base.yaml
        curriculum: progresive
        loss: {name: fuse_kl, params: {beta: lots}}
        training_mode: {evaluator: {name: min_ce, params: {reduction: median}}}
    """)
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, registry=registry)
    problems = dict(err.value.problems)
    assert "did you mean 'progressive'" in problems["curriculum.name"]
    assert "loss.params.beta" in problems
    assert "training_mode.evaluator.params.reduction" in problems


def test_missing_data_file_is_named(tmp_path, base, registry):
    bad = write(tmp_path / "nofile.yaml", """
        extends: base.yaml
        data: {source: {name: file, params: {path: nowhere.jsonl}}}
    """)
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, registry=registry)
    assert dict(err.value.problems)["data.source.params.path"] == "file not found: nowhere.jsonl"



def test_a_gguf_that_is_not_one_is_named_at_validation(tmp_path, base, registry):
    from profuser.testing import tiny_gguf_file

    # the run would find it only when it dequantises the model, after the stages before it
    tiny_gguf = tiny_gguf_file(tmp_path / "tiny")
    (tmp_path / "page.gguf").write_bytes(b"<!DOCTYPE html><html>404</html>")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "model.gguf").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    bad = write(tmp_path / "bad.yaml", f"""
        extends: base.yaml
        target: {{ref: {tmp_path / 'page.gguf'}}}
        sources: [{{ref: {tmp_path / 'dir'}, gguf_file: model.gguf}}, {{ref: {tiny_gguf}}}]
    """)
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, registry=registry)
    problems = dict(err.value.problems)
    assert problems["target.ref"].endswith("page.gguf is not a GGUF file (it does not start with GGUF's magic bytes)")
    assert problems["sources.0.ref"].endswith("model.gguf is a Git LFS pointer, not the model file (fetch it: git lfs pull)")
    assert not any(key.startswith("sources.1") for key in problems)  # a real one

def test_relative_data_path_resolves_against_the_recipe(tmp_path, base, registry):
    (tmp_path / "rows.jsonl").write_text('{"question": "q", "response": "r"}\n')
    recipe = load_recipe(write(tmp_path / "rel.yaml", """
        extends: base.yaml
        data: {source: {name: file, params: {path: rows.jsonl}}}
    """), registry=registry)
    assert recipe.data.source.params["path"] == str(tmp_path / "rows.jsonl")


def test_invalid_yaml_names_the_line(tmp_path, registry):
    bad = write(tmp_path / "broken.yaml", "name: x\ntarget: [unclosed\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, registry=registry)
    assert "invalid YAML" in err.value.lines()[0] and "broken.yaml:3:" in err.value.lines()[0]  # file:line


def test_cli_validate_prints_path_lines_without_traceback(tmp_path, base):
    bad = write(tmp_path / "bad.yaml", "extends: base.yaml\ncurriculum: progresive\nseed: many\n")
    proc = subprocess.run([sys.executable, "-m", "profuser.cli", "validate", str(bad)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "curriculum.name" in proc.stderr and "seed" in proc.stderr and "did you mean" in proc.stderr


def test_shipped_recipes_validate():
    proc = subprocess.run([sys.executable, "-m", "profuser.cli", "validate", *RECIPES], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok ") == len(RECIPES) >= 11  # profuser, 6 ablations, 3 analyses, paper


def test_override_of_a_default_component_tunes_it(tmp_path, base, registry):
    recipe = load_recipe(base, ["loss.params.temperature=1.5", "curriculum.params.first_epochs=2"], registry=registry)
    assert recipe.loss.name == "fuse_kl" and recipe.loss.params == {"temperature": 1.5}
    assert recipe.curriculum.name == "progressive" and recipe.curriculum.params == {"first_epochs": 2}


# --- issue 14: extends, names and model refs are checked before any stage runs -----------------------


@pytest.mark.parametrize("extends, problem", [
    ("3", ("extends", "must be a recipe file or a list of them (paths relative to this file), not 3 (int)")),
    ("[base.yaml, 3]", ("extends.1", "must be a recipe file path, not 3 (int)")),
    ("{a: 1}", ("extends", "must be a recipe file or a list of them (paths relative to this file), not {'a': 1} (dict)")),
])
def test_extends_that_is_not_file_paths_is_one_clear_line(tmp_path, base, extends, problem, registry):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path / "bad.yaml", f"extends: {extends}\n"), registry=registry)
    assert err.value.problems == [problem]


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "a b", ""])
def test_a_recipe_name_must_be_a_plain_file_name(tmp_path, base, name, registry):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path / "bad.yaml", f"extends: base.yaml\nname: {name!r}\n"), registry=registry)
    assert [path for path, _ in err.value.problems] == ["name"]
    assert load_recipe(write(tmp_path / "ok.yaml", "extends: base.yaml\nname: v1.2_run-3\n"), registry=registry).name == "v1.2_run-3"


def test_local_model_refs_must_exist_and_be_complete(tmp_path, base, tiny_llama_dir, registry):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    (tmp_path / "weights.bin").write_bytes(b"x")
    bad = write(tmp_path / "models.yaml", f"""
        extends: base.yaml
        target: {{ref: {tiny_llama_dir}}}
        sources: [{{ref: {tiny_llama_dir}}}, {{ref: {tmp_path}/missing}}, {{ref: {incomplete}}}, {{ref: {tmp_path}/weights.bin}}]
    """)
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, registry=registry)
    problems = dict(err.value.problems)
    assert sorted(problems) == ["sources.1.ref", "sources.2.ref", "sources.3.ref"]  # the tiny model is complete
    assert problems["sources.1.ref"] == f"model directory not found: {tmp_path}/missing"
    assert problems["sources.2.ref"].endswith("no safetensors weights (model.safetensors), no tokenizer "
                                              "(tokenizer.json, or tokenizer.model / vocab.json)")
    assert "is a file, not a model directory" in problems["sources.3.ref"]
    # the same lines from `--dry-run`, before any stage
    proc = subprocess.run([sys.executable, "-m", "profuser.cli", "run", str(bad), "--dry-run", "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("error ") == 3
    assert not (tmp_path / "runs").exists()


class Judge(StrictModel):
    scorer: Annotated[ComponentRef, Slot("reward_models")] = ComponentRef(name="judge")


class ExtendedRecipe(Recipe):
    """A recipe with component fields added: nested, optional, and a list."""

    judge: Judge = Judge()
    second_judge: Judge | None = None
    extra_losses: Annotated[list[ComponentRef], Slot("losses")] = Field(default_factory=list)


def test_component_fields_are_walked_from_the_models_fields():
    assert component_fields() == (
        ("data.source", "datasets", None, False),
        ("training_mode.evaluator", "evaluators", "min_ce", False),
        ("inference_mode.generator", "generators", "hf", False),
        ("inference_mode.reward_models", "reward_models", None, True),
        ("inference_mode.evaluator", "evaluators", "rm_vote", False),
        ("aligner", "aligners", "offsets", False),
        ("loss", "losses", "fuse_kl", False),
        ("curriculum", "curricula", "progressive", False),
        ("evaluate.judge.reward_model", "reward_models", None, False),
        ("evaluate.judge.generator", "generators", "hf", False),
    )
    assert component_fields(ExtendedRecipe) == (*component_fields(), ("judge.scorer", "reward_models", "judge", False),
                                                ("second_judge.scorer", "reward_models", "judge", False),
                                                ("extra_losses", "losses", None, True))
    recipe = ExtendedRecipe(name="x", target={"ref": "a/b"}, sources=[{"ref": "a/b"}],
                            data={"source": "builtin_tasks"}, extra_losses=["sft", "fuse_kl"])
    refs = [(path, kind, ref.name) for path, kind, ref in recipe.component_refs()]
    assert refs[-3:] == [("judge.scorer", "reward_models", "judge"), ("extra_losses.0", "losses", "sft"),
                         ("extra_losses.1", "losses", "fuse_kl")]  # the unset optional block names none


def test_a_default_components_params_alone_keep_its_name(tmp_path, base, registry):
    recipe = load_recipe(base, ["training_mode.evaluator.params={}", "inference_mode.generator.params.max_new_tokens=8"],
                         registry=registry)
    assert recipe.training_mode.evaluator.name == "min_ce" and recipe.inference_mode.generator.name == "hf"
    assert recipe.inference_mode.generator.params == {"max_new_tokens": 8}


def test_inherited_relative_paths_are_relative_to_the_file_that_wrote_them(tmp_path, registry):
    # a recipe in another folder, two levels of extends below the paper recipe (../configs/zero3.json)
    (tmp_path / "mine").mkdir()
    middle = write(tmp_path / "mine" / "middle.yaml", f"""
        extends: {REPO / "recipes" / "paper" / "profuser-7b.yaml"}
        name: middle
    """)
    (tmp_path / "mine" / "deeper").mkdir()
    child = write(tmp_path / "mine" / "deeper" / "child.yaml", "extends: ../middle.yaml\nname: child\n")
    recipe = load_recipe(child, registry=registry)
    assert Path(recipe.train.deepspeed_config).resolve() == REPO / "recipes" / "configs" / "zero3.json"
    assert load_recipe(middle, registry=registry).train.deepspeed_config == recipe.train.deepspeed_config
    proc = subprocess.run([sys.executable, "-m", "profuser.cli", "validate", str(child)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_the_childs_own_relative_path_stays_relative_to_the_child(tmp_path, base, registry):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rows.jsonl").write_text('{"question": "q", "response": "r"}\n')
    (tmp_path / "rows.jsonl").write_text('{"question": "q", "response": "r"}\n')
    write(tmp_path / "parent.yaml", "extends: base.yaml\ndata: {source: {name: file, params: {path: rows.jsonl}}}\n")
    inherited = load_recipe(write(tmp_path / "sub" / "a.yaml", "extends: ../parent.yaml\nname: a\n"), registry=registry)
    assert Path(inherited.data.source.params["path"]).resolve() == tmp_path / "rows.jsonl"
    own = load_recipe(write(tmp_path / "sub" / "b.yaml", """
        extends: ../parent.yaml
        name: b
        data: {source: {name: file, params: {path: rows.jsonl}}}
    """), registry=registry)
    assert Path(own.data.source.params["path"]).resolve() == tmp_path / "sub" / "rows.jsonl"


def test_hf_trainer_names_get_a_did_you_mean(tmp_path, base, registry):
    bad = write(tmp_path / "hf.yaml", """
        extends: base.yaml
        train: {learning_rate: 1.0e-5, num_train_epochs: 3, per_device_train_batch_size: 2,
                gradient_accumulation_steps: 4, micro_batch: 2}
    """)
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, registry=registry)
    problems = dict(err.value.problems)
    assert "train.lr" in problems["train.learning_rate"]
    assert "curriculum.params" in problems["train.num_train_epochs"] and "first_epochs" in problems["train.num_train_epochs"]
    assert "train.micro_batch_size" in problems["train.per_device_train_batch_size"]
    assert "train.batch_size" in problems["train.gradient_accumulation_steps"]
    assert problems["train.micro_batch"] == "unknown field; did you mean train.micro_batch_size?"


def test_a_model_ref_may_be_a_plain_string(tmp_path, base, registry):
    recipe = load_recipe(write(tmp_path / "plain.yaml", """
        extends: base.yaml
        target: Qwen/Qwen2.5-7B-Instruct
        sources: [Qwen/Qwen2.5-7B-Instruct, {ref: mistralai/Mistral-7B-Instruct-v0.3, label: mistral}]
    """), registry=registry)
    assert recipe.target.ref == "Qwen/Qwen2.5-7B-Instruct" and recipe.target.key == "Qwen2.5-7B-Instruct"
    assert [s.key for s in recipe.sources] == ["Qwen2.5-7B-Instruct", "mistral"]
    # the same identity (and so the same cache keys) as the mapping form
    assert recipe.target.identity() == ModelSpec(ref="Qwen/Qwen2.5-7B-Instruct").identity()


def test_readme_validate_command_passes_on_every_shipped_yaml(tmp_path):
    # what README says to run: accelerate configs are skipped by what they are, and an example whose
    # data lives outside the checkout says so in its ok line
    files = sorted(str(p) for p in (REPO / "recipes").rglob("*.yaml"))
    proc = subprocess.run([sys.executable, "-m", "profuser.cli", "validate", *files], capture_output=True, text=True,
                          check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skip ") == len([f for f in files if "/configs/" in f]) >= 2
    assert "accelerate config" in proc.stdout


def test_a_missing_data_file_alone_is_said_without_failing_validate(tmp_path, base):
    child = write(tmp_path / "elsewhere.yaml", """
        extends: base.yaml
        data: {source: {name: file, params: {path: ../../shared/nowhere.jsonl}}}
    """)
    proc = subprocess.run([sys.executable, "-m", "profuser.cli", "validate", str(child)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "file not found: ../../shared/nowhere.jsonl" in proc.stdout and "`run` needs it" in proc.stdout
    run = subprocess.run([sys.executable, "-m", "profuser.cli", "run", str(child), "--dry-run"], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 2 and "file not found" in run.stderr and "Traceback" not in run.stderr
