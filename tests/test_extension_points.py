"""Issue 13's extension points: a curriculum's in-phase order and per-example weights, a loss's
extra batch entries, and n candidates per source through the evaluators."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import torch
from test_trainer import small_spec, write_examples

from profuser import hookimpl
from profuser.components import Candidates, Curriculum, CurriculumInput, Loss, Phase, PhaseExamples, PhasePart
from profuser.errors import PluginError, ProfuserError
from profuser.losses import sft_loss
from profuser.plugins import Engine
from profuser.training import train
from profuser.training.data import ExampleSet, plan_phases


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    return {"inference": write_examples(root / "inference" / "examples.parquet", "inference", 8, seed=1, prefix="i"),
            "training": write_examples(root / "training" / "examples.parquet", "training", 8, seed=2, prefix="t")}


class ByLength(Curriculum):
    """One phase over both modes; each epoch in GT-length order (longest first), and the shortest
    half of the training examples weighted 3x."""

    name = "by_length"
    seen: ClassVar[list[PhaseExamples]] = []

    def phases(self, data: CurriculumInput) -> list[Phase]:
        ranked = sorted(data.ids, key=lambda i: (data.gt_length[i], i))
        short = {i: 3.0 for i in [i for i in ranked if i.startswith("t")][:4]}
        return [Phase("all", 2.0, [PhasePart("inference"), PhasePart("training", 0.5, example_weights=short)])]

    def order_examples(self, examples: PhaseExamples, rng, epoch):
        type(self).seen.append(examples)
        return sorted(range(len(examples.ids)), key=lambda j: (-examples.gt_length[j], examples.ids[j]))


def test_a_custom_order_is_honoured_exactly_and_sees_the_batching(examples):
    data = ExampleSet.load(examples, max_length=64)
    curriculum = ByLength()
    phases = curriculum.phases(data.curriculum_input(batch_size=4, micro_batch_size=2, world_size=2))
    [plan] = plan_phases(phases, data, 4, micro_batch_size=2, world_size=2)
    rows, weights = plan.order(seed=0, global_batch=4, curriculum=curriculum)
    seen = ByLength.seen[-1]
    assert (seen.batch_size, seen.micro_batch_size, seen.world_size, seen.phase.name) == (4, 2, 2, "all")
    expected = sorted(range(16), key=lambda j: (-seen.gt_length[j], seen.ids[j]))
    assert [data.example_id(r) for r in rows] == [seen.ids[j] for j in expected] * 2  # both epochs, that order
    assert seen.gt_length == [data.describe(np.array([r]))[2][0] for r in plan.rows]
    assert sorted(weights[:16].tolist()) == sorted(seen.weights) and {*seen.modes} == {"inference", "training"}


def test_the_default_order_is_the_old_seeded_permutation(examples):
    data = ExampleSet.load(examples, max_length=64)
    progressive = Engine(entrypoints=False).registry.build("curricula", "progressive")
    for plan in plan_phases(progressive.phases(data.curriculum_input()), data, 3):
        n = len(plan.rows)
        old = np.concatenate([np.random.default_rng([5, plan.index, e]).permutation(n) for e in range(-(-plan.samples // n))])
        old = np.resize(old[: plan.samples], plan.steps * 3)
        for curriculum in (None, progressive):
            rows, weights = plan.order(5, 3, curriculum)
            assert (rows == plan.rows[old]).all() and (weights == plan.weights[old]).all()


class Broken(ByLength):
    def order_examples(self, examples, rng, epoch):
        return [0] * len(examples.ids)


def test_an_order_that_is_not_a_permutation_is_one_line(examples):
    data = ExampleSet.load(examples, max_length=64)
    [plan] = plan_phases(Broken().phases(data.curriculum_input()), data, 4)
    with pytest.raises(ProfuserError) as err:
        plan.order(0, 4, Broken())
    assert err.value.lines() == [("curriculum by_length, phase 'all', epoch 0: order_examples() must return a "
                                  "permutation of range(16) (each row once), got 16 value(s), 1 distinct row(s)")]


def test_example_weights_multiply_the_part_weight_and_bad_ones_are_refused(examples):
    data = ExampleSet.load(examples, max_length=64)
    phase = Phase("p", 1.0, [PhasePart("training", 0.5, example_weights={"t1": 4.0, "t2": 0.0})])
    [plan] = plan_phases([phase], data, 4)
    by_id = dict(zip(plan.examples.ids, plan.weights.tolist()))
    assert by_id["t1"] == 2.0 and by_id["t2"] == 0.0 and by_id["t3"] == 0.5
    bad = Phase("p", 1.0, [PhasePart("training", 1.0, example_weights={"t1": float("nan")})])
    with pytest.raises(ProfuserError, match="example weight of 't1' is nan"):
        plan_phases([bad], data, 4)


class Recording(Loss):
    """SFT that records what each batch held."""

    name = "recording"
    needs = frozenset({"example_id", "mode"})
    batches: ClassVar[list[dict]] = []

    def __call__(self, logits, batch, *, beta=None):
        type(self).batches.append({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in batch.items()})
        return sft_loss(logits, batch)


def test_per_example_weights_and_needed_entries_reach_the_loss(tmp_path, tiny_llama_dir, examples):
    Recording.batches.clear()
    train(str(tiny_llama_dir), examples, Recording(), ByLength(), small_spec(), tmp_path, device="cpu")
    assert Recording.batches
    data = ByLength.seen[-1]
    for batch in Recording.batches:
        assert set(batch) >= {"example_id", "mode", "weight"} and "source" not in batch and "category" not in batch
        factor: dict[str, float] = {}  # Eq. 5: the trainer scales by N / N_mode, one factor per mode in a step
        for i, mode, w in zip(batch["example_id"], batch["mode"], batch["weight"]):
            assert mode == ("training" if i.startswith("t") else "inference")
            factor.setdefault(mode, w / data.weights[data.ids.index(i)])
            assert w == pytest.approx(data.weights[data.ids.index(i)] * factor[mode]) and factor[mode] >= 1
    assert {1.0, 0.5, 1.5} <= set(data.weights)  # inference 1; training 0.5, and 0.5 x 3 for the shortest


def test_a_loss_needing_an_unknown_column_is_refused_naming_the_plugin():
    class Greedy(Loss):
        name = "greedy"
        needs = frozenset({"source", "teacher_entropy"})

        def __call__(self, logits, batch, *, beta=None):
            raise AssertionError

    class Plugin:
        @hookimpl
        def profuser_register_losses(self, register):
            register(Greedy)

    with pytest.raises(PluginError) as err:
        Engine(entrypoints=False, extra_plugins=[("greedy-plugin", Plugin())])
    [line] = err.value.lines()
    assert "greedy-plugin" in line and "'teacher_entropy'" in line and "example_id" in line


def test_best_of_n_in_rm_vote_and_reference():
    registry = Engine(entrypoints=False).registry
    ex = Candidates(id="x", reference="the answer is 42", responses={"a": "no idea", "b": "maybe 7"},
                    samples={"a": ["no idea", "the answer is 42"], "b": ["maybe 7", "seven"]},
                    scores={"rm1": {"a": 0.0, "b": 1.0}, "rm2": {"a": 0.0, "b": 1.0}},
                    sample_scores={"rm1": {"a": [0.0, 3.0], "b": [1.0, 0.5]}, "rm2": {"a": [0.0, 2.0], "b": [1.0, 0.2]}})
    [vote] = registry.build("evaluators", "rm_vote").select([ex])
    assert (vote.chosen, vote.sample, vote.detail["sample"]) == ("a", 1, {"a": 1, "b": 0})
    assert vote.detail["rm_scores"] == {"rm1": {"a": 3.0, "b": 1.0}, "rm2": {"a": 2.0, "b": 1.0}}
    # n = 1 (no samples): as before, sample 0
    one = Candidates(id="y", reference="r", responses={"a": "x", "b": "y"}, scores={"rm1": {"a": 0.0, "b": 1.0}})
    [choice] = registry.build("evaluators", "rm_vote").select([one])
    assert (choice.chosen, choice.sample, "sample" in choice.detail) == ("b", 0, False)
    [ref] = registry.build("evaluators", "reference", {"bertscore_weight": 0}).select([ex])
    assert (ref.chosen, ref.sample, ref.detail["sample"]) == ("a", 1, {"a": 1, "b": 0})


class EveryColumn(Loss):
    """fuse_kl that records the extra entries it asked for."""

    name = "every_column"
    needs = frozenset({"example_id", "mode", "source", "category", "teacher_logz"})
    batches: ClassVar[list[dict]] = []

    def __init__(self, params=None):
        super().__init__(params)
        from profuser_plugins.losses.fuse_kl import FuseKL

        self._kl = FuseKL()

    def __call__(self, logits, batch, *, beta=None):
        type(self).batches.append({**{k: batch[k] for k in self.needs},
                                   **{k: batch[k] for k in ("teacher_logits", "teacher_mask", "labels")}})
        return self._kl(logits, batch, beta=beta)


class EveryColumnPlugin:
    @hookimpl
    def profuser_register_losses(self, register):
        register(EveryColumn)


def test_two_samples_per_prompt_and_every_loss_column_through_a_whole_run(tmp_path):
    """n: 2 with rm_vote: both samples generated, scored and voted on; the chosen sample is the one
    teacher-forced and trained on; align / build write source, category and the teacher's
    log-partition for a loss that needs them."""
    import pyarrow.parquet as pq
    from pyarrow import ipc

    from profuser.alignment import CATEGORIES
    from profuser.pipeline import Runner
    from profuser.recipe import load_recipe
    from profuser.runtime import Runtime
    from profuser.testing import tiny_recipe

    engine = Engine(entrypoints=False, extra_plugins=[("every-column", EveryColumnPlugin())])
    path = tiny_recipe(tmp_path, {"inference_mode.generator.params.n": 2, "loss.name": "every_column"})
    recipe = load_recipe(path, registry=engine.registry)
    runner = Runner(recipe, engine, Runtime(runs_dir=tmp_path / "runs", device="cpu", progress=False), echo=lambda _: None)
    EveryColumn.batches.clear()
    runner.run()
    store = tmp_path / "runs" / "store"
    out = {s.id: store / s.kind / runner.keys[s.id] for s in runner.stages}

    generated = pq.read_table(out["generate/gemma"] / "generations.parquet").to_pylist()
    assert all(len(g["responses"]) == 2 and g["response"] == g["responses"][0] for g in generated)
    scores = pq.read_table(out["score/judge"] / "scores.parquet").to_pylist()
    assert all(len(s["sample_scores"]) == 2 and s["score"] == s["sample_scores"][0] for s in scores)
    selection = pq.read_table(out["select/inference"] / "selection.parquet").to_pylist()
    samples = {(g["id"], src): g["responses"] for src in ("llama", "gemma")
               for g in pq.read_table(out[f"generate/{src}"] / "generations.parquet").to_pylist()}
    trained = {}
    for src in ("llama", "gemma"):
        for row in pq.read_table(out[f"align/inference/{src}"] / "aligned.parquet", columns=["id", "response"]).to_pylist():
            trained[row["id"]] = row["response"]
    for row in selection:  # the won sample is what the source was teacher-forced on
        assert trained[row["id"]] == samples[(row["id"], row["chosen"])][row["sample"]]
        assert json.loads(row["detail"])["sample"][row["chosen"]] == row["sample"]
    assert [s.config.columns for s in runner.stages if s.kind == "build"] == [["category", "source", "teacher_logz"]] * 2
    assert {tuple(s.config.columns) for s in runner.stages if s.kind == "align"} == {("teacher_logz",)}
    built = ipc.open_file(str(out["build/inference"] / "examples.arrow")).read_all()
    assert {"source", "category"} <= set(built.column_names)
    assert {r["id"]: r["chosen"] for r in selection} == dict(zip(built["id"].to_pylist(), built["source"].to_pylist()))
    assert EveryColumn.batches
    for batch in EveryColumn.batches:
        assert set(batch["source"]) <= {"llama", "gemma"} and set(batch["mode"]) <= {"inference", "training"}
        assert batch["category"].min() >= -1 and batch["category"].max() < len(CATEGORIES)
        assert (batch["category"] >= 0).any() and len(batch["example_id"]) == len(batch["source"])
        logz, teacher = batch["teacher_logz"], batch["teacher_mask"]
        assert logz[teacher].isfinite().all() and logz[~teacher].isnan().all()
        logp = batch["teacher_logits"] - logz[..., None]  # the source's own log-probabilities
        assert (logp[teacher].nan_to_num(neginf=-1.0) <= 1e-4).all()
        # a top-k's mass is at most 1 (one-hot rows exactly 1)
        assert (logp[teacher].exp().sum(-1) <= 1 + 1e-3).all()


# --- per-token context for losses (issue 23 item 3) ------------------------------------------------


def _doc_confidence_kl():
    """The python block of docs/losses.md's "Per-token weights" section, as a module."""
    import re
    import types
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "losses.md"
    section = doc.read_text(encoding="utf-8").split("### Per-token weights", 1)[1].split("\n### ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    module = types.ModuleType("confidence_kl_doc")
    exec(compile(code, str(doc), "exec"), module.__dict__)  # noqa: S102  (our own docs, run as a user would)
    return module


def _token_batch(b=3, t=7, v=11, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[1, 5:] = -100  # padding
    teacher_logits = torch.randn(b, t, k, generator=g) * 2
    teacher_logits[..., -1] = float("-inf")  # an unused slot
    teacher_ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * t)]).view(b, t, k)
    mask = labels != -100
    mask[0, 3] = False  # a labelled position without a teacher
    return {"labels": labels, "teacher_ids": teacher_ids, "teacher_logits": teacher_logits, "teacher_mask": mask,
            "weight": torch.tensor([1.0, 0.5, 2.0]), "category": torch.randint(0, 3, (b, t), generator=g)}


def _dense_confidence_kl(logits, batch, beta, temperature, top_p, factor=None):
    """The same loss on dense [B, T, V] distributions: CE + beta * c * KL per labelled position."""
    from profuser.teacher import teacher_logprobs

    logq = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # position t predicts t + 1
    labels = batch["labels"][:, 1:]
    labelled = labels != -100
    logp_k = teacher_logprobs(batch["teacher_logits"][:, 1:], temperature=temperature, top_p=top_p).double()
    p = torch.zeros_like(logq).scatter(-1, batch["teacher_ids"][:, 1:], logp_k.exp().nan_to_num(0.0))
    kl = (p * (p.clamp_min(1e-300).log() - logq)).sum(-1)  # p = 0 terms vanish
    has = batch["teacher_mask"][:, 1:] & labelled & (p.sum(-1) > 0)
    c = p.amax(-1) if factor is None else factor(batch)[:, 1:].double()
    ce = -logq.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    w = batch["weight"][:, None].double()
    total = (w * labelled * (ce + beta * torch.where(has, c * kl, torch.zeros_like(kl)))).sum()
    return total / labelled.sum()


def test_the_documented_confidence_weighted_kl_matches_a_dense_reference_in_value_and_gradient():
    module = _doc_confidence_kl()
    engine = Engine(entrypoints=False, extra_plugins=[("confidence-kl", module)])
    loss = engine.registry.build("losses", "confidence_kl", {"beta": 0.7, "temperature": 1.5, "top_p": 0.9})
    batch = _token_batch()
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    value, parts = loss(logits, batch)
    value.backward()
    got = logits.grad.clone()
    logits.grad = None
    want = _dense_confidence_kl(logits, batch, 0.7, 1.5, 0.9)
    want.backward()
    assert value.item() == pytest.approx(want.item(), rel=1e-6)
    assert torch.allclose(got, logits.grad, atol=1e-9)
    # the weighting matters: plain fuse_kl on the same batch differs
    plain = engine.registry.build("losses", "fuse_kl", {"beta": 0.7, "temperature": 1.5, "top_p": 0.9})(logits, batch)[0]
    assert abs(plain.item() - value.item()) > 1e-3 and parts["kl"] < plain.item()


def test_token_weights_get_the_columns_the_loss_needs_as_rows():
    from profuser.losses import SparseDivergenceLoss, kl_divergence

    class ExactOnly(SparseDivergenceLoss):
        name = "exact_only"
        part = "kl"
        needs = frozenset({"category", "source"})
        seen: ClassVar[list] = []

        def divergence(self, logp, logq, log_support):
            return kl_divergence(logp, logq)

        def token_weights(self, ctx):
            type(self).seen.append(ctx)
            return (ctx.columns["category"] == 0).to(ctx.weight.dtype)

    batch = {**_token_batch(seed=3), "source": ["a", "b", "c"]}
    logits = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    value, _ = ExactOnly({"beta": 1.0, "temperature": 1.0, "top_p": 1.0})(logits, batch)
    value.backward()
    got = logits.grad.clone()
    logits.grad = None
    want = _dense_confidence_kl(logits, batch, 1.0, 1.0, 1.0, factor=lambda b: (b["category"] == 0).double())
    want.backward()
    assert value.item() == pytest.approx(want.item(), rel=1e-6) and torch.allclose(got, logits.grad, atol=1e-9)
    ctx = ExactOnly.seen[-1]
    assert ctx.columns["source"] == ["a", "b", "c"] and ctx.example.tolist() == [i for i in range(3) for _ in range(7)]
    assert ctx.columns["category"].view(3, 7)[:, :-1].equal(batch["category"][:, 1:])  # shifted like the labels
    assert ctx.weight.tolist() == batch["weight"].repeat_interleave(7).tolist()


def test_token_weights_of_the_wrong_shape_name_the_loss():
    from profuser.losses import SparseDivergenceLoss, kl_divergence

    class Bad(SparseDivergenceLoss):
        name = "bad_weights"
        part = "kl"

        def divergence(self, logp, logq, log_support):
            return kl_divergence(logp, logq)

        def token_weights(self, ctx):
            return torch.ones(2)

    with pytest.raises(ProfuserError, match="token_weights must return one factor per row") as err:
        Bad()(torch.randn(3, 7, 11), _token_batch())
    assert err.value.where == "loss bad_weights"
