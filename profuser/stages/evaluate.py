"""The ``evaluate/<label>`` stage: lm-eval scores of one model (the fused model or a baseline).

Config: ``model`` (a ModelSpec identity, or None for the fused model: input ``model`` is then the
train artifact, whose ``model/`` it loads), ``label``, ``evaluate`` (tasks, limit, num_fewshot,
data_dir, batch_size; max_gen_toks when the recipe schema has it). Input ``data`` gives
``heldout.parquet`` to the ``profuser_heldout`` task.

Writes ``results.json`` ({label, model, tasks: {task: {metric: value}}, primary: {task: value},
average, config: {task: {...}}}), ``per_example.parquet`` (task, doc_id, id, value: each example's
primary-metric value, keyed by the held-out row id for the held-out tasks and by lm-eval's doc_id
for benchmarks, so that models pair up in ``profuser compare``) and, for generation tasks,
``samples/<task>.jsonl`` (prompt, target, output, extracted answer and score of every scored
example). Metrics: the primary score of each task and their average (over the tasks where higher
is better: bits per byte do not average with accuracies).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ArtifactError
from ..evaluation import evaluate_model
from ..evaluation.heldout import heldout_ids
from ..evaluation.tasks import HELDOUT_TASKS, lower_is_better
from ..models import load_model
from ..recipe import EvaluateSpec, ModelSpec
from ..store import atomic_write_json
from . import ModelIdentity, StageConfig

VERSION = "2"  # 2: per_example.parquet; average leaves out lower-is-better tasks
MODEL, DATA = "model", "data"  # input roles: the artifact with model/ (train, merge), the data stage


class Config(StageConfig):
    model: ModelIdentity | None  # None: the model/ folder of input MODEL
    label: str
    evaluate: EvaluateSpec

    # evaluate.baselines decides which evaluate stages the planner makes, not what one computes
    NOT_HASHED: ClassVar[dict[str, Any]] = {"evaluate": {"baselines"}}


def average(primary: dict[str, float | None]) -> float | None:
    values = [v for t, v in primary.items() if v is not None and not lower_is_better(t)]
    return sum(values) / len(values) if values else None


def per_example_rows(samples: dict[str, list[dict]], config: dict[str, dict], heldout: Path | None) -> dict[str, list]:
    """Columns of ``per_example.parquet``: one row per example of each task whose samples carry its
    primary metric (groups such as mmlu log samples under their subtasks: none)."""
    cols: dict[str, list] = {"task": [], "doc_id": [], "id": [], "value": []}
    for task, rows in samples.items():
        key = (config.get(task) or {}).get("primary_metric")
        if not key or "," not in key:
            continue
        metric, filt = key.split(",", 1)
        ids = heldout_ids(heldout, task) if task in HELDOUT_TASKS and heldout is not None else None
        for sample in rows:
            value = (sample.get("metrics") or {}).get(metric)
            if sample.get("filter") != filt or value is None or sample.get("doc_id") is None:
                continue
            doc_id = int(sample["doc_id"])
            cols["task"].append(task)
            cols["doc_id"].append(doc_id)
            cols["id"].append(ids[doc_id] if ids is not None else str(doc_id))
            cols["value"].append(float(value))
    return cols


def run(ctx) -> dict:
    cfg = ctx.config
    ev = cfg.evaluate
    if cfg.model is None:
        if MODEL not in ctx.inputs:
            raise ArtifactError(f"the fused model's evaluation needs the train artifact as input {MODEL!r}",
                                where=ctx.stage.id)
        model_dir = Path(ctx.inputs[MODEL]) / "model"
        if not model_dir.is_dir():
            raise ArtifactError("the train artifact has no model/ folder", where=str(ctx.inputs[MODEL]))
        spec = ModelSpec(ref=str(model_dir), label=cfg.label)
    else:
        spec = ModelSpec(**cfg.model, label=cfg.label)
    device = ctx.runtime.torch_device()
    if ev.backend == "vllm":  # vLLM loads the model directory itself
        from ..models import load_tokenizer, resolve_model

        model = resolve_model(spec, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
        tokenizer = load_tokenizer(spec, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
    else:
        model, tokenizer = load_model(spec, device=device, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
    heldout = Path(ctx.inputs[DATA]) / "heldout.parquet" if DATA in ctx.inputs else None

    out = evaluate_model(
        model, tokenizer, list(ev.tasks), limit=ev.limit, num_fewshot=ev.num_fewshot,
        data_dir=ev.data_dir, heldout_path=heldout, batch_size=ev.batch_size, device=device,
        max_gen_toks=ev.max_gen_toks, log_samples=True,
        backend=ev.backend, vllm_args={**ev.vllm.model_dump(), "dtype": spec.dtype}
        if ev.backend == "vllm" else None,
    )
    primary = out["_primary"]
    tasks = {task: out[task] for task in ev.tasks}
    results = {
        "label": cfg.label,
        "model": spec.ref,
        "tasks": tasks,
        "primary": primary,
        "average": average(primary),
        "config": out["_config"],
    }
    atomic_write_json(ctx.out / "results.json", results)
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = per_example_rows(out.get("_samples", {}), out["_config"], heldout)
    pq.write_table(pa.table(cols, schema=pa.schema([("task", pa.string()), ("doc_id", pa.int64()), ("id", pa.string()),
                                                     ("value", pa.float64())])), ctx.out / "per_example.parquet")
    samples_dir = ctx.out / "samples"
    samples_dir.mkdir(exist_ok=True)
    for task, samples in out.get("_samples", {}).items():
        if "max_gen_toks" not in out["_config"][task]:
            continue  # log-likelihood tasks: nothing generated to read (and MMLU would be tens of MB)
        with open(samples_dir / f"{task}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
    return {**{task: value for task, value in primary.items()}, "average": results["average"]}
