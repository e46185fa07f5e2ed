"""Every hook profuser calls. Plugins implement them with ``profuser.hookimpl``.

Registration hooks receive a ``register`` callback (the pattern of simonw/llm)::

    from profuser import hookimpl

    @hookimpl
    def profuser_register_curricula(register):
        register(MyCurriculum)                      # name taken from MyCurriculum.name
        register(MyCurriculum, name="mine-short", aliases=["ms"])

``register(cls, name=None, aliases=())`` takes a subclass of the kind's base class in
``profuser.components``; ``cls.Params`` (a pydantic model, extra fields forbidden) validates
the ``params:`` a recipe gives it. A name registered twice for one kind is an error that names
both plugins.

Observer hooks are called in every plugin that implements them; their return values are ignored.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("profuser")
hookimpl = pluggy.HookimplMarker("profuser")


# --- registration: one hook per component kind ------------------------------------------------


@hookspec
def profuser_register_datasets(register):
    """Register dataset sources (``components.DatasetSource``): where instruction records come from."""


@hookspec
def profuser_register_models(register):
    """Register built-in model references (``components.BuiltinModel``), used as ``builtin:NAME``."""


@hookspec
def profuser_register_generators(register):
    """Register generation backends (``components.Generator``) for the inference mode."""


@hookspec
def profuser_register_reward_models(register):
    """Register reward models (``components.RewardModel``): one score per (instruction, response)."""


@hookspec
def profuser_register_evaluators(register):
    """Register advantage evaluators (``components.AdvantageEvaluator``): pick the advantaged source.
    Its ``needs`` must be among ``components.NEEDS[mode]``, else registration fails naming the plugin."""


@hookspec
def profuser_register_aligners(register):
    """Register tokenizer aligners (``components.Aligner``): source distributions onto target tokens."""


@hookspec
def profuser_register_losses(register):
    """Register fusion losses (``components.Loss``), computed on sparse teacher distributions
    (``profuser.losses``: the kernel and base class the built-ins use)."""


@hookspec
def profuser_register_curricula(register):
    """Register curricula (``components.Curriculum``): turn the data of both modes into training phases."""


# --- observers --------------------------------------------------------------------------------


@hookspec
def profuser_stage_started(stage_id: str, key: str, run_dir: str):
    """A stage is about to run (not called for a stage reused from the cache)."""


@hookspec
def profuser_stage_finished(stage_id: str, key: str, cached: bool, seconds: float, metrics: dict):
    """A stage finished, or was found in the cache (``cached=True``)."""


@hookspec
def profuser_metrics_logged(stage_id: str, step: int, metrics: dict):
    """A stage logged metrics (training: loss parts, KL, learning rate, tokens/s per step)."""


@hookspec
def profuser_run_finished(run_dir: str, summary: dict):
    """A whole recipe finished; ``summary`` is what ``run.json`` holds."""
