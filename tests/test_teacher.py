"""teacher_logprobs rebuilds exactly HF sampling's distribution from the stored top-k logits."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from profuser.teacher import teacher_logprobs


def hf_distribution(full: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[n, V] probabilities from full logits through HF's sampling warpers."""
    scores = full.float()
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        scores = warper(None, scores)
    return scores.softmax(-1)


def from_slots(logprobs: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Scatter [n, k] slot log-probabilities into [n, V] probabilities."""
    return torch.zeros(ids.shape[0], vocab).scatter_add(1, ids, logprobs.exp())


@pytest.mark.parametrize("temperature,top_p", [(2.0, 0.95), (1.0, 0.5), (0.7, 1.0), (3.0, 0.05)])
def test_equals_hf_warpers_on_full_logits(temperature, top_p):
    torch.manual_seed(0)
    n, vocab, k = 64, 50, 10
    full = torch.randn(n, vocab) * 3
    top = full.topk(k, dim=-1)
    ours = teacher_logprobs(top.values, temperature=temperature, top_p=top_p)
    expected = hf_distribution(full, temperature=temperature, top_k=k, top_p=top_p)
    torch.testing.assert_close(from_slots(ours, top.indices, vocab), expected, atol=1e-6, rtol=1e-5)
    # top-p really drops slots at these settings (else the test would not test it)
    if top_p < 1:
        assert torch.isneginf(ours).any()
    assert torch.isfinite(ours).any(-1).all()


def test_float16_logits_and_leading_dims():
    torch.manual_seed(1)
    full = (torch.randn(2, 5, 30) * 4).half()
    top = full.topk(10, dim=-1)
    ours = teacher_logprobs(top.values)
    assert ours.shape == (2, 5, 10) and ours.dtype == torch.float32
    expected = hf_distribution(full.reshape(10, 30), temperature=2.0, top_k=10, top_p=0.95)
    torch.testing.assert_close(from_slots(ours.reshape(10, 10), top.indices.reshape(10, 10), 30), expected)


def test_unused_slots_are_minus_inf_and_equal_a_smaller_k():
    torch.manual_seed(2)
    full = torch.randn(16, 40) * 2
    top = full.topk(6, dim=-1)
    # stored with k = 10 slots, 4 of them unused (-inf, arbitrary ids)
    values = torch.cat([top.values, torch.full((16, 4), float("-inf"))], dim=-1)
    ids = torch.cat([top.indices, torch.zeros(16, 4, dtype=torch.long)], dim=-1)
    ours = teacher_logprobs(values, temperature=2.0, top_p=0.9)
    assert torch.isneginf(ours[:, 6:]).all()
    expected = hf_distribution(full, temperature=2.0, top_k=6, top_p=0.9)
    torch.testing.assert_close(from_slots(ours, ids, 40), expected)


def test_position_without_any_slot_is_all_minus_inf_not_nan():
    values = torch.randn(3, 4)
    values[1] = float("-inf")
    out = teacher_logprobs(values)
    assert torch.isneginf(out[1]).all()
    assert not out.isnan().any()
    torch.testing.assert_close(out[[0, 2]].exp().sum(-1), torch.ones(2))


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        teacher_logprobs(torch.randn(2, 3), **kwargs)
