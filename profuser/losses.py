"""The public loss kernel: what the built-in losses (``sft``, ``fuse_kl``, ``reverse_kl``, ``jsd``)
are made of, for loss plugins to build on (docs/losses.md, "Writing a loss plugin").

- ``SparseDivergenceLoss``: L = L_SFT + beta * D(P_S, P_T) on the teacher's sparse support;
  a subclass implements ``divergence(logp, logq, log_support)`` and gets the shift, the teacher
  distribution (``beta``, ``temperature``, ``top_p`` params), masks, weights, normalisation and
  the fused kernel; ``token_weights(ctx)`` may weigh each row's divergence from its
  ``TokenContext`` (the teacher, masks, weights and the columns the loss ``needs``, per row).
- ``kl_divergence``, ``reverse_kl_divergence``, ``js_divergence``: the built-in D's, per row.
- ``sft_loss``: Eq. 1's CE through the same kernel; ``flat_batch``: the batch shifted and
  flattened to rows; ``sparse_logits``: the kernel itself; ``xlogy_sum``, ``IGNORE``, ``LOG2``.

The one heavy operation is ``sparse_logits``: the student's log-partition ``lse`` [N] and its
logits at a few ids ``z_at`` [N, m] (the label and the teacher's k ids). Every loss here is then
plain autograd on those small tensors: CE = lse - z_label, log q_j = z_j - lse. The backward of
``sparse_logits`` turns their gradients into the gradient on the logits:

    dL/dz = g_lse * softmax(z) + scatter(ids, g_at)

For CE + beta * KL(P_S || P_T) that is (w_ce + beta * w_kl) * softmax(z) - w_ce * onehot(label)
- beta * w_kl * P_S, as docs/losses.md derives. One [N, V] buffer in all (it becomes the
gradient) and no dense teacher tensor.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field

from profuser.artifacts import IGNORE_INDEX
from profuser.components import Loss
from profuser.errors import ProfuserError
from profuser.teacher import teacher_logprobs

__all__ = [
    "IGNORE", "LOG2", "SparseDivergenceLoss", "TokenContext", "example_rows", "flat_batch", "js_divergence", "kl_divergence",
    "reverse_kl_divergence", "sft_loss", "sparse_logits", "xlogy_sum",
]

IGNORE = IGNORE_INDEX  # the labels the loss skips
# The kernel works on segments: runs of rows with a label (a response), at most ~64M logits each
# (256 MiB float32, bounds the float32 temporaries of float16/bfloat16 logits). Prompt rows are
# skipped, except gaps shorter than ~4M logits, which are cheaper to compute than to cut out:
# every segment costs a few parallel regions, each a thread barrier, and on a busy 2-core CPU 49
# pieces of 1M logits made the loss 4x slower than one (benchmarks/fusion_step.py).
CHUNK_ELEMENTS = 1 << 26
MERGE_ELEMENTS = 1 << 22


def _segments(active: torch.Tensor, max_rows: int, merge_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) that cover every active row (one host sync)."""
    flags = active.to(torch.int8)
    edge = flags.new_zeros(1)
    changes = torch.diff(flags, prepend=edge, append=edge).nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for s, e in zip(changes[0::2], changes[1::2]):  # +1 at a run's start, -1 after its end
        if runs and s - runs[-1][1] < merge_rows:
            runs[-1][1] = e
        else:
            runs.append([s, e])
    return [(a, min(a + max_rows, e)) for s, e in runs for a in range(s, e, max_rows)]


def _gaps(n: int, segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The row ranges no segment covers."""
    bounds = [0, *[x for seg in segments for x in seg], n]
    return [(s, e) for s, e in zip(bounds[0::2], bounds[1::2]) if e > s]


class _SparseLogits(torch.autograd.Function):
    """The forward writes log_softmax(z) into one [N, V] buffer to read lse off it; the backward
    writes softmax(z) * g_lse into the same memory, which becomes the gradient. F.cross_entropy
    allocates three [N, V] tensors over forward and backward (log-softmax, its gradient, the
    logits' gradient), and fresh [N, V] memory costs as much as the arithmetic on a CPU (page
    faults). torch's fused softmax is faster than a standalone exp, hence softmax, not exp(logsm)."""

    @staticmethod
    def forward(ctx, z, ids, active, segments):
        # z [N, V] logits; ids [N, m] int64 in [0, V); active [N] bool; segments cover active rows
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        # keep the buffer only where it can become the gradient (same dtype) and one is wanted
        keep = ctx.needs_input_grad[0] and z.dtype == cdtype
        lse = torch.zeros(z.shape[0], dtype=cdtype, device=z.device)
        buf = torch.empty_like(z, memory_format=torch.contiguous_format) if keep else None
        for s, e in segments:
            zc = z[s:e].to(cdtype)
            logsm = torch.log_softmax(zc, dim=-1, out=buf[s:e]) if keep else torch.log_softmax(zc, dim=-1)
            # the row max of log_softmax is -log(sum exp(z - max)): lse = max z - max logsm, exactly
            lse[s:e] = zc.amax(-1) - logsm.amax(-1)
        lse = lse.masked_fill(~active, 0.0)  # inactive rows: a constant, so their gradient is zero
        z_at = z.gather(1, ids).to(cdtype)  # [N, m]
        ctx.save_for_backward(z, ids, active)
        ctx.buf = buf  # memory for the gradient; not save_for_backward, since it gets overwritten
        ctx.segments = segments
        return lse, z_at

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lse, g_at):
        z, ids, active = ctx.saved_tensors
        cdtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        coef = (g_lse * active).to(cdtype)[:, None]  # [N, 1]
        grad, ctx.buf = ctx.buf, None
        if grad is None:  # low-precision logits, or a second backward (retain_graph)
            grad = torch.empty_like(z, memory_format=torch.contiguous_format)
        for s, e in ctx.segments:
            if grad.dtype == cdtype:
                torch.softmax(z[s:e], dim=-1, out=grad[s:e]).mul_(coef[s:e])
            else:  # float16/bfloat16 logits: float32 segment, stored in their dtype
                grad[s:e] = torch.softmax(z[s:e].to(cdtype), dim=-1).mul_(coef[s:e])
        for s, e in _gaps(z.shape[0], ctx.segments):
            grad[s:e].zero_()
        grad.scatter_add_(1, ids, g_at.to(grad.dtype))
        return grad, None, None, None


def sparse_logits(
    z: torch.Tensor, ids: torch.Tensor, active: torch.Tensor | None = None, *, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, z_at)``: logsumexp of each row of ``z`` [N, V] (0 where ``active`` [N] is False) and
    ``z.gather(1, ids)`` [N, m], both float32 (float64 for float64 logits), differentiable in ``z``.
    """
    n, v = z.shape
    if active is None:
        active = torch.ones(n, dtype=torch.bool, device=z.device)
    segments = _segments(active, chunk_rows or max(1, CHUNK_ELEMENTS // v), max(1, MERGE_ELEMENTS // v))
    return _SparseLogits.apply(z, ids, active, segments)


# --- the batch, shifted -------------------------------------------------------------------------


def _shift(x: torch.Tensor, fill) -> torch.Tensor:
    """x[:, t+1] at row t, ``fill`` at the last position (nothing follows it)."""
    pad = [0, 0] * (x.dim() - 2) + [0, 1]
    return F.pad(x[:, 1:], pad, value=fill)


def flat_batch(logits: torch.Tensor, batch: dict[str, torch.Tensor], *, teacher: bool):
    """The batch aligned with ``logits.view(-1, V)`` (no copy of the logits: labels shift instead).

    Returns z [N, V], target [N] (IGNORE where no label), weight [N] (the example's weight), and
    with ``teacher`` also ids [N, k] and logits [N, k] of the teacher that row predicts, and
    teacher_mask [N] (a teacher and a label). A ``weight`` of shape [B, T] (a packed batch, see
    ``example_rows``) gives each row the weight at the position it predicts."""
    b, t, v = logits.shape
    z = logits.reshape(b * t, v)
    target = _shift(batch["labels"].long(), IGNORE).reshape(-1)
    weight = batch.get("weight")
    weight = torch.ones(b, device=logits.device) if weight is None else weight.to(logits.device, torch.float32)
    weight = _shift(weight, 0.0) if weight.dim() == 2 else weight[:, None].expand(b, t)
    out = {"z": z, "target": target, "weight": weight.reshape(-1)}
    if teacher:
        k = batch["teacher_ids"].shape[-1]
        out["teacher_ids"] = _shift(batch["teacher_ids"], 0).reshape(-1, k)
        out["teacher_logits"] = _shift(batch["teacher_logits"], float("-inf")).reshape(-1, k)
        mask = _shift(batch["teacher_mask"].bool(), False).reshape(-1)
        out["teacher_mask"] = mask & (target != IGNORE)
    return out


def example_rows(batch: dict[str, Any], b: int, t: int, device=None) -> torch.Tensor:
    """[N] int64: the example of each row of ``logits.view(-1, V)``, an index into the batch's
    per-example entries (``weight``, ``all_teacher_scores``, the lists). Row (b, t) is example b;
    in a packed batch (``train.packing``: several examples per row) ``batch["example"]`` [B, T]
    says (-1 on a row's tail after its examples, given here as 0: those rows have no label)."""
    packed = batch.get("example")
    if packed is None:
        return torch.arange(b, device=device).repeat_interleave(t)
    return packed.to(device).reshape(-1).clamp_min(0)


def _row_columns(batch: dict[str, Any], names: list[str], b: int, t: int) -> dict[str, Any]:
    """Batch entries as rows like ``flat_batch``'s: [B, T, ...] tensors shifted (the entry of
    position t + 1 at row (b, t); NaN / -1 / False past the end) and flattened to [N, ...]; per-example
    tensors repeated over each example's rows (``example_rows``); anything else (lists) as given."""
    out = {}
    packed = "example" in batch
    for name in names:
        value = batch[name]
        if name == "all_teacher_scores" and isinstance(value, torch.Tensor):  # [examples, S], whatever its shape
            out[name] = value[example_rows(batch, b, t, value.device)]
        elif isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (b, t):
            fill = float("nan") if value.is_floating_point() else (False if value.dtype == torch.bool else -1)
            out[name] = _shift(value, fill).reshape(b * t, *value.shape[2:])
        elif isinstance(value, torch.Tensor) and value.dim() >= 1 and (packed or value.shape[0] == b):
            out[name] = value[example_rows(batch, b, t, value.device)]
        else:
            out[name] = value
    return out


@dataclass
class TokenContext:
    """One batch's per-token context, row i = (b, t) of ``logits.view(-1, V)`` (it predicts the
    label at position t + 1 of example b, as in ``flat_batch``); what
    ``SparseDivergenceLoss.token_weights`` reads. None of it carries a gradient."""

    logp: torch.Tensor  # [N, k] the teacher's log-probabilities after temperature and top-p (-inf: dropped, no teacher)
    teacher_ids: torch.Tensor  # [N, k] target-vocabulary ids of those slots
    teacher_logits: torch.Tensor  # [N, k] the teacher's raw logits (-inf: unused slot)
    has_teacher: torch.Tensor  # [N] bool: a label and a teacher with a kept slot
    labelled: torch.Tensor  # [N] bool: a label (the rows the loss averages over)
    weight: torch.Tensor  # [N] the example's weight (batch["weight"])
    example: torch.Tensor  # [N] int64: the example of each row (index lists such as batch["source"]; example_rows)
    columns: dict[str, Any] = field(default_factory=dict)  # the loss's needs, as rows (see _row_columns)


# --- loss base classes --------------------------------------------------------------------------


def sft_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 1 through the fused kernel: sum_rows w * CE / (rows with a label)."""
    f = flat_batch(logits, batch, teacher=False)
    labelled = f["target"] != IGNORE
    lse, z_at = sparse_logits(f["z"], f["target"].clamp_min(0)[:, None], labelled)
    denom = labelled.sum().clamp_min(1)
    ce = ((lse - z_at[:, 0]) * f["weight"] * labelled).sum() / denom
    return ce, {"ce": ce.item()}


class SparseDivergenceLoss(Loss):
    """L = L_SFT + beta * D(P_S, P_T) per token, D on the teacher's sparse support.

    Subclasses implement ``divergence``; this class does the shift, the teacher distribution, the
    masks, the weights, the normalisation and the fused kernel (docs/losses.md)."""

    part: ClassVar[str] = ""  # the divergence's key in the logged parts

    class Params(Loss.Params):
        beta: float = Field(default=0.5, ge=0, description="weight of the divergence (the curriculum's phase beta overrides it)")
        temperature: float = Field(default=2.0, gt=0, description="teacher temperature (App. A: 2)")
        top_p: float = Field(default=0.95, gt=0, le=1, description="teacher top-p over its stored top-k (App. A: 0.95)")

    @abstractmethod
    def divergence(self, logp: torch.Tensor, logq: torch.Tensor, log_support: torch.Tensor) -> torch.Tensor:
        """D per row [N]. ``logp`` [N, k] teacher log-probabilities (-inf on dropped slots; rows
        without a teacher are all -inf), ``logq`` [N, k] the student's log-probabilities at the
        same ids, ``log_support`` [N] the student's log-mass on the teacher's kept ids. Values on
        rows without a teacher are discarded (keep them finite: their gradient is multiplied by 0)."""

    def token_weights(self, ctx: TokenContext) -> torch.Tensor | None:
        """A factor [N] on each row's divergence, from the batch's per-token context (docs/losses.md,
        "Per-token weights"); None (the default) leaves every row at 1. Rows without a teacher are
        0 whatever it says; the CE and the normalisation are unchanged."""
        return None

    def _token_context(self, f: dict, batch: dict, logp: torch.Tensor, has_teacher: torch.Tensor,
                       labelled: torch.Tensor, shape: tuple[int, int]) -> TokenContext:
        b, t = shape
        names = [n for n in batch if n in self.needs or (n.startswith("all_teacher_") and "all_teachers" in self.needs)]
        return TokenContext(logp=logp, teacher_ids=f["teacher_ids"], teacher_logits=f["teacher_logits"],
                            has_teacher=has_teacher, labelled=labelled, weight=f["weight"],
                            example=example_rows(batch, b, t, logp.device),
                            columns=_row_columns(batch, names, b, t))

    def __call__(self, logits, batch, *, beta=None):
        beta = self.params.beta if beta is None else float(beta)
        f = flat_batch(logits, batch, teacher=True)
        target, weight, has_teacher = f["target"], f["weight"], f["teacher_mask"]
        labelled = target != IGNORE
        with torch.no_grad():
            logp = teacher_logprobs(f["teacher_logits"], temperature=self.params.temperature, top_p=self.params.top_p)
            logp = logp.masked_fill(~has_teacher[:, None], float("-inf"))  # [N, k]
            kept = torch.isfinite(logp)
            has_teacher = has_teacher & kept.any(-1)
            ids = f["teacher_ids"].long().masked_fill(~kept, 0)  # unused slots may hold any id
            ids = torch.cat([target.clamp_min(0)[:, None], ids], dim=1)  # [N, 1 + k]
        lse, z_at = sparse_logits(f["z"], ids, labelled)
        ce = lse - z_at[:, 0]  # [N]
        logq = z_at[:, 1:] - lse[:, None]  # [N, k]
        # rows without a teacher sum over all their slots: finite, so no NaN reaches the gradient
        on_support = kept | ~has_teacher[:, None]
        log_support = torch.logsumexp(logq.masked_fill(~on_support, float("-inf")), dim=-1)  # [N]
        div = self.divergence(logp, logq, log_support)
        if type(self).token_weights is not SparseDivergenceLoss.token_weights:  # only a loss that weighs pays
            with torch.no_grad():
                factor = self.token_weights(self._token_context(f, batch, logp, has_teacher, labelled, logits.shape[:2]))
            if factor is not None:
                factor = torch.as_tensor(factor, dtype=div.dtype, device=div.device)
                if factor.shape != div.shape:
                    raise ProfuserError(f"token_weights must return one factor per row, shape {tuple(div.shape)}, "
                                        f"got {tuple(factor.shape)}", where=f"loss {self.name or type(self).__name__}")
                div = div * factor.masked_fill(~has_teacher, 0.0)
        div = torch.where(has_teacher, div, torch.zeros_like(div))
        denom = labelled.sum().clamp_min(1)
        ce_part = (ce * weight * labelled).sum() / denom
        div_part = (div * weight).sum() / denom
        loss = ce_part + beta * div_part
        n_teacher = has_teacher.sum().clamp_min(1)
        parts = {
            "ce": ce_part.item(),
            self.part: div_part.item(),
            f"{self.part}_per_teacher_token": (div.detach() * has_teacher).sum().item() / n_teacher.item(),
            "beta": beta,
        }
        return loss, parts


def xlogy_sum(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_j p_j * a_j over the last dim, 0 where p_j = 0 even if a_j is infinite (gradient too)."""
    return (p * a.masked_fill(p == 0, 0.0)).sum(-1)


LOG2 = math.log(2.0)


# --- the divergences, per row (arguments as in SparseDivergenceLoss.divergence) -----------------


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P_S || P_T) = sum_j p_j (log p_j - log q_j) over the teacher's kept ids [N]."""
    return xlogy_sum(logp.exp(), logp - logq)


def reverse_kl_divergence(logp: torch.Tensor, logq: torch.Tensor, log_support: torch.Tensor) -> torch.Tensor:
    """KL(P~_T || P_S) [N], the student renormalised on the teacher's kept ids: the teacher is 0
    off its top-k, so over the whole vocabulary the reverse KL would be infinite."""
    logq_support = logq - log_support[:, None]  # [N, k]; dropped slots are masked through p
    q_support = logq_support.exp().masked_fill(~logp.isfinite(), 0.0)
    return xlogy_sum(q_support, logq_support - logp)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor, log_support: torch.Tensor) -> torch.Tensor:
    """JSD(P_S, P_T) [N], exact over the whole vocabulary from the teacher's ids alone: off the
    support M = q / 2, so those ids add 1/2 * log 2 * (1 - q(support))."""
    kept = logp.isfinite()
    logm = torch.logaddexp(logp, logq) - LOG2  # [N, k]
    q = logq.exp().masked_fill(~kept, 0.0)
    on_support = xlogy_sum(logp.exp(), logp - logm) + xlogy_sum(q, logq - logm)
    return 0.5 * (on_support + LOG2 * (1 - log_support.exp()))
