"""SFT warm-up, then ProFuser's progressive fusion: a curriculum published as its own package."""

from pydantic import Field

from profuser import hookimpl
from profuser.components import Curriculum, CurriculumInput, Phase, PhasePart, StrictModel


class SFTWarmup(Curriculum):
    """Plain SFT on the ground truth first (no teacher, β = 0), then inference → training fusion."""

    name = "sft_warmup"
    aliases = ("warmup",)
    modes = ("inference", "training")
    beta_params = ("beta",)  # every phase sets β, so a recipe's loss.params.beta would do nothing

    class Params(StrictModel):
        warmup_epochs: float = Field(default=1.0, gt=0)
        inference_epochs: float = Field(default=1.0, gt=0)
        fusion_epochs: float = Field(default=2.0, gt=0)
        beta: float = Field(default=0.5, ge=0)

    def phases(self, data: CurriculumInput) -> list[Phase]:
        p = self.params
        return [
            Phase("sft-warmup", p.warmup_epochs, [PhasePart("training")], beta=0.0),
            Phase("inference", p.inference_epochs, [PhasePart("inference")], beta=0.1),
            Phase("co-fusion", p.fusion_epochs, [PhasePart("inference", 0.1), PhasePart("training", 1.0)], beta=p.beta),
        ]


@hookimpl
def profuser_register_curricula(register):
    register(SFTWarmup)
