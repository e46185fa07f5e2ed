"""The ``select/<mode>`` stage: gather each example's candidates and let the advantage evaluator
pick the advantaged source (training mode: Min-CE over teacher-forced NLLs; inference mode: the
reward-model vote over generations, or reference scoring).

``selection.parquet``: id, chosen, scores (the evaluator's own scale: votes for ``rm_vote``),
detail, and, where reward models scored the candidates, ``rm_scores``: every reward model's raw
score per source, ``{rm: {source: score}}``, the evaluator's ``strongest`` reward model first
(then the recipe's order) — what ``rm_split`` ranks by. Where a source's NLL covers only part of
a response (truncated to its context), every source's per-token NLLs of that example are read
too, so Min-CE can compare on what all of them covered.

Every ``Candidates`` carries the example's ``meta`` (dataset metadata). Where the generator drew
n > 1 samples per prompt, ``samples`` and ``sample_scores`` hold them all (``responses`` and
``scores``: sample 0) and ``selection.parquet`` gets a ``sample`` column: which of the chosen
source's samples won (the inference-mode logits stage teacher-forces that one). With one sample
per prompt the file is exactly as before.

Memory does not grow with the data (beyond compact per-example columns: the NLL and score tables
as Arrow, ~100 bytes per example and source): the data file and the generations (in data order)
are streamed, and the evaluator's ``select`` is called on ``CHUNK_EXAMPLES`` examples at a time,
each chunk's ``Candidates`` built with only what its ``needs`` ask for; an evaluator that declares
``whole_set = True`` gets every example in one call instead."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..artifacts import iter_chunks, iter_records
from ..components import Candidates, Mode, SourceNLL
from ..errors import ProfuserError
from . import Ref, StageConfig

VERSION = "2"  # 2: rm_scores column; Min-CE compares truncated responses on the common prefix
CHUNK_EXAMPLES = 1024  # examples per evaluator call (unless it declares whole_set)
RECORD_FIELDS = ["id", "system", "instruction", "response", "meta"]
DATA = "data"  # input role: the data stage


def logits_role(source: str) -> str:
    """The input role of one source's logits store (training mode: its NLLs)."""
    return f"logits/{source}"


def generations_role(source: str) -> str:
    """The input role of one source's generate stage (inference mode: its responses)."""
    return f"generate/{source}"


def scores_role(reward_model: str) -> str:
    """The input role of one reward model's score stage."""
    return f"score/{reward_model}"


class Config(StageConfig):
    mode: Mode
    evaluator: Ref
    sources: list[str]  # source keys, in the recipe's order (the candidates)
    reward_models: list[str]  # reward model keys whose scores it reads ([] unless the evaluator needs scores)


def run(ctx) -> dict:
    cfg = ctx.config
    name = cfg.evaluator.name
    evaluator = ctx.build("evaluators", cfg.evaluator)
    sources = cfg.sources
    needs = evaluator.needs
    nll = {s: _nll_table(ctx.inputs[logits_role(s)]) for s in sources} if "nll" in needs else {}
    readers: dict = {}  # source -> LogitsReader, opened for the first truncated example
    generations = ({s: _Generations(ctx.inputs[generations_role(s)] / "generations.parquet") for s in sources}
                   if "responses" in needs or "scores" in needs else {})
    multi = any(g.multi for g in generations.values())  # n > 1 samples per prompt: a sample column
    scores = {}
    if "scores" in needs:
        for rm in cfg.reward_models:
            path = ctx.inputs[scores_role(rm)] / "scores.parquet"
            listed = "sample_scores" in pq.read_schema(path).names
            scores[rm] = pq.read_table(path, columns=["id", "source", "score", *(["sample_scores"] if listed else [])])
    order: list[str] = []  # rm_scores: the strongest reward model first, then the recipe's order
    if "scores" in needs and cfg.reward_models:
        strongest = getattr(evaluator.params, "strongest", None)
        order = [strongest] if strongest in cfg.reward_models else []
        order += [rm for rm in cfg.reward_models if rm not in order]

    fields = [("id", pa.string()), ("chosen", pa.string()), ("scores", pa.string()), ("detail", pa.string())]
    fields += [("sample", pa.int32())] if multi else []
    fields += [("rm_scores", pa.string())] if order else []
    schema = pa.schema(fields)
    wins: Counter = Counter()
    examples = truncated = ties = 0
    voted = False  # the evaluator records vote ties (rm_vote's detail.tie)
    chunk_size = sys.maxsize if getattr(evaluator, "whole_set", False) else CHUNK_EXAMPLES
    records = iter_records(ctx.inputs[DATA] / "train.parquet", RECORD_FIELDS)
    from tqdm.auto import tqdm  # progress on stderr, only on a terminal: --json stays clean

    progress = getattr(getattr(ctx, "runtime", None), "progress", False)  # a bare test context has no runtime
    records = tqdm(records, unit="ex", desc="select", disable=(not progress) or None, mininterval=1.0)
    with pq.ParquetWriter(ctx.out / "selection.parquet", schema) as sink:
        for chunk in iter_chunks(records, chunk_size):
            candidates = {r["id"]: Candidates(id=r["id"], reference=r["response"], system=r["system"] or "",
                                              instruction=r["instruction"], meta=json.loads(r["meta"]) if r["meta"] else {})
                          for r in chunk}
            for source, table in nll.items():
                for row in _rows_of(table, candidates):
                    candidates[row["id"]].nll[source] = SourceNLL(nll_sum=row["nll_sum"], n_tokens=row["n_tokens"],
                                                                  n_bytes=row["n_bytes"])
            if nll:
                _add_token_nll(ctx, sources, candidates, readers)
            for source, follower in generations.items():
                for example_id, candidate in candidates.items():
                    samples = follower.get(example_id)
                    if samples is not None:
                        candidate.responses[source] = samples[0]
                        candidate.samples[source] = samples
            for rm, table in scores.items():
                for row in _rows_of(table, candidates):
                    candidate = candidates[row["id"]]
                    candidate.scores.setdefault(rm, {})[row["source"]] = row["score"]
                    candidate.sample_scores.setdefault(rm, {})[row["source"]] = row.get("sample_scores", [row["score"]])
            batch = list(candidates.values())
            choices = evaluator.select(batch)
            if len(choices) != len(batch):
                raise ProfuserError(f"returned {len(choices)} choices for {len(batch)} examples", where=f"evaluator {name}")
            for e, c in zip(batch, choices):
                count = len(e.samples.get(c.chosen) or [None])
                if not isinstance(c.sample, int) or not 0 <= c.sample < count:
                    raise ProfuserError(f"example {e.id!r}: chose sample {c.sample!r} of source {c.chosen!r}, which has "
                                        f"{count}", where=f"evaluator {name}")
            columns = {
                "id": [e.id for e in batch],
                "chosen": [c.chosen for c in choices],
                "scores": [json.dumps(c.scores) for c in choices],
                "detail": [json.dumps(c.detail, default=str) for c in choices],
            }
            if multi:
                columns["sample"] = [c.sample for c in choices]
            if order:
                columns["rm_scores"] = [json.dumps({rm: e.scores[rm] for rm in order if rm in e.scores}) for e in batch]
            sink.write_table(pa.table(columns, schema=schema))
            examples += len(batch)
            wins.update(c.chosen for c in choices)
            truncated += sum(1 for c in choices if c.detail.get("truncated"))
            ties += sum(1 for c in choices if c.detail.get("tie"))
            voted = voted or any("tie" in c.detail for c in choices)
    metrics = {"examples": examples, "win_share": {s: wins.get(s, 0) / max(examples, 1) for s in sources}}
    if "nll" in needs:  # examples compared on a common prefix because a source was truncated
        metrics["truncated"] = truncated
    if voted:  # selections a tie in votes decided (with two reward models: every disagreement)
        metrics["ties"] = ties
    return metrics


def _rows_of(table: pa.Table, candidates: dict) -> list[dict]:
    """The rows of ``table`` whose id is one of ``candidates``' (in the table's order)."""
    return table.filter(pc.is_in(table["id"], value_set=pa.array(list(candidates), pa.string()))).to_pylist()


class _Generations:
    """One source's ``generations.parquet`` read forward alongside the data (the generate stage
    writes one row per record in data order); ``get(id)`` -> every sample of that example, or None.
    A file in another order is held whole from the first row out of place on."""

    def __init__(self, path):
        self.multi = "responses" in pq.read_schema(path).names
        self._column = "responses" if self.multi else "response"
        self._rows = iter_records(path, ["id", self._column])
        self._pending = next(self._rows, None)
        self._rest: dict[str, list[str]] | None = None

    def _samples(self, row: dict) -> list[str]:
        return row[self._column] if self.multi else [row[self._column]]

    def get(self, example_id: str) -> list[str] | None:
        if self._rest is None:
            if self._pending is not None and self._pending["id"] == example_id:
                row, self._pending = self._pending, next(self._rows, None)
                return self._samples(row)
            self._rest = {row["id"]: self._samples(row) for row in ([self._pending] if self._pending else [])}
            self._rest.update((row["id"], self._samples(row)) for row in self._rows)
        return self._rest.pop(example_id, None)


def _add_token_nll(ctx, sources: list[str], candidates: dict[str, Candidates], readers: dict) -> None:
    """Per-token NLLs and token ends of every source, for the examples some source's tokens cover
    only partly (few: only those are read from the stores)."""
    from ..chat import conversation_history, labelled_text
    from ..logits_store import LogitsReader

    # a conversation's stored NLLs cover every labelled assistant turn (chat.labelled_text)
    partial = [e for e in candidates.values()
               if any(n.n_bytes < len(labelled_text(e.reference, conversation_history(e.meta)).encode("utf-8"))
                      for n in e.nll.values())]
    if not partial:
        return
    for source in sources:
        if source not in readers:
            readers[source] = LogitsReader(ctx.inputs[logits_role(source)])
        reader = readers[source]
        for example in partial:
            nll = example.nll.get(source)
            if nll is None or example.id not in reader:
                continue
            stored = reader.get(example.id)
            nll.token_nll = stored.nll.astype(float).tolist()
            nll.token_ends = stored.offsets[:, 1].astype(int).tolist()


def _nll_table(path) -> pa.Table:
    from ..logits_store import LogitsReader

    return LogitsReader(path).nll_arrow()
