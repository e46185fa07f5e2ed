"""The benchmark catalogue and the generated task configs that point lm-eval at local data.

The paper (§4.1) evaluates with lm-eval under the Open LLM Leaderboard's settings. Each task here
is lm-eval's own definition: for a local ``data_dir`` we write a YAML that ``include:``s the stock
config by absolute path and overrides only where the rows come from (``dataset_path`` /
``dataset_kwargs.data_files`` / splits), so prompts, filters and metrics stay lm-eval's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ProfuserError

log = logging.getLogger(__name__)

HELDOUT_TASK = "profuser_heldout"
HELDOUT_BPB_TASK = "profuser_heldout_bpb"
HELDOUT_WINRATE_TASK = "profuser_heldout_winrate"  # judged win rate against the target's answers (judged.py)
HELDOUT_TASKS = (HELDOUT_TASK, HELDOUT_BPB_TASK)  # lm-eval tasks over the data stage's heldout.parquet

# What each of profuser's own tasks needs, said by `profuser validate` before anything runs.
TASK_NEEDS = {
    HELDOUT_TASK: "meta.answer (a canonical short answer) in the data's rows",
    HELDOUT_BPB_TASK: "a response in each held-out row (any dataset has one)",
    HELDOUT_WINRATE_TASK: "evaluate.judge.reward_model (the reward model that compares the answers)",
}
PEEK_ROWS = 200  # rows of a local data file read at validate time to see whether they carry meta.answer

# Table 1's columns, in the paper's order.
PAPER_TASKS: tuple[str, ...] = ("mmlu", "hellaswag", "arc_challenge", "winogrande", "gsm8k", "truthfulqa_mc2")


@dataclass(frozen=True)
class TaskInfo:
    """What profuser knows about a task beyond lm-eval's config."""

    title: str  # column header in reports
    shots: int  # default few-shot count (Open LLM Leaderboard)
    primary: str  # lm-eval result key of the number reported in tables
    stock_yaml: str | None = None  # config path under lm_eval/tasks; None: a group or profuser's own
    data_folders: tuple[str, ...] = ()  # folder names looked up under data_dir (besides the task name)
    split_files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> extra file names
    lower_is_better: bool = False  # bits per byte: less is better
    fraction: bool = True  # a 0-1 score (reports show %); False: shown as is (bits per byte)


KNOWN_TASKS: dict[str, TaskInfo] = {
    "mmlu": TaskInfo("MMLU", 5, "acc,none"),
    "hellaswag": TaskInfo("HellaSwag", 10, "acc_norm,none", "hellaswag/hellaswag.yaml"),
    "arc_challenge": TaskInfo("ARC", 25, "acc_norm,none", "arc/arc_challenge.yaml", ("arc", "ai2_arc")),
    "arc_easy": TaskInfo("ARC-Easy", 25, "acc_norm,none", "arc/arc_easy.yaml", ("ai2_arc",)),
    "winogrande": TaskInfo("Winogrande", 5, "acc,none", "winogrande/default.yaml"),
    # The paper scores GSM8K the Open-Instruct way (last number in the output): lm-eval's
    # flexible-extract filter; strict-match ("#### N") is reported alongside.
    "gsm8k": TaskInfo("GSM8K", 5, "exact_match,flexible-extract", "gsm8k/gsm8k.yaml"),
    # lm-eval reports the MC2 score under "acc" (utils.process_results_mc2).
    "truthfulqa_mc2": TaskInfo("TruthfulQA", 0, "acc,none", "truthfulqa/truthfulqa_mc2.yaml", ("truthfulqa", "truthful_qa"),
                               {"validation": ("mc_task.jsonl", "mc_task.json")}),
    "truthfulqa_mc1": TaskInfo("TruthfulQA-MC1", 0, "acc,none", "truthfulqa/truthfulqa_mc1.yaml", ("truthfulqa", "truthful_qa"),
                               {"validation": ("mc_task.jsonl", "mc_task.json")}),
    HELDOUT_TASK: TaskInfo("Held-out", 0, "exact_match,answer"),
    HELDOUT_BPB_TASK: TaskInfo("Held-out bpb", 0, "bpb,none", lower_is_better=True, fraction=False),
    HELDOUT_WINRATE_TASK: TaskInfo("Win rate vs target", 0, "winrate,none"),
}

DEFAULT_SHOTS: dict[str, int] = {name: info.shots for name, info in KNOWN_TASKS.items()}

# For tasks profuser has no entry for: the first of these the results carry is the primary.
_PRIMARY_PREFERENCE = ("acc_norm,none", "acc,none", "exact_match,flexible-extract", "exact_match,strict-match",
                       "exact_match,none", "mc2,none", "f1,none", "bleu,none")

_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def is_family_task(task: str) -> bool:
    """``<task>/<family>``: a held-out task's score on one family of its rows (``profuser compare``)."""
    return "/" in task and task.split("/", 1)[0] in KNOWN_TASKS


def _info(task: str) -> TaskInfo | None:
    return KNOWN_TASKS.get(task.split("/", 1)[0] if is_family_task(task) else task)


def task_title(task: str) -> str:
    info = _info(task)
    if info and is_family_task(task):
        return f"{info.title}: {task.split('/', 1)[1]}"
    return info.title if info else task


def lower_is_better(task: str) -> bool:
    """Whether a smaller primary score is better (profuser_heldout_bpb); lm-eval's accuracies are not."""
    info = _info(task)
    return bool(info and info.lower_is_better)


def is_fraction(task: str) -> bool:
    """Whether the primary score is a 0-1 fraction (reports show it in %)."""
    info = _info(task)
    return info.fraction if info else True


def primary_metric(task: str, metrics: dict[str, Any]) -> str | None:
    """The result key reported for ``task``: profuser's choice for known tasks, else a preference list."""
    info = KNOWN_TASKS.get(task)
    if info and info.primary in metrics:
        return info.primary
    for key in _PRIMARY_PREFERENCE:
        if key in metrics:
            return key
    numeric = [k for k, v in metrics.items() if isinstance(v, (int, float)) and "_stderr" not in k]
    return numeric[0] if numeric else None


def task_field_problems(recipe, registry) -> list[tuple[str, str]]:
    """(recipe path, message) for each evaluation task the recipe's data or settings cannot feed:
    the win rate without a judge (or a judge without the task), ``profuser_heldout`` on a local
    data file none of whose first ``PEEK_ROWS`` rows has ``meta.answer``. A dataset that cannot be
    read here (the hub) is checked when the task runs."""
    ev = recipe.evaluate
    problems = []
    if HELDOUT_WINRATE_TASK in ev.tasks and ev.judge is None:
        problems.append(("evaluate.judge", f"{HELDOUT_WINRATE_TASK} needs {TASK_NEEDS[HELDOUT_WINRATE_TASK]}"))
    if ev.judge is not None and HELDOUT_WINRATE_TASK not in ev.tasks:
        problems.append(("evaluate.judge", f"unused: add {HELDOUT_WINRATE_TASK} to evaluate.tasks (or remove the judge)"))
    if HELDOUT_TASK in ev.tasks:
        rows = _peek_records(recipe.data.source, registry)
        if rows and not any((r.meta or {}).get("answer") not in (None, "") for r in rows):
            source = recipe.data.source
            problems.append((f"evaluate.tasks.{ev.tasks.index(HELDOUT_TASK)}",
                             (f"{HELDOUT_TASK} needs {TASK_NEEDS[HELDOUT_TASK]}; none of the first {len(rows)} rows of "
                              f"{source.params.get('path', source.name)} has one: use {HELDOUT_BPB_TASK} (bits per byte "
                              f"of the responses) or {HELDOUT_WINRATE_TASK} (a judged win rate), which need none")))
    return problems


def _peek_records(source, registry) -> list | None:
    """The first ``PEEK_ROWS`` records of a dataset read from a local file (None: not a local file,
    or unreadable; the data stage reports what is wrong with it)."""
    import itertools

    from ..components import Record

    path = source.params.get("path")
    if not isinstance(path, str) or not Path(path).expanduser().is_file():
        return None
    try:
        dataset = registry.build("datasets", source.name, source.params)
        return [r for r in itertools.islice(dataset.records(), PEEK_ROWS) if isinstance(r, Record)]
    except Exception as exc:  # noqa: BLE001 - any failure here is the data stage's to report
        log.debug("could not peek at %s: %s", path, exc)
        return None


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def stock_yaml_path(task: str) -> Path | None:
    """The stock config of a task profuser knows by path (no task index needed), or None."""
    info = KNOWN_TASKS.get(task)
    if info is None or info.stock_yaml is None:
        return None
    path = lm_eval_tasks_dir() / info.stock_yaml
    if not path.is_file():  # a different lm-eval layout: fall back to the index
        log.debug("lm-eval has no %s; %s will be looked up in its task index", path, task)
        return None
    return path


def read_stock_config(path: Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The task config with its ``include:``s merged as lm-eval merges them (each included file in
    order, then the file's own keys win; a relative include is relative to the file), its
    ``!function`` references kept as :class:`Function` strings and never imported. Our own reader:
    lm-eval's YAML loader is private API."""
    path = Path(path).expanduser().resolve()
    if path in _stack:
        raise ProfuserError("the task config includes itself", where=" -> ".join(str(p) for p in (*_stack, path)))
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader plus !function
    except (OSError, yaml.YAMLError) as exc:
        raise ProfuserError(f"cannot read the lm-eval task config: {exc}", where=str(path)) from None
    if not isinstance(config, dict):
        raise ProfuserError("an lm-eval task config is a mapping", where=str(path))
    includes = config.pop("include", None)
    if includes is None:
        return config
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        base = read_stock_config(path.parent / include, (*_stack, path))  # an absolute include stays as is
        base.pop("task_list", None)  # names the included file's own tasks (lm-eval drops it too)
        merged.update(base)
    merged.update(config)
    return merged


# --- local data -----------------------------------------------------------------------------------


@dataclass
class LocalData:
    folder: Path
    builder: str  # the `datasets` builder: json, parquet, csv
    files: dict[str, Path]  # split name -> file


def find_local_data(task: str, config: dict[str, Any], data_dir: Path) -> LocalData | None:
    """Files for the splits ``config`` names, under ``data_dir/<folder>/``; None when there are none.

    Folder candidates: the task name, profuser's aliases (``truthfulqa``) and the last part of the
    config's ``dataset_path`` (``openai/gsm8k`` -> ``gsm8k``). File candidates per split:
    ``<split>.jsonl|json|parquet|csv`` plus known aliases (TruthfulQA's ``mc_task.jsonl``).
    """
    info = KNOWN_TASKS.get(task)
    folders = [task, *(info.data_folders if info else ())]
    if isinstance(config.get("dataset_path"), str):
        folders.append(config["dataset_path"].rstrip("/").split("/")[-1])
    splits = {config[k] for k in _SPLIT_KEYS if config.get(k)}
    for name in dict.fromkeys(folders):
        folder = data_dir / name
        if not folder.is_dir():
            continue
        files: dict[str, Path] = {}
        for split in splits:
            candidates = [f"{split}{ext}" for ext in _FORMATS] + list((info.split_files if info else {}).get(split, ()))
            found = next((folder / c for c in candidates if (folder / c).is_file()), None)
            if found is not None:
                files[split] = found.resolve()
        if files:
            builders = {_FORMATS[f.suffix] for f in files.values()}
            if len(builders) > 1:
                raise ProfuserError(f"the splits of {task} mix file formats ({', '.join(sorted(f.name for f in files.values()))}); "
                                    "use one format for all", where=str(folder))
            return LocalData(folder, builders.pop(), files)
    return None


def local_data_config(task: str, stock_yaml: Path, data_dir: Path, num_fewshot: int) -> dict[str, Any] | None:
    """A task config that includes the stock one and reads its rows from ``data_dir``; None when
    ``data_dir`` holds nothing for the task."""
    config = read_stock_config(stock_yaml)
    if config.get("group") or isinstance(config.get("task"), list):
        raise ProfuserError(f"{task} is a group of tasks; a data_dir override covers single tasks "
                            "(name the subtasks, or run the group from the datasets cache)", where=f"evaluate task {task}")
    local = find_local_data(task, config, data_dir)
    if local is None:
        return None
    splits = {k: config.get(k) for k in _SPLIT_KEYS}
    present = {k: (v if v in local.files else None) for k, v in splits.items()}
    eval_split = present["test_split"] or present["validation_split"]
    if eval_split is None:
        wanted = splits["test_split"] or splits["validation_split"]
        raise ProfuserError(f"no file for the evaluation split {wanted!r} of {task} "
                            f"(found: {', '.join(p.name for p in local.files.values())})", where=str(local.folder))
    # Evaluate on that split under the name "test", so that lm-eval's sampler never shows a question
    # as its own few-shot example when the shots must come from the same split.
    present["test_split"], present["validation_split"] = eval_split, None
    if num_fewshot > 0 and not (present["fewshot_split"] or present["training_split"]):
        log.warning("%s: %s has no training split; few-shot examples are drawn from the %r split "
                    "(never the question being asked)", task, local.folder, eval_split)
        present["fewshot_split"] = eval_split
    return {
        "include": str(stock_yaml),
        "task": task,
        "dataset_path": local.builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in local.files.items()}},
        **present,
    }


class Function(str):
    """A ``!function module.name`` reference in a generated YAML (lm-eval imports it on load)."""


class _Dumper(yaml.SafeDumper):
    pass


class _Loader(yaml.SafeLoader):
    pass


_Dumper.add_representer(Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))
_Loader.add_constructor("!function", lambda loader, node: Function(loader.construct_scalar(node)))


def write_task_yaml(directory: Path, task: str, config: dict[str, Any]) -> Path:
    path = directory / f"{task}.yaml"
    path.write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
