"""``fuse_kl``: Eq. 4, L_SFT + beta * KL(P_S || P_T), P_S the advantaged source's sparse top-k."""

from __future__ import annotations

from profuser import hookimpl
from profuser.losses import SparseDivergenceLoss, kl_divergence


class FuseKL(SparseDivergenceLoss):
    """KL(P_S || P_T) = sum_j p_j (log p_j - log q_j) over the teacher's kept ids. The teacher is
    rebuilt at ``temperature``/``top_p``; the student is at temperature 1, the distribution it is
    trained with by the CE and samples from, which also lets CE and KL share one logsumexp."""

    name = "fuse_kl"
    aliases = ("kl",)
    part = "kl"

    def divergence(self, logp, logq, log_support):
        return kl_divergence(logp, logq)


@hookimpl
def profuser_register_losses(register):
    register(FuseKL)
