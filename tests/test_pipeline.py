"""Stage runner and artifact store: cache keys, reuse, --force/--until, SIGKILL resume, corruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from toy_stages import starts

from profuser.errors import ProfuserError
from profuser.pipeline import Runner, Runtime, Stage, plan, stage_keys
from profuser.plugins import Engine
from profuser.recipe import Recipe, load_raw, load_recipe

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def engine():
    return Engine(entrypoints=False)


@pytest.fixture(scope="module")
def default_recipe():
    # the toy stages read nothing of it: skip component validation so these tests need no plugin
    return Recipe.model_validate(load_raw(REPO / "recipes" / "profuser.yaml"))


def toy_stages(counter: Path, *, b_value="b", sleep=0.0, chunks=1) -> list[Stage]:
    mod = "toy_stages"
    return [
        Stage("a", "toy", {"counter": str(counter), "value": "a"}, module=mod),
        Stage("b", "toy", {"counter": str(counter), "value": b_value, "sleep": sleep, "chunks": chunks}, {"up": "a"}, module=mod),
        Stage("c", "toy", {"counter": str(counter), "value": "c"}, {"up": "b"}, module=mod),
    ]


def toy_run(tmp_path, engine, default_recipe, **kwargs):
    stages = toy_stages(tmp_path / "counter", **{k: kwargs.pop(k) for k in ("b_value", "sleep", "chunks") if k in kwargs})
    runner = Runner(default_recipe, engine, Runtime(runs_dir=tmp_path / "runs", progress=False), stages=stages, echo=lambda _: None, **kwargs)
    return runner, runner.run()


def test_second_run_reuses_every_stage(tmp_path, engine, default_recipe):
    _, first = toy_run(tmp_path, engine, default_recipe)
    _, second = toy_run(tmp_path, engine, default_recipe)
    assert [r.cached for r in first] == [False] * 3 and [r.cached for r in second] == [True] * 3
    assert starts(tmp_path / "counter") == ["a", "b", "c"]
    assert (Path(second[-1].path) / "result.txt").read_text() == "abc"


def test_changing_a_field_reruns_that_stage_and_its_dependents_only(tmp_path, engine, default_recipe):
    toy_run(tmp_path, engine, default_recipe)
    _, results = toy_run(tmp_path, engine, default_recipe, b_value="B")
    assert {r.id: r.cached for r in results} == {"a": True, "b": False, "c": False}
    assert (Path(results[-1].path) / "result.txt").read_text() == "aBc"


def test_force_and_until(tmp_path, engine, default_recipe):
    _, results = toy_run(tmp_path, engine, default_recipe, until="b")
    assert [r.id for r in results] == ["a", "b"]
    _, results = toy_run(tmp_path, engine, default_recipe, force=["b"])
    assert {r.id: r.cached for r in results} == {"a": True, "b": False, "c": False}


def test_force_refuses_a_stage_another_live_run_reads(tmp_path, engine, default_recipe):
    from profuser.store import ArtifactStore

    _, first = toy_run(tmp_path, engine, default_recipe)
    store = ArtifactStore(tmp_path / "runs")
    leases = store.lease([("toy", first[1].key)])  # another run reading b (an open lease is a live run's)
    try:
        with pytest.raises(ProfuserError) as err:
            toy_run(tmp_path, engine, default_recipe, force=["b"])
        assert err.value.where == "--force" and "b is read by a live run" in str(err.value)
        assert (Path(first[1].path) / "result.txt").read_text() == "ab"  # nothing deleted
    finally:
        leases.release()
    _, again = toy_run(tmp_path, engine, default_recipe, force=["b"])  # once that run ended: forced
    assert {r.id: r.cached for r in again} == {"a": True, "b": False, "c": False}


def test_corrupt_artifact_is_detected_and_recomputed(tmp_path, engine, default_recipe):
    _, results = toy_run(tmp_path, engine, default_recipe)
    (Path(results[1].path) / "result.txt").write_text("tampered")
    _, again = toy_run(tmp_path, engine, default_recipe)
    assert {r.id: r.cached for r in again} == {"a": True, "b": False, "c": True}
    assert (Path(again[1].path) / "result.txt").read_text() == "ab"
    # an artifact without its manifest is partial: never read
    os.remove(Path(again[0].path) / "manifest.json")
    _, third = toy_run(tmp_path, engine, default_recipe)
    assert third[0].cached is False


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from profuser.pipeline import Runner, Runtime
    from profuser.plugins import Engine
    from profuser.recipe import Recipe, load_raw
    from test_pipeline import toy_stages
    tmp = Path({tmp!r})
    recipe = Recipe.model_validate(load_raw({recipe!r}))
    stages = toy_stages(tmp / "counter", sleep=0.4, chunks=6)
    Runner(recipe, Engine(entrypoints=False), Runtime(runs_dir=tmp / "runs", progress=False), stages=stages).run()
""")


def test_sigkill_in_the_middle_of_a_stage_resumes(tmp_path, default_recipe):
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT.format(tests=str(TESTS), tmp=str(tmp_path), recipe=str(REPO / "recipes" / "profuser.yaml")))
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL)
    store = tmp_path / "runs" / "store" / "toy"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(store.glob("*.partial/chunk*.txt"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert starts(tmp_path / "counter") == ["a", "b"]
    assert not (tmp_path / "runs" / "runs" / "profuser" / "run.json").exists()

    subprocess.run([sys.executable, str(script)], env=env, check=True, stdout=subprocess.DEVNULL)
    assert starts(tmp_path / "counter") == ["a", "b", "b", "c"]  # a reused, b resumed, c ran
    summary = json.loads((tmp_path / "runs" / "runs" / "profuser" / "run.json").read_text())
    by_id = {s["id"]: s for s in summary["stages"]}
    assert by_id["a"]["cached"] and by_id["b"]["metrics"]["resumed_chunks"] >= 2
    assert not list(store.glob("*.partial"))


RANKS_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from profuser.pipeline import Runner, Runtime, Stage
    from profuser.plugins import Engine
    from profuser.recipe import Recipe, load_raw
    tmp = Path({tmp!r})
    counter = str(tmp / "counter")
    stages = [
        Stage("a", "toy", {{"counter": counter, "value": "a", "sleep": 0.5, "chunks": 2}}, module="toy_stages"),
        Stage("train", "toy", {{"counter": counter, "value": "t"}}, {{"up": "a"}}, module="toy_distributed_stage"),
    ]
    recipe = Recipe.model_validate(load_raw({recipe!r}))
    Runner(recipe, Engine(entrypoints=False), Runtime(runs_dir=tmp / "runs", progress=False), stages=stages).run()
""")


def test_multi_process_launch_rank0_computes_and_every_rank_trains(tmp_path, launch_ranks):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT.format(tests=str(TESTS), tmp=str(tmp_path), recipe=str(REPO / "recipes" / "profuser.yaml")))
    launch_ranks([sys.executable, str(script)], timeout=120)
    assert sorted(starts(tmp_path / "counter")) == ["a", "train", "train@1"]  # a once, train on both ranks
    summary = json.loads((tmp_path / "runs" / "runs" / "profuser" / "run.json").read_text())
    assert [s["id"] for s in summary["stages"]] == ["a", "train"]
    assert len(list((tmp_path / "runs" / "store" / "toy").glob("*/manifest.json"))) == 2


def test_default_plan_has_the_method_stages(engine, default_recipe):
    ids = [s.id for s in plan(default_recipe, engine)]
    for expected in ["data", "generate/gemma3", "score/judge-correct", "select/inference", "logits/inference/smollm2",
                     "logits/training/gemma3", "select/training", "align/training/gemma3", "build/inference", "train",
                     "evaluate/fused", "evaluate/gemma3"]:
        assert expected in ids
    assert ids.index("select/training") > ids.index("logits/training/smollm2")


def _keys(recipe, engine):
    return stage_keys(plan(recipe, engine), engine)


def test_cache_keys_change_exactly_where_a_stage_reads(engine):
    path = REPO / "recipes" / "profuser.yaml"
    base = _keys(load_recipe(path, registry=engine.registry), engine)
    # the loss is read by train only
    changed = _keys(load_recipe(path, ["loss.params.temperature=1.5"], registry=engine.registry), engine)
    assert {k for k in base if base[k] != changed[k]} == {"train", "evaluate/fused"}
    # a runtime-like change of the top-k reaches every logits stage and everything downstream of them
    changed = _keys(load_recipe(path, ["distill.top_k=5"], registry=engine.registry), engine)
    diff = {k for k in base if base[k] != changed[k]}
    assert "data" not in diff and not any(k.startswith(("generate/", "score/")) for k in diff)
    assert {"logits/training/gemma3", "select/training", "align/training/gemma3", "build/training", "train"} <= diff
    assert "select/inference" not in diff
    # one more reward model: only its own score stage is new; the others keep their keys
    changed = _keys(load_recipe(path, ["inference_mode.reward_models.1.label=judge-clear"], registry=engine.registry), engine)
    assert changed["score/judge-correct"] == base["score/judge-correct"]
    assert all(changed[f"generate/{s}"] == base[f"generate/{s}"] for s in ("smollm2", "gemma3"))


def test_ablations_share_every_stage_before_train(engine):
    base = _keys(load_recipe(REPO / "recipes" / "profuser.yaml", registry=engine.registry), engine)
    for name in ("simulfuse", "reversefuse", "length-split"):
        other = _keys(load_recipe(REPO / "recipes" / "ablations" / f"{name}.yaml", registry=engine.registry), engine)
        shared = {k for k in base if k in other and not k.startswith(("train", "evaluate/fused"))}
        assert shared and all(base[k] == other[k] for k in shared), name
        assert base["train"] != other["train"]
