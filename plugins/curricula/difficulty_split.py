"""``length_split`` and ``rm_split`` (§5.2): easy half first, each half fused progressively.

The examples are ranked by difficulty — GT response length (longer = harder) or the reward
score of the target model's own inference-mode answer (lower = harder; §5.2: "a subpar score of
the target model") — ties broken by id, and cut into an easy and a hard subset (``easy_fraction``,
default a half). ``rm_split`` ranks by the raw score of one reward model (``score: strongest``:
the ``strongest`` param, by default the inference-mode evaluator's strongest reward model, else
the first listed), or by the mean of per-reward-model z-scores over the examples
(``score: mean_z``); never by vote counts, which tie on most examples. Phases, in order:

    easy/inference   inference mode on the easy ids, weight 1, β = first_beta, first_epochs
    easy/co-fusion   inference (w1) + training (w2) on the easy ids, β = second_beta, second_epochs
    hard/inference   the same two phases on the hard ids
    hard/co-fusion

With the defaults each example is seen as often as under ``progressive`` (1 + 2 epochs), so the
two compare at equal compute.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Literal

from pydantic import Field

from profuser import hookimpl
from profuser.components import Curriculum, CurriculumInput, Phase
from profuser.errors import ProfuserError

from .progressive import TwoPhaseParams, two_phases


class _DifficultySplit(Curriculum):
    beta_params = ("first_beta", "second_beta")

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
    needs_target_reward = True

    class Params(_DifficultySplit.Params):
        score: Literal["strongest", "mean_z"] = Field(
            default="strongest", description="rank by the strongest reward model's raw score, or by the mean of "
                                             "per-reward-model z-scores")
        strongest: str | None = Field(
            default=None, description="label of the reward model whose score ranks (score: strongest); default: the "
                                      "inference-mode evaluator's strongest, else the first listed")

    def difficulty(self, data: CurriculumInput) -> dict[str, float]:
        if data.target_reward is None:
            raise ProfuserError("rm_split needs the target model's own reward scores: list the target among the "
                                "sources and configure inference_mode.reward_models")
        missing = [i for i in data.ids if i not in data.target_reward]
        if missing:
            raise ProfuserError(f"rm_split: no target reward for {len(missing)} of {len(data.ids)} example(s), "
                                f"e.g. {missing[0]!r}")
        # a plain number is one score of unnamed origin (e.g. a JSON file given to python -m profuser.training)
        per_rm = {}
        for i in data.ids:
            reward = data.target_reward[i]
            per_rm[i] = reward if isinstance(reward, dict) else {"score": reward}
        score = self._mean_z(per_rm) if self.params.score == "mean_z" else self._strongest(per_rm)
        return {i: -score[i] for i in data.ids}  # lower reward = harder

    def _strongest(self, per_rm: dict[str, dict[str, float]]) -> dict[str, float]:
        out = {}
        for i, scores in per_rm.items():
            rm = self.params.strongest or next(iter(scores), None)  # the strongest comes first
            if rm not in scores:
                raise ProfuserError(f"rm_split: reward model {rm!r} has no score for example {i!r} "
                                    f"(reward models: {', '.join(scores) or 'none'})")
            out[i] = float(scores[rm])
        return out

    @staticmethod
    def _mean_z(per_rm: dict[str, dict[str, float]]) -> dict[str, float]:
        rms = list(dict.fromkeys(rm for scores in per_rm.values() for rm in scores))
        lacking = [(i, rm) for rm in rms for i, scores in per_rm.items() if rm not in scores]
        if lacking:
            raise ProfuserError(f"rm_split: reward model {lacking[0][1]!r} has no score for example {lacking[0][0]!r} "
                                "(score: mean_z needs every reward model's score of every example)")
        z: dict[str, float] = dict.fromkeys(per_rm, 0.0)
        for rm in rms:
            values = [float(per_rm[i][rm]) for i in per_rm]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            for i in per_rm:  # a reward model that scores every answer alike ranks nothing: z = 0
                z[i] += (float(per_rm[i][rm]) - mean) / std if std > 0 else 0.0
        return {i: total / max(len(rms), 1) for i, total in z.items()}


@hookimpl
def profuser_register_curricula(register):
    register(LengthSplit)
    register(RMSplit)
