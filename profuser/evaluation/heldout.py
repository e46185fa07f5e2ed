"""The tasks over the data stage's held-out split: ``profuser_heldout`` (exact match of the final
answer) and ``profuser_heldout_bpb`` (bits per byte of the reference responses).

``profuser_heldout``: exact match of the final answer on the data stage's held-out split.

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
import math
from pathlib import Path
from typing import Any, Literal

from ..data import extract_answer as _answer_line
from ..data import normalise_answer
from ..errors import DataError
from .tasks import HELDOUT_BPB_TASK, HELDOUT_TASK, Function

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


# --- profuser_heldout_bpb ---------------------------------------------------------------------------
#
# Bits per UTF-8 byte of each held-out reference response given its prompt, in the chat format the
# trainer uses (profuser.chat: the tokenizer's template, else the fallback; BOS once): the
# log-likelihood of the response and everything the template puts after it (end of turn), as
# lm-eval's ``loglikelihood`` of a continuation, divided by the response's bytes and ln 2. Bytes,
# not tokens, so models with different tokenizers are comparable. Lower is better. A multi-turn
# conversation is scored on every labelled assistant turn, each given the whole conversation
# before it: one doc per turn (id ``<id>/turn<j>`` for the j-th earlier one, ``<id>`` for the last).

BPB_FILE = "heldout_bpb.parquet"


def bpb_docs(path: Path, tokenizer, template: str, out_dir: Path) -> Path:
    """Write the model's docs for the bpb task to ``out_dir/BPB_FILE``: per held-out row with a
    response, ``context`` (the conversation up to the response), ``continuation`` (the response and
    the end of turn) and ``n_bytes`` (UTF-8 bytes of the response)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the trainer's own split of a conversation into prompt / labelled turns
    from ..chat import _response_span, _trained, _turn_spans, conversation_history

    table = pq.read_table(path)
    missing = {"id", "instruction", "response"} - set(table.column_names)
    if missing:
        raise DataError(f"held-out table lacks column(s) {', '.join(sorted(missing))}", where=str(path))
    rows = {"id": [], "context": [], "continuation": [], "n_bytes": []}
    systems = table.column("system").to_pylist() if "system" in table.column_names else [""] * table.num_rows
    metas = table.column("meta").to_pylist() if "meta" in table.column_names else [None] * table.num_rows
    for rid, system, instruction, response, meta in zip(table.column("id").to_pylist(), systems,
                                                        table.column("instruction").to_pylist(),
                                                        table.column("response").to_pylist(), metas):
        if not response:
            continue
        history = conversation_history(meta)
        earlier = _trained(history)
        if not earlier:  # a single turn (or earlier turns as context only)
            text, start, _, _ = _response_span(tokenizer, template, system or "", instruction, response, history)
            rows["id"].append(str(rid))
            rows["context"].append(text[:start])
            rows["continuation"].append(text[start:])
            rows["n_bytes"].append(len(response.encode("utf-8")))
            continue
        text, spans = _turn_spans(tokenizer, template, system or "", instruction, response, history)
        contents = [history[i]["content"] for i in earlier] + [response]
        for j, ((start, _, _, stop), content) in enumerate(zip(spans, contents)):
            if not content:
                continue
            rows["id"].append(_turn_id(rid, j, len(spans)))
            rows["context"].append(text[:start])
            rows["continuation"].append(text[start:stop])
            rows["n_bytes"].append(len(content.encode("utf-8")))
    if not rows["id"]:
        raise DataError(f"none of the {table.num_rows} held-out rows has a response, so {HELDOUT_BPB_TASK} "
                        "cannot score them", where=str(path))
    out = Path(out_dir) / BPB_FILE
    pq.write_table(pa.table(rows), out)
    return out


def _turn_id(rid, j: int, n: int) -> str:
    """The bpb doc id of a conversation's j-th labelled assistant turn of n (the last: the id)."""
    return str(rid) if j == n - 1 else f"{rid}/turn{j + 1}"


def _bpb_ids(rid, response, meta) -> list[str]:
    """The bpb doc ids of one held-out row, in ``bpb_docs``' order."""
    if not response:
        return []
    from ..chat import _trained, conversation_history

    history = conversation_history(meta)
    earlier = _trained(history)
    n = len(earlier) + 1
    return [_turn_id(rid, j, n) for j, i in enumerate(earlier) if history[i]["content"]] + [str(rid)]


def bpb_results(doc: dict, results: list) -> dict[str, float]:
    """lm-eval ``process_results``: the example's bits per byte from its log-likelihood."""
    loglikelihood = results[0][0] if isinstance(results[0], (list, tuple)) else results[0]
    return {"bpb": -float(loglikelihood) / (doc["n_bytes"] * math.log(2))}


def bpb_config(docs: Path) -> dict[str, Any]:
    """The lm-eval task config over ``bpb_docs``' file. The context is already chat-formatted: run
    without lm-eval's chat template. The task's score is the mean of the examples' bits per byte."""
    return {
        "task": HELDOUT_BPB_TASK,
        "dataset_path": "parquet",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(Path(docs).resolve())}},
        "output_type": "loglikelihood",
        "test_split": "test",
        "doc_to_text": "context",
        "doc_to_target": "continuation",
        # lm-eval puts target_delimiter (default " ") between context and continuation
        "target_delimiter": "",
        "process_results": Function("profuser.evaluation.heldout.bpb_results"),
        "metric_list": [{"metric": "bpb", "aggregation": "mean", "higher_is_better": False}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }


def heldout_ids(path: Path, task: str) -> list[str]:
    """The example ids of a held-out task's docs, in lm-eval's doc_id order (per-example values are
    keyed by id, so that runs on different models pair up)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    ids = [str(i) for i in table.column("id").to_pylist()]
    if task == HELDOUT_TASK:
        return [i for i, m in zip(ids, table.column("meta").to_pylist()) if _answer_of(m) is not None]
    if task == HELDOUT_BPB_TASK:
        metas = table.column("meta").to_pylist() if "meta" in table.column_names else [None] * table.num_rows
        return [d for i, r, m in zip(ids, table.column("response").to_pylist(), metas) for d in _bpb_ids(i, r, m)]
    raise ValueError(f"{task} is not a held-out task")
