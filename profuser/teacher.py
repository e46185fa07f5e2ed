"""The teacher's distribution, rebuilt from its stored raw top-k logits.

The logits stage stores each source's raw top-k logits (App. A: k = 10); temperature and top-p are
applied here, in the loss, so changing them retrains without re-running any model. The result is
exactly the distribution HF sampling draws from with ``temperature=T, top_k=k, top_p=p``:
``TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> softmax`` on the full logits
(tests/test_teacher.py checks it against transformers). Top-k is implicit: the store holds the k
largest logits, so everything outside them is already -inf.
"""

from __future__ import annotations

import torch

__all__ = ["teacher_logprobs"]


def teacher_logprobs(topk_logits: torch.Tensor, *, temperature: float = 2.0, top_p: float = 0.95) -> torch.Tensor:
    """Log-probabilities [..., k] (float32) of the teacher over its stored top-k slots.

    ``topk_logits`` [..., k] (float16/32) are raw logits, -inf for unused slots. Dropped slots
    (unused, or cut by top-p) come back as -inf; the kept ones are renormalised. A position whose
    slots are all unused comes back all -inf (no distribution) rather than NaN.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    shape = topk_logits.shape
    # float32 like HF sampling on float32 scores; [..., k] -> [n, k]
    scores = topk_logits.detach().reshape(-1, shape[-1]).float() / temperature
    empty = torch.isneginf(scores).all(-1)  # [n] positions without any teacher slot
    scores = scores.masked_fill(empty[:, None], 0.0)  # finite stand-in so softmax has no NaN

    # TopPLogitsWarper, step for step: ascending sort, drop the low tail whose mass <= 1 - p,
    # always keep the most likely slot.
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[:, -1] = False
    remove = sorted_remove.scatter(1, order, sorted_remove)
    scores = scores.masked_fill(remove | empty[:, None], float("-inf"))

    logprobs = torch.log_softmax(scores, dim=-1)
    logprobs = logprobs.masked_fill(empty[:, None], float("-inf"))
    return logprobs.reshape(shape)
