"""What does ``train.packing`` save? Padding share and tokens per second, padded vs packed, on the
Orca sample's lengths.

    .venv/bin/python benchmarks/packing.py --json                      # a tiny random Llama (profuser.testing)
    .venv/bin/python benchmarks/packing.py --json --model builtin:smollm2-135m-instruct --timed 16

The examples have the prompt and response lengths (in SmolLM2's tokens, ChatML) of the 284 rows of
``../shared/data/instruct/orca-sample.jsonl``, kept in ``benchmarks/orca_lengths.json`` so that the
benchmark runs anywhere (``--lengths-from-orca FILE`` rewrites it), with random tokens and a random
top-k teacher at every response token, written as the build stage writes ``examples.arrow``. A
seeded order cuts them into micro-batches of ``--micro`` examples. The share of padding positions
is counted over all of them (``layout``); the first ``--timed`` examples' micro-batches run the
trainer's step (``ExampleSet.collate``, forward, ``fuse_kl``, backward; no optimizer step, so every
micro-batch sees the same weights) padded and packed, one after the other, so machine noise hits
both alike, each first in every other one. Reported: tokens (examples' own) per second of wall
time and of the process's CPU time (which other processes on a shared machine disturb less), their
ratios (``speedup``, ``cpu_speedup``), and the largest
difference of a micro-batch's loss and of its parameter gradient between the two (the same
computation up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from pyarrow import ipc

REPO = Path(__file__).resolve().parents[1]
LENGTHS = REPO / "benchmarks" / "orca_lengths.json"
ORCA = REPO.parent / "shared" / "data" / "instruct" / "orca-sample.jsonl"
TOKENIZER = "builtin:smollm2-135m-instruct"


def orca_lengths(path: Path) -> dict:
    """Prompt and response lengths of each row of an OpenOrca-style JSONL file in SmolLM2's tokens."""
    from profuser.models import load_tokenizer
    from profuser.plugins import Engine
    from profuser.recipe import ModelSpec

    tok = load_tokenizer(ModelSpec(ref=TOKENIZER), engine=Engine())

    def count(messages, **kw) -> int:
        return len(tok(tok.apply_chat_template(messages, tokenize=False, **kw), add_special_tokens=False)["input_ids"])

    prompt, response = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        messages = [{"role": "system", "content": row["system_prompt"]}] if row.get("system_prompt") else []
        messages.append({"role": "user", "content": row["question"]})
        p = count(messages, add_generation_prompt=True)
        prompt.append(p)
        response.append(count([*messages, {"role": "assistant", "content": row["response"]}]) - p)
    return {"source": f"{path.name} ({len(prompt)} rows of Intel/orca_dpo_pairs: system_prompt, question, response)",
            "tokenizer": "SmolLM2-135M-Instruct's, with its ChatML chat template", "prompt": prompt, "response": response}


def write_examples(path: Path, prompt: list[int], response: list[int], vocab: int, k: int, seed: int) -> Path:
    """examples.arrow as the build stage writes it: one record batch per example, teacher rows at
    the labelled positions only."""
    from profuser.training.data import SCHEMA

    rng = np.random.default_rng(seed)
    schema = pa.schema([*SCHEMA, ("mode", pa.string())])
    with ipc.new_file(str(path), schema) as writer:
        for i, (p, r) in enumerate(zip(prompt, response)):
            ids = rng.integers(0, vocab, p + r)
            teacher = np.concatenate([ids[p:, None], rng.integers(0, vocab, (r, k - 1))], 1)  # the label ranked first
            logits = np.sort(rng.normal(size=(r, k)).astype(np.float32), 1)[:, ::-1] + np.eye(1, k, 0, np.float32) * 3
            row = {"id": f"orca{i}", "input_ids": ids.tolist(), "labels": [-100] * p + ids[p:].tolist(),
                   "teacher_ids": teacher.tolist(), "teacher_logits": logits.tolist(), "teacher_mask": [True] * r,
                   "gt_length": r, "mode": "training"}
            writer.write_batch(pa.RecordBatch.from_pylist([row], schema=schema))
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (a random Llama of profuser.testing) or a model ref")
    ap.add_argument("--micro", type=int, default=8, help="examples per micro-batch (train.micro_batch_size)")
    ap.add_argument("--max-length", type=int, default=2048, help="train.max_length")
    ap.add_argument("--timed", type=int, default=48, help="time the micro-batches of the first N examples (0: all)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP spin-waits on a loaded machine)")
    ap.add_argument("--lengths-from-orca", type=Path, default=None, metavar="FILE",
                    help=f"recompute {LENGTHS.name} from an OpenOrca-style JSONL file (e.g. {ORCA})")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.lengths_from_orca is not None:
        LENGTHS.write_text(json.dumps(orca_lengths(args.lengths_from_orca)) + "\n", encoding="utf-8")
    lengths = json.loads(LENGTHS.read_text(encoding="utf-8"))

    from transformers import AutoModelForCausalLM

    from profuser.plugins import Engine
    from profuser.testing import tiny_model_dir
    from profuser.training.data import ExampleSet

    engine = Engine(entrypoints=False)
    loss = engine.registry.build("losses", "fuse_kl", {})
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", Path(tmp)), attn_implementation=args.attn)
        else:
            from profuser.models import load_model
            from profuser.recipe import ModelSpec

            model, _ = load_model(ModelSpec(ref=args.model, attn_implementation=args.attn), engine=engine)
        model = model.float().train()
        model.config.use_cache = False
        vocab = model.get_output_embeddings().weight.shape[0]
        path = write_examples(Path(tmp) / "examples.arrow", lengths["prompt"], lengths["response"], vocab, 10, seed=0)
        data = ExampleSet.load({"training": path}, args.max_length)
        order = np.random.default_rng(0).permutation(len(data))
        batches = [order[i:i + args.micro] for i in range(0, len(order), args.micro)]
        layout = {"padded": [0, 0], "packed": [0, 0]}  # [tokens, positions] over every micro-batch
        for rows in batches:
            for name, counts in layout.items():
                batch = data.collate(rows, np.ones(len(rows), np.float32), pad_id=0, packed=name == "packed")
                counts[0] += int(batch["attention_mask"].sum())
                counts[1] += batch["input_ids"].numel()
        order = order[: args.timed or None]
        batches = [order[i:i + args.micro] for i in range(0, len(order), args.micro)]
        stats = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "tokens": 0, "positions": 0} for name in ("padded", "packed")}
        worst_loss = worst_grad = 0.0
        losses = {"padded": [], "packed": []}
        for j, rows in enumerate(batches):
            grads = {}
            for name in ("padded", "packed") if j % 2 == 0 else ("packed", "padded"):  # neither always first
                model.zero_grad(set_to_none=True)
                t0, c0 = time.perf_counter(), time.process_time()
                batch = data.collate(rows, np.ones(len(rows), np.float32), pad_id=0, packed=name == "packed")
                if name == "packed":
                    batch["weight"] = batch["weight"][batch["example"].clamp_min(0)] * (batch["example"] >= 0)
                    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
                else:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                value, _ = loss(logits, batch)
                value.backward()
                stats[name]["seconds"] += time.perf_counter() - t0
                stats[name]["cpu_seconds"] += time.process_time() - c0
                stats[name]["tokens"] += int(batch["attention_mask"].sum())
                stats[name]["positions"] += batch["input_ids"].numel()
                losses[name].append(value.item())
                grads[name] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
                del logits, value
            worst_loss = max(worst_loss, abs(losses["padded"][-1] - losses["packed"][-1]))
            worst_grad = max(worst_grad, (grads["padded"] - grads["packed"]).abs().max().item())
    out = {"model": args.model, "attn": args.attn, "micro_batch_size": args.micro, "max_length": args.max_length,
           "threads": args.threads, "lengths": str(LENGTHS.relative_to(REPO)),
           "layout": {"examples": len(data), "tokens": layout["padded"][0],
                      **{f"{name}_padding_share": round(1 - t / p, 4) for name, (t, p) in layout.items()}},
           "timed_examples": len(order), "timed_micro_batches": len(batches)}
    for name, s in stats.items():
        out[name] = {"padding_share": round(1 - s["tokens"] / s["positions"], 4), "positions": s["positions"],
                     "tokens": s["tokens"], "seconds": round(s["seconds"], 3), "cpu_seconds": round(s["cpu_seconds"], 3),
                     "tokens_per_s": round(s["tokens"] / s["seconds"], 1),
                     "tokens_per_cpu_s": round(s["tokens"] / s["cpu_seconds"], 1),
                     "mean_loss": float(np.mean(losses[name]))}
    out["speedup"] = round(out["packed"]["tokens_per_s"] / out["padded"]["tokens_per_s"], 3)  # wall time
    out["cpu_speedup"] = round(out["packed"]["tokens_per_cpu_s"] / out["padded"]["tokens_per_cpu_s"], 3)
    out["max_loss_difference"] = worst_loss
    out["max_gradient_difference"] = worst_grad
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name in ("padded", "packed"):
            s = out[name]
            print(f"{name:7s} padding {out['layout'][name + '_padding_share']:.1%} (all), {s['padding_share']:.1%} (timed)  "
                  f"{s['tokens_per_s']:9.1f} tokens/s  loss {s['mean_loss']:.6f}")
        print(f"speed-up {out['speedup']:.2f}x (wall), {out['cpu_speedup']:.2f}x (CPU time); largest loss difference "
              f"{worst_loss:.2e}, gradient {worst_grad:.2e}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
