"""``reverse_kl``: L_SFT + beta * KL(P_T || P_S) on the teacher's support (mode-seeking)."""

from __future__ import annotations

from profuser import hookimpl

from ._sparse import SparseDivergenceLoss, xlogy_sum


class ReverseKL(SparseDivergenceLoss):
    """The teacher is zero off its top-k, so KL(P_T || P_S) over the whole vocabulary is infinite;
    this is the reverse KL of the student renormalised on the teacher's kept ids:
    sum_j q~_j (log q~_j - log p_j), q~ = q / q(support). Its gradient reaches only those ids."""

    name = "reverse_kl"
    part = "reverse_kl"

    def divergence(self, logp, logq, log_support):
        logq_support = logq - log_support[:, None]  # [N, k], -inf-safe: dropped slots masked via p
        q_support = logq_support.exp().masked_fill(~logp.isfinite(), 0.0)
        return xlogy_sum(q_support, logq_support - logp)


@hookimpl
def profuser_register_losses(register):
    register(ReverseKL)
