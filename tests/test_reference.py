"""reference: 0.25·BLEU + 0.25·ROUGE-L + 0.5·BERTScore against the GT, checked by hand."""

import math

import pytest
from profuser_plugins.evaluators.reference import ReferenceScore

from profuser.components import Candidates
from profuser.errors import ProfuserError

REF = "the cat sat on the mat"


def test_bleu_by_hand():
    ev = ReferenceScore()
    # every n-gram order matches, hypothesis longer (no brevity penalty): (6/7·5/6·4/5·3/4)^(1/4)
    assert ev.bleu("the cat sat on the mat today", REF) == pytest.approx((3 / 7) ** 0.25, abs=1e-9)
    # short hypothesis: precisions 1, brevity penalty exp(1 - 6/3); no 4-grams (effective order 3)
    assert ev.bleu("the cat sat", REF) == pytest.approx(math.exp(-1), abs=1e-9)
    # 4/6, 2/5, 1/4 and no 4-gram match (0 of 3): sacrebleu's "exp" smoothing makes it 1/(2·3)
    assert ev.bleu("the dog ran on the mat", REF) == pytest.approx((4 / 6 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=1e-9)
    assert ev.bleu(REF, REF) == pytest.approx(1.0)


def test_rouge_l_f_by_hand():
    ev = ReferenceScore()
    assert ev.rouge("the cat sat on the mat today", REF) == pytest.approx(12 / 13)  # P 6/7, R 1
    assert ev.rouge("the cat sat", REF) == pytest.approx(2 / 3)  # P 1, R 1/2
    assert ev.rouge("the dog ran on the mat", REF) == pytest.approx(2 / 3)  # LCS the·on·the·mat = 4 of 6


def test_selection_without_bertscore_uses_the_weighted_sum():
    ev = ReferenceScore({"bertscore_weight": 0.0, "bleu_weight": 0.5, "rouge_weight": 0.5})
    ex = Candidates(id="x", reference=REF, responses={"short": "the cat sat", "long": "the cat sat on the mat today"})
    [choice] = ev.select([ex])
    assert choice.chosen == "long"
    assert choice.scores["long"] == pytest.approx(0.5 * (3 / 7) ** 0.25 + 0.5 * 12 / 13)
    assert choice.scores["short"] == pytest.approx(0.5 * math.exp(-1) + 0.5 * 2 / 3)
    assert choice.detail["rouge_type"] == "rougeL"
    assert choice.detail["bleu"]["short"] == pytest.approx(math.exp(-1))


def test_paper_weights_with_the_packaged_minilm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ev = ReferenceScore()
    examples = [
        Candidates(id="1", reference=REF, responses={"a": REF, "b": "stock prices fell sharply", "c": ""}),
        Candidates(id="2", reference="Paris is the capital of France.",
                   responses={"a": "I like turtles.", "b": "The capital of France is Paris.", "c": "Paris."}),
    ]
    choices = ev.select(examples)
    assert [c.chosen for c in choices] == ["a", "b"]
    first = choices[0]
    assert first.detail["bertscore"]["a"] == pytest.approx(1.0, abs=1e-5)  # identical text
    assert first.scores["a"] == pytest.approx(1.0, abs=1e-5)
    assert first.scores["c"] == 0.0  # an empty answer scores 0 on every part
    for source, total in choices[1].scores.items():
        d = choices[1].detail
        assert total == pytest.approx(0.25 * d["bleu"][source] + 0.25 * d["rouge"][source] + 0.5 * d["bertscore"][source])
    bert = choices[1].detail["bertscore"]
    assert bert["b"] > bert["a"]  # semantics: a paraphrase beats an unrelated sentence


def test_empty_reference_is_an_error_naming_the_example():
    with pytest.raises(ProfuserError) as err:
        ReferenceScore({"bertscore_weight": 0}).select([Candidates(id="q7", reference=" ", responses={"a": "x"})])
    assert err.value.where == "example q7"
