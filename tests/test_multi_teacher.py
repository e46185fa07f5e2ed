"""``multi_teacher_kl`` on a constructed batch: it equals the sum of single-teacher ``fuse_kl``
losses (value and gradient), its source weights (uniform, fixed, softmax of -CE), and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from profuser.plugins import Engine

B, T, S, K, V = 2, 7, 3, 4, 50


@pytest.fixture(scope="module")
def registry():
    return Engine(entrypoints=False).registry


def make_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    labels = input_ids.clone()
    labels[:, :2] = -100  # a prompt
    labels[1, -1] = -100  # padding-like tail
    ids = torch.randint(0, V, (B, T, S, K), generator=g)
    logits = torch.randn(B, T, S, K, generator=g) * 2
    logits[..., -1] = float("-inf")  # an unused slot
    mask = labels != -100
    all_mask = mask[..., None].expand(B, T, S).clone()
    all_mask[0, :, 2] = False  # example 0 has no teacher from source 2
    all_mask[1, 4, 0] = False  # and a position without source 0
    return {
        "input_ids": input_ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "labels": labels,
        "weight": torch.tensor([1.0, 0.5]),
        "all_teacher_ids": ids, "all_teacher_logits": logits, "all_teacher_mask": all_mask,
        "all_teacher_scores": torch.tensor([[1.2, 0.7, float("nan")], [2.0, 1.0, 0.5]]),  # CE: lower better
    }


def single(batch: dict, s: int) -> dict:
    """The batch as fuse_kl sees it with source s as the only teacher."""
    return {**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "weight")},
            "teacher_ids": batch["all_teacher_ids"][:, :, s], "teacher_logits": batch["all_teacher_logits"][:, :, s],
            "teacher_mask": batch["all_teacher_mask"][:, :, s]}


def check_equals_sum(registry, params: dict, w: torch.Tensor, beta: float = 0.7, rel: float = 1e-9):
    """multi(beta) - CE == sum_s (fuse_kl_s at beta * w_s - CE), with per-example w [B, S] folded
    into each single-teacher batch's example weight (value and gradient)."""
    batch = make_batch()
    z = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    multi = registry.build("losses", "multi_teacher_kl", {"temperature": 2.0, "top_p": 0.9, **params})
    fuse = registry.build("losses", "fuse_kl", {"temperature": 2.0, "top_p": 0.9})
    sft = registry.build("losses", "sft")
    loss, parts = multi(z, batch, beta=beta)
    (g_multi,) = torch.autograd.grad(loss, z)
    expected = sft(z, batch)[0]
    for s in range(S):  # KL_s alone: fuse_kl minus its CE, the example weight times w_s
        one = single(batch, s)
        one["weight"] = batch["weight"] * w[:, s]
        expected = expected + fuse(z, one, beta=beta)[0] - sft(z, one)[0]
    (g_sum,) = torch.autograd.grad(expected, z)
    assert loss.item() == pytest.approx(expected.item(), rel=rel)
    assert torch.allclose(g_multi, g_sum, atol=rel / 10)
    assert parts["kl"] > 0


def test_fixed_weights_equal_the_sum_of_single_teacher_fuse_kl(registry):
    w = torch.tensor([[1.0, 0.25, 0.0], [1.0, 0.25, 2.0]])  # source 2 has no teacher in example 0
    check_equals_sum(registry, {"weights": "fixed", "source_weights": [1.0, 0.25, 2.0]}, w)


def test_uniform_weights_are_one_over_the_sources_present(registry):
    check_equals_sum(registry, {"weights": "uniform"}, torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_score_weights_are_a_softmax_of_minus_ce(registry):
    e0 = [math.exp(-1.2), math.exp(-0.7)]
    e1 = [math.exp(-2.0), math.exp(-1.0), math.exp(-0.5)]
    w = torch.tensor([[e0[0] / sum(e0), e0[1] / sum(e0), 0.0], [x / sum(e1) for x in e1]])
    check_equals_sum(registry, {"weights": "scores"}, w, rel=1e-6)  # the softmax runs in float32


def test_one_source_is_fuse_kl(registry):
    batch = make_batch(1)
    for key in ("all_teacher_ids", "all_teacher_logits", "all_teacher_mask"):
        batch[key] = batch[key][:, :, :1]
    batch["all_teacher_scores"] = batch["all_teacher_scores"][:, :1]
    z = torch.randn(B, T, V, dtype=torch.float64)
    a = registry.build("losses", "multi_teacher_kl")(z, batch, beta=0.5)[0]
    b = registry.build("losses", "fuse_kl")(z, single(batch, 0), beta=0.5)[0]
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("params, message", [
    ({"weights": "fixed"}, "source_weights is set with weights: fixed"),
    ({"source_weights": [1.0]}, "source_weights is set with weights: fixed"),
    ({"weights": "fixed", "source_weights": [1.0, -1.0]}, ">= 0"),
])
def test_bad_params_are_refused(registry, params, message):
    with pytest.raises(Exception, match=message):
        registry.build("losses", "multi_teacher_kl", params)


def test_a_batch_without_every_teacher_and_a_wrong_weight_count_are_one_line(registry):
    from profuser.errors import ProfuserError

    batch = make_batch()
    z = torch.randn(B, T, V)
    with pytest.raises(ProfuserError, match="lacks all_teacher_ids"):
        registry.build("losses", "multi_teacher_kl")(z, single(batch, 0))
    with pytest.raises(ProfuserError, match="2 weights for 3 sources"):
        registry.build("losses", "multi_teacher_kl", {"weights": "fixed", "source_weights": [1.0, 1.0]})(z, batch)
