"""Min-CE (training mode, paper Eq. 1-2): the source with the lowest cross-entropy on the GT wins.

Eq. (1) sums the NLL over the response tokens. Summed NLL of the same text is comparable across
tokenizers (it is -log p(text) under each model); the per-token mean (FuseLLM's choice) is not:
a tokenizer that splits the text into more tokens gets a lower mean for the same likelihood.
``per_byte`` divides the sum by the UTF-8 bytes the tokens cover, which stays comparable when a
source's context limit truncated the response.
"""

from __future__ import annotations

import math
from typing import Literal

from profuser import hookimpl
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
        scores: dict[str, float] = {}
        empty = []
        for source, nll in example.nll.items():
            # a zero-token entry carries no evidence (and a sum of 0 would win every time)
            if nll.n_tokens <= 0 or (self.params.reduction == "per_byte" and nll.n_bytes <= 0):
                empty.append(source)
                continue
            value = float(self.reduce(nll))
            if not math.isfinite(value):
                raise DataError(f"example {example.id!r}: source {source!r} has a non-finite NLL ({value})",
                                where="evaluator min_ce")
            scores[source] = value
        if not scores:
            have = f" (sources with no response tokens: {', '.join(empty)})" if empty else ""
            raise DataError(f"example {example.id!r}: no source has an NLL for it{have}", where="evaluator min_ce")
        chosen = min(scores, key=scores.__getitem__)  # min keeps the first of equal values: ties go to the first source
        detail: dict = {"reduction": self.params.reduction}
        tied = [s for s, v in scores.items() if v == scores[chosen]]
        if len(tied) > 1:
            detail["tied"] = tied
        if empty:
            detail["skipped"] = empty
        return Choice(chosen=chosen, scores=scores, detail=detail)


@hookimpl
def profuser_register_evaluators(register):
    register(MinCE)
