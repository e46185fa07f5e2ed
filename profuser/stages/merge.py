"""The ``merge/<label>`` stage: a model-merging baseline (the paper's Table 3) made by mergekit.

A recipe's ``merges:`` entries each plan this stage and an ``evaluate/merge/<label>`` stage that
scores ``model/`` with the recipe's ``evaluate`` block, so the merge stands beside the fused model
in ``profuser run``'s table, the run report and ``profuser compare``.

Config: ``method`` (one of ``recipe.MERGE_METHODS``), ``models`` (model identities, each with
mergekit's per-model ``parameters``), ``base_model`` (an identity or None), ``parameters``
(method-wide), ``dtype`` and ``seed`` (DARE's random drops). No upstream input.

Merging averages, interpolates or adds weights tensor by tensor and token id by token id, so the
models must share an architecture (the same tensors, of the same shapes) and a tokenizer (the same
id for the same token). ``merge_problems`` checks both on local model directories at validate
time, from their config.json and tokenizer files (nothing is loaded); hub ids, builtins and GGUF
files are checked the same way here once resolved. Models of other architectures or vocabularies
are what fusion is for (``sources:``).

mergekit runs on the CPU through its Python API (``MergeConfiguration`` + ``run_merge``), reading
safetensors only (a model without safetensors weights is refused: nothing is unpickled) and writing
safetensors. Writes ``model/`` (weights, config, the base model's tokenizer, or the first model's
when there is no base; mergekit's ``mergekit_config.yml`` and card) and ``merge.json`` (the method,
the model refs, the mergekit configuration with resolved paths). Metrics: ``models``, ``tensors``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import ProfuserError, import_extra
from ..recipe import MergeSpec, ModelSpec
from ..store import atomic_write_json
from . import ModelIdentity, StageConfig

VERSION = "1"
LOADS_MODEL = True  # mergekit holds tensors of every model: a worker process when stages are isolated

# mergekit's parameters per method (mergekit 0.1.5's method specs): (shared, per model, required
# per model); the per-model ones may also be given method-wide
_TASK_ARITHMETIC = ({"int8_mask", "normalize", "rescale", "lambda"}, {"weight", "density"}, {"weight"})
METHOD_PARAMETERS: dict[str, tuple[set[str], set[str], set[str]]] = {
    "linear": ({"normalize"}, {"weight"}, {"weight"}),
    "slerp": ({"t"}, set(), set()),
    "task_arithmetic": _TASK_ARITHMETIC,
    "ties": _TASK_ARITHMETIC,
    "dare_ties": _TASK_ARITHMETIC,
    "dare_linear": _TASK_ARITHMETIC,
}
NEEDS_BASE = {"slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear"}

# config.json fields that decide which tensors a model has and their shapes
SHAPE_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
FUSE_INSTEAD = "merging needs one architecture and one tokenizer; fuse such models instead (list them as sources:)"


def _identity(spec: ModelSpec) -> dict[str, Any]:
    return spec.model_dump(exclude={"label", "parameters"})


class MergeModel(StageConfig):
    model: ModelIdentity
    parameters: dict[str, Any]  # mergekit's per-model parameters


class Config(StageConfig):
    """The models' identities and the merge settings, not labels."""

    method: str
    models: list[MergeModel]
    base_model: ModelIdentity | None
    parameters: dict[str, Any]
    dtype: str
    seed: int


def stage_config(merge: MergeSpec, seed: int) -> Config:
    return Config(method=merge.method, models=[MergeModel(model=_identity(m), parameters=m.parameters) for m in merge.models],
                  base_model=_identity(merge.base_model) if merge.base_model else None,
                  parameters=merge.parameters, dtype=merge.dtype, seed=seed)


# --- validation (no mergekit, no torch) -----------------------------------------------------------


def merge_problems(merges: list[MergeSpec]) -> list[tuple[str, str]]:
    """(recipe path, message) for each merge whose method settings are wrong, or whose local models
    differ in architecture or tokenizer. Hub ids, builtins and GGUF files are checked when resolved."""
    from ..models.loading import local_model_problem

    problems: list[tuple[str, str]] = []
    for i, merge in enumerate(merges):
        where = f"merges.{i}"
        problems += _method_problems(merge, where)
        specs = ([(f"{where}.base_model", merge.base_model)] if merge.base_model else []) + \
                [(f"{where}.models.{j}", m) for j, m in enumerate(merge.models)]
        dirs = []
        for path, spec in specs:
            problem = local_model_problem(spec)
            if problem:
                problems.append((f"{path}.ref", problem))
            elif _is_plain_dir(spec):
                dirs.append((path, Path(spec.ref).expanduser()))
        problems += compatibility_problems(dirs)
    return problems


def _is_plain_dir(spec: ModelSpec) -> bool:
    return not spec.gguf_file and not spec.ref.endswith(".gguf") and Path(spec.ref).expanduser().is_dir()


def _method_problems(merge: MergeSpec, where: str) -> list[tuple[str, str]]:
    shared, per_model, required = METHOD_PARAMETERS[merge.method]
    problems = []
    for name in merge.parameters:
        if name not in shared | per_model:
            problems.append((f"{where}.parameters.{name}", (f"not a parameter of {merge.method} "
                             f"(known: {', '.join(sorted(shared | per_model))})")))
    idents = [_identity(m) for m in merge.models]
    base = _identity(merge.base_model) if merge.base_model else None
    for j, model in enumerate(merge.models):
        if idents.index(idents[j]) != j:
            problems.append((f"{where}.models.{j}", "listed twice"))
        for name in model.parameters:
            if name not in per_model:
                problems.append((f"{where}.models.{j}.parameters.{name}", f"not a per-model parameter of {merge.method}"
                                 + (f" (known: {', '.join(sorted(per_model))})" if per_model else " (it takes none)")))
        missing = sorted(required - set(model.parameters) - set(merge.parameters))
        if missing and idents[j] != base:  # the base model takes no weight: the others move away from it
            problems.append((f"{where}.models.{j}.parameters", f"{merge.method} needs {', '.join(missing)}"))
    if merge.method in NEEDS_BASE and merge.base_model is None:
        problems.append((f"{where}.base_model", f"{merge.method} needs a base_model"))
    if merge.method == "slerp":
        if len(merge.models) != 2 or base not in idents:
            problems.append((f"{where}.models", ("slerp interpolates exactly two models, one of them the base_model "
                                                "(t = 0 gives the base)")))
        if "t" not in merge.parameters:
            problems.append((f"{where}.parameters", "slerp needs t (0: the base model, 1: the other)"))
    return problems


def compatibility_problems(dirs: list[tuple[str, Path]]) -> list[tuple[str, str]]:
    """Each model directory against the first: the same tensors and shapes, the same tokenizer."""
    problems: list[tuple[str, str]] = []
    if len(dirs) < 2:
        return problems
    first_path, first = dirs[0]
    shapes, vocab = _shape(first), _tokenizer_fingerprint(first)
    for path, folder in dirs[1:]:
        if folder.resolve() == first.resolve():
            continue
        other = _shape(folder)
        diff = [k for k in shapes.keys() | other.keys() if shapes.get(k) != other.get(k)]
        if diff:
            key = min(diff)
            problems.append((f"{path}.ref", (f"architecture differs from {first_path} ({key}: {other.get(key)!r} vs "
                                            f"{shapes.get(key)!r}): {FUSE_INSTEAD}")))
        elif _tokenizer_fingerprint(folder) != vocab:
            problems.append((f"{path}.ref", (f"tokenizer differs from {first_path}'s (merged embedding rows would mix "
                                            f"different tokens): {FUSE_INSTEAD}")))
    return problems


def _shape(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProfuserError(f"unreadable config.json: {exc}", where=str(folder)) from None
    shape = {k: config.get(k) for k in SHAPE_KEYS if k in config}
    text = config.get("text_config")
    if isinstance(text, dict):  # multimodal configs keep the language model's shape here
        shape.update({f"text_config.{k}": text.get(k) for k in SHAPE_KEYS if k in text})
    return shape


def _tokenizer_fingerprint(folder: Path) -> str:
    """A hash of which id each token has (tokenizer.json's vocabulary and added tokens, else the
    vocabulary files' bytes): two tokenizers with the same fingerprint give tokens the same ids."""
    digest = hashlib.sha256()
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProfuserError(f"unreadable tokenizer.json: {exc}", where=str(folder)) from None
        model = data.get("model") or {}
        added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
        digest.update(json.dumps([model.get("type"), model.get("vocab"), added], sort_keys=True).encode())
        return digest.hexdigest()
    for name in ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "tokenizer.tiktoken"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()


# --- the stage --------------------------------------------------------------------------------------


def _has_safetensors(folder: Path) -> bool:
    # mergekit reads model.safetensors(.index.json) before pytorch_model.bin: with these, no pickle
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def run(ctx) -> dict:
    from ..models import resolve_model
    from ..models.loading import as_spec

    cfg = ctx.config
    where = ctx.stage.id
    import_extra("mergekit", "merge", what="a merge baseline", where=where)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    def local(identity: dict[str, Any]) -> Path:
        spec = as_spec(identity)
        path = resolve_model(spec, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
        if not _has_safetensors(path):
            raise ProfuserError(f"{path} has no model.safetensors (pickled weights are never loaded)", where=spec.ref)
        return path

    models = [(f"models.{j}", local(m.model), m.parameters) for j, m in enumerate(cfg.models)]
    base = local(cfg.base_model) if cfg.base_model else None
    dirs = ([("base_model", base)] if base else []) + [(path, folder) for path, folder, _ in models]
    problems = compatibility_problems(dirs)
    if problems:
        path, message = problems[0]
        raise ProfuserError(f"{path}: {message}", where=where)

    merge_config = MergeConfiguration.model_validate({
        "merge_method": cfg.method,
        "models": [{"model": str(folder), **({"parameters": params} if params else {})} for _, folder, params in models],
        "base_model": str(base) if base else None,
        "parameters": cfg.parameters or None,
        "dtype": cfg.dtype,
    })
    options = MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=True, safe_serialization=True, quiet=True,
                           trust_remote_code=any(m.model.get("trust_remote_code") for m in cfg.models),
                           random_seed=cfg.seed)
    out = ctx.out / "model"
    with _own_rng():
        try:
            run_merge(merge_config, str(out), options)
        except (RuntimeError, ValueError, KeyError) as exc:  # mergekit's refusals: one line naming the merge
            raise ProfuserError(f"mergekit failed: {type(exc).__name__}: {exc}", where=where) from None
    tokenizer_spec = as_spec(cfg.base_model or cfg.models[0].model)
    if tokenizer_spec.chat_template:  # the recipe's template override, kept by the merged tokenizer
        from ..models import load_tokenizer

        load_tokenizer(ModelSpec(ref=str(out), chat_template=tokenizer_spec.chat_template)).save_pretrained(out)
    atomic_write_json(ctx.out / "merge.json", {
        "method": cfg.method, "models": [m.model["ref"] for m in cfg.models],
        "base_model": cfg.base_model["ref"] if cfg.base_model else None,
        "mergekit_config": merge_config.model_dump(mode="json", exclude_none=True)})
    tensors = 0
    from safetensors import safe_open

    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as fh:
            tensors += len(list(fh.keys()))
    return {"models": len({str(f) for _, f in dirs}), "tensors": tensors}


class _own_rng:
    """mergekit's random_seed seeds the global RNGs (DARE's drops): restore the caller's after."""

    def __enter__(self):
        import random

        import numpy as np
        import torch

        self.states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()

    def __exit__(self, *exc):
        import random

        import numpy as np
        import torch

        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.random.set_rng_state(self.states[2])
        return False
