"""``profuser_heldout``: exact match of the final answer on the data stage's held-out split.

An lm-eval ``generate_until`` task written as a YAML per run (the parquet path is the only thing
that changes). Its docs are the rows of ``heldout.parquet`` that carry ``meta["answer"]`` (the
canonical short answer of the built-in tasks); the prompt is the row's instruction with its system
message through the model's chat template (``profuser.chat.template_for``: its own, else the
fallback the trainer uses); the answer is read from the generation with the data module's rule
(the last ``Answer:`` line, else the last non-empty line), both sides go through
``profuser.data.normalise_answer``, and lm-eval's ``exact_match`` compares them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from ..data import extract_answer as _answer_line
from ..data import normalise_answer
from ..errors import DataError
from .tasks import HELDOUT_TASK, Function

# Generation budget: the longest reference response, with room to spare, within these bounds.
MIN_GEN_TOKS, MAX_GEN_TOKS, GEN_SLACK = 32, 1024, 1.5

# chat: the system message is a system turn; folded: the template has no system role, so it opens
# the user turn (as profuser.chat does); plain: no chat template, a text prefix.
PromptMode = Literal["chat", "folded", "plain"]


def extract_answer(text: str) -> str:
    """The final answer in a generation, normalised: the last ``Answer:`` line, else the last
    non-empty line."""
    answer = _answer_line(text)
    if answer is None:
        lines = [line for line in text.splitlines() if line.strip()]
        answer = lines[-1] if lines else ""
    return normalise_answer(answer)


def extract_answers(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: one extracted answer per generation."""
    return [[extract_answer(r) for r in doc_resps] for doc_resps in resps]


def _answer_of(meta: Any) -> str | None:
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except json.JSONDecodeError:
            return None
    answer = (meta or {}).get("answer") if isinstance(meta, dict) else None
    return None if answer is None or str(answer).strip() == "" else str(answer)


def process_docs(dataset):
    """Keep rows with an answer; add ``answer`` (normalised) and the fields each prompt mode reads."""

    def fields(row: dict) -> dict:
        system = row.get("system") or ""
        return {
            "answer": normalise_answer(_answer_of(row.get("meta")) or ""),
            "system": system,
            "system_text": f"{system}\n\n" if system else "",
            "folded_instruction": f"{system}\n\n{row['instruction']}" if system else row["instruction"],
        }

    dataset = dataset.filter(lambda row: _answer_of(row.get("meta")) is not None)
    return dataset.map(fields)


def check_heldout(path: Path) -> int:
    """Rows of ``path`` that the task can score; raises naming the file when there are none."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError("held-out split not found (the data stage writes heldout.parquet)", where=str(path))
    table = pq.read_table(path)
    missing = {"instruction", "response", "meta"} - set(table.column_names)
    if missing:
        raise DataError(f"held-out table lacks column(s) {', '.join(sorted(missing))}", where=str(path))
    usable = sum(_answer_of(m) is not None for m in table.column("meta").to_pylist())
    if usable == 0:
        raise DataError(f"none of the {table.num_rows} held-out rows has meta.answer (a canonical short answer), "
                        f"so {HELDOUT_TASK} cannot score them", where=str(path))
    return usable


def generation_budget(path: Path, tokenizer, max_length: int | None) -> int:
    """New tokens the task allows: 1.5x the longest scored reference response (a model trained on
    these answers writes about as much; a cut-off loses the final ``Answer:`` line), bounded by
    ``MIN/MAX_GEN_TOKS`` and half the model's context (the prompt needs the rest)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["response", "meta"])
    responses = [r or "" for r, m in zip(table.column("response").to_pylist(), table.column("meta").to_pylist())
                 if _answer_of(m) is not None]
    longest = max((len(ids) for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]), default=0)
    ceiling = min(MAX_GEN_TOKS, max_length // 2) if max_length else MAX_GEN_TOKS
    return max(MIN_GEN_TOKS, min(ceiling, int(GEN_SLACK * longest) + 16))


def heldout_config(path: Path, *, mode: PromptMode, max_gen_toks: int) -> dict[str, Any]:
    """The lm-eval task config. lm-eval puts ``description`` (here: a doc field it reads verbatim)
    in the system turn under a chat template, or before the prompt as text."""
    description, text = {"chat": ("system", "instruction"), "folded": (None, "folded_instruction"),
                         "plain": ("system_text", "instruction")}[mode]
    config = {
        "task": HELDOUT_TASK,
        "dataset_path": "parquet",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
        "output_type": "generate_until",
        "test_split": "test",
        "process_docs": Function("profuser.evaluation.heldout.process_docs"),
        "doc_to_text": text,
        "doc_to_target": "answer",
        # the model's EOS (end of turn under a chat template) is always a stop sequence in HFLM
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_gen_toks},
        "filter_list": [{"name": "answer", "filter": [
            {"function": "custom", "filter_fn": Function("profuser.evaluation.heldout.extract_answers")},
            {"function": "take_first"},
        ]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": False}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    if description:
        config["description"] = description
    return config
