"""``reverse_kl``: L_SFT + beta * KL(P_T || P_S) on the teacher's support (mode-seeking)."""

from __future__ import annotations

from profuser import hookimpl
from profuser.losses import SparseDivergenceLoss, reverse_kl_divergence


class ReverseKL(SparseDivergenceLoss):
    """The teacher is zero off its top-k, so KL(P_T || P_S) over the whole vocabulary is infinite;
    this is the reverse KL of the student renormalised on the teacher's kept ids:
    sum_j q~_j (log q~_j - log p_j), q~ = q / q(support). Its gradient reaches only those ids."""

    name = "reverse_kl"
    part = "reverse_kl"

    def divergence(self, logp, logq, log_support):
        return reverse_kl_divergence(logp, logq, log_support)


@hookimpl
def profuser_register_losses(register):
    register(ReverseKL)
