"""Answer-aware fusion, published as its own package: three components that use the extension
points of docs/plugins.md.

- ``answer_aware`` (evaluator, inference mode): among every sample of every source, the one that
  contains the example's reference answer (``Candidates.meta["answer"]``) wins.
- ``length_batches`` (curriculum): ProFuser's two phases, each epoch ordered so that every
  optimizer step's batch holds examples of similar length (``order_examples``, batch size).
- ``mode_scaled_kl`` (loss): fuse_kl's CE + β·KL, each example's weight scaled by its mode
  (``needs = {"mode"}``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from profuser import hookimpl
from profuser.components import (
    AdvantageEvaluator,
    Candidates,
    Choice,
    Curriculum,
    CurriculumInput,
    Phase,
    PhaseExamples,
    PhasePart,
    StrictModel,
)
from profuser.losses import SparseDivergenceLoss, kl_divergence


class AnswerAware(AdvantageEvaluator):
    """Prefers the response that contains the reference answer (the dataset's ``meta["answer"]``,
    e.g. the built-in tasks'). Every sample of every source is looked at (a generator with
    ``n`` > 1 gives several); the first source, in recipe order, with a sample containing the
    answer wins, with its first such sample. When no sample contains it (or the example has no
    answer), the first source's first sample wins. Scores: 1 for a source with a sample
    containing the answer, else 0."""

    name = "answer_aware"
    mode = "inference"
    needs = frozenset({"responses"})

    class Params(StrictModel):
        case_sensitive: bool = Field(default=False, description="compare the answer with the case as written")

    def select(self, examples: list[Candidates]) -> list[Choice]:
        return [self._choose(ex) for ex in examples]

    def _choose(self, ex: Candidates) -> Choice:
        answer = str(ex.meta.get("answer", "")).strip()
        fold = (lambda s: s) if self.params.case_sensitive else str.lower
        found: dict[str, list[int]] = {}
        for source, response in ex.responses.items():
            samples = ex.samples.get(source) or [response]
            found[source] = [j for j, text in enumerate(samples) if answer and fold(answer) in fold(text)]
        winners = [s for s in ex.responses if found[s]]
        chosen = winners[0] if winners else next(iter(ex.responses))
        sample = found[chosen][0] if winners else 0
        return Choice(chosen=chosen, scores={s: float(bool(found[s])) for s in ex.responses},
                      detail={"answer": answer, "found": found}, sample=sample)


class LengthBatches(Curriculum):
    """ProFuser's phases (inference mode, then inference + training co-fusion), each epoch in
    length-homogeneous batches: the phase's rows sorted by GT length are cut into global batches
    (``batch_size``), and the batches come in a seeded random order (less padding per step, no
    short-to-long drift within an epoch)."""

    name = "length_batches"
    beta_params = ("first_beta", "second_beta")

    class Params(StrictModel):
        first_epochs: float = Field(default=1.0, gt=0, description="epochs of the inference-mode phase")
        first_beta: float = Field(default=0.1, ge=0, description="KL weight in phase 1")
        second_epochs: float = Field(default=2.0, gt=0, description="epochs of the co-fusion phase")
        second_beta: float = Field(default=0.5, ge=0, description="KL weight in phase 2")
        w1: float = Field(default=0.1, ge=0, description="phase-2 weight of the inference mode")

    def phases(self, data: CurriculumInput) -> list[Phase]:
        p = self.params
        return [
            Phase("inference", p.first_epochs, [PhasePart("inference")], beta=p.first_beta),
            Phase("co-fusion", p.second_epochs, [PhasePart("inference", p.w1), PhasePart("training")], beta=p.second_beta),
        ]

    def order_examples(self, examples: PhaseExamples, rng: np.random.Generator, epoch: int) -> list[int]:
        by_length = sorted(range(len(examples.ids)), key=lambda j: (examples.gt_length[j], examples.ids[j]))
        size = examples.batch_size
        batches = [by_length[a:a + size] for a in range(0, len(by_length), size)]
        return [j for b in rng.permutation(len(batches)) for j in batches[b]]


class ModeScaledKL(SparseDivergenceLoss):
    """fuse_kl (CE + β·KL(P_S ‖ P_T)) with each example's weight multiplied by a factor of its
    mode: e.g. trust inference-mode teachers (the sources' own answers) less than training-mode
    ones (the ground truth)."""

    name = "mode_scaled_kl"
    part = "kl"
    needs = frozenset({"mode"})

    class Params(SparseDivergenceLoss.Params):
        inference_scale: float = Field(default=1.0, ge=0, description="factor on inference-mode examples' weight")
        training_scale: float = Field(default=1.0, ge=0, description="factor on training-mode examples' weight")

    def divergence(self, logp, logq, log_support):
        return kl_divergence(logp, logq)

    def __call__(self, logits, batch, *, beta=None):
        scale = {"inference": self.params.inference_scale, "training": self.params.training_scale}
        factor = logits.new_tensor([scale[m] for m in batch["mode"]], dtype=batch["weight"].dtype)
        loss, parts = super().__call__(logits, {**batch, "weight": batch["weight"] * factor}, beta=beta)
        return loss, {**parts, "mode_scale": float(factor.mean())}


@hookimpl
def profuser_register_evaluators(register):
    register(AnswerAware)


@hookimpl
def profuser_register_curricula(register):
    register(LengthBatches)


@hookimpl
def profuser_register_losses(register):
    register(ModeScaledKL)
