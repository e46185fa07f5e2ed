"""``train.packing``: a micro-batch's examples laid end to end. Every entry lands at its example's
place, attention stays within each example (a packed forward equals the padded one per example,
and changing one example changes no other's logits), and the loss and its gradient equal the
padded computation's, Eq. 5 included (tests/test_eq5.py's hand reference)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_eq5 import SPEC, hand_eq5, step_rows
from test_trainer import read_metrics, write_examples

from profuser.components import Loss
from profuser.errors import ProfuserError
from profuser.recipe import TrainSpec
from profuser.training import train
from profuser.training.data import IGNORE, PACK_FILL, ExampleSet, pack_rows
from profuser.training.trainer import check_packing

S, K = 3, 3  # sources and teacher slots of the all_teachers columns
NEEDS = frozenset({"example_id", "mode", "source", "category", "teacher_logz", "all_teachers"})


def with_every_column(path: Path, seed: int = 0) -> Path:
    """``path`` (test_trainer's writer) plus the columns a loss may need: source, category,
    teacher_logz and the all_teachers columns (some sources missing at some positions, a NaN score)."""
    rng = np.random.default_rng(seed)
    table = pq.read_table(path)
    lengths = [len(x) for x in table.column("input_ids").to_pylist()]
    logits = [rng.normal(size=(n, S, K)).astype(np.float32) for n in lengths]
    for block in logits:
        block[:, :, -1] = -np.inf  # an unused slot
    scores = [rng.normal(size=S).astype(np.float32) for _ in lengths]
    scores[0][1] = np.nan
    columns = {
        "source": pa.array([f"src{i % S}" for i in range(len(lengths))]),
        "category": pa.array([rng.integers(0, 4, n).tolist() for n in lengths], pa.list_(pa.int8())),
        "teacher_logz": pa.array([rng.normal(size=n).astype(np.float32).tolist() for n in lengths], pa.list_(pa.float32())),
        "all_teacher_ids": pa.array([rng.integers(5, 400, (n, S, K)).tolist() for n in lengths],
                                    pa.list_(pa.list_(pa.list_(pa.int32())))),
        "all_teacher_logits": pa.array([x.tolist() for x in logits], pa.list_(pa.list_(pa.list_(pa.float32())))),
        "all_teacher_mask": pa.array([(rng.random((n, S)) < 0.8).tolist() for n in lengths], pa.list_(pa.list_(pa.bool_()))),
        "all_teacher_scores": pa.array([x.tolist() for x in scores], pa.list_(pa.float32())),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """Examples of both modes with every optional column, lengths 3-40 (prompt 4: some have no label)."""
    root = tmp_path_factory.mktemp("packing")
    return {"inference": with_every_column(write_examples(root / "inference.parquet", "inference", 6, seed=5, lengths=(5, 40)), 1),
            "training": with_every_column(write_examples(root / "training.parquet", "training", 6, seed=6, lengths=(5, 40),
                                                         prefix="tr"), 2)}


def test_rows_are_filled_first_fit_decreasing_and_never_exceed_the_padding():
    row, offset = pack_rows(np.array([5, 3, 2, 4]))
    assert row.tolist() == [0, 2, 2, 1] and offset.tolist() == [0, 0, 3, 0]
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(1, 60, rng.integers(1, 12))
        row, offset = pack_rows(lengths)
        rows, cap = row.max() + 1, lengths.max()
        ends = offset + lengths
        assert ends.max() <= cap and rows <= len(lengths)  # never more positions than the padded batch
        for r in range(rows):  # the examples of a row tile it from 0 without overlap
            mine = np.flatnonzero(row == r)
            spans = sorted(zip(offset[mine], ends[mine]))
            assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_every_entry_moves_to_its_example_and_the_tail_holds_padding(rich):
    data = ExampleSet.load(rich, max_length=30, needs=NEEDS)  # some examples cut at max_length
    rows = np.array([0, 7, 3, 9, 1, 6, 11])
    weights = np.linspace(0.5, 2.0, len(rows))
    plain = data.collate(rows, weights, pad_id=7)
    packed = data.collate(rows, weights, pad_id=7, packed=True)
    b = len(rows)
    lengths = plain["attention_mask"].sum(1)
    assert packed["input_ids"].shape[0] < b and packed["input_ids"].shape[1] == lengths.max()
    example, position = packed["example"], packed["position_ids"]
    assert (packed["attention_mask"] == (example >= 0)).all()
    for e in range(b):
        at = example == e
        n = int(lengths[e])
        assert int(at.sum()) == n and position[at].tolist() == list(range(n))
        for name in ("input_ids", "teacher_ids", "teacher_logits", "teacher_mask", "category", "teacher_logz",
                     "all_teacher_ids", "all_teacher_logits", "all_teacher_mask"):
            torch.testing.assert_close(packed[name][at], plain[name][e, :n], equal_nan=True, msg=name)
        assert packed["labels"][at][0] == IGNORE  # position 0 predicts nothing, as in a padded row
        assert (packed["labels"][at][1:] == plain["labels"][e, 1:n]).all()
    tail = example < 0
    assert tail.any() and (packed["input_ids"][tail] == 7).all()
    for name, fill in PACK_FILL.items():
        torch.testing.assert_close(packed[name][tail], torch.full_like(packed[name][tail], fill), equal_nan=True, msg=name)
    for name in ("weight", "all_teacher_scores"):  # per example: unchanged
        torch.testing.assert_close(packed[name], plain[name], equal_nan=True)
    for name in ("ids", "modes", "example_id", "mode", "source"):
        assert packed[name] == plain[name]


def _load(model_dir: Path, attn: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32).eval()


def _packed_logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_a_packed_forward_equals_the_padded_one_and_attends_within_each_example(rich, tiny_llama_dir, tiny_gemma_dir,
                                                                                 arch, attn):
    model = _load(tiny_llama_dir if arch == "llama" else tiny_gemma_dir, attn)
    data = ExampleSet.load(rich, max_length=64)
    rows = np.arange(len(data))
    plain = data.collate(rows, np.ones(len(rows)), pad_id=0)
    packed = data.collate(rows, np.ones(len(rows)), pad_id=0, packed=True)
    example = packed["example"]
    assert any(len(set(r.tolist()) - {-1}) > 1 for r in example)  # some row holds several examples
    with torch.no_grad():
        want = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits
        got = _packed_logits(model, packed)
        # every other example's tokens changed: an example's logits would move if it attended to them
        for e in range(len(rows)):
            others = packed["input_ids"].clone()
            others[(example != e) & (example >= 0)] = (others[(example != e) & (example >= 0)] + 11) % 300 + 5
            alone = _packed_logits(model, {**packed, "input_ids": others})
            torch.testing.assert_close(alone[example == e], got[example == e], rtol=0, atol=1e-6)
    for e in range(len(rows)):
        n = int(plain["attention_mask"][e].sum())
        torch.testing.assert_close(got[example == e], want[e, :n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss_name, params", [("sft", {}), ("fuse_kl", {}), ("jsd", {}),
                                               ("multi_teacher_kl", {"weights": "scores"})])
def test_the_packed_loss_and_gradient_equal_the_padded_ones(rich, tiny_llama_dir, registry, loss_name, params):
    loss = registry.build("losses", loss_name, params)
    data = ExampleSet.load(rich, max_length=64, needs=frozenset(loss.needs))
    rows = np.arange(len(data))
    weights = np.linspace(0.3, 1.7, len(rows)).astype(np.float32)  # per-example weights stay per example
    results = []
    for packed in (False, True):
        model = _load(tiny_llama_dir, "sdpa")
        batch = data.collate(rows, weights, pad_id=0, packed=packed)
        if packed:  # what the trainer does: each position gets its example's weight
            batch["weight"] = batch["weight"][batch["example"].clamp_min(0)] * (batch["example"] >= 0)
            logits = _packed_logits(model, batch)
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        value, parts = loss(logits, batch, beta=0.5)
        value.backward()
        results.append((value.item(), parts, [p.grad.clone() for p in model.parameters()]))
    (v0, parts0, g0), (v1, parts1, g1) = results
    assert v1 == pytest.approx(v0, rel=1e-5, abs=1e-6)
    assert parts1 == pytest.approx(parts0, rel=1e-5, abs=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("micro", [4, 2])
def test_training_with_packing_is_eq5_in_value_and_gradient_norm(tmp_path, tiny_llama_dir, examples, registry, micro):
    """As tests/test_eq5.py: each step's logged loss and pre-clip gradient norm equal the hand reference."""
    loss = registry.build("losses", "fuse_kl")
    train(str(tiny_llama_dir), examples, loss, registry.build("curricula", "simultaneous", {"epochs": 1}),
          TrainSpec(**SPEC, micro_batch_size=micro, packing=True), tmp_path, device="cpu")
    metrics = read_metrics(tmp_path)
    steps = step_rows(examples, registry)
    assert len(metrics) == len(steps) == 2
    for [rows], m in zip(steps, metrics):
        value, norm, _ = hand_eq5(tiny_llama_dir, examples, rows, loss)
        assert m["loss"] == pytest.approx(value, rel=1e-5) and m["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_packing_is_opt_in_and_keeps_the_cache_keys_of_padded_training():
    assert "packing" not in TrainSpec().model_dump() and "packing" not in TrainSpec(packing=False).model_dump()
    assert TrainSpec(packing=True).model_dump()["packing"] is True


def test_a_loss_that_reads_per_example_entries_itself_must_say_it_supports_packing(registry):
    class BySource(Loss):
        name = "by_source"
        needs = frozenset({"source"})

        def __call__(self, logits, batch, *, beta=None):
            return logits.sum(), {}

    with pytest.raises(ProfuserError, match=r"'by_source' reads per-example entries \(source\)") as raised:
        check_packing(BySource(), BySource.needs)
    assert raised.value.where == "train.packing"
    BySource.supports_packing = True
    check_packing(BySource(), BySource.needs)
    for name in ("fuse_kl", "multi_teacher_kl", "sft"):  # the kernel's and flat_batch's users
        check_packing(registry.build("losses", name), frozenset(registry.build("losses", name).needs))
