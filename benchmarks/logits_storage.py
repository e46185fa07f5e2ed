"""How big is the logits store, and how fast does it read? Prints JSON.

    .venv/bin/python benchmarks/logits_storage.py                      # tiny random llama, seconds
    .venv/bin/python benchmarks/logits_storage.py --model builtin:smollm2-135m-instruct --examples 64

Runs the real ``logits/training`` stage (top-k = 10, zstd shards) on the first ``--examples`` GT
responses of the shared Orca sample, then rewrites the same examples uncompressed and with lz4
to compare. Per variant: bytes per token on disk (shards only; ``nll.parquet`` and ``store.json``
are per example) and read throughput: a full scan (``for ex in reader``) and random ``get(id)``
in shuffled order, each touching every array so that nothing is left undecoded. Timings are
medians of ``--repeats`` runs; the compute throughput of the stage (tokens/s) depends on the
machine and is reported as measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/instruct/orca-sample.jsonl")


def records(path: Path, n: int, max_prompt_chars: int):
    """The first n records whose prompt fits (the tiny tokenizer's 500-token vocabulary needs
    ~3x the tokens of a real one, and its context is 512)."""
    from profuser.components import Record
    from profuser.data import RowFormatParams, read_rows, rows_to_records

    rows = rows_to_records(read_rows(path), RowFormatParams())
    fits = (r for r in rows if isinstance(r, Record) and len(r.system) + len(r.instruction) <= max_prompt_chars)
    return list(itertools.islice(fits, n))


def run_stage(model_ref: str, recs, root: Path, *, top_k: int, max_length: int, batch_size: int, device: str) -> tuple[Path, dict]:
    from profuser.data import write_records
    from profuser.pipeline import Runtime, Stage, StageContext
    from profuser.plugins import Engine
    from profuser.recipe import DistillSpec, ModelSpec
    from profuser.stages import logits

    data, out = root / "data", root / "store-zstd"
    data.mkdir()
    out.mkdir()
    write_records(data / "train.parquet", recs)
    config = logits.Config(mode="training", model=ModelSpec(ref=model_ref).identity(), source="bench",
                           distill=DistillSpec(top_k=top_k, batch_size=batch_size, max_length=max_length))
    ctx = StageContext(stage=Stage("logits/training/bench", "logits", config, {logits.DATA: "data"}), inputs={logits.DATA: data},
                       out=out, runtime=Runtime(progress=False, device=device), engine=Engine())
    return out, logits.run(ctx)


def rewrite(src: Path, dst: Path, compression: str | None) -> None:
    from profuser.logits_store import LogitsReader, LogitsWriter

    reader = LogitsReader(src)
    with LogitsWriter(dst, reader.top_k, model="bench", compression=compression) as writer:
        for ex in reader:
            writer.add(ex.id, ex.response, ex.token_ids, ex.offsets, ex.nll, ex.topk_ids,
                       ex.topk_logits.astype(np.float32), ex.logz)


def touch(ex) -> float:
    """Read every array of an example (forces any lazy decoding; the sum keeps it from being skipped)."""
    return float(ex.nll.sum() + ex.logz.sum() + ex.topk_logits[:, 0].astype(np.float32).sum()
                 + ex.topk_ids[:, -1].sum() + ex.token_ids.sum() + ex.offsets[:, 1].sum())


def read_speed(path: Path, repeats: int) -> dict:
    from profuser.logits_store import LogitsReader

    def scan():
        return sum(touch(ex) for ex in LogitsReader(path))

    def random_get():
        reader = LogitsReader(path)
        ids = list(reader.ids)
        random.Random(0).shuffle(ids)
        return sum(touch(reader.get(i)) for i in ids)

    tokens = sum(n.n_tokens for n in LogitsReader(path).nll_table().values())
    timings = {}
    for name, fn in (("scan", scan), ("random_get", random_get)):
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
        timings[name] = statistics.median(seconds)
    shard_bytes = sum(p.stat().st_size for p in path.glob("shard-*.arrow"))
    return {
        "bytes_per_token": shard_bytes / tokens,
        "scan_tokens_per_s": tokens / timings["scan"],
        "scan_mb_per_s_on_disk": shard_bytes / timings["scan"] / 1e6,
        "random_get_tokens_per_s": tokens / timings["random_get"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="a model ref, or 'tiny' (random tiny llama, built here)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--max-prompt-chars", type=int, default=600)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_ref = args.model
        if model_ref == "tiny":
            from profuser.testing import tiny_model_dir

            model_ref = str(tiny_model_dir("llama", root / "models"))
        recs = records(args.data, args.examples, args.max_prompt_chars)
        store, metrics = run_stage(model_ref, recs, root, top_k=args.top_k, max_length=args.max_length,
                                   batch_size=args.batch_size, device=args.device)
        variants = {"zstd": store}
        for name, compression in (("none", None), ("lz4", "lz4_frame")):
            variants[name] = root / f"store-{name}"
            rewrite(store, variants[name], compression)
        result = {
            "model": args.model, "device": args.device, "top_k": args.top_k, "examples": metrics["examples"],
            "tokens": metrics["tokens"], "tokens_per_example": metrics["tokens"] / max(metrics["examples"], 1),
            "stage": {k: metrics[k] for k in ("seconds", "load_seconds", "tokens_per_s", "bytes_per_token")},
            "raw_bytes_per_token": 4 * (2 + 1 + 1 + 1) + args.top_k * (4 + 2),  # offsets, token id, nll, logz, ids, logits
            "store": {name: read_speed(path, args.repeats) for name, path in variants.items()},
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
