"""``sft``: Eq. 1, cross-entropy on the labels only (the teacher, if any, is ignored)."""

from __future__ import annotations

from profuser import hookimpl
from profuser.components import Loss
from profuser.losses import sft_loss


class SFT(Loss):
    """Per-token CE on labelled positions, per-example weights, normalised by the labelled-token
    count (docs/losses.md). Uses the same fused kernel as the teacher losses, so the two compare
    like for like; ``beta`` is accepted and ignored."""

    name = "sft"
    teacher = False  # a training-mode-only recipe with it computes no teacher logits (CSFT)

    def __call__(self, logits, batch, *, beta=None):
        return sft_loss(logits, batch)


@hookimpl
def profuser_register_losses(register):
    register(SFT)
