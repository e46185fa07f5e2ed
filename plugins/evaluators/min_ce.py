"""Min-CE (training mode, paper Eq. 1-2): the source with the lowest cross-entropy on the GT wins.

Eq. (1) sums the NLL over the response tokens. Summed NLL of the same text is comparable across
tokenizers (it is -log p(text) under each model); the per-token mean (FuseLLM's choice) is not:
a tokenizer that splits the text into more tokens gets a lower mean for the same likelihood.
``per_byte`` divides the sum by the UTF-8 bytes the tokens cover.

Sources are compared on what all of them covered. When every source's tokens cover the whole
response, the configured reduction applies. When a source's context limit truncated it, a sum
would let that source win by having read less: every source is then scored per byte over the
longest prefix all of them covered (each source's tokens that end within it; the select stage
fills their per-token NLLs), whatever the reduction, and ``detail`` names the truncated sources
(``truncated``) and the prefix (``prefix_chars``); the select stage counts such examples.
Without per-token NLLs, a source is scored per byte over what it covered itself.

A multi-turn conversation is scored on every labelled assistant turn: the logits stage
teacher-forced each source on all of them, and the text compared (bytes, the common prefix) is
``profuser.chat.labelled_text`` of the example (just the response for a single turn).
"""

from __future__ import annotations

import math
from typing import Literal

from profuser import hookimpl
from profuser.chat import conversation_history, labelled_text
from profuser.components import AdvantageEvaluator, Candidates, Choice, SourceNLL, StrictModel
from profuser.errors import DataError


class MinCE(AdvantageEvaluator):
    """Chooses the source with the minimum reduced NLL of the GT response; ties go to the first
    source in order. Sources without a stored NLL (or with zero tokens) for an example are skipped."""

    name = "min_ce"
    mode = "training"
    needs = frozenset({"nll"})

    class Params(StrictModel):
        reduction: Literal["sum", "mean", "per_byte"] = "sum"

    def reduce(self, nll: SourceNLL) -> float:
        if self.params.reduction == "sum":
            return nll.nll_sum
        if self.params.reduction == "mean":
            return nll.nll_sum / nll.n_tokens
        return nll.nll_sum / nll.n_bytes

    def select(self, examples: list[Candidates]) -> list[Choice]:
        return [self._choose(example) for example in examples]

    def _choose(self, example: Candidates) -> Choice:
        reference = labelled_text(example.reference, conversation_history(example.meta))
        full = len(reference.encode("utf-8"))
        truncated = [s for s, nll in example.nll.items() if 0 < nll.n_tokens and nll.n_bytes < full]
        prefix = self._common_prefix(example, reference) if truncated else None
        reduction = "per_byte" if truncated else self.params.reduction
        scores: dict[str, float] = {}
        empty = []
        for source, nll in example.nll.items():
            # a zero-token entry carries no evidence (and a sum of 0 would win every time)
            if nll.n_tokens <= 0 or (reduction == "per_byte" and nll.n_bytes <= 0):
                empty.append(source)
                continue
            value = self._prefix_per_byte(reference, nll, prefix) if truncated else self.reduce(nll)
            if value is None:  # none of its tokens ends within the common prefix
                empty.append(source)
                continue
            value = float(value)
            if not math.isfinite(value):
                raise DataError(f"example {example.id!r}: source {source!r} has a non-finite NLL ({value})",
                                where="evaluator min_ce")
            scores[source] = value
        if not scores:
            have = f" (sources with no response tokens: {', '.join(empty)})" if empty else ""
            raise DataError(f"example {example.id!r}: no source has an NLL for it{have}", where="evaluator min_ce")
        chosen = min(scores, key=scores.__getitem__)  # min keeps the first of equal values: ties go to the first source
        detail: dict = {"reduction": self.params.reduction}
        if truncated:
            detail.update(truncated=truncated, compared="per_byte", prefix_chars=prefix)
        tied = [s for s, v in scores.items() if v == scores[chosen]]
        if len(tied) > 1:
            detail["tied"] = tied
        if empty:
            detail["skipped"] = empty
        return Choice(chosen=chosen, scores=scores, detail=detail)

    @staticmethod
    def _common_prefix(example: Candidates, reference: str) -> int:
        """Characters of the response every source's tokens cover (the whole response for a source
        that covers all of its bytes)."""
        whole = len(reference)
        covered = []
        for nll in example.nll.values():
            if nll.n_tokens <= 0:
                continue
            if nll.token_ends is not None:
                covered.append(max(nll.token_ends, default=0))
            elif nll.n_bytes >= len(reference.encode("utf-8")):
                covered.append(whole)
        return min(covered, default=whole)

    @staticmethod
    def _prefix_per_byte(reference: str, nll: SourceNLL, prefix: int) -> float | None:
        """NLL per byte of this source's tokens that end within the first ``prefix`` characters;
        None when none does. Without per-token NLLs: per byte over what the source covered."""
        if nll.token_nll is None or nll.token_ends is None:
            return nll.nll_sum / nll.n_bytes
        kept = [(v, end) for v, end in zip(nll.token_nll, nll.token_ends) if end <= prefix]
        n_bytes = len(reference[: max((end for _, end in kept), default=0)].encode("utf-8"))
        if not kept or n_bytes <= 0:
            return None
        return sum(v for v, _ in kept) / n_bytes


@hookimpl
def profuser_register_evaluators(register):
    register(MinCE)
