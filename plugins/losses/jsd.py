"""``jsd``: L_SFT + beta * JSD(P_S, P_T), the symmetric, bounded (<= log 2) divergence."""

from __future__ import annotations

from profuser import hookimpl
from profuser.losses import SparseDivergenceLoss, js_divergence


class JSD(SparseDivergenceLoss):
    """JSD = 1/2 KL(P_S || M) + 1/2 KL(P_T || M), M = (P_S + P_T) / 2, exact over the whole
    vocabulary from the teacher's ids alone: off the support M = q / 2, so those ids add
    1/2 * log 2 * (1 - q(support))."""

    name = "jsd"
    part = "jsd"

    def divergence(self, logp, logq, log_support):
        return js_divergence(logp, logq, log_support)


@hookimpl
def profuser_register_losses(register):
    register(JSD)
