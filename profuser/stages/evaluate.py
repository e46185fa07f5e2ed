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
from ..evaluation.tasks import HELDOUT_TASKS, HELDOUT_WINRATE_TASK, lower_is_better
from ..models import load_model
from ..recipe import EvaluateSpec, ModelSpec
from ..store import atomic_write_json
from . import ModelIdentity, StageConfig

VERSION = "2"  # 2: per_example.parquet; average leaves out lower-is-better tasks
MODEL, DATA = "model", "data"  # input roles: the artifact with model/ (train, merge), the data stage
JUDGE = "judge"  # input role of the win rate: the judge/<reference> stage (the reference's judged answers)


class Config(StageConfig):
    model: ModelIdentity | None  # None: the model/ folder of input MODEL
    label: str
    evaluate: EvaluateSpec

    # evaluate.baselines decides which evaluate stages the planner makes, not what one computes
    NOT_HASHED: ClassVar[dict[str, Any]] = {"evaluate": {"baselines"}}


def judge_components(ev: EvaluateSpec) -> list[tuple[str, str]]:
    """(kind, name) of what the win rate builds, its reward model and generator: none when the
    recipe's tasks have no win rate."""
    if ev.judge is None or HELDOUT_WINRATE_TASK not in ev.tasks:
        return []
    return [("reward_models", ev.judge.reward_model.name), ("generators", ev.judge.generator.name)]


def task_limit(ev: EvaluateSpec, task: str) -> int | None:
    """``evaluate.limit`` for one task: the number, the task's entry of a mapping, or None."""
    return ev.limit.get(task) if isinstance(ev.limit, dict) else ev.limit


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
    model = tokenizer = None
    lm_tasks = [task for task in ev.tasks if task != HELDOUT_WINRATE_TASK]  # the win rate is not lm-eval's
    # only lm-eval's tasks need the model here: the win rate's generator loads each model itself
    if lm_tasks and ev.backend == "vllm":  # vLLM loads the model directory itself
        from ..models import load_tokenizer, resolve_model

        model = resolve_model(spec, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
        tokenizer = load_tokenizer(spec, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
    elif lm_tasks:
        model, tokenizer = load_model(spec, device=device, cache_dir=ctx.runtime.cache_dir, engine=ctx.engine)
    heldout = Path(ctx.inputs[DATA]) / "heldout.parquet" if DATA in ctx.inputs else None

    out: dict[str, Any] = {"_primary": {}, "_config": {}}
    if lm_tasks:
        out = evaluate_model(
            model, tokenizer, lm_tasks, limit=ev.limit, num_fewshot=ev.num_fewshot,
            data_dir=ev.data_dir, heldout_path=heldout, batch_size=ev.batch_size, device=device,
            max_gen_toks=ev.max_gen_toks, log_samples=True,
            backend=ev.backend, vllm_args={**ev.vllm.model_dump(), "dtype": spec.dtype}
            if ev.backend == "vllm" else None,
        )
    judged = None
    if HELDOUT_WINRATE_TASK in ev.tasks:
        del model  # the generator loads each model itself
        judged = _winrate(ctx, spec, heldout)
        out[HELDOUT_WINRATE_TASK] = judged["metrics"]
        out.setdefault("_samples", {})[HELDOUT_WINRATE_TASK] = judged["samples"]
    primary = {task: out["_primary"].get(task) for task in ev.tasks}
    if judged is not None:
        primary[HELDOUT_WINRATE_TASK] = judged["metrics"]["winrate,none"]
        out["_config"][HELDOUT_WINRATE_TASK] = judged["config"]
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

    cols = per_example_rows({t: s for t, s in out.get("_samples", {}).items() if t != HELDOUT_WINRATE_TASK},
                            out["_config"], heldout)
    if judged is not None:  # one outcome (1, 1/2, 0) per held-out prompt, keyed by its row id
        for doc_id, (rid, value) in enumerate(zip(judged["ids"], judged["values"])):
            cols["task"].append(HELDOUT_WINRATE_TASK)
            cols["doc_id"].append(doc_id)
            cols["id"].append(rid)
            cols["value"].append(value)
    pq.write_table(pa.table(cols, schema=pa.schema([("task", pa.string()), ("doc_id", pa.int64()), ("id", pa.string()),
                                                     ("value", pa.float64())])), ctx.out / "per_example.parquet")
    samples_dir = ctx.out / "samples"
    samples_dir.mkdir(exist_ok=True)
    for task, samples in out.get("_samples", {}).items():
        if "max_gen_toks" not in out["_config"][task] and task != HELDOUT_WINRATE_TASK:
            continue  # log-likelihood tasks: nothing generated to read (and MMLU would be tens of MB)
        with open(samples_dir / f"{task}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
    return {**{task: value for task, value in primary.items()}, "average": results["average"]}


def _winrate(ctx, spec: ModelSpec, heldout: Path | None) -> dict[str, Any]:
    """``profuser_heldout_winrate`` of ``spec`` against the reference's answers, which the
    ``judge/<reference>`` stage answered and judged once (profuser.evaluation.judged)."""
    from ..evaluation.judged import answer_and_score, heldout_prompts, judged_winrate, read_reference_answers

    ev = ctx.config.evaluate
    if heldout is None or JUDGE not in ctx.inputs:
        raise ArtifactError(f"{HELDOUT_WINRATE_TASK} needs the data stage's held-out split and the reference's "
                            f"answers (input {JUDGE!r})", where=ctx.stage.id)
    limit = task_limit(ev, HELDOUT_WINRATE_TASK)
    prompts = heldout_prompts(heldout, limit)
    judge = ev.judge
    theirs = read_reference_answers(ctx.inputs[JUDGE], [p.id for p in prompts])
    if spec.identity() == judge.reference.identity():
        mine = theirs  # the reference against itself: a tie on every prompt, nothing to generate
    else:
        mine = answer_and_score(spec, prompts, generator=ctx.build("generators", judge.generator),
                                judge=ctx.build("reward_models", judge.reward_model))
    result = judged_winrate(prompts, mine, theirs)
    result["config"] = {"primary_metric": "winrate,none", "title": "Win rate vs target", "samples": len(prompts),
                        "num_fewshot": 0, "chat_template": True, "data": str(heldout), "limit": limit,
                        "judge": judge.reward_model.name, "generator": judge.generator.name,
                        "reference": judge.reference.ref}
    return result
