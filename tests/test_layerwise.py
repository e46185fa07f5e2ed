"""The ``layerwise`` curriculum and the trainer's per-phase trainable sets: frozen parameters do not
change in a phase and do after it, get no optimizer state, and a resume mid-phase is exact."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import small_spec

from profuser.components import CurriculumInput, Trainable
from profuser.errors import ProfuserError
from profuser.plugins import Engine
from profuser.training import train
from profuser.training.trainer import trainable_mask


def phases_of(registry, **params):
    curriculum = registry.build("curricula", "layerwise", params)
    return curriculum.phases(CurriculumInput(ids=[], gt_length={}))


def test_default_lays_the_shallow_stage_over_progressives_inference_phase(registry):
    phases = phases_of(registry)
    assert [(p.name, p.epochs, p.beta) for p in phases] == [("shallow/inference", 1.0, 0.1), ("deep/co-fusion", 2.0, 0.5)]
    assert phases[0].trainable == Trainable(embeddings=True, blocks=(0.0, 0.25), rest=False)
    assert phases[1].trainable is None  # then: all
    assert [(part.mode, part.weight) for part in phases[1].parts] == [("inference", 0.1), ("training", 1.0)]


def test_a_schedule_phase_across_the_boundary_is_cut_in_two(registry):
    phases = phases_of(registry, first_share=0.5, first_blocks=0.5, then="rest",
                       schedule={"name": "simultaneous", "params": {"epochs": 4}})
    assert [(p.name, p.epochs) for p in phases] == [("shallow/simultaneous", 2.0), ("deep/simultaneous", 2.0)]
    assert phases[1].trainable == Trainable(embeddings=False, blocks=(0.5, 1.0), rest=True)
    assert registry.build("curricula", "layerwise", {"schedule": {"name": "training_only"}}).modes == ("training",)


@pytest.mark.parametrize("params, message", [
    ({"schedule": {"name": "nope"}}, "nope"),
    ({"schedule": {"name": "progressive", "params": {"w9": 1}}}, "w9"),
    ({"schedule": {"name": "layerwise"}}, "cannot schedule another"),
    ({"first_share": 1.0}, "first_share"),
])
def test_bad_params_are_refused_at_load(registry, params, message):
    with pytest.raises(Exception, match=message):
        registry.build("curricula", "layerwise", params)


def test_mask_by_fraction_of_depth(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    mask = trainable_mask(model, Trainable(embeddings=True, blocks=(0.0, 0.5), rest=False))
    assert mask["model.embed_tokens.weight"] and not mask["model.norm.weight"]
    assert all(v for k, v in mask.items() if k.startswith("model.layers.0."))
    assert not any(v for k, v in mask.items() if k.startswith("model.layers.1."))
    assert all(trainable_mask(model, None).values())


def weights(path) -> dict:
    """A saved model's tensors; the tied head under the embedding's name (savers keep either)."""
    state = load_file(path)
    if "lm_head.weight" in state and "model.embed_tokens.weight" not in state:
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    state.pop("lm_head.weight", None)
    return state


def _split(state: dict, block: str = "model.layers.1.") -> tuple[dict, dict]:
    deep = {k: v for k, v in state.items() if k.startswith(block) or k == "model.norm.weight"}
    return {k: v for k, v in state.items() if k not in deep}, deep


class Killed(Exception):
    pass


def run(registry, model_dir, examples, out, *, kill_at=None, then="rest", **spec):
    curriculum = registry.build("curricula", "layerwise", {"first_blocks": 0.5, "then": then})

    def kill(step, metrics):
        if step == kill_at:
            raise Killed
    # weight decay: a frozen parameter that kept optimizer state would still be decayed
    return train(str(model_dir), examples, registry.build("losses", "fuse_kl"), curriculum,
                 small_spec(weight_decay=0.1, **spec), out, device="cpu", callbacks=[kill], keep_checkpoints=True)


def test_frozen_layers_do_not_change_in_a_phase_and_do_after_it(tmp_path, tiny_llama_dir, examples, registry):
    initial = weights(tiny_llama_dir / "model.safetensors")
    with pytest.raises(Killed):  # phase 1 (shallow/inference) is steps 1-2; stop right after it
        run(registry, tiny_llama_dir, examples, tmp_path, kill_at=2)
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    after_first = weights(checkpoint / "model.safetensors")
    shallow0, deep0 = _split(initial)
    shallow1, deep1 = _split(after_first)
    assert all(torch.equal(deep0[k], deep1[k]) for k in deep0)  # frozen: bit for bit
    assert all(not torch.equal(shallow0[k], shallow1[k]) for k in shallow0)  # every shallow tensor trained
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    n_shallow = len(shallow0)  # the tied head is the embedding itself
    assert len(optimizer["state"]) == n_shallow  # no optimizer state for the frozen ones

    summary = run(registry, tiny_llama_dir, examples, tmp_path)  # resumes into deep/co-fusion (then: rest)
    assert [p.get("trainable") is not None for p in summary["phases"]] == [True, True]
    shallow2, deep2 = _split(weights(tmp_path / "model" / "model.safetensors"))
    assert all(torch.equal(shallow1[k], shallow2[k]) for k in shallow1)  # now these are frozen
    assert all(not torch.equal(deep1[k], deep2[k]) for k in deep1)


@pytest.mark.parametrize("kill_at, every, then", [(1, 1, "rest"), (5, 3, "rest"), (5, 3, "all")])
def test_resume_mid_phase_is_exact(tmp_path, tiny_llama_dir, examples, registry, kill_at, every, then):
    run(registry, tiny_llama_dir, examples, tmp_path / "straight", checkpoint_every=every, then=then)
    with pytest.raises(Killed):
        run(registry, tiny_llama_dir, examples, tmp_path / "killed", kill_at=kill_at, checkpoint_every=every, then=then)
    summary = run(registry, tiny_llama_dir, examples, tmp_path / "killed", checkpoint_every=every, then=then)
    assert 0 < summary["resumed_from"] < summary["steps"]
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_checkpoint_from_other_trainable_sets_is_refused(tmp_path, tiny_llama_dir, examples, registry):
    with pytest.raises(Killed):
        run(registry, tiny_llama_dir, examples, tmp_path, kill_at=3)
    curriculum = registry.build("curricula", "layerwise", {"first_blocks": 1.0, "then": "rest"})
    with pytest.raises(ProfuserError, match="other phases"):
        train(str(tiny_llama_dir), examples, registry.build("losses", "fuse_kl"), curriculum,
              small_spec(weight_decay=0.1), tmp_path, device="cpu")


def test_a_whole_tiny_run_trains_layer_by_layer_and_plans_the_schedules_modes(tmp_path):
    import json

    from profuser.pipeline import Runner, Runtime, plan
    from profuser.recipe import load_recipe
    from profuser.testing import tiny_recipe

    engine = Engine(entrypoints=False)
    only_training = tiny_recipe(tmp_path / "t", {"curriculum.name": "layerwise",
                                                 "curriculum.params.schedule": {"name": "training_only"}})
    kinds = {s.id for s in plan(load_recipe(only_training, registry=engine.registry), engine)}
    assert "build/training" in kinds and "build/inference" not in kinds  # the schedule's modes only
    path = tiny_recipe(tmp_path, {"curriculum.name": "layerwise", "curriculum.params.first_blocks": 0.5})
    runner = Runner(load_recipe(path, registry=engine.registry), engine,
                    Runtime(runs_dir=tmp_path / "runs", device="cpu", progress=False), echo=lambda _: None)
    runner.run()
    summary = json.loads((tmp_path / "runs" / "store" / "train" / runner.keys["train"] / "summary.json").read_text())
    assert [(p["name"], p.get("trainable")) for p in summary["phases"]] == [
        ("shallow/inference", {"embeddings": True, "blocks": [0.0, 0.5], "rest": False}), ("deep/co-fusion", None)]
