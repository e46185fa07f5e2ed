"""Train outside the pipeline, e.g. on several processes (docs/training.md):

    accelerate launch --multi_gpu --num_processes 2 -m profuser.training \\
        --model runs/.../tiny-llama --examples training=runs/store/build/KEY/examples.arrow \\
        --curriculum training_only -t batch_size=8 -t micro_batch_size=2 --out runs/train-ddp

``-t key=value`` sets a ``train:`` field (value parsed as YAML); ``--log-batches`` makes every rank
append the ids of each step's examples to ``OUT/batches/rank-R.jsonl`` (a resumed step appears again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from ..errors import ProfuserError
from ..plugins import Engine
from ..recipe import TrainSpec
from .trainer import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profuser.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model reference, or a ModelSpec as JSON")
    parser.add_argument("--examples", action="append", required=True, metavar="MODE=PATH", help="examples.arrow (or .parquet) of a mode")
    parser.add_argument("--loss", default="fuse_kl")
    parser.add_argument("--loss-params", default="{}", help="JSON")
    parser.add_argument("--curriculum", default="progressive")
    parser.add_argument("--curriculum-params", default="{}", help="JSON")
    parser.add_argument("-t", "--train", action="append", default=[], metavar="KEY=VALUE", help="a train: field")
    parser.add_argument("--target-reward", type=Path, help="JSON file: example id -> the target's reward")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--log-batches", action="store_true")
    args = parser.parse_args(argv)

    try:
        registry = Engine().registry  # this entry point is an edge: its one engine, built here
        model = json.loads(args.model) if args.model.lstrip().startswith("{") else args.model
        examples = dict(item.split("=", 1) for item in args.examples)
        train_fields = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.train)}
        if train_fields.get("distributed") == "deepspeed":  # its JIT build would wait forever on a killed build's lock
            from ..workers import check_extension_locks

            check_extension_locks()
        loss = registry.build("losses", args.loss, json.loads(args.loss_params))
        curriculum = registry.build("curricula", args.curriculum, json.loads(args.curriculum_params))
        target_reward = json.loads(args.target_reward.read_text()) if args.target_reward else None
        on_batch = _batch_logger(args.out) if args.log_batches else None
        summary = train(model, examples, loss, curriculum, TrainSpec(**train_fields), args.out,
                        target_reward=target_reward, on_batch=on_batch, device=args.device, progress=True)
    except ProfuserError as exc:
        print("\n".join(exc.lines()), file=sys.stderr)
        return exc.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def _batch_logger(out: Path):
    rank = int(os.environ.get("RANK", "0"))
    path = out / "batches" / f"rank-{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(step: int, ids: list[str]) -> None:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "ids": ids}) + "\n")

    return log


if __name__ == "__main__":
    sys.exit(main())
