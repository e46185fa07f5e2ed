"""``length_split`` and ``rm_split`` (§5.2): easy half first, each half fused progressively.

The examples are ranked by difficulty — GT response length (longer = harder) or the target
model's own reward score on its inference-mode answer (lower = harder) — ties broken by id, and
cut into an easy and a hard subset (``easy_fraction``, default a half). Phases, in order:

    easy/inference   inference mode on the easy ids, weight 1, β = first_beta, first_epochs
    easy/co-fusion   inference (w1) + training (w2) on the easy ids, β = second_beta, second_epochs
    hard/inference   the same two phases on the hard ids
    hard/co-fusion

With the defaults each example is seen as often as under ``progressive`` (1 + 2 epochs), so the
two compare at equal compute.
"""

from __future__ import annotations

from abc import abstractmethod

from pydantic import Field

from profuser import hookimpl
from profuser.components import Curriculum, CurriculumInput, Phase
from profuser.errors import ProfuserError

from .progressive import TwoPhaseParams, two_phases


class _DifficultySplit(Curriculum):
    class Params(TwoPhaseParams):
        easy_fraction: float = Field(default=0.5, gt=0, lt=1, description="share of examples in the easy subset")

    @abstractmethod
    def difficulty(self, data: CurriculumInput) -> dict[str, float]:
        """Per id, larger = harder (each split curriculum says by what)."""

    def split(self, data: CurriculumInput) -> tuple[list[str], list[str]]:
        hardness = self.difficulty(data)
        ranked = sorted(data.ids, key=lambda i: (hardness[i], i))
        cut = round(len(ranked) * self.params.easy_fraction)
        return ranked[:cut], ranked[cut:]

    def phases(self, data: CurriculumInput) -> list[Phase]:
        easy, hard = self.split(data)
        return (two_phases("inference", "training", self.params, easy, "easy/")
                + two_phases("inference", "training", self.params, hard, "hard/"))


class LengthSplit(_DifficultySplit):
    name = "length_split"

    def difficulty(self, data: CurriculumInput) -> dict[str, float]:
        missing = [i for i in data.ids if i not in data.gt_length]
        if missing:
            raise ProfuserError(f"length_split: no GT length for {len(missing)} example(s), e.g. {missing[0]!r}")
        return {i: float(data.gt_length[i]) for i in data.ids}


class RMSplit(_DifficultySplit):
    name = "rm_split"

    def difficulty(self, data: CurriculumInput) -> dict[str, float]:
        if data.target_reward is None:
            raise ProfuserError("rm_split needs the target model's own reward scores: list the target among the "
                                "sources and configure inference_mode.reward_models")
        missing = [i for i in data.ids if i not in data.target_reward]
        if missing:
            raise ProfuserError(f"rm_split: no target reward for {len(missing)} of {len(data.ids)} example(s), "
                                f"e.g. {missing[0]!r}")
        return {i: -float(data.target_reward[i]) for i in data.ids}  # lower reward = harder


@hookimpl
def profuser_register_curricula(register):
    register(LengthSplit)
    register(RMSplit)
