"""``profuser export``: a run's training data as a Hugging Face ``datasets`` dataset, for TRL,
axolotl or another run (``datasets.load_from_disk(DIR)``).

``--stage select``: one row per selected example and mode: ``id``, ``mode`` (inference /
training), ``source`` (the advantaged source), ``system``, ``instruction``, ``response`` (the
chosen response: the source's own generation in the inference mode, the ground truth in the
training mode), ``scores`` (the evaluator's scores per source, JSON) and ``messages``: the whole
conversation in TRL's conversational format (``[{role, content}]``: the system prompt if any, a
conversation's earlier turns, the instruction, the chosen response), so ``SFTTrainer`` takes it
as it is.

``--stage build``: the same rows for the examples the trainer reads, plus the target-token view
of each: ``input_ids`` and ``labels`` (-100 on the prompt) in the target's tokenizer, and per
labelled position the teacher's top-k on the target's tokens: ``teacher_ids`` [n][k],
``teacher_logprobs`` [n][k] (log-probabilities: the raw logits less the log-partition when the
build kept it, else normalised over the top-k; -inf in unused slots) and ``teacher_mask`` [n]
(False where no teacher token aligned). n is the number of labels other than -100, in order.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, ProfuserError

STAGES = ("select", "build")
MODES = ("inference", "training")


def find_run(run: str | Path, runs_dir: Path) -> Path:
    """A run directory: a path holding ``run.json``, or a run name under ``runs_dir/runs``."""
    for candidate in (Path(run), Path(runs_dir) / "runs" / str(run)):
        if (candidate / "run.json").is_file():
            return candidate
    raise ArtifactError(f"no finished run {str(run)!r} (looked for run.json in {run} and "
                        f"{Path(runs_dir) / 'runs' / str(run)})", where="export")


def _stage_dirs(run_dir: Path) -> dict[str, Path]:
    """The run's own stages (not those of a recipe it refers to): id -> artifact directory."""
    from .report import _artifact_dir

    summary = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    dirs = {}
    for stage in summary.get("stages", []):
        folder = _artifact_dir(run_dir, stage)
        if folder is not None and ":" not in stage.get("id", ":"):
            dirs[stage["id"]] = folder
    return dirs


def _texts(dirs: dict[str, Path], mode: str) -> dict[str, dict[str, Any]]:
    """id -> the select-stage row of ``mode``: source, system, instruction, chosen response, scores."""
    import pyarrow.parquet as pq

    from .artifacts import read_samples, read_selection
    from .chat import conversation_history

    # a CSFT build (teacherless) has no selection: every example, the ground truth, no source
    selection = read_selection(dirs[f"select/{mode}"], scores=True) if f"select/{mode}" in dirs else None
    data = pq.read_table(dirs["data"] / "train.parquet", columns=["id", "system", "instruction", "response", "meta"]).to_pylist()
    samples: dict[str, dict[str, list[str]]] = {}
    rows = {}
    for record in data:
        chosen = selection.get(record["id"]) if selection is not None else None
        if chosen is None and selection is not None:
            continue
        response = record["response"]
        if mode == "inference":  # the source's own answer, the one that won
            if chosen.chosen not in samples:
                folder = dirs.get(f"generate/{chosen.chosen}")
                if folder is None:
                    raise ArtifactError(f"the run has no generate/{chosen.chosen} stage to take the chosen "
                                        "responses from", where="export")
                samples[chosen.chosen] = read_samples(folder / "generations.parquet")
            response = samples[chosen.chosen][record["id"]][chosen.sample]
        system = record["system"] or ""
        messages = ([{"role": "system", "content": system}] if system else []) \
            + [{"role": m["role"], "content": m["content"]} for m in conversation_history(record["meta"])] \
            + [{"role": "user", "content": record["instruction"]}, {"role": "assistant", "content": response}]
        rows[record["id"]] = {"id": record["id"], "mode": mode, "source": chosen.chosen if chosen else "", "system": system,
                              "instruction": record["instruction"], "response": response,
                              "scores": json.dumps((chosen.scores if chosen else None) or {}, sort_keys=True),
                              "messages": messages}
    return rows


def _log_probs(logits: np.ndarray, logz: np.ndarray | None) -> np.ndarray:
    """[n, k] log-probabilities of the top-k: less the log-partition, else normalised over the k."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if logz is not None:
            return logits - logz[:, None]
        top = np.max(logits, axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        norm = top + np.log(np.sum(np.exp(logits - top), axis=1, keepdims=True))
        return logits - norm


def _build_rows(dirs: dict[str, Path], mode: str) -> Iterator[dict[str, Any]]:
    from pyarrow import ipc

    texts = _texts(dirs, mode)
    path = dirs[f"build/{mode}"] / "examples.arrow"
    if not path.is_file():
        raise ArtifactError("the build artifact has no examples.arrow (made by an older profuser: rerun build)",
                            where=str(path.parent))
    with ipc.open_file(str(path)) as reader:
        names = set(reader.schema.names)
        for i in range(reader.num_record_batches):
            for row in reader.get_batch(i).to_pylist():
                text = texts.get(row["id"])
                if text is None:
                    continue
                logits = np.asarray(row["teacher_logits"], dtype=np.float32).reshape(len(row["teacher_logits"]), -1)
                logz = np.asarray(row["teacher_logz"], dtype=np.float32) if "teacher_logz" in names and row.get("teacher_logz") else None
                yield {**text, "input_ids": row["input_ids"], "labels": row["labels"], "teacher_ids": row["teacher_ids"],
                       "teacher_logprobs": _log_probs(logits, logz).tolist(), "teacher_mask": row["teacher_mask"]}


def _features(stage: str):
    from datasets import Features, List, Sequence, Value

    text = {"id": Value("string"), "mode": Value("string"), "source": Value("string"), "system": Value("string"),
            "instruction": Value("string"), "response": Value("string"), "scores": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")})}
    if stage == "select":
        return Features(text)
    return Features({**text, "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "teacher_ids": Sequence(Sequence(Value("int32"))),
                     "teacher_logprobs": Sequence(Sequence(Value("float32"))), "teacher_mask": Sequence(Value("bool"))})


def _rows(run_dir: str, stage: str, modes: list[str]) -> Iterator[dict[str, Any]]:
    dirs = _stage_dirs(Path(run_dir))
    for mode in modes:
        if stage == "select":
            yield from _texts(dirs, mode).values()
        else:
            yield from _build_rows(dirs, mode)


def export_run(run: str | Path, *, stage: str, to: Path, runs_dir: Path = Path("runs"),
               modes: list[str] | None = None) -> dict[str, Any]:
    """Write the dataset to ``to`` (which must not exist or be empty); returns ``{"path", "rows",
    "modes", "columns"}``. ``modes``: default every mode the run selected."""
    if stage not in STAGES:
        raise ProfuserError(f"unknown stage {stage!r}; export takes {' or '.join(STAGES)}", where="--stage")
    run_dir = find_run(run, runs_dir)
    dirs = _stage_dirs(run_dir)
    present = [m for m in MODES if f"{stage}/{m}" in dirs and (f"select/{m}" in dirs or stage == "build")]
    if modes:
        bad = [m for m in modes if m not in present]
        if bad:
            raise ProfuserError(f"the run has no {stage}/{bad[0]} stage (it has: {', '.join(present) or 'none'})",
                                where="--mode")
    modes = list(modes or present)
    if not modes:
        raise ArtifactError(f"the run has no finished {stage} stage (run it at least --until {stage})", where=str(run_dir))
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise ProfuserError("exists and is not an empty folder: choose another --to", where=str(to))
    import datasets  # lm-eval's dependency: always installed

    datasets.disable_progress_bars()
    to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="profuser-export-") as cache:
        dataset = datasets.Dataset.from_generator(
            _rows, features=_features(stage), cache_dir=cache,
            gen_kwargs={"run_dir": str(run_dir.resolve()), "stage": stage, "modes": modes})
        dataset.info.description = (f"profuser export of run {run_dir.name}, stage {stage} ({', '.join(modes)}); "
                                    "columns: profuser/export.py's docstring")
        partial = to.parent / f".{to.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        dataset.save_to_disk(str(partial))
        if to.exists():
            to.rmdir()
        partial.rename(to)  # whole or absent
    return {"path": str(to), "rows": len(dataset), "modes": modes, "columns": list(dataset.column_names)}
