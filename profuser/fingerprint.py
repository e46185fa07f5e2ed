"""What a cache key knows of things outside the recipe: the content of local files a stage reads
(model folders, GGUF files, local reward models, a DeepSpeed JSON) and the source code of
third-party components. Also why a key changed, for ``--dry-run``.

Content is hashed once per file and remembered in ``fingerprints.json`` under the model cache
(``$PROFUSER_CACHE`` or ``~/.cache/profuser``) by path, size, mtime and inode, so an unchanged
14 GB model is not re-read on every run. A file modified within ``RACY_S`` of being hashed is
not remembered (the mtime of a write in the same clock tick would not tell the two apart).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ProfuserError

CACHE_FILE = "fingerprints.json"
RACY_S = 2.0  # coarse filesystems keep mtimes to 2 s
CHUNK = 1 << 20


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class FingerprintCache:
    """SHA-256 of files, remembered by (path, size, mtime_ns, inode) in a JSON file written
    atomically; ``hashed`` counts the files actually read (tests assert on it)."""

    def __init__(self, path: Path | None = None):
        if path is None:
            from .models.cache import default_cache_dir

            path = default_cache_dir() / CACHE_FILE
        self.path = Path(path)
        self.hashed = 0
        self._dirty = False
        self._racy: dict[str, list] = {}  # too fresh to remember on disk; this instance reuses them
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
            self._entries: dict[str, list] = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):  # none yet, or unreadable: a cache, rebuilt as needed
            self._entries = {}

    def file_sha256(self, path: Path) -> str:
        path = Path(path).resolve()
        name = str(path)
        st = path.stat()
        entry = self._racy.get(name) or self._entries.get(name)
        if isinstance(entry, list) and len(entry) == 4 and entry[:3] == _stat_key(st):
            return entry[3]
        for _ in range(3):  # a file written while it is hashed is hashed again
            started = time.time_ns()
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
            self.hashed += 1
            after = path.stat()
            if _stat_key(after) == _stat_key(st):
                break
            st = after
        else:
            raise ProfuserError("keeps changing while it is hashed; wait until it is written", where=name)
        sha = digest.hexdigest()
        if st.st_mtime_ns < started - int(RACY_S * 1e9):
            self._entries[name] = [*_stat_key(st), sha]
            self._dirty = True
        else:
            self._racy[name] = [*_stat_key(st), sha]
        return sha

    def save(self) -> None:
        """Write the entries back (atomically; entries of files gone are dropped). A cache that
        cannot be written only costs hashing again next time."""
        if not self._dirty:
            return
        try:
            current = json.loads(self.path.read_text(encoding="utf-8"))  # another process's entries too
            merged = current if isinstance(current, dict) else {}
        except (OSError, ValueError):
            merged = {}
        merged.update(self._entries)
        merged = {p: e for p, e in merged.items() if os.path.exists(p)}
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(merged), encoding="utf-8")
            tmp.replace(self.path)
            self._dirty = False
        except OSError:
            tmp.unlink(missing_ok=True)


def path_fingerprint(path: Path, cache: FingerprintCache) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under a directory (hidden ones left out: VCS and
    tool state), or ``{name: sha256}`` of a file."""
    path = Path(path)
    if path.is_file():
        return {path.name: cache.file_sha256(path)}
    files = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            file = Path(root, name)
            if not name.startswith(".") and file.is_file():
                files[file.relative_to(path).as_posix()] = cache.file_sha256(file)
    return files


def local_path(value: Any) -> Path | None:
    """The local file or folder a config string names, if it names one that exists. Hub ids,
    ``builtin:`` and ``recipe:`` refs, URLs and text are not paths; a bare word is not either
    (only strings with a slash, ``~`` or a ``.gguf`` suffix are)."""
    if not isinstance(value, str) or not value or len(value) > 4096 or "\n" in value:
        return None
    if value.startswith(("builtin:", "recipe:", "hf:", "hub:")) or "://" in value:
        return None
    if not (value.startswith("~") or "/" in value or os.sep in value or value.endswith(".gguf")):
        return None
    path = Path(value).expanduser()
    try:
        if not path.exists():
            return None
        path = path.resolve()
    except (OSError, ValueError):
        return None
    if path == Path(path.anchor) or path == Path.home().resolve():  # never a whole disk or home
        return None
    return path


def local_paths(config: Any, prefix: str = "") -> Iterator[tuple[str, Path]]:
    """``(dotted field, path)`` for every local path a hashed stage config names. A model spec
    with ``gguf_file`` in a folder reads that one file of the folder."""
    if isinstance(config, dict):
        ref, gguf = config.get("ref"), config.get("gguf_file")
        for name, value in config.items():
            label = f"{prefix}.{name}" if prefix else str(name)
            if name == "ref" and gguf and (folder := local_path(ref)) is not None and folder.is_dir():
                if (folder / gguf).is_file():
                    yield label, folder / gguf
                continue
            yield from local_paths(value, label)
    elif isinstance(config, list):
        for i, value in enumerate(config):
            yield from local_paths(value, f"{prefix}.{i}")
    elif (path := local_path(config)) is not None:
        yield prefix, path


def content_fingerprints(config: Any, cache: FingerprintCache, *, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{dotted field: {"path": ..., "files": {name: sha256}}}`` for the local paths of a config
    (fields in ``skip`` and below left out)."""
    found = {}
    for label, path in local_paths(config):
        if any(label == s or label.startswith(s + ".") for s in skip):
            continue
        found[label] = {"path": str(path), "files": path_fingerprint(path, cache)}
    return found


def hashed_content(content: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """What of ``content_fingerprints`` a key holds: the files' hashes, not where they are (the
    config holds the path as the recipe wrote it)."""
    return {label: entry["files"] for label, entry in content.items()}


# --- code ---------------------------------------------------------------------------------------

_source_files: dict[tuple[str, int, int], tuple[str, list[str]]] = {}  # (file, size, mtime) -> (sha, imports)


def source_hash(module_name: str) -> str | None:
    """SHA-256 over the source files of a module and of every module it imports (transitively)
    from the same top-level package; None when the module has no source file."""
    top = module_name.split(".")[0]
    seen: dict[str, str] = {}
    todo = [module_name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        file = _module_file(name)
        if file is None:
            if name == module_name:
                return None
            continue
        sha, imports = _read_source(file, name)
        seen[name] = sha
        todo += [m for m in imports if m.split(".")[0] == top]
    return hashlib.sha256(json.dumps(sorted(seen.items())).encode()).hexdigest()[:16]


def class_code_hash(cls: type) -> str | None:
    """The code hash of a component class: its module's ``source_hash``, else its own source."""
    found = source_hash(cls.__module__)
    if found is not None:
        return found
    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def _module_file(name: str) -> str | None:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if file is None and module is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError, AttributeError):
            return None
        file = spec.origin if spec is not None and spec.has_location else None
    return file if file and file.endswith(".py") and os.path.isfile(file) else None


def _read_source(file: str, module_name: str) -> tuple[str, list[str]]:
    st = os.stat(file)
    memo_key = (file, st.st_size, st.st_mtime_ns)
    if memo_key in _source_files:
        return _source_files[memo_key]
    data = Path(file).read_bytes()
    package = module_name if os.path.basename(file) == "__init__.py" else module_name.rpartition(".")[0]
    found = (hashlib.sha256(data).hexdigest(), _imports(data, package))
    if st.st_mtime_ns < time.time_ns() - int(RACY_S * 1e9):  # as for content: a fresh file is read again
        _source_files[memo_key] = found
    return found


def _imports(source: bytes, package: str) -> list[str]:
    """Absolute names of the modules a source imports (``from a import b`` yields ``a`` and ``a.b``,
    which may be a submodule)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    continue
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module and base else (node.module or base)
            else:
                base = node.module or ""
            if base:
                names.append(base)
                names += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return names


# --- why a key changed --------------------------------------------------------------------------

SINGULAR = {"losses": "loss", "curricula": "curriculum", "datasets": "dataset", "models": "model",
            "generators": "generator", "reward_models": "reward model", "evaluators": "evaluator", "aligners": "aligner"}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))]
    return [] if old == new else [prefix or "(all)"]


def change_reasons(old: dict[str, Any] | None, new: dict[str, Any], stage_ids: dict[str, str]) -> list[str]:
    """Why a stage's key inputs ``new`` differ from those of its previous run ``old`` (as
    ``stage_key_inputs`` makes them); ``stage_ids``: input role -> upstream stage id."""
    if old is None:
        return ["not run before"]
    reasons = []
    for label, entry in new.get("content_paths", {}).items():
        before = old.get("content", {}).get(label)
        if before is None:
            continue
        files = new["content"][label]
        changed = [n for n in sorted(set(before) | set(files)) if before.get(n) != files.get(n)]
        if changed:
            root = Path(entry)
            shown = [str(root / n) if root.name != n else str(root) for n in changed[:3]]
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            reasons.append(f"{label}: {', '.join(shown)}{more} changed")
    for name in sorted(set(old.get("code", {})) | set(new.get("code", {}))):
        if old.get("code", {}).get(name) != new.get("code", {}).get(name):
            kind, _, component = name.partition(":")
            reasons.append(f"{SINGULAR.get(kind, kind)} {component!r} code changed" if kind != "stage" else "stage code changed")
    for name in sorted(set(old.get("versions", {})) | set(new.get("versions", {}))):
        before, after = old.get("versions", {}).get(name), new.get("versions", {}).get(name)
        if before != after:
            reasons.append(f"{name} version {before} -> {after}")
    fields = _diff(old.get("config"), new.get("config"))
    if fields:
        reasons.append("config " + ", ".join(fields[:4]) + (f" and {len(fields) - 4} more" if len(fields) > 4 else "") + " changed")
    for role, key in new.get("deps", {}).items():
        if old.get("deps", {}).get(role) != key:
            reasons.append(f"upstream {stage_ids.get(role, role)} changed")
    return reasons or ["not in the store (removed, or its files were corrupt)"]
