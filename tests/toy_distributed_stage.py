"""The toy stage, declared to use every rank of a multi-process launch (like ``train``). Like a
process-group init, it waits for every rank before working."""

import os
import time

import toy_stages

VERSION = toy_stages.VERSION
DISTRIBUTED = True


def run(ctx) -> dict:
    rank, world = os.environ.get("RANK", "0"), int(os.environ.get("WORLD_SIZE", "1"))
    (ctx.out.parent / f"barrier-{rank}").touch()
    while len(list(ctx.out.parent.glob("barrier-*"))) < world:
        time.sleep(0.05)
    return toy_stages.run(ctx)
