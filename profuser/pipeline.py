"""Plan a recipe into stages and run them against the artifact store.

Each stage reads upstream artifacts and writes one artifact directory, cached under a key that
hashes the stage kind, the slice of the recipe it reads (``config``), its upstream keys and the
versions of the code and plugins that run it. Runtime options (paths, device, progress) are not
part of the key. Two recipes that differ only in their curriculum share every stage before
``train``: that is what makes side-by-side ablations cheap.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import __version__
from .components import MODES
from .errors import ProfuserError, RecipeError
from .fingerprint import FingerprintCache, change_reasons, content_fingerprints, hashed_content, source_hash
from .plugins import Engine
from .recipe import Recipe, TrainSpec, with_device_dtype
from .runtime import Runtime, local_rank, rank_and_world, runtime_of, wait_until  # noqa: F401  (re-exported)
from .stages import StageConfig, StageContext
from .store import Artifact, ArtifactStore, atomic_write_json, atomic_write_text, disk_errors, stable_hash

STAGE_KINDS = ("data", "generate", "score", "logits", "select", "align", "build", "train", "judge", "evaluate", "merge")
# the stages that load a model: run in a worker process when the runtime isolates stages (a stage
# module may say otherwise with LOADS_MODEL = True / False)
MODEL_STAGE_KINDS = frozenset({"generate", "score", "logits", "train", "judge", "evaluate"})
KEY_INPUTS = "key_inputs.json"  # runs/<name>/: what each stage's key hashed at its last run


@dataclass
class Stage:
    id: str  # e.g. "logits/training/gemma3-270m"
    kind: str  # one of STAGE_KINDS: the module profuser.stages.<kind> runs it
    # what the stage reads: its module's ``Config`` (a mapping given is validated into it; a module
    # without one, a test's or plugin's own stage, keeps its mapping), hashed into the key
    config: StageConfig | dict[str, Any]
    deps: dict[str, str] = field(default_factory=dict)  # input role -> upstream stage id
    components: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) it builds
    module: str = ""  # the module with run() and VERSION; default profuser.stages.<kind>
    # a stage of another recipe whose model this one names (recipe:<path>): that recipe's file, and
    # the "<its name>:" its id starts with; empty for the recipe's own stages
    origin: str = ""
    prefix: str = ""

    def __post_init__(self):
        if isinstance(self.config, dict) and (config_cls := getattr(self.code(), "Config", None)) is not None:
            self.config = config_cls.model_validate(self.config)

    def code(self):
        return importlib.import_module(self.module or f"profuser.stages.{self.kind}")

    def hashed_config(self) -> dict[str, Any]:
        """The config as its cache key and manifest hold it."""
        return self.config.hashed() if isinstance(self.config, StageConfig) else self.config


# --- planning -----------------------------------------------------------------------------------


def plan(recipe: Recipe, engine: Engine, *, device: str = "auto", _chain: tuple[Path, ...] = ()) -> list[Stage]:
    """The stages of a recipe, upstream first. Each stage's config is its module's ``Config``;
    each input role is named by the consuming module (``build.align_role(k)``). A model named
    ``recipe:<path>`` is made by that recipe's own stages, planned first (``plan_recipe_refs``).
    A model spec without a dtype gets the default of ``device``, the runtime's (``with_device_dtype``)."""
    # here, not at the top: importing the pipeline stays light (build imports the trainer, torch)
    from .stages import (
        Ref,
        align,
        build,
        data,
        evaluate,
        generate,
        judge,
        logits,
        merge,
        score,
        select,
        train,
    )

    recipe = with_device_dtype(recipe, device)
    upstream_stages, recipe, recipe_models = plan_recipe_refs(recipe, engine, _chain, device=device)
    registry = engine.registry
    # an instance: a curriculum that composes another (layerwise) takes that one's modes
    curriculum = registry.build("curricula", recipe.curriculum.name, recipe.curriculum.params)
    modes = [m for m in MODES if m in curriculum.modes]
    target = recipe.target.identity()
    source_keys = [s.key for s in recipe.sources]
    dataset = registry.build("datasets", recipe.data.source.name, recipe.data.source.params)
    # what the dataset reads (a file's content hashes): an edit in place must invalidate the data stage
    stages: list[Stage] = [Stage("data", "data", data.Config(data=recipe.data, files=dataset.fingerprint()),
                                 components=[("datasets", recipe.data.source.name)])]
    loss = registry.get("losses", recipe.loss.name).cls
    # a loss that reads every source's teacher on each example: every source is aligned (and, in
    # inference mode, teacher-forced) on every example's chosen response; other recipes' keys stay
    all_teachers = "all_teachers" in loss.needs
    # a loss that reads no teacher on the training mode alone (CSFT): the ground truth is all it
    # trains on, so no source is teacher-forced, selected or aligned; build reads the data alone
    teacherless = not loss.teacher and modes == ["training"]
    if recipe.merges:  # merge baselines need nothing upstream: first, so bad models stop the run early
        stages += [Stage(f"merge/{m.key}", "merge", merge.stage_config(m, recipe.seed)) for m in recipe.merges]

    if "inference" in modes:
        im = recipe.inference_mode
        evaluator = registry.get("evaluators", im.evaluator.name).cls
        if evaluator.mode != "inference":
            raise RecipeError([("inference_mode.evaluator.name", f"{im.evaluator.name!r} evaluates the {evaluator.mode} mode")])
        for src in recipe.sources:
            stages.append(Stage(f"generate/{src.key}", "generate",
                                generate.Config(model=src.identity(), generator=Ref.of(im.generator), seed=recipe.seed),
                                {generate.DATA: "data"}, [("generators", im.generator.name)]))
        uses_scores = "scores" in evaluator.needs
        select_deps = {select.DATA: "data", **{select.generations_role(k): f"generate/{k}" for k in source_keys}}
        if uses_scores:
            if not im.reward_models:
                raise RecipeError([("inference_mode.reward_models",
                                    f"the evaluator {im.evaluator.name!r} needs at least one reward model")])
            for rm in im.reward_models:
                stages.append(Stage(f"score/{rm.key}", "score", score.Config(reward_model=Ref.of(rm), sources=source_keys),
                                    {score.DATA: "data", **{score.generations_role(k): f"generate/{k}" for k in source_keys}},
                                    [("reward_models", rm.name)]))
                select_deps[select.scores_role(rm.key)] = f"score/{rm.key}"
        stages.append(Stage("select/inference", "select",
                            select.Config(mode="inference", evaluator=Ref.of(im.evaluator), sources=source_keys,
                                          reward_models=[rm.key for rm in im.reward_models] if uses_scores else []),
                            select_deps, [("evaluators", im.evaluator.name)]))
        for src in recipe.sources:
            if all_teachers:  # on every example's chosen response, whichever source generated it
                logits_deps = {logits.DATA: "data", logits.SELECTION: "select/inference",
                               **{logits.generations_role(k): f"generate/{k}" for k in source_keys}}
            else:
                logits_deps = {logits.DATA: "data", logits.GENERATIONS: f"generate/{src.key}",
                               logits.SELECTION: "select/inference"}
            stages.append(Stage(f"logits/inference/{src.key}", "logits",
                                logits.Config(mode="inference", model=src.identity(), source=src.key, distill=recipe.distill,
                                              all_examples=all_teachers),
                                logits_deps))

    if "training" in modes and not teacherless:
        tm = recipe.training_mode
        evaluator = registry.get("evaluators", tm.evaluator.name).cls
        if evaluator.mode != "training":
            raise RecipeError([("training_mode.evaluator.name", f"{tm.evaluator.name!r} evaluates the {evaluator.mode} mode")])
        for src in recipe.sources:
            stages.append(Stage(f"logits/training/{src.key}", "logits",
                                logits.Config(mode="training", model=src.identity(), source=src.key, distill=recipe.distill),
                                {logits.DATA: "data"}))
        stages.append(Stage("select/training", "select",
                            select.Config(mode="training", evaluator=Ref.of(tm.evaluator), sources=source_keys, reward_models=[]),
                            {select.DATA: "data", **{select.logits_role(k): f"logits/training/{k}" for k in source_keys}},
                            [("evaluators", tm.evaluator.name)]))

    for mode in modes:
        if teacherless:
            stages.append(Stage(f"build/{mode}", "build",
                                build.Config(mode=mode, target=target, max_length=recipe.train.max_length, sources=[],
                                             teacherless=True), {build.DATA: "data"}))
            continue
        for src in recipe.sources:
            stages.append(Stage(f"align/{mode}/{src.key}", "align",
                                align.Config(mode=mode, aligner=Ref.of(recipe.aligner), target=target, source=src.identity(),
                                             source_key=src.key, max_length=recipe.train.max_length,
                                             columns=sorted(set(loss.needs) & set(align.EXTRA_COLUMNS)),
                                             all_examples=all_teachers),  # every selected example, not only its wins
                                {align.LOGITS: f"logits/{mode}/{src.key}", align.SELECTION: f"select/{mode}", align.DATA: "data"},
                                [("aligners", recipe.aligner.name)]))
        stages.append(Stage(f"build/{mode}", "build",
                            build.Config(mode=mode, target=target, max_length=recipe.train.max_length, sources=source_keys,
                                         columns=sorted(set(loss.needs) & set(build.EXTRA_COLUMNS)),
                                         all_teachers=all_teachers),
                            {build.DATA: "data", build.SELECTION: f"select/{mode}",
                             **{build.align_role(k): f"align/{mode}/{k}" for k in source_keys}}))

    train_deps = {train.build_role(m): f"build/{m}" for m in modes}
    if "inference" in modes:
        train_deps[train.SELECTION] = "select/inference"
    stages.append(Stage("train", "train",
                        train.Config(target=target, target_key=recipe.target.key, loss=Ref.of(recipe.loss),
                                     curriculum=Ref.of(recipe.curriculum), train=recipe.train, recipe_name=recipe.name,
                                     sources=source_keys, card_recipe=card_recipe(recipe)),
                        train_deps, [("losses", recipe.loss.name), ("curricula", recipe.curriculum.name)]))

    ev = recipe.evaluate
    if ev.tasks:
        # the win rate's judge, keyed by its code like any third-party component; a built-in's code is
        # profuser's version, keyed already (listing it would change the keys evaluations have)
        judge_components = evaluate.judge_components(ev)  # none without the win rate
        judge_parts = [(kind, name) for kind, name in judge_components
                       if not engine.plugins[registry.get(kind, name).plugin].builtin]
        eval_deps = {evaluate.DATA: "data"}
        if judge_components:  # the win rate: the reference's answers, judged once for every evaluation
            reference = ev.judge.reference
            stages.append(Stage(f"judge/{reference.key}", "judge",
                                judge.Config(model=reference.identity(), generator=Ref.of(ev.judge.generator),
                                             reward_model=Ref.of(ev.judge.reward_model),
                                             limit=evaluate.task_limit(ev, evaluate.HELDOUT_WINRATE_TASK)),
                                {judge.DATA: "data"}, list(judge_parts)))
            eval_deps[evaluate.JUDGE] = f"judge/{reference.key}"
        stages.append(Stage("evaluate/fused", "evaluate",
                            evaluate.Config(model=None, label="fused", evaluate=ev),
                            {evaluate.MODEL: "train", **eval_deps}, list(judge_parts)))
        if ev.baselines:
            baselines = {recipe.target.key: recipe.target, **{s.key: s for s in recipe.sources}}
            for key, spec in baselines.items():
                stages.append(Stage(f"evaluate/{key}", "evaluate",
                                    evaluate.Config(model=spec.identity(), label=key, evaluate=ev),
                                    dict(eval_deps), list(judge_parts)))
        for m in recipe.merges:  # evaluated whatever evaluate.baselines says: the recipe asks for them
            stages.append(Stage(f"evaluate/merge/{m.key}", "evaluate",
                                evaluate.Config(model=None, label=f"{m.key} (merge)", evaluate=ev),
                                {evaluate.MODEL: f"merge/{m.key}", **eval_deps}, list(judge_parts)))
    return _with_recipe_models(upstream_stages, stages, recipe_models)


# --- recipe refs: a model another recipe makes ----------------------------------------------------
# In this recipe's stage configs a ref ``recipe:<path>`` becomes ``recipe:<its name>`` (``#<label>``
# for a merge): a role each stage that reads the model gets as an input, the upstream train (or
# merge) stage. Keys chain through that input's key, never a path; the runner hands the stage the
# artifact's model/ folder in place of the role (``with_recipe_models``).


def plan_recipe_refs(recipe: Recipe, engine: Engine, chain: tuple[Path, ...] = (), *, device: str = "auto",
                     ) -> tuple[list[Stage], Recipe, dict[str, str]]:
    """(the stages that make the models ``recipe`` names by ``recipe:`` refs, the recipe with those
    refs replaced by their roles, role -> the stage that makes its model). Each named recipe is
    planned as if it ran alone, down to the stage that makes its model (train, or
    ``merge/<label>``), with ids under ``<its name>:``."""
    from .recipe import _spec_at, load_recipe, recipe_refs, replace_recipe_refs, split_recipe_ref

    dump = recipe.model_dump(mode="json", exclude_unset=True)  # revalidated below: fields unset stay unset
    refs = recipe_refs(dump)
    if not refs:
        return [], recipe, {}  # an ordinary recipe: nothing changes
    roles: dict[str, tuple[str, str]] = {}  # ref -> (role, the stage id that makes its model)
    stages: dict[str, Stage] = {}
    names: dict[str, Path] = {}
    for field_path, ref in refs:
        if ref in roles:
            continue
        path, label = split_recipe_ref(ref)
        file = Path(path).resolve()
        if file in chain:
            cycle = " -> ".join(p.name for p in (*chain[chain.index(file):], file))
            raise RecipeError([(field_path, f"circular recipe refs: {cycle}")])
        made = load_recipe(file, registry=engine.registry, _chain=chain)
        if names.setdefault(made.name, file) != file:
            raise RecipeError([(field_path, (f"two recipes named {made.name!r} ({names[made.name]} and {file}): "
                                             "give them distinct names"))])
        theirs = plan(made, engine, device=device, _chain=(*chain, file))
        model_stage = f"merge/{label}" if label else "train"
        if model_stage not in {s.id for s in theirs}:
            raise RecipeError([(field_path, f"{file.name} makes no model {label!r}")])
        prefix = f"{made.name}:"
        needed = upstream(theirs, {model_stage})
        for s in theirs:
            if s.id in needed and prefix + s.id not in stages:
                stages[prefix + s.id] = replace(s, id=prefix + s.id, deps={r: prefix + d for r, d in s.deps.items()},
                                                origin=s.origin or str(file), prefix=prefix + s.prefix)
        roles[ref] = (f"recipe:{made.name}" + (f"#{label}" if label else ""), prefix + model_stage)

    for field_path, _ in refs:  # a model spec keeps the name it had (by default the file's stem)
        spec = _spec_at(recipe, field_path)
        if spec is not None and not spec.label:
            node: Any = dump
            for part in field_path.split(".")[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            node["label"] = spec.key
    resolved = Recipe.model_validate(replace_recipe_refs(dump, lambda ref: roles[ref][0]))
    return list(stages.values()), resolved, dict(roles.values())


def _with_recipe_models(upstream_stages: list[Stage], stages: list[Stage], models: dict[str, str]) -> list[Stage]:
    """The upstream recipes' stages first, then this recipe's, each reading a ``recipe:`` model
    with the stage that makes it as an input (its key chains through that stage's key)."""
    from .recipe import recipe_refs

    if not models:
        return stages
    for stage in stages:
        config = stage.config.model_dump(mode="json") if isinstance(stage.config, StageConfig) else stage.config
        for _, role in recipe_refs(config):
            if role in models:
                stage.deps[role] = models[role]
        if stage.id == "train":  # its card's lineage names each recipe: model and the key that made it
            for role, made_by in models.items():
                stage.deps.setdefault(role, made_by)
    return upstream_stages + stages


def with_recipe_models(stage: Stage, inputs: dict[str, Path]) -> Stage:
    """The stage as it runs: each ``recipe:`` role in its config replaced by the model folder of
    the input that role names (the key and manifest keep the role)."""
    from .recipe import replace_recipe_refs

    folders = {role: str(path / "model") for role, path in inputs.items() if role.startswith("recipe:")}
    if not folders:
        return stage
    if not isinstance(stage.config, StageConfig):
        return replace(stage, config=replace_recipe_refs(stage.config, lambda ref: folders.get(ref, ref)))
    # only the fields set: a default stays a default (train.report_to's missing tracker is skipped, not refused)
    config = replace_recipe_refs(stage.config.model_dump(mode="json", exclude_unset=True), lambda ref: folders.get(ref, ref))
    return replace(stage, config=type(stage.config).model_validate(config))


def card_recipe(recipe: Recipe) -> str:
    """The recipe as the fused model's card shows it: what made the model, without how the run
    executed (runtime), its cost estimate or its evaluation (other stages read those)."""
    return _dump_yaml(recipe, exclude={"runtime": True, "estimate": True, "evaluate": True, "merges": True,
                                       "train": set(TrainSpec.NOT_HASHED)})


def stage_keys(stages: list[Stage], engine: Engine) -> dict[str, str]:
    """The cache key of every stage (stages must be in upstream-first order)."""
    return stage_key_inputs(stages, engine)[0]


def stage_key_inputs(stages: list[Stage], engine: Engine, cache: FingerprintCache | None = None,
                     ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Every stage's key and what it hashes (run.json keeps the latter: ``--dry-run`` names what
    changed). Besides the config: the content of the local files it names (``content``, by
    fingerprint) and the source of third-party components it builds (``code``), each present only
    when non-empty, so keys of recipes with builtin: and hub models and built-in plugins stay."""
    cache = cache or FingerprintCache()
    keys: dict[str, str] = {}
    inputs: dict[str, dict[str, Any]] = {}
    for stage in stages:
        code_module = stage.code()
        versions = {"profuser": __version__, "stage": getattr(code_module, "VERSION", "1")}
        code: dict[str, str] = {}
        for kind, name in stage.components:
            info = engine.registry.get(kind, name)
            versions[f"{kind}:{name}"] = f"{info.cls.__module__}.{info.cls.__qualname__}@{engine.plugins[info.plugin].version}"
            if not engine.plugins[info.plugin].builtin and (digest := info.code_hash()):
                code[f"{kind}:{name}"] = digest  # an edit in place, with no version bump, recomputes
        if not code_module.__name__.startswith("profuser.") and (digest := source_hash(code_module.__name__)):
            code["stage:"] = digest  # a plugin's own stage module
        config = stage.hashed_config()
        content = _content(stage, config, cache)
        hashed = {
            "kind": stage.kind,
            "config": config,
            "deps": {role: keys[dep] for role, dep in sorted(stage.deps.items())},
            "versions": versions,
            **({"content": hashed_content(content)} if content else {}),
            **({"code": code} if code else {}),
        }
        keys[stage.id] = stable_hash(hashed)[:20]
        inputs[stage.id] = {**hashed, "content_paths": {label: e["path"] for label, e in content.items()}}
    cache.save()
    return keys, inputs


def _content(stage: Stage, config: dict[str, Any], cache: FingerprintCache) -> dict[str, dict[str, Any]]:
    """The local files a built-in stage's config names (a plugin's own stage module is keyed by
    its code; its config may name files it writes). The data stage's dataset hashes what it
    reads itself (``data.Config.files``)."""
    if not stage.code().__name__.startswith("profuser.stages."):
        return {}
    return content_fingerprints(config, cache, skip=("data",) if stage.kind == "data" else ())


def select_stages(stages: list[Stage], pattern: str) -> set[str]:
    """Stage ids a CLI pattern names: an exact id, a kind (``logits``) or an id prefix (``logits/training``)."""
    # a kind names this recipe's stages only: `--force train` never retrains a recipe: model, which
    # its own id (`arith:train`) or prefix (`arith:`) names
    return {s.id for s in stages if s.id == pattern or (s.kind == pattern and not s.prefix)
            or s.id.startswith(pattern.rstrip("/") + "/") or (pattern.endswith(":") and s.id.startswith(pattern))}


def dependents(stages: list[Stage], roots: set[str]) -> set[str]:
    found = set(roots)
    for stage in stages:  # upstream-first, so one pass is enough
        if any(dep in found for dep in stage.deps.values()):
            found.add(stage.id)
    return found


def upstream(stages: list[Stage], roots: set[str]) -> set[str]:
    by_id = {s.id: s for s in stages}
    found: set[str] = set()
    todo = list(roots)
    while todo:
        sid = todo.pop()
        if sid not in found:
            found.add(sid)
            todo += by_id[sid].deps.values()
    return found


# --- running ------------------------------------------------------------------------------------


@dataclass
class StageResult:
    id: str
    kind: str
    key: str
    cached: bool
    seconds: float
    metrics: dict[str, Any]
    path: str
    build_seconds: float = 0.0  # what computing it cost when it ran (for a cached stage: back then)


class Runner:
    def __init__(self, recipe: Recipe, engine: Engine, runtime: Runtime, *, force: list[str] = (),
                 until: str | None = None, echo: Callable[[str], None] = print, stages: list[Stage] | None = None):
        # unset model dtypes: the device's default (bf16 on a GPU that has it), as the stages get them
        self.recipe = recipe = with_device_dtype(recipe, runtime.device)
        self.engine = engine
        if runtime.isolate_stages == "auto" and recipe.runtime.isolate_stages != "auto":
            runtime = replace(runtime, isolate_stages=recipe.runtime.isolate_stages)  # the recipe asks
        self.runtime = replace(runtime, engine=engine)  # components resolve builtin: models with it
        self.store = ArtifactStore(runtime.runs_dir, on_corrupt=lambda path, why: echo(
            f"[corrupt] {path}: {why}; moved aside, it will be recomputed"))
        self.stages = stages if stages is not None else plan(recipe, engine, device=runtime.device)
        self.keys, self.key_inputs = stage_key_inputs(self.stages, engine)
        self.echo = echo
        self.forced: set[str] = set()
        for pattern in force:
            matched = select_stages(self.stages, pattern)
            if not matched:
                raise ProfuserError(f"no stage matches {pattern!r} (stages: {', '.join(s.id for s in self.stages)})", where="--force")
            self.forced |= dependents(self.stages, matched)
        self.selected = {s.id for s in self.stages}
        if until:
            roots = select_stages(self.stages, until)
            if not roots:
                raise ProfuserError(f"no stage matches {until!r} (stages: {', '.join(s.id for s in self.stages)})", where="--until")
            self.selected = upstream(self.stages, roots)

    @property
    def run_dir(self) -> Path:
        return self.runtime.runs_dir / "runs" / self.recipe.name

    def status(self) -> list[tuple[Stage, str, bool]]:
        """(stage, key, cached?) for the selected stages, without running anything. Each artifact is
        verified as a run would (a corrupt one counts as to run) but not moved aside."""
        return [(s, self.keys[s.id], s.id not in self.forced and self.store.get(s.kind, self.keys[s.id], quarantine=False) is not None)
                for s in self.stages if s.id in self.selected]

    def previous_key_inputs(self) -> dict[str, dict[str, Any]]:
        try:
            found = json.loads((self.run_dir / KEY_INPUTS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    def reasons(self, status: list[tuple[Stage, str, bool]] | None = None) -> dict[str, list[str]]:
        """Why each selected stage that is not cached will run (``status()``'s, or the one given),
        against this recipe's last run (``runs/<name>/key_inputs.json``): the file, component
        code, version, config field or upstream stage that changed."""
        previous = self.previous_key_inputs()
        found = {}
        for stage, _key, cached in self.status() if status is None else status:
            if not cached:
                if stage.id in self.forced:
                    found[stage.id] = ["--force"]
                    continue
                roles = dict(stage.deps)
                found[stage.id] = change_reasons(previous.get(stage.id), self.key_inputs[stage.id], roles)
        return found

    def run(self) -> list[StageResult]:
        # --force deletes an artifact: never one that another live run is reading
        for stage in self.stages:
            if stage.id in self.forced and stage.id in self.selected and self.store.leased(stage.kind, self.keys[stage.id]):
                raise ProfuserError(f"{stage.id} is read by a live run (leased): forcing it would delete it under that run; "
                                    "wait for that run to end or stop it", where="--force")
        # a shared lease on every stage it will read or write, before it reads any: `runs --gc`
        # removes none of them until the run ends (or dies: the kernel frees its leases)
        leases = self.store.lease((s.kind, self.keys[s.id]) for s in self.stages if s.id in self.selected)
        try:
            return self._run_leased()
        finally:
            leases.release()

    def _run_leased(self) -> list[StageResult]:
        main = rank_and_world()[0] == 0  # run-level records are written once, by rank 0
        if main:
            with self._records():
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.run_dir / "recipe.yaml", _dump_yaml(self.recipe))
        results: dict[str, StageResult] = {}
        started = time.time()
        for stage in self.stages:
            if stage.id not in self.selected:
                continue
            # a full or read-only disk: one line naming the file and the space left, not a traceback
            with disk_errors(self.store.partial_dir(stage.kind, self.keys[stage.id]), where=stage.id):
                results[stage.id] = self._run_stage(stage, results)
        summary = {
            "recipe": self.recipe.name,
            "started_at": started,
            "seconds": time.time() - started,
            "stages": [vars(r) for r in results.values()],
        }
        if main:
            with self._records():
                atomic_write_json(self.run_dir / "run.json", summary)
                # what each key hashed, for the next --dry-run's reasons; stages this run skipped keep theirs
                atomic_write_json(self.run_dir / KEY_INPUTS, {**self.previous_key_inputs(),
                                                              **{sid: self.key_inputs[sid] for sid in results}})
                if "train" in results:
                    self._link(self.run_dir / "model", Path(results["train"].path) / "model")
            self.engine.hook.profuser_run_finished(run_dir=str(self.run_dir), summary=summary)
        return list(results.values())

    @contextlib.contextmanager
    def _records(self) -> Iterator[None]:
        """Run records (recipe.yaml, run.json, the model link) on a read-only runs directory: a
        fully cached run needs to write nothing else, so it goes on without them, and says so."""
        try:
            yield
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            if not getattr(self, "_said_read_only", False):
                self._said_read_only = True
                self.echo(f"[note]   {self.run_dir}: read-only file system; the run record is not updated")

    def _run_stage(self, stage: Stage, results: dict[str, StageResult]) -> StageResult:
        key = self.keys[stage.id]
        if stage.id in self.forced:
            self.store.invalidate(stage.kind, key)
            self.forced.discard(stage.id)  # once per run
        rank, world = rank_and_world()
        distributed = getattr(stage.code(), "DISTRIBUTED", False)
        artifact = self.store.get(stage.kind, key)
        if artifact is None and world > 1 and rank > 0:
            if not distributed:  # a stage that does not use every rank: rank 0 computes it
                artifact = self._wait_for(stage, key, "rank 0 computes it")
            else:  # rank 0 holds the stage's lock for the whole launch
                return self._compute(stage, key, results)
        if artifact is None:
            # one computation per key across processes: a second run of the same recipe (or of one
            # that shares the stage) waits here, then reuses what the first sealed
            with self.store.lock(stage.kind, key, on_wait=lambda holder: self.echo(
                    f"[wait]   {stage.id} (another run computes it: {holder})")) as lock_fd:
                artifact = self.store.get(stage.kind, key)
                if artifact is None:
                    return self._compute(stage, key, results, lock_fd=lock_fd)
        self.engine.hook.profuser_stage_finished(stage_id=stage.id, key=key, cached=True, seconds=0.0, metrics=artifact.metrics)
        self.echo(f"[cached] {stage.id}")
        return StageResult(stage.id, stage.kind, key, True, 0.0, artifact.metrics, str(artifact.path),
                           artifact.manifest.get("seconds", 0.0))

    def _compute(self, stage: Stage, key: str, results: dict[str, StageResult], *,
                 lock_fd: int | None = None) -> StageResult:
        rank, world = rank_and_world()
        # a DeepSpeed JIT build would wait forever on the lock a killed build left: say so first
        if stage.kind == "train" and _uses_deepspeed(stage.hashed_config()):
            from .workers import check_extension_locks

            check_extension_locks()
        inputs = {role: Path(results[dep].path) for role, dep in stage.deps.items()}
        # what the stage reads: recipe: models as their folders in the store (key and manifest: `stage`)
        running = with_recipe_models(stage, inputs)
        out = self.store.begin(stage.kind, key)
        self.engine.hook.profuser_stage_started(stage_id=stage.id, key=key, run_dir=str(self.run_dir))
        loads_model = getattr(stage.code(), "LOADS_MODEL", stage.kind in MODEL_STAGE_KINDS)
        isolated = loads_model and self.runtime.isolates()
        self.echo(f"[run]    {stage.id} ..." + (" (worker process)" if isolated else ""))
        t0 = time.time()
        if isolated:
            from .workers import run_stage_in_worker

            def forward(step: int, metrics: dict[str, Any]) -> None:
                self.engine.hook.profuser_metrics_logged(stage_id=stage.id, step=step, metrics=metrics)

            metrics = run_stage_in_worker(running, inputs, out, self.runtime, self.engine, forward, lock_fd=lock_fd)
        else:
            ctx = StageContext(stage=running, inputs=inputs, out=out, runtime=self.runtime, engine=self.engine)
            try:
                metrics = running.code().run(ctx) or {}
            finally:
                del ctx
                if loads_model:
                    _release_memory()
        seconds = time.time() - t0
        if world > 1 and getattr(stage.code(), "DISTRIBUTED", False):
            # every rank ran it: rank 0 seals it once every rank is done writing
            checkins = self.store.partial_dir(stage.kind, key).with_suffix(".ranks")
            launch = os.environ.get("TORCHELASTIC_RUN_ID", "launch")  # a killed launch's check-ins do not count
            if rank > 0:
                checkins.mkdir(parents=True, exist_ok=True)
                (checkins / f"{launch}-{rank}").touch()
                artifact = self._wait_for(stage, key, "rank 0 seals it")
                return StageResult(stage.id, stage.kind, key, False, seconds, artifact.metrics, str(artifact.path), seconds)
            wait_until(lambda: len(list(checkins.glob(f"{launch}-*"))) == world - 1, poll=0.2)
            shutil.rmtree(checkins)
        self._check_unchanged(stage)
        artifact: Artifact = self.store.commit(stage.kind, key, {
            "stage_id": stage.id,
            "config": stage.hashed_config(),
            "inputs": {role: results[dep].key for role, dep in stage.deps.items()},
            "seconds": seconds,
            "metrics": metrics,
        })
        self.engine.hook.profuser_stage_finished(stage_id=stage.id, key=key, cached=False, seconds=seconds, metrics=metrics)
        self.echo(f"[done]   {stage.id} in {seconds:.1f}s")
        return StageResult(stage.id, stage.kind, key, False, seconds, metrics, str(artifact.path), seconds)

    def _check_unchanged(self, stage: Stage) -> None:
        """The local files a key hashed must be what the stage read: one changed while it ran would
        seal the new content's result under the old content's key (unchanged files: stat only)."""
        before = self.key_inputs[stage.id].get("content")
        if not before:
            return
        cache = FingerprintCache()
        now = hashed_content(_content(stage, stage.hashed_config(), cache))
        cache.save()
        changed = sorted(label for label in set(before) | set(now) if before.get(label) != now.get(label))
        if changed:
            paths = self.key_inputs[stage.id]["content_paths"]
            raise ProfuserError(f"{', '.join(paths.get(c, c) for c in changed)} changed while the stage ran; its result "
                                "is not kept (rerun to compute it from the new content)", where=stage.id)

    def _wait_for(self, stage: Stage, key: str, why: str) -> Artifact:
        self.echo(f"[wait]   {stage.id} ({why})")
        return wait_until(lambda: self.store.get(stage.kind, key), poll=2.0)

    @staticmethod
    def _link(link: Path, target: Path) -> None:
        tmp = link.with_name(f".{link.name}.tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target.resolve())
        tmp.replace(link)


def _uses_deepspeed(config: Any) -> bool:
    """Whether a stage trains with DeepSpeed (the recipe's train.distributed, or a launch asking for it)."""
    train = config.get("train") if isinstance(config, dict) else None
    return (isinstance(train, dict) and train.get("distributed") == "deepspeed") or \
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _release_memory() -> None:
    """Give back what an in-process model stage left behind (caches and unreferenced tensors).
    Only a stage worker's exit is sure to free a GPU; this is the best a shared process can do."""
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dump_yaml(recipe: Recipe, exclude: set[str] | None = None) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json", exclude=exclude), sort_keys=False)
