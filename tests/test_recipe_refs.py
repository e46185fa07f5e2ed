"""Recipes whose models are other recipes' models: ``recipe:<path>`` refs (issue 20, item 1).

A specialist recipe (``specialists/spec.yaml``: continual SFT of the tiny llama) is named as a
source by ``fuse.yaml`` and as the target by ``onspec.yaml``; both plan its stages under ``spec:``
ids with the keys it has when run alone, so it trains once per store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from profuser.cli import app
from profuser.compare import seed_overrides
from profuser.pipeline import Runner, Runtime, dependents, plan, stage_keys, upstream
from profuser.plugins import Engine
from profuser.recipe import load_recipe
from profuser.testing import tiny_recipe


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def write_recipes(root: Path, **spec_train) -> dict[str, Path]:
    tiny_recipe(root)
    gemma = str(root / "models" / "tiny-gemma")
    spec = write(root / "specialists" / "spec.yaml", {
        "extends": "../tiny.yaml", "name": "spec", "curriculum": "sft_only", "loss": "sft",
        "train": {"checkpoint_every": 1, **spec_train}})
    fuse = write(root / "fuse.yaml", {  # the ref is relative to this file
        "extends": "tiny.yaml", "name": "fuse", "evaluate": {"baselines": True},
        "sources": [{"ref": "recipe:specialists/spec.yaml"}, {"ref": gemma, "label": "gemma"}]})
    onspec = write(root / "onspec.yaml", {
        "extends": "tiny.yaml", "name": "onspec", "curriculum": "sft_only", "loss": "sft",
        "target": {"ref": "recipe:specialists/spec.yaml"}, "sources": [{"ref": gemma, "label": "gemma"}]})
    return {"spec": spec, "fuse": fuse, "onspec": onspec}


@pytest.fixture(scope="module")
def engine():
    return Engine(entrypoints=False)


@pytest.fixture
def root(tmp_path, tiny_root):
    (tmp_path / "models").symlink_to(tiny_root / "models")
    return tmp_path


def planned(path: Path, engine, overrides=()) -> tuple[list, dict[str, str]]:
    stages = plan(load_recipe(path, list(overrides), registry=engine.registry), engine)
    return stages, stage_keys(stages, engine)


# --- planning --------------------------------------------------------------------------------------


def test_the_named_recipe_is_planned_upstream_with_the_keys_it_has_alone(root, engine):
    paths = write_recipes(root)
    alone, alone_keys = planned(paths["spec"], engine)
    stages, keys = planned(paths["fuse"], engine)
    by_id = {s.id: s for s in stages}
    makes_model = upstream(alone, {"train"})  # data .. train, no evaluation of the specialist
    assert {s.id for s in stages if s.id.startswith("spec:")} == {f"spec:{i}" for i in makes_model}
    assert all(keys[f"spec:{i}"] == alone_keys[i] for i in makes_model)
    assert [s.id for s in stages][: len(makes_model)] == [f"spec:{s.id}" for s in alone if s.id in makes_model]
    # every stage that loads the specialist reads spec:train as an input; its label is the file's stem
    readers = {"generate/spec", "logits/inference/spec", "logits/training/spec", "align/inference/spec",
               "align/training/spec", "evaluate/spec", "train"}
    assert {s.id for s in stages if s.deps.get("recipe:spec") == "spec:train"} == readers
    assert by_id["generate/spec"].config.model["ref"] == "recipe:spec"
    configs = json.dumps([s.hashed_config() for s in stages])
    assert str(root) not in configs.replace(str(root / "models"), "")  # no path of a recipe in any key
    # a recipe in another folder that extends fuse.yaml: the ref stays relative to fuse.yaml
    deeper = write(root / "elsewhere" / "deeper.yaml", {"extends": "../fuse.yaml", "name": "deeper"})
    _, deeper_keys = planned(deeper, engine)
    assert deeper_keys["spec:train"] == keys["spec:train"] and deeper_keys["generate/spec"] == keys["generate/spec"]


def test_a_reward_model_a_merge_and_a_chain_of_recipes_name_models_the_same_way(root, engine):
    paths = write_recipes(root)
    llama = root / "models" / "tiny-llama"
    twin = root / "twin-llama"  # another path to the same weights: a second model for the merge
    twin.symlink_to(llama.resolve())
    merged = write(root / "specialists" / "merged.yaml", {
        "extends": "../tiny.yaml", "name": "merged",
        "merges": [{"method": "slerp", "label": "mid", "models": [{"ref": str(llama)}, {"ref": str(twin)}],
                    "base_model": {"ref": str(llama)}, "parameters": {"t": 0.5}}]})
    judged = write(root / "judged.yaml", {
        "extends": "fuse.yaml", "name": "judged",
        "sources": [{"ref": "recipe:specialists/merged.yaml#mid"}, {"ref": "recipe:specialists/spec.yaml"}],
        "inference_mode": {"reward_models": [{"name": "judge", "label": "judge",
                                              "params": {"model": "recipe:specialists/spec.yaml"}}]}})
    stages, keys = planned(judged, engine)
    by_id = {s.id: s for s in stages}
    # a merge needs nothing upstream: only merged:merge/mid is planned of that recipe
    assert sorted(s.id for s in stages if s.id.startswith("merged:")) == ["merged:merge/mid"]
    assert keys["merged:merge/mid"] == planned(merged, engine)[1]["merge/mid"]
    assert by_id["generate/merged-mid"].deps["recipe:merged#mid"] == "merged:merge/mid"
    assert by_id["score/judge"].config.reward_model.params["model"] == "recipe:spec"
    assert by_id["score/judge"].deps["recipe:spec"] == "spec:train"
    assert len([s for s in stages if s.id == "spec:train"]) == 1  # a source and the reward model: planned once
    # a fusion of a fusion: fuse's stages, and through them spec's, under fuse: ids
    chain = write(root / "chain.yaml", {"extends": "tiny.yaml", "name": "chain", "target": {"ref": "recipe:fuse.yaml"}})
    stages, chain_keys = planned(chain, engine)
    _, fuse_keys = planned(paths["fuse"], engine)
    assert chain_keys["fuse:train"] == fuse_keys["train"] and chain_keys["fuse:spec:train"] == fuse_keys["spec:train"]
    assert {s.id: s for s in stages}["fuse:generate/spec"].deps["recipe:spec"] == "fuse:spec:train"


def test_editing_the_upstream_recipe_changes_exactly_the_keys_that_depend_on_its_model(root, engine):
    paths = write_recipes(root)
    stages, before = planned(paths["fuse"], engine)
    write_recipes(root, lr=5.0e-3)  # the specialist's learning rate
    _, after = planned(paths["fuse"], engine)
    changed = {sid for sid in before if before[sid] != after[sid]}
    assert changed == dependents(stages, {"spec:train"})
    assert {"spec:train", "generate/spec", "score/judge", "select/inference", "train", "evaluate/fused",
            "evaluate/spec"} <= changed
    assert not changed & {"spec:data", "data", "generate/gemma", "logits/training/gemma", "evaluate/llama"}


def test_seeds_and_overrides_apply_to_the_compared_recipe_not_to_the_one_it_names(root, engine):
    paths = write_recipes(root)
    _, keys = planned(paths["fuse"], engine)
    _, seeded = planned(paths["fuse"], engine, seed_overrides(1))
    assert all(seeded[i] == keys[i] for i in keys if i.startswith("spec:"))
    assert seeded["train"] != keys["train"]


def test_until_and_force_name_the_upstream_recipes_stages_by_their_prefix(root, engine, tmp_path):
    paths = write_recipes(root)
    recipe = load_recipe(paths["fuse"], registry=engine.registry)
    runtime = Runtime(runs_dir=tmp_path / "runs", device="cpu", progress=False)
    # a kind names this recipe's own stages: --force train never retrains the specialist
    assert Runner(recipe, engine, runtime, force=["train"]).forced == {"train", "evaluate/fused"}
    forced = Runner(recipe, engine, runtime, force=["spec:train"]).forced
    assert {"spec:train", "generate/spec", "train", "evaluate/spec"} <= forced and "spec:data" not in forced
    selected = Runner(recipe, engine, runtime, until="spec:").selected
    assert selected == {s.id for s in plan(recipe, engine) if s.id.startswith("spec:")}


def test_validate_refuses_a_missing_recipe_a_cycle_and_a_model_the_recipe_does_not_make(root):
    paths = write_recipes(root)
    gemma = {"ref": str(root / "models" / "tiny-gemma"), "label": "gemma"}
    cases = {
        "missing": ({"sources": [{"ref": "recipe:nope/absent.yaml"}, gemma]}, "recipe file not found"),
        "nomodel": ({"sources": [{"ref": "recipe:specialists/spec.yaml#slerp"}, gemma]}, "makes no model 'slerp'"),
        "a": ({"sources": [{"ref": "recipe:b.yaml"}, gemma]}, "circular recipe refs: a.yaml -> b.yaml -> a.yaml"),
    }
    write(root / "b.yaml", {"extends": "tiny.yaml", "name": "b", "sources": [{"ref": "recipe:a.yaml"}, gemma]})
    for name, (fields, message) in cases.items():
        path = write(root / f"{name}.yaml", {"extends": "tiny.yaml", "name": name, **fields})
        result = CliRunner().invoke(app, ["validate", str(path)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        assert len(lines) == 1 and "sources.0.ref" in lines[0] and message in lines[0], result.output
        assert str(path) in lines[0]  # the file that writes the bad ref
    ok = CliRunner().invoke(app, ["validate", str(paths["fuse"]), str(paths["onspec"])])
    assert ok.exit_code == 0, ok.output


def test_a_dry_run_counts_a_stage_the_plan_holds_twice_once(root):
    paths = write_recipes(root)
    result = CliRunner().invoke(app, ["run", str(paths["fuse"]), "--dry-run", "--json", "--runs-dir", str(root / "runs")])
    assert result.exit_code == 0, result.output
    estimate = json.loads(result.output)
    rows = {row["id"]: row for row in estimate["stages"]}
    assert rows["spec:data"]["key"] == rows["data"]["key"]  # the specialist's data is fuse's
    distinct = len({row["key"] for row in estimate["stages"]})
    assert distinct < len(rows) and estimate["total"]["stages_to_run"] == f"{distinct} of {distinct}"
    assert "over 1 phase" in rows["spec:train"]["note"] and "over 2 phase" in rows["train"]["note"]  # each its own curriculum
    # compare: the specialist's stages once in the suite, though both recipes name it
    suite = CliRunner().invoke(app, ["compare", str(paths["fuse"]), str(paths["onspec"]), "--dry-run", "--json",
                                     "--runs-dir", str(root / "runs")])
    assert suite.exit_code == 0, suite.output
    suite = json.loads(suite.output)
    spec_rows = [row for plan in suite["recipes"] for row in plan["stages"] if row["id"] == "spec:train"]
    assert len(spec_rows) == 2 and spec_rows[0]["key"] == spec_rows[1]["key"]
    every = {row["key"] for plan in suite["recipes"] for row in plan["stages"]}
    assert suite["suite"]["stages"] == len(every)


# --- running: kill and resume inside the upstream recipe, reuse by another recipe -----------------

KILL_SCRIPT = """
import os, re, sys
runs, pattern = sys.argv[1], sys.argv[2]
real_replace = os.replace

def replace(src, dst, *args, **kwargs):
    if re.search(pattern, os.path.relpath(os.path.abspath(dst), runs)):
        os._exit(137)  # killed right before the rename, as a SIGKILL: nothing below runs
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
from profuser.cli import app
app(["run", *sys.argv[3:], "--runs-dir", runs], prog_name="profuser")
"""


def run_record(runs: Path, name: str) -> dict[str, dict]:
    return {s["id"]: s for s in json.loads((runs / "runs" / name / "run.json").read_text())["stages"]}


def test_a_killed_run_resumes_inside_the_upstream_recipe_and_another_recipe_reuses_its_model(root, engine):
    paths = write_recipes(root)
    runs = root / "runs"
    script = root / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1"}
    # killed while the specialist trains, before its second checkpoint is complete
    killed = subprocess.run([sys.executable, str(script), str(runs), r"^store/train/\w+\.partial/checkpoints/step-0*2/trainer_state\.json$",
                             str(paths["fuse"])], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert "[run]    spec:train" in killed.stdout and "[run]    generate/spec" not in killed.stdout

    result = CliRunner().invoke(app, ["run", str(paths["fuse"]), "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    fuse = run_record(runs, "fuse")
    assert not fuse["spec:train"]["cached"] and fuse["spec:train"]["metrics"]["resumed_from"] == 1
    assert fuse["spec:data"]["cached"]  # sealed before the kill
    spec_key = fuse["spec:train"]["key"]
    # the source baseline is the specialist's model, under its label
    assert "spec (source)" in result.output
    # the fused model's card: the source was recipe spec, at the key that made it
    card = (runs / "runs" / "fuse" / "model" / "README.md").read_text()
    assert f"recipe:spec: {spec_key}" in card and "ref: recipe:spec" in card
    assert Path(os.readlink(runs / "runs" / "fuse" / "model")).parent.name == fuse["train"]["key"]

    # a second recipe naming the specialist (as its target) computes none of its stages
    again = CliRunner().invoke(app, ["run", str(paths["onspec"]), "--runs-dir", str(runs)])
    assert again.exit_code == 0, again.output
    onspec = run_record(runs, "onspec")
    assert onspec["spec:train"]["key"] == spec_key
    assert [sid for sid, s in onspec.items() if sid.startswith("spec:") and not s["cached"]] == []
    assert not onspec["train"]["cached"]
    # and the specialist run alone is all cached too
    alone = CliRunner().invoke(app, ["run", str(paths["spec"]), "--until", "train", "--runs-dir", str(runs)])
    assert alone.exit_code == 0 and "0 stage(s) ran" in alone.output, alone.output
