"""``progressive`` (ProFuser) and its mirror ``reverse`` (ReverseFuse): two phases, one mode first.

ProFuser (§3.3 Eq. 5, App. A): phase 1 fuses the inference mode only (w1 = 1, w2 = 0) for one
epoch with KL weight λ = 0.1; phase 2 co-fuses both modes (w1 = 0.1, w2 = 1) for two epochs with
λ = β = 0.5. ReverseFuse (App. C) runs the training mode first: phase 1 training mode only, phase 2
training mode at w1 and inference mode at w2 — the same numbers with the modes swapped.

Phase 2 steps over instructions (``draws: instructions``): a step holds ``batch_size``
instructions with both modes' examples of each, and an epoch is one pass over the instructions,
so three epochs take as many optimizer steps as a one-mode curriculum's. ``draws: examples`` is
the old per-mode scheduling (each mode's example drawn alone, an epoch over both modes' examples:
phase 2 takes twice the steps), kept for the ablation.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from profuser import hookimpl
from profuser.components import Curriculum, CurriculumInput, Draws, Mode, Phase, PhasePart, StrictModel


class TwoPhaseParams(StrictModel):
    first_epochs: float = Field(default=1.0, gt=0, description="epochs of phase 1 (the first mode alone)")
    first_beta: float = Field(default=0.1, ge=0, description="KL weight λ in phase 1 (App. A: 0.1)")
    second_epochs: float = Field(default=2.0, gt=0, description="epochs of phase 2 (both modes)")
    second_beta: float = Field(default=0.5, ge=0, description="KL weight λ = β in phase 2 (App. A: 0.5)")
    w1: float = Field(default=0.1, ge=0, description="phase-2 weight of the first mode's loss (Eq. 5: 0.1)")
    w2: float = Field(default=1.0, ge=0, description="phase-2 weight of the second mode's loss (Eq. 5: 1)")
    draws: Draws = Field(default="instructions", description="what a step draws: instructions, each with both modes' "
                                                              "examples (Eq. 5), or examples, each mode's alone (the "
                                                              "old per-mode scheduling, an ablation)")


def two_phases(first: Mode, second: Mode, p: TwoPhaseParams, ids: list[str] | None = None, prefix: str = "") -> list[Phase]:
    """Phase 1: ``first`` alone (weight 1); phase 2: ``first`` at w1 plus ``second`` at w2."""
    return [
        Phase(f"{prefix}{first}", p.first_epochs, [PhasePart(first, 1.0, ids)], beta=p.first_beta, draws=p.draws),
        Phase(f"{prefix}co-fusion", p.second_epochs,
              [PhasePart(first, p.w1, ids), PhasePart(second, p.w2, ids)], beta=p.second_beta, draws=p.draws),
    ]


class Progressive(Curriculum):
    """ProFuser: inference-mode fusion, then inference + training co-fusion (easy to hard)."""

    name = "progressive"
    aliases = ("profuser",)
    beta_params = ("first_beta", "second_beta")
    order: ClassVar[tuple[Mode, Mode]] = ("inference", "training")

    class Params(TwoPhaseParams):
        pass

    def phases(self, data: CurriculumInput) -> list[Phase]:
        return two_phases(*self.order, self.params)


class Reverse(Progressive):
    """ReverseFuse: training-mode fusion first, then training + inference co-fusion."""

    name = "reverse"
    aliases = ("reverse_fuse",)
    order = ("training", "inference")


@hookimpl
def profuser_register_curricula(register):
    register(Progressive)
    register(Reverse)
