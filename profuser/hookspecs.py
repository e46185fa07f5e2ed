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

Registration hooks are called once per plugin engine (``profuser.plugins.Engine``: built by the
command line, by a test, and again in each stage worker process), in every plugin that implements
them. Observer hooks are called in every plugin that implements them, in the process that runs the
pipeline (``profuser.pipeline.Runner``); their return values are ignored, and an exception in one
stops the run. docs/plugins.md ("Hook reference") lists every hook with its arguments and when it
fires; tests/test_hook_reference.py keeps that list and this module in step.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("profuser")
hookimpl = pluggy.HookimplMarker("profuser")


# --- registration: one hook per component kind ------------------------------------------------


@hookspec
def profuser_register_datasets(register):
    """Register dataset sources (``components.DatasetSource``): where instruction records come from.
    ``register``: ``register(cls, name=None, aliases=())`` adds one."""


@hookspec
def profuser_register_models(register):
    """Register built-in model references (``components.BuiltinModel``), used as ``builtin:NAME``.
    ``register``: ``register(cls, name=None, aliases=())`` adds one."""


@hookspec
def profuser_register_generators(register):
    """Register generation backends (``components.Generator``) for the inference mode.
    ``register``: ``register(cls, name=None, aliases=())`` adds one."""


@hookspec
def profuser_register_reward_models(register):
    """Register reward models (``components.RewardModel``): one score per (instruction, response).
    ``register``: ``register(cls, name=None, aliases=())`` adds one."""


@hookspec
def profuser_register_evaluators(register):
    """Register advantage evaluators (``components.AdvantageEvaluator``): pick the advantaged source.
    Its ``needs`` must be among ``components.NEEDS[mode]``, else registration fails naming the plugin.
    ``register``: ``register(cls, name=None, aliases=())`` adds one."""


@hookspec
def profuser_register_aligners(register):
    """Register tokenizer aligners (``components.Aligner``): source distributions onto target tokens.
    ``register``: ``register(cls, name=None, aliases=())`` adds one."""


@hookspec
def profuser_register_losses(register):
    """Register fusion losses (``components.Loss``), computed on sparse teacher distributions
    (``profuser.losses``: the kernel and base class the built-ins use).
    ``register``: ``register(cls, name=None, aliases=())`` adds one."""


@hookspec
def profuser_register_curricula(register):
    """Register curricula (``components.Curriculum``): turn the data of both modes into training phases.
    ``register``: ``register(cls, name=None, aliases=())`` adds one."""


# --- observers --------------------------------------------------------------------------------


@hookspec
def profuser_stage_started(stage_id: str, key: str, run_dir: str):
    """A stage is about to compute: its partial directory exists and its inputs are sealed. Not
    called for a stage reused from the store (``profuser_stage_finished`` says ``cached=True``).

    ``stage_id``: the stage's id (``data``, ``logits/training/gemma``, ``train``, ...); ``key``: its
    cache key (its artifact becomes ``<runs>/store/<kind>/<key>/``); ``run_dir``: the recipe's run
    directory (``<runs>/runs/<recipe name>``)."""


@hookspec
def profuser_stage_finished(stage_id: str, key: str, cached: bool, seconds: float, metrics: dict):
    """A stage's artifact is sealed, or was found in the store.

    ``stage_id`` and ``key`` as for ``profuser_stage_started``; ``cached``: True when it was reused
    from the store, False when this run computed it; ``seconds``: the wall time it took
    (0.0 when cached); ``metrics``: what the stage's ``run`` returned (when cached: what its
    manifest recorded then), e.g. ``examples``, ``teacher_share`` for build. Not called when a
    stage fails: the run stops with its error."""


@hookspec
def profuser_metrics_logged(stage_id: str, step: int, metrics: dict):
    """A running stage logged metrics (``StageContext.log_metrics``), between its started and
    finished calls: ``train`` once per optimizer step (loss parts, KL, learning rate, tokens/s,
    phase), ``generate`` and ``score`` once per shard. From a stage worker process they are sent to
    the runner and the hook is called there.

    ``stage_id``: the stage's id; ``step``: the optimizer step (train) or shard index; ``metrics``:
    name -> value (JSON-serialisable)."""


@hookspec
def profuser_run_finished(run_dir: str, summary: dict):
    """A whole run finished: after its last selected stage (``--until`` stops earlier) and after
    ``run.json`` was written; once per run, on rank 0 of a multi-process launch. Not called when a
    stage fails.

    ``run_dir``: the recipe's run directory; ``summary``: what ``run.json`` holds: ``recipe`` (its
    name), ``started_at`` (epoch seconds), ``seconds``, and ``stages``, one dict per stage run or
    reused (``id``, ``kind``, ``key``, ``cached``, ``seconds``, ``metrics``, ``path``,
    ``build_seconds``)."""
