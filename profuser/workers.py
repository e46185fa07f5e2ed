"""Stage workers: run one stage in its own spawned process, which exits when the stage returns.

Why: a process that loaded a model does not reliably give its GPU memory back (vLLM engines are
known to keep it after ``del``; CUDA caches and NCCL groups linger), so the next stage of a long
pipeline would start on a GPU that is already full. A worker's exit frees everything whatever the
libraries did. Spawned, not forked: a fork would inherit the parent's CUDA state and threads.

The worker writes into the stage's partial directory exactly as an in-process stage does, so its
artifacts are the same and a killed worker leaves the stage resumable. It rebuilds the plugin
engine the parent had (built-ins, entry points, and the extra plugins a program passed), forwards
the stage's metrics to the parent's observers as they are logged, and sends back either the
stage's metrics or the error it raised; the parent raises that error as its own, so a user sees the
same one-line message as in-process.

One computation per key: the worker dies with its runner (a parent-death signal on Linux, and a
pipe from the runner whose end-of-file it watches elsewhere), and it holds the stage's lock itself
(the runner's lock descriptor, inherited), so no rerun can compute the key beside a worker that
outlived its runner by a moment.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable
from importlib import metadata
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from .errors import ProfuserError

Metrics = dict[str, Any]


def run_stage_in_worker(stage, inputs: dict[str, Path], out: Path, runtime, engine,
                        on_metrics: Callable[[int, Metrics], None], *, lock_fd: int | None = None) -> Metrics:
    """Run ``stage`` in a fresh spawned process and return its metrics (or raise its error).
    ``lock_fd``: the descriptor holding the stage's lock, shared with the worker while it runs."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    watched, alive = context.Pipe(duplex=False)  # only the runner writes: EOF in the worker = runner gone
    # the stage (its typed Config), paths and the runtime pickle; the engine is rebuilt from its spec
    payload = {"stage": stage, "inputs": inputs, "out": out, "runtime": runtime, "engine": engine_spec(engine),
               "parent": os.getpid(), "lock": None if lock_fd is None else _InheritedFd(lock_fd)}
    process = context.Process(target=_worker_main, args=(payload, sender, watched), name=f"profuser-{stage.id}",
                              daemon=False)
    process.start()
    sender.close()  # the child holds the only writing end: EOF here means it is gone
    watched.close()
    try:
        while True:
            try:
                kind, *body = receiver.recv()
            except EOFError:
                break
            if kind == "metrics":
                on_metrics(*body)
            elif kind == "done":
                process.join()
                return body[0]
            elif kind == "error":
                process.join()
                raise _rebuild_error(*body)
            elif kind == "crash":
                process.join()
                raise RuntimeError(f"stage {stage.id} failed in its worker process:\n{body[0]}")
        process.join()
    except BaseException:
        if process.is_alive():  # interrupted: stop the worker too; its partial directory stays
            process.terminate()
            process.join(10)
            if process.is_alive():
                process.kill()
        raise
    finally:
        receiver.close()
        alive.close()
    raise ProfuserError(f"the stage's worker process ended without a result (exit code {process.exitcode}: "
                        f"{_describe_exit(process.exitcode)}); run the same command to resume it", where=stage.id)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return "killed or out of memory" if code else "no result sent"


class _InheritedFd:
    """A descriptor the spawned worker inherits (same open file, so the same flock)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):  # pickled while the worker is spawned: the descriptor is passed to it
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


def _die_with_parent(parent: int, watched) -> None:
    """Exit as soon as the runner is gone: a parent-death signal (Linux), and a thread that sees the
    runner's end of ``watched`` close (anywhere, and if the runner died before prctl)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the signal was armed
            os._exit(1)

    def watch() -> None:
        try:
            watched.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)  # the runner is gone: stop computing (the partial directory stays resumable)

    threading.Thread(target=watch, name="profuser-runner-watch", daemon=True).start()


def _worker_main(payload: dict, sender, watched=None) -> None:
    from dataclasses import replace

    from .stages import StageContext

    if watched is not None:
        _die_with_parent(payload["parent"], watched)
    lock_fd = payload.get("lock")  # held (shared with the runner) until this process exits
    try:
        engine = rebuild_engine(payload["engine"])
        stage = payload["stage"]
        ctx = StageContext(stage=stage, inputs=payload["inputs"], out=payload["out"],
                           runtime=replace(payload["runtime"], engine=engine), engine=engine,
                           metrics_sink=lambda step, metrics: sender.send(("metrics", step, metrics)))
        metrics = stage.code().run(ctx) or {}
        sender.send(("done", metrics))
    except ProfuserError as exc:
        sender.send(("error", type(exc).__module__, type(exc).__qualname__, str(exc), vars(exc)))
    except KeyboardInterrupt:
        pass  # the parent was interrupted too and says so
    except (BrokenPipeError, ConnectionResetError):
        os._exit(1)  # the runner is gone: nobody to tell
    except BaseException as exc:  # noqa: BLE001  (a bug, not bad input: the parent shows the traceback)
        from .store import disk_error

        error = disk_error(exc, payload["out"], where=payload["stage"].id)  # a full disk is not a bug
        try:
            if error is not None:
                sender.send(("error", type(error).__module__, type(error).__qualname__, str(error), vars(error)))
            else:
                sender.send(("crash", traceback.format_exc()))
        except OSError:
            os._exit(1)
    finally:
        try:
            sender.close()
        except OSError:
            pass
        if lock_fd is not None:
            os.close(lock_fd)


def _rebuild_error(module: str, qualname: str, message: str, state: dict) -> ProfuserError:
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


# --- the plugin engine, across the process boundary ---------------------------------------------


def engine_spec(engine) -> dict:
    """What a worker needs to rebuild ``engine``: whether entry points were loaded, and the extra
    plugins a program passed (modules by name, other objects pickled)."""
    from .plugins import ENTRYPOINT_GROUP

    entry_points = {ep.name for ep in metadata.entry_points(group=ENTRYPOINT_GROUP)}
    extras, loaded_entry_points = [], False
    for name, info in engine.plugins.items():
        if info.builtin:
            continue
        if name in entry_points:
            loaded_entry_points = True
            continue
        plugin = engine.pm.get_plugin(name)
        extras.append((name, ("module", plugin.__name__) if isinstance(plugin, types.ModuleType) else ("object", plugin)))
    return {"entrypoints": loaded_entry_points, "extras": extras}


def rebuild_engine(spec: dict):
    from .plugins import Engine

    extras = [(name, importlib.import_module(value) if how == "module" else value) for name, (how, value) in spec["extras"]]
    return Engine(entrypoints=spec["entrypoints"], extra_plugins=extras)


# --- torch extensions (DeepSpeed's JIT-built ops) -------------------------------------------------


def stale_extension_locks(root: str | Path | None = None) -> list[Path]:
    """Build locks of torch extensions that no process has open: what a build killed mid-way leaves
    (torch's FileBaton keeps the lock file open while it builds and deletes it after). The next
    build of that extension would wait on one forever. Linux only (it reads /proc); elsewhere none."""
    if root is None:
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    root = Path(root)
    if not Path("/proc/self/fd").is_dir() or not root.is_dir():
        return []
    locks = {p.resolve() for p in [*root.glob("*/lock"), *root.glob("*/*/lock")] if p.is_file()}
    if not locks:
        return []
    open_now: set[Path] = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    target = Path(os.readlink(fd))
                except OSError:
                    continue
                if target in locks:
                    open_now.add(target)
        except OSError:  # a process that ended meanwhile, or another user's
            continue
    return sorted(locks - open_now)


def check_extension_locks(root: str | Path | None = None) -> None:
    """Refuse, in one line naming the file, to start a build that would wait on a stale lock."""
    stale = stale_extension_locks(root)
    if stale:
        raise ProfuserError(f"a torch extension build was killed and left its lock ({len(stale)} such file(s)); "
                            f"no process holds it, and the next build would wait on it forever: remove "
                            f"{' '.join(map(str, stale))} and run again", where=str(stale[0]))
