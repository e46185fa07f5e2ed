"""One module per stage kind; each exposes ``run(ctx: StageContext) -> dict`` (its metrics), a
``VERSION`` string that is part of the cache key (bump it when the stage's output changes), a
``Config`` (a ``StageConfig``: every field the stage reads, built by ``pipeline.plan``) and the
names of its input roles (constants and small functions the planner uses too).

Stage modules import from here, never from each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer

if TYPE_CHECKING:  # the runner's types; importing them here would point the house upwards
    from ..pipeline import Stage
    from ..plugins import Engine
    from ..runtime import Runtime


class StageConfig(BaseModel):
    """What a stage reads. Its cache key hashes ``hashed()``: every field but those ``NOT_HASHED``
    names (a pydantic ``exclude`` spec: options that change where a run reports, not what it
    computes), so a field added later must leave the dump of a config without it as it was."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    NOT_HASHED: ClassVar[dict[str, Any]] = {}
    # fields added after keys existed: left out of the dump while unset (falsy), so a config that
    # does not use them keeps the key it had before they existed
    OMITTED_WHEN_UNSET: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        data = handler(self)
        for name in self.OMITTED_WHEN_UNSET:
            if not getattr(self, name):
                data.pop(name, None)
        return data

    def hashed(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=self.NOT_HASHED or None)


class Ref(BaseModel):
    """A component a stage builds: its registered name and its params (a recipe's ref without
    the label, which only names things in tables)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, ref: Any) -> Ref:
        return cls(name=ref.name, params=ref.params)


# a model's identity (``ModelSpec.identity()``: every field but the label), as stages hash it
ModelIdentity = dict[str, Any]


# here, not in the pipeline: a stage worker (profuser.workers) builds one without the runner
@dataclass
class StageContext:
    """What a stage function gets. It writes its files under ``out`` and returns its metrics."""

    stage: Stage
    inputs: dict[str, Path]  # input role -> finished artifact directory of an upstream stage
    out: Path  # the partial directory; sealed and renamed when the stage returns
    runtime: Runtime
    engine: Engine
    # where log_metrics goes besides this process's observers (a stage worker forwards to the runner)
    metrics_sink: Callable[[int, dict[str, Any]], None] | None = None

    @property
    def config(self) -> Any:
        return self.stage.config

    def build(self, kind: str, ref: Any):
        """Instantiate the component a config names (a ``Ref``, or ``{"name": ..., "params": {...}}``)
        with this run's runtime (device, cache dir, progress, the engine: never part of a key)."""
        name, params = (ref["name"], ref.get("params")) if isinstance(ref, dict) else (ref.name, ref.params)
        runtime = self.runtime if self.runtime.engine is self.engine else replace(self.runtime, engine=self.engine)
        return self.engine.registry.build(kind, name, params or {}, runtime=runtime)

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if self.metrics_sink is not None:
            self.metrics_sink(step, metrics)
        else:
            self.engine.hook.profuser_metrics_logged(stage_id=self.stage.id, step=step, metrics=metrics)
