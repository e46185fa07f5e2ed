"""``profuser run --dry-run`` and ``profuser compare --dry-run``: the plan and what it will cost,
before any model loads, offline.

Sizes come, in this order, from the data stage's artifact when it is cached (exact counts; token
lengths at 4 characters per token), from the recipe's ``estimate:`` block (declared sizes: what a
paper-scale recipe states, so a hub dataset is never fetched for a dry run), or from reading a
local dataset source. Per stage: the work in tokens, GPU-hours at the stated throughputs, the
GPUs the stage can use (as the code stands), GPU memory per process and disk. A suite of recipes
counts every stage key once, as ``profuser compare`` runs them.

Throughputs are tokens per second per GPU. The defaults (``THROUGHPUTS``) and their sources:

- ``generate_vllm``: 2,000 output tokens/s for a 7B model in bf16 on one A100-80GB with vLLM's
  continuous batching; the order of published offline vLLM benchmarks for 7-8B models on one
  A100-80GB (LambdaLabsML/vllm-benchmark), which also report H100 at about 2x A100.
- ``generate_hf``: 250 tokens/s, one eighth of vLLM: transformers ``generate`` with static batches
  of 16 (vLLM's launch post measured up to 24x over HF transformers; 8x keeps it conservative).
- ``forward`` (teacher forcing, reward-model scoring, log-likelihood evaluation): arithmetic,
  2·N FLOPs per token at 40% of the GPU's dense bf16 peak (A100 312 TFLOP/s, H100 SXM 989).
- ``train`` (full fine-tuning, ZeRO-3 or FSDP, gradient checkpointing): arithmetic, 8·N FLOPs per
  token (forward 2N, backward 4N, recomputed forward 2N) at 35% of the bf16 peak.

These are estimates, not measurements: nothing here has run on a GPU yet (docs/scaling.md). Put
your own figures in the recipe's ``estimate.throughput``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .chat import conversation_history
from .components import BadRow, CurriculumInput, Record
from .data import SOURCE_SPLIT, read_records, split_marked
from .errors import RecipeError

CHARS_PER_TOKEN = 4  # rough for English BPE/SentencePiece text; only used before tokenising
BYTES_PER_TOKEN = 64  # logits store at k = 10 (see docs/benchmarks.md, "Logits store")
# built examples per token: input_ids + labels (int32), k teacher ids (int32) and logits (float32),
# mask; stored for every position today (issue 11, item 5)
BUILD_BYTES_PER_TOKEN = 4 + 4 + 10 * 4 + 10 * 4 + 1
TEXT_BYTES_PER_TOKEN = CHARS_PER_TOKEN  # parquet text, before compression
GB = 1e9

GPU_MEMORY_GB = {"A100-80GB": 80, "H100-80GB": 80}
PEAK_BF16_FLOPS = {"A100-80GB": 312e12, "H100-80GB": 989e12}  # dense, NVIDIA data sheets
MFU = {"forward": 0.40, "train": 0.35}
FLOPS_PER_TOKEN = {"forward": 2, "train": 8}  # times the parameter count
GENERATE_VLLM = {"A100-80GB": 2000.0, "H100-80GB": 4000.0}
HF_SLOWDOWN = 8  # generate_hf = generate_vllm / 8

THROUGHPUT_SOURCES = {
    "generate_vllm": "vLLM offline benchmarks, 7-8B bf16 (LambdaLabsML/vllm-benchmark); H100 ~2x A100",
    "generate_hf": "vLLM / 8 (vLLM's launch post: up to 24x HF transformers generate)",
    "forward": "arithmetic: 2N FLOPs/token at 40% of the bf16 peak",
    "train": "arithmetic: 8N FLOPs/token (gradient checkpointing) at 35% of the bf16 peak",
}

# Parameter counts and vocabularies of the paper's models (config.json); others are read off the
# name ("7b", "135M") or unknown.
KNOWN_MODELS = {
    "lmsys/vicuna-7b-v1.5": (6.74e9, 32000),
    "meta-llama/Llama-2-7b-chat-hf": (6.74e9, 32000),
    "mosaicml/mpt-7b-8k-chat": (6.65e9, 50432),
    "openbmb/Eurus-RM-7b": (7.11e9, 32000),  # Mistral-7B backbone + regression head
    "sfairXC/FsfairX-LLaMA3-RM-v0.1": (7.50e9, 128256),  # Llama-3-8B without its LM head
    "builtin:smollm2-135m-instruct": (0.135e9, 49152),
    "builtin:smollm2": (0.135e9, 49152),
    "builtin:gemma3-270m": (0.27e9, 262144),
    "builtin:gemma3": (0.27e9, 262144),
}
DEFAULT_VOCAB = 32000

# lm-eval work per evaluated model, per task: (log-likelihood tokens, generated tokens), counted
# from the task sizes (test/validation split x choices x ~tokens per request, default few-shot)
EVAL_TASK_TOKENS = {
    "mmlu": (14042 * 4 * 110, 0),
    "hellaswag": (10042 * 4 * 90, 0),
    "arc_challenge": (1172 * 4 * 60, 0),
    "arc_easy": (2376 * 4 * 50, 0),
    "winogrande": (1267 * 2 * 40, 0),
    "truthfulqa_mc2": (817 * 8 * 60, 0),
    "gsm8k": (1319 * 900, 1319 * 256),  # 5-shot prompts, up to 256 generated tokens
    "profuser_heldout": (0, 0),  # counted from the held-out examples below
}
UNKNOWN_TASK_TOKENS = (1000 * 4 * 100, 0)


@dataclass
class Sizes:
    """The data a plan is costed on: training examples and mean token lengths."""

    examples: int
    heldout: int
    prompt_tokens: float
    response_tokens: float
    generated_tokens: float
    origin: str  # where the figures come from


def _samples(recipe) -> int:
    """Samples per prompt of the generator (its ``n``; 1 when it has none)."""
    value = recipe.inference_mode.generator.params.get("n", 1)
    return int(value) if isinstance(value, int) and value > 0 else 1


def _max_new_tokens(recipe) -> int:
    return int(recipe.inference_mode.generator.params.get("max_new_tokens", 512))


def _declared(recipe) -> Sizes | None:
    """Sizes from the recipe alone: ``estimate:`` and ``data.sample``; None when it declares none."""
    est, spec = recipe.estimate, recipe.data
    if est.examples is None and not (spec.sample and est.response_tokens):
        return None
    total = spec.sample
    if spec.heldout == SOURCE_SPLIT:  # data.sample draws from the training side; the held-out size is the source's
        examples, heldout = est.examples or total or 0, 0
    else:
        heldout = (round(total * spec.heldout) if spec.heldout < 1 else int(spec.heldout)) if total else 0
        examples = est.examples or max((total or 0) - heldout, 0)
        if est.examples and not total:
            heldout = round(examples * spec.heldout / (1 - spec.heldout)) if spec.heldout < 1 else int(spec.heldout)
    missing = [f"estimate.{f}" for f in ("prompt_tokens", "response_tokens") if getattr(est, f) is None]
    if missing:
        raise RecipeError([(f, "needed for a dry run without the data (declare the mean token length)") for f in missing])
    generated = est.generated_tokens or min(est.response_tokens, _max_new_tokens(recipe))
    return Sizes(examples, heldout, est.prompt_tokens, est.response_tokens, generated, "declared in estimate:")


def _from_records(recipe, train: list[Record], heldout: int, origin: str) -> Sizes:
    n = max(len(train), 1)
    # a conversation's earlier turns are in every forward pass of its last one: they count as prompt
    prompt = sum(len(r.system) + len(r.instruction) + sum(len(m["content"]) for m in conversation_history(r.meta))
                 for r in train) / n / CHARS_PER_TOKEN
    response = sum(len(r.response) for r in train) / n / CHARS_PER_TOKEN
    est = recipe.estimate
    generated = est.generated_tokens or min(response, _max_new_tokens(recipe))
    return Sizes(len(train), heldout, max(prompt, 1.0), max(response, 1.0), generated, origin)


def plan_sizes(runner) -> Sizes:
    """Cached data artifact, else declared sizes, else a local dataset source read as a run would;
    a remote (hub) source without declared sizes is an error, never a download."""
    recipe = runner.recipe
    artifact = runner.store.get("data", runner.keys["data"], verify=False)
    if artifact is not None:
        train = read_records(artifact.path / "train.parquet")
        heldout = len(read_records(artifact.path / "heldout.parquet")) if (artifact.path / "heldout.parquet").exists() else 0
        return _from_records(recipe, train, heldout, "the cached data stage (tokens ≈ characters / 4)")
    declared = _declared(recipe)
    if declared is not None:
        return declared
    spec = recipe.data
    if spec.source.name in ("hub", "hf"):
        message = ("a dry run does not download the dataset: declare estimate.examples (or data.sample), "
                   "estimate.prompt_tokens and estimate.response_tokens")
        raise RecipeError([("estimate", message)])
    source = runner.engine.registry.build("datasets", spec.source.name, spec.source.params)
    records = [r for r in source.records() if not isinstance(r, BadRow)]
    if spec.heldout == SOURCE_SPLIT:
        train, held = split_marked(records)
        train, heldout = train[: spec.sample or len(train)], len(held)
    else:
        if spec.sample:
            records = records[: spec.sample]
        heldout = round(len(records) * spec.heldout) if spec.heldout < 1 else int(spec.heldout)
        train = records[: max(len(records) - heldout, 0)]
    return _from_records(recipe, train, heldout, "the dataset source (the data stage has not run; tokens ≈ characters / 4)")


def model_size(ref: str | None) -> tuple[float | None, int]:
    """(parameters or None, vocabulary) of a model reference."""
    if not ref:
        return None, DEFAULT_VOCAB
    if ref in KNOWN_MODELS:
        return KNOWN_MODELS[ref]
    tail = ref.rstrip("/").split("/")[-1]
    match = re.search(r"(?<![0-9.])(\d+(?:\.\d+)?)([bBmM])(?![a-zA-Z])", tail)
    if not match:
        return None, DEFAULT_VOCAB
    return float(match.group(1)) * (1e9 if match.group(2).lower() == "b" else 1e6), DEFAULT_VOCAB


def throughputs(recipe, params: float | None) -> dict[str, float]:
    """Tokens/s per GPU for a model of ``params`` parameters (7B when unknown)."""
    gpu = recipe.estimate.gpu
    n = params or 7e9
    scale = 7e9 / n  # generation is memory-bound: throughput roughly inverse to model size
    rates = {
        "generate_vllm": GENERATE_VLLM[gpu] * scale,
        "generate_hf": GENERATE_VLLM[gpu] * scale / HF_SLOWDOWN,
        "forward": PEAK_BF16_FLOPS[gpu] * MFU["forward"] / (FLOPS_PER_TOKEN["forward"] * n),
        "train": PEAK_BF16_FLOPS[gpu] * MFU["train"] / (FLOPS_PER_TOKEN["train"] * n),
    }
    rates.update(recipe.estimate.throughput)
    return rates


def _bytes_per_param(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _gb(x: float) -> float:
    return round(x / GB, 1)


def _row(stage, cached: bool, **fields) -> dict:
    row = {"id": stage.id, "kind": stage.kind, "cached": cached, "tokens": 0, "throughput": None,
           "throughput_source": None, "gpu_hours": 0.0, "gpus": 0, "wall_hours": 0.0, "gpu_memory_gb": 0.0,
           "disk_gb": 0.0, "scratch_gb": 0.0, "note": ""}
    row.update(fields)
    if row["tokens"] and row["throughput"]:
        row["gpu_hours"] = round(row["tokens"] / row["throughput"] / 3600, 2)
        row["wall_hours"] = round(row["gpu_hours"] / max(row["gpus"], 1), 2)
    row["throughput"] = round(row["throughput"]) if row["throughput"] else None
    return row


def _train_sequences(runner, sizes: Sizes) -> tuple[dict[str, float], int, str]:
    """(sequences per mode over all phases, optimizer steps, note) from the curriculum's phases on
    ``sizes.examples`` synthetic ids (a curriculum that needs real scores cannot be costed)."""
    recipe = runner.recipe
    ids = [str(i) for i in range(sizes.examples)]
    length = max(1, round(sizes.response_tokens))
    curriculum = runner.engine.registry.build("curricula", recipe.curriculum.name, recipe.curriculum.params)
    try:
        phases = curriculum.phases(CurriculumInput(ids=ids, gt_length=dict.fromkeys(ids, length),
                                                   target_reward=dict.fromkeys(ids, 0.0)))
    except Exception as exc:  # noqa: BLE001 - a curriculum that needs real rewards cannot be costed ahead
        return {}, 0, f"unknown before scoring ({exc})"
    per_mode: dict[str, float] = {}
    for phase in phases:
        for part in phase.parts:
            count = len(part.ids) if part.ids is not None else sizes.examples
            per_mode[part.mode] = per_mode.get(part.mode, 0.0) + phase.epochs * count
    from .training.data import planned_steps  # the trainer's rule (instructions or examples)

    steps = sum(planned_steps(phases, ids, recipe.train.batch_size))
    return per_mode, steps, f"{steps} optimizer steps over {len(phases)} phase(s)"


def stage_rows(runner, sizes: Sizes) -> list[dict]:
    """One cost row per selected stage of ``runner``'s plan."""
    recipe = runner.recipe
    engine = runner.engine
    gpus = recipe.estimate.gpus
    gpu_mem = GPU_MEMORY_GB[recipe.estimate.gpu] * GB
    n, p, r, g = sizes.examples, sizes.prompt_tokens, sizes.response_tokens, sizes.generated_tokens
    n_sources = len(recipe.sources)
    distill = recipe.distill
    rows = []
    for stage, _key, cached in runner.status():
        cfg = stage.config
        if stage.kind == "data":
            rows.append(_row(stage, cached, disk_gb=_gb((n + sizes.heldout) * (p + r) * TEXT_BYTES_PER_TOKEN)))
        elif stage.kind == "generate":
            spec = cfg.model
            params, _ = _size(runner, spec["ref"])
            gen = recipe.inference_mode.generator
            cls = engine.registry.get("generators", gen.name).cls
            vllm = gen.name == "vllm"
            rate = throughputs(recipe, params)["generate_vllm" if vllm else "generate_hf"]
            tp = int(gen.params.get("tensor_parallel_size", 1))
            used = gpus if getattr(cls, "data_parallel", True) else tp
            if vllm:  # vLLM takes this share of each GPU up front, whatever the model needs
                memory = float(gen.params.get("gpu_memory_utilization", 0.9)) * gpu_mem
            else:
                batch = int(gen.params.get("batch_size", 16))
                memory = (params or 0) * _bytes_per_param(spec["dtype"]) + _kv_bytes(params) * batch * (p + _max_new_tokens(recipe))
            samples = _samples(recipe)
            rows.append(_row(stage, cached, tokens=round(n * samples * g), throughput=rate,
                             throughput_source=THROUGHPUT_SOURCES["generate_vllm" if vllm else "generate_hf"],
                             gpus=used, gpu_memory_gb=_gb(memory), disk_gb=_gb(n * samples * g * TEXT_BYTES_PER_TOKEN),
                             note=f"{n:,} prompts x " + (f"{samples} samples x " if samples > 1 else "")
                             + f"{g:.0f} new tokens (prefill not counted)"))
        elif stage.kind == "score":
            rm = cfg.reward_model
            ref = rm.params.get("model")
            params, vocab = _size(runner, ref)
            cls = engine.registry.get("reward_models", rm.name).cls
            batch = int(rm.params.get("batch_size", 8))
            length = min(p + g, int(rm.params.get("max_length", 2048)))
            memory = (params or 0) * 2 + _activation_bytes(params, batch, length)
            answers = n_sources * _samples(recipe)  # every sample of every source is scored
            rows.append(_row(stage, cached, tokens=round(n * answers * length), throughput=throughputs(recipe, params)["forward"],
                             throughput_source=THROUGHPUT_SOURCES["forward"], gpus=gpus if getattr(cls, "data_parallel", True) else 1,
                             gpu_memory_gb=_gb(memory), disk_gb=0.0,
                             note=f"{n:,} x {answers} answers scored" + ("" if params else "; model size unknown")))
        elif stage.kind == "logits":
            spec = cfg.model
            params, vocab = _size(runner, spec["ref"])
            inference = cfg.mode == "inference"
            won_only = inference and not cfg.all_examples  # all_teachers: every example's chosen response
            count = n / n_sources if won_only else n  # inference mode: only the examples this source won
            response = g if inference else r
            length = min(p + response, distill.max_length)
            # fp32 logits of a batch, [B, L, V], next to the weights
            memory = (params or 0) * _bytes_per_param(spec["dtype"]) + distill.batch_size * length * vocab * 4 \
                + _activation_bytes(params, distill.batch_size, length)
            rows.append(_row(stage, cached, tokens=round(count * length), throughput=throughputs(recipe, params)["forward"],
                             throughput_source=THROUGHPUT_SOURCES["forward"], gpus=gpus, gpu_memory_gb=_gb(memory),
                             disk_gb=_gb(count * response * BYTES_PER_TOKEN),
                             note=f"{count:,.0f} examples" + (" (its share of the wins, ≈ 1/sources)" if won_only else "")))
        elif stage.kind == "align":
            inference = cfg.mode == "inference"
            count = n if cfg.all_examples else n / n_sources
            rows.append(_row(stage, cached, disk_gb=_gb(count * (g if inference else r) * BUILD_BYTES_PER_TOKEN),
                             note="CPU"))
        elif stage.kind == "build":
            response = g if cfg.mode == "inference" else r
            rows.append(_row(stage, cached, disk_gb=_gb(n * min(p + response, recipe.train.max_length) * BUILD_BYTES_PER_TOKEN),
                             note="CPU"))
        elif stage.kind == "select":
            rows.append(_row(stage, cached, note="CPU"))
        elif stage.kind == "train":
            rows.append(_train_row(runner, stage, cached, sizes))
        elif stage.kind == "judge":
            rows.append(_judge_row(runner, stage, cached, sizes))
        elif stage.kind == "evaluate":
            rows.append(_evaluate_row(runner, stage, cached, sizes))
        else:
            rows.append(_row(stage, cached, note="not costed"))
    return rows


def _kv_bytes(params: float | None) -> float:
    """bf16 KV cache bytes per token: 2 (K, V) x layers x hidden x 2 bytes; Llama-shaped models
    have hidden ≈ sqrt(params / (12 x layers)) — 4096 x 32 layers at 7B."""
    if not params:
        return 0.0
    layers = 32 if params > 3e9 else 24
    hidden = math.sqrt(params / (12 * layers))
    return 2 * layers * hidden * 2


def _activation_bytes(params: float | None, batch: int, length: float) -> float:
    """Forward-only activations: a few hidden-sized buffers per token (no gradients kept)."""
    if not params:
        return 0.0
    hidden = math.sqrt(params / (12 * (32 if params > 3e9 else 24)))
    return batch * length * hidden * 2 * 16


def _train_row(runner, stage, cached: bool, sizes: Sizes) -> dict:
    recipe = runner.recipe
    spec, train = recipe.target, recipe.train
    params, vocab = _size(runner, spec.ref)
    per_mode, steps, note = _train_sequences(runner, sizes)
    p = sizes.prompt_tokens
    length = {"training": min(p + sizes.response_tokens, train.max_length),
              "inference": min(p + sizes.generated_tokens, train.max_length)}
    tokens = sum(count * length.get(mode, length["training"]) for mode, count in per_mode.items())
    world = recipe.estimate.gpus if train.distributed != "none" else 1
    n = params or 0
    # bf16 weights + grads (2 + 2), fp32 master copy and Adam moments (4 + 4 + 4): 16 bytes/param,
    # sharded over the ranks by ZeRO-3 / FSDP, whole on each rank with DDP or one process
    sharded = train.distributed in ("deepspeed", "fsdp")
    states = 16 * n / (world if sharded else 1)
    micro, seq = train.micro_batch_size, train.max_length
    hidden = math.sqrt(n / (12 * 32)) if n else 0
    layers = 32
    # checkpointed activations (one hidden state per layer per token) + one layer's full
    # activations + fp32 logits with their gradient and the teacher's top-k
    activations = micro * seq * hidden * 2 * (layers if train.gradient_checkpointing else layers * 17) \
        + micro * seq * vocab * 4 * 3
    ckpt_copies = 2  # the newest checkpoint and the one it replaces, while it is written
    scratch = ckpt_copies * 16 * n  # removed once training completes (train.keep_checkpoints: no)
    return _row(stage, cached, tokens=round(tokens), throughput=throughputs(recipe, params)["train"],
                throughput_source=THROUGHPUT_SOURCES["train"], gpus=world, gpu_memory_gb=_gb(states + activations),
                disk_gb=_gb(n * 2), scratch_gb=_gb(scratch), note=note + ("" if params else "; model size unknown"),
                optimizer_steps=steps or None)  # None: unknown before scoring


def _judge_row(runner, stage, cached: bool, sizes: Sizes) -> dict:
    """The win rate's reference answers: generated, then scored by the judge (on one GPU, as evaluate)."""
    cfg = stage.config
    prompts = min(cfg.limit or sizes.heldout, sizes.heldout)
    new_tokens = int(cfg.generator.params.get("max_new_tokens", 256))
    params, _ = _size(runner, cfg.model["ref"])
    judge_params, _ = _size(runner, cfg.reward_model.params.get("model"))
    generated, judged = prompts * new_tokens, prompts * (sizes.prompt_tokens + new_tokens)
    seconds = generated / throughputs(runner.recipe, params)["generate_hf"] \
        + judged / throughputs(runner.recipe, judge_params)["forward"]
    return _row(stage, cached, tokens=round(generated + judged), throughput=(generated + judged) / seconds,
                throughput_source="generate_hf for the answers, forward for the judge", gpus=1,
                gpu_memory_gb=_gb(max(params or 0, judge_params or 0) * _bytes_per_param(cfg.model.get("dtype", "bfloat16"))),
                note=f"{prompts:,} answers of the reference x {new_tokens} new tokens at most, judged once for every evaluation")


def _evaluate_row(runner, stage, cached: bool, sizes: Sizes) -> dict:
    recipe = runner.recipe
    spec = stage.config.model or recipe.target.identity()
    params, _ = _size(runner, spec["ref"])
    rates = throughputs(recipe, params)
    seconds, tokens, unknown = 0.0, 0, []
    for task in recipe.evaluate.tasks:
        if task not in EVAL_TASK_TOKENS:
            unknown.append(task)
        forward, generated = EVAL_TASK_TOKENS.get(task, UNKNOWN_TASK_TOKENS)
        if task == "profuser_heldout":
            forward, generated = sizes.heldout * sizes.prompt_tokens, sizes.heldout * min(sizes.response_tokens, 256)
        limit = recipe.evaluate.limit
        if isinstance(limit, dict):  # per task: the largest bounds the estimate
            limit = max(limit.values(), default=None) if len(limit) == len(recipe.evaluate.tasks) else None
        if limit:  # --limit caps examples per task; scale by the share kept (mmlu: per subtask, ~57)
            forward, generated = forward * min(1.0, limit / 1000), generated * min(1.0, limit / 1000)
        seconds += forward / rates["forward"] + generated / rates["generate_hf"]
        tokens += round(forward + generated)
    rate = tokens / seconds if seconds else None
    memory = (params or 0) * _bytes_per_param(spec.get("dtype", "bfloat16")) \
        + _activation_bytes(params, recipe.evaluate.batch_size, 1024)
    note = "lm-eval, HF backend, one GPU" + (f"; tasks costed as a 1,000-question default: {', '.join(unknown)}" if unknown else "")
    return _row(stage, cached, tokens=tokens, throughput=rate,
                throughput_source="forward, and generate_hf for generated tokens", gpus=1,
                gpu_memory_gb=_gb(memory), note=note)


def _totals(rows: list[dict]) -> dict:
    todo = [r for r in rows if not r["cached"]]
    return {
        "gpu_hours": round(sum(r["gpu_hours"] for r in rows), 1),
        "gpu_hours_to_run": round(sum(r["gpu_hours"] for r in todo), 1),
        "wall_hours": round(sum(r["wall_hours"] for r in rows), 1),
        # what stays, plus the largest transient (checkpoints live only while their stage runs)
        "disk_gb": round(sum(r["disk_gb"] for r in rows) + max((r["scratch_gb"] for r in rows), default=0.0), 1),
        "peak_gpu_memory_gb": max((r["gpu_memory_gb"] for r in rows), default=0.0),
    }


class _Part:
    """The stages of a plan that one recipe owns, as ``stage_rows`` costs them: with that recipe's
    sizes, curriculum and models (a recipe: model's recipe has its own)."""

    def __init__(self, runner, recipe, status: list):
        self.recipe, self.engine, self.store, self.stages = recipe, runner.engine, runner.store, runner.stages
        self._status = status
        self.keys = {s.id.removeprefix(s.prefix): key for s, key, _ in status}

    def status(self) -> list:
        return self._status


def _stage_rows_by_recipe(runner, sizes: Sizes, status: list) -> list[dict]:
    """``stage_rows`` of each recipe's part of the plan (this recipe's, then each recipe: model's
    recipe's), in plan order."""
    from .recipe import load_recipe

    rows = {row["id"]: row for row in stage_rows(_Part(runner, runner.recipe, [t for t in status if not t[0].origin]), sizes)}
    for origin in dict.fromkeys(s.origin for s, _, _ in status if s.origin):
        part = _Part(runner, load_recipe(origin, registry=runner.engine.registry), [t for t in status if t[0].origin == origin])
        part_sizes = plan_sizes(part) if "data" in part.keys else Sizes(0, 0, 1.0, 1.0, 1.0, "no data stage")
        rows.update({row["id"]: row for row in stage_rows(part, part_sizes)})
    return [rows[s.id] for s, _, _ in status]


def _size(runner, ref: str | None) -> tuple[float | None, int]:
    """``model_size``; a recipe: model has the size of the target its recipe trains (of a merge:
    its base model), through any chain of recipes."""
    from .recipe import is_recipe_ref, load_recipe, split_recipe_ref

    for _ in range(16):
        if not is_recipe_ref(ref):
            break
        body, label = split_recipe_ref(ref)
        # a recipe's own form (a path) or the planner's role (recipe:<name>): the stages it planned know the file
        file = body if body.endswith((".yaml", ".yml")) else next(
            (s.origin for s in getattr(runner, "stages", []) if s.prefix.endswith(f"{body}:")), None)
        if file is None:
            return None, DEFAULT_VOCAB
        made = load_recipe(file, registry=runner.engine.registry)
        merge = next((m for m in made.merges if m.key == label), None) if label else None
        ref = (merge.base_model or merge.models[0]).ref if merge else made.target.ref
    return model_size(ref)


def memory_fix(recipe, row: dict) -> str:
    """What lowers a stage's GPU memory per process, as recipe settings."""
    kind = row["kind"]
    if kind == "train":
        train = recipe.train
        if train.distributed not in ("deepspeed", "fsdp"):
            return ("shard the 16 bytes/param over the GPUs: train.distributed: deepspeed with "
                    "train.deepspeed_config: recipes/configs/zero3.json (or fsdp)")
        fixes = ["more GPUs (estimate.gpus)"]
        if not train.gradient_checkpointing:
            fixes.append("train.gradient_checkpointing: true")
        if train.micro_batch_size > 1:
            fixes.append("a smaller train.micro_batch_size")
        return ", ".join(fixes)
    if kind == "generate" and recipe.inference_mode.generator.name == "vllm":
        return "a lower gpu_memory_utilization or a larger tensor_parallel_size in the generator's params"
    fixes = {"generate": "a smaller generator batch_size", "score": "a smaller reward model batch_size",
             "logits": "a smaller distill.batch_size", "evaluate": "a smaller evaluate.batch_size"}.get(kind, "")
    return "dtype: bfloat16 on the model" + (f", or {fixes}" if fixes else "")


def memory_warnings(recipe, rows: list[dict]) -> list[str]:
    """One line per stage whose GPU memory per process exceeds the declared GPU's, with the fix."""
    limit = GPU_MEMORY_GB[recipe.estimate.gpu]
    return [f"{row['id']}: {row['gpu_memory_gb']:g} GB of GPU memory per process exceeds the {limit} GB of one "
            f"{recipe.estimate.gpu}; {memory_fix(recipe, row)}" for row in rows if row["gpu_memory_gb"] > limit]


def estimate_plan(runner) -> dict:
    """The plan of one recipe with its cost per stage and in total (JSON-ready); a stage key
    that the plan holds twice (a recipe: model's recipe shares this one's data) counts once."""
    recipe = runner.recipe
    sizes = plan_sizes(runner)
    status = runner.status()
    rows = _stage_rows_by_recipe(runner, sizes, status)
    distinct = list({key: row for row, (_, key, _) in zip(rows, status)}.values())
    why = runner.reasons(status)  # each stage to run: what changed since the recipe's last run
    steps_note = _train_sequences(runner, sizes)[2]
    return {
        "recipe": recipe.name,
        # declared: the recipe's estimate block names the machine; else the figures are at the defaults
        "hardware": {"gpu": recipe.estimate.gpu, "gpus": recipe.estimate.gpus,
                     "declared": bool({"gpu", "gpus"} & recipe.estimate.model_fields_set)},
        "sizes": {"examples": sizes.examples, "heldout": sizes.heldout, "prompt_tokens": round(sizes.prompt_tokens, 1),
                  "response_tokens": round(sizes.response_tokens, 1), "generated_tokens": round(sizes.generated_tokens, 1),
                  "from": sizes.origin},
        # what each model computes in, a dtype left unset resolved for the run's device (recipe.default_dtype)
        "dtypes": {"target": recipe.target.dtype, "sources": {s.key: s.dtype for s in recipe.sources}},
        "throughputs": {k: round(v) for k, v in throughputs(recipe, _size(runner, recipe.target.ref)[0]).items()},
        "throughput_sources": THROUGHPUT_SOURCES,
        "stages": [{**row, "key": key, **({"why": why[stage.id]} if stage.id in why else {})}
                   for row, (stage, key, _) in zip(rows, status)],
        "total": {**_totals(distinct), "optimizer_steps": steps_note,
                  "stages_to_run": f"{len({k for _, k, c in status if not c})} of {len({k for _, k, _ in status})}"},
        "warnings": memory_warnings(recipe, [row for row, (_, _, cached) in zip(rows, status) if not cached]),
    }


def estimate_suite(runners) -> dict:
    """Several recipes side by side, each stage key counted once (as ``profuser compare`` runs
    them): per recipe its own total, and the suite's total over the distinct stages."""
    plans = [estimate_plan(r) for r in runners]
    seen: dict[str, dict] = {}
    for plan in plans:
        for row in plan["stages"]:
            seen.setdefault(row["key"], row)
    distinct = list(seen.values())
    return {
        "recipes": plans,
        "suite": {**_totals(distinct), "stages": len(distinct),
                  "stages_if_each_ran_alone": sum(len(p["stages"]) for p in plans),
                  "gpu_hours_if_each_ran_alone": round(sum(p["total"]["gpu_hours"] for p in plans), 1)},
    }
