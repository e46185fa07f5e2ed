"""``layerwise``: progressive layer-wise fusion (the seed summary's variant), over any mode schedule.

The summary's ProFuser fuses "shallow layers (embeddings + first few Transformer layers) first,
and middle-to-deep layers after stabilization". Here that is a split in time laid over another
curriculum's phases (``schedule``, default ProFuser's ``progressive``): the first ``first_share``
of the schedule's epochs trains only the input embeddings and the first ``first_blocks`` of the
blocks (a fraction of the depth, so one recipe fits any size); the remaining epochs train every
parameter (``then: all``) or only the others (``then: rest``). A schedule phase that straddles the
boundary is cut in two, each piece keeping its parts, weights and β. With the defaults (a third
of progressive's 1 + 2 epochs) the inference-mode phase trains the shallow quarter and co-fusion
trains everything. Frozen parameters get no gradient and no optimizer state (the trainer's
``Phase.trainable``); one process and DDP only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, model_validator

from profuser import hookimpl
from profuser.components import Curriculum, CurriculumInput, Phase, PhaseExamples, StrictModel, Trainable
from profuser.errors import ProfuserError


class ScheduleRef(StrictModel):
    name: str = Field(default="progressive", description="the curriculum whose phases set the modes, weights and β")
    params: dict[str, Any] = Field(default_factory=dict, description="that curriculum's params")


def _inner(ref: ScheduleRef, registry) -> Curriculum:
    """The schedule, built by the registry that builds the layerwise curriculum."""
    if issubclass(registry.get("curricula", ref.name).cls, Layerwise):
        raise ValueError("schedule: a layerwise curriculum cannot schedule another")  # noqa: TRY004  (pydantic reports ValueError)
    return registry.build("curricula", ref.name, ref.params)


class Layerwise(Curriculum):
    name = "layerwise"
    aliases = ("layer_wise",)
    beta_params = ("schedule",)  # the schedule's phases set β

    class Params(StrictModel):
        schedule: ScheduleRef = Field(default_factory=ScheduleRef)
        first_blocks: float = Field(default=0.25, gt=0, le=1,
                                    description="share of the depth (first blocks) trained with the embeddings first")
        first_share: float = Field(default=1 / 3, gt=0, lt=1,
                                   description="share of the schedule's epochs in the shallow stage")
        then: Literal["all", "rest"] = Field(default="all", description="what trains after: everything, or the rest only")
        _schedule: Curriculum | None = PrivateAttr(default=None)  # built while validating

        @model_validator(mode="after")
        def _schedule_valid(self, info: ValidationInfo):
            registry = (info.context or {}).get("registry")
            if registry is None:  # the registry's validation context names the curricula
                raise ValueError("schedule: build layerwise through a registry (Registry.build), which resolves "
                                 "the schedule's name")
            try:
                self._schedule = _inner(self.schedule, registry)
            except ProfuserError as exc:  # an unknown name, or params the schedule refuses
                raise ValueError(f"schedule: {exc}") from None
            return self

    def __init__(self, params=None):
        super().__init__(params)
        self.schedule = self.params._schedule
        self.modes = self.schedule.modes  # the build artifacts are the schedule's

    def stages(self) -> tuple[Trainable, Trainable | None]:
        p = self.params
        first = Trainable(embeddings=True, blocks=(0.0, p.first_blocks), rest=False)
        after = None if p.then == "all" else Trainable(embeddings=False, blocks=(p.first_blocks, 1.0), rest=True)
        return first, after

    def phases(self, data: CurriculumInput) -> list[Phase]:
        inner = self.schedule.phases(data)
        total = sum(ph.epochs for ph in inner)
        cut = self.params.first_share * total  # epochs before the boundary
        first, after = self.stages()
        out, start = [], 0.0
        for ph in inner:
            end = start + ph.epochs
            shallow, deep = min(end, cut) - start, end - max(start, cut)  # the epochs on each side
            if shallow > 1e-9:
                out.append(Phase(f"shallow/{ph.name}", shallow, ph.parts, beta=ph.beta, trainable=first, draws=ph.draws))
            if deep > 1e-9:
                out.append(Phase(f"deep/{ph.name}", deep, ph.parts, beta=ph.beta, trainable=after, draws=ph.draws))
            start = end
        return out

    def order_examples(self, examples: PhaseExamples, rng, epoch: int):
        return self.schedule.order_examples(examples, rng, epoch)  # the schedule's own order


@hookimpl
def profuser_register_curricula(register):
    register(Layerwise)
