"""Artifact store (issue 14): per-key locks (a second run waits, a dead holder's lock is free, a
lock file collected while waited on), corrupt artifacts reported and not counted as cached,
temporary files never sealed, and ``profuser runs --gc``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from test_pipeline import REPO, TESTS, toy_stages
from toy_stages import starts
from typer.testing import CliRunner

from profuser.cli import app
from profuser.pipeline import Runner, Runtime
from profuser.plugins import Engine
from profuser.recipe import Recipe, load_raw
from profuser.store import TEMPORARY, ArtifactStore, _try_lock, collect_garbage


@pytest.fixture(scope="module")
def engine():
    return Engine(entrypoints=False)


@pytest.fixture(scope="module")
def recipe():
    return Recipe.model_validate(load_raw(REPO / "recipes" / "profuser.yaml"))


def toy_runner(tmp_path, engine, recipe, lines=None, **kwargs):
    stages = toy_stages(tmp_path / "counter", **{k: kwargs.pop(k) for k in ("b_value", "sleep", "chunks") if k in kwargs})
    echo = lines.append if lines is not None else (lambda _: None)
    return Runner(recipe, engine, Runtime(runs_dir=tmp_path / "runs", progress=False), stages=stages, echo=echo, **kwargs)


def sealed_files(runs: Path) -> list[str]:
    """Every file of every sealed artifact, and every file its manifest lists."""
    names = []
    for manifest in (runs / "store").glob("*/*/manifest.json"):
        names += [p.name for p in manifest.parent.rglob("*")]
        names += [Path(rel).name for rel in json.loads(manifest.read_text())["files"]]
    return names


# --- corrupt artifacts, --dry-run, temporary files --------------------------------------------------


def test_dry_run_counts_a_corrupt_artifact_as_to_run_and_the_run_says_it_recomputes_it(tmp_path, engine, recipe):
    first = toy_runner(tmp_path, engine, recipe).run()
    (Path(first[1].path) / "chunk0.txt").write_text("X0")  # same size, other bytes
    assert [cached for _, _, cached in toy_runner(tmp_path, engine, recipe).status()] == [True, False, True]
    assert Path(first[1].path).is_dir()  # a dry run only looks: nothing moved aside
    lines = []
    again = toy_runner(tmp_path, engine, recipe, lines).run()
    corrupt = [line for line in lines if line.startswith("[corrupt]")]
    assert len(corrupt) == 1 and first[1].path in corrupt[0] and "file chunk0.txt does not match its checksum" in corrupt[0]
    assert "moved aside, it will be recomputed" in corrupt[0]
    assert [r.cached for r in again] == [True, False, True] and starts(tmp_path / "counter") == ["a", "b", "c", "b"]
    assert len(list(Path(first[1].path).parent.glob("*.corrupt-*"))) == 1
    assert all(cached for _, _, cached in toy_runner(tmp_path, engine, recipe).status())


def test_temporary_files_a_kill_left_in_a_partial_are_never_sealed(tmp_path, engine, recipe):
    runner = toy_runner(tmp_path, engine, recipe)
    partial = runner.store.begin("toy", runner.keys["a"])
    # what kills before a rename leave: an atomic write's file, a tempfile folder, a nested one
    (partial / ".result.txt.tmp4242").write_text("half")
    (partial / ".tmpab12cd").mkdir()
    (partial / ".tmpab12cd" / "model.safetensors").write_bytes(b"half a model")
    (partial / "model").mkdir()
    (partial / "model" / ".config.json.tmp7").write_text("{")
    runner.run()
    names = sealed_files(tmp_path / "runs")
    assert names and not [n for n in names if TEMPORARY.match(n)], names
    assert TEMPORARY.match(".x.parquet.tmp12") and TEMPORARY.match(".tmpXYZ") and not TEMPORARY.match(".hidden")


# --- locks ---------------------------------------------------------------------------------------------

RUN_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from profuser.pipeline import Runner, Runtime
    from profuser.plugins import Engine
    from profuser.recipe import Recipe, load_raw
    from test_pipeline import toy_stages
    tmp = Path({tmp!r})
    recipe = Recipe.model_validate(load_raw({recipe!r}))
    results = Runner(recipe, Engine(entrypoints=False), Runtime(runs_dir=tmp / "runs", progress=False),
                     stages=toy_stages(tmp / "counter", sleep={sleep}, chunks=6), echo=lambda l: print(l, flush=True)).run()
    print("CACHED", [r.cached for r in results])
""")


def run_script(tmp_path, sleep: float) -> list[str]:
    """A toy run whose stage b writes 6 chunks ``sleep`` seconds apart."""
    script = tmp_path / "job.py"
    script.write_text(RUN_SCRIPT.format(tests=str(TESTS), tmp=str(tmp_path), recipe=str(REPO / "recipes" / "profuser.yaml"),
                                        sleep=sleep))
    return [sys.executable, str(script)]


ENV = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1"}


def test_a_run_started_seconds_after_another_waits_for_its_stage_then_reuses_it(tmp_path):
    first = subprocess.Popen(run_script(tmp_path, 1.5), env=ENV, stdout=subprocess.PIPE, text=True)
    store = tmp_path / "runs" / "store" / "toy"
    deadline = time.time() + 60
    while time.time() < deadline and not list(store.glob("*.partial/chunk0.txt")):
        time.sleep(0.05)  # the first run is in b, with 7 s of it left: more than the second needs to start
    second = subprocess.run(run_script(tmp_path, 1.5), env=ENV, capture_output=True, text=True, timeout=120, check=False)
    out1 = first.communicate(timeout=120)[0]
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    assert "CACHED [False, False, False]" in out1
    assert "CACHED [True, True, True]" in second.stdout  # the second computed nothing
    wait = [line for line in second.stdout.splitlines() if line.startswith("[wait]")]
    # it waited for b (and, if the first was already on c when it woke up, for c too)
    assert wait and wait[0].startswith(f"[wait]   b (another run computes it: pid {first.pid} on ")
    assert all(f"pid {first.pid} on " in line for line in wait)
    assert starts(tmp_path / "counter") == ["a", "b", "c"]  # every stage ran once


def test_a_killed_holders_lock_is_free_and_the_next_run_resumes(tmp_path):
    proc = subprocess.Popen(run_script(tmp_path, 0.3), env=ENV, stdout=subprocess.DEVNULL)
    store = ArtifactStore(tmp_path / "runs")
    deadline = time.time() + 60
    while time.time() < deadline and not list((store.root / "store" / "toy").glob("*.partial/chunk1.txt")):
        time.sleep(0.05)
    holders = list((store.root / "store" / ".locks").glob("toy-*.holder"))
    assert len(holders) == 1 and json.loads(holders[0].read_text())["pid"] == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert holders[0].exists()  # what the dead holder left: a stale holder file, but no held lock
    t0 = time.time()
    out = subprocess.run(run_script(tmp_path, 0.3), env=ENV, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "[wait]" not in out and "CACHED [True, False, False]" in out and time.time() - t0 < 60
    assert starts(tmp_path / "counter") == ["a", "b", "b", "c"]  # b resumed (its chunks kept), not redone by a waiter
    assert not holders[0].exists()


def test_a_lock_file_collected_while_a_run_waits_on_it_is_not_shared(tmp_path):
    """gc removes a free lock file while holding it: a process that opened the old file and waits
    must not end up holding a lock that a newcomer on the new file also holds."""
    store = ArtifactStore(tmp_path)
    path = store.lock_path("toy", "k")
    path.parent.mkdir(parents=True)
    old = _try_lock(path)
    inside = threading.Event()

    def waiter():
        with store.lock("toy", "k"):
            inside.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)  # the waiter blocks on the old file
    path.unlink()
    new = _try_lock(path)  # a newcomer locks the new file
    assert new is not None
    os.close(old)
    assert not inside.wait(0.5)  # the waiter got the old file's lock, saw it collected, waits on the new one
    os.close(new)
    assert inside.wait(10)
    thread.join()


# --- profuser runs --gc -----------------------------------------------------------------------------


def gc_json(runs: Path, *args: str) -> dict:
    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(runs), "--gc", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # pure JSON: nothing else on stdout


def test_runs_gc_collects_what_kills_and_corruption_left(tmp_path, engine, recipe):
    runs = tmp_path / "runs"
    old = toy_runner(tmp_path, engine, recipe, b_value="old").run()  # b and c become unreferenced below
    first = toy_runner(tmp_path, engine, recipe).run()
    (Path(first[2].path) / "result.txt").write_text("tampered")
    toy_runner(tmp_path, engine, recipe).run()  # c moved aside as corrupt, recomputed
    toy = runs / "store" / "toy"
    (toy / "0123.trash-99").mkdir()
    (toy / "0123.trash-99" / "x").write_bytes(b"12345")
    (toy / "4567.partial").mkdir()  # an empty partial: a run killed before writing
    (toy / "89ab.partial" / "shards").mkdir(parents=True)
    (toy / "89ab.partial" / "shards" / "0.parquet").write_bytes(b"resumable")
    locks = runs / "store" / ".locks"
    (locks / "toy-89ab.holder").write_text('{"pid": 1, "host": "h", "since": 0}')  # a killed holder's
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    (locks / f".toy-x.holder.tmp{dead}").write_text("{")
    (runs / "runs" / "profuser" / f".run.json.tmp{dead}").write_text("{")
    (locks / f".toy-y.holder.tmp{os.getpid()}").write_text("{")  # a live process's: kept
    # a partial whose key a live run holds is kept, even with --all
    store = ArtifactStore(runs)
    (toy / "cdef.partial").mkdir()

    listed = gc_json(runs, "--dry-run")
    by_what: dict[str, list] = {}
    for item in listed["items"]:
        by_what.setdefault(item["what"], []).append(item)
    assert listed["dry_run"] and len(by_what["corrupt"]) == 1 and by_what["corrupt"][0]["bytes"] > 0
    assert [Path(i["path"]).name for i in by_what["trash"]] == ["0123.trash-99"] and by_what["trash"][0]["bytes"] == 5
    partials = {Path(i["path"]).name: i["kept"] for i in by_what["partial"]}
    assert partials["4567.partial"] == "" and partials["89ab.partial"].startswith("resumable")
    assert {Path(i["path"]).name for i in by_what["temporary"]} == {f".toy-x.holder.tmp{dead}", f".run.json.tmp{dead}"}
    assert "unreferenced" not in by_what  # only with --all
    assert (toy / "0123.trash-99").exists() and (toy / "4567.partial").exists()  # a dry run removes nothing

    with store.lock("toy", "cdef"):
        removed = gc_json(runs)
        assert {Path(i["path"]).name: i["kept"] for i in removed["items"] if i["what"] == "partial"}["cdef.partial"] \
            == "a live run holds it"
        assert (toy / "cdef.partial").exists() and store.lock_path("toy", "cdef").exists()
    assert removed["bytes"] == sum(i["bytes"] for i in removed["items"] if not i["kept"]) > 0
    assert not list(toy.glob("*.corrupt-*")) and not (toy / "0123.trash-99").exists() and not (toy / "4567.partial").exists()
    assert (toy / "89ab.partial" / "shards" / "0.parquet").exists() and (locks / f".toy-y.holder.tmp{os.getpid()}").exists()
    assert not (locks / "toy-89ab.holder").exists() and [p.name for p in locks.glob("*.lock")] == ["toy-cdef.lock"]

    everything = gc_json(runs, "--all")
    unreferenced = {Path(i["path"]).name for i in everything["items"] if i["what"] == "unreferenced"}
    assert unreferenced == {Path(old[1].path).name, Path(old[2].path).name}
    assert not (toy / "89ab.partial").exists() and not (toy / "cdef.partial").exists()
    assert not Path(old[1].path).exists() and all(Path(r.path).exists() for r in first)
    again = toy_runner(tmp_path, engine, recipe).run()
    assert all(r.cached for r in again)  # everything the run record references is intact
    assert collect_garbage(store) == []


def test_runs_gc_all_keeps_unreferenced_artifacts_while_a_run_computes(tmp_path, engine, recipe):
    runs = tmp_path / "runs"
    old = toy_runner(tmp_path, engine, recipe, b_value="old").run()
    toy_runner(tmp_path, engine, recipe).run()
    store = ArtifactStore(runs)
    with store.lock("toy", "somekey"):  # a run computing a stage: its earlier stages are not in a record yet
        items = collect_garbage(store, everything=True)
    kept = {Path(i.path).name: i.kept for i in items if i.what == "unreferenced"}
    assert kept == {Path(old[1].path).name: "a run is in progress (its record is written when it ends)",
                    Path(old[2].path).name: "a run is in progress (its record is written when it ends)"}
    assert Path(old[1].path).exists()


def test_runs_gc_text_output_and_bad_flags(tmp_path, engine, recipe):
    toy_runner(tmp_path, engine, recipe).run()
    (tmp_path / "runs" / "store" / "toy" / "ab.partial").mkdir()
    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs"), "--gc", "--dry-run"])
    assert result.exit_code == 0 and "would remove: partial " in result.output and "ab.partial (0 B)" in result.output
    assert "would remove: 3 free lock/holder file(s) in " in result.output  # a, b and c were computed: one line
    assert (tmp_path / "runs" / "store" / "toy" / "ab.partial").exists()
    result = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs"), "--all"])
    assert result.exit_code != 0 and "--all and --dry-run go with --gc" in result.output and "Traceback" not in result.output
