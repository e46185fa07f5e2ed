"""GGUF files to plain Hugging Face directories (dequantised float32 safetensors + fast tokenizer).

The GGUF is dequantised once (``transformers`` reads GGUF through ``gguf``) and the result cached
(see ``profuser.models.cache``), so later loads are ordinary safetensors loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import ModelError
from ..model_files import gguf_problem
from .cache import cached_build, file_key

log = logging.getLogger(__name__)


def dequantise_gguf(gguf_path: Path, out: Path, *, ref: str | None = None) -> None:
    """Write ``out`` as a ``save_pretrained`` directory holding the dequantised model (float32:
    the dequantised values are exact in it) and its tokenizer converted to a fast tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    ref = ref or str(gguf_path)
    log.info("dequantising %s (once; cached afterwards)", gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # dequantize=True: a plain dense model even where GGUF matmul kernels exist, so it serialises
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as exc:  # noqa: BLE001 - any failure of the converter is this file's problem
        raise ModelError(f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {exc}", where=ref) from None
    # the dequantised model is an ordinary one: drop what marks it as GGUF-quantised
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.name_or_path = ref
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stat = gguf_path.stat()
    (out / "profuser_source.json").write_text(
        json.dumps({"gguf": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, indent=2)
    )


def gguf_dir(gguf_path: Path, cache_dir: Path | None = None, *, ref: str | None = None) -> Path:
    """The cached dequantised directory of a GGUF file (built on first use)."""
    gguf_path = Path(gguf_path).expanduser()
    ref = ref or str(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file not found: {gguf_path}", where=ref)
    if problem := gguf_problem(gguf_path):
        raise ModelError(problem, where=ref)
    name = gguf_path.name.removesuffix(".gguf")
    return cached_build(
        cache_dir, "gguf", name, file_key(gguf_path), lambda out: dequantise_gguf(gguf_path, out, ref=ref), ref=ref
    )
