"""A toy stage that says it loads a model, so that an isolating runtime runs it in a worker
process: logs its pid, forwards a metric, and can fail with a DataError or die mid-way."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from profuser import hookimpl
from profuser.errors import DataError
from profuser.store import atomic_write_text

VERSION = "1"
LOADS_MODEL = True


class MetricsSeen:
    """An observer plugin (module-level, so a worker's engine can rebuild it by pickling)."""

    def __init__(self):
        self.logged: list[tuple[str, int, dict]] = []

    @hookimpl
    def profuser_metrics_logged(self, stage_id, step, metrics):
        self.logged.append((stage_id, step, metrics))


def run(ctx) -> dict:
    cfg = ctx.config
    with open(cfg["counter"], "a") as fh:
        fh.write(f"{ctx.stage.id}:{os.getpid()}\n")
    if cfg.get("fail"):
        raise DataError("row 3 has no response", where="train.jsonl:3")
    resumed = (ctx.out / "part0.txt").exists()
    atomic_write_text(ctx.out / "part0.txt", "first half")
    die_once = Path(cfg["counter"]).with_suffix(".die")
    if die_once.exists():
        die_once.unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    ctx.log_metrics(1, {"loss": 0.5})
    upstream = "".join((path / "result.txt").read_text() for _, path in sorted(ctx.inputs.items()))
    atomic_write_text(ctx.out / "result.txt", upstream + cfg.get("value", ""))
    return {"resumed": resumed}


def pids(counter: Path) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for line in counter.read_text().split():
        if ":" not in line:  # another toy stage's line
            continue
        stage, pid = line.rsplit(":", 1)
        found.setdefault(stage, []).append(int(pid))
    return found
