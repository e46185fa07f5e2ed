"""``jsd``: L_SFT + beta * JSD(P_S, P_T), the symmetric, bounded (<= log 2) divergence."""

from __future__ import annotations

import torch

from profuser import hookimpl

from ._sparse import LOG2, SparseDivergenceLoss, xlogy_sum


class JSD(SparseDivergenceLoss):
    """JSD = 1/2 KL(P_S || M) + 1/2 KL(P_T || M), M = (P_S + P_T) / 2, exact over the whole
    vocabulary from the teacher's ids alone: off the support M = q / 2, so those ids add
    1/2 * log 2 * (1 - q(support))."""

    name = "jsd"
    part = "jsd"

    def divergence(self, logp, logq, log_support):
        kept = logp.isfinite()
        logm = torch.logaddexp(logp, logq) - LOG2  # [N, k]
        q = logq.exp().masked_fill(~kept, 0.0)
        on_support = xlogy_sum(logp.exp(), logp - logm) + xlogy_sum(q, logq - logm)
        return 0.5 * (on_support + LOG2 * (1 - log_support.exp()))


@hookimpl
def profuser_register_losses(register):
    register(JSD)
