"""The select stage streams: the evaluator sees CHUNK_EXAMPLES examples per call (or all of them
when it declares ``whole_set``), each with exactly its own candidates, and selection.parquet is
one row per example in data order, the same whatever the chunking."""

from __future__ import annotations

import json
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profuser import hookimpl
from profuser.components import AdvantageEvaluator, Choice, Record
from profuser.data import write_records
from profuser.logits_store import LogitsWriter
from profuser.plugins import Engine
from profuser.stages import Ref, select

IDS = [f"x{i}" for i in range(5)]
CALLS: list[list] = []


class Probe(AdvantageEvaluator):
    """Chooses, per example, the source with the highest first reward-model score (inference) or
    the lowest NLL sum (training); records what each call saw."""

    name = "probe"
    mode = "inference"
    needs = frozenset({"scores"})

    def select(self, examples):
        CALLS.append(list(examples))
        choices = []
        for e in examples:
            if e.nll:
                value = {s: -n.nll_sum for s, n in e.nll.items()}
            else:
                value = next(iter(e.scores.values()))
            best = max(value, key=value.get)
            choices.append(Choice(chosen=best, scores=value, detail={"reference": e.reference}))
        return choices


class WholeProbe(Probe):
    name = "whole_probe"
    whole_set = True


def _module():
    module = types.ModuleType("probes")

    def profuser_register_evaluators(register):
        register(Probe)
        register(WholeProbe)

    module.profuser_register_evaluators = hookimpl(profuser_register_evaluators)
    return module


@pytest.fixture
def stage(tmp_path):
    engine = Engine(entrypoints=False, extra_plugins=[("probes", _module())])
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.parquet", [Record(i, "", f"say {i}", f"ref {i}", {"k": n}) for n, i in enumerate(IDS)])
    inputs = {"data": data}
    for s, order in (("a", IDS), ("b", IDS[::-1])):  # b's generations in another order than the data's
        gen = tmp_path / f"gen-{s}"
        gen.mkdir()
        pq.write_table(pa.table({"id": order, "response": [f"{s} on {i}" for i in order]}), gen / "generations.parquet")
        inputs[f"generate/{s}"] = gen
        logits = tmp_path / f"logits-{s}"
        with LogitsWriter(logits, 2, model=s) as writer:
            for n, i in enumerate(order):
                nll = [0.4 + n if s == "a" else 2.5]
                writer.add(i, f"ref {i}", [1], [[0, len(f"ref {i}")]], nll, [[1, 2]], [[1.0, 0.0]], [1.5])
        inputs[f"logits/{s}"] = logits
    scored = tmp_path / "score"
    scored.mkdir()
    rows = [(i, s, float(n) if s == "a" else 2.0) for n, i in enumerate(IDS) for s in ("a", "b")][::-1]
    pq.write_table(pa.table({"id": [r[0] for r in rows], "source": [r[1] for r in rows], "score": [r[2] for r in rows]}),
                   scored / "scores.parquet")
    inputs["score/rm"] = scored

    def run(evaluator: str, mode: str, name: str) -> pa.Table:
        CALLS.clear()
        out = tmp_path / name
        out.mkdir()
        config = select.Config(mode=mode, evaluator=Ref(name=evaluator), sources=["a", "b"],
                               reward_models=["rm"] if mode == "inference" else [])
        ctx = types.SimpleNamespace(config=config, inputs=inputs, out=out,
                                    build=lambda kind, ref: engine.registry.build(kind, ref.name, ref.params))
        select.run(ctx)
        return pq.read_table(out / "selection.parquet")

    return run


def test_the_evaluator_gets_chunks_and_each_example_its_own_candidates(stage, monkeypatch):
    whole = stage("whole_probe", "inference", "whole")
    assert [len(c) for c in CALLS] == [5]
    monkeypatch.setattr(select, "CHUNK_EXAMPLES", 2)
    chunked = stage("probe", "inference", "chunked")
    assert [[e.id for e in call] for call in CALLS] == [IDS[:2], IDS[2:4], IDS[4:]]
    for n, e in enumerate(e for call in CALLS for e in call):
        assert e.responses == {"a": f"a on {e.id}", "b": f"b on {e.id}"} and e.samples["b"] == [f"b on {e.id}"]
        assert e.scores == {"rm": {"b": 2.0, "a": float(n)}} and e.meta == {"k": n} and e.reference == f"ref {e.id}"
    assert chunked.equals(whole)
    assert chunked["id"].to_pylist() == IDS
    assert chunked["chosen"].to_pylist() == ["b", "b", "b", "a", "a"]  # a's score n beats b's 2.0 from x3 on
    assert json.loads(chunked["rm_scores"][0].as_py()) == {"rm": {"b": 2.0, "a": 0.0}}


def test_training_mode_reads_each_chunks_nll(stage, monkeypatch):
    Probe.mode, Probe.needs = "training", frozenset({"nll"})
    WholeProbe.mode, WholeProbe.needs = "training", frozenset({"nll"})
    try:
        whole = stage("whole_probe", "training", "whole")
        monkeypatch.setattr(select, "CHUNK_EXAMPLES", 3)
        chunked = stage("probe", "training", "chunked")
        assert [len(c) for c in CALLS] == [3, 2]
        assert {e.id: e.nll["a"].nll_sum for call in CALLS for e in call} == pytest.approx({i: 0.4 + n for n, i in enumerate(IDS)})
    finally:
        Probe.mode, Probe.needs = "inference", frozenset({"scores"})
        WholeProbe.mode, WholeProbe.needs = "inference", frozenset({"scores"})
    assert chunked.equals(whole) and chunked["chosen"].to_pylist() == ["a", "a", "a", "b", "b"]
