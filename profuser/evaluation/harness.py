"""Run lm-eval on an in-memory model: the paper's benchmarks, local data, the held-out task."""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from ..chat import messages, template_for
from ..errors import ProfuserError
from .heldout import PromptMode, bpb_config, bpb_docs, check_heldout, generation_budget, heldout_config
from .tasks import (
    DEFAULT_SHOTS,
    HELDOUT_BPB_TASK,
    HELDOUT_TASK,
    KNOWN_TASKS,
    local_data_config,
    primary_metric,
    stock_yaml_path,
    write_task_yaml,
)

log = logging.getLogger(__name__)


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer brings its own chat template (an instruct/chat model)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _heldout_mode(tokenizer, template: str, apply_chat_template: bool | None) -> PromptMode:
    if apply_chat_template is False:
        return "plain"
    try:  # templates without a system role raise (Gemma-style raise_exception)
        tokenizer.apply_chat_template(messages("system", "instruction"), chat_template=template,
                                      tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        return "folded"
    return "chat"


def evaluate_model(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | dict[str, int] | None = None,
    num_fewshot: dict[str, int] | None = None,
    data_dir: str | Path | None = None,
    heldout_path: str | Path | None = None,
    batch_size: int = 8,
    apply_chat_template: bool | None = None,
    device: str = "cpu",
    max_gen_toks: int | None = None,
    log_samples: bool = False,
    backend: str = "hf",
    vllm_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``model`` on lm-eval ``tasks``; returns ``{task: {metric: value}, "_primary": {task: value},
    "_config": {task: {...}}}`` (metric names as lm-eval writes them, e.g. ``"acc_norm,none"``).

    ``num_fewshot`` overrides the per-task defaults (``DEFAULT_SHOTS``; lm-eval's own otherwise).
    ``data_dir`` holds local copies of datasets (``<data_dir>/gsm8k/test.jsonl``...): those tasks run
    lm-eval's definition on those files. ``heldout_path`` is the ``heldout.parquet`` the
    ``profuser_heldout`` task scores; it always goes through the chat template the model was
    trained with (``profuser.chat.template_for``: the tokenizer's, else the fallback) unless
    ``apply_chat_template=False``. For the benchmarks, ``apply_chat_template=None`` uses the
    tokenizer's own template on generation tasks only when it has one (an instruct model answers in
    its format; log-likelihood tasks keep the leaderboard's plain prompts); True/False force it.
    ``max_gen_toks`` caps generation tasks (lm-eval's default: 256). ``log_samples`` adds
    ``"_samples": {task: [{doc_id, filter, prompt, target, response, answer, metrics}]}``.

    ``backend="vllm"``: lm-eval's vLLM backend; ``model`` is then the path of a local model
    directory (vLLM loads it itself) and ``vllm_args`` its settings (``vllm_model_args``).
    """
    if backend not in ("hf", "vllm"):
        raise ProfuserError(f"unknown backend {backend!r} (hf or vllm)", where="evaluate.backend")
    if not tasks:
        raise ProfuserError("no tasks to evaluate", where="evaluate.tasks")
    if len(set(tasks)) != len(tasks):
        twice = sorted({t for t in tasks if tasks.count(t) > 1})
        raise ProfuserError(f"tasks listed twice: {', '.join(twice)}", where="evaluate.tasks")
    shots = {**DEFAULT_SHOTS, **(num_fewshot or {})}
    unknown_shots = set(num_fewshot or {}) - set(tasks)
    if unknown_shots:
        raise ProfuserError(f"num_fewshot names task(s) not being evaluated: {', '.join(sorted(unknown_shots))}",
                            where="evaluate.num_fewshot")
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise ProfuserError("data_dir is not a directory", where=str(data_dir))
    template = template_for(tokenizer)
    # a ModelSpec's max_length lands in model_max_length (load_tokenizer): truncate there too
    max_length = getattr(tokenizer, "model_max_length", None)
    max_length = max_length if isinstance(max_length, int) and max_length < 10**7 else None

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="profuser-tasks-") as tmp:
        include = Path(tmp)
        sources: dict[str, str] = {}  # task -> where its rows come from (for the record)
        needs_index = False
        for task in tasks:
            if task == HELDOUT_BPB_TASK:  # docs chat-formatted here, with this model's tokenizer
                if heldout_path is None:
                    raise ProfuserError(f"{task} needs the held-out split (heldout_path)", where=f"evaluate task {task}")
                write_task_yaml(include, task, bpb_config(bpb_docs(Path(heldout_path), tokenizer, template, include)))
                sources[task] = str(Path(heldout_path).resolve())
                continue
            if task == HELDOUT_TASK:
                if heldout_path is None:
                    raise ProfuserError(f"{HELDOUT_TASK} needs the held-out split (heldout_path)",
                                        where=f"evaluate task {task}")
                check_heldout(Path(heldout_path))
                mode = _heldout_mode(tokenizer, template, apply_chat_template)
                budget = generation_budget(Path(heldout_path), tokenizer, max_length or _context(model))
                write_task_yaml(include, task, heldout_config(Path(heldout_path), mode=mode, max_gen_toks=budget))
                sources[task] = str(Path(heldout_path).resolve())
                continue
            stock = stock_yaml_path(task)
            if stock is None:
                stock = _index_yaml(task) if data_dir is not None else None
            config = local_data_config(task, stock, data_dir, shots.get(task, 0)) if (stock and data_dir) else None
            if config is not None:
                write_task_yaml(include, task, config)
                sources[task] = ", ".join(config["dataset_kwargs"]["data_files"].values())
            elif stock is not None:
                write_task_yaml(include, task, {"include": str(stock), "task": task})
                sources[task] = "lm-eval (datasets hub/cache)"
            else:  # groups (mmlu) and tasks profuser has no path for: lm-eval's index (slower)
                needs_index = True
                sources[task] = "lm-eval (datasets hub/cache)"

        manager = TaskManager(include_path=str(include), include_defaults=needs_index)
        loaded = {task: _load(manager, task) for task in tasks}
        for task, obj in loaded.items():
            for leaf in _leaves(obj):
                if task in shots:
                    leaf.set_config(key="num_fewshot", value=shots[task])
                elif leaf.get_config("num_fewshot") is None:
                    leaf.set_config(key="num_fewshot", value=0)

        chat_of = {task: _uses_chat(task, obj, tokenizer, apply_chat_template) for task, obj in loaded.items()}
        if backend == "vllm":
            lm = _vllm_lm(model, template, vllm_model_args(model, max_length=max_length, **(vllm_args or {})))
        else:
            model.eval()
            # the template goes to every apply_chat_template call, so a base model gets the fallback
            with _in_memory_model_accepted():
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                          max_length=max_length, chat_template_args={"chat_template": template})
        merged: dict[str, Any] = {"results": {}, "groups": {}, "n-samples": {}, "samples": {}}
        limit_of = {task: limit.get(task) if isinstance(limit, dict) else limit for task in tasks}
        for chat, task_limit in sorted({(chat_of[t], limit_of[t] or 0) for t in tasks}):  # one lm-eval call each
            group = [task for task in tasks if chat_of[task] == chat and (limit_of[task] or 0) == task_limit]
            try:
                with _quiet_git():
                    out = simple_evaluate(
                        model=lm, tasks=[loaded[t] for t in group], task_manager=manager, limit=task_limit or None,
                        apply_chat_template=chat, fewshot_as_multiturn=chat, log_samples=log_samples,
                        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                    )
            except ProfuserError:
                raise
            except Exception as exc:  # name the tasks: lm-eval's errors often do not
                raise ProfuserError(f"lm-eval failed: {type(exc).__name__}: {exc}",
                                    where=f"evaluate tasks {', '.join(group)}") from exc
            for key, part in merged.items():
                part.update((out or {}).get(key) or {})
        if backend == "vllm" and getattr(lm, "model", None) is not None:  # data parallel: Ray actors, gone already
            from profuser_plugins.generators.vllm import shutdown_engine

            shutdown_engine(lm.model)

    settings = {}
    for task, obj in loaded.items():
        leaf = _leaves(obj)[0]
        settings[task] = {"num_fewshot": leaf.get_config("num_fewshot"), "chat_template": chat_of[task],
                          "data": sources[task], "limit": limit_of[task]}
        if _generates(obj):  # what generation was allowed (after any max_gen_toks override)
            settings[task]["max_gen_toks"] = (leaf.get_config("generation_kwargs") or {}).get("max_gen_toks", lm.max_gen_toks)
    return _summarise(tasks, merged, settings)


def _context(model) -> int | None:
    if isinstance(model, (str, Path)):  # the vllm backend: a model directory
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
    else:
        config = model.config
    value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def vllm_model_args(path: str | Path, *, max_length: int | None = None, dtype: str = "auto",
                    tensor_parallel_size: int = 1, data_parallel_size: int | None = None,
                    gpu_memory_utilization: float = 0.9, seed: int = 1234, devices: int | None = None) -> dict[str, Any]:
    """Keyword arguments of lm-eval's ``VLLM`` model. ``data_parallel_size`` None: as many engines
    as the visible GPUs (``devices``, default torch's count) hold; more than one runs on Ray (lm-eval's way)."""
    if not isinstance(path, (str, Path)) or not Path(path).is_dir():
        raise ProfuserError("the vllm backend needs a local model directory", where=f"evaluate model {path}")
    if devices is None:
        import torch

        devices = torch.cuda.device_count()
    engines = data_parallel_size or max(devices // tensor_parallel_size, 1)
    if engines * tensor_parallel_size > max(devices, 1):
        raise ProfuserError(f"data_parallel_size {engines} x tensor_parallel_size {tensor_parallel_size} needs "
                            f"{engines * tensor_parallel_size} GPUs; {devices} visible", where="evaluate.vllm")
    if engines > 1 and importlib.util.find_spec("ray") is None:
        raise ProfuserError(f"{engines} vLLM engines need Ray (lm-eval runs its data parallel on Ray actors): "
                            "pip install ray, or set evaluate.vllm.data_parallel_size: 1", where="evaluate.vllm")
    return {"pretrained": str(path), "tokenizer": str(path), "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
            "data_parallel_size": engines, "gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_length,
            "seed": seed, "batch_size": "auto"}


# what pyproject's gpu extra pins: vLLM 0.22-0.26 are built for torch 2.11; lm-eval 0.4.13 needs vLLM >= 0.18
# and imports it without Ray (Ray only for data_parallel_size > 1)
GPU_STACK = "torch 2.11.0, vllm 0.26.0, lm-eval 0.4.13, ray 2.60.0, deepspeed 0.19.8"


def _vllm_lm(path, template: str, args: dict[str, Any]):
    if importlib.util.find_spec("vllm") is None:
        raise ProfuserError("the vllm backend needs vLLM and a CUDA GPU: pip install 'profuser[vllm]' "
                            "(or evaluate.backend: hf)", where="evaluate.backend")
    fix = f"pip install -e '.[gpu]' -c gpu-constraints.txt installs versions that work together ({GPU_STACK})"
    try:
        from lm_eval.models.vllm_causallms import VLLM

        lm = VLLM(**args)
    except (ImportError, NameError) as exc:  # lm-eval < 0.4.13 without Ray: "name 'LLM' is not defined"; moved vLLM modules
        raise ProfuserError(f"lm-eval's vLLM backend cannot start ({type(exc).__name__}: {exc}); {fix}",
                            where="evaluate.backend") from None
    lm.hf_chat_template = template  # as for HFLM: a base model gets the fallback template the trainer used
    return lm


class _DropInMemoryModelWarning(logging.Filter):
    """HFLM warns that a ``pretrained`` that is not a string ignores model arguments, and not to
    launch it via accelerate: profuser passes its in-memory model on purpose, with no such argument."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`pretrained` model kwarg is not of type `str`" not in record.getMessage()


@contextlib.contextmanager
def _in_memory_model_accepted():
    """Drop that one warning where lm-eval logs it, while HFLM is built; everything else it logs stays."""
    source = logging.getLogger("lm_eval.models.huggingface")
    dropped = _DropInMemoryModelWarning()
    source.addFilter(dropped)
    try:
        yield
    finally:
        source.removeFilter(dropped)


def _quiet_git():
    """lm-eval records ``git describe`` of the working directory; outside a checkout git prints
    ``fatal: not a git repository`` on the terminal. The same lookup, with git's stderr dropped."""
    from lm_eval import evaluator

    def commit_hash() -> str | None:
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
        except OSError:  # no git
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    original = evaluator.get_git_commit_hash

    @contextlib.contextmanager
    def patched():
        evaluator.get_git_commit_hash = commit_hash
        try:
            yield
        finally:
            evaluator.get_git_commit_hash = original

    return patched()


def _uses_chat(task: str, obj, tokenizer, apply_chat_template: bool | None) -> bool:
    if task == HELDOUT_TASK:
        return apply_chat_template is not False
    if task == HELDOUT_BPB_TASK:  # its contexts are chat-formatted already
        return False
    if apply_chat_template is None:
        return has_chat_template(tokenizer) and _generates(obj)
    return bool(apply_chat_template)


@functools.cache
def _stock_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)  # seconds: indexes every YAML lm-eval ships


def _index_yaml(task: str) -> Path | None:
    """The stock config of a single YAML task from lm-eval's index (None for groups, tags, Python
    tasks and unknown names), through TaskManager's public ``all_subtasks`` / ``task_index``."""
    manager = _stock_manager()
    if task in manager.all_groups or task in manager.all_tags or task not in manager.all_subtasks:
        return None
    entry = manager.task_index.get(task)
    path = getattr(entry, "yaml_path", None)
    if path is None or (getattr(entry, "cfg", None) or {}).get("class") is not None:
        return None
    return Path(path)


def _load(manager, task: str):
    try:
        loaded = manager.load([task])
    except KeyError:
        close = difflib.get_close_matches(task, manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ProfuserError(f"unknown lm-eval task {task!r}{hint}", where="evaluate.tasks") from None
    except ProfuserError:
        raise
    except Exception as exc:  # mostly: the dataset is neither local nor cached, and the hub is offline
        raise ProfuserError(f"cannot load the task's data: {type(exc).__name__}: {exc} "
                            "(offline? put the dataset under evaluate.data_dir)", where=f"evaluate task {task}") from exc
    if task in loaded.get("groups", {}):
        return loaded["groups"][task]
    return loaded["tasks"][task]


def _leaves(obj) -> list:
    return list(obj.get_all_tasks()) if hasattr(obj, "get_all_tasks") else [obj]


def _generates(obj) -> bool:
    return any(leaf.get_config("output_type") == "generate_until" for leaf in _leaves(obj))


def _summarise(tasks, merged, settings) -> dict[str, Any]:
    results: dict[str, Any] = {"_primary": {}, "_config": {}}
    for task in tasks:
        row = merged["results"].get(task) or merged["groups"].get(task)
        if row is None:
            raise ProfuserError("lm-eval returned no results for the task", where=f"evaluate task {task}")
        # lm-eval's metric keys are "metric,filter"; the rest (alias, sample_len) is bookkeeping
        metrics = {k: float(v) for k, v in row.items() if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        key = primary_metric(task, metrics)
        results[task] = metrics
        results["_primary"][task] = metrics.get(key) if key else None
        n = merged["n-samples"].get(task) or {}
        results["_config"][task] = {
            "primary_metric": key,
            "title": KNOWN_TASKS[task].title if task in KNOWN_TASKS else task,
            "samples": n.get("effective", n.get("original")) if isinstance(n, dict) else None,
            **settings[task],
        }
        if task in merged["samples"]:
            results.setdefault("_samples", {})[task] = [_sample(s) for s in merged["samples"][task]]
    return results


def _sample(sample: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval sample, reduced to what a reader checks: prompt, target, output, score."""
    args = sample.get("arguments") or []
    first = args[0] if args else ()
    prompt = first[0] if isinstance(first, (list, tuple)) and first else first
    # generate_until: [[text]]; multiple choice: [[(log-likelihood, is_greedy)] per choice]
    resps = [r[0] if isinstance(r, (list, tuple)) and r else r for r in sample.get("resps") or []]
    filtered = sample.get("filtered_resps") or [None]
    return {
        "doc_id": sample.get("doc_id"),
        "filter": sample.get("filter"),
        "prompt": prompt if isinstance(prompt, str) else str(prompt),
        "target": str(sample.get("target")),
        "response": _plain(resps[0] if len(resps) == 1 else resps),
        "answer": filtered[0] if isinstance(filtered[0], str) else None,
        "metrics": {m: float(sample[m]) for m in sample.get("metrics", []) if isinstance(sample.get(m), (int, float))},
    }


def _plain(value):
    """numpy scalars and tuples -> JSON-ready Python values."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        return value.item()
    return value
