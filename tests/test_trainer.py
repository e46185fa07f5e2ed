"""The training loop on a tiny random Llama: data, phases, loss going down, metrics, card, resume,
and the train stage."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pyarrow import ipc

from profuser.components import Phase, PhasePart
from profuser.errors import ProfuserError
from profuser.plugins import Engine
from profuser.recipe import TrainSpec
from profuser.training import train
from profuser.training.data import ExampleSet, plan_phases

SCHEMA = pa.schema([
    ("id", pa.string()), ("mode", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("teacher_ids", pa.list_(pa.list_(pa.int32()))), ("teacher_logits", pa.list_(pa.list_(pa.float32()))),
    ("teacher_mask", pa.list_(pa.bool_())), ("gt_length", pa.int32()),
])


def write_examples(path: Path, mode: str, n: int, *, vocab: int = 400, seed: int = 0, k: int = 3, prompt: int = 4,
                   lengths=(8, 16), prefix: str = "ex") -> Path:
    """examples.parquet as the build stage writes it (docs/architecture.md): the teacher at position t
    ranks the label token y_t first, then k-2 random ids, and leaves the last slot unused (-inf)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(*lengths))
        ids = rng.integers(5, vocab, length)
        teacher_ids = np.concatenate([ids[:, None], rng.integers(5, vocab, (length, k - 1))], axis=1)
        teacher_logits = np.stack([np.full(length, 4.0), *rng.normal(size=(k - 2, length)), np.full(length, -np.inf)], 1)
        rows.append({
            "id": f"{prefix}{i}", "mode": mode, "input_ids": ids.tolist(),
            "labels": [-100] * prompt + ids[prompt:].tolist(),
            "teacher_ids": teacher_ids.tolist(), "teacher_logits": teacher_logits.astype(np.float32).tolist(),
            "teacher_mask": [t >= prompt for t in range(length)], "gt_length": length - prompt,
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def small_spec(**kw) -> TrainSpec:
    return TrainSpec(**{"lr": 1e-2, "batch_size": 4, "micro_batch_size": 2, "warmup_ratio": 0.1, "checkpoint_every": 2, **kw})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- data -----------------------------------------------------------------------------------------


def test_collate_pads_truncates_and_keeps_the_requested_order(tmp_path):
    paths = {"inference": write_examples(tmp_path / "i.parquet", "inference", 3, seed=3, prefix="i", k=4),
             "training": write_examples(tmp_path / "t.parquet", "training", 3, seed=4, prefix="t")}
    data = ExampleSet.load(paths, max_length=12)
    rows = np.array([data.offsets["training"] + 2, 0, data.offsets["training"]])
    batch = data.collate(rows, np.array([1.0, 0.1, 1.0]), pad_id=0)
    table = pq.read_table(paths["training"]).to_pylist()
    first_inference = pq.read_table(paths["inference"]).to_pylist()[0]
    b, t = batch["input_ids"].shape
    assert batch["ids"] == ["t2", "i0", "t0"] and batch["modes"] == ["training", "inference", "training"]
    assert (b, t) == (3, min(12, max(len(r["input_ids"]) for r in (table[2], first_inference, table[0]))))
    assert batch["teacher_ids"].shape == (3, t, 4) and batch["teacher_logits"].dtype == torch.float32
    n = min(len(table[2]["input_ids"]), 12)
    assert batch["input_ids"][0, :n].tolist() == table[2]["input_ids"][:n]
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (t - n)
    assert (batch["labels"][0, n:] == -100).all() and not batch["teacher_mask"][0, n:].any()
    # a row with k = 3 in a batch with k = 4: the extra slot is unused (-inf), never a real id's logit
    assert torch.isinf(batch["teacher_logits"][0, :n, 2:]).all() and batch["teacher_logits"][0, 0, 0] == 4.0
    assert batch["weight"].tolist() == pytest.approx([1.0, 0.1, 1.0])


def test_examples_without_a_label_inside_max_length_are_skipped(tmp_path):
    path = write_examples(tmp_path / "t.parquet", "training", 4, prompt=6, lengths=(8, 9))
    assert len(ExampleSet.load({"training": path}, max_length=7).rows("training")) == 4
    assert len(ExampleSet.load({"training": path}, max_length=6).rows("training")) == 0


def test_phase_order_is_seeded_per_phase_and_epoch(examples):
    data = ExampleSet.load(examples, max_length=64)
    phases = [Phase("one", 2.5, [PhasePart("inference", 1.0)]), Phase("two", 1.0, [PhasePart("training", 0.5, ["ex1", "ex3"])])]
    plans = plan_phases(phases, data, global_batch=3)
    assert [(p.samples, p.steps) for p in plans] == [(20, 7), (2, 1)]
    rows, _ = plans[0].order(seed=7, global_batch=3)
    again, _ = plans[0].order(seed=7, global_batch=3)
    assert len(rows) == 21 and (rows == again).all()
    assert sorted(rows[:8]) == sorted(rows[8:16]) == list(range(8))  # each epoch a permutation
    assert (rows[:8] != rows[8:16]).any()  # a fresh one per epoch
    assert (rows[20:] == rows[:1]).all()  # the last batch filled up from the start
    assert (plans[0].order(seed=8, global_batch=3)[0] != rows).any()
    rows2, weights2 = plans[1].order(seed=7, global_batch=3)
    assert {data.example_id(r) for r in rows2} <= {"ex1", "ex3"} and (weights2 == 0.5).all()


def test_a_mixed_phase_draws_instructions_with_both_modes_in_one_step(tmp_path):
    # ex0-ex5 in both modes, ex6 and ex7 in training mode only: 8 instructions, 14 examples
    paths = {"inference": write_examples(tmp_path / "i.parquet", "inference", 6, seed=5),
             "training": write_examples(tmp_path / "t.parquet", "training", 8, seed=6)}
    data = ExampleSet.load(paths, max_length=64)
    parts = [PhasePart("inference", 0.1), PhasePart("training", 1.0)]
    [plan] = plan_phases([Phase("co", 3.0, parts)], data, global_batch=4)
    assert (plan.units, plan.samples, plan.steps, len(plan.rows)) == (8, 24, 6, 14)  # epochs count instructions
    assert plan.examples.ids == [f"ex{i}" for i in range(8)] and plan.examples.modes == ["inference"] * 6 + ["training"] * 2
    draws = plan.draws(seed=1, global_batch=4)
    assert len(draws) == 24 and sorted(draws[:8]) == sorted(draws[8:16]) == list(range(8))
    for step in range(6):
        rows, weights = plan.expand(draws[step * 4:(step + 1) * 4])
        ids, modes, _ = data.describe(rows)
        # each instruction's examples side by side, the inference one (w1) first; ex6, ex7 alone
        by_id = {i: [m for j, m in zip(ids, modes) if j == i] for i in dict.fromkeys(ids)}
        assert len(by_id) == 4 and all(m == (["training"] if i in ("ex6", "ex7") else ["inference", "training"])
                                       for i, m in by_id.items())
        assert weights.tolist() == pytest.approx([0.1 if m == "inference" else 1.0 for m in modes])
    flat, _ = plan.order(seed=1, global_batch=4)
    assert (flat == plan.expand(draws)[0]).all()
    # draws: examples, the old per-mode scheduling: every example on its own, epochs over all 14
    [old] = plan_phases([Phase("co", 3.0, parts, draws="examples")], data, global_batch=4)
    assert (old.units, old.samples, old.steps) == (14, 42, 11) and len(old.examples.ids) == 14
    rows, _ = old.order(seed=1, global_batch=4)
    assert (rows == old.rows[np.resize(np.concatenate([np.random.default_rng([1, 0, e]).permutation(14)
                                                        for e in range(3)]), 44)]).all()
    with pytest.raises(ProfuserError, match="phase 'co': draws 'rows'"):
        plan_phases([Phase("co", 1.0, parts, draws="rows")], data, global_batch=4)


def test_micro_batches_split_a_step_of_instructions(tmp_path, tiny_llama_dir, examples, registry):
    """Accumulation over 1, 2 or 4 micro-batches: the same steps, the same examples per step (each
    instruction's two modes in it), the same Eq. 5 loss and gradient norm."""
    runs = []
    for micro in (4, 2, 1):
        seen: dict = {}
        out = tmp_path / str(micro)
        train(str(tiny_llama_dir), examples, registry.build("losses", "fuse_kl"),
              registry.build("curricula", "simultaneous", {"epochs": 2}), small_spec(micro_batch_size=micro), out,
              device="cpu", on_batch=lambda step, ids, seen=seen: seen.setdefault(step, ids))
        assert len(seen) == 4 and all(len(ids) == 8 and sorted(set(ids)) == sorted(ids[0::2]) for ids in seen.values())
        runs.append((seen, [v for m in read_metrics(out) for v in (m["loss"], m["loss/kl"], m["grad_norm"])]))
    assert runs[0][0] == runs[1][0] == runs[2][0]
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-4) and runs[0][1] == pytest.approx(runs[2][1], rel=1e-4)


# --- the loop -------------------------------------------------------------------------------------


def eval_loss(model_dir, examples, registry) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    data = ExampleSet.load(examples, max_length=64)
    rows = np.arange(len(data))
    batch = data.collate(rows, np.ones(len(rows)), pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [b, T, V]
        return registry.build("losses", "fuse_kl")(logits, batch, beta=0.5)[0].item()


def test_training_lowers_the_loss_and_writes_model_metrics_tb_and_card(tmp_path, tiny_llama_dir, examples, registry):
    curriculum = registry.build("curricula", "progressive", {"first_epochs": 2, "second_epochs": 2})
    logged = []
    card = {"title": "test card", "recipe": "name: unit\ncurriculum: progressive\n", "lineage": {"target": "tiny", "sources": ["a", "b"]}}
    summary = train(str(tiny_llama_dir), examples, registry.build("losses", "fuse_kl"), curriculum, small_spec(), tmp_path,
                    device="cpu", card=card, callbacks=[lambda step, m: logged.append((step, m))])
    before, after = eval_loss(tiny_llama_dir, examples, registry), eval_loss(tmp_path / "model", examples, registry)
    assert after < before - 0.5, (before, after)

    # phases: 8 inference examples x 2 epochs / 4 = 4 steps; co-fusion: 8 instructions (16 rows, both
    # modes of each in the same step) x 2 / 4 = 4 steps
    assert [(p["name"], p["steps"], p["beta"]) for p in summary["phases"]] == [("inference", 4, 0.1), ("co-fusion", 4, 0.5)]
    assert [(p["draws"], p["units"], p["examples"]) for p in summary["phases"]] == [("instructions", 8, 8), ("instructions", 8, 16)]
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 9)) and [s for s, _ in logged] == list(range(1, 9))
    assert [m["phase"] for m in metrics] == ["inference"] * 4 + ["co-fusion"] * 4
    assert [m["loss/beta"] for m in metrics] == [0.1] * 4 + [0.5] * 4  # the phase's beta reached the loss
    assert all({"loss", "loss/ce", "loss/kl", "lr", "grad_norm", "tokens_per_s"} <= m.keys() for m in metrics)
    # one warm-up + cosine schedule across both phases: 0 at step 1, peak after warm-up, then down
    lrs = [m["lr"] for m in metrics]  # warm-up: ceil(0.1 * 8) = 1 step
    assert lrs[:2] == pytest.approx([0.0, 1e-2]) and all(a > b for a, b in itertools.pairwise(lrs[1:])) and lrs[-1] < 2e-3
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not (tmp_path / "checkpoints").exists()
    readme = (tmp_path / "model" / "README.md").read_text()
    assert "# test card" in readme and "curriculum: progressive" in readme and "- b" in readme and "| co-fusion | 2 | 0.5 | 16 | 4 |" in readme
    assert (tmp_path / "model" / "tokenizer.json").is_file()


def test_batch_size_must_fill_whole_micro_batches(tmp_path, tiny_llama_dir, examples, registry):
    with pytest.raises(ProfuserError, match="multiple of micro_batch_size"):
        train(str(tiny_llama_dir), examples, registry.build("losses", "sft"), registry.build("curricula", "sft_only"),
              small_spec(batch_size=6, micro_batch_size=4), tmp_path, device="cpu")


def test_gradient_checkpointing_recomputes_without_changing_the_result(tmp_path, tiny_llama_dir, examples, registry):
    runs = []
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        train(str(tiny_llama_dir), {"training": examples["training"]}, registry.build("losses", "sft"),
              registry.build("curricula", "sft_only", {"epochs": 1}), small_spec(gradient_checkpointing=checkpointing), out,
              device="cpu")
        runs.append([m["loss"] for m in read_metrics(out)])
        assert json.loads((out / "model" / "config.json").read_text())["use_cache"] is True  # restored for inference
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_the_loss_is_a_mean_over_the_global_batch_tokens_however_it_is_split(tmp_path, tiny_llama_dir, examples, registry):
    # examples of 4-11 labelled tokens: a mean of micro-batch means would weight short ones up
    runs = []
    for micro in (1, 2, 4):
        out = tmp_path / str(micro)
        train(str(tiny_llama_dir), examples, registry.build("losses", "fuse_kl"), registry.build("curricula", "training_only", {"epochs": 1}),
              small_spec(micro_batch_size=micro), out, device="cpu")
        runs.append([v for m in read_metrics(out) for v in (m["loss"], m["loss/kl"], m["grad_norm"])])
    assert runs[0] == pytest.approx(runs[1], rel=1e-4) and runs[0] == pytest.approx(runs[2], rel=1e-4)


def test_clipping_follows_max_grad_norm(tmp_path, tiny_llama_dir, examples, registry):
    finals = {}
    for norm in (None, 1e-3):
        out = tmp_path / str(norm)
        train(str(tiny_llama_dir), {"training": examples["training"]}, registry.build("losses", "sft"),
              registry.build("curricula", "sft_only", {"epochs": 2}), small_spec(max_grad_norm=norm, warmup_ratio=0), out, device="cpu")
        finals[norm] = read_metrics(out)
    assert all(m["grad_norm"] > 1e-3 for m in finals[None])  # not clipped, but measured (the guard reads it)
    assert all(m["grad_norm"] > 1e-3 for m in finals[1e-3])  # the pre-clip norm is reported
    # tiny steps barely move the model: its later losses stay near the start, unlike unclipped steps
    assert finals[1e-3][-1]["loss"] > finals[None][-1]["loss"]


class Killed(Exception):
    pass


def test_resume_after_a_kill_continues_at_the_same_step_with_the_same_data(tmp_path, tiny_llama_dir, examples, registry):
    loss, spec = registry.build("losses", "fuse_kl"), small_spec(checkpoint_every=3)

    def run(out, kill_at=None):
        seen = {}

        def on_batch(step, ids):
            seen[step] = ids

        def kill(step, metrics):
            if step == kill_at:
                raise Killed
        summary = train(str(tiny_llama_dir), examples, loss, registry.build("curricula", "progressive"), spec, out,
                        device="cpu", on_batch=on_batch, callbacks=[kill], keep_checkpoints=True)
        return seen, summary

    reference, _ = run(tmp_path / "straight")
    with pytest.raises(Killed):
        run(tmp_path / "killed", kill_at=5)  # phase 1 = steps 1-2, phase 2 = 3-6; checkpoints at 2 (phase end), 3, 6
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step-00000003"]
    resumed, summary = run(tmp_path / "killed")
    assert summary["resumed_from"] == 3 and min(resumed) == 4
    assert {s: reference[s] for s in resumed} == resumed  # same examples at the same steps
    straight, killed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [m["step"] for m in killed] == list(range(1, 7))  # the steps after the checkpoint were not logged twice
    for a, b in zip(straight, killed):
        assert (a["phase"], a["lr"]) == (b["phase"], b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "straight" / "model" / "model.safetensors"), load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --- the stage --------------------------------------------------------------------------------------


def test_train_stage_reads_builds_and_target_rewards_and_logs_through_the_hooks(tmp_path, tiny_llama_dir, examples):
    from profuser import hookimpl
    from profuser.pipeline import Runtime, Stage, StageContext
    from profuser.recipe import ComponentRef, DataSpec, ModelSpec, Recipe
    from profuser.stages import train as train_stage

    logged = []

    class Observer:
        @hookimpl
        def profuser_metrics_logged(self, stage_id, step, metrics):
            logged.append((stage_id, step, metrics["phase"]))

    engine = Engine(entrypoints=False, extra_plugins=[("observer", Observer())])
    inputs = {}
    for mode, path in examples.items():
        inputs[f"build/{mode}"] = tmp_path / "store" / "build" / f"key-{mode}"
        inputs[f"build/{mode}"].mkdir(parents=True)
        table = pq.read_table(path)  # as the build stage writes it: Arrow IPC, one record batch per example
        with ipc.new_file(str(inputs[f"build/{mode}"] / "examples.arrow"), table.schema) as sink:
            for batch in table.to_batches(max_chunksize=1):
                sink.write_batch(batch)
    inputs["select/inference"] = tmp_path / "store" / "select" / "key-select"
    inputs["select/inference"].mkdir(parents=True)
    # the target's own score (lower = harder): ex0..ex3 score high (easy), ex4..ex7 low (hard)
    scores = [json.dumps({"tiny": 1.0 if i < 4 else -1.0, "other": 0.0}) for i in range(8)]
    pq.write_table(pa.table({"id": [f"ex{i}" for i in range(8)], "chosen": ["other"] * 8, "scores": scores, "detail": ["{}"] * 8}),
                   inputs["select/inference"] / "selection.parquet")

    target = ModelSpec(ref=str(tiny_llama_dir), label="tiny")
    recipe = Recipe(name="unit", target=target, sources=[target, ModelSpec(ref="other")], data=DataSpec(source=ComponentRef(name="file")),
                    curriculum=ComponentRef(name="rm_split"), train=small_spec(micro_batch_size=4))
    config = {"target": target.identity(), "target_key": "tiny", "loss": {"name": "fuse_kl", "params": {}},
              "curriculum": {"name": "rm_split", "params": {"first_epochs": 1, "second_epochs": 1}},
              "train": recipe.train.model_dump(), "recipe_name": "unit", "sources": ["tiny", "other"],
              "card_recipe": "name: unit\ncurriculum: rm_split\n"}
    out = tmp_path / "store" / "train" / "key-train.partial"
    out.mkdir(parents=True)
    ctx = StageContext(stage=Stage("train", "train", config, {k: k for k in inputs}), inputs=inputs, out=out,
                       runtime=Runtime(runs_dir=tmp_path, device="cpu", progress=False), engine=engine)
    metrics = train_stage.run(ctx)

    assert [p["name"] for p in metrics["phases"]] == ["easy/inference", "easy/co-fusion", "hard/inference", "hard/co-fusion"]
    assert [p["examples"] for p in metrics["phases"]] == [4, 8, 4, 8]
    assert [s for _, s, _ in logged] == list(range(1, metrics["steps"] + 1)) and logged[0][0] == "train"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "model", "summary.json", "tb"]
    readme = (out / "model" / "README.md").read_text()
    assert "key-select" in readme and "key-train" in readme and "name: unit" in readme and "rm_split" in readme


def test_target_reward_is_none_when_the_target_was_not_a_candidate(tmp_path):
    from profuser.stages.train import read_target_reward

    path = tmp_path / "selection.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "chosen": ["x", "y"], "scores": ['{"x": 1, "y": 0}', '{"x": 0, "y": 2.5}']}), path)
    assert read_target_reward(path, "t") is None
    assert read_target_reward(path, "y") == {"a": 0.0, "b": 2.5}


def test_a_kill_after_the_last_step_resumes_into_saving_and_other_batches_are_refused(tmp_path, tiny_llama_dir, examples, registry):
    def run(spec, kill_at=None):
        def kill(step, metrics):
            if step == kill_at:
                raise Killed
        return train(str(tiny_llama_dir), {"training": examples["training"]}, registry.build("losses", "sft"),
                     registry.build("curricula", "sft_only", {"epochs": 1}), spec, tmp_path, device="cpu", callbacks=[kill])

    with pytest.raises(Killed):
        run(small_spec(), kill_at=2)  # the phase-end checkpoint is written before the callbacks run
    assert not (tmp_path / "model").exists()
    with pytest.raises(ProfuserError, match="delete it to start over"):
        run(small_spec(batch_size=8))
    summary = run(small_spec())
    assert summary["resumed_from"] == summary["steps"] == 2
    assert summary["final_loss"] == read_metrics(tmp_path)[-1]["loss"] and (tmp_path / "model" / "model.safetensors").is_file()


def _as_ipc(table: pa.Table, path: Path, sparse: bool) -> Path:
    """``table`` as the build stage writes it (Arrow IPC, one record batch per example), with the
    teacher rows at labelled positions only when ``sparse``."""
    if sparse:
        rows = []
        for r in table.to_pylist():
            keep = [t for t, label in enumerate(r["labels"]) if label != -100]
            rows.append({**r, **{c: [r[c][t] for t in keep] for c in ("teacher_ids", "teacher_logits", "teacher_mask")}})
        table = pa.Table.from_pylist(rows, schema=table.schema)
    with ipc.new_file(str(path), table.schema) as sink:
        for batch in table.to_batches(max_chunksize=1):
            sink.write_batch(batch)
    return path


def test_examples_read_from_ipc_per_record_batch_with_sparse_teacher_rows_collate_alike(tmp_path):
    rows_ = pq.read_table(write_examples(tmp_path / "raw.parquet", "training", 6, seed=5, prompt=3)).to_pylist()
    for r in rows_:  # empty teacher rows on the prompt, as build version 1 wrote them
        for t, label in enumerate(r["labels"]):
            if label == -100:
                r["teacher_ids"][t], r["teacher_logits"][t] = [0] * 3, [-np.inf] * 3
    table = pa.Table.from_pylist(rows_, schema=SCHEMA)
    pq.write_table(table, parquet := tmp_path / "t.parquet")
    files = {"parquet": parquet, "dense": _as_ipc(table, tmp_path / "dense.arrow", sparse=False),
             "sparse": _as_ipc(table, tmp_path / "sparse.arrow", sparse=True)}
    sets = {name: ExampleSet.load({"training": path}, max_length=10) for name, path in files.items()}
    assert sets["sparse"].files["training"].starts.tolist() == list(range(7))  # a chunk per example
    rows = np.array([5, 0, 3, 3])
    batches = {name: data.collate(rows, np.ones(4), pad_id=0) for name, data in sets.items()}
    for name in ("dense", "sparse"):
        for key, value in batches["parquet"].items():
            assert (torch.equal(value, batches[name][key]) if isinstance(value, torch.Tensor) else value == batches[name][key]), (name, key)
    assert len(sets["sparse"].files["training"]._cache) <= 3  # only the chunks of the rows asked for were read
    assert sets["sparse"].curriculum_input().gt_length == sets["parquet"].curriculum_input().gt_length


def test_a_teacher_row_count_matching_neither_layout_is_one_readable_error(tmp_path):
    from profuser.errors import DataError

    table = pq.read_table(write_examples(tmp_path / "t.parquet", "training", 2, prompt=3)).to_pylist()
    table[1]["teacher_mask"] = table[1]["teacher_mask"][:-1]
    bad = pa.Table.from_pylist(table, schema=SCHEMA)
    data = ExampleSet.load({"training": _as_ipc(bad, tmp_path / "bad.arrow", sparse=False)}, max_length=32)
    data.collate(np.array([0]), np.ones(1), pad_id=0)  # the intact example
    with pytest.raises(DataError, match="example 'ex1'.*teacher rows"):
        data.collate(np.array([0, 1]), np.ones(2), pad_id=0)
