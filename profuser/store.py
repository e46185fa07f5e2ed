"""Content-addressed artifact store: one directory per (stage kind, key), written atomically.

Layout under the runs directory::

    store/<kind>/<key>/            a finished artifact: the stage's files + manifest.json
    store/<kind>/<key>.partial/    a stage being written; kept across kills so that a stage can
                                   resume from its own scratch state (generation shards,
                                   training checkpoints), then renamed into place
    store/.locks/<kind>-<key>.lock one computation of a key at a time across processes (an OS
                                   file lock: a dead holder's lock is free again)
    store/.locks/<kind>-<key>.lease  shared locks of the runs that read the key: ``--gc`` never
                                   removes a leased artifact (a dead run's lease is free again)
    store/<kind>/<key>.corrupt-*   a corrupt artifact moved aside; ``collect_garbage`` (``profuser
                                   runs --gc``) removes these, trash and what kills left

``manifest.json`` is written last and lists every file with its size and SHA-256: an artifact
without one, or whose files disagree with it, is partial or corrupt and is never read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError, ProfuserError

MANIFEST = "manifest.json"
# temporary names (``.x.tmp123`` from atomic writes, ``.tmpXXXX`` from tempfile with a dot prefix):
# whatever a kill left under these names is swept before a stage is sealed, never published
TEMPORARY = re.compile(r"^\.(tmp|.*\.tmp)")


def stable_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (dict order does not matter)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_name(path: Path) -> Path:
    """Where to write ``path`` before renaming it into place (matched by ``TEMPORARY``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old content or the new, never half of it."""
    path = Path(path)
    tmp = temporary_name(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


@dataclass
class Artifact:
    kind: str
    key: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def size_bytes(self) -> int:
        return sum(entry["size"] for entry in self.manifest.get("files", {}).values())


class ArtifactStore:
    def __init__(self, root: str | Path, *, on_corrupt: Callable[[Path, str], None] | None = None):
        self.root = Path(root)
        self.on_corrupt = on_corrupt  # told when a corrupt artifact is moved aside (to be recomputed)

    def final_dir(self, kind: str, key: str) -> Path:
        return self.root / "store" / kind / key

    def partial_dir(self, kind: str, key: str) -> Path:
        return self.root / "store" / kind / f"{key}.partial"

    def get(self, kind: str, key: str, *, verify: bool = True, quarantine: bool = True) -> Artifact | None:
        """The finished artifact, or None. A corrupt one is moved aside (unless ``quarantine`` is
        False: a dry run only looks) so that it gets recomputed."""
        path = self.final_dir(kind, key)
        if not path.is_dir():
            return None
        try:
            manifest = read_manifest(path, verify=verify)
        except ArtifactError as exc:
            if quarantine:
                self._quarantine(path)
                if self.on_corrupt:
                    self.on_corrupt(path, exc.message)
            return None
        return Artifact(kind, key, path, manifest)

    def _quarantine(self, path: Path) -> None:
        target = path.with_name(f"{path.name}.corrupt-{int(time.time())}-{os.getpid()}")
        os.replace(path, target)

    def invalidate(self, kind: str, key: str) -> bool:
        """Drop a finished artifact (``--force``); returns whether one existed."""
        path = self.final_dir(kind, key)
        if not path.is_dir():
            return False
        trash = path.with_name(f"{key}.trash-{os.getpid()}")
        os.replace(path, trash)  # atomic: the artifact is gone before its files are
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def begin(self, kind: str, key: str, *, fresh: bool = False) -> Path:
        """The partial directory a stage writes into (kept from an earlier killed attempt unless ``fresh``)."""
        partial = self.partial_dir(kind, key)
        if fresh and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        return partial

    def lock_path(self, kind: str, key: str) -> Path:
        return self.root / "store" / ".locks" / f"{kind}-{key}.lock"

    @contextlib.contextmanager
    def lock(self, kind: str, key: str, *, on_wait: Callable[[str], None] | None = None) -> Iterator[int]:
        """Hold the lock of one key: another process computing it makes this wait (``on_wait`` is
        told who holds it). An OS file lock, so a killed holder's lock is free at once. Yields the
        descriptor holding it (a stage worker inherits it: the lock lasts while either lives)."""
        path = self.lock_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        holder = path.with_suffix(".holder")
        fd = _try_lock(path)
        if fd is None:
            if on_wait:
                on_wait(_read_holder(holder))
            fd = _try_lock(path, block=True)
        try:
            atomic_write_json(holder, {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
            yield fd
        finally:
            holder.unlink(missing_ok=True)
            os.close(fd)  # releases the lock

    def lease_path(self, kind: str, key: str) -> Path:
        return self.root / "store" / ".locks" / f"{kind}-{key}.lease"

    def leased(self, kind: str, key: str) -> bool:
        """Whether a live run (another open lease than any of this call's) reads the key."""
        path = self.lease_path(kind, key)
        if not path.is_file():
            return False
        fd = _try_lock(path)
        if fd is None:
            return True
        os.close(fd)
        return False

    def lease(self, keys: Iterable[tuple[str, str]]) -> Leases:
        """Shared leases on ``(kind, key)`` pairs, held until released (or the process dies):
        ``collect_garbage`` removes no leased artifact or partial. Taken before a run reads the
        store, so gc cannot remove what it is verifying or about to read. A read-only store needs
        none (nothing can remove from it) and gets none."""
        leases = Leases()
        try:
            for kind, key in keys:
                path = self.lease_path(kind, key)
                path.parent.mkdir(parents=True, exist_ok=True)
                # blocks only while gc removes this very key (it holds the lease exclusively)
                leases.fds.append((path, _try_lock(path, block=True, shared=True)))
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                leases.release()
                raise
        return leases

    def commit(self, kind: str, key: str, manifest: dict[str, Any], *, exclude: Callable[[Path], bool] | None = None) -> Artifact:
        """Seal the partial directory: drop temporary files a kill left, hash the files, write the
        manifest last, rename into place."""
        partial = self.partial_dir(kind, key)
        sweep_temporary(partial)
        files = {}
        for file in sorted(p for p in partial.rglob("*") if p.is_file()):
            rel = file.relative_to(partial).as_posix()
            if rel == MANIFEST or (exclude and exclude(file)):
                continue
            files[rel] = {"size": file.stat().st_size, "sha256": file_sha256(file)}
        manifest = {**manifest, "kind": kind, "key": key, "files": files, "finished_at": time.time()}
        atomic_write_json(partial / MANIFEST, manifest)
        final = self.final_dir(kind, key)
        if final.exists():  # a concurrent run finished first: keep theirs
            shutil.rmtree(partial)
        else:
            os.replace(partial, final)
        return Artifact(kind, key, final, manifest)

    def artifacts(self) -> list[Artifact]:
        found = []
        for manifest_path in sorted((self.root / "store").glob(f"*/*/{MANIFEST}")):
            path = manifest_path.parent
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            found.append(Artifact(path.parent.name, path.name, path, manifest))
        return found


@dataclass
class Leases:
    """Open descriptors holding shared leases; ``release`` closes them (so does the process's exit)."""

    fds: list[tuple[Path, int]] = field(default_factory=list)

    def release(self) -> None:
        while self.fds:
            path, fd = self.fds.pop()
            try:  # the last reader removes the file (a newcomer that opened it re-locks the new one)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)
            except OSError:  # another run leases it too, or a read-only store
                pass
            finally:
                os.close(fd)


def _try_lock(path: Path, *, block: bool = False, shared: bool = False) -> int | None:
    """An open descriptor holding the exclusive (or ``shared``) lock of ``path``, or None if
    another process holds it (unless ``block``: then wait). If ``gc`` removed the file while this
    waited, the lock is on a file nobody else sees: take the lock of the file now at ``path``."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


LEASED = "a live run reads it (leased)"
# where ``profuser compare`` records the stages each comparison.json points into (gc keeps them)
COMPARISONS = "comparisons"


def record_comparison(runs_dir: Path, comparison: Path, stages: Iterable[tuple[str, str]]) -> Path:
    """Tell ``collect_garbage`` that ``comparison`` (a comparison.json) reads these artifacts: one
    record per comparison file, replaced when the same file is written again."""
    comparison = Path(comparison).resolve()
    record = Path(runs_dir) / COMPARISONS / f"{stable_hash(str(comparison))[:16]}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, {"comparison": str(comparison), "stages": sorted({tuple(s) for s in stages})})
    return record


@dataclass
class Garbage:
    """One thing ``collect_garbage`` found: removed (or, in a dry run, would be) unless ``kept``."""

    path: Path
    what: str  # corrupt | trash | partial | rank check-ins | lock | temporary | unreferenced | stale comparison record
    bytes: int
    kept: str = ""  # why it stays ("" = removed)


def collect_garbage(store: ArtifactStore, *, everything: bool = False, dry_run: bool = False) -> list[Garbage]:
    """What a store accumulates besides its artifacts, removed unless ``dry_run``:

    - corrupt copies (``<key>.corrupt-*``: moved aside and recomputed) and trash (``<key>.trash-*``:
      a ``--force`` killed while deleting);
    - partial directories and rank check-ins whose key no live run holds. An empty one is removed;
      one with files is a killed run's resumable state (generation shards, training checkpoints):
      kept unless ``everything``, and kept while a live run leases its key (it will resume it);
    - lock, lease and holder files of keys no live run holds, and temporary files of dead
      processes outside the partials (run records, holders);
    - with ``everything``: finished artifacts that no run record (``runs/*/run.json``, a
      comparison's seeds ``runs/*/seeds/*/run.json``) and no comparison (``comparisons/*.json``,
      while its ``comparison.json`` exists) references, unless a live run leases it or a run is
      computing a stage now (its earlier stages are not in its record yet).

    A key's lock and lease are held while its partial or artifact is removed, so a run that starts
    meanwhile waits, then sees it gone."""
    found: list[Garbage] = []
    base = store.root / "store"
    if not base.is_dir():
        return found

    def remove(item: Garbage, kind: str = "", key: str = "") -> None:
        found.append(item)
        if dry_run or item.kept:
            return
        taken: list[tuple[Path, int]] = []
        try:
            if key:
                store.lock_path(kind, key).parent.mkdir(parents=True, exist_ok=True)
                for path, why in ((store.lock_path(kind, key), "a live run holds it"),
                                  (store.lease_path(kind, key), LEASED)):
                    fd = _try_lock(path)
                    if fd is None:  # a run took the key since we looked
                        item.kept = why
                        return
                    taken.append((path, fd))
            _remove(item.path)
            for path, _ in taken:  # the files locking created; a waiter re-locks the new file
                path.unlink(missing_ok=True)
        finally:
            for _, fd in taken:
                os.close(fd)

    held: set[tuple[str, ...]] = set()  # (kind, key) whose lock a live process holds now
    locks = base / ".locks"
    for lock_file in sorted(locks.glob("*.lock")) if locks.is_dir() else []:
        fd = _try_lock(lock_file)
        if fd is None:
            held.add(tuple(lock_file.stem.rsplit("-", 1)))
            continue
        try:  # free: removed while held; a process waiting on it re-locks the new file
            if not dry_run:
                lock_file.unlink(missing_ok=True)
            found.append(Garbage(lock_file, "lock", 0))
        finally:
            os.close(fd)
    leased: set[tuple[str, ...]] = set()  # (kind, key) a live run reads
    for lease_file in sorted(locks.glob("*.lease")) if locks.is_dir() else []:
        fd = _try_lock(lease_file)
        if fd is None:
            leased.add(tuple(lease_file.stem.rsplit("-", 1)))
            continue
        try:
            if not dry_run:
                lease_file.unlink(missing_ok=True)
            found.append(Garbage(lease_file, "lock", 0))
        finally:
            os.close(fd)
    for holder in sorted(locks.glob("*.holder")) if locks.is_dir() else []:
        if tuple(holder.stem.rsplit("-", 1)) not in held:
            remove(Garbage(holder, "lock", _size(holder)))

    for kind_dir in sorted(p for p in base.iterdir() if p.is_dir() and p.name != ".locks"):
        kind = kind_dir.name
        for path in sorted(kind_dir.iterdir()):
            name = path.name
            if ".corrupt-" in name:
                remove(Garbage(path, "corrupt", _size(path)))
            elif ".trash-" in name:
                remove(Garbage(path, "trash", _size(path)))
            elif name.endswith((".partial", ".ranks")):
                key = name.rsplit(".", 1)[0]
                size = _size(path)
                what = "partial" if name.endswith(".partial") else "rank check-ins"
                resumable = what == "partial" and any(p.is_file() for p in path.rglob("*"))
                if (kind, key) in held:
                    kept = "a live run holds it"
                elif resumable and (kind, key) in leased:
                    kept = LEASED + ", and will resume it"
                elif resumable and not everything:
                    kept = "resumable: a killed run's state; --all removes it"
                else:
                    kept = ""
                remove(Garbage(path, what, size, kept), kind, key)

    for tmp in sorted([*locks.glob(".*"), *(store.root / "runs").glob("*/.*"), *(store.root / "runs").glob("*/seeds/*/.*"),
                       *(store.root / COMPARISONS).glob(".*")]):
        pid = re.search(r"\.tmp(\d+)$", tmp.name)
        if pid and TEMPORARY.match(tmp.name) and not _alive(int(pid.group(1))):
            remove(Garbage(tmp, "temporary", _size(tmp)))

    if everything:
        referenced, unreadable = set(), []
        records = [*(store.root / "runs").glob("*/run.json"), *(store.root / "runs").glob("*/seeds/*/run.json")]
        for record in sorted(records):
            try:
                referenced |= {(s["kind"], s["key"]) for s in json.loads(record.read_text())["stages"]}
            except (OSError, ValueError, KeyError, TypeError):
                unreadable.append(record)
        for record in sorted((store.root / COMPARISONS).glob("*.json")):
            try:
                data = json.loads(record.read_text())
                if not Path(data["comparison"]).is_file():  # its comparison is gone: so is its claim
                    remove(Garbage(record, "stale comparison record", _size(record)))
                    continue
                referenced |= {(kind, key) for kind, key in data["stages"]}
            except (OSError, ValueError, KeyError, TypeError):
                unreadable.append(record)
        if unreadable:
            kept = f"{unreadable[0]} is unreadable: what it references is unknown"
        elif held:
            kept = "a run is in progress (its record is written when it ends)"
        else:
            kept = ""
        for artifact in store.artifacts():
            if (artifact.kind, artifact.key) not in referenced:
                why = LEASED if (artifact.kind, artifact.key) in leased else kept
                remove(Garbage(artifact.path, "unreferenced", _size(artifact.path), why), artifact.kind, artifact.key)
    return found


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_holder(holder: Path) -> str:
    try:
        info = json.loads(holder.read_text())
        return f"pid {info['pid']} on {info['host']}, for {time.time() - info['since']:.0f}s"
    except (OSError, ValueError, KeyError):
        return "a process that is starting"


def sweep_temporary(root: Path) -> list[Path]:
    """Remove every temporary file or folder under ``root`` (names matched by ``TEMPORARY``)."""
    found = sorted((p for p in root.rglob(".*") if TEMPORARY.match(p.name)), key=lambda p: len(p.parts))
    removed = []
    for path in found:
        if any(parent in removed for parent in path.parents):
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def read_manifest(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a finished artifact; with ``verify``, check every file's size and hash."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ArtifactError("no manifest: the artifact is partial", where=str(path)) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"unreadable manifest: {exc}", where=str(path)) from None
    if verify:
        for rel, entry in manifest.get("files", {}).items():
            file = path / rel
            if not file.is_file() or file.stat().st_size != entry["size"]:
                raise ArtifactError(f"file {rel} is missing or has the wrong size", where=str(path))
            if file_sha256(file) != entry["sha256"]:
                raise ArtifactError(f"file {rel} does not match its checksum", where=str(path))
    return manifest


# --- a full or read-only disk: one line naming the path and the space left ------------------------

_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system"}
# the same errors as libraries word them without an OSError (safetensors' Rust I/O, torch's writer)
_DISK_MESSAGES = (("No space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC), ("code: 28,", errno.ENOSPC),
                  ("StorageFull", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT),
                  ("Read-only file system", errno.EROFS), ("os error 30", errno.EROFS), ("code: 30,", errno.EROFS))


def disk_error(exc: BaseException, path: str | Path, *, where: str | None = None) -> ProfuserError | None:
    """The one-line error for ``exc`` if it is a full disk, an exceeded quota or a read-only file
    system (writing under ``path``), naming the file and the free space; None for anything else."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS else None
    if code is None and not isinstance(exc, OSError):
        text = str(exc)
        code = next((c for needle, c in _DISK_MESSAGES if needle in text), None)
        if code is None and "failed writing file" in text and _free_bytes(Path(path)) < 64 << 20:
            code = errno.ENOSPC  # torch's PytorchStreamWriter says no more than that
    if code is None:
        return None
    target = Path(getattr(exc, "filename", None) or path)
    free = _free_bytes(target)
    shown = "unknown" if free < 0 else _human_bytes(free)
    if code == errno.EROFS:
        advice = ("a run whose stages are all cached writes nothing there; to compute, point --runs-dir "
                  "(PROFUSER_RUNS_DIR) at a writable directory")
    else:
        advice = ("free some space (profuser runs --gc removes what kills left; --all also what no run uses) "
                  "and run the same command: finished stages are kept, this one resumes")
    return ProfuserError(f"{_DISK_ERRNOS[code]} writing {target} ({shown} free there): {advice}", where=where)


@contextlib.contextmanager
def disk_errors(path: str | Path, *, where: str | None = None) -> Iterator[None]:
    """Turn a full or read-only disk met inside the block into its one-line ProfuserError."""
    try:
        yield
    except ProfuserError:
        raise
    except Exception as exc:
        error = disk_error(exc, path, where=where)
        if error is None:
            raise
        raise error from None


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return -1


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
