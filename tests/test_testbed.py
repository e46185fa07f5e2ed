"""The testbed's pieces: the ``testbed_tasks`` source and its fixed held-out pool, ``data.heldout:
source``, and the advantage map (``profuser advantages``)."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
from profuser_plugins.datasets.testbed_tasks import FAMILIES, WEEKDAYS, FusionTestbedTasks, _code_word

from profuser.advantages import ALL, advantage_table, markdown, wilson_ci
from profuser.components import Record
from profuser.data import split_marked
from profuser.errors import DataError


def records(**params) -> list[Record]:
    return list(FusionTestbedTasks(FusionTestbedTasks.Params(**params)).records())


def test_heldout_pool_is_fixed_and_disjoint_from_every_training_draw():
    a = records(families=["letter_shift", "code_words"], per_family=40, seed=0)
    b = records(families=["sequence"], per_family=10, seed=3)
    held_a = [(r.instruction, r.response) for r in a if r.meta["split"] == "heldout"]
    held_b = [(r.instruction, r.response) for r in b if r.meta["split"] == "heldout"]
    assert held_a == held_b and len(held_a) == 50 * len(FAMILIES)  # the same pool whatever trains
    train = {r.instruction for rec in (a, b, records(per_family=30, seed=1)) for r in rec if r.meta["split"] == "train"}
    assert not train & {i for i, _ in held_a}
    assert {r.meta["task"] for r in b if r.meta["split"] == "train"} == {"sequence"}


def test_answers_are_right_and_come_first():
    for r in records(per_family=20, heldout_per_family=0):
        answer = r.meta["answer"]
        assert r.response == f"Answer: {answer}"
        q = r.instruction
        if r.meta["task"] == "letter_shift":
            k = int(q.split(" comes ")[1].split(" ")[0])
            letter = q.split("'")[1]
            i = string.ascii_lowercase.index(letter) + (k if " after " in q else -k)
            assert answer == string.ascii_lowercase[i]
        elif r.meta["task"] == "weekday_shift":
            k = int(q.split(" is ")[1].split(" ")[0])
            start = WEEKDAYS.index(q.rstrip("?").split()[-1])
            assert answer == WEEKDAYS[(start + (k if " after " in q else -k)) % 7]
        elif r.meta["task"] == "sequence":
            terms = [int(t) for t in q.split("sequence ")[1].rstrip("?").split(", ")]
            assert int(answer) == terms[-1] + terms[1] - terms[0]
        elif r.meta["task"] == "code_words":
            assert answer == _code_word(q.split("'")[1])


def test_too_many_asked_is_one_line():
    with pytest.raises(DataError, match="word_length has only"):
        records(families=["word_length"], per_family=10_000)


def test_split_marked_and_its_errors():
    rows = [Record(str(i), "", f"q{i}", "a", {"split": s}) for i, s in enumerate(["train", "heldout", "test", "train"])]
    train, held = split_marked(rows)
    assert [r.id for r in train] == ["0", "3"] and [r.id for r in held] == ["1", "2"]
    with pytest.raises(DataError, match="none of the 2 records"):
        split_marked(rows[:1] + rows[3:])
    with pytest.raises(DataError, match="nothing to train on"):
        split_marked(rows[1:3])


def test_data_stage_with_a_source_split(tmp_path):
    from profuser.pipeline import Runner, Runtime
    from profuser.plugins import Engine
    from profuser.recipe import load_recipe
    from profuser.testing import tiny_recipe

    engine = Engine(entrypoints=False)
    path = tiny_recipe(tmp_path, name="split", data={"source": {"name": "testbed_tasks", "params": {
        "families": ["sequence"], "per_family": 12, "heldout_families": ["sequence", "code_words"],
        "heldout_per_family": 5}}, "heldout": "source", "sample": 8})
    runner = Runner(load_recipe(path, registry=engine.registry), engine, Runtime(runs_dir=tmp_path / "runs", device="cpu"), until="data", echo=lambda _: None)
    (result,) = runner.run()
    stats = json.loads((tmp_path / "runs" / "store" / "data" / result.key / "stats.json").read_text())
    assert stats["train"] == 8 and stats["heldout"] == 10
    assert stats["tasks"]["heldout"] == {"sequence": 5, "code_words": 5}


def test_wilson_interval_is_not_degenerate():
    lo, hi = wilson_ci(0, 50)
    assert lo == 0 and 6 < hi < 8
    lo, hi = wilson_ci(50, 50)
    assert 92 < lo < 94 and hi == pytest.approx(100)


def outcomes(pattern: dict[str, dict[str, list[int]]]) -> tuple[dict, dict]:
    """{model: {family: 0/1 list}} -> ({model: {id: v}}, {id: family})"""
    out: dict[str, dict[str, float]] = {}
    fams: dict[str, str] = {}
    for model, by_family in pattern.items():
        out[model] = {}
        for family, values in by_family.items():
            for i, v in enumerate(values):
                out[model][f"{family}-{i}"] = float(v)
                fams[f"{family}-{i}"] = family
    return out, fams


def test_advantage_map_valid_when_each_source_leads_somewhere_and_none_everywhere():
    zeros, ones = [0] * 40, [1] * 30 + [0] * 10
    out, fams = outcomes({"t": {"a": zeros, "b": zeros}, "s1": {"a": ones, "b": zeros}, "s2": {"a": zeros, "b": ones}})
    table = advantage_table(out, fams, "t")
    assert table["valid"] and table["ahead"] == {"s1": ["a"], "s2": ["b"]}
    assert table["families"]["a"]["s1"]["em"] == 75.0 and table["families"][ALL]["t"]["n"] == 80
    assert table["deltas"]["a"]["s1"]["significant"] and not table["deltas"]["a"]["s2"]["significant"]
    assert "s1 − target" in markdown(table) and "**valid**" in markdown(table)


def test_advantage_map_invalid_when_a_source_leads_everywhere_or_nowhere():
    zeros, ones = [0] * 40, [1] * 30 + [0] * 10
    out, fams = outcomes({"t": {"a": zeros, "b": zeros}, "s1": {"a": ones, "b": ones}, "s2": {"a": zeros, "b": zeros}})
    table = advantage_table(out, fams, "t")
    assert not table["valid"]
    assert "s1 is ahead of the target on every family" in table["why"]
    assert "s2 is ahead of the target on no family" in table["why"]


def test_reference_noise_only_touches_training_references_and_nests():
    clean = records(families=["capitals", "sequence"], per_family=40)
    low = records(families=["capitals", "sequence"], per_family=40, reference_noise=0.2)
    high = records(families=["capitals", "sequence"], per_family=40, reference_noise=0.5)
    assert [(r.instruction, r.meta["answer"]) for r in clean] == [(r.instruction, r.meta["answer"]) for r in high]
    wrong = {rec: {r.id for r in rows if r.response != f"Answer: {r.meta['answer']}"} for rec, rows in
             (("clean", clean), ("low", low), ("high", high))}
    assert not wrong["clean"] and wrong["low"] < wrong["high"]
    assert 0.3 < len(wrong["high"]) / 80 < 0.7
    assert all(r.meta["split"] == "train" and r.meta["reference_correct"] is False for r in high if r.id in wrong["high"])


def test_compare_tables_split_the_heldout_task_by_family(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from profuser.data import write_records
    from profuser.evaluation.tasks import is_family_task, task_title
    from profuser.report import _primary_name, summarise_variants

    rows = [Record(f"r{i}", "", f"q{i}", "a", {"task": "a" if i < 4 else "b", "answer": "x"}) for i in range(8)]
    write_records(tmp_path / "heldout.parquet", rows)
    entries = []
    for name, hits in (("ref", [1, 1, 1, 1, 0, 0, 0, 0]), ("other", [0, 0, 0, 0, 1, 1, 1, 1])):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"task": ["profuser_heldout"] * 8, "doc_id": list(range(8)),
                                 "id": [r.id for r in rows], "value": [float(h) for h in hits]}), path)
        scores = {"profuser_heldout": 0.5, "profuser_heldout/a": sum(hits[:4]) / 4, "profuser_heldout/b": sum(hits[4:]) / 4}
        entries.append({"variant": name, "scores": scores, "per_example_path": str(path),
                        "heldout_path": str(tmp_path / "heldout.parquet")})
    rows_out = summarise_variants(entries, reference="ref", resamples=200)
    other = next(r for r in rows_out if r["variant"] == "other")
    assert other["tasks"]["profuser_heldout/a"]["n_examples"] == 4
    assert other["tasks"]["profuser_heldout/a"]["delta"]["mean"] == -1.0
    assert other["tasks"]["profuser_heldout/b"]["delta"]["mean"] == 1.0
    assert is_family_task("profuser_heldout/a") and task_title("profuser_heldout/a") == "Held-out: a"
    assert _primary_name("profuser_heldout/a") == _primary_name("profuser_heldout") == "exact_match,answer"
    assert not is_family_task("mmlu")


def test_advantages_command_runs_only_the_baselines(tmp_path):
    from typer.testing import CliRunner

    from profuser.cli import app
    from profuser.testing import tiny_recipe

    path = tiny_recipe(tmp_path, **{"data": {"source": {"name": "testbed_tasks", "params": {
        "families": ["sequence"], "per_family": 6, "heldout_families": ["sequence", "largest"], "heldout_per_family": 3}},
        "heldout": "source"}, "evaluate.tasks": ["profuser_heldout"], "evaluate.baselines": True,
        "evaluate.max_gen_toks": 4})
    runs, out = tmp_path / "runs", tmp_path / "adv" / "advantages.json"
    result = CliRunner().invoke(app, ["advantages", str(path), "--runs-dir", str(runs), "--out", str(out), "--json"])
    table = json.loads(result.stdout)  # --json: stdout is only the JSON (the run's lines go to stderr)
    # random tiny sources answer nothing: no source is ahead anywhere, the setting is not valid (exit 1)
    assert result.exit_code == 1 and not table["valid"] and "ahead of the target on no family" in table["why"]
    assert set(table["families"]) == {"sequence", "largest", "all"}
    assert table["families"]["sequence"][table["target"]]["n"] == 3
    assert json.loads(out.read_text()) == table and out.with_suffix(".md").is_file()
    ran = set(os.listdir(runs / "store"))
    assert ran == {"data", "evaluate"} | ({".locks"} & ran)  # nothing is trained or generated for it


def test_every_testbed_variant_plans_the_same_optimizer_steps(tmp_path):
    """The testbed's comparison is compute matched: every variant (recipes/testbed/, but the
    specialists it fuses) trains 36 steps of 8 instructions (3 epochs of 96; issue 25's
    steps-matched control)."""
    from profuser.estimate import estimate_plan
    from profuser.pipeline import Runner, Runtime
    from profuser.plugins import get_engine
    from profuser.recipe import load_recipe

    testbed = Path(__file__).resolve().parent.parent / "recipes" / "testbed"
    engine = get_engine()
    paths = sorted(p for p in testbed.rglob("*.yaml") if "specialists" not in p.parts)
    assert len(paths) >= 11
    steps = {}
    for path in paths:
        recipe = load_recipe(path, registry=engine.registry)
        plan = estimate_plan(Runner(recipe, engine, Runtime(runs_dir=tmp_path, progress=False)))
        [train] = [s for s in plan["stages"] if s["kind"] == "train" and ":" not in s["id"]]
        steps[path.relative_to(testbed).as_posix()] = train["optimizer_steps"]
    assert steps == dict.fromkeys(steps, 36), steps
