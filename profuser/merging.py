"""What a recipe's ``merges:`` may hold, checked at validate time without mergekit or torch: each
method's parameters, and that the models share an architecture and a tokenizer (from their
config.json and tokenizer files, nothing loaded). The ``merge`` stage (``profuser.stages.merge``)
runs the same compatibility check on the resolved models; recipe validation asks this module, never
the stage, so the house keeps its layers (recipe below models and stages)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ProfuserError
from .model_files import local_model_problem

if TYPE_CHECKING:
    from .recipe import MergeSpec, ModelSpec

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


def merge_problems(merges: list[MergeSpec]) -> list[tuple[str, str]]:
    """(recipe path, message) for each merge whose method settings are wrong, or whose local models
    differ in architecture or tokenizer. Hub ids, builtins and GGUF files are checked when resolved."""
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
