"""The model cache: dequantised GGUF models stored as plain ``save_pretrained`` directories.

Dequantising a GGUF file takes 20-60 s (tokenizer conversion included); loading the result as
safetensors takes a few. Each entry is a directory ``<cache>/<group>/<name>-<key>/`` that appears
only complete: it is built in a temporary sibling and renamed into place, under a file lock so
that two processes needing the same model build it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import ModelError

CACHE_ENV = "PROFUSER_CACHE"
# bump when the layout of a cache entry changes; transformers' version is part of every key too,
# because its GGUF conversion decides the tensor names and the tokenizer it writes
CACHE_FORMAT = "1"
LOCK_TIMEOUT_S = 1800  # a cold Gemma build on a busy machine can take minutes


def default_cache_dir() -> Path:
    """``$PROFUSER_CACHE``, else ``~/.cache/profuser``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "profuser").expanduser()


def cache_key(*parts: object) -> str:
    import transformers

    text = json.dumps([CACHE_FORMAT, transformers.__version__, *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_key(path: Path) -> str:
    """Identifies a file without reading it: name, size and modification time."""
    stat = path.stat()
    return cache_key(path.name, stat.st_size, stat.st_mtime_ns)


def cached_build(cache_dir: Path | None, group: str, name: str, key: str, build: Callable[[Path], None], *, ref: str) -> Path:
    """The cache entry ``<cache_dir>/<group>/<name>-<key>``, calling ``build(tmp_dir)`` to fill it
    when missing. ``ref`` names the model in errors."""
    from filelock import FileLock, Timeout

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    parent = root / group
    final = parent / f"{name}-{key}"
    if final.is_dir():
        return final
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache {parent}: {exc.strerror or exc}", where=ref) from None
    try:
        with FileLock(str(parent / f".{name}-{key}.lock"), timeout=LOCK_TIMEOUT_S):
            if final.is_dir():  # another process built it while we waited
                return final
            # leftovers of a build that was killed: nobody else builds this entry while we hold the lock
            for stale in parent.glob(f".{name}-{key}.*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = parent / f".{name}-{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
            tmp.mkdir()  # (mkdir, not mkdtemp: the entry gets the umask's permissions, not 0700)
            try:
                build(tmp)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except Timeout:
        raise ModelError(f"timed out waiting for another process building {final}", where=ref) from None
    return final
