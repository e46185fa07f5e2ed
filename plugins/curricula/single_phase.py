"""One-phase curricula: ``simultaneous`` (SimulFuse), ``training_only`` (Fuse) and ``sft_only`` (CSFT).

App. C's baselines: SimulFuse fuses both modes together from the start, with ProFuser's
phase-2 weights w1 = 0.1 (inference) and w2 = 1 (training): §1 says simultaneous fusion works only
"by assigning a very small weight to inference mode"; Fuse (FuseLLM-style) fuses the training mode
only; CSFT is continual SFT on the same GT data (β = 0, and the csft recipe also sets
``loss: sft``). All run the paper's 3 epochs (§4.1.3), as long as ProFuser's two phases together:
SimulFuse steps over instructions, both modes' examples of each in the same step (``draws``), so
its 3 epochs take as many optimizer steps as Fuse's.
"""

from __future__ import annotations

from pydantic import Field

from profuser import hookimpl
from profuser.components import Curriculum, CurriculumInput, Draws, Phase, PhasePart, StrictModel


class Simultaneous(Curriculum):
    name = "simultaneous"
    aliases = ("simulfuse",)
    beta_params = ("beta",)

    class Params(StrictModel):
        epochs: float = Field(default=3.0, gt=0)
        beta: float = Field(default=0.5, ge=0, description="KL weight (ProFuser's co-fusion value)")
        w1: float = Field(default=0.1, ge=0, description="inference-mode weight (§1: very small; ProFuser's phase-2 0.1)")
        w2: float = Field(default=1.0, ge=0, description="training-mode weight")
        draws: Draws = Field(default="instructions", description="what a step draws: instructions, each with both "
                                                                  "modes' examples (Eq. 5), or examples, each mode's "
                                                                  "alone (the old per-mode scheduling, an ablation)")

    def phases(self, data: CurriculumInput) -> list[Phase]:
        p = self.params
        return [Phase("simultaneous", p.epochs, [PhasePart("inference", p.w1), PhasePart("training", p.w2)], beta=p.beta,
                      draws=p.draws)]


class TrainingOnly(Curriculum):
    name = "training_only"
    aliases = ("fuse",)
    modes = ("training",)
    beta_params = ("beta",)

    class Params(StrictModel):
        epochs: float = Field(default=3.0, gt=0)
        beta: float = Field(default=0.5, ge=0, description="KL weight")

    def phases(self, data: CurriculumInput) -> list[Phase]:
        return [Phase("training", self.params.epochs, [PhasePart("training", 1.0)], beta=self.params.beta)]


class SFTOnly(TrainingOnly):
    name = "sft_only"
    aliases = ("csft",)

    class Params(TrainingOnly.Params):
        beta: float = Field(default=0.0, ge=0, description="KL weight (0: the teacher is ignored)")

    def phases(self, data: CurriculumInput) -> list[Phase]:
        return [Phase("sft", self.params.epochs, [PhasePart("training", 1.0)], beta=self.params.beta)]


@hookimpl
def profuser_register_curricula(register):
    register(Simultaneous)
    register(TrainingOnly)
    register(SFTOnly)
