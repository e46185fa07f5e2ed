"""Stage workers: a stage that loads a model runs in its own spawned process when the runtime
isolates stages; same artifacts, the same one-line errors, metrics reach the parent's observers,
and a killed worker leaves the stage resumable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from toy_worker_stage import MetricsSeen, pids

from profuser.errors import DataError, ProfuserError
from profuser.pipeline import Runner, Runtime, Stage
from profuser.plugins import Engine
from profuser.recipe import Recipe, load_raw
from profuser.runtime import Runtime as RuntimeClass
from profuser.testing import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_recipe():
    return Recipe.model_validate(load_raw(REPO / "recipes" / "profuser.yaml"))


def stages(counter: Path, **extra) -> list[Stage]:
    return [
        Stage("a", "toy", {"counter": str(counter), "value": "a"}, module="toy_stages"),
        Stage("model", "toy", {"counter": str(counter), "value": "m", **extra}, {"up": "a"}, module="toy_worker_stage"),
    ]


def run(tmp_path, recipe, *, isolate, engine=None, runs="runs", **extra):
    runner = Runner(recipe, engine or Engine(entrypoints=False),
                    Runtime(runs_dir=tmp_path / runs, progress=False, isolate_stages=isolate),
                    stages=stages(tmp_path / "counter", **extra), echo=lambda _: None)
    return runner.run()


def test_isolated_stage_runs_in_its_own_process_with_the_same_artifact(tmp_path, default_recipe):
    observer = MetricsSeen()
    engine = Engine(entrypoints=False, extra_plugins=[("metrics-seen", observer)])
    isolated = run(tmp_path, default_recipe, isolate=True, engine=engine, runs="isolated")
    inline = run(tmp_path, default_recipe, isolate=False, runs="inline")
    worker, here = pids(tmp_path / "counter")["model"]
    assert worker != os.getpid() and here == os.getpid()  # the isolated one ran elsewhere
    for a, b in zip(isolated, inline):
        assert a.key == b.key and a.metrics == b.metrics
        manifest = lambda r: {k: v for k, v in _manifest(r).items() if k in ("files", "metrics", "config")}
        assert manifest(a) == manifest(b)
    assert (Path(isolated[-1].path) / "result.txt").read_text() == "am"
    assert observer.logged == [("model", 1, {"loss": 0.5})]  # forwarded from the worker as it was logged


def test_an_error_in_a_worker_is_the_same_one_line_error(tmp_path, default_recipe):
    with pytest.raises(DataError) as isolated:
        run(tmp_path, default_recipe, isolate=True, fail=True, runs="isolated")
    with pytest.raises(DataError) as inline:
        run(tmp_path, default_recipe, isolate=False, fail=True, runs="inline")
    assert isolated.value.lines() == inline.value.lines() == ["train.jsonl:3: row 3 has no response"]


def test_a_killed_worker_leaves_the_stage_resumable(tmp_path, default_recipe):
    (tmp_path / "counter.die").touch()  # the worker kills itself once, after its first file
    with pytest.raises(ProfuserError, match="killed by SIGKILL.*run the same command to resume"):
        run(tmp_path, default_recipe, isolate=True)
    assert list((tmp_path / "runs" / "store" / "toy").glob("*.partial/part0.txt"))
    results = run(tmp_path, default_recipe, isolate=True)
    assert results[-1].metrics == {"resumed": True} and not results[-1].cached
    assert (Path(results[-1].path) / "result.txt").read_text() == "am"


def test_auto_isolates_only_where_cuda_is_visible(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert RuntimeClass().isolates() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert RuntimeClass().isolates() is True
    assert RuntimeClass(device="cpu").isolates() is False
    assert RuntimeClass(isolate_stages=True, device="cpu").isolates() is True
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert RuntimeClass().isolates() is False


def test_the_recipe_can_ask_for_isolation(tmp_path, default_recipe):
    recipe = default_recipe.model_copy(update={"runtime": default_recipe.runtime.model_copy(update={"isolate_stages": True})})
    runner = Runner(recipe, Engine(entrypoints=False), Runtime(runs_dir=tmp_path, progress=False),
                    stages=stages(tmp_path / "counter"), echo=lambda _: None)
    assert runner.runtime.isolates() is True


def _manifest(result):
    import json

    return json.loads((Path(result.path) / "manifest.json").read_text())


def test_tiny_pipeline_artifacts_are_the_same_with_isolated_stages(tmp_path):
    """Every stage of both modes on tiny heterogeneous models, each model stage in a worker: the
    artifacts are those of an in-process run, file for file."""
    import json

    from typer.testing import CliRunner

    from profuser.cli import app

    recipe = tiny_recipe(tmp_path)
    for isolate, runs in (("true", "isolated"), ("false", "inline")):
        result = CliRunner().invoke(app, ["run", str(recipe), "--runs-dir", str(tmp_path / runs),
                                          "-o", f"runtime.isolate_stages={isolate}"])
        assert result.exit_code == 0, result.output
        assert ("(worker process)" in result.output) == (isolate == "true")
    summaries = [json.loads((tmp_path / runs / "runs" / "tiny" / "run.json").read_text()) for runs in ("isolated", "inline")]
    isolated, inline = ({s["id"]: s for s in summary["stages"]} for summary in summaries)
    assert isolated.keys() == inline.keys() and {"generate/gemma", "logits/training/gemma", "train"} <= isolated.keys()
    for stage_id in isolated:
        a, b = (Path(s[stage_id]["path"]) for s in (isolated, inline))
        assert a.name == b.name  # the cache key
        assert artifact_contents(a) == artifact_contents(b), stage_id


def artifact_contents(path: Path) -> dict[str, object]:
    """What an artifact holds, file by file, without what only says when or how fast it ran
    (timings in parquet metadata, lm-eval's dates, the manifest)."""
    import json

    import pyarrow.parquet as pq

    contents: dict[str, object] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel == "manifest.json" or file.name == "results.json" or file.suffix in (".jsonl", ".log") or "tb/" in rel:
            continue
        if file.suffix == ".parquet":
            contents[rel] = pq.read_table(file).replace_schema_metadata(None).to_pylist()
        elif file.suffix == ".json":
            contents[rel] = {k: v for k, v in json.loads(file.read_text()).items()
                             if "second" not in k and "time" not in k and "per_s" not in k} \
                if file.read_text().lstrip().startswith("{") else json.loads(file.read_text())
        else:
            contents[rel] = file.read_bytes()
    return contents


@pytest.mark.slow
def test_a_two_process_launch_with_isolated_stages(tmp_path):
    """``torchrun --nproc_per_node 2`` with stage workers: each rank's model stages run in that
    rank's worker (the ranks' shards, DDP training over both workers), then one process reuses it all."""
    import json
    import shutil
    import subprocess
    import sys

    recipe = tiny_recipe(tmp_path, {"train.micro_batch_size": 2})  # a global batch of 4 over 2 ranks
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    runs = tmp_path / "runs"
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "profuser", "run", str(recipe), "--runs-dir", str(runs),
                           "-o", "runtime.isolate_stages=true"], check=False, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("[run]    train ... (worker process)") == 2  # both ranks
    by_id = {s["id"]: s for s in json.loads((runs / "runs" / "tiny" / "run.json").read_text())["stages"]}
    assert by_id["train"]["metrics"]["world_size"] == 2 and by_id["train"]["metrics"]["backend"] == "ddp"
    shards = Path(by_id["logits/training/gemma"]["path"]).glob("shard-*.arrow")
    assert {p.name.split("-")[-1] for p in shards} == {"r0.arrow", "r1.arrow"}
    again = subprocess.run([sys.executable, "-m", "profuser", "run", str(recipe), "--runs-dir", str(runs)],
                           check=False, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[run]" not in again.stdout, again.stdout
