"""rm_vote: one vote per reward model, most votes win, ties go to the strongest RM's score."""

import pytest
from profuser_plugins.evaluators.rm_vote import RMVote

from profuser.components import Candidates
from profuser.errors import ProfuserError
from profuser.plugins import Engine


def example(scores, sources=("a", "b", "c")):
    return Candidates(id="ex1", reference="gt", responses={s: f"answer of {s}" for s in sources}, scores=scores)


def test_majority_wins_even_against_larger_raw_scores():
    # rm2 likes b by a huge margin, but a has two votes: raw scores are never added
    scores = {"rm1": {"a": 0.2, "b": 0.1, "c": 0.0}, "rm2": {"a": -50.0, "b": 100.0, "c": -60.0},
              "rm3": {"a": 3.0, "b": 2.0, "c": 1.0}}
    [choice] = RMVote().select([example(scores)])
    assert choice.chosen == "a"
    assert choice.scores == {"a": 2.0, "b": 1.0, "c": 0.0}
    assert choice.detail["voted"] == {"rm1": ["a"], "rm2": ["b"], "rm3": ["a"]}
    assert choice.detail["tie"] is False and choice.detail["tie_break_by"] is None
    assert choice.detail["rm_scores"] == scores


def test_vote_tie_goes_to_the_strongest_reward_model():
    scores = {"rm1": {"a": 1.0, "b": 0.0, "c": -1.0}, "rm2": {"a": 0.0, "b": 5.0, "c": 1.0}}
    # default strongest: the first listed (rm1) -> a; naming rm2 -> b
    [by_first] = RMVote().select([example(scores)])
    [by_rm2] = RMVote({"strongest": "rm2"}).select([example(scores)])
    assert (by_first.chosen, by_rm2.chosen) == ("a", "b")
    assert by_first.detail["tie"] and by_first.detail["tie_break_by"] == "rm1"
    assert by_rm2.detail["tie_break_by"] == "rm2"
    assert by_rm2.scores == {"a": 1.0, "b": 1.0, "c": 0.0}


def test_tie_break_only_among_the_tied_sources():
    # three RMs, three different winners; the strongest (rm3) ranks c first, so c wins among a, b, c
    scores = {"rm1": {"a": 9.0, "b": 1.0, "c": 2.0}, "rm2": {"a": 1.0, "b": 9.0, "c": 2.0},
              "rm3": {"a": 1.0, "b": 2.0, "c": 9.0}}
    [choice] = RMVote({"strongest": "rm3"}).select([example(scores)])
    assert choice.chosen == "c"
    # five RMs: votes a=2, b=2, c=1 -> a/b tie; the strongest (s) likes c best, but c is not
    # tied, so only its a-vs-b preference counts
    scores = {"rm1": {"a": 9.0, "b": 1.0, "c": 0.0}, "rm2": {"a": 9.0, "b": 1.0, "c": 0.0},
              "rm3": {"a": 0.0, "b": 9.0, "c": 0.0}, "rm4": {"a": 0.0, "b": 9.0, "c": 0.0},
              "s": {"a": 0.1, "b": 0.2, "c": 0.3}}
    [choice] = RMVote({"strongest": "s"}).select([example(scores)])
    assert choice.scores == {"a": 2.0, "b": 2.0, "c": 1.0}
    assert choice.chosen == "b" and choice.detail["tie_break_by"] == "s"


def test_equal_top_scores_split_a_vote():
    # rm1 cannot separate a and b (identical answers): half a vote each; rm2 decides
    scores = {"rm1": {"a": 1.0, "b": 1.0, "c": 0.0}, "rm2": {"a": 0.0, "b": 1.0, "c": 0.5}}
    [choice] = RMVote().select([example(scores)])
    assert choice.scores == {"a": 0.5, "b": 1.5, "c": 0.0}
    assert choice.chosen == "b" and not choice.detail["tie"]


def test_strongest_also_tied_falls_back_to_next_rm_then_source_order():
    scores = {"rm1": {"a": 1.0, "b": 1.0}, "rm2": {"a": 1.0, "b": 1.0}}
    [choice] = RMVote().select([example(scores, sources=("a", "b"))])
    assert choice.chosen == "a" and choice.detail["tie"] and choice.detail["tie_break_by"] is None


def test_single_reward_model_is_its_argmax():
    [choice] = RMVote().select([example({"only": {"a": -3.0, "b": -1.0, "c": -2.0}})])
    assert choice.chosen == "b"


def test_errors_name_the_example_and_reward_model():
    with pytest.raises(ProfuserError, match="'rm2' has no score for source"):
        RMVote().select([example({"rm1": {"a": 1.0, "b": 0.0, "c": 0.0}, "rm2": {"a": 1.0}})])
    with pytest.raises(ProfuserError, match="strongest reward model 'nope'") as err:
        RMVote({"strongest": "nope"}).select([example({"rm1": {"a": 1.0, "b": 0.0, "c": 0.0}})])
    assert err.value.where == "example ex1"
    with pytest.raises(ProfuserError, match="non-finite"):
        RMVote().select([example({"rm1": {"a": float("nan"), "b": 0.0, "c": 0.0}})])


def test_registered_as_an_inference_mode_evaluator():
    info = Engine(entrypoints=False).registry.get("evaluators", "rm_vote")
    assert info.cls is RMVote and info.cls.mode == "inference" and info.cls.needs == {"scores"}


def test_select_stage_votes_over_score_artifacts(tmp_path):
    """scores.parquet of two reward models -> select/inference with rm_vote -> Figure 1a shares."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from profuser.analysis import advantage_shares
    from profuser.components import Record
    from profuser.data import write_records
    from profuser.pipeline import Runtime, Stage, StageContext
    from profuser.plugins import get_engine
    from profuser.stages import select

    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.parquet", [Record(f"e{i}", "", f"q{i}", "gt") for i in range(3)])
    inputs = {"data": data}
    for source in ("a", "b"):
        gen = tmp_path / f"gen-{source}"
        gen.mkdir()
        pq.write_table(pa.table({"id": ["e0", "e1", "e2"], "response": [f"{source}{i}" for i in range(3)]}),
                       gen / "generations.parquet")
        inputs[f"generate/{source}"] = gen
    # e0: both prefer a; e1: split vote, the strongest (rm2) prefers b; e2: both prefer b
    scores = {"rm1": {"a": [1.0, 1.0, 0.0], "b": [0.0, 0.0, 1.0]}, "rm2": {"a": [5.0, -1.0, -3.0], "b": [4.0, 2.0, 9.0]}}
    for rm, per_source in scores.items():
        out = tmp_path / f"score-{rm}"
        out.mkdir()
        pq.write_table(pa.table({"id": ["e0", "e1", "e2"] * 2, "source": ["a"] * 3 + ["b"] * 3,
                                 "score": per_source["a"] + per_source["b"]}), out / "scores.parquet")
        inputs[f"score/{rm}"] = out
    config = {"mode": "inference", "evaluator": {"name": "rm_vote", "params": {"strongest": "rm2"}},
              "sources": ["a", "b"], "reward_models": ["rm1", "rm2"]}
    out = tmp_path / "select"
    out.mkdir()
    ctx = StageContext(stage=Stage("select/inference", "select", config), inputs=inputs, out=out,
                       runtime=Runtime(progress=False), engine=get_engine())
    metrics = select.run(ctx)
    table = pq.read_table(out / "selection.parquet")
    assert table["chosen"].to_pylist() == ["a", "b", "b"]
    assert metrics["ties"] == 1  # e1: a tie in votes, broken by the strongest
    detail = json.loads(table["detail"].to_pylist()[1])
    assert detail["tie"] and detail["tie_break_by"] == "rm2"
    # the raw scores, the strongest reward model first: what rm_split ranks by (scores are votes)
    rm_scores = [json.loads(v) for v in table["rm_scores"].to_pylist()]
    assert [list(r) for r in rm_scores] == [["rm2", "rm1"]] * 3
    assert rm_scores[1] == {"rm2": {"a": -1.0, "b": 2.0}, "rm1": {"a": 1.0, "b": 0.0}}
    assert json.loads(table["scores"].to_pylist()[1]) == {"a": 1.0, "b": 1.0}
    from profuser.stages.train import read_target_reward

    assert read_target_reward(out / "selection.parquet", "a") == {
        "e0": {"rm2": 5.0, "rm1": 1.0}, "e1": {"rm2": -1.0, "rm1": 1.0}, "e2": {"rm2": -3.0, "rm1": 0.0}}
    assert advantage_shares({"inference": out}) == {"inference": {"a": 1 / 3, "b": 2 / 3}}
