"""Recipes: YAML (safe_load) straight into pydantic, with ``extends:`` and ``-o a.b=value`` overrides.

Every problem is reported as ``path.to.field: message`` (all of them at once), unknown component
names get a "did you mean", and each component's ``params`` are validated by its own ``Params``
model before anything heavy happens.
"""

from __future__ import annotations

import copy
import functools
import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import pydantic
import yaml
from pydantic import Field, PositiveInt, ValidationError, field_validator, model_serializer, model_validator

from . import recipe_yaml
from .components import StrictModel
from .errors import PluginError, RecipeError

# --- building blocks ----------------------------------------------------------------------------


class ComponentRef(StrictModel):
    """A registered component and its params. In YAML a bare string is short for ``{name: ...}``."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"name": value} if isinstance(value, str) else value


class NamedComponentRef(ComponentRef):
    """A component used more than once (reward models): ``label`` tells the uses apart."""

    label: str | None = None

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Slot:
    """Marks a recipe field that names a component of ``kind``: ``Annotated[ComponentRef, Slot(kind)]``
    (or a list of refs). The field's default ref, if any, is the component a recipe gets when it names
    none; ``component_fields`` finds every slot by walking the models' fields."""

    kind: str


def _distinct_labels(items: list, what: str) -> list:
    """Stages and tables name things by their label: two alike would overwrite each other."""
    keys = [item.key for item in items]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"{what} must have distinct labels (set `label:`); repeated: {', '.join(repeated)}")
    return items


# --- recipe refs: a model that another recipe makes -----------------------------------------------

RECIPE_REF = "recipe:"  # recipe:<path>[#<merge label>], the path relative to the file that writes it
# where a recipe names a model: a ModelSpec's ``ref``, a component's ``params.model`` (reward models)
RECIPE_REF_KEYS = ("ref", "model")


def is_recipe_ref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(RECIPE_REF)


def split_recipe_ref(value: str) -> tuple[str, str | None]:
    """(path, merge label or None) of ``recipe:<path>[#<label>]``."""
    path, _, label = value.removeprefix(RECIPE_REF).partition("#")
    return path, label or None


def recipe_refs(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(field path, value) of every ``recipe:`` ref in a recipe mapping (or its dump), in order."""
    found: list[tuple[str, str]] = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        path = f"{prefix}{key}"
        if key in RECIPE_REF_KEYS and is_recipe_ref(value):
            found.append((path, value))
        elif isinstance(value, (dict, list)):
            found += recipe_refs(value, f"{path}.")
    return found


def replace_recipe_refs(data: Any, new: Callable[[str], Any]) -> Any:
    """A copy of ``data`` with every ``recipe:`` ref replaced by ``new(value)``."""
    if isinstance(data, dict):
        return {k: new(v) if k in RECIPE_REF_KEYS and is_recipe_ref(v) else replace_recipe_refs(v, new)
                for k, v in data.items()}
    if isinstance(data, list):
        return [replace_recipe_refs(v, new) for v in data]
    return data


def absolute_recipe_ref(value: str, base: Path) -> str:
    """``recipe:<path>`` with the path made absolute against ``base`` (the writing file's folder)."""
    path, label = split_recipe_ref(value)
    if not path.strip():
        return value  # reported by validation
    return f"{RECIPE_REF}{(base / Path(path).expanduser()).resolve()}" + (f"#{label}" if label else "")


class ModelSpec(StrictModel):
    """A model reference: a hub id, a local directory, a ``.gguf`` file, or ``builtin:NAME``."""

    ref: str
    label: str | None = None  # how tables and artifacts name it; defaults to the ref's last part
    gguf_file: str | None = None
    revision: str | None = None
    # unset in a recipe: default_dtype(the run's device), filled in when the run is planned (with_device_dtype)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="float32", json_schema_extra=lambda schema: schema.pop("default", None),
        description="the weights' dtype; auto: the checkpoint's own. Unset in a recipe: bfloat16 on a CUDA GPU "
                    "with native bf16 (compute capability >= 8.0), float32 on a CPU (set when the run is planned)")
    trust_remote_code: bool = False
    max_length: int | None = Field(default=None, gt=0)
    chat_template: str | None = None  # jinja text, or a path to a .jinja file
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        default=None, description="transformers' attention kernel (from_pretrained); null: its own choice")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        # `target: Qwen/Qwen2.5-7B-Instruct` is short for `target: {ref: Qwen/Qwen2.5-7B-Instruct}`
        return {"ref": value} if isinstance(value, str) else value

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if self.attn_implementation is None:  # unset: dumps (and hashes) as before the field
            data.pop("attn_implementation", None)
        return data

    @property
    def key(self) -> str:
        if self.label:
            return self.label
        if is_recipe_ref(self.ref):  # recipe:specialists/arith.yaml -> arith (#slerp -> arith-slerp)
            path, label = split_recipe_ref(self.ref)
            return Path(path).stem + (f"-{label}" if label else "")
        tail = self.ref.removeprefix("builtin:").rstrip("/").split("/")[-1]
        return tail.removesuffix(".gguf")

    def identity(self) -> dict[str, Any]:
        """The fields that change what the model computes (cache keys hash these)."""
        return self.model_dump(exclude={"label"})


def default_dtype(device: str = "auto") -> str:
    """The dtype of a recipe's model whose spec names none, on ``device`` (the runtime's: auto, cpu,
    cuda, cuda:1, ...): bfloat16 on a CUDA GPU with native bf16 (Ampere or newer: emulated bf16 is
    slower than float32), float32 on the CPU and on anything else. A CUDA device named where none is
    visible (a GPU run planned from a login node) is taken to have bf16."""
    if device != "auto" and not device.startswith("cuda"):
        return "float32"
    import torch

    if not torch.cuda.is_available():
        return "float32" if device == "auto" else "bfloat16"
    return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"


def with_device_dtype(recipe: Recipe, device: str = "auto") -> Recipe:
    """``recipe`` with ``default_dtype(device)`` in each model spec that sets no dtype (target,
    sources, the judge's reference), so that stage configs and keys hold the dtype that runs. On a
    CPU that is float32, the field's default: keys are those of the recipe as written. Merges' input
    models are left alone (mergekit reads them; ``merges[].dtype`` is what the merge computes in)."""
    specs = [recipe.target, *recipe.sources]
    judge = recipe.evaluate.judge
    if judge is not None and judge.reference is not None:
        specs.append(judge.reference)
    if all("dtype" in spec.model_fields_set for spec in specs):
        return recipe  # nothing unset (or resolved already): no device query
    dtype = default_dtype(device)

    def fill(spec: ModelSpec) -> ModelSpec:
        return spec if "dtype" in spec.model_fields_set else spec.model_copy(update={"dtype": dtype})

    update: dict[str, Any] = {"target": fill(recipe.target), "sources": [fill(s) for s in recipe.sources]}
    if judge is not None and judge.reference is not None:
        update["evaluate"] = recipe.evaluate.model_copy(
            update={"judge": judge.model_copy(update={"reference": fill(judge.reference)})})
    return recipe.model_copy(update=update)


class DataSpec(StrictModel):
    source: Annotated[ComponentRef, Slot("datasets")]
    sample: int | None = Field(default=None, gt=0, description="keep N examples, drawn with `seed`")
    dedup: bool = True
    heldout: float | int | Literal["source"] = Field(
        default=0.1, description="held-out share (<1) or count (>=1); `source`: the records whose meta.split "
                                 "is `heldout` (or `test`), as the dataset source marks them")
    on_bad_row: Literal["fail", "skip"] = "fail"
    seed: int = 0
    turns: Literal["all", "last"] = Field(
        default="all", description="multi-turn conversations: train, teacher-force and score every assistant turn "
                                   "(all) or the last only, earlier ones as context (last)")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if self.turns == "all":  # the default dumps (and hashes) as before the field
            data.pop("turns", None)
        return data


class DistillSpec(StrictModel):
    """What the logits stage stores per token (App. A: k = 10); T and top-p apply in the loss."""

    top_k: int = Field(default=10, gt=0)
    batch_size: int = Field(default=4, gt=0)
    max_length: int = Field(default=2048, gt=0)


@functools.cache
def component_fields(model: type[pydantic.BaseModel] | None = None, prefix: str = "") -> tuple[tuple[str, str, str | None, bool], ...]:
    """``(path, kind, default name, is a list)`` of every component field of ``model`` (default: the
    Recipe), nested models included, in field order. Models inside lists are not walked: a list of
    components is itself the slot (``inference_mode.reward_models``)."""
    model = model or Recipe
    found: list[tuple[str, str, str | None, bool]] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        slot = next((m for m in info.metadata if isinstance(m, Slot)), None)
        if slot is not None:
            default = info.default.name if isinstance(info.default, ComponentRef) else None
            found.append((path, slot.kind, default, get_origin(info.annotation) is list))
        else:  # a nested model, or an optional one (its refs count only when it is set)
            union = get_origin(info.annotation) in (Union, types.UnionType)
            inner = [a for a in get_args(info.annotation) if a is not type(None)] if union else [info.annotation]
            if len(inner) == 1 and isinstance(inner[0], type) and issubclass(inner[0], pydantic.BaseModel):
                found += component_fields(inner[0], f"{path}.")
    return tuple(found)


def _fill_default_names(data: Any) -> Any:
    """A component block without ``name:`` gets the default's: ``-o loss.params.beta=0.1`` on a
    recipe without a ``loss:`` block tunes the default rather than asking for a name."""
    for path, _, name, _ in component_fields():
        if name is None:
            continue
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(last), dict) and "name" not in node[last]:
            node[last] = {"name": name, **node[last]}
    return data


class TrainingModeSpec(StrictModel):
    evaluator: Annotated[ComponentRef, Slot("evaluators")] = ComponentRef(name="min_ce")


class InferenceModeSpec(StrictModel):
    generator: Annotated[ComponentRef, Slot("generators")] = ComponentRef(name="hf")
    reward_models: Annotated[list[NamedComponentRef], Slot("reward_models")] = Field(default_factory=list)
    evaluator: Annotated[ComponentRef, Slot("evaluators")] = ComponentRef(name="rm_vote")

    @field_validator("reward_models")
    @classmethod
    def _unique(cls, value: list[NamedComponentRef]):
        return _distinct_labels(value, "reward models")


# accelerate's tracker names (accelerate.tracking.LOGGER_TYPE_TO_CLASS) -> the package each needs;
# listed here so that validating a recipe imports neither accelerate nor torch
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
TRACKER_NAMES = tuple(TRACKER_PACKAGES)


def missing_trackers(report_to: list[str]) -> list[tuple[int, str]]:
    """(index, message) for each tracker of ``report_to`` whose package is not installed."""
    import importlib.util

    return [(i, f"{name} is not installed: pip install {TRACKER_PACKAGES[name]} (or remove it from train.report_to)")
            for i, name in enumerate(report_to)
            if name in TRACKER_PACKAGES and importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]


class PushSpec(StrictModel):
    """Where ``profuser run`` pushes the fused model when it ends (``profuser push`` does it by hand)."""

    repo: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$",
                      description="Hub repository id, user/name or org/name")
    private: bool = False


class PeftSpec(StrictModel):
    """LoRA through peft (``train.peft``): only the adapter trains; ``model/`` gets the adapter and,
    with ``merge``, the merged plain model (the adapter then in ``model/adapter/``)."""

    method: Literal["lora"] = "lora"
    r: int = Field(default=8, gt=0, description="rank of the update")
    alpha: float = Field(default=16, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="module names (suffixes) to adapt; all-linear: every linear layer but the head")
    merge: bool = Field(default=False, description="also save the merged model (base + adapter) as model/")


class TrainSpec(StrictModel):
    lr: float = Field(default=1.5e-5, gt=0)
    batch_size: int = Field(default=128, gt=0, description="global batch (gradient accumulation fills it)")
    micro_batch_size: int = Field(default=4, gt=0)
    max_length: int = Field(default=2048, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="clip the global gradient norm (null: no clipping)")
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(default=50, gt=0, description="optimizer steps between checkpoints")
    max_bad_steps: int = Field(default=0, ge=0, description="steps with a non-finite loss or gradient to skip "
                               "(their update left out) before the run stops; 0: the first one stops it")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    distributed: Literal["none", "ddp", "deepspeed", "fsdp"] = "none"
    deepspeed_config: str | None = None
    seed: int = 42
    report_to: list[Literal[TRACKER_NAMES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers (accelerate's) that get metrics.jsonl's scalars; [] for metrics.jsonl only")
    push_to_hub: PushSpec | None = Field(default=None, description="push the model to the Hub when `profuser run` ends")
    peft: PeftSpec | None = Field(default=None, description="train a LoRA adapter instead of every weight")
    packing: bool = Field(default=False, description="lay a micro-batch's examples end to end, attention kept within "
                          "each example, instead of padding each to the longest (docs/training.md)")

    # where a run reports and publishes, not what it trains: no cache key or model card holds these
    NOT_HASHED: ClassVar[frozenset[str]] = frozenset({"report_to", "push_to_hub"})

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if self.peft is None:  # full fine-tuning dumps (and hashes) as before the field
            data.pop("peft", None)
        if not self.packing:  # padded batches dump (and hash) as before the field
            data.pop("packing", None)
        return data

    @field_validator("report_to")
    @classmethod
    def _distinct_trackers(cls, value: list[str]):
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"trackers listed twice: {', '.join(repeated)}")
        return value


class VLLMEvaluateSpec(StrictModel):
    """lm-eval's vLLM backend (``evaluate.backend: vllm``); the model's dtype comes from its spec."""

    tensor_parallel_size: int = Field(default=1, gt=0)
    data_parallel_size: int | None = Field(
        default=None, gt=0, description="engines (more than one runs on Ray); None: every visible GPU / tensor_parallel_size")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)


class JudgeSpec(StrictModel):
    """``evaluate.judge``: the ``profuser_heldout_winrate`` task. The evaluated model and the
    ``reference`` (default: the target) answer the held-out prompts with ``generator``; the
    ``reward_model`` scores both answers; a win counts 1, a tie 1/2 (docs/evaluation.md)."""

    reward_model: Annotated[ComponentRef, Slot("reward_models")]
    generator: Annotated[ComponentRef, Slot("generators")] = ComponentRef(name="hf", params={"do_sample": False})
    reference: ModelSpec | None = Field(default=None, description="whose answers are judged against (default: the target)")


class EvaluateSpec(StrictModel):
    backend: Literal["hf", "vllm"] = Field(default="hf", description="lm-eval model: hf (transformers) or vllm")
    vllm: VLLMEvaluateSpec = VLLMEvaluateSpec()
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names")
    limit: PositiveInt | dict[str, PositiveInt] | None = Field(
        default=None, description="at most N examples per task, or {task: N} for some tasks only")
    num_fewshot: dict[str, int] = Field(default_factory=dict)
    data_dir: str | None = None
    baselines: bool = True
    batch_size: int = Field(default=8, gt=0)
    max_gen_toks: int | None = Field(default=None, gt=0, description="cap on generated tokens (lm-eval default 256)")
    judge: JudgeSpec | None = Field(default=None, description="reward model and generator of profuser_heldout_winrate")

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if self.judge is None:  # evaluations without a judge keep the cache keys they had
            data.pop("judge", None)
        if self.backend == "hf":  # vllm settings do not apply; hf evaluations keep the cache keys they had
            data.pop("backend", None)
            data.pop("vllm", None)
        return data


# mergekit's methods a merge baseline may use (Table 3: slerp, ties, dare_ties)
MERGE_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear")


class MergeModelSpec(ModelSpec):
    """A model a merge takes in, with mergekit's per-model ``parameters`` (weight, density, ...)."""

    parameters: dict[str, Any] = Field(default_factory=dict)


class MergeSpec(StrictModel):
    """A merge baseline (``profuser.stages.merge``): same-architecture, same-tokenizer models merged
    by mergekit, evaluated beside the fused model. Checked by ``merge_problems`` at validate time."""

    method: Literal[MERGE_METHODS]  # type: ignore[valid-type]
    label: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$",
                                description="its stage and row name (default: the method)")
    models: list[MergeModelSpec] = Field(min_length=1)
    base_model: ModelSpec | None = None
    parameters: dict[str, Any] = Field(default_factory=dict, description="mergekit's method-wide parameters (t, ...)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def key(self) -> str:
        return self.label or self.method


class RuntimeSpec(StrictModel):
    """How the run executes, never what it computes: part of no cache key."""

    isolate_stages: Literal["auto"] | bool = Field(
        default="auto", description="run each stage that loads a model in its own process, which frees "
        "the GPU when it exits; auto: when CUDA is visible")


class EstimateSpec(StrictModel):
    """Declared sizes and hardware for ``--dry-run`` (profuser/estimate.py), so a plan can be costed
    before the data exists. No stage reads this block: it is never part of a cache key."""

    examples: int | None = Field(default=None, gt=0, description="training examples (default: data.sample minus heldout)")
    prompt_tokens: int | None = Field(default=None, gt=0, description="mean chat-formatted prompt tokens (system + instruction)")
    response_tokens: int | None = Field(default=None, gt=0, description="mean ground-truth response tokens")
    generated_tokens: int | None = Field(default=None, gt=0, description="mean tokens a source generates (default: min(response_tokens, max_new_tokens))")
    gpu: Literal["A100-80GB", "H100-80GB"] = "A100-80GB"
    gpus: int = Field(default=8, gt=0, description="GPUs of the launch (wall-clock figures)")
    throughput: dict[Literal["generate_vllm", "generate_hf", "forward", "train"], float] = Field(
        default_factory=dict, description="tokens/s per GPU replacing the stated defaults (your own measurements)")


NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")

class Recipe(StrictModel):
    """A whole fusion run. See recipes/profuser.yaml for the annotated default."""

    name: str
    description: str = ""
    seed: int = 42
    target: ModelSpec
    sources: list[ModelSpec] = Field(min_length=1)
    data: DataSpec
    distill: DistillSpec = DistillSpec()
    training_mode: TrainingModeSpec = TrainingModeSpec()
    inference_mode: InferenceModeSpec = InferenceModeSpec()
    aligner: Annotated[ComponentRef, Slot("aligners")] = ComponentRef(name="offsets")
    loss: Annotated[ComponentRef, Slot("losses")] = ComponentRef(name="fuse_kl")
    curriculum: Annotated[ComponentRef, Slot("curricula")] = ComponentRef(name="progressive")
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    estimate: EstimateSpec = EstimateSpec()
    merges: list[MergeSpec] = Field(default_factory=list, description="merge baselines evaluated beside the fused model")

    @field_validator("sources")
    @classmethod
    def _distinct_sources(cls, value: list[ModelSpec]):
        return _distinct_labels(value, "source models")

    @field_validator("merges")
    @classmethod
    def _distinct_merges(cls, value: list[MergeSpec]):
        return _distinct_labels(value, "merges")

    @model_validator(mode="after")
    def _judge_reference(self):
        # the win rate is against the target's own answers unless the judge names another model
        if self.evaluate.judge is not None and self.evaluate.judge.reference is None:
            self.evaluate.judge.reference = self.target.model_copy()
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        if not self.merges:  # recipes without merges dump (and hash) as they did before the field
            data.pop("merges", None)
        return data

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str):
        # the name becomes a directory under the runs dir: nothing that climbs out of it or nests
        if not NAME_RE.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"{value!r} is not a plain name: use letters, digits and -_. only (no path separators, "
                             "not . or ..)")
        return value

    def component_refs(self) -> list[tuple[str, str, ComponentRef]]:
        """(recipe path, kind, ref) of every component the recipe names."""
        refs = []
        for path, kind, _, many in component_fields(type(self)):
            node: Any = self
            for part in path.split("."):
                node = getattr(node, part, None)
            if node is None:  # under an optional block the recipe leaves out
                continue
            refs += [(f"{path}.{i}", kind, n) for i, n in enumerate(node)] if many else [(path, kind, node)]
        return refs


# --- loading ------------------------------------------------------------------------------------


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` wins; nested mappings merge; lists and scalars are replaced whole. A component
    ref naming a different component (``name:`` differs) replaces the inherited one whole, so the
    old component's params are not inherited by the new one."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and not _other_component(old, value):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _other_component(base: dict, override: dict) -> bool:
    return "name" in base and "name" in override and base["name"] != override["name"]


def _read_yaml(path: Path) -> dict:
    if not path.exists() and not path.is_symlink():
        raise RecipeError([("", f"recipe file not found: {path}")])
    try:  # duplicate keys, alias bombs, directories and symlink loops: one line each (recipe_yaml)
        data = recipe_yaml.load(recipe_yaml.read_text(path))
    except recipe_yaml.YamlProblem as exc:
        raise RecipeError([("", exc.message)], file=f"{path}:{exc.line}" if exc.line else str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError([("", "a recipe must be a mapping of fields")], file=str(path))
    return data


def load_raw(path: str | Path, _seen: tuple[Path, ...] = (), registry=None) -> dict:
    """The recipe's mapping with every ``extends:`` resolved (paths relative to the file)."""
    try:
        path = recipe_yaml.resolve(Path(path))
    except recipe_yaml.YamlProblem as exc:
        raise RecipeError([("", exc.message)], file=str(path)) from None
    if path in _seen:
        raise RecipeError([("extends", f"circular extends: {' -> '.join(map(str, (*_seen, path)))}")], file=str(path))
    data = _read_yaml(path)
    # a recipe: ref is relative to the file that writes it, whichever recipe extends that file
    data = replace_recipe_refs(data, lambda value: absolute_recipe_ref(value, path.parent))
    if _seen:  # inherited: its relative paths are relative to this file, not to the one extending it
        _rebase_paths(data, path.parent, registry)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    parents = [parents] if isinstance(parents, str) else parents
    if not isinstance(parents, list):
        message = f"must be a recipe file or a list of them (paths relative to this file), not {_shown(parents)}"
        raise RecipeError([("extends", message)], file=str(path))
    bad = [(f"extends.{i}", f"must be a recipe file path, not {_shown(p)}") for i, p in enumerate(parents)
           if not isinstance(p, str) or not p.strip()]
    if bad:
        raise RecipeError(bad, file=str(path))
    merged: dict = {}
    for parent in parents:
        try:
            parent_path = recipe_yaml.resolve(path.parent / parent)
        except recipe_yaml.YamlProblem as exc:
            raise RecipeError([("extends", f"{parent}: {exc.message}")], file=str(path)) from None
        if parent_path.is_dir():
            raise RecipeError([("extends", f"{parent} is a directory, not a recipe file")], file=str(path))
        if not parent_path.is_file():
            raise RecipeError([("extends", f"file not found: {parent}")], file=str(path))
        merged = deep_merge(merged, load_raw(parent_path, (*_seen, path), registry))
    return deep_merge(merged, data)


def _rebase_paths(data: dict, directory: Path, registry=None) -> None:
    """Make the relative local paths of a recipe mapping absolute against ``directory`` (the
    same strings ``_absolutise_paths`` makes for the file being loaded, so cache keys agree)."""

    def rebased(value: Any, *, must_exist: bool) -> Any:
        if not isinstance(value, str) or not value or _looks_remote(value) or Path(value).expanduser().is_absolute():
            return value
        candidate = directory / Path(value).expanduser()
        return str(candidate) if candidate.exists() or not must_exist else value

    def node(*parts: str) -> Any:
        current: Any = data
        for part in parts:
            current = current.get(part) if isinstance(current, dict) else None
        return current

    for parent, key in (("train", "deepspeed_config"), ("evaluate", "data_dir")):
        block = node(parent)
        if isinstance(block, dict) and key in block:
            block[key] = rebased(block[key], must_exist=False)
    params = node("data", "source", "params")
    for name in _dataset_path_params(node("data", "source", "name"), registry) if isinstance(params, dict) else ():
        if name in params:
            params[name] = _each_path(params[name], lambda v: rebased(v, must_exist=False))
    models = [node("target"), *(node("sources") if isinstance(node("sources"), list) else [])]
    for spec in models:  # a chat_template that names a file (not a format name, not jinja text)
        if isinstance(spec, dict) and isinstance(spec.get("chat_template"), str):
            spec["chat_template"] = rebased(spec["chat_template"], must_exist=True)


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, str) else repr(value)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b.c=value`` (value parsed as YAML, so numbers, booleans and lists work)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise RecipeError([("-o", f"override {item!r} is not of the form path.to.field=value")])
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = path.split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                if not isinstance(node, dict):
                    raise RecipeError([(path, "cannot override inside a non-mapping value")])
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError([(path, "cannot override inside a non-mapping value")])
    return data


def _pydantic_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field" + _field_hint(err["loc"])
        problems.append((path, message))
    return problems


# Hugging Face Trainer (TrainingArguments) names people bring along -> what a recipe says instead
HF_TRAINER_NAMES = {
    "learning_rate": "did you mean train.lr?",
    "num_train_epochs": "epochs are set per phase by the curriculum: curriculum.params (progressive: first_epochs, "
                        "second_epochs; single-phase curricula: epochs)",
    "epochs": "epochs are set per phase by the curriculum: curriculum.params (progressive: first_epochs, "
              "second_epochs; single-phase curricula: epochs)",
    "per_device_train_batch_size": "did you mean train.micro_batch_size? (per process; train.batch_size is the global batch)",
    "gradient_accumulation_steps": "set train.batch_size (the global batch): accumulation fills it from "
                                  "train.micro_batch_size",
    "warmup_steps": "did you mean train.warmup_ratio?",
    "lr_scheduler_type": "did you mean train.scheduler?",
    "bf16": "did you mean train.precision: bf16?",
    "fp16": "did you mean train.precision: fp16?",
    "max_seq_length": "did you mean train.max_length?",
    "save_steps": "did you mean train.checkpoint_every?",
}


def _field_hint(loc: tuple) -> str:
    """``; did you mean ...`` for an unknown field: a Trainer habit, else a close sibling name."""
    name = str(loc[-1])
    if name in HF_TRAINER_NAMES and (len(loc) == 1 or loc[0] == "train"):
        return f": {HF_TRAINER_NAMES[name]}"
    model: Any = Recipe
    for part in loc[:-1]:  # the model the field was written in
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, pydantic.BaseModel) else None
        if field is None:
            return ""
        inner = [a for a in (get_args(field.annotation) or (field.annotation,)) if isinstance(a, type)]
        model = next((a for a in inner if issubclass(a, pydantic.BaseModel)), None)
    if model is None:
        return ""
    import difflib

    close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1])
    return f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""


def _raw_refs(data: dict) -> list[tuple[str, str, ComponentRef]]:
    """The well-formed component references of a recipe mapping that failed validation elsewhere."""
    refs = []
    for path, kind, _, _ in component_fields():
        node: Any = data
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        items = [(f"{path}.{i}", n) for i, n in enumerate(node)] if isinstance(node, list) else [(path, node)]
        for item_path, item in items:
            try:
                refs.append((item_path, kind, ComponentRef.model_validate(
                    {k: v for k, v in item.items() if k != "label"} if isinstance(item, dict) else item)))
            except ValidationError:
                continue  # already reported by the schema
    return refs


def validate_components(refs: list[tuple[str, str, ComponentRef]], registry) -> list[tuple[str, str]]:
    """Each named component exists, and its params pass its own ``Params`` model."""
    problems: list[tuple[str, str]] = []
    for path, kind, ref in refs:
        try:
            info = registry.get(kind, ref.name)
        except PluginError as exc:
            problems.append((f"{path}.name", exc.message))
            continue
        problems += [(f"{path}.params.{p}" if p else f"{path}.params", m) for p, m in info.params_problems(ref.params)]
    return problems


def load_recipe(path: str | Path, overrides: list[str] = (), *, registry, _chain: tuple[Path, ...] = ()) -> Recipe:
    """Load, merge, override and validate a recipe against ``registry`` (an ``Engine``'s: the one
    whose plugins will run it). Raises ``RecipeError`` listing every problem. ``_chain``: the
    recipes whose ``recipe:`` refs led here (a cycle is refused)."""
    file = str(path)
    data = _fill_default_names(apply_overrides(load_raw(path, registry=registry), list(overrides)))
    # a recipe: ref given with -o is relative to the recipe file, as one written in it
    data = replace_recipe_refs(data, lambda value: absolute_recipe_ref(value, Path(path).resolve().parent))
    data.setdefault("name", Path(path).stem)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:  # report the components' problems too: every problem at once
        problems = _pydantic_problems(exc) + validate_components(_raw_refs(data), registry)
        raise RecipeError(sorted(set(problems), key=problems.index), file=file) from None
    problems = validate_components(recipe.component_refs(), registry) + _unused_loss_beta(recipe, registry)
    problems += _target_reward_problems(recipe, registry)
    base = Path(path).resolve().parent
    problems += _missing_files(recipe, base, registry)
    problems += _missing_models(recipe)
    problems += _recipe_ref_problems(recipe, Path(path).resolve(), registry, _chain)
    if recipe.merges:  # architectures, tokenizers and parameters (nothing is loaded)
        from .merging import merge_problems

        problems += merge_problems(recipe.merges)
    # explicitly listed only: the default TensorBoard is skipped with a note when it is not installed
    if "report_to" in recipe.train.model_fields_set:
        problems += [(f"train.report_to.{i}", m) for i, m in missing_trackers(recipe.train.report_to)]
    peft = recipe.train.peft
    if peft is not None and not peft.merge and recipe.evaluate.tasks and recipe.evaluate.backend == "vllm":
        problems.append(("train.peft.merge", ("evaluate.backend vllm loads the fused model's folder itself: it needs "
                                              "the merged model (merge: true), not the adapter alone")))
    _absolutise_paths(recipe, base, registry)
    from .evaluation.tasks import task_field_problems  # reads the data file: paths are absolute now

    problems += task_field_problems(recipe, registry)
    if problems:
        raise RecipeError(problems, file=file)
    return recipe


def _recipe_ref_problems(recipe: Recipe, here: Path, registry, chain: tuple[Path, ...]) -> list[tuple[str, str]]:
    """Each ``recipe:`` ref names a recipe file that validates, makes the model it names (its
    trained model, or the merge ``#label`` names) and leads back to no recipe on the way here."""
    problems: list[tuple[str, str]] = []
    names: dict[str, Path] = {}
    for field, value in recipe_refs(recipe.model_dump(mode="json")):
        if field.startswith("merges."):
            problems.append((field, ("a merge takes hub ids or model folders; another recipe's model (recipe:) is "
                                     "not supported there")))
            continue
        spec = _spec_at(recipe, field)
        if spec is not None and (spec.gguf_file or spec.revision):
            problems.append((field, "a recipe: ref names a model of the store: gguf_file and revision do not apply"))
        path, label = split_recipe_ref(value)
        upstream = Path(path)
        if not path.strip():
            problems.append((field, "recipe: names no file (recipe:<path to a recipe .yaml>[#<merge label>])"))
            continue
        if upstream in (*chain, here):
            loop = chain[chain.index(upstream):] if upstream in chain else ()
            cycle = " -> ".join(p.name for p in (*loop, here, upstream))
            problems.append((field, f"circular recipe refs: {cycle}"))
            continue
        if not upstream.is_file():
            problems.append((field, f"recipe file not found: {upstream}"))
            continue
        try:
            made = load_recipe(upstream, registry=registry, _chain=(*chain, here))
        except RecipeError as exc:  # one line per problem, naming the field here and the file there
            problems += [(field, f"{upstream.name}: {f'{p}: ' if p else ''}{m}") for p, m in exc.problems]
            continue
        if names.setdefault(made.name, upstream) != upstream:
            problems.append((field, (f"two recipes named {made.name!r} ({names[made.name]} and {upstream}): their "
                                     "stages would share ids; give them distinct names")))
        if label and label not in [m.key for m in made.merges]:
            merges = ", ".join(m.key for m in made.merges) or "none"
            problems.append((field, (f"{upstream.name} makes no model {label!r}: it makes its trained model (no "
                                     f"#label) and its merges (#<label>: {merges})")))
    return problems


def _spec_at(recipe: Recipe, field: str) -> ModelSpec | None:
    """The model spec whose ``ref`` a field path names (``target.ref``, ``sources.1.ref``), else None."""
    node: Any = recipe
    for part in field.split(".")[:-1]:
        node = node[int(part)] if isinstance(node, list) and part.isdigit() else getattr(node, part, None)
    return node if isinstance(node, ModelSpec) else None


def _unused_loss_beta(recipe: Recipe, registry) -> list[tuple[str, str]]:
    """``loss.params.beta`` would do nothing under a curriculum that sets β per phase: refuse it."""
    if "beta" not in recipe.loss.params:
        return []
    try:
        fields = registry.get("curricula", recipe.curriculum.name).cls.beta_params
    except PluginError:
        return []  # an unknown curriculum is reported by validate_components
    if not fields:
        return []
    names = ", ".join(f"curriculum.params.{f}" for f in fields)
    return [("loss.params.beta", (f"unused: curriculum {recipe.curriculum.name!r} sets β per phase ({names}); "
                                  "remove loss.params.beta and set those instead"))]


def _target_reward_problems(recipe: Recipe, registry) -> list[tuple[str, str]]:
    """A curriculum that ranks by the target's own reward (``rm_split``) needs the target among the
    sources, so that the inference mode generates and scores its answers; refused before any run."""
    try:
        needs = registry.get("curricula", recipe.curriculum.name).cls.needs_target_reward
    except PluginError:
        return []  # an unknown curriculum is reported by validate_components
    if not needs or recipe.target.key in {s.key for s in recipe.sources}:
        return []
    return [("curriculum.name", (f"{recipe.curriculum.name!r} ranks examples by the target's own reward scores: list "
                                f"the target among the sources with its label ({recipe.target.key!r}) so the "
                                "inference mode scores its answers"))]


def _missing_files(recipe: Recipe, base: Path, registry=None) -> list[tuple[str, str]]:
    """Local paths a recipe names must exist (relative paths are relative to the recipe file)."""
    from .chat import CHAT_FORMATS

    problems = []
    models = [("target", recipe.target), *((f"sources.{i}", s) for i, s in enumerate(recipe.sources))]
    for field_path, spec in models:  # a named format, jinja text, or a file
        value = spec.chat_template
        if value and value not in CHAT_FORMATS and "{{" not in value and "{%" not in value \
                and not (base / value).exists() and not Path(value).expanduser().exists():
            problems.append((f"{field_path}.chat_template", f"neither a named format ({', '.join(CHAT_FORMATS)}) nor a file: {value}"))
    for field_path, value in _path_fields(recipe, registry):
        if value and not _looks_remote(value) and not (base / value).exists() and not Path(value).exists():
            problems.append((field_path, f"file not found: {value}"))
    return problems


def _missing_models(recipe: Recipe) -> list[tuple[str, str]]:
    """Local model refs must exist and hold a config, weights and a tokenizer (nothing is loaded; a
    GGUF file's first bytes are read)."""
    from .model_files import local_model_problem

    specs = [("target", recipe.target)] + [(f"sources.{i}", s) for i, s in enumerate(recipe.sources)]
    problems = []
    for field_path, spec in specs:
        problem = None if is_recipe_ref(spec.ref) else local_model_problem(spec)  # recipe refs: _recipe_ref_problems
        if problem:
            problems.append((f"{field_path}.ref", problem))
    return problems


def _path_fields(recipe: Recipe, registry=None) -> list[tuple[str, str | None]]:
    fields = [("train.deepspeed_config", recipe.train.deepspeed_config), ("evaluate.data_dir", recipe.evaluate.data_dir)]
    params = recipe.data.source.params
    for name in _dataset_path_params(recipe.data.source.name, registry):
        value = params.get(name)
        items = [(f"data.source.params.{name}", value)] if not isinstance(value, list) else \
            [(f"data.source.params.{name}.{i}", v) for i, v in enumerate(value)]
        fields += [(p, v) for p, v in items if isinstance(v, str)]
    return fields


def _dataset_path_params(name: Any, registry) -> tuple[str, ...]:
    """The params of dataset source ``name`` that name local paths (``DatasetSource.path_params``;
    ``path`` when the source is unknown here: validation reports that)."""
    if registry is not None and isinstance(name, str):
        try:
            return tuple(registry.get("datasets", name).cls.path_params)
        except PluginError:
            pass
    return ("path",)


def _each_path(value: Any, change) -> Any:
    """``change`` applied to a path param's string, or to each string of its list."""
    if isinstance(value, str):
        return change(value)
    return [change(v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


def _absolutise_paths(recipe: Recipe, base: Path, registry=None) -> None:
    """Relative paths in a recipe are relative to the recipe file, wherever profuser runs from."""
    params = recipe.data.source.params
    for name in _dataset_path_params(recipe.data.source.name, registry):
        if name in params:
            params[name] = _each_path(params[name], lambda v: v if _looks_remote(v) else
                                      str(resolve_path(v, base / "recipe.yaml")))
    for attr in ("deepspeed_config",):
        value = getattr(recipe.train, attr)
        if value:
            setattr(recipe.train, attr, str(resolve_path(value, base / "recipe.yaml")))
    if recipe.evaluate.data_dir:
        recipe.evaluate.data_dir = str(resolve_path(recipe.evaluate.data_dir, base / "recipe.yaml"))
    for spec in (recipe.target, *recipe.sources):  # a chat_template file, not a format name or jinja text
        value = spec.chat_template
        if value and "{{" not in value and "{%" not in value and (base / value).is_file():
            spec.chat_template = str(resolve_path(value, base / "recipe.yaml"))


def _looks_remote(value: str) -> bool:
    return "://" in value or value.startswith(("hf:", "hub:"))


def resolve_path(value: str, recipe_file: str | Path | None) -> Path:
    """A path from a recipe: absolute, or relative to the recipe file (else to the cwd)."""
    path = Path(value).expanduser()
    if path.is_absolute() or recipe_file is None:
        return path
    candidate = Path(recipe_file).resolve().parent / path
    return candidate if candidate.exists() else path


def recipe_schema() -> dict[str, Any]:
    """The recipe's JSON schema (``profuser schema``). A model ref may be a plain string
    (``ModelSpec._from_string``): each model spec's definition says so."""
    schema = Recipe.model_json_schema()
    for name, definition in schema.get("$defs", {}).items():
        cls = globals().get(name)
        if isinstance(cls, type) and issubclass(cls, ModelSpec):
            title, description = definition.pop("title", name), definition.pop("description", None)
            schema["$defs"][name] = {
                "title": title, **({"description": description} if description else {}),
                "anyOf": [{"type": "string", "description": "the ref alone: short for {ref: ...}"}, definition]}
    return schema
