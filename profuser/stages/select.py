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
per prompt the file is exactly as before."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from ..components import Candidates, SourceNLL
from ..data import read_records
from ..errors import ProfuserError
from .generate import read_samples

VERSION = "2"  # 2: rm_scores column; Min-CE compares truncated responses on the common prefix


def run(ctx) -> dict:
    cfg = ctx.config
    evaluator = ctx.build("evaluators", cfg["evaluator"])
    sources: list[str] = cfg["sources"]
    records = read_records(ctx.inputs["data"] / "train.parquet")
    candidates = {r.id: Candidates(id=r.id, reference=r.response, system=r.system, instruction=r.instruction,
                                   meta=dict(r.meta)) for r in records}

    if "nll" in evaluator.needs:
        for source in sources:
            for example_id, nll in _nll_table(ctx.inputs[f"logits/{source}"]).items():
                if example_id in candidates:
                    candidates[example_id].nll[source] = nll
        _add_token_nll(ctx, sources, candidates)
    multi = False  # some source has n > 1 samples per prompt
    if "responses" in evaluator.needs or "scores" in evaluator.needs:
        for source in sources:
            for example_id, samples in read_samples(ctx.inputs[f"generate/{source}"] / "generations.parquet").items():
                if example_id in candidates:
                    candidates[example_id].responses[source] = samples[0]
                    candidates[example_id].samples[source] = samples
                    multi |= len(samples) > 1
    if "scores" in evaluator.needs:
        for rm in cfg["reward_models"]:
            path = ctx.inputs[f"score/{rm}"] / "scores.parquet"
            listed = "sample_scores" in pq.read_schema(path).names
            table = pq.read_table(path, columns=["id", "source", "score", *(["sample_scores"] if listed else [])])
            per_sample = table["sample_scores"].to_pylist() if listed else [[x] for x in table["score"].to_pylist()]
            for example_id, source, score, each in zip(*(table[c].to_pylist() for c in ("id", "source", "score")),
                                                        per_sample):
                if example_id in candidates:
                    candidates[example_id].scores.setdefault(rm, {})[source] = score
                    candidates[example_id].sample_scores.setdefault(rm, {})[source] = each

    examples = list(candidates.values())
    choices = evaluator.select(examples)
    if len(choices) != len(examples):
        raise ProfuserError(f"returned {len(choices)} choices for {len(examples)} examples", where=f"evaluator {cfg['evaluator']['name']}")
    for e, c in zip(examples, choices):
        count = len(e.samples.get(c.chosen) or [None])
        if not isinstance(c.sample, int) or not 0 <= c.sample < count:
            raise ProfuserError(f"example {e.id!r}: chose sample {c.sample!r} of source {c.chosen!r}, which has {count}",
                                where=f"evaluator {cfg['evaluator']['name']}")
    columns = {
        "id": [e.id for e in examples],
        "chosen": [c.chosen for c in choices],
        "scores": [json.dumps(c.scores) for c in choices],
        "detail": [json.dumps(c.detail, default=str) for c in choices],
    }
    if multi:
        columns["sample"] = pa.array([c.sample for c in choices], pa.int32())
    if "scores" in evaluator.needs and cfg["reward_models"]:
        strongest = getattr(evaluator.params, "strongest", None)
        order = [strongest] if strongest in cfg["reward_models"] else []
        order += [rm for rm in cfg["reward_models"] if rm not in order]
        columns["rm_scores"] = [json.dumps({rm: e.scores[rm] for rm in order if rm in e.scores}) for e in examples]
    pq.write_table(pa.table(columns), ctx.out / "selection.parquet")
    wins = Counter(c.chosen for c in choices)
    metrics = {"examples": len(examples), "win_share": {s: wins.get(s, 0) / max(len(examples), 1) for s in sources}}
    if "nll" in evaluator.needs:  # examples compared on a common prefix because a source was truncated
        metrics["truncated"] = sum(1 for c in choices if c.detail.get("truncated"))
    return metrics


def _add_token_nll(ctx, sources: list[str], candidates: dict[str, Candidates]) -> None:
    """Per-token NLLs and token ends of every source, for the examples some source's tokens cover
    only partly (few: only those are read from the stores)."""
    from ..logits_store import LogitsReader

    partial = [e for e in candidates.values()
               if any(n.n_bytes < len(e.reference.encode("utf-8")) for n in e.nll.values())]
    if not partial:
        return
    for source in sources:
        reader = LogitsReader(ctx.inputs[f"logits/{source}"])
        for example in partial:
            nll = example.nll.get(source)
            if nll is None or example.id not in reader:
                continue
            stored = reader.get(example.id)
            nll.token_nll = stored.nll.astype(float).tolist()
            nll.token_ends = stored.offsets[:, 1].astype(int).tolist()


def _nll_table(path) -> dict[str, SourceNLL]:
    from ..logits_store import LogitsReader

    return LogitsReader(path).nll_table()
