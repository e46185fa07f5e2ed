"""Keys see content: a local model (folder, GGUF file, reward model) or DeepSpeed JSON enters the
key by a fingerprint remembered by (path, size, mtime, inode); a data file rewritten while the
data stage reads it is refused; ``--dry-run`` names the file that changed."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from profuser.errors import DataError, ProfuserError
from profuser.fingerprint import FingerprintCache, local_paths
from profuser.pipeline import KEY_INPUTS, Runner, Runtime, Stage, dependents, plan, stage_key_inputs
from profuser.plugins import Engine
from profuser.recipe import load_recipe
from profuser.testing import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
DAY = 86400


@pytest.fixture(scope="module")
def engine():
    return Engine(entrypoints=False)


def _age(path: Path) -> None:
    """Files written a day ago: past the racy window, so the fingerprint cache remembers them."""
    old = time.time() - DAY
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.utime(f, (old, old))


@pytest.fixture
def own_models(tmp_path, tiny_llama_dir, tiny_gemma_dir):
    """The tiny recipe on copies of the session's models (these tests overwrite them in place)."""
    models = tmp_path / "models"
    for src, name in ((tiny_llama_dir, "tiny-llama"), (tiny_gemma_dir, "tiny-gemma")):
        shutil.copytree(src, models / name)
        _age(models / name)
    return tmp_path


def _overwrite(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # same size: only the content (and mtime) tells
    file.write_bytes(bytes(data))


def _plan(recipe_file, engine, cache, **overrides):
    stages = plan(load_recipe(recipe_file, [f"{k}={v}" for k, v in overrides.items()], registry=engine.registry), engine)
    keys, inputs = stage_key_inputs(stages, engine, cache)
    return stages, keys, inputs


def test_a_model_overwritten_in_place_recomputes_everything_downstream_of_it(own_models, engine, tmp_path):
    recipe = tiny_recipe(own_models)
    cache_file = tmp_path / "fp.json"
    stages, before, inputs = _plan(recipe, engine, FingerprintCache(cache_file))
    gemma = own_models / "models" / "tiny-gemma"
    assert inputs["generate/gemma"]["content_paths"] == {"model.ref": str(gemma.resolve())}
    assert "model.safetensors" in inputs["generate/gemma"]["content"]["model.ref"]
    _overwrite(gemma / "model.safetensors")
    _, after, _ = _plan(recipe, engine, FingerprintCache(cache_file))
    changed = {sid for sid in before if before[sid] != after[sid]}
    naming_gemma = {s.id for s in stages if str(gemma.resolve()) in inputs[s.id]["content_paths"].values()}
    assert naming_gemma == {"generate/gemma", "logits/inference/gemma", "logits/training/gemma",
                            "align/inference/gemma", "align/training/gemma"}  # align reads its tokenizer
    assert changed == dependents(stages, naming_gemma)
    assert {"data", "generate/llama", "logits/training/llama"}.isdisjoint(changed)
    assert {"score/judge", "select/inference", "build/training", "train", "evaluate/fused"} <= changed


def test_an_unchanged_model_is_not_read_again(own_models, engine, tmp_path):
    recipe = tiny_recipe(own_models)
    cache_file = tmp_path / "fp.json"
    first = FingerprintCache(cache_file)
    _, keys, _ = _plan(recipe, engine, first)
    files = sum(1 for d in ("tiny-llama", "tiny-gemma") for p in (own_models / "models" / d).rglob("*") if p.is_file())
    assert first.hashed == files  # each file once, though several stages name each model
    again = FingerprintCache(cache_file)  # a later run: remembered by path, size, mtime and inode
    assert _plan(recipe, engine, again)[1] == keys and again.hashed == 0
    _overwrite(own_models / "models" / "tiny-gemma" / "model.safetensors")
    third = FingerprintCache(cache_file)
    assert _plan(recipe, engine, third)[1] != keys and third.hashed == 1


def test_a_file_just_written_is_not_remembered(tmp_path):
    """Within the racy window the mtime cannot tell a second write from the first."""
    file = tmp_path / "f.bin"
    file.write_bytes(b"x" * 10)
    cache = FingerprintCache(tmp_path / "fp.json")
    sha = cache.file_sha256(file)
    cache.save()
    again = FingerprintCache(tmp_path / "fp.json")
    assert again.file_sha256(file) == sha and again.hashed == 1
    assert again.file_sha256(file) == sha and again.hashed == 1  # this instance (one plan) reads it once
    _age(file)
    again.file_sha256(file)
    again.save()
    last = FingerprintCache(tmp_path / "fp.json")
    assert last.file_sha256(file) == sha and last.hashed == 0


def test_builtin_and_hub_models_keep_their_keys(engine, tmp_path):
    """Recipes naming builtin: or hub models and built-in plugins only: nothing new in any key."""
    for name in ("profuser.yaml", "ablations/fuse.yaml", "analysis/one-source.yaml"):
        stages = plan(load_recipe(REPO / "recipes" / name, registry=engine.registry), engine)
        _, inputs = stage_key_inputs(stages, engine, FingerprintCache(tmp_path / "fp.json"))
        assert not any("content" in i or "code" in i for i in inputs.values()), name
    # the paper's DeepSpeed JSON is a local file the train stage reads
    stages = plan(load_recipe(REPO / "recipes" / "paper" / "profuser-7b.yaml", registry=engine.registry), engine)
    _, inputs = stage_key_inputs(stages, engine, FingerprintCache(tmp_path / "fp.json"))
    assert {sid for sid, i in inputs.items() if "content" in i} == {"train"}
    assert list(inputs["train"]["content"]["train.deepspeed_config"]) == ["zero3.json"]


def test_a_gguf_file_in_a_folder_is_the_one_file_read(tmp_path):
    (tmp_path / "a.Q4.gguf").write_bytes(b"a")
    (tmp_path / "b.Q8.gguf").write_bytes(b"b")
    config = {"model": {"ref": str(tmp_path), "gguf_file": "a.Q4.gguf"}, "other": {"ref": str(tmp_path / "b.Q8.gguf")},
              "hub": {"ref": "org/not-here"}, "builtin": {"ref": "builtin:x"}, "text": "a/b\nc"}
    assert dict(local_paths(config)) == {"model.ref": tmp_path / "a.Q4.gguf", "other.ref": tmp_path / "b.Q8.gguf"}


def test_dry_run_names_the_model_file_that_changed(own_models, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("PROFUSER_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(tiny_recipe(own_models), registry=engine.registry)
    runtime = Runtime(runs_dir=tmp_path / "runs", progress=False)
    first = Runner(recipe, engine, runtime, echo=lambda _: None)
    first.run_dir.mkdir(parents=True)
    (first.run_dir / KEY_INPUTS).write_text(json.dumps(first.key_inputs))  # as run() leaves it
    gemma = (own_models / "models" / "tiny-gemma").resolve()
    _overwrite(gemma / "tokenizer.json")
    why = Runner(recipe, engine, runtime, echo=lambda _: None).reasons()
    assert why["generate/gemma"] == [f"model.ref: {gemma / 'tokenizer.json'} changed"]
    assert set(why["align/training/gemma"]) == {f"source.ref: {gemma / 'tokenizer.json'} changed",
                                                "upstream logits/training/gemma changed", "upstream select/training changed"}
    assert why["generate/llama"] == ["not in the store (removed, or its files were corrupt)"]
    assert set(why["train"]) == {"upstream build/inference changed", "upstream build/training changed",
                                 "upstream select/inference changed"}


def test_the_dry_run_prints_why(own_models, engine, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from profuser.cli import app

    monkeypatch.setenv("PROFUSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PROFUSER_DISABLE_ENTRYPOINTS", "1")
    recipe_file = tiny_recipe(own_models)
    first = Runner(load_recipe(recipe_file, registry=engine.registry), engine,
                   Runtime(runs_dir=tmp_path / "runs", progress=False), echo=lambda _: None)
    first.run_dir.mkdir(parents=True)
    (first.run_dir / KEY_INPUTS).write_text(json.dumps(first.key_inputs))
    gemma = (own_models / "models" / "tiny-gemma").resolve()
    _overwrite(gemma / "model.safetensors")
    args = ["run", str(recipe_file), "--runs-dir", str(tmp_path / "runs"), "--dry-run"]
    out = CliRunner().invoke(app, args, catch_exceptions=False).output
    assert f"why generate/gemma: model.ref: {gemma / 'model.safetensors'} changed" in out.replace("\n", "")
    plan_json = json.loads(CliRunner().invoke(app, [*args, "--json"], catch_exceptions=False).output)
    why = {s["id"]: s.get("why") for s in plan_json["stages"]}
    assert why["score/judge"] == ["upstream generate/gemma changed"]  # the judge is the llama: only its inputs changed


def test_a_model_changed_while_its_stage_runs_is_not_kept(own_models, engine, tmp_path, monkeypatch):
    from profuser.stages import Ref, generate

    gemma = own_models / "models" / "tiny-gemma"
    monkeypatch.setenv("PROFUSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(generate, "run", lambda ctx: _overwrite(gemma / "model.safetensors") or {})
    stage = Stage("generate/gemma", "generate", generate.Config(model={"ref": str(gemma)}, generator=Ref(name="hf"), seed=0))
    recipe = load_recipe(tiny_recipe(own_models), registry=engine.registry)
    runner = Runner(recipe, engine, Runtime(runs_dir=tmp_path / "runs", progress=False, isolate_stages=False),
                    stages=[stage], echo=lambda _: None)
    with pytest.raises(ProfuserError, match="changed while the stage ran"):
        runner.run()
    assert runner.store.get("generate", runner.keys["generate/gemma"]) is None


def test_a_data_file_rewritten_while_it_is_read_is_refused_then_recomputed(tmp_path, engine, monkeypatch, tiny_root):
    import profuser_plugins.datasets.file as file_source

    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read_rows = file_source.read_rows

    def rewritten_midway(path):  # another process rewrites the file after the first row is read
        for i, row in enumerate(read_rows(path)):
            if i == 1:
                data.write_text("".join(json.dumps({**r, "output": r["output"] + "!"}) + "\n" for r in rows))
            yield row

    recipe_file = tiny_recipe(tiny_root, **{"data.source.name": "file", "data.source.params.path": str(data),
                                                 "data.source.params.format": "alpaca",
                                                 "evaluate.tasks": ["profuser_heldout_bpb"]})
    recipe = load_recipe(recipe_file, registry=engine.registry)
    runtime = Runtime(runs_dir=tmp_path / "runs", progress=False)
    monkeypatch.setenv("PROFUSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(file_source, "read_rows", rewritten_midway)
    first = Runner(recipe, engine, runtime, until="data", echo=lambda _: None)
    with pytest.raises(DataError, match="changed while the data stage read it: rows.jsonl"):
        first.run()
    assert first.store.get("data", first.keys["data"]) is None  # nothing sealed under the old content's key
    monkeypatch.setattr(file_source, "read_rows", read_rows)
    second = Runner(recipe, engine, runtime, until="data", echo=lambda _: None)
    [result] = second.run()
    assert not result.cached and second.keys["data"] != first.keys["data"]
    import pyarrow.parquet as pq

    responses = pq.read_table(Path(result.path, "train.parquet")).column("response").to_pylist()
    assert responses and all(r.endswith("!") for r in responses)
