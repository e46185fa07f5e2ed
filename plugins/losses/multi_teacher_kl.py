"""``multi_teacher_kl``: the seed summary's consistency loss, L_SFT + beta * sum_s w_s KL(P_s || P_T).

Every source's aligned top-k distribution on the same response (not only the advantaged
source's), each turned into a distribution as ``fuse_kl`` does (``temperature``, ``top_p``), each
KL on its own sparse support; the student's logits are gathered once at all S * k ids. Source
weights w_s per example: ``uniform`` (1/S over the sources with a teacher there), ``fixed``
(``source_weights``, in the recipe's source order, used as given) or ``scores`` (a softmax over
the evaluator's per-example scores; Min-CE's are cross-entropies, lower better: softmax of -CE).
With one source and w = 1 it is ``fuse_kl`` exactly.

Reads the batch entries of the ``all_teachers`` need: ``all_teacher_ids`` / ``all_teacher_logits``
[B, T, S, k], ``all_teacher_mask`` [B, T, S] and ``all_teacher_scores`` [B, S] (LOSS_NEEDS).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from profuser import hookimpl
from profuser.errors import ProfuserError
from profuser.losses import (
    IGNORE,
    SparseDivergenceLoss,
    _shift,
    example_rows,
    flat_batch,
    kl_divergence,
    sparse_logits,
)
from profuser.teacher import teacher_logprobs

ENTRIES = ("all_teacher_ids", "all_teacher_logits", "all_teacher_mask", "all_teacher_scores")


def source_weights(scores: torch.Tensor, present: torch.Tensor, how: str, fixed: list[float] | None,
                   sign: float, temperature: float) -> torch.Tensor:
    """[B, S] weight of each source's KL per example; 0 for a source without a teacher there."""
    if how == "fixed":
        if fixed is None or len(fixed) != scores.shape[1]:
            raise ProfuserError(f"source_weights has {0 if fixed is None else len(fixed)} weights for "
                                f"{scores.shape[1]} sources", where="loss.params.source_weights")
        w = torch.tensor(fixed, dtype=torch.float32, device=scores.device).expand_as(scores)
    elif how == "uniform":
        w = torch.ones_like(scores, dtype=torch.float32)
        w = w / present.sum(-1, keepdim=True).clamp_min(1)
    else:  # a softmax over the sources with a finite score and a teacher
        usable = present & torch.isfinite(scores)
        logits = (sign * scores.float() / temperature).masked_fill(~usable, float("-inf"))
        w = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an example with no usable score: all 0
    return w * present


class MultiTeacherKL(SparseDivergenceLoss):
    name = "multi_teacher_kl"
    aliases = ("consistency_kl",)
    part = "kl"
    needs = frozenset({"all_teachers"})
    supports_packing = True  # per-example entries through example_rows (train.packing)

    class Params(SparseDivergenceLoss.Params):
        weights: Literal["uniform", "fixed", "scores"] = Field(default="uniform", description="how w_s is set")
        source_weights: list[float] | None = Field(default=None, description="w_s per source, recipe order (fixed)")
        scores_lower_better: bool = Field(default=True, description="scores: lower is better (Min-CE's CE)")
        score_temperature: float = Field(default=1.0, gt=0, description="scores: softmax temperature")

        @model_validator(mode="after")
        def _fixed_needs_weights(self):
            if (self.weights == "fixed") != (self.source_weights is not None):
                raise ValueError("source_weights is set with weights: fixed, and only then")
            if self.source_weights is not None and any(w < 0 for w in self.source_weights):
                raise ValueError("source_weights must be >= 0")
            return self

    def divergence(self, logp, logq, log_support):
        return kl_divergence(logp, logq)

    def __call__(self, logits, batch, *, beta=None):
        missing = [e for e in ENTRIES if e not in batch]
        if missing:
            raise ProfuserError(f"multi_teacher_kl: the batch lacks {', '.join(missing)} (the all_teachers need)",
                                where="loss")
        beta = self.params.beta if beta is None else float(beta)
        p = self.params
        f = flat_batch(logits, batch, teacher=False)
        target, weight = f["target"], f["weight"]
        labelled = target != IGNORE
        b, t, s, k = batch["all_teacher_ids"].shape
        with torch.no_grad():
            ids = _shift(batch["all_teacher_ids"], 0).reshape(-1, s, k)  # [N, S, k]: row t predicts t + 1
            raw = _shift(batch["all_teacher_logits"], float("-inf")).reshape(-1, s, k)
            mask = _shift(batch["all_teacher_mask"].bool(), False).reshape(-1, s) & labelled[:, None]  # [N, S]
            logp = teacher_logprobs(raw, temperature=p.temperature, top_p=p.top_p)
            logp = logp.masked_fill(~mask[..., None], float("-inf"))
            kept = torch.isfinite(logp)
            mask = mask & kept.any(-1)
            scores = batch["all_teacher_scores"].to(logits.device)  # [examples, S]
            example = example_rows(batch, b, t, logits.device)  # [N] (a packed batch holds several per row)
            present = torch.zeros(scores.shape, dtype=torch.int32, device=logits.device).index_add_(
                0, example, batch["all_teacher_mask"].to(logits.device).reshape(-1, s).int()) > 0  # a teacher somewhere
            w_bs = source_weights(scores, present, p.weights, p.source_weights, -1.0 if p.scores_lower_better else 1.0,
                                  p.score_temperature)
            w_row = w_bs[example]  # [N, S]
            flat_ids = ids.long().masked_fill(~kept, 0).reshape(-1, s * k)
            all_ids = torch.cat([target.clamp_min(0)[:, None], flat_ids], dim=1)  # [N, 1 + S k]
        lse, z_at = sparse_logits(f["z"], all_ids, labelled)
        ce = lse - z_at[:, 0]
        logq = (z_at[:, 1:] - lse[:, None]).reshape(-1, s, k)  # [N, S, k]
        kl = kl_divergence(logp.reshape(-1, k), logq.reshape(-1, k)).reshape(-1, s)  # [N, S]
        kl = torch.where(mask, kl, torch.zeros_like(kl))
        div = (kl * w_row).sum(-1)  # [N]
        denom = labelled.sum().clamp_min(1)
        ce_part = (ce * weight * labelled).sum() / denom
        div_part = (div * weight).sum() / denom
        loss = ce_part + beta * div_part
        n_teacher = mask.sum().clamp_min(1)
        parts = {"ce": ce_part.item(), "kl": div_part.item(),
                 "kl_per_teacher_token": (kl.detach() * mask).sum().item() / n_teacher.item(),
                 "teachers_per_token": mask.sum().item() / max(int((mask.any(-1)).sum()), 1), "beta": beta}
        return loss, parts


@hookimpl
def profuser_register_losses(register):
    register(MultiTeacherKL)
