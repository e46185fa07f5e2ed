"""embedding: cosine similarity of a sentence-transformers embedding to the GT (§5.1's semantic
criterion), on the packaged all-MiniLM-L6-v2 (offline, seconds on a CPU)."""

import sys

import pytest
from profuser_plugins.evaluators.embedding import EmbeddingSimilarity

from profuser.components import Candidates
from profuser.errors import ProfuserError
from profuser.plugins import Engine

REF = "The capital of France is Paris."


@pytest.fixture(scope="module")
def evaluator():
    return EmbeddingSimilarity()


def test_registered_with_its_params():
    registry = Engine(entrypoints=False).registry
    ev = registry.build("evaluators", "embedding", {"batch_size": 8})
    assert isinstance(ev, EmbeddingSimilarity) and ev.params.batch_size == 8 and ev.params.model is None
    assert ev.mode == "inference" and ev.needs == {"responses"}
    with pytest.raises(ValueError, match="batch_size"):  # pydantic's; a recipe reports it as one line
        registry.build("evaluators", "embedding", {"batch_size": 0})


def test_similarities_are_cosines(evaluator):
    same, para, other, empty = evaluator.similarities(
        [REF, "Paris is the French capital.", "Photosynthesis turns light into chemical energy.", "  "], [REF] * 4)
    assert same == pytest.approx(1.0, abs=1e-5)  # unit vectors: a text is its own nearest
    assert 1.0 > para > other and -1.0 <= other < 0.5
    assert empty == 0.0  # never embedded


def test_meaning_wins_over_words(evaluator):
    # the lexical near-copy says the opposite; the paraphrase shares few words but the meaning
    ex = Candidates(id="q1", reference=REF, responses={
        "lexical": "The capital of France is not Paris, it is a cat.",
        "unrelated": "I like to eat green apples in the morning.",
        "paraphrase": "Paris is the capital city of France."})
    [choice] = evaluator.select([ex])
    assert choice.chosen == "paraphrase" and choice.sample == 0 and choice.detail == {}
    assert set(choice.scores) == {"lexical", "unrelated", "paraphrase"}
    assert choice.scores["unrelated"] < choice.scores["lexical"] < choice.scores["paraphrase"]


def test_best_of_n_and_ties(evaluator):
    ex = Candidates(id="q2", reference=REF,
                    responses={"a": "bananas are yellow", "b": "Paris is in France."},
                    samples={"a": ["bananas are yellow", REF], "b": ["Paris is in France.", "bananas are yellow"]})
    [choice] = evaluator.select([ex])
    assert choice.chosen == "a" and choice.sample == 1 and choice.detail == {"sample": {"a": 1, "b": 0}}
    assert choice.scores["a"] == pytest.approx(1.0, abs=1e-5)
    tie = Candidates(id="q3", reference=REF, responses={"x": "Paris.", "y": "Paris."})
    assert evaluator.select([tie])[0].chosen == "x"  # equal scores: the first listed source


def test_bad_examples_name_the_example(evaluator):
    with pytest.raises(ProfuserError, match="reference") as err:
        evaluator.select([Candidates(id="q9", reference=" ", responses={"a": "x"})])
    assert err.value.where == "example q9"
    with pytest.raises(ProfuserError, match="no source responses"):
        evaluator.select([Candidates(id="q8", reference=REF)])


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    with pytest.raises(ProfuserError) as err:
        EmbeddingSimilarity().similarities(["a"], ["b"])
    assert "pip install 'profuser[reference]'" in err.value.message and "\n" not in err.value.message
    assert err.value.where == "evaluators.embedding"


def test_unloadable_model_is_one_line(tmp_path):
    ev = EmbeddingSimilarity(EmbeddingSimilarity.Params(model=str(tmp_path / "nowhere")))
    with pytest.raises(ProfuserError, match="cannot load the sentence-transformers model") as err:
        ev.similarities(["a"], ["b"])
    assert err.value.where == "evaluators.embedding.params.model"
