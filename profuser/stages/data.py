"""The ``data`` stage: read the recipe's dataset source, drop or reject bad rows, dedup, sample,
split off the held-out set, and write ``train.parquet``, ``heldout.parquet`` and ``stats.json``."""

from __future__ import annotations

from collections import Counter

from pydantic import Field

from ..chat import conversation_history
from ..components import BadRow, Record
from ..data import SOURCE_SPLIT, dedup, sample, split, split_marked, unique_ids, write_records
from ..errors import DataError
from ..recipe import DataSpec
from ..store import atomic_write_json
from . import StageConfig

VERSION = "1"
SHOW_BAD_ROWS = 10  # how many bad rows a failing run lists


class Config(StageConfig):
    data: DataSpec
    files: dict[str, str] = Field(default_factory=dict)  # content hashes of a local data file or folder: editing it in place re-runs


def run(ctx) -> dict:
    cfg = ctx.config.data
    source = ctx.build("datasets", cfg.source)
    source.data_seed = cfg.seed  # sources that draw among alternatives (orca_best samples) use it
    records: list[Record] = []
    bad: list[BadRow] = []
    from tqdm.auto import tqdm

    # on stderr, and only on a terminal (disable=None): stdout and every --json stay clean
    for item in tqdm(source.records(), unit="row", desc=ctx.stage.id, disable=(not ctx.runtime.progress) or None,
                     mininterval=1.0):
        (bad if isinstance(item, BadRow) else records).append(item)
    rows_read = len(records) + len(bad)
    if ctx.config.files:  # the key holds the content the plan hashed: what was read must be that
        now = source.fingerprint()
        changed = sorted(n for n in set(now) | set(ctx.config.files) if now.get(n) != ctx.config.files.get(n))
        if changed:
            raise DataError(f"changed while the data stage read it: {', '.join(changed[:5])}"
                            + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
                            + "; nothing is kept (rerun to read the new content)", where=f"data source {cfg.source.name}")
    if bad and cfg.on_bad_row == "fail":
        shown = "\n".join(f"  {b.where}: {b.message}" for b in bad[:SHOW_BAD_ROWS])
        more = f"\n  ... and {len(bad) - SHOW_BAD_ROWS} more" if len(bad) > SHOW_BAD_ROWS else ""
        raise DataError(f"{len(bad)} of {rows_read} rows are unusable (set data.on_bad_row: skip to skip "
                        f"and count them):\n{shown}{more}", where=f"data source {cfg.source.name}")
    duplicates = 0
    if cfg.dedup:
        records, duplicates = dedup(records)
    records, renamed = unique_ids(records)
    if not records:
        raise DataError(f"no usable records ({rows_read} rows read, {len(bad)} bad, {duplicates} duplicates)",
                        where=f"data source {cfg.source.name}")
    if cfg.turns == "last":  # earlier assistant turns stay context: no stage labels them
        for record in records:
            for turn in conversation_history(record.meta):
                if turn["role"] == "assistant":
                    turn["train"] = False
    if cfg.heldout == SOURCE_SPLIT:  # the source's own split; data.sample draws from its training side
        train, heldout = split_marked(records)
        train = sample(train, cfg.sample, cfg.seed)
        kept = train + heldout
    else:
        kept = sample(records, cfg.sample, cfg.seed)
        train, heldout = split(kept, cfg.heldout, cfg.seed)

    write_records(ctx.out / "train.parquet", train)
    write_records(ctx.out / "heldout.parquet", heldout)
    metrics = {
        "rows_read": rows_read,
        "bad_rows_skipped": len(bad),
        "duplicates_removed": duplicates,
        "ids_renamed": renamed,
        "records": len(records),
        "train": len(train),
        "heldout": len(heldout),
    }
    stats = {
        **metrics,
        "source": cfg.source.model_dump(),
        "bad_rows": [{"where": b.where, "message": b.message} for b in bad[:100]],
        "tasks": {name: dict(Counter(r.meta.get("task") for r in part if "task" in r.meta))
                  for name, part in (("train", train), ("heldout", heldout))},
        "system_messages": len({r.system for r in kept}),
    }
    histories = [conversation_history(r.meta) for r in kept]
    if any(histories):  # single-turn data: stats.json as before
        stats["conversations"] = {
            "multi_turn": sum(bool(h) for h in histories),
            "turns": sum(len(h) + 2 for h in histories),  # history + the instruction + the response
            "assistant_turns": sum(1 + sum(t["role"] == "assistant" for t in h) for h in histories),
            "labelled_assistant_turns": sum(1 + sum(t["role"] == "assistant" and t.get("train", True) is not False
                                                    for t in h) for h in histories),
        }
    atomic_write_json(ctx.out / "stats.json", stats)
    return metrics
