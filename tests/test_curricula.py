"""Curricula: each one yields the phases the paper describes (App. A, App. C, §5.2)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from profuser.components import CurriculumInput, PhasePart
from profuser.errors import ProfuserError
from profuser.plugins import Engine

IDS = ["a", "b", "c", "d", "e", "f"]
LENGTHS = {"a": 50, "b": 10, "c": 30, "d": 10, "e": 90, "f": 70}


@pytest.fixture(scope="module")
def registry():
    return Engine(entrypoints=False).registry


def build(registry, name, **params):
    return registry.build("curricula", name, params)


def data(reward=None):
    return CurriculumInput(ids=list(IDS), gt_length=dict(LENGTHS), target_reward=reward)


def summary(phases):
    """(name, epochs, beta, [(mode, weight, ids)]) per phase."""
    return [(p.name, p.epochs, p.beta, [(x.mode, x.weight, x.ids) for x in p.parts]) for p in phases]


def test_all_seven_are_registered(registry):
    assert {"progressive", "reverse", "simultaneous", "training_only", "sft_only", "length_split", "rm_split"} <= set(
        registry.names("curricula"))


def test_progressive_is_app_a(registry):
    # phase 1: inference mode only, 1 epoch, λ = 0.1; phase 2: w1 = 0.1 (inference), w2 = 1, β = 0.5, 2 epochs
    curriculum = build(registry, "progressive")
    assert curriculum.modes == ("inference", "training")
    assert summary(curriculum.phases(data())) == [
        ("inference", 1.0, 0.1, [("inference", 1.0, None)]),
        ("co-fusion", 2.0, 0.5, [("inference", 0.1, None), ("training", 1.0, None)]),
    ]


def test_reverse_mirrors_progressive(registry):
    assert summary(build(registry, "reverse").phases(data())) == [
        ("training", 1.0, 0.1, [("training", 1.0, None)]),
        ("co-fusion", 2.0, 0.5, [("training", 0.1, None), ("inference", 1.0, None)]),
    ]


def test_simultaneous_fuses_both_modes_throughout_with_a_small_inference_weight(registry):
    # §1: SimulFuse works only "by assigning a very small weight to inference mode": ProFuser's w1/w2
    assert summary(build(registry, "simultaneous").phases(data())) == [
        ("simultaneous", 3.0, 0.5, [("inference", 0.1, None), ("training", 1.0, None)]),
    ]


def test_training_only_and_sft_only_need_only_the_training_build(registry):
    fuse, csft = build(registry, "training_only"), build(registry, "sft_only")
    assert fuse.modes == csft.modes == ("training",)
    assert summary(fuse.phases(data())) == [("training", 3.0, 0.5, [("training", 1.0, None)])]
    assert summary(csft.phases(data())) == [("sft", 3.0, 0.0, [("training", 1.0, None)])]


def test_aliases_name_the_paper_baselines(registry):
    for alias, name in [("profuser", "progressive"), ("simulfuse", "simultaneous"), ("reverse_fuse", "reverse"),
                        ("fuse", "training_only"), ("csft", "sft_only")]:
        assert registry.get("curricula", alias).name == name


def test_params_override_the_paper_defaults(registry):
    phases = build(registry, "progressive", first_epochs=0.5, first_beta=0.2, second_epochs=1, second_beta=1.0,
                   w1=0.3, w2=2.0).phases(data())
    assert summary(phases) == [
        ("inference", 0.5, 0.2, [("inference", 1.0, None)]),
        ("co-fusion", 1.0, 1.0, [("inference", 0.3, None), ("training", 2.0, None)]),
    ]
    assert build(registry, "simultaneous", w1=1.0, epochs=1).phases(data())[0].parts[0] == PhasePart("inference", 1.0)


@pytest.mark.parametrize("name, params", [
    ("progressive", {"lambda": 0.1}),  # unknown field
    ("progressive", {"first_epochs": 0}),
    ("simultaneous", {"w1": -1}),
    ("length_split", {"easy_fraction": 1.0}),
])
def test_bad_params_are_rejected(registry, name, params):
    with pytest.raises(ValidationError):
        build(registry, name, **params)


def test_length_split_runs_each_half_progressively(registry):
    phases = build(registry, "length_split").phases(data())
    easy, hard = ["b", "d", "c"], ["a", "f", "e"]  # by GT length, ties (b, d: 10) by id
    assert summary(phases) == [
        ("easy/inference", 1.0, 0.1, [("inference", 1.0, easy)]),
        ("easy/co-fusion", 2.0, 0.5, [("inference", 0.1, easy), ("training", 1.0, easy)]),
        ("hard/inference", 1.0, 0.1, [("inference", 1.0, hard)]),
        ("hard/co-fusion", 2.0, 0.5, [("inference", 0.1, hard), ("training", 1.0, hard)]),
    ]


def test_rm_split_calls_a_low_target_reward_hard(registry):
    reward = {"a": 0.9, "b": -1.0, "c": 0.5, "d": 2.0, "e": 0.0, "f": 0.5}
    phases = build(registry, "rm_split", easy_fraction=1 / 3).phases(data(reward))
    assert phases[0].parts[0].ids == ["d", "a"]  # the two best-scored answers
    assert phases[2].parts[0].ids == ["c", "f", "e", "b"]  # ties (c, f: 0.5) by id, the worst last
    assert [p.name for p in phases] == ["easy/inference", "easy/co-fusion", "hard/inference", "hard/co-fusion"]


def _selection(path, rows, rm_scores=True):
    """A select/inference selection.parquet as rm_vote writes it: ``rows`` = [(id, {rm: {source: score}})]."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from profuser_plugins.evaluators.rm_vote import RMVote

    from profuser.components import Candidates

    choices = RMVote({"strongest": "strong"}).select([Candidates(id=i, reference="", scores=s) for i, s in rows])
    columns = {"id": [i for i, _ in rows], "chosen": [c.chosen for c in choices],
               "scores": [json.dumps(c.scores) for c in choices], "detail": [json.dumps(c.detail) for c in choices]}
    if rm_scores:  # strongest first, as the select stage writes it
        columns["rm_scores"] = [json.dumps({"strong": s["strong"], "weak": s["weak"]}) for _, s in rows]
    pq.write_table(pa.table(columns), path)
    return choices


# the target "t" against "o": each has one vote everywhere (weak always prefers the other answer
# than strong), so the vote counts say nothing; strong's raw score of t ranks c < a < b
VOTES_TIE = [
    ("a", {"strong": {"t": 0.5, "o": 0.0}, "weak": {"t": 10.0, "o": 11.0}}),
    ("b", {"strong": {"t": 3.0, "o": 4.0}, "weak": {"t": 30.0, "o": 20.0}}),
    ("c", {"strong": {"t": -2.0, "o": -3.0}, "weak": {"t": 50.0, "o": 60.0}}),
    ("d", {"strong": {"t": 1.0, "o": 0.0}, "weak": {"t": 5.0, "o": 6.0}}),
]


@pytest.mark.parametrize("rm_scores_column", [True, False])  # False: a selection written before the column
def test_rm_split_ranks_by_the_strongest_reward_models_score_not_by_votes(registry, tmp_path, rm_scores_column):
    from profuser.stages.train import read_target_reward

    choices = _selection(tmp_path / "selection.parquet", VOTES_TIE, rm_scores=rm_scores_column)
    assert all(c.scores["t"] == 1.0 for c in choices)  # every example: the target got exactly one vote
    reward = read_target_reward(tmp_path / "selection.parquet", "t")
    assert reward["b"] == {"strong": 3.0, "weak": 30.0} and list(reward["b"]) == ["strong", "weak"]
    ids = [i for i, _ in VOTES_TIE]
    curriculum_input = CurriculumInput(ids=ids, gt_length=dict.fromkeys(ids, 1), target_reward=reward)
    phases = build(registry, "rm_split").phases(curriculum_input)
    assert phases[0].parts[0].ids == ["b", "d"] and phases[2].parts[0].ids == ["a", "c"]  # strong: 3, 1 | 0.5, -2
    # by the weak reward model instead: 50, 30 | 10, 5
    phases = build(registry, "rm_split", strongest="weak").phases(curriculum_input)
    assert phases[0].parts[0].ids == ["c", "b"] and phases[2].parts[0].ids == ["a", "d"]


def test_rm_split_mean_z_averages_standardised_scores(registry):
    # strong: a 0, b 10, c 20 (z -1.22, 0, 1.22); weak: a 3, b 1, c 2 on a tiny scale (z 1.22, -1.22, 0)
    # raw sums would follow strong's scale; mean z: a 0, b -0.61, c 0.61 -> c easiest, b hardest
    reward = {"a": {"strong": 0.0, "weak": 3.0}, "b": {"strong": 10.0, "weak": 1.0}, "c": {"strong": 20.0, "weak": 2.0}}
    ids = list(reward)
    curriculum_input = CurriculumInput(ids=ids, gt_length=dict.fromkeys(ids, 1), target_reward=reward)
    phases = build(registry, "rm_split", score="mean_z", easy_fraction=1 / 3).phases(curriculum_input)
    assert phases[0].parts[0].ids == ["c"] and phases[2].parts[0].ids == ["a", "b"]
    assert build(registry, "rm_split").phases(curriculum_input)[0].parts[0].ids == ["c", "b"]  # strong alone: 20, 10


def test_rm_split_names_a_missing_reward_model(registry):
    curriculum_input = CurriculumInput(ids=["a"], gt_length={"a": 1}, target_reward={"a": {"strong": 1.0}})
    with pytest.raises(ProfuserError, match="reward model 'other' has no score for example 'a' \\(reward models: strong\\)"):
        build(registry, "rm_split", strongest="other").phases(curriculum_input)
    with pytest.raises(ValidationError):
        build(registry, "rm_split", score="votes")


def test_rm_split_without_rewards_says_what_is_missing(registry):
    with pytest.raises(ProfuserError, match="rm_split.*reward"):
        build(registry, "rm_split").phases(data(None))
    with pytest.raises(ProfuserError, match="rm_split: no target reward for 1 of 6"):
        build(registry, "rm_split").phases(data({i: 1.0 for i in IDS[:-1]}))


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), st.integers(1, 100), min_size=1, max_size=30),
       st.floats(0.05, 0.95))
def test_length_split_partitions_by_length(registry, lengths, fraction):
    ids = sorted(lengths)
    phases = build(registry, "length_split", easy_fraction=fraction).phases(CurriculumInput(ids=ids, gt_length=lengths))
    easy, hard = phases[0].parts[0].ids, phases[2].parts[0].ids
    assert sorted(easy + hard) == ids and len(easy) == round(len(ids) * fraction)
    if easy and hard:
        assert max(lengths[i] for i in easy) <= min(lengths[i] for i in hard)
    # every example gets 1 inference-only epoch and 2 co-fusion epochs, as under progressive
    assert [p.epochs for p in phases] == [1.0, 2.0, 1.0, 2.0]


@pytest.mark.parametrize("curriculum, fields", [
    ("progressive", "curriculum.params.first_beta, curriculum.params.second_beta"),
    ("simultaneous", "curriculum.params.beta"),
    ("csft", "curriculum.params.beta"),
    ("rm_split", "curriculum.params.first_beta, curriculum.params.second_beta"),
])
def test_a_loss_beta_that_the_curriculum_overrides_is_refused(tmp_path, curriculum, fields, registry):
    """Every built-in curriculum sets β per phase, so ``loss.params.beta`` would do nothing."""
    from profuser.errors import RecipeError
    from profuser.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"name: r\ntarget: {{ref: builtin:x}}\nsources: [{{ref: builtin:x}}]\ndata: {{source: builtin_tasks}}\n"
                    f"curriculum: {curriculum}\nloss: {{name: fuse_kl, params: {{beta: 0.3, temperature: 2.0}}}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, registry=registry)
    lines = err.value.lines()
    assert len(lines) == 1 and "loss.params.beta" in lines[0] and fields in lines[0], lines
    assert load_recipe(path, ["loss.params={temperature: 2.0}"], registry=registry).loss.params == {"temperature": 2.0}


def test_rm_split_without_the_target_among_the_sources_is_refused_at_validation(tmp_path, registry):
    """rm_split ranks by the target's own reward scores, which exist only when the target answers
    as a source: refused in one line before anything runs, not at the train stage."""
    from profuser.errors import RecipeError
    from profuser.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntarget: {ref: builtin:x}\nsources: [{ref: builtin:y}]\n"
                    "data: {source: builtin_tasks}\ncurriculum: rm_split\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, registry=registry)
    lines = err.value.lines()
    assert len(lines) == 1 and "curriculum.name" in lines[0] and "among the sources" in lines[0], lines
    assert load_recipe(path, ["sources=[{ref: builtin:y}, {ref: builtin:x}]"], registry=registry).curriculum.name == "rm_split"


def test_the_five_study_recipes_plan_the_same_optimizer_steps(tmp_path):
    """Table 1's variants (recipes/study/) at 3 epochs: co-fusion steps over instructions, so the
    step count no longer depends on how many modes a phase mixes (issue 25); the per-mode
    scheduling (draws: examples) would give ProFuser 20 steps and SimulFuse 24 against 12."""
    from pathlib import Path

    from profuser.estimate import estimate_plan
    from profuser.pipeline import Runner, Runtime
    from profuser.plugins import get_engine
    from profuser.recipe import load_recipe

    study = Path(__file__).resolve().parent.parent / "recipes" / "study"
    engine = get_engine()

    def steps(name, overrides=()):
        recipe = load_recipe(study / f"{name}.yaml", list(overrides), registry=engine.registry)
        plan = estimate_plan(Runner(recipe, engine, Runtime(runs_dir=tmp_path, progress=False)))
        [train] = [s for s in plan["stages"] if s["kind"] == "train"]
        return train["optimizer_steps"]

    counts = {name: steps(name) for name in ("base", "simulfuse", "reversefuse", "fuse", "csft")}
    assert counts == dict.fromkeys(counts, 12)  # 32 instructions x 3 epochs / 8
    assert steps("base", ["curriculum={name: progressive, params: {draws: examples}}"]) == 20
    assert steps("simulfuse", ["curriculum={name: simultaneous, params: {draws: examples}}"]) == 24
