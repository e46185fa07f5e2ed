"""The plugin's tests: each component alone, then a whole run on profuser's tiny models with two
samples per prompt.

Run them with the package installed (``pip install -e .``; its entry point registers it):
``pytest tests``.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from typer.testing import CliRunner

from profuser.cli import app
from profuser.components import Candidates, Phase, PhaseExamples, PhasePart
from profuser.plugins import Engine
from profuser.testing import tiny_recipe


def test_the_sample_containing_the_answer_wins():
    evaluator = Engine().registry.build("evaluators", "answer_aware")
    ex = Candidates(id="x", reference="... Answer: 42", meta={"answer": "42", "task": "arithmetic"},
                    responses={"a": "no idea", "b": "it is 7"},
                    samples={"a": ["no idea", "I think 42"], "b": ["it is 7", "42!"]})
    none = Candidates(id="y", reference="r", meta={}, responses={"a": "x", "b": "y"})
    first, second = evaluator.select([ex, none])
    assert (first.chosen, first.sample, first.scores) == ("a", 1, {"a": 1.0, "b": 1.0})
    assert (second.chosen, second.sample) == ("a", 0)


def test_each_batch_holds_examples_of_similar_length():
    curriculum = Engine().registry.build("curricula", "length_batches")
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    examples = PhaseExamples(phase=Phase("p", 1.0, [PhasePart("training")]), index=0, ids=[f"e{i}" for i in range(8)],
                             modes=["training"] * 8, weights=[1.0] * 8, gt_length=lengths, batch_size=4,
                             micro_batch_size=2, world_size=1)
    order = curriculum.order_examples(examples, np.random.default_rng(0), 0)
    assert sorted(order) == list(range(8))
    batches = [{lengths[j] for j in order[a:a + 4]} for a in (0, 4)]
    assert sorted(batches, key=min) == [{5, 6, 7, 8}, {50, 51, 52, 53}]


def test_the_loss_scales_each_example_by_its_mode():
    loss = Engine().registry.build("losses", "mode_scaled_kl", {"inference_scale": 0.0})
    assert loss.needs == {"mode"}
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16)
    batch = {"labels": torch.tensor([[-100, 3, 4, 5]] * 2), "teacher_ids": torch.randint(0, 16, (2, 4, 3)),
             "teacher_logits": torch.randn(2, 4, 3), "teacher_mask": torch.ones(2, 4, dtype=torch.bool),
             "weight": torch.ones(2), "mode": ["inference", "training"]}
    only_training = {**batch, "weight": torch.tensor([0.0, 1.0]), "mode": ["training", "training"]}
    assert loss(logits, batch, beta=0.5)[0].item() == loss(logits, only_training, beta=0.5)[0].item()


def test_a_tiny_recipe_runs_with_two_samples_per_prompt(tmp_path):
    recipe = tiny_recipe(tmp_path, {
        "inference_mode.generator.params.n": 2,
        "inference_mode.evaluator.name": "answer_aware",
        "curriculum.name": "length_batches",
        "loss.name": "mode_scaled_kl", "loss.params.inference_scale": 0.5,
    })
    result = CliRunner().invoke(app, ["run", str(recipe), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    selections = [pq.read_table(p) for p in Path(tmp_path / "runs" / "store" / "select").glob("*/selection.parquet")]
    [inference] = [t for t in selections if "sample" in t.column_names]  # n > 1: which sample won
    assert set(inference["sample"].to_pylist()) <= {0, 1}
    model = (tmp_path / "runs" / "runs" / "tiny" / "model").resolve()
    steps = [json.loads(line) for line in (model.parent / "metrics.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in steps if s["phase_step"] == 1] == ["inference", "co-fusion"]
    assert {s["loss/mode_scale"] for s in steps if s["phase"] == "inference"} == {0.5}
