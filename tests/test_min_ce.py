"""Min-CE (training mode): each reduction on constructed cases, ties, missing sources."""

from __future__ import annotations

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
