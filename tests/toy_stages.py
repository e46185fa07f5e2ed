"""A resumable toy stage for the runner tests: writes `chunks` files one at a time (each
atomically, `sleep` seconds apart), skipping those an earlier killed attempt already wrote, and
logs every start into the `counter` file named by its config."""

from __future__ import annotations

import os
import time
from pathlib import Path

from profuser.store import atomic_write_text

VERSION = "1"


def run(ctx) -> dict:
    cfg = ctx.config
    rank = os.environ.get("RANK", "0")
    with open(cfg["counter"], "a") as fh:
        fh.write(f"{ctx.stage.id}\n" if rank == "0" else f"{ctx.stage.id}@{rank}\n")
    upstream = "".join((path / "result.txt").read_text() for _, path in sorted(ctx.inputs.items()))
    resumed = 0
    for i in range(cfg.get("chunks", 1)):
        chunk = ctx.out / f"chunk{i}.txt"
        if chunk.exists():
            resumed += 1
            continue
        time.sleep(cfg.get("sleep", 0))
        atomic_write_text(chunk, f"{cfg.get('value', '')}{i}")
    atomic_write_text(ctx.out / "result.txt", upstream + str(cfg.get("value", "")))
    return {"resumed_chunks": resumed}


def starts(counter: Path) -> list[str]:
    return counter.read_text().split() if counter.exists() else []
