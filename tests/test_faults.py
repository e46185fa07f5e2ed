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
import subprocess
import sys
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
