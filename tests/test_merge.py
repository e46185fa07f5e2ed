"""Merge baselines (recipe ``merges:``, profuser/stages/merge.py): mergekit merges of two tiny
same-architecture models, evaluated beside the fused model; architectures and tokenizers that
differ are refused at validate time, pointing at fusion."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from profuser.errors import RecipeError
from profuser.pipeline import Runner, Runtime, plan, stage_keys
from profuser.plugins import get_engine
from profuser.recipe import load_recipe
from profuser.testing import tiny_model_dir, tiny_recipe

# validation needs no mergekit; merging does (make test installs it through the dev extra)
needs_mergekit = pytest.mark.skipif(importlib.util.find_spec("mergekit") is None,
                                    reason="mergekit is not installed: pip install 'profuser[merge]'")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny Llamas: one architecture and tokenizer, different weights (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("merge-models")
    return tiny_model_dir("llama", root / "a", seed=0), tiny_model_dir("llama", root / "b", seed=1)


def _recipe(tmp_path: Path, merges: list[dict], **more) -> Path:
    return tiny_recipe(tmp_path, **{"merges": merges, **more})


def _linear(a: Path, b: Path, label: str = "linear") -> dict:
    return {"method": "linear", "label": label, "models": [{"ref": str(a), "parameters": {"weight": 0.5}},
                                                           {"ref": str(b), "parameters": {"weight": 0.5}}]}


def _slerp(a: Path, b: Path, t: float, label: str = "slerp") -> dict:
    return {"method": "slerp", "label": label, "models": [{"ref": str(a)}, {"ref": str(b)}],
            "base_model": {"ref": str(a)}, "parameters": {"t": t}}


def _problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry=get_engine().registry)
    return info.value.lines()


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _run(path: Path, tmp_path: Path, until: str, lines: list | None = None) -> dict:
    recipe = load_recipe(path, registry=get_engine().registry)
    runner = Runner(recipe, get_engine(), Runtime(runs_dir=tmp_path / "runs", device="cpu", progress=False,
                                                  cache_dir=tmp_path / "cache"),
                    until=until, echo=lambda _: None)
    results = runner.run()
    if lines is not None:  # what profuser run prints at the end
        from profuser.report import run_result_lines

        lines += run_result_lines(runner.run_dir, results, recipe)
    return {r.id: r for r in results}


@needs_mergekit
def test_linear_is_the_mean_slerp_runs_and_the_merges_evaluate(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = pair
    merges = [_linear(a, b), _slerp(a, b, 0.5), _slerp(a, b, 0.0, label="slerp-t0")]
    printed: list[str] = []
    results = _run(_recipe(tmp_path, merges), tmp_path, "evaluate/merge", printed)
    assert sorted(results) == ["data", "evaluate/merge/linear", "evaluate/merge/slerp", "evaluate/merge/slerp-t0",
                               "merge/linear", "merge/slerp", "merge/slerp-t0"]  # nothing of the fusion ran
    ta, tb = _tensors(a), _tensors(b)
    merged = {label: _tensors(Path(results[f"merge/{label}"].path) / "model") for label in ("linear", "slerp", "slerp-t0")}
    assert set(merged["linear"]) == set(ta)
    for name, tensor in ta.items():
        assert merged["linear"][name].equal((tensor + tb[name]) / 2), name
        assert merged["slerp-t0"][name].equal(tensor), name  # t = 0: the base model
    assert any(not merged["slerp"][n].allclose(merged["linear"][n]) for n in ta)  # on the sphere, not the chord
    assert results["merge/linear"].metrics == {"models": 2, "tensors": len(ta)}
    record = json.loads((Path(results["merge/slerp"].path) / "merge.json").read_text())
    assert record["method"] == "slerp" and record["models"] == [str(a), str(b)] and record["base_model"] == str(a)
    for label in ("linear", "slerp"):
        scores = json.loads((Path(results[f"evaluate/merge/{label}"].path) / "results.json").read_text())
        assert scores["label"] == f"{label} (merge)" and scores["primary"]["profuser_heldout"] is not None
        assert any(line.strip().startswith(f"{label} (merge) ") for line in printed), printed


@needs_mergekit
def test_dare_ties_is_seeded_and_leaves_the_callers_rng_alone(pair, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = pair
    dare = {"method": "dare_ties", "models": [{"ref": str(b), "parameters": {"weight": 1.0, "density": 0.5}}],
            "base_model": {"ref": str(a)}}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = _run(_recipe(tmp_path / "one", [dare]), tmp_path / "one", "merge")
    assert torch.rand(3).equal(expected)
    second = _run(_recipe(tmp_path / "two", [dare]), tmp_path / "two", "merge")
    one, two = (_tensors(Path(r["merge/dare_ties"].path) / "model") for r in (first, second))
    assert all(one[n].equal(two[n]) for n in one)  # same recipe seed: the same drops
    ta, tb = _tensors(a), _tensors(b)
    # density 0.5: about half of each delta dropped, the rest rescaled by 2
    name = "model.layers.0.mlp.up_proj.weight"
    kept = (one[name] != ta[name]).float().mean().item()
    assert 0.3 < kept < 0.7 and not one[name].equal(tb[name])


def test_other_architectures_and_tokenizers_are_refused_pointing_at_fusion(pair, tmp_path, tiny_gemma_dir):
    a, b = pair
    lines = _problems(_recipe(tmp_path, [_linear(a, tiny_gemma_dir)]))
    assert len(lines) == 1
    assert "merges.0.models.1.ref: architecture differs from merges.0.models.0 (architectures:" in lines[0]
    assert "fuse such models instead (list them as sources:)" in lines[0]

    other = tmp_path / "other-vocab"
    shutil.copytree(b, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    x, y = list(vocab)[300:302]
    vocab[x], vocab[y] = vocab[y], vocab[x]  # same size and shapes, two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(data))
    lines = _problems(_recipe(tmp_path, [_linear(a, other)]))
    assert len(lines) == 1 and "merges.0.models.1.ref: tokenizer differs from merges.0.models.0's" in lines[0]
    assert "fuse such models instead" in lines[0]


def test_method_settings_are_checked_at_validate_time(pair, tmp_path):
    a, b = pair
    no_t = _slerp(a, b, 0.5)
    del no_t["parameters"]
    bad = [
        no_t,
        {"method": "ties", "models": [{"ref": str(b)}], "parameters": {"densty": 0.5}},
        {"method": "slerp", "label": "three", "models": [{"ref": str(a)}, {"ref": str(b)}, {"ref": str(b)}],
         "base_model": {"ref": str(a)}, "parameters": {"t": 0.5}},
        {**_linear(a, b, label="lin"), "models": [{"ref": str(a), "parameters": {"t": 1}}, {"ref": str(b)}]},
    ]
    text = "\n".join(_problems(_recipe(tmp_path, bad)))
    assert "merges.0.parameters: slerp needs t" in text
    assert "merges.1.base_model: ties needs a base_model" in text
    assert "merges.1.parameters.densty: not a parameter of ties" in text
    assert "merges.1.models.0.parameters: ties needs weight" in text
    assert "merges.2.models.2: listed twice" in text and "merges.2.models: slerp interpolates exactly two" in text
    assert "merges.3.models.0.parameters.t: not a per-model parameter of linear (known: weight)" in text
    assert "merges.3.models.1.parameters: linear needs weight" in text

    same = _problems(_recipe(tmp_path, [_linear(a, b, label="x"), _linear(a, b, label="x")]))
    assert any("merges must have distinct labels" in line for line in same)


def test_merges_change_no_other_stage_key(pair, tmp_path):
    a, b = pair
    engine = get_engine()
    plain = load_recipe(tiny_recipe(tmp_path), registry=engine.registry)  # the same folder: the same model and data paths
    merged = load_recipe(_recipe(tmp_path, [_linear(a, b)]), registry=engine.registry)
    before = stage_keys(plan(plain, engine), engine)
    after = stage_keys(plan(merged, engine), engine)
    assert {k: v for k, v in after.items() if "merge" not in k} == before
    assert {"merge/linear", "evaluate/merge/linear"} <= set(after)
    assert "merges" not in plain.model_dump()  # recipes without merges dump as before


def test_without_mergekit_the_merge_stage_names_the_extra(pair, tmp_path, monkeypatch):
    from profuser.errors import ProfuserError

    a, b = pair
    path = _recipe(tmp_path, [_linear(a, b)])
    load_recipe(path, registry=get_engine().registry)  # validating needs no mergekit
    monkeypatch.setitem(sys.modules, "mergekit", None)  # not installed
    with pytest.raises(ProfuserError) as info:
        _run(path, tmp_path, "merge")
    assert info.value.lines() == [("merge/linear: a merge baseline needs mergekit, which is not installed: "
                                  "pip install 'profuser[merge]'")]


@needs_mergekit
def test_compare_shows_the_merge_beside_the_fused_model(pair, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from profuser.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    a, b = pair
    path = _recipe(tmp_path, [_linear(a, b, label="avg")])
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(path), "--reference", "avg", "--out", str(out),
                                      "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "comparison.json").read_text())
    rows = {v["variant"]: v for v in data["variants"]}
    assert set(rows) == {"avg (merge)", "tiny"} and data["reference"] == "avg (merge)"  # --reference by its label
    assert rows["avg (merge)"]["baseline"] and not rows["tiny"]["baseline"]
    assert "delta" in rows["tiny"]["tasks"]["profuser_heldout"]  # paired with the merge, example by example
    assert "avg (merge)" in (out / "comparison.md").read_text()
