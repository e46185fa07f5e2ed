"""Memory and time of the stages after the models, as the number of examples grows (issue 11).

For each size N it writes, with the real writers, what the model stages would have left: N
records (``data``), two sources' generations and two reward models' scores, each source's
teacher-forced logits store of the GT (``logits/training``) and of its own chosen responses
(``logits/inference``), all with random top-k logits over ~``--tokens`` response tokens, each
chunk of prompts stored longest first as the logits stage stores them. Then it
runs the real ``select`` (both modes), ``align`` (both modes x both sources) and ``build`` (both
modes) stages and one pass of the trainer's data path (one seeded epoch over every example of both
modes, collated into micro-batches as the trainer does, no model).

Every measured step runs in a fresh subprocess that reports its own peak RSS
(``resource.getrusage``); a size's ``peak_rss_gb`` is the largest of its steps, its ``seconds``
the sum of their run times (without interpreter start and imports). Target and sources are the
tiny tokenizers of ``profuser.testing`` (target = the tiny Llama, byte-level BPE, ChatML; sources
= itself and the tiny Gemma, SentencePiece-style), so it runs offline.

    .venv/bin/python benchmarks/scale.py --json                 # 10k and 100k examples
    .venv/bin/python benchmarks/scale.py --sizes 2000 --json    # a quick look

Everything it writes lives under one temporary directory (``--dir`` to choose where), removed at
the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCES = ("llama", "gemma")  # the target itself and a model of another tokenizer family
REWARD_MODELS = ("rm1", "rm2")
MODES = ("inference", "training")
POOL = 256  # distinct prompts / responses, reused across examples (their ids differ)


# --- the measured steps (each in its own process) ------------------------------------------------


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _specs(root: Path) -> dict:
    from profuser.recipe import ModelSpec

    cfg = json.loads((root / "config.json").read_text())
    return {s: ModelSpec(ref=cfg["models"][s]).identity() for s in SOURCES}


def _context(root: Path, stage_id: str, kind: str, config: dict, inputs: dict):
    import importlib

    from profuser.pipeline import Runtime, Stage, StageContext
    from profuser.plugins import Engine

    out = root / "store" / stage_id
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    typed = importlib.import_module(f"profuser.stages.{kind}").Config.model_validate(config)  # what plan() would build
    return StageContext(stage=Stage(stage_id, kind, typed, {}), inputs={k: root / "store" / v for k, v in inputs.items()},
                        out=out, runtime=Runtime(progress=False, device="cpu", cache_dir=root.parent / "cache"),
                        engine=Engine(entrypoints=False))


def _stage(root: Path, step: str) -> dict:
    """Run one stage (``select-inference``, ``align-training-gemma``, ``build-inference``, ...)."""
    from profuser.stages import align, build, select

    cfg = json.loads((root / "config.json").read_text())
    specs = _specs(root)
    kind, mode, *rest = step.split("-")
    if kind == "select":
        if mode == "inference":
            config = {"mode": mode, "evaluator": {"name": "rm_vote", "params": {}}, "sources": list(SOURCES),
                      "reward_models": list(REWARD_MODELS)}
            inputs = {"data": "data", **{f"generate/{s}": f"generate/{s}" for s in SOURCES},
                      **{f"score/{r}": f"score/{r}" for r in REWARD_MODELS}}
        else:
            config = {"mode": mode, "evaluator": {"name": "min_ce", "params": {}}, "sources": list(SOURCES), "reward_models": []}
            inputs = {"data": "data", **{f"logits/{s}": f"logits/training/{s}" for s in SOURCES}}
        ctx = _context(root, f"select/{mode}", "select", config, inputs)
        return select.run(ctx)
    if kind == "align":
        source = rest[0]
        config = {"mode": mode, "aligner": {"name": "offsets", "params": {}}, "target": specs["llama"],
                  "source": specs[source], "source_key": source, "max_length": cfg["max_length"]}
        ctx = _context(root, f"align/{mode}/{source}", "align", config,
                       {"logits": f"logits/{mode}/{source}", "select": f"select/{mode}", "data": "data"})
        return align.run(ctx)
    if kind == "build":
        config = {"mode": mode, "target": specs["llama"], "max_length": cfg["max_length"], "sources": list(SOURCES)}
        ctx = _context(root, f"build/{mode}", "build", config,
                       {"data": "data", "select": f"select/{mode}", **{f"align/{s}": f"align/{mode}/{s}" for s in SOURCES}})
        return build.run(ctx)
    raise SystemExit(f"unknown step {step!r}")


def _examples_file(build_dir: Path) -> Path:
    return next(p for p in (build_dir / "examples.arrow", build_dir / "examples.parquet") if p.exists())


def _collate(root: Path) -> dict:
    """One epoch over every built example of both modes, as the trainer's data path runs it on one
    process: the seeded order, global batches split into micro-batches, ``collate``."""
    from profuser.components import Phase, PhasePart
    from profuser.training.data import IGNORE, ExampleSet, plan_phases

    cfg = json.loads((root / "config.json").read_text())
    data = ExampleSet.load({m: _examples_file(root / "store" / "build" / m) for m in MODES}, cfg["max_length"])
    data.curriculum_input()  # what the trainer asks the curriculum with
    global_batch, micro = 16, 4
    [plan] = plan_phases([Phase("all", 1.0, [PhasePart(m, 1.0) for m in MODES])], data, global_batch)
    rows, weights = plan.order(seed=0, global_batch=global_batch)
    labelled = tokens = 0
    for a in range(0, len(rows), micro):
        batch = data.collate(rows[a:a + micro], weights[a:a + micro], pad_id=0)
        labelled += int((batch["labels"][:, 1:] != IGNORE).sum())
        tokens += int(batch["attention_mask"].sum())
    return {"examples": len(rows), "steps": plan.steps, "labelled_tokens": labelled, "tokens": tokens}


def child(step: str, root: Path) -> None:
    # imports are not part of a step's time (an in-process pipeline pays them once)
    import transformers  # noqa: F401

    import profuser.pipeline
    import profuser.plugins
    import profuser.stages.align
    import profuser.stages.build
    import profuser.stages.select
    import profuser.training.data  # noqa: F401

    t0 = time.perf_counter()
    if step == "setup-models":
        metrics = _setup_models(root)
    elif step == "setup-data":
        metrics = _setup_data(root)
    elif step == "setup-inference-logits":
        metrics = _setup_inference_logits(root)
    elif step == "collate":
        metrics = _collate(root)
    else:
        metrics = _stage(root, step)
    seconds = time.perf_counter() - t0
    print(json.dumps({"step": step, "seconds": seconds, "peak_rss_gb": _peak_rss_gb(), "metrics": metrics}, default=str))


# --- synthetic inputs (written with the real writers) --------------------------------------------


def _setup_models(base: Path) -> dict:
    from profuser.testing import tiny_model_dir

    return {s: str(tiny_model_dir(s, base / "models")) for s in SOURCES}


def _texts(tokenizer, rng, tokens: int, count: int) -> list[str]:
    """``count`` texts of about ``tokens`` target tokens, random lines of the tiny models' corpus."""
    from profuser.testing import CORPUS

    per_line = sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) for line in CORPUS) / len(CORPUS)
    lines = max(1, round(tokens / per_line))
    return [" ".join(CORPUS[j] for j in rng.integers(0, len(CORPUS), lines)) for _ in range(count)]


def _pool(root: Path) -> dict:
    """The distinct texts: prompts, GT responses and each source's generations."""
    import numpy as np

    from profuser.models import load_tokenizer

    cfg = json.loads((root / "config.json").read_text())
    rng = np.random.default_rng(0)
    target = load_tokenizer(_specs(root)["llama"])
    systems = ["", "You are a helpful assistant.", "Answer briefly and honestly."]
    return {
        "system": [systems[i % len(systems)] for i in range(POOL)],
        "instruction": _texts(target, rng, 24, POOL),
        "response": _texts(target, rng, cfg["tokens"], POOL),
        **{f"generated/{s}": _texts(target, rng, cfg["tokens"], POOL) for s in SOURCES},
    }


def _write_store(out: Path, spec: dict, chunks, top_k: int, seed: int) -> dict:
    """A logits store of ``chunks`` (lists of (id, system, instruction, response) of one chunk of
    data records; few distinct texts) with random top-k logits: the realised token ranked first,
    k - 1 other distinct ids. Each chunk is stored longest first, as the logits stage does (its
    ``PROMPT_CHUNK``), so that align reads these stores as it reads real ones."""
    import numpy as np

    from profuser.chat import encode_chat
    from profuser.logits_store import LogitsWriter
    from profuser.models import load_tokenizer

    tokenizer = load_tokenizer(spec)
    vocab = len(tokenizer)
    rng = np.random.default_rng(seed)
    encoded: dict[tuple, tuple] = {}

    def encode(system, instruction, response) -> tuple:
        key = (system, instruction, response)
        if key not in encoded:
            enc = encode_chat(tokenizer, system, instruction, response, max_length=1 << 20)
            encoded[key] = (len(enc.input_ids), np.asarray(enc.input_ids[enc.response_start:], np.int32),
                            np.asarray(enc.response_offsets, np.int32))
        return encoded[key]

    with LogitsWriter(out, top_k, model=spec["ref"]) as writer:
        for chunk in chunks:
            chunk = sorted(chunk, key=lambda item: -encode(*item[1:])[0])  # stable, as the stage's sort
            for example_id, system, instruction, response in chunk:
                _, token_ids, offsets = encode(system, instruction, response)
                n = len(token_ids)
                topk = np.empty((n, top_k), np.int32)
                topk[:, 0] = token_ids
                shift = rng.integers(1, vocab - top_k + 1, n)
                topk[:, 1:] = (token_ids[:, None] + shift[:, None] + np.arange(top_k - 1)) % vocab
                logits = -np.sort(-rng.normal(size=(n, top_k)), axis=1).astype(np.float16)
                logz = logits[:, 0].astype(np.float32) + np.float32(1.0) + rng.random(n, dtype=np.float32)
                nll = logz - logits[:, 0].astype(np.float32)
                writer.add(example_id, response, token_ids, offsets, nll, topk, logits, logz)
    return writer.close()


def _setup_data(root: Path) -> dict:
    """data, generations, scores and the training-mode logits stores."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from profuser.artifacts import iter_chunks
    from profuser.components import Record
    from profuser.data import write_records
    from profuser.stages.logits import PROMPT_CHUNK

    cfg = json.loads((root / "config.json").read_text())
    n, store = cfg["examples"], root / "store"
    pool = _pool(root)
    rng = np.random.default_rng(1)
    picks = rng.integers(0, POOL, (n, 2))  # (prompt, response) of each example
    ids = [f"ex{i:07d}" for i in range(n)]
    (store / "data").mkdir(parents=True)
    write_records(store / "data" / "train.parquet", [
        Record(i, pool["system"][p], pool["instruction"][p], pool["response"][r]) for i, (p, r) in zip(ids, picks)])
    for s in SOURCES:
        (store / "generate" / s).mkdir(parents=True)
        pq.write_table(pa.table({"id": ids, "response": [pool[f"generated/{s}"][r] for _, r in picks]}),
                       store / "generate" / s / "generations.parquet")
    for r in REWARD_MODELS:
        (store / "score" / r).mkdir(parents=True)
        pq.write_table(pa.table({"id": [i for i in ids for _ in SOURCES], "source": list(SOURCES) * n,
                                 "score": rng.normal(size=n * len(SOURCES))}), store / "score" / r / "scores.parquet")
    specs = _specs(root)
    stores = {}
    for k, s in enumerate(SOURCES):
        items = ((i, pool["system"][p], pool["instruction"][p], pool["response"][r]) for i, (p, r) in zip(ids, picks))
        stores[s] = _write_store(store / "logits" / "training" / s, specs[s], iter_chunks(items, PROMPT_CHUNK),
                                 cfg["top_k"], seed=10 + k)
    return {"training_stores": stores}


def _setup_inference_logits(root: Path) -> dict:
    """Each source's store of the responses it won in ``select/inference``."""
    import pyarrow.parquet as pq

    from profuser.artifacts import iter_chunks
    from profuser.data import read_records
    from profuser.stages.logits import PROMPT_CHUNK

    cfg = json.loads((root / "config.json").read_text())
    store = root / "store"
    chosen = pq.read_table(store / "select" / "inference" / "selection.parquet", columns=["id", "chosen"])
    won = dict(zip(chosen["id"].to_pylist(), chosen["chosen"].to_pylist()))
    records = read_records(store / "data" / "train.parquet")
    specs = _specs(root)
    stores = {}
    for k, s in enumerate(SOURCES):
        generated = pq.read_table(store / "generate" / s / "generations.parquet")
        responses = dict(zip(generated["id"].to_pylist(), generated["response"].to_pylist()))
        chunks = ([(r.id, r.system, r.instruction, responses[r.id]) for r in chunk if won.get(r.id) == s]
                  for chunk in iter_chunks(records, PROMPT_CHUNK))  # chunks of data records, as the stage's
        stores[s] = _write_store(store / "logits" / "inference" / s, specs[s], chunks, cfg["top_k"], seed=20 + k)
    return {"inference_stores": stores}


# --- the driver ----------------------------------------------------------------------------------


SETUP = ("setup-data", "select-inference", "setup-inference-logits")
MEASURED = ("select-inference", "select-training",
            *(f"align-{m}-{s}" for m in MODES for s in SOURCES), *(f"build-{m}" for m in MODES), "collate")


def run_step(step: str, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", step, str(root)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1"})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"step {step} failed in {root}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def du_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def measure(base: Path, n: int, args, models: dict, log) -> dict:
    root = base / f"n{n}"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"examples": n, "tokens": args.tokens, "top_k": args.top_k,
                                                  "max_length": args.max_length, "models": models}))
    steps: dict[str, dict] = {}
    setup_seconds = 0.0
    for step in SETUP:  # select/inference runs here (the inference stores depend on it) and again below
        result = run_step(step, root)
        setup_seconds += result["seconds"]
        log(f"  {n}: {step} {result['seconds']:.1f} s, {result['peak_rss_gb']:.2f} GB")
    for step in MEASURED:
        steps[step] = run_step(step, root)
        log(f"  {n}: {step} {steps[step]['seconds']:.1f} s, {steps[step]['peak_rss_gb']:.2f} GB")
    disk = {part: du_gb(root / "store" / part) for part in ("data", "logits", "select", "align", "build")}
    result = {
        "examples": n,
        "peak_rss_gb": max(s["peak_rss_gb"] for s in steps.values()),
        "seconds": sum(s["seconds"] for s in steps.values()),
        "disk_gb": du_gb(root),
        "disk_gb_by_stage": disk,
        "setup_seconds": setup_seconds,
        "steps": {k: {"seconds": round(v["seconds"], 2), "peak_rss_gb": round(v["peak_rss_gb"], 3)} for k, v in steps.items()},
        "response_tokens": {m: steps[f"build-{m}"]["metrics"]["response_tokens"] for m in MODES},
    }
    if not args.keep:
        shutil.rmtree(root)  # before the next size, so that disk holds one size at a time
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="numbers of examples")
    parser.add_argument("--tokens", type=int, default=256, help="response tokens per example (about)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=1024, help="train.max_length (align, build, collate)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep what it wrote")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return

    base = Path(tempfile.mkdtemp(prefix="profuser-scale-", dir=args.dir))
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    try:
        models = run_step("setup-models", base)["metrics"]
        results = {}
        for n in args.sizes:
            log(f"{n} examples under {base}")
            results[n] = measure(base, n, args, models, log)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    out = {"tokens": args.tokens, "top_k": args.top_k, "sources": len(SOURCES), "max_length": args.max_length}
    for n, r in results.items():
        tag = f"{n // 1000}k" if n % 1000 == 0 else str(n)
        out[f"peak_rss_gb_{tag}"] = round(r["peak_rss_gb"], 3)
        out[f"seconds_{tag}"] = round(r["seconds"], 1)
        out[f"disk_gb_{tag}"] = round(r["disk_gb"], 2)
        out[f"detail_{tag}"] = r
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            if not key.startswith("detail_"):
                print(f"{key}: {value}")
        for n, r in results.items():
            print(f"\n{n} examples, per step:")
            for step, s in r["steps"].items():
                print(f"  {step:28s} {s['seconds']:8.1f} s {s['peak_rss_gb']:7.3f} GB")


if __name__ == "__main__":
    main()
