"""Issue 23 item 2: every built example carries its statistics (chosen source, response length,
the teacher's mean entropy and top-1 probability, the selection's scores), computed once by the
build stage, and curricula see them as ``ExampleStats``; the teacher-entropy curriculum of
docs/plugins.md runs as written."""

from __future__ import annotations

import json
import math
import re
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_align_build import RECORDS, examples_table, run_align, run_build, write_store
from test_trainer import write_examples

from profuser.components import ExampleStats, Phase, PhasePart
from profuser.data import write_records
from profuser.plugins import Engine
from profuser.recipe import ModelSpec
from profuser.training.data import ExampleSet, plan_phases

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
SCORES = {r.id: {"gemma": 10.0 + j, "llama": 20.0 - j} for j, r in enumerate(RECORDS)}
RM_SCORES = {r.id: {"strong": {"gemma": 0.5 * j, "llama": 1.0}, "weak": {"gemma": 2.0, "llama": -1.0}}
             for j, r in enumerate(RECORDS)}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama_dir, tiny_gemma_dir):
    """Training-mode examples built from a selection with evaluator and reward-model scores (once:
    the tests only read them)."""
    tmp = tmp_path_factory.mktemp("stats")
    setup = {"tmp": tmp, "engine": Engine(entrypoints=False), "data": tmp / "data", "select": tmp / "select",
             "specs": {"llama": ModelSpec(ref=str(tiny_llama_dir)).identity(),
                       "gemma": ModelSpec(ref=str(tiny_gemma_dir)).identity()}}
    setup["data"].mkdir()
    setup["select"].mkdir()
    write_records(setup["data"] / "train.parquet", RECORDS)
    ids = [r.id for r in RECORDS]
    chosen = {r.id: ("llama" if j % 2 else "gemma") for j, r in enumerate(RECORDS)}
    pq.write_table(pa.table({"id": ids, "chosen": [chosen[i] for i in ids],
                             "scores": [json.dumps(SCORES[i]) for i in ids], "detail": ["{}"] * len(ids),
                             "rm_scores": [json.dumps(RM_SCORES[i]) for i in ids]}),
                   setup["select"] / "selection.parquet")
    stores = {s: write_store(setup["tmp"] / f"logits-{s}", setup["specs"][s], RECORDS, seed=i)
              for i, s in enumerate(("gemma", "llama"))}
    aligned = {s: run_align(setup, s, stores[s])[0] for s in stores}
    out, _ = run_build(setup, aligned)
    return {"out": out, "chosen": chosen}


def reference_stats(logits: list[list[float]], mask: list[bool]) -> tuple[float, float]:
    """Mean entropy and top-1 probability of softmax over each masked row's finite slots (torch)."""
    rows = torch.tensor(logits, dtype=torch.float64)[torch.tensor(mask, dtype=torch.bool)]
    p = torch.softmax(rows, dim=-1)  # -inf slots get 0
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return entropy.mean().item(), p.max(-1).values.mean().item()


def test_build_writes_each_examples_statistics(built):
    table = examples_table(built["out"]).to_pylist()
    assert [e["id"] for e in table] == [r.id for r in RECORDS]
    entropies = []
    for example in table:
        assert example["source"] == built["chosen"][example["id"]]
        assert example["response_length"] == sum(label != -100 for label in example["labels"])
        entropy, top1 = reference_stats(example["teacher_logits"], example["teacher_mask"])
        assert example["teacher_entropy"] == pytest.approx(entropy, rel=1e-5)
        assert example["teacher_top1"] == pytest.approx(top1, rel=1e-5)
        assert 0 < example["teacher_top1"] <= 1 and example["teacher_entropy"] >= 0
        assert json.loads(example["scores"]) == SCORES[example["id"]]
        assert list(json.loads(example["rm_scores"])) == ["strong", "weak"]  # as stored: strongest first
        entropies.append(example["teacher_entropy"])
    assert len(set(entropies)) == len(entropies)  # seeded logits: the examples differ


def test_curricula_see_the_statistics_per_id_and_per_unit(built):
    data = ExampleSet.load({"training": built["out"] / "examples.arrow"}, max_length=128)
    table = {e["id"]: e for e in examples_table(built["out"]).to_pylist()}
    given = data.curriculum_input(batch_size=2)
    assert set(given.stats) == set(table)
    for i, by_mode in given.stats.items():
        stats = by_mode["training"]
        assert isinstance(stats, ExampleStats) and list(by_mode) == ["training"]
        assert stats.source == table[i]["source"] and stats.response_length == table[i]["response_length"]
        assert stats.teacher_entropy == pytest.approx(table[i]["teacher_entropy"])
        assert stats.scores == SCORES[i] and stats.rm_scores == RM_SCORES[i]
    [plan] = plan_phases([Phase("all", 1.0, [PhasePart("training", ids=["e", "a", "c"])])], data, 2)
    assert [s.source for s in plan.examples.stats] == [table[i]["source"] for i in plan.examples.ids]
    assert [s.teacher_top1 for s in plan.examples.stats] == pytest.approx([table[i]["teacher_top1"] for i in plan.examples.ids])


def test_a_file_without_statistics_gives_what_its_labels_say(tmp_path):
    path = write_examples(tmp_path / "t.parquet", "training", 3, seed=5, prefix="t")
    data = ExampleSet.load({"training": path}, max_length=64)
    stats = data.curriculum_input().stats
    for row in pq.read_table(path).to_pylist():
        s = stats[row["id"]]["training"]
        assert s.response_length == sum(label != -100 for label in row["labels"])
        assert math.isnan(s.teacher_entropy) and math.isnan(s.teacher_top1)
        assert (s.source, s.scores, s.rm_scores) == ("", {}, {})


def doc_plugin() -> types.ModuleType:
    """The python block under docs/plugins.md's 'Per-example statistics' heading, as a module."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("### Per-example statistics: a curriculum by teacher entropy", 1)[1].split("\n### ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    module = types.ModuleType("confident_first_doc")
    exec(compile(code, str(DOC), "exec"), module.__dict__)  # noqa: S102  (our own docs)
    return module


def test_the_documented_entropy_curriculum_orders_by_the_teachers_entropy(built):
    engine = Engine(entrypoints=False, extra_plugins=[("confident-first", doc_plugin())])
    curriculum = engine.registry.build("curricula", "confident_first", {"epochs": 2})
    data = ExampleSet.load({"training": built["out"] / "examples.arrow"}, max_length=128)
    entropy = {e["id"]: e["teacher_entropy"] for e in examples_table(built["out"]).to_pylist()}
    phases = curriculum.phases(data.curriculum_input(batch_size=2))
    median = float(np.median(list(entropy.values())))
    assert [p.name for p in phases] == ["confident", "all"]
    assert sorted(phases[0].parts[0].ids) == sorted(i for i, h in entropy.items() if h <= median)
    for plan in plan_phases(phases, data, 2):
        rows, _ = plan.order(seed=0, global_batch=2, curriculum=curriculum)
        drawn = [data.example_id(r) for r in rows]
        ranked = sorted(plan.examples.ids, key=lambda i: entropy[i])  # most confident teacher first
        assert drawn[: len(ranked)] == ranked
        assert drawn[len(ranked): 2 * len(ranked)] == ranked  # the second epoch: the same order
