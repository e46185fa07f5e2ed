"""A model spec without a dtype: bfloat16 on a CUDA GPU with native bf16, float32 on a CPU, resolved
when the run is planned (recipe.default_dtype / with_device_dtype), so CPU keys are unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from profuser.cli import app
from profuser.pipeline import Runner, Runtime, card_recipe, plan, stage_keys
from profuser.plugins import get_engine
from profuser.recipe import default_dtype, load_recipe, with_device_dtype
from profuser.testing import tiny_recipe


def fake_cuda(monkeypatch, *, bf16: bool) -> list[bool]:
    """CUDA visible, with or without native bf16; returns the including_emulation values asked."""
    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    return asked


def test_default_dtype_by_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_dtype("auto") == default_dtype("cpu") == "float32"
    assert default_dtype("cuda") == "bfloat16"  # planned for a GPU from a machine without one
    assert default_dtype("mps") == "float32"
    asked = fake_cuda(monkeypatch, bf16=True)
    assert default_dtype("auto") == default_dtype("cuda:1") == "bfloat16"
    assert default_dtype("cpu") == "float32"  # --device cpu on a GPU machine
    assert asked and not any(asked)  # emulated bf16 does not count
    fake_cuda(monkeypatch, bf16=False)  # a pre-Ampere GPU
    assert default_dtype("auto") == "float32"


def judged(root, **more):
    """The tiny recipe with a held-out win rate, judged by the tiny llama."""
    judge = {"reward_model": {"name": "judge", "params": {"model": str(root / "models" / "tiny-llama")}}}
    return tiny_recipe(root, **{"evaluate.tasks": ["profuser_heldout_winrate"], "evaluate.judge": judge, **more})


def _models(stages):
    """stage id -> the dtype of each model identity its config holds."""
    out = {}
    for s in stages:
        config = s.hashed_config()
        for field in ("model", "target", "source"):
            if isinstance(config.get(field), dict):
                out[f"{s.id}:{field}"] = config[field]["dtype"]
    return out


def test_plan_on_a_bf16_gpu_resolves_unset_dtypes(tmp_path, tiny_root, monkeypatch):
    engine = get_engine()
    recipe = load_recipe(judged(tiny_root, **{"evaluate.baselines": True}), ["sources.1.dtype=float16"],
                         registry=engine.registry)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = plan(recipe, engine)
    fake_cuda(monkeypatch, bf16=True)
    gpu = plan(recipe, engine)
    cpu_models, gpu_models = _models(cpu), _models(gpu)
    assert set(cpu_models.values()) == {"float32", "float16"}
    # the spec that names a dtype keeps it; every other model runs in bf16
    assert {k: v for k, v in gpu_models.items() if v != "bfloat16"} == \
        {k: v for k, v in cpu_models.items() if v == "float16"} != {}
    assert gpu_models["train:target"] == "bfloat16" and gpu_models["evaluate/llama:model"] == "bfloat16"
    # a different computation, a different key: the GPU's stages never reuse the CPU's
    cpu_keys, gpu_keys = stage_keys(cpu, engine), stage_keys(gpu, engine)
    assert cpu_keys["data"] == gpu_keys["data"] and cpu_keys["train"] != gpu_keys["train"]
    # --device cpu on the GPU machine plans what the CPU does
    assert stage_keys(plan(recipe, engine, device="cpu"), engine) == cpu_keys
    # the runner plans with its runtime's device, and its recipe (the dry run's) holds the resolved dtypes
    runner = Runner(recipe, engine, Runtime(runs_dir=tmp_path, progress=False))
    assert runner.keys == gpu_keys and runner.recipe.target.dtype == "bfloat16"
    assert runner.recipe.evaluate.judge.reference.dtype == "bfloat16"
    assert Runner(recipe, engine, Runtime(runs_dir=tmp_path, device="cpu", progress=False)).keys == cpu_keys


def test_cpu_keys_are_those_of_float32_written_out(tiny_root, monkeypatch):
    """On a CPU an unset dtype is today's default: the keys and the model card's recipe text are
    exactly those of the recipe with `dtype: float32` written on each model."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine = get_engine()
    unset = load_recipe(judged(tiny_root), registry=engine.registry)
    assert "dtype" not in unset.target.model_fields_set
    written = load_recipe(judged(tiny_root, **{"target.dtype": "float32", "sources.0.dtype": "float32",
                                               "sources.1.dtype": "float32", "evaluate.judge.reference": {
                                                   "ref": unset.target.ref, "label": "llama", "dtype": "float32"}}),
                          registry=engine.registry)
    assert stage_keys(plan(unset, engine), engine) == stage_keys(plan(written, engine), engine)
    assert card_recipe(with_device_dtype(unset)) == card_recipe(unset)


def test_judge_reference_follows_the_device(tiny_root, monkeypatch):
    engine = get_engine()
    fake_cuda(monkeypatch, bf16=True)
    resolved = with_device_dtype(load_recipe(judged(tiny_root), registry=engine.registry), "auto")
    assert resolved.evaluate.judge.reference.dtype == resolved.target.dtype == "bfloat16"
    assert with_device_dtype(resolved, "cpu") is resolved  # resolved once: planning again changes nothing


def test_dry_run_shows_the_resolved_dtypes(tiny_root, monkeypatch, tmp_path):
    path = tiny_recipe(tiny_root, **{"sources.0.dtype": "float16"})
    fake_cuda(monkeypatch, bf16=True)
    result = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--json", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    dtypes = json.loads(result.stdout)["dtypes"]
    assert dtypes["target"] == "bfloat16" and sorted(dtypes["sources"].values()) == ["bfloat16", "float16"]
    text = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--device", "cpu", "--runs-dir", str(tmp_path)])
    assert text.exit_code == 0, text.output
    assert "dtypes: target float32; sources" in text.output and "float16" in text.output


@pytest.mark.parametrize("recipe", ["recipes/profuser.yaml", "recipes/testbed/base.yaml"])
def test_shipped_recipes_plan_float32_on_a_cpu(recipe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    engine = get_engine()
    loaded = load_recipe(recipe, registry=engine.registry)
    assert set(_models(plan(loaded, engine)).values()) == {"float32"}
