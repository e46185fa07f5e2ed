"""A toy model stage (run in a worker by an isolating runtime) that blocks mid-way until a `go`
file exists beside its counter: for killing its runner while it computes. It logs its start
(`blocking:<pid>`) and whether it holds its stage's lock itself (`lock:<yes|no>`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from profuser.store import atomic_write_text

VERSION = "1"
LOADS_MODEL = True


def run(ctx) -> dict:
    counter = Path(ctx.config["counter"])
    lock = f"{ctx.stage.kind}-{ctx.out.name.removesuffix('.partial')}.lock"
    mine = any(os.readlink(fd).endswith(lock) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink())
    with open(counter, "a") as fh:
        fh.write(f"{ctx.stage.id}:{os.getpid()} lock:{'yes' if mine else 'no'}\n")
    atomic_write_text(ctx.out / "part0.txt", "first half")
    while not counter.with_name("go").exists():
        time.sleep(0.05)
    atomic_write_text(ctx.out / "result.txt", "done")
    return {}
