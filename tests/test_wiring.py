"""Wiring: a pipeline that runs but is wrong must fail here. The maths of each piece is pinned by
its own tests; these check that the pieces are connected as the method says — each mode's weight
reaches the loss on that mode's examples, the `select/training` stage reads each source's own
NLLs, and a tiny end-to-end run trains the way the recipe asks (loss falls within each phase,
the teacher is used, each phase's β and weights reach the loss, the model moves)."""

from __future__ import annotations

import json
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from profuser_plugins.losses.fuse_kl import FuseKL
from test_trainer import write_examples

from profuser import hookimpl
from profuser.components import Record
from profuser.data import write_records
from profuser.logits_store import LogitsWriter
from profuser.pipeline import Runner, StageContext, plan
from profuser.plugins import Engine
from profuser.recipe import TrainSpec, load_recipe
from profuser.runtime import Runtime
from profuser.stages import select
from profuser.training import train


class RecordingKL(FuseKL):
    """``fuse_kl`` that records what each call received: β, each row's weight and tokens, the parts."""

    name = "recording_kl"
    aliases = ()
    calls: ClassVar[list[dict]] = []

    def __call__(self, logits, batch, *, beta=None):
        loss, parts = super().__call__(logits, batch, beta=beta)
        mask = batch["attention_mask"].bool()
        RecordingKL.calls.append({
            "beta": beta, "weights": batch["weight"].tolist(), "parts": parts,
            "labelled": (batch["labels"][:, 1:] != -100).sum(1).tolist(),
            "rows": [tuple(ids[m].tolist()) for ids, m in zip(batch["input_ids"], mask)],
            "teacher": batch["teacher_mask"].any(dim=1).tolist(),
        })
        return loss, parts


class RecordingPlugin:
    @hookimpl
    def profuser_register_losses(self, register):
        register(RecordingKL)


@pytest.fixture(scope="module")
def engine():
    return Engine(entrypoints=False, extra_plugins=[("wiring", RecordingPlugin())])


@pytest.fixture
def recorded():
    RecordingKL.calls.clear()
    yield RecordingKL.calls
    RecordingKL.calls.clear()


# --- each mode's weight reaches the loss on that mode's examples ------------------------------


@pytest.fixture(scope="module")
def two_modes(tmp_path_factory):
    """Inference-mode examples i0..i5 and training-mode examples t0..t5."""
    root = tmp_path_factory.mktemp("modes")
    return {"inference": write_examples(root / "i.parquet", "inference", 6, seed=1, prefix="i"),
            "training": write_examples(root / "t.parquet", "training", 6, seed=2, prefix="t")}


def weights_by_phase_and_mode(tmp_path, model_dir, examples, engine, curriculum, params, recorded):
    """Train one pass and return {(phase index, mode): {weights the loss saw on that mode's rows}}."""
    batches: list[list[str]] = []
    spec = TrainSpec(lr=1e-3, batch_size=4, micro_batch_size=2, warmup_ratio=0, checkpoint_every=100)
    summary = train(str(model_dir), examples, engine.registry.build("losses", "recording_kl"),
                    engine.registry.build("curricula", curriculum, params), spec, tmp_path, device="cpu",
                    on_batch=lambda step, ids: batches.append(ids))
    # one process: a step's micro-batches are consecutive slices of the ids on_batch saw
    weights = [w for call in recorded for w in call["weights"]]
    labelled = [n for call in recorded for n in call["labelled"]]
    ids = [i for step in batches for i in step]
    assert len(weights) == len(ids)
    # undo the trainer's Eq. 5 factor N / N_mode (the step's labelled tokens over its mode's)
    start = 0
    for step in batches:
        mode_of = ["inference" if i.startswith("i") else "training" for i in step]
        counts = dict.fromkeys(mode_of, 0)
        for m, n in zip(mode_of, labelled[start:start + len(step)]):
            counts[m] += n
        for j, m in enumerate(mode_of, start):
            weights[j] *= counts[m] / sum(counts.values())
        start += len(step)
    bounds = np.cumsum([0] + [p["steps"] * spec.batch_size for p in summary["phases"]])
    seen: dict[tuple[int, str], set[float]] = defaultdict(set)
    for n, (example_id, weight) in enumerate(zip(ids, weights)):
        phase = int(np.searchsorted(bounds, n, side="right")) - 1
        seen[phase, "inference" if example_id.startswith("i") else "training"].add(round(weight, 6))
    return dict(seen)


def test_progressive_weighs_inference_w1_and_training_w2(tmp_path, tiny_llama_dir, two_modes, engine, recorded):
    seen = weights_by_phase_and_mode(tmp_path, tiny_llama_dir, two_modes, engine, "progressive",
                                     {"first_epochs": 1, "second_epochs": 1}, recorded)
    # phase 1: inference alone at weight 1; phase 2: inference w1 = 0.1, training w2 = 1 (Eq. 5)
    assert seen == {(0, "inference"): {1.0}, (1, "inference"): {0.1}, (1, "training"): {1.0}}


def test_swapped_weights_reach_the_loss_swapped(tmp_path, tiny_llama_dir, two_modes, engine, recorded):
    """The same check follows the params (it is not a constant 0.1 that happens to match), and
    reverse puts w1 on the training mode, which it fuses first."""
    seen = weights_by_phase_and_mode(tmp_path / "a", tiny_llama_dir, two_modes, engine, "progressive",
                                     {"first_epochs": 1, "second_epochs": 1, "w1": 1.0, "w2": 0.1}, recorded)
    assert seen[1, "inference"] == {1.0} and seen[1, "training"] == {0.1}
    recorded.clear()
    seen = weights_by_phase_and_mode(tmp_path / "b", tiny_llama_dir, two_modes, engine, "reverse",
                                     {"first_epochs": 1, "second_epochs": 1}, recorded)
    assert seen == {(0, "training"): {1.0}, (1, "training"): {0.1}, (1, "inference"): {1.0}}
    recorded.clear()
    seen = weights_by_phase_and_mode(tmp_path / "c", tiny_llama_dir, two_modes, engine, "simultaneous",
                                     {"epochs": 1}, recorded)
    assert seen == {(0, "inference"): {0.1}, (0, "training"): {1.0}}


# --- select/training reads each source's own NLLs -----------------------------------------------


def tiny_yaml(root: Path, llama: Path, gemma: Path, extra: str = "") -> Path:
    path = root / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""
        name: wiring
        target: {{ref: {llama}, label: llama}}
        sources:
          - {{ref: {llama}, label: llama}}
          - {{ref: {gemma}, label: gemma}}
        data:
          source: {{name: builtin_tasks, params: {{n: 12, seed: 0}}}}
          heldout: 2
        distill: {{top_k: 4, batch_size: 4, max_length: 384}}
        inference_mode:
          generator: {{name: hf, params: {{max_new_tokens: 12, batch_size: 4}}}}
          reward_models:
            - {{name: judge, label: judge-a, params: {{model: {llama}, rubric: "Q: {{instruction}} A: {{response}} Good?"}}}}
            - {{name: judge, label: judge-b, params: {{model: {llama}, rubric: "{{instruction}} -> {{response}} Correct?"}}}}
          evaluator: {{name: rm_vote, params: {{strongest: judge-b}}}}
        train: {{lr: 5.0e-3, batch_size: 2, micro_batch_size: 2, max_length: 384, scheduler: constant, warmup_ratio: 0}}
    """) + textwrap.dedent(extra))
    return path


def test_select_training_picks_the_source_whose_store_has_the_lowest_nll(tmp_path, tiny_llama_dir, tiny_gemma_dir, engine):
    """The planned stage's inputs, filled with constructed stores: llama's NLL is lowest on e0 and
    e2, gemma's on e1. A stage that mixed up which store is whose picks the wrong ones."""
    recipe = load_recipe(tiny_yaml(tmp_path, tiny_llama_dir, tiny_gemma_dir), registry=engine.registry)
    stage = next(s for s in plan(recipe, engine) if s.id == "select/training")
    assert stage.deps == {"data": "data", "logits/llama": "logits/training/llama", "logits/gemma": "logits/training/gemma"}
    responses = {"e0": "four", "e1": "eleven", "e2": "twenty"}
    nll = {"llama": {"e0": 1.0, "e1": 9.0, "e2": 2.0}, "gemma": {"e0": 3.0, "e1": 4.0, "e2": 2.5}}  # per token
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.parquet", [Record(i, "", f"q {i}", r) for i, r in responses.items()])
    inputs = {"data": data}
    for role, dep in stage.deps.items():
        if role == "data":
            continue
        source = dep.rsplit("/", 1)[1]
        with LogitsWriter(tmp_path / dep, 2, model=source) as writer:
            for example_id, response in responses.items():
                n = 2  # two tokens each, covering the whole response
                offsets = np.array([[0, 2], [2, len(response)]])
                writer.add(example_id, response, np.arange(n), offsets, np.full(n, nll[source][example_id]),
                           np.tile([0, 1], (n, 1)), np.zeros((n, 2)), np.zeros(n))
        inputs[role] = tmp_path / dep
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(stage=stage, inputs=inputs, out=out, runtime=Runtime(progress=False), engine=engine)
    metrics = select.run(ctx)
    table = pq.read_table(out / "selection.parquet").to_pydict()
    assert dict(zip(table["id"], table["chosen"])) == {"e0": "llama", "e1": "gemma", "e2": "llama"}
    assert json.loads(table["scores"][1]) == {"llama": 18.0, "gemma": 8.0}  # summed NLL (Eq. 1)
    assert metrics["win_share"] == pytest.approx({"llama": 2 / 3, "gemma": 1 / 3}) and metrics["truncated"] == 0


# --- a tiny end-to-end run trains the way the recipe asks ------------------------------------------


def built_input_ids(build_dir: Path) -> list[list[int]]:
    """``input_ids`` of a build stage's examples (Arrow IPC ``examples.arrow`` or ``examples.parquet``)."""
    arrow = build_dir / "examples.arrow"
    if not arrow.is_file():
        return pq.read_table(build_dir / "examples.parquet", columns=["input_ids"])["input_ids"].to_pylist()
    with pa.memory_map(str(arrow)) as source:
        try:
            table = pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # the stream format
            source.seek(0)
            table = pa.ipc.open_stream(source).read_all()
    return table["input_ids"].to_pylist()


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tiny_gemma_dir, engine, tmp_path_factory):
    """The whole pipeline up to train, with recognisable curriculum numbers and the recording loss."""
    root = tmp_path_factory.mktemp("wiring")
    path = tiny_yaml(root, tiny_llama_dir, tiny_gemma_dir, """
        loss: {name: recording_kl, params: {temperature: 2.0, top_p: 0.95}}
        curriculum:
          name: progressive
          params: {first_epochs: 2, second_epochs: 2, first_beta: 0.2, second_beta: 0.7, w1: 0.25, w2: 0.75}
    """)
    recipe = load_recipe(path, registry=engine.registry)
    RecordingKL.calls.clear()
    runtime = Runtime(runs_dir=root / "runs", device="cpu", progress=False, isolate_stages=False)
    results = {r.id: r for r in Runner(recipe, engine, runtime, until="train", echo=lambda line: None).run()}
    calls = list(RecordingKL.calls)
    RecordingKL.calls.clear()
    metrics = [json.loads(line) for line in (Path(results["train"].path) / "metrics.jsonl").read_text().splitlines()]
    modes = {}  # the trained rows' tokens -> their mode, from what the build stages wrote
    for mode in ("inference", "training"):
        for ids in built_input_ids(Path(results[f"build/{mode}"].path)):
            modes[tuple(ids)] = mode if tuple(ids) not in modes else "ambiguous"
    return {"results": results, "calls": calls, "metrics": metrics, "modes": modes, "target": tiny_llama_dir}


def test_the_loss_falls_within_each_phase(tiny_run):
    by_phase = defaultdict(list)
    for m in tiny_run["metrics"]:
        by_phase[m["phase"]].append(m["loss"])
    assert list(by_phase) == ["inference", "co-fusion"]
    for phase, losses in by_phase.items():
        half = len(losses) // 2  # each half is one epoch over the same examples
        first, second = np.mean(losses[:half]), np.mean(losses[half:])
        assert second < first, (phase, losses)


def test_each_phases_beta_and_weights_reach_the_loss(tiny_run):
    calls, modes = tiny_run["calls"], tiny_run["modes"]
    steps = {m["phase"]: m["phase_steps"] for m in tiny_run["metrics"]}
    phase_of_call = ["inference"] * steps["inference"] + ["co-fusion"] * steps["co-fusion"]  # one micro-batch per step
    assert len(calls) == len(phase_of_call)
    seen = defaultdict(set)
    for call, phase in zip(calls, phase_of_call):
        assert call["beta"] == {"inference": 0.2, "co-fusion": 0.7}[phase]
        assert call["parts"]["beta"] == call["beta"]
        mode_of = [modes.get(row, "unknown") for row in call["rows"]]
        counts = dict.fromkeys(mode_of, 0)  # a call is a whole step: undo the Eq. 5 factor N / N_mode
        for m, n in zip(mode_of, call["labelled"]):
            counts[m] += n
        for m, weight in zip(mode_of, call["weights"]):
            seen[phase, m].add(round(weight * counts[m] / sum(counts.values()), 6))
    assert dict(seen) == {("inference", "inference"): {1.0}, ("co-fusion", "inference"): {0.25},
                          ("co-fusion", "training"): {0.75}}
    assert [m["loss/beta"] for m in tiny_run["metrics"]] == [0.2] * steps["inference"] + [0.7] * steps["co-fusion"]


def test_the_teacher_is_used_wherever_it_exists(tiny_run):
    calls = tiny_run["calls"]
    assert all(any(call["teacher"]) for call in calls)  # every trained example carries a teacher
    assert all(call["parts"]["kl"] > 0 for call in calls)
    assert all(m["loss/kl"] > 0 for m in tiny_run["metrics"])


def test_the_fused_model_differs_from_its_target(tiny_run):
    from transformers import AutoModelForCausalLM

    fused = AutoModelForCausalLM.from_pretrained(Path(tiny_run["results"]["train"].path) / "model").state_dict()
    target = AutoModelForCausalLM.from_pretrained(tiny_run["target"]).state_dict()
    assert fused.keys() == target.keys()
    moved = [k for k in target if not torch.equal(fused[k], target[k])]
    assert len(moved) > len(target) // 2, f"only {len(moved)} of {len(target)} tensors changed"
