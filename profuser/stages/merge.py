"""The ``merge/<label>`` stage: a model-merging baseline (the paper's Table 3) made by mergekit.

A recipe's ``merges:`` entries each plan this stage and an ``evaluate/merge/<label>`` stage that
scores ``model/`` with the recipe's ``evaluate`` block, so the merge stands beside the fused model
in ``profuser run``'s table, the run report and ``profuser compare``.

Config: ``method`` (one of ``recipe.MERGE_METHODS``), ``models`` (model identities, each with
mergekit's per-model ``parameters``), ``base_model`` (an identity or None), ``parameters``
(method-wide), ``dtype`` and ``seed`` (DARE's random drops). No upstream input.

Merging averages, interpolates or adds weights tensor by tensor and token id by token id, so the
models must share an architecture (the same tensors, of the same shapes) and a tokenizer (the same
id for the same token). ``profuser.merging.merge_problems`` checks both on local model directories at validate
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

from pathlib import Path
from typing import Any

from ..errors import ProfuserError, import_extra
from ..merging import compatibility_problems, merge_problems  # noqa: F401  (merge_problems: re-exported)
from ..recipe import MergeSpec, ModelSpec
from ..store import atomic_write_json
from . import ModelIdentity, StageConfig

VERSION = "1"
LOADS_MODEL = True  # mergekit holds tensors of every model: a worker process when stages are isolated

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
