"""One module per stage kind; each exposes ``run(ctx: StageContext) -> dict`` (its metrics), a
``VERSION`` string that is part of the cache key (bump it when the stage's output changes), a
``Config`` (a ``StageConfig``: every field the stage reads, built by ``pipeline.plan``) and the
names of its input roles (constants and small functions the planner uses too).

Stage modules import from here, never from each other.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_serializer


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
