"""Model references (hub id, local directory, GGUF file, ``builtin:NAME``), the dequantised-GGUF
cache, and loading models and tokenizers from a ``ModelSpec`` (or its ``identity()`` dict).

See docs/models.md.
"""

from .cache import CACHE_ENV, cached_build, default_cache_dir
from .gguf import dequantise_gguf, gguf_dir
from .loading import as_spec, load_model, load_tokenizer, resolve_model

__all__ = [
    "CACHE_ENV",
    "as_spec",
    "cached_build",
    "default_cache_dir",
    "dequantise_gguf",
    "gguf_dir",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]
