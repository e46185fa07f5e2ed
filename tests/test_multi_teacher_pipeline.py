"""multi_teacher_kl in a recipe: the planner asks the logits, align and build stages for every
source's teacher on each example (the ``all_teachers`` need) and leaves every other recipe's
stages as they were; a whole run on the tiny models trains on batches holding both sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest
from profuser_plugins.losses.multi_teacher_kl import MultiTeacherKL
from pyarrow import ipc

from profuser.logits_store import LogitsReader
from profuser.pipeline import Runner, Stage, plan, stage_keys
from profuser.plugins import Engine
from profuser.recipe import load_recipe
from profuser.runtime import Runtime
from profuser.testing import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
NEW_KEYS = {"all_examples", "all_teachers"}


class SpyMultiTeacher(MultiTeacherKL):
    """multi_teacher_kl that keeps the batches it was given."""

    name = "spy_multi_teacher"
    aliases = ()
    needs = frozenset({"all_teachers", "mode"})
    batches: ClassVar[list[dict]] = []

    def __call__(self, logits, batch, *, beta=None):
        SpyMultiTeacher.batches.append({k: v for k, v in batch.items() if k.startswith("all_teacher") or k == "mode"})
        return super().__call__(logits, batch, beta=beta)


class SpyPlugin:
    from profuser import hookimpl

    @hookimpl
    def profuser_register_losses(self, register):
        register(SpyMultiTeacher)


def planned(tiny_root, loss, engine):
    recipe = load_recipe(tiny_recipe(tiny_root, **{"loss.name": loss}), registry=engine.registry)
    stages = plan(recipe, engine)
    return {s.id: s for s in stages}, stage_keys(stages, engine)


def test_the_plan_asks_for_every_teacher_only_for_a_loss_that_needs_them(tiny_root):
    engine = Engine(entrypoints=False)
    plain, plain_keys = planned(tiny_root, "fuse_kl", engine)
    multi, multi_keys = planned(tiny_root, "multi_teacher_kl", engine)
    assert plain.keys() == multi.keys()
    for sid, stage in plain.items():  # a loss without the need: no new key hashed anywhere, deps as before
        assert not NEW_KEYS & set(stage.hashed_config()), sid
    for src in ("llama", "gemma"):
        assert plain[f"logits/inference/{src}"].deps == {"data": "data", "generate": f"generate/{src}",
                                                         "select": "select/inference"}
        # every example's chosen response, whichever source generated it
        assert multi[f"logits/inference/{src}"].hashed_config() == {**plain[f"logits/inference/{src}"].hashed_config(),
                                                                    "all_examples": True}
        assert set(multi[f"logits/inference/{src}"].deps.values()) == {"data", "select/inference", "generate/llama",
                                                                        "generate/gemma"}
        for mode in ("inference", "training"):
            assert multi[f"align/{mode}/{src}"].hashed_config() == {**plain[f"align/{mode}/{src}"].hashed_config(),
                                                                    "all_examples": True}
    for mode in ("inference", "training"):
        assert multi[f"build/{mode}"].hashed_config() == {**plain[f"build/{mode}"].hashed_config(), "all_teachers": True}
    # what the loss does not change is shared: generation, scoring, selection, training-mode logits
    shared = {sid for sid in plain if sid.split("/")[0] in ("data", "generate", "score", "select")}
    shared |= {"logits/training/llama", "logits/training/gemma"}
    assert {sid for sid in plain if plain_keys[sid] == multi_keys[sid]} == shared
    # the new fields are part of the Configs: a hashed config handed back as a mapping keys the same
    again = [Stage(s.id, s.kind, s.hashed_config(), s.deps, s.components) for s in multi.values()]
    assert stage_keys(again, Engine(entrypoints=False)) == multi_keys
    again = {s.id: s for s in again}
    assert again["logits/inference/llama"].config.all_examples and again["build/training"].config.all_teachers


def test_the_default_recipes_keys_do_not_change(tmp_path):
    """The paper's recipe plans exactly as before the all_teachers branch: no stage config gains a
    key, so every artifact already in a store stays valid."""
    engine = Engine(entrypoints=False)
    recipe = load_recipe(REPO / "recipes" / "profuser.yaml", registry=engine.registry)
    stages = plan(recipe, engine)
    assert not any(NEW_KEYS & set(s.hashed_config()) for s in stages)
    assert all(s.deps == {"data": "data", "generate": f"generate/{s.id.split('/')[-1]}", "select": "select/inference"}
               for s in stages if s.id.startswith("logits/inference/"))


@pytest.mark.parametrize("name", ["multi-teacher", "layerwise-multi-teacher"])
def test_the_variant_recipes_validate_and_plan(name):
    engine = Engine(entrypoints=False)
    recipe = load_recipe(REPO / "recipes" / "variants" / f"{name}.yaml", registry=engine.registry)
    assert recipe.loss.name == "multi_teacher_kl"
    assert recipe.curriculum.name == ("layerwise" if name.startswith("layerwise") else "progressive")
    stages = {s.id: s for s in plan(recipe, engine)}
    assert all(s.config.all_teachers for s in stages.values() if s.kind == "build")


def test_a_whole_run_trains_on_both_sources_teachers(tiny_root):
    engine = Engine(entrypoints=False, extra_plugins=[("spy", SpyPlugin())])
    recipe = load_recipe(tiny_recipe(tiny_root, **{"loss.name": "spy_multi_teacher"}), registry=engine.registry)
    runner = Runner(recipe, engine, Runtime(runs_dir=tiny_root / "runs", device="cpu", progress=False), echo=lambda _: None)
    SpyMultiTeacher.batches.clear()
    runner.run()
    store = tiny_root / "runs" / "store"
    out = {s.id: store / s.kind / runner.keys[s.id] for s in runner.stages}

    # inference mode: every source teacher-forced on every example's chosen generation
    selection = pq.read_table(out["select/inference"] / "selection.parquet").to_pylist()
    generated = {src: {g["id"]: g["response"] for g in pq.read_table(out[f"generate/{src}"] / "generations.parquet").to_pylist()}
                 for src in ("llama", "gemma")}
    for src in ("llama", "gemma"):
        reader = LogitsReader(out[f"logits/inference/{src}"])
        for row in selection:
            assert reader.get(row["id"]).response == generated[row["chosen"]][row["id"]]
        assert pq.read_table(out[f"align/inference/{src}"] / "aligned.parquet")["id"].to_pylist() == [r["id"] for r in selection]
    built = ipc.open_file(str(out["build/inference"] / "examples.arrow")).read_all()
    scores = [json.loads(r["scores"]) for r in selection]  # rm_vote's votes per source
    assert built["all_teacher_scores"].to_pylist() == [[s.get("llama", np.nan), s.get("gemma", np.nan)] for s in scores]

    assert SpyMultiTeacher.batches
    modes = set()
    for batch in SpyMultiTeacher.batches:
        b, _, s, k = batch["all_teacher_ids"].shape
        assert s == 2 and k == recipe.distill.top_k and batch["all_teacher_scores"].shape == (b, 2)
        assert batch["all_teacher_mask"].all(-1).any()  # positions taught by both sources at once
        modes |= set(batch["mode"])
    assert modes == {"inference", "training"}
    metrics = [json.loads(line) for line in (out["train"] / "metrics.jsonl").read_text().splitlines()]
    per_token = [m["loss/teachers_per_token"] for m in metrics if "loss/teachers_per_token" in m]
    assert per_token and max(per_token) > 1.0  # the loss saw more than one teacher per taught position
