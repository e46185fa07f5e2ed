"""Min-CE (training mode): each reduction on constructed cases, ties, missing sources."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from profuser_plugins.evaluators.min_ce import MinCE
from pydantic import ValidationError

from profuser.components import Candidates, SourceNLL
from profuser.errors import DataError
from profuser.plugins import Engine


def cand(example_id="q1", **nll: tuple[float, int, int]) -> Candidates:
    return Candidates(id=example_id, reference="ref", nll={s: SourceNLL(*v) for s, v in nll.items()})


# the same 100-byte text: "fine" splits it into 50 tokens, "coarse" into 10
SUM_VS_MEAN = cand(fine=(40.0, 50, 100), coarse=(30.0, 10, 100))


def test_registered_as_training_evaluator():
    info = Engine(entrypoints=False).registry.get("evaluators", "min_ce")
    assert info.cls is MinCE and MinCE.mode == "training" and MinCE.needs == frozenset({"nll"})
    assert MinCE().params.reduction == "sum"  # the paper's Eq. (1)


def test_sum_and_mean_disagree():
    """Total NLL (Eq. 1) prefers coarse (30 < 40 nats for the whole text); the per-token mean
    prefers fine (0.8 < 3.0), only because fine spreads its NLL over more tokens."""
    by_sum = MinCE().select([SUM_VS_MEAN])[0]
    assert by_sum.chosen == "coarse" and by_sum.scores == {"fine": 40.0, "coarse": 30.0}
    assert by_sum.detail == {"reduction": "sum"}
    by_mean = MinCE({"reduction": "mean"}).select([SUM_VS_MEAN])[0]
    assert by_mean.chosen == "fine" and by_mean.scores == pytest.approx({"fine": 0.8, "coarse": 3.0})
    assert by_mean.detail == {"reduction": "mean"}


def test_per_byte_follows_covered_bytes():
    """a was truncated (covers 50 bytes), b saw the whole 200 bytes: the sum favours a for having
    read less; per byte, b is better."""
    example = cand(a=(60.0, 20, 50), b=(200.0, 80, 200))
    assert MinCE().select([example])[0].chosen == "a"
    choice = MinCE({"reduction": "per_byte"}).select([example])[0]
    assert choice.chosen == "b" and choice.scores == pytest.approx({"a": 1.2, "b": 1.0})


@pytest.mark.parametrize("reduction", ["sum", "mean", "per_byte"])
def test_tie_goes_to_first_source(reduction):
    example = cand(z=(10.0, 5, 20), a=(10.0, 5, 20), m=(12.0, 5, 20))
    choice = MinCE({"reduction": reduction}).select([example])[0]
    assert choice.chosen == "z" and choice.detail["tied"] == ["z", "a"]


def test_missing_and_empty_sources_are_skipped():
    examples = [cand("q1", a=(5.0, 4, 10)), cand("q2", a=(0.0, 0, 0), b=(9.0, 3, 10)), cand("q3", b=(2.0, 1, 3), a=(3.0, 1, 3))]
    choices = MinCE().select(examples)
    assert [c.chosen for c in choices] == ["a", "b", "b"]
    assert choices[0].scores == {"a": 5.0}
    assert choices[1].scores == {"b": 9.0} and choices[1].detail["skipped"] == ["a"]


def test_no_source_names_the_example():
    with pytest.raises(DataError, match="'q9'"):
        MinCE().select([cand("q1", a=(1.0, 1, 1)), cand("q9")])
    with pytest.raises(DataError, match="'q8'.*empty_src"):
        MinCE().select([cand("q8", empty_src=(0.0, 0, 0))])


def test_non_finite_nll_is_an_error():
    with pytest.raises(DataError, match="'q1'.*'b'"):
        MinCE().select([cand(a=(1.0, 1, 1), b=(float("nan"), 1, 1))])


def test_unknown_reduction_is_rejected():
    with pytest.raises(ValidationError):
        MinCE({"reduction": "median"})


# --- truncation: compare on what every source covered --------------------------------------------

RESPONSE = "é" + "abcdefghi" * 10  # 91 characters, 92 bytes: the first is two bytes


def tokens(ends, per_token):
    """A source's SourceNLL with per-token data: tokens ending at ``ends`` (characters), each
    ``per_token`` nats; it covers the response up to its last end."""
    covered = len(RESPONSE[: ends[-1]].encode("utf-8"))
    return SourceNLL(per_token * len(ends), len(ends), covered, [per_token] * len(ends), list(ends))


def test_a_truncated_source_cannot_win_by_reading_less():
    """``short`` saw only 31 characters (3 tokens, 9 nats); ``long`` read the whole response (10
    tokens, 20 nats). The sum says short (9 < 20) only because it scored less text; on the
    common prefix long has 6 nats over the 32 bytes both covered, short 9."""
    whole = tokens([1 + 10 * i for i in range(1, 10)] + [91], 2.0)
    short = tokens([11, 21, 31], 3.0)
    example = Candidates(id="q", reference=RESPONSE, nll={"short": short, "long": whole})
    for reduction in ("sum", "mean", "per_byte"):
        choice = MinCE({"reduction": reduction}).select([example])[0]
        assert choice.chosen == "long", reduction
        assert choice.scores == pytest.approx({"short": 9 / 32, "long": 6 / 32})
        assert choice.detail == {"reduction": reduction, "truncated": ["short"], "compared": "per_byte", "prefix_chars": 31}


def test_only_tokens_ending_within_the_common_prefix_count():
    # other's second token straddles the prefix end (31): only its first token (16 chars, 17 bytes) counts
    example = Candidates(id="q", reference=RESPONSE, nll={"short": tokens([11, 21, 31], 1.0),
                                                          "other": tokens([16, 40, 91], 1.0)})
    choice = MinCE().select([example])[0]
    assert choice.scores == pytest.approx({"short": 3 / 32, "other": 1 / 17})
    assert choice.chosen == "other"


def test_the_whole_response_is_compared_when_every_source_covered_it():
    # covered bytes equal the response's: the configured sum applies, no truncation recorded
    example = Candidates(id="q", reference=RESPONSE, nll={"a": tokens([50, 91], 4.0), "b": tokens([91], 5.0)})
    choice = MinCE().select([example])[0]
    assert choice.chosen == "b" and choice.scores == {"a": 8.0, "b": 5.0} and choice.detail == {"reduction": "sum"}


def test_the_select_stage_reads_token_nlls_of_truncated_examples_and_counts_them(tmp_path):
    """Two logits stores on the GT: on e1 ``short`` was truncated (its sum is lower, its per-byte
    NLL over the common prefix higher); e0 both read whole. The stage fills the per-token data
    of e1 only and reports one truncated example."""
    from profuser.components import Record
    from profuser.data import write_records
    from profuser.logits_store import LogitsWriter
    from profuser.pipeline import Runtime, Stage, StageContext
    from profuser.plugins import get_engine
    from profuser.stages import select

    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.parquet", [Record("e0", "", "q0", "abcd"), Record("e1", "", "q1", RESPONSE)])
    spans = {  # (source, id) -> (token ends, nll per token, truncated)
        ("short", "e0"): ([2, 4], 1.0, 0), ("long", "e0"): ([4], 3.0, 0),
        ("short", "e1"): ([11, 21, 31], 3.0, 7), ("long", "e1"): ([1 + 10 * i for i in range(1, 10)] + [91], 2.0, 0),
    }
    inputs = {"data": data}
    for source in ("short", "long"):
        with LogitsWriter(tmp_path / source, 2, model=source) as writer:
            for example_id, response in (("e0", "abcd"), ("e1", RESPONSE)):
                ends, per_token, truncated = spans[source, example_id]
                n = len(ends)
                offsets = np.stack([np.array([0, *ends[:-1]]), np.array(ends)], axis=1)
                writer.add(example_id, response, np.arange(n), offsets, np.full(n, per_token), np.tile([0, 1], (n, 1)),
                           np.zeros((n, 2)), np.zeros(n), truncated=truncated)
        inputs[f"logits/{source}"] = tmp_path / source
    out = tmp_path / "select"
    out.mkdir()
    config = {"mode": "training", "evaluator": {"name": "min_ce", "params": {}}, "sources": ["short", "long"], "reward_models": []}
    ctx = StageContext(stage=Stage("select/training", "select", config), inputs=inputs, out=out,
                       runtime=Runtime(progress=False), engine=get_engine())
    metrics = select.run(ctx)
    assert metrics["truncated"] == 1
    table = pq.read_table(out / "selection.parquet").to_pydict()
    assert table["chosen"] == ["short", "long"]  # e0 by the sum (2 < 3); e1 on the common prefix
    assert json.loads(table["detail"][1])["truncated"] == ["short"] and "truncated" not in json.loads(table["detail"][0])
