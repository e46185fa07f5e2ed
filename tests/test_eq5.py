"""Eq. 5 (§3.3): a co-fusion step's loss is w1 · (token mean over its inference-mode tokens) + w2 ·
(token mean over its training-mode tokens), means over the whole global batch, whatever its split
into micro-batches and ranks, including micro-batches (and ranks) that hold one mode only.

The reference is computed by hand on the untrained model: each mode's examples of the step in one
batch, plain ``F.cross_entropy`` (``sft``), or the loss itself on that mode's examples alone (a
token mean over them by construction). The trainer runs at lr 1e-12, so both steps see the
initial model; its logged loss and pre-clip gradient norm, and (in process) the gradient that
reaches every example's logits, must equal the reference's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_distributed import BIN, CONFIGS, REPO, free_port
from test_trainer import read_metrics, write_examples

from profuser.components import Loss
from profuser.recipe import TrainSpec
from profuser.training import train
from profuser.training.data import IGNORE, ExampleSet, plan_phases

W = {"inference": 0.1, "training": 1.0}  # simultaneous's w1, w2
SPEC = {"batch_size": 4, "lr": 1e-12, "warmup_ratio": 0.0, "checkpoint_every": 10, "seed": 2}


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """8 instructions: ex0-ex3 with both modes' examples, ex4-ex7 with a training-mode one only."""
    root = tmp_path_factory.mktemp("eq5")
    return {"inference": write_examples(root / "inference.parquet", "inference", 4, seed=11, lengths=(6, 14)),
            "training": write_examples(root / "training.parquet", "training", 8, seed=12, lengths=(8, 22))}


def step_rows(examples, registry, world: int = 1) -> list[list[np.ndarray]]:
    """Per step, per rank: the rows the trainer draws (the same plan it makes)."""
    data = ExampleSet.load(examples, max_length=64)
    curriculum = registry.build("curricula", "simultaneous", {"epochs": 1})
    [plan] = plan_phases(curriculum.phases(data.curriculum_input()), data, SPEC["batch_size"])
    draws = plan.draws(SPEC["seed"], SPEC["batch_size"], curriculum)
    per_rank = SPEC["batch_size"] // world
    return [[plan.expand(draws[s * SPEC["batch_size"] + r * per_rank:][:per_rank])[0] for r in range(world)]
            for s in range(plan.steps)]


def hand_eq5(model_dir: Path, examples, rows: np.ndarray, loss: Loss | None = None):
    """(value, parameter gradient norm, {(id, mode): d value / d logits [L, V]}) of Eq. 5 on ``rows``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = ExampleSet.load(examples, max_length=64)
    total, logits_of = 0.0, {}
    for mode in ("inference", "training"):
        mine = np.array([r for r in rows if data.locate(int(r))[0] == mode], dtype=np.int64)
        if not len(mine):
            continue
        batch = data.collate(mine, np.ones(len(mine)), pad_id=0)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [b, T, V]
        logits.retain_grad()
        if loss is None:  # the token mean over this mode's labelled tokens, by hand
            mean = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                   ignore_index=IGNORE)
        else:  # the loss on this mode's examples alone is their token mean
            mean = loss(logits, batch, beta=0.5)[0]
        total = total + W[mode] * mean
        lengths = batch["attention_mask"].sum(1).tolist()
        logits_of.update({(i, mode): (logits, j, n) for j, (i, n) in enumerate(zip(batch["ids"], lengths))})
    total.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    grads = {key: logits.grad[j, :n].clone() for key, (logits, j, n) in logits_of.items()}
    return total.item(), norm, grads


class Capturing(Loss):
    """Wraps a loss: records each micro-batch's modes and the gradient that reaches its logits."""

    name = "capturing"
    needs = frozenset({"example_id", "mode"})

    def __init__(self, inner: Loss):
        super().__init__()
        self.inner, self.calls = inner, []

    def __call__(self, logits, batch, *, beta=None):
        call = {"ids": list(batch["example_id"]), "modes": list(batch["mode"]),
                "lengths": batch["attention_mask"].sum(1).tolist()}
        logits.register_hook(lambda g: call.__setitem__("grad", g.detach().clone()))
        self.calls.append(call)
        return self.inner(logits, batch, beta=beta)


@pytest.mark.parametrize("loss_name", ["sft", "fuse_kl"])
@pytest.mark.parametrize("micro", [4, 2, 1])  # one micro-batch per step; accumulation over 2 and 4
def test_one_process_and_accumulation_give_eq5_in_value_and_gradient(tmp_path, tiny_llama_dir, examples, registry,
                                                                     loss_name, micro):
    capturing = Capturing(registry.build("losses", loss_name))
    train(str(tiny_llama_dir), examples, capturing, registry.build("curricula", "simultaneous", {"epochs": 1}),
          TrainSpec(**SPEC, micro_batch_size=micro), tmp_path, device="cpu")
    metrics = read_metrics(tmp_path)
    steps = step_rows(examples, registry)
    assert len(metrics) == len(steps) == 2  # 8 instructions / 4 a step (12 examples)
    if micro < 4:  # the case Eq. 5 is about: a micro-batch of one mode, its mean not the step's
        assert any(len(set(c["modes"])) == 1 for c in capturing.calls)
    per_step = len(capturing.calls) // len(steps)
    for s, ([rows], m) in enumerate(zip(steps, metrics)):
        value, norm, grads = hand_eq5(tiny_llama_dir, examples, rows, None if loss_name == "sft" else registry.build("losses", loss_name))
        assert m["loss"] == pytest.approx(value, rel=1e-5) and m["grad_norm"] == pytest.approx(norm, rel=1e-4)
        seen = set()
        for call in capturing.calls[s * per_step:(s + 1) * per_step]:
            for j, (i, mode, n) in enumerate(zip(call["ids"], call["modes"], call["lengths"])):
                torch.testing.assert_close(call["grad"][j, :n], grads[(i, mode)], rtol=1e-4, atol=1e-9)
                seen.add((i, mode))
        assert seen == set(grads)  # every example of the step, each mode's example of an instruction


def test_two_ddp_ranks_give_eq5_with_a_rank_of_one_mode(tmp_path, tiny_llama_dir, examples, registry):
    steps = step_rows(examples, registry, world=2)
    data = ExampleSet.load(examples, max_length=64)
    modes = [{data.locate(int(r))[0] for r in rows} for ranks in steps for rows in ranks]
    assert {"training"} in modes  # some rank holds training-mode examples only in some step
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", str(CONFIGS / "ddp-cpu.yaml"),
                "--main_process_port", str(free_port())]
    fields = [f"{k}={v}" for k, v in {**SPEC, "micro_batch_size": 1}.items()]
    cmd = [*launcher, "-m", "profuser.training", "--model", str(tiny_llama_dir), "--out", str(tmp_path), "--device", "cpu",
           "--loss", "sft", "--curriculum", "simultaneous", "--curriculum-params", json.dumps({"epochs": 1}),
           "--log-batches", *[f"--examples={m}={p}" for m, p in examples.items()], *[a for f in fields for a in ("-t", f)]]
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["backend"] == "ddp" and summary["world_size"] == 2
    for rank in range(2):
        logged = [json.loads(line) for line in (tmp_path / "batches" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert [line["ids"] for line in logged] == [[data.example_id(r) for r in ranks[rank]] for ranks in steps]
    for ranks, m in zip(steps, read_metrics(tmp_path), strict=True):
        value, norm, _ = hand_eq5(tiny_llama_dir, examples, np.concatenate(ranks))
        assert m["loss"] == pytest.approx(value, rel=1e-5) and m["grad_norm"] == pytest.approx(norm, rel=1e-4)
