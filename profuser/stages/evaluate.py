"""The ``evaluate/<label>`` stage: lm-eval scores of one model (the fused model or a baseline).

Config: ``model`` (a ModelSpec identity, or None for the fused model: input ``model`` is then the
train artifact, whose ``model/`` it loads), ``label``, ``evaluate`` (tasks, limit, num_fewshot,
data_dir, batch_size; max_gen_toks when the recipe schema has it). Input ``data`` gives
``heldout.parquet`` to the ``profuser_heldout`` task.

Writes ``results.json`` ({label, model, tasks: {task: {metric: value}}, primary: {task: value},
average, config: {task: {...}}}) and, for generation tasks, ``samples/<task>.jsonl`` (prompt,
target, output, extracted answer and score of every scored example). Metrics: the primary score of
each task and their average.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ArtifactError
from ..evaluation import evaluate_model
from ..models import load_model
from ..recipe import ModelSpec
from ..store import atomic_write_json

VERSION = "1"


def average(primary: dict[str, float | None]) -> float | None:
    values = [v for v in primary.values() if v is not None]
    return sum(values) / len(values) if values else None


def run(ctx) -> dict:
    cfg = ctx.config
    ev = cfg["evaluate"]
    if cfg.get("model") is None:
        if "model" not in ctx.inputs:
            raise ArtifactError("the fused model's evaluation needs the train artifact as input 'model'", where=ctx.stage.id)
        model_dir = Path(ctx.inputs["model"]) / "model"
        if not model_dir.is_dir():
            raise ArtifactError("the train artifact has no model/ folder", where=str(ctx.inputs["model"]))
        spec = ModelSpec(ref=str(model_dir), label=cfg["label"])
    else:
        spec = ModelSpec(**cfg["model"], label=cfg["label"])
    device = ctx.runtime.torch_device()
    model, tokenizer = load_model(spec, device=device, cache_dir=ctx.runtime.cache_dir)
    heldout = Path(ctx.inputs["data"]) / "heldout.parquet" if "data" in ctx.inputs else None

    out = evaluate_model(
        model, tokenizer, list(ev["tasks"]), limit=ev.get("limit"), num_fewshot=ev.get("num_fewshot") or {},
        data_dir=ev.get("data_dir"), heldout_path=heldout, batch_size=ev.get("batch_size", 8), device=device,
        max_gen_toks=ev.get("max_gen_toks"), log_samples=True,
    )
    primary = out["_primary"]
    tasks = {task: out[task] for task in ev["tasks"]}
    results = {
        "label": cfg["label"],
        "model": spec.ref,
        "tasks": tasks,
        "primary": primary,
        "average": average(primary),
        "config": out["_config"],
    }
    atomic_write_json(ctx.out / "results.json", results)
    samples_dir = ctx.out / "samples"
    samples_dir.mkdir(exist_ok=True)
    for task, samples in out.get("_samples", {}).items():
        if "max_gen_toks" not in out["_config"][task]:
            continue  # log-likelihood tasks: nothing generated to read (and MMLU would be tens of MB)
        with open(samples_dir / f"{task}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
    return {**{task: value for task, value in primary.items()}, "average": results["average"]}
