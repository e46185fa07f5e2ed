"""What a local model reference must hold, checked on the file system without loading anything
(no torch, no transformers): recipe validation, merge validation and the model loaders share it.
Below the recipe in the house: it imports nothing of profuser's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"  # peft's save_pretrained
BASE_MODEL_FILE = "base_model.json"  # the base ModelSpec an adapter directory was trained on (profuser's)
# what a save_pretrained directory must hold; pickled .bin weights are read as tensors only (weights_only)
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_LFS_POINTER = b"version https://git-lfs"
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "tokenizer.tiktoken")


def looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref.endswith(".gguf") or Path(ref).expanduser().exists()


def is_adapter_dir(path: Path) -> bool:
    """A LoRA adapter without merged weights (what training writes with ``train.peft.merge: false``)."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def local_model_problem(spec: Any, need: tuple[str, ...] = ("config", "weights", "tokenizer")) -> str | None:
    """What is wrong with a local model ref (None: fine, or not a local ref), without loading
    anything: the path exists, and a directory holds what ``need`` names of a config, safetensors
    weights and a tokenizer. ``spec``: a ``ModelSpec`` (its ``ref`` and ``gguf_file``)."""
    ref = spec.ref
    if ref.startswith("builtin:") or not looks_local(ref):
        return None  # hub ids and plugin models are checked when fetched or built
    path = Path(ref).expanduser()
    if spec.gguf_file:
        if not path.is_dir():
            return f"directory not found: {path}"
        gguf = path / spec.gguf_file
        return gguf_problem(gguf) if gguf.is_file() else f"gguf_file not found: {gguf}"
    if ref.endswith(".gguf"):
        return gguf_problem(path) if path.is_file() else f"file not found: {path}"
    if path.is_file():
        return (f"{path} is a file, not a model directory (a local model is a save_pretrained directory or a "
                ".gguf file)")
    if not path.is_dir():
        return f"model directory not found: {path}"
    if is_adapter_dir(path):  # the base model brings config and weights
        return incomplete(path, tuple(n for n in need if n == "tokenizer")) or (
            None if (path / BASE_MODEL_FILE).is_file() else f"{path} is a LoRA adapter without {BASE_MODEL_FILE}")
    return incomplete(path, need)


def gguf_problem(path: Path) -> str | None:
    """A .gguf file that is not one, by its first bytes (reading the whole header would parse the
    vocabulary: seconds per model): an HTML error page saved under the name, a Git LFS pointer."""
    with open(path, "rb") as fh:
        head = fh.read(len(_LFS_POINTER))
    if head.startswith(b"GGUF"):
        return None
    if head == _LFS_POINTER:
        return f"{path} is a Git LFS pointer, not the model file (fetch it: git lfs pull)"
    return f"{path} is not a GGUF file (it does not start with GGUF's magic bytes)"


def incomplete(path: Path, need: tuple[str, ...]) -> str | None:
    missing = []
    if "config" in need and not (path / "config.json").is_file():
        missing.append("config.json")
    if "weights" in need and not any((path / name).is_file() for name in _WEIGHTS) and not any(path.glob("*.safetensors")):
        missing.append("safetensors weights (model.safetensors)")
    if "tokenizer" in need and not any((path / name).is_file() for name in _TOKENIZER):
        missing.append("tokenizer (tokenizer.json, or tokenizer.model / vocab.json)")
    return f"{path} is not a complete model directory: no {', no '.join(missing)}" if missing else None
