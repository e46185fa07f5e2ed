"""Fault injection (issue 14): the tiny real pipeline killed right before a rename, again and again,
each run resuming what the last one left, until one completes. Every sealed artifact must equal a
clean run's, and no temporary file may reach one.

The kills go through a patched ``os.replace`` in a subprocess (``os._exit(137)``: no cleanup, no
finally blocks, as a SIGKILL). Each run is killed before the first rename whose destination no
earlier run was killed before, so the chain ends, and every rename it covers was preceded by a kill
at least once: the fast test covers one rename of each sort, the slow one every rename."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_store import sealed_files
from test_workers import artifact_contents

from profuser.store import TEMPORARY
from profuser.testing import tiny_recipe

KILL_SCRIPT = """
import os, re, sys
runs, covered_file, patterns = sys.argv[1], sys.argv[2], sys.argv[3].split("\\n")
covered = open(covered_file).read().split() if os.path.exists(covered_file) else []
real_replace = os.replace

def candidate(dest):
    # not covered yet: each destination once (patterns ".") or each pattern once
    if patterns == ["."]:
        return dest not in covered
    return any(re.search(p, dest) and not any(re.search(p, c) for c in covered) for p in patterns)

def replace(src, dst, *args, **kwargs):
    dest = os.path.relpath(os.path.abspath(dst), runs)
    if candidate(dest):
        with open(covered_file, "a") as fh:
            fh.write(dest + "\\n")
        os._exit(137)  # killed right before the rename: nothing below runs
    return real_replace(src, dst, *args, **kwargs)

os.replace = replace
from profuser.cli import app
app(["run", *sys.argv[4:], "--runs-dir", runs], prog_name="profuser")
"""

# one rename of each sort, in pipeline order: run records, a lock's holder, a stage's own files (shards,
# tables, logits, checkpoints, the model card, the training summary), a manifest, sealing renames
ONE_OF_EACH = (
    r"^runs/tiny/recipe\.yaml$",
    r"^store/\.locks/data-\w+\.holder$",
    r"^store/data/\w+\.partial/manifest\.json$",
    r"^store/data/\w+$",
    r"^store/generate/\w+\.partial/shards/",
    r"^store/score/\w+\.partial/scores\.parquet$",
    r"^store/logits/\w+\.partial/shard-",
    r"^store/logits/\w+\.partial/store\.json$",
    r"^store/build/\w+$",
    r"^store/train/\w+\.partial/checkpoints/step-0*2/trainer_state\.json$",
    r"^store/train/\w+\.partial/model/README\.md$",
    r"^store/train/\w+\.partial/summary\.json$",
    r"^store/train/\w+$",
    r"^runs/tiny/run\.json$",
    r"^runs/tiny/model$",
)


def kill_chain(tmp_path: Path, patterns: tuple[str, ...], max_runs: int) -> tuple[Path, list[str]]:
    recipe = tiny_recipe(tmp_path)
    runs, covered = tmp_path / "chain", tmp_path / "covered.txt"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1"}
    for _ in range(max_runs):
        proc = subprocess.run([sys.executable, str(script), str(runs), str(covered), "\n".join(patterns), str(recipe)],
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode == 0:
            return runs, covered.read_text().split()
        assert proc.returncode == 137, proc.stderr[-3000:]  # a kill, never an error on resume
        assert "Traceback" not in proc.stderr
    raise AssertionError(f"no run completed in {max_runs}: killed before {covered.read_text().split()}")


def clean_run(tmp_path: Path) -> dict:
    from typer.testing import CliRunner

    from profuser.cli import app

    result = CliRunner().invoke(app, ["run", str(tiny_recipe(tmp_path)), "--runs-dir", str(tmp_path / "clean")])
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "clean" / "runs" / "tiny" / "run.json").read_text())


def assert_same_as_clean(runs: Path, clean: dict) -> None:
    resumed = json.loads((runs / "runs" / "tiny" / "run.json").read_text())
    assert [s["id"] for s in resumed["stages"]] == [s["id"] for s in clean["stages"]]
    for mine, theirs in zip(resumed["stages"], clean["stages"]):
        assert mine["key"] == theirs["key"]
        ours, clean_contents = artifact_contents(Path(mine["path"])), artifact_contents(Path(theirs["path"]))
        if mine["kind"] == "train":  # what the last attempt did: where it resumed, the tokens it trained itself
            for contents in (ours, clean_contents):
                contents["summary.json"] = {k: v for k, v in contents["summary.json"].items() if k not in ("resumed_from", "tokens")}
        assert ours == clean_contents, mine["id"]
    names = sealed_files(runs)
    assert names and not [n for n in names if TEMPORARY.match(n)]
    assert not list((runs / "store").glob("*/*.partial")) and not list((runs / "store").glob("*/*.corrupt-*"))
    assert (runs / "runs" / "tiny" / "model" / "config.json").is_file()  # the link points at the sealed model


def test_a_kill_before_each_sort_of_rename_resumes_to_a_clean_runs_artifacts(tmp_path):
    runs, killed = kill_chain(tmp_path, ONE_OF_EACH, max_runs=len(ONE_OF_EACH) + 1)
    # each pattern matched one rename that a run was killed before
    assert [next(p for p in ONE_OF_EACH if re.search(p, dest)) for dest in killed] == list(ONE_OF_EACH)
    assert_same_as_clean(runs, clean_run(tmp_path))


@pytest.mark.slow
def test_a_kill_before_every_rename_of_the_pipeline_resumes_to_a_clean_runs_artifacts(tmp_path):
    runs, killed = kill_chain(tmp_path, (".",), max_runs=200)
    assert len(killed) > 60  # every rename of the pipeline, each once
    assert_same_as_clean(runs, clean_run(tmp_path))


# --- issue 24: what a live run uses is never collected -----------------------------------------------

GATED_RUN = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from profuser.pipeline import Runner, Runtime
from profuser.plugins import Engine
from profuser.recipe import Recipe, load_raw
from test_pipeline import toy_stages
tmp = Path({tmp!r})

def echo(line):
    print(line, flush=True)
    if line.startswith("[cached] a"):  # mid-reuse: b and c are still to be verified and read
        while not (tmp / "go").exists():
            time.sleep(0.05)

recipe = Recipe.model_validate(load_raw({recipe!r}))
results = Runner(recipe, Engine(entrypoints=False), Runtime(runs_dir=tmp / "runs", progress=False),
                 stages=toy_stages(tmp / "counter"), echo=echo).run()
print("CACHED", [r.cached for r in results], flush=True)
"""


def gated_run(tmp_path: Path) -> subprocess.Popen:
    from test_pipeline import REPO, TESTS

    script = tmp_path / "gated.py"
    script.write_text(GATED_RUN.format(tests=str(TESTS), tmp=str(tmp_path), recipe=str(REPO / "recipes" / "profuser.yaml")))
    return subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_gc_all_removes_nothing_a_stopped_run_is_reusing(tmp_path):
    from test_store import gc_json

    runs = tmp_path / "runs"
    first = gated_run(tmp_path)
    (tmp_path / "go").touch()
    assert "CACHED [False, False, False]" in first.communicate(timeout=120)[0]
    (tmp_path / "go").unlink()
    (runs / "runs" / "profuser" / "run.json").unlink()  # no record references the stages: all collectable
    sealed = sorted(p for p in (runs / "store" / "toy").iterdir())
    assert len(sealed) == 3
    proc = gated_run(tmp_path)
    line = proc.stdout.readline()
    while line and not line.startswith("[cached] a"):
        line = proc.stdout.readline()
    os.kill(proc.pid, signal.SIGSTOP)  # stalled mid-reuse, as a run re-hashing a large store is
    try:
        collected = gc_json(runs, "--all")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=120)
    unreferenced = [i for i in collected["items"] if i["what"] == "unreferenced"]
    assert len(unreferenced) == 3 and all(i["kept"] == "a live run reads it (leased)" for i in unreferenced)
    assert sorted(p for p in (runs / "store" / "toy").iterdir()) == sealed
    assert proc.returncode == 0 and "CACHED [True, True, True]" in out, err[-2000:]
    # the run ended: its leases are gone with it, and nothing of it is left to collect
    assert not list((runs / "store" / ".locks").glob("*.lease"))


def test_compare_seeds_keeps_every_seeds_artifacts_from_gc(tmp_path):
    from test_store import gc_json
    from typer.testing import CliRunner

    from profuser.cli import app

    runs, out = tmp_path / "runs", tmp_path / "cmp"
    recipe = tiny_recipe(tmp_path)
    result = CliRunner().invoke(app, ["compare", str(recipe), "--seeds", "0,1", "--runs-dir", str(runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    seeded = [e for e in comparison["entries"] if e.get("seed") is not None]
    assert [e["seed"] for e in seeded] == [0, 1] and seeded[0]["metrics_path"] != seeded[1]["metrics_path"]
    listed = gc_json(runs, "--all", "--dry-run")
    assert not [i for i in listed["items"] if i["what"] == "unreferenced"], listed
    # a later run of the same recipe rewrites run.json: the comparison still keeps what it points at
    (runs / "runs" / "tiny" / "run.json").unlink()
    shutil.rmtree(runs / "runs" / "tiny" / "seeds")
    listed = gc_json(runs, "--all", "--dry-run")
    assert not [i for i in listed["items"] if i["what"] == "unreferenced"], listed
    # ...while its comparison.json exists
    (out / "comparison.json").unlink()
    listed = gc_json(runs, "--all", "--dry-run")
    paths = {i["path"] for i in listed["items"] if i["what"] == "unreferenced"}
    assert {str(Path(e["metrics_path"]).parent) for e in seeded} <= paths
    assert any(i["what"] == "stale comparison record" for i in listed["items"])


GATED_COMPARE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import profuser.compare as compare
from profuser.pipeline import Runner, Runtime
from profuser.plugins import Engine
from test_pipeline import toy_stages
tmp = Path({tmp!r})

class ToyRunner(Runner):  # each recipe's toy plan: a is shared, b and c carry the recipe's name
    def __init__(self, recipe, engine, runtime, **kwargs):
        super().__init__(recipe, engine, runtime, stages=toy_stages(tmp / "counter", b_value=recipe.name), **kwargs)

def echo(line):
    print(line, flush=True)
    if line == "[cached] a":  # the first recipe runs; the second's stages are not read yet
        while not (tmp / "go").exists():
            time.sleep(0.05)

compare.Runner = ToyRunner
result = compare.run_comparison([Path(p) for p in {recipes!r}], Engine(entrypoints=False),
                                Runtime(runs_dir=tmp / "runs", progress=False), echo=echo)
print("RAN", json.dumps({{e["variant"]: e["stages_ran"] for e in result["entries"]}}), flush=True)
"""


def test_compare_leases_every_recipes_stages_before_the_first_runs(tmp_path):
    from test_pipeline import REPO, TESTS, toy_stages
    from test_store import gc_json

    from profuser.pipeline import Runner, Runtime
    from profuser.plugins import Engine
    from profuser.recipe import load_recipe

    runs = tmp_path / "runs"
    paths = []
    for name in ("first", "second"):
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(f"extends: {REPO / 'recipes' / 'profuser.yaml'}\nname: {name}\n")
    # the second recipe's stages are in the store, referenced by no record: gc --all may take them
    engine = Engine(entrypoints=False)
    Runner(load_recipe(paths[1], registry=engine.registry), engine, Runtime(runs_dir=runs, progress=False),
           stages=toy_stages(tmp_path / "counter", b_value="second"), echo=lambda _: None).run()
    shutil.rmtree(runs / "runs" / "second")
    script = tmp_path / "compare.py"
    script.write_text(GATED_COMPARE.format(tests=str(TESTS), tmp=str(tmp_path), recipes=[str(p) for p in paths]))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        while line and line.strip() != "[cached] a":
            line = proc.stdout.readline()
        assert line, proc.stderr.read()[-2000:]
        collected = gc_json(runs, "--all")  # while the first recipe runs
    finally:
        (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    unreferenced = [i for i in collected["items"] if i["what"] == "unreferenced"]
    assert len(unreferenced) == 3 and all(i["kept"] == "a live run reads it (leased)" for i in unreferenced)
    ran = json.loads(out.split("RAN ", 1)[1])
    assert ran == {"first": ["b", "c"], "second": []}  # nothing of the second recomputed
    assert not list((runs / "store" / ".locks").glob("*.lease"))  # released when the comparison ends


# --- issue 24: one computation per key: a stage worker dies with its runner ---------------------------

WORKER_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import typer
from profuser.cli import friendly
from profuser.pipeline import Runner, Runtime, Stage
from profuser.plugins import Engine
from profuser.recipe import Recipe, load_raw
tmp = Path({tmp!r})
stages = [Stage("a", "toy", {{"counter": str(tmp / "toy-counter"), "value": "a"}}, module="toy_stages"),
          Stage("blocking", "toy", {{"counter": str(tmp / "counter")}}, {{"up": "a"}}, module="toy_blocking_stage")]

@friendly
def main():
    recipe = Recipe.model_validate(load_raw({recipe!r}))
    results = Runner(recipe, Engine(entrypoints=False), Runtime(runs_dir=tmp / "runs", progress=False, isolate_stages=True),
                     stages=stages, echo=lambda line: print(line, flush=True)).run()
    print("CACHED", [r.cached for r in results], flush=True)

if __name__ == "__main__":  # the spawned worker imports this file too
    try:
        main()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
"""


def worker_run(tmp_path: Path) -> subprocess.Popen:
    from test_pipeline import REPO, TESTS

    script = tmp_path / "worker_run.py"
    script.write_text(WORKER_RUN.format(tests=str(TESTS), tmp=str(tmp_path), recipe=str(REPO / "recipes" / "profuser.yaml")))
    return subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_starts(tmp_path: Path) -> list[tuple[int, str]]:
    counter = tmp_path / "counter"
    lines = counter.read_text().splitlines() if counter.exists() else []
    return [(int(line.split()[0].split(":")[1]), line.split()[1]) for line in lines]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has stopped computing; only its reaping is left


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_runners_worker_dies_with_it_and_a_rerun_computes_the_stage_once(tmp_path, sig):
    proc = worker_run(tmp_path)
    deadline = time.time() + 120
    while not worker_starts(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    [(worker, holds_lock)] = worker_starts(tmp_path)
    assert holds_lock == "lock:yes"  # the worker holds the stage's lock itself, not only its runner
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    deadline = time.time() + 10
    while alive(worker) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(worker), "the stage worker outlived its runner"
    if sig == signal.SIGTERM:  # as Ctrl-C: one line, resumable, 128 + 15
        assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1] == "terminated (SIGTERM): finished stages are kept; run the same command to resume"
    else:
        assert proc.returncode == -signal.SIGKILL
    (tmp_path / "go").touch()
    rerun = worker_run(tmp_path)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0 and "CACHED [True, False]" in out and "[wait]" not in out, err[-3000:]
    assert len(worker_starts(tmp_path)) == 2  # the killed attempt and the rerun: nothing computed beside it
    assert (tmp_path / "runs" / "store" / "toy").is_dir() and len(list((tmp_path / "runs" / "store" / "toy").glob("*/result.txt"))) == 2


# --- issue 24: hostile or mistaken recipe YAML: one line each ---------------------------------------


def cli(*args: str):
    from typer.testing import CliRunner

    from profuser.cli import app

    return CliRunner().invoke(app, list(args))


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    return [line for line in result.output.splitlines() if line.startswith("error ")]


def test_recipe_yaml_duplicate_keys_alias_bombs_symlink_loops_and_directories_are_one_line(tmp_path):
    base = tiny_recipe(tmp_path)
    (tmp_path / "dup.yaml").write_text(f"extends: {base.name}\nname: a\nseed: 1\nname: b\n")
    # each level repeats the one below 10 times: 10^9 values once expanded, 1 KB on disk
    bomb = [f"extends: {base.name}", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb += ["merges: [{key: m, method: linear, models: [{model: x, parameters: {weight: *a8}}]}]"]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    (tmp_path / "loop1.yaml").symlink_to("loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to("loop1.yaml")
    (tmp_path / "adir").mkdir()
    (tmp_path / "extends-loop.yaml").write_text("extends: loop1.yaml\n")
    (tmp_path / "extends-dir.yaml").write_text("extends: adir\n")
    (tmp_path / "ok-anchors.yaml").write_text(f"extends: {base.name}\nx-lr: &lr 0.0001\ntrain: {{lr: *lr}}\n")
    expected = {
        "dup.yaml": f"{tmp_path / 'dup.yaml'}:4: duplicate key 'name' (first at line 2)",
        "bomb.yaml": f"{tmp_path / 'bomb.yaml'}:3: aliases expand this recipe past 100,000 values",
        "loop1.yaml": "loop1.yaml: a symlink loop",
        "adir": f"{tmp_path / 'adir'}: is a directory, not a recipe file",
        "extends-loop.yaml": "extends-loop.yaml: extends: loop1.yaml: a symlink loop",
        "extends-dir.yaml": "extends-dir.yaml: extends: adir is a directory, not a recipe file",
    }
    for name, start in expected.items():
        for command in ("validate", "run"):
            result = cli(command, str(tmp_path / name), *(["--dry-run", "--runs-dir", str(tmp_path / "runs")] if command == "run" else []))
            lines = error_lines(result)
            assert result.exit_code == 2 and len(lines) == 1 and start in lines[0], (command, name, result.output)
    # anchors and aliases of ordinary size still work (the unknown top-level key is the only problem)
    lines = error_lines(cli("validate", str(tmp_path / "ok-anchors.yaml")))
    assert len(lines) == 1 and "x-lr" in lines[0] and "alias" not in lines[0]


def test_a_stale_torch_extension_build_lock_is_one_line_before_a_deepspeed_train(tmp_path, monkeypatch):
    from profuser.errors import ProfuserError
    from profuser.pipeline import Runner, Runtime, Stage
    from profuser.plugins import Engine
    from profuser.recipe import Recipe, load_raw
    from profuser.workers import stale_extension_locks

    root = tmp_path / "torch_extensions"
    stale, building = root / "py311_cpu" / "cpu_adam" / "lock", root / "py311_cpu" / "fused_adam" / "lock"
    for lock in (stale, building):
        lock.parent.mkdir(parents=True)
        lock.touch()
    held = os.open(building, os.O_RDONLY)  # a build in progress keeps its lock open (torch's FileBaton)
    try:
        assert stale_extension_locks(root) == [stale.resolve()]
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
        from test_pipeline import REPO

        recipe = Recipe.model_validate(load_raw(REPO / "recipes" / "profuser.yaml"))
        counter = tmp_path / "counter"
        stages = [Stage("train", "train", {"counter": str(counter), "train": {"distributed": "deepspeed"}}, module="toy_stages")]
        runner = Runner(recipe, Engine(entrypoints=False), Runtime(runs_dir=tmp_path / "runs", progress=False),
                        stages=stages, echo=lambda _: None)
        with pytest.raises(ProfuserError) as error:
            runner.run()
        [line] = error.value.lines()
        assert line.startswith(f"{stale.resolve()}: a torch extension build was killed and left its lock") and not counter.exists()
        stale.unlink()  # as the message says: then the stage runs
        assert [r.cached for r in runner.run()] == [False] and counter.exists()
    finally:
        os.close(held)



def test_a_stale_torch_extension_build_lock_is_one_line_before_a_launched_deepspeed_train(tmp_path, monkeypatch, capsys):
    from profuser.training.__main__ import main

    lock = tmp_path / "torch_extensions" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    argv = ["--model", str(tmp_path / "no-model"), "--examples", f"training={tmp_path / 'no.parquet'}",
            "--out", str(tmp_path / "out"), "-t", "distributed=deepspeed"]
    assert main(argv) != 0
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{lock.resolve()}: a torch extension build was killed and left its lock")
    assert not (tmp_path / "out").exists()

# --- issue 24: bad bytes and full disks: one line each ------------------------------------------------


def test_a_lone_surrogate_is_a_bad_row_with_its_file_and_line_and_skip_skips_it(tmp_path):
    rows = [json.dumps({"instruction": f"question {i}", "output": f"answer {i}", "answer": str(i)}) for i in range(8)]
    rows[2] = '{"instruction": "half a pair \\ud800 here", "output": "x"}'  # a JSON escape, not a byte
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(rows) + "\n")
    runs = tmp_path / "runs"
    for on_bad_row in ("fail", "skip"):
        recipe = tiny_recipe(tmp_path, **{"data.source.name": "file", "data.source.params.path": str(data),
                                          "data.on_bad_row": on_bad_row})
        result = cli("run", str(recipe), "--until", "data", "--runs-dir", str(runs))
        assert "Traceback" not in result.output and not isinstance(result.exception, UnicodeError), result.output
        if on_bad_row == "fail":
            assert result.exit_code == 1, result.output
            assert f"{data}:3: field 'instruction' holds a lone surrogate (\\ud800 at character 13)" in result.output
        else:
            assert result.exit_code == 0, result.output
            [stats] = (runs / "store" / "data").glob("*/stats.json")
            stats = json.loads(stats.read_text())
            assert stats["bad_rows_skipped"] == 1 and stats["bad_rows"][0]["where"] == f"{data}:3"


def test_over_long_prompts_are_refused_at_validate_and_counted_by_generate_against_the_real_limit(tmp_path):
    long = " ".join(["sea"] * 400)  # about 800 tokens: past the tiny models' 512 positions
    rows = [{"instruction": long if i % 3 == 0 else f"question {i}", "output": f"answer {i}", "answer": str(i)}
            for i in range(12)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(tmp_path, **{"data.source.name": "file", "data.source.params.path": str(data),
                                      "sources": [{"ref": str(tmp_path / "models" / "tiny-llama"), "label": "llama"}]})
    # the tokenizer overstates the context (4096); the model has 512 positions
    config = tmp_path / "models" / "tiny-llama" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 4096}))
    runs = tmp_path / "runs"
    result = cli("validate", str(recipe), "--runs-dir", str(runs))
    assert result.exit_code == 0, result.output  # nothing cached yet: the run counts them
    assert cli("run", str(recipe), "--until", "data", "--runs-dir", str(runs)).exit_code == 0
    [train] = (runs / "store" / "data").glob("*/train.parquet")
    import pyarrow.parquet as pq

    longs = sorted(r["id"] for r in pq.read_table(train).to_pylist() if r["instruction"] == long)
    assert longs, "the split left no long prompt to train on"
    result = cli("validate", str(recipe), "--runs-dir", str(runs))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)  # one model (target and source), one line
    assert f"{len(longs)} of 8 prompts are longer than model tiny-llama's 512 tokens (max_position_embeddings; longest" in line
    assert line.startswith(f"error {recipe}: ") and longs[0] in line and "4096" not in line
    # the run: counted in generate's stats and said in one line, not cut silently
    result = cli("run", str(recipe), "--until", "generate", "--runs-dir", str(runs))
    assert result.exit_code == 0, result.output
    [manifest] = (runs / "store" / "generate").glob("*/manifest.json")
    stats = json.loads(manifest.read_text())["metrics"]
    assert stats["overlong_prompts"] == len(longs) and stats["context_limit"] == 512
    assert stats["longest_prompt_tokens"] > 512 and "truncated_prompts" in stats


def test_a_full_disk_and_a_read_only_runs_dir_are_one_line_and_a_cached_run_needs_no_write(tmp_path, monkeypatch):
    import errno

    from profuser.store import atomic_write_text as real_write

    recipe = tiny_recipe(tmp_path)
    runs = tmp_path / "runs"

    def full(path, text):  # the disk fills up while the data stage writes its stats
        if ".partial" in str(path) and Path(path).name == "stats.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, text)

    monkeypatch.setattr("profuser.stages.data.atomic_write_json", lambda path, obj: full(path, json.dumps(obj)))
    result = cli("run", str(recipe), "--until", "data", "--runs-dir", str(runs))
    lines = error_lines(result)
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error data: no space left on the device writing ") and "stats.json (" in lines[0]
    assert " free there): free some space" in lines[0]
    monkeypatch.undo()
    assert cli("run", str(recipe), "--until", "data", "--runs-dir", str(runs)).exit_code == 0  # resumed: nothing lost

    # a read-only runs directory: the cached run goes on without its record; gc and a stage to compute say so
    real_replace = os.replace

    def read_only(src, dst, *args, **kwargs):
        if str(dst).startswith(str(runs)):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(runs / "store"))

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr("profuser.store.ArtifactStore.lease_path", lambda self, kind, key: refuse())
    cached = cli("run", str(recipe), "--until", "data", "--runs-dir", str(runs))
    assert cached.exit_code == 0 and "[cached] data" in cached.output, cached.output
    assert "read-only file system; the run record is not updated" in cached.output
    monkeypatch.setattr("profuser.store.ArtifactStore.begin", lambda self, kind, key, fresh=False: refuse())
    compute = cli("run", str(recipe), "--until", "select", "--runs-dir", str(runs))
    lines = error_lines(compute)
    assert compute.exit_code == 1 and len(lines) == 1 and "read-only file system writing " in lines[0], compute.output
    assert "point --runs-dir" in lines[0]
