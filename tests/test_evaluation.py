"""lm-eval integration offline: local-data overrides of lm-eval's own tasks, the held-out task, the
evaluate stage. Generation is scripted (the tiny models are random) so that scores are known."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from profuser.errors import DataError, ProfuserError
from profuser.evaluation import DEFAULT_SHOTS, PAPER_TASKS, evaluate_model, extract_answer, primary_metric
from profuser.evaluation.tasks import lm_eval_tasks_dir, local_data_config, write_task_yaml


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def script(model, tokenizer, reply):
    """Make ``model.generate`` answer ``reply(prompt)`` (then EOS), the way HF's generate returns
    it: prompt ids followed by the new ids, right-padded to one width."""

    def generate(input_ids, attention_mask=None, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask if attention_mask is not None else torch.ones_like(input_ids)):
            prompt = tokenizer.decode(ids[mask.bool()])
            new = tokenizer(reply(prompt), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(ids.tolist() + new)
        width = max(map(len, rows))
        return torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])

    model.generate = generate
    return model


def heldout_parquet(path: Path) -> Path:
    rows = [
        ("a", "You are a helpful assistant.", "What is 2+2?", "2+2=4.\nAnswer: 4", {"answer": "4", "task": "arithmetic"}),
        ("b", "", "What is the capital of France?", "Answer: Paris", {"answer": "Paris", "task": "capitals"}),
        ("c", "", "Write a poem.", "Roses are red.", {}),  # no short answer: not scored
    ]
    table = pa.table({
        "id": [r[0] for r in rows], "system": [r[1] for r in rows], "instruction": [r[2] for r in rows],
        "response": [r[3] for r in rows], "meta": [json.dumps(r[4]) for r in rows],
    })
    pq.write_table(table, path)
    return path


def heldout_reply(prompt: str) -> str:
    # right on the arithmetic question, wrong on the capital (its last line is the answer read)
    return "Two and two make four.\n**Answer:** 4." if "2+2" in prompt else "I think it is\nLyon"


# --- answer extraction and task catalogue ---------------------------------------------------------


@pytest.mark.parametrize("text, answer", [
    ("Step one.\nAnswer: 42", "42"),
    ("Answer: 1\nthen more\nAnswer: Paris.", "paris"),
    ("**Answer:** 3.5", "3.5"),
    ("No marker here\n\nthe last line  \n", "the last line"),
    ("", ""),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_paper_defaults():
    assert PAPER_TASKS == ("mmlu", "hellaswag", "arc_challenge", "winogrande", "gsm8k", "truthfulqa_mc2")
    assert {t: DEFAULT_SHOTS[t] for t in PAPER_TASKS} == {
        "mmlu": 5, "hellaswag": 10, "arc_challenge": 25, "winogrande": 5, "gsm8k": 5, "truthfulqa_mc2": 0}
    assert primary_metric("arc_challenge", {"acc,none": 0.1, "acc_norm,none": 0.2}) == "acc_norm,none"
    assert primary_metric("some_task", {"alias": "x", "f1_stderr,none": 0.1, "f1,none": 0.3}) == "f1,none"


# --- local data -----------------------------------------------------------------------------------


def gsm8k_rows(n: int) -> list[dict]:
    return [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_local_data_config_splits(tmp_path):
    stock = lm_eval_tasks_dir() / "gsm8k" / "gsm8k.yaml"
    test = write_jsonl(tmp_path / "gsm8k" / "test.jsonl", gsm8k_rows(3))
    # no train split: the shots come from the test split itself (lm-eval then skips the asked question)
    config = local_data_config("gsm8k", stock, tmp_path, num_fewshot=5)
    assert config["include"] == str(stock) and config["dataset_path"] == "json" and config["dataset_name"] is None
    assert config["dataset_kwargs"] == {"data_files": {"test": str(test.resolve())}}
    assert (config["test_split"], config["fewshot_split"], config["training_split"]) == ("test", "test", None)
    # with a train file the stock fewshot split is kept
    train = write_jsonl(tmp_path / "gsm8k" / "train.jsonl", gsm8k_rows(2))
    config = local_data_config("gsm8k", stock, tmp_path, num_fewshot=5)
    assert config["dataset_kwargs"]["data_files"] == {"test": str(test.resolve()), "train": str(train.resolve())}
    assert config["fewshot_split"] == "train"
    # nothing for the task: None (the stock definition runs); only a train file: an error naming the folder
    assert local_data_config("gsm8k", stock, tmp_path / "elsewhere", num_fewshot=5) is None
    test.unlink()
    with pytest.raises(ProfuserError, match="evaluation split 'test' of gsm8k") as err:
        local_data_config("gsm8k", stock, tmp_path, num_fewshot=5)
    assert err.value.where == str(tmp_path / "gsm8k")


def test_truthfulqa_file_alias(tmp_path):
    stock = lm_eval_tasks_dir() / "truthfulqa" / "truthfulqa_mc2.yaml"
    file = write_jsonl(tmp_path / "truthfulqa" / "mc_task.jsonl", [{"question": "q"}])
    config = local_data_config("truthfulqa_mc2", stock, tmp_path, num_fewshot=0)
    assert config["dataset_kwargs"]["data_files"] == {"validation": str(file.resolve())}
    assert (config["test_split"], config["validation_split"]) == ("validation", None)


def test_group_cannot_take_local_data(tmp_path):
    group = tmp_path / "group.yaml"
    group.write_text("group: g\ntask: [a, b]\n")
    write_jsonl(tmp_path / "g" / "test.jsonl", [{"x": 1}])
    with pytest.raises(ProfuserError, match="group of tasks"):
        local_data_config("g", group, tmp_path, num_fewshot=0)


def test_gsm8k_and_truthfulqa_on_local_files(tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    write_jsonl(data / "gsm8k" / "test.jsonl", gsm8k_rows(4))
    lines = [
        {"question": "What colour is the sky on a clear day?",
         "mc1_targets": {"choices": ["Blue.", "Green."], "labels": [1, 0]},
         "mc2_targets": {"choices": ["Blue.", "It is blue.", "Green."], "labels": [1, 1, 0]}},
        {"question": "How many legs does a cat have?",
         "mc1_targets": {"choices": ["Four.", "Three."], "labels": [1, 0]},
         "mc2_targets": {"choices": ["Four.", "Three."], "labels": [1, 0]}},
    ]
    write_jsonl(data / "truthfulqa" / "mc_task.jsonl", lines)
    model, tok = load(tiny_llama_dir)

    def reply(prompt: str) -> str:  # right for even numbers, wrong for odd ones
        i = int(re.findall(r"What is (\d+) plus", prompt)[-1])
        return f"{i} + {i} = {2 * i}\n#### {2 * i if i % 2 == 0 else 999}"

    script(model, tok, reply)
    out = evaluate_model(model, tok, ["gsm8k", "truthfulqa_mc2"], limit=4, num_fewshot={"gsm8k": 1}, data_dir=data,
                         batch_size=2, log_samples=True)

    assert out["gsm8k"]["exact_match,strict-match"] == 0.5
    assert out["_primary"]["gsm8k"] == out["gsm8k"]["exact_match,flexible-extract"] == 0.5
    config = out["_config"]["gsm8k"]
    assert config["num_fewshot"] == 1 and config["samples"] == 4 and config["chat_template"] is True
    assert config["data"] == str((data / "gsm8k" / "test.jsonl").resolve())
    for sample in [s for s in out["_samples"]["gsm8k"] if s["filter"] == "strict-match"]:
        asked = re.findall(r"What is (\d+) plus", sample["prompt"])
        assert len(asked) == 2 and asked[0] != asked[1]  # one shot, never the question itself
        assert sample["prompt"].startswith("<|im_start|>user\n")  # the instruct model's chat format

    mc2 = out["_primary"]["truthfulqa_mc2"]
    assert 0.0 < mc2 < 1.0 and out["_config"]["truthfulqa_mc2"]["primary_metric"] == "acc,none"
    assert out["_config"]["truthfulqa_mc2"]["chat_template"] is False  # log-likelihood: leaderboard prompts
    prompts = [s["prompt"] for s in out["_samples"]["truthfulqa_mc2"]]
    assert any("What colour is the sky" in p for p in prompts) and any("How many legs" in p for p in prompts)


# --- the held-out task ----------------------------------------------------------------------------


def test_heldout_chatml(tmp_path, tiny_llama_dir):
    model, tok = load(tiny_llama_dir)
    script(model, tok, heldout_reply)
    out = evaluate_model(model, tok, ["profuser_heldout"], heldout_path=heldout_parquet(tmp_path / "heldout.parquet"),
                         log_samples=True)
    assert out["_primary"]["profuser_heldout"] == out["profuser_heldout"]["exact_match,answer"] == 0.5
    config = out["_config"]["profuser_heldout"]
    assert config["samples"] == 2  # the row without meta.answer is not scored
    assert config["max_gen_toks"] == 32 and config["chat_template"] is True
    first, second = sorted(out["_samples"]["profuser_heldout"], key=lambda s: s["doc_id"])
    assert first["prompt"] == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert (first["answer"], first["target"], first["metrics"]) == ("4", "4", {"exact_match": 1.0})
    assert (second["answer"], second["target"], second["metrics"]) == ("lyon", "paris", {"exact_match": 0.0})


def test_heldout_base_model_uses_fallback_template(tmp_path, tiny_gemma_dir):
    model, tok = load(tiny_gemma_dir)
    assert not tok.chat_template
    script(model, tok, lambda prompt: "Answer: 4" if "2+2" in prompt else "Answer: paris")
    out = evaluate_model(model, tok, ["profuser_heldout"], heldout_path=heldout_parquet(tmp_path / "heldout.parquet"),
                         log_samples=True)
    assert out["_primary"]["profuser_heldout"] == 1.0
    prompt = min(out["_samples"]["profuser_heldout"], key=lambda s: s["doc_id"])["prompt"]
    # the trainer's fallback layout (profuser.chat), system paragraph first
    assert prompt.endswith("You are a helpful assistant.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n")


def test_generation_budget(tmp_path):
    from profuser.evaluation.heldout import MIN_GEN_TOKS, generation_budget
    from profuser.testing import tiny_tokenizer

    tok = tiny_tokenizer("llama")
    path = heldout_parquet(tmp_path / "heldout.parquet")
    assert generation_budget(path, tok, 512) == MIN_GEN_TOKS  # short references
    long_answer = "Let us work through it step by step. " * 20 + "\nAnswer: 4"
    pq.write_table(pa.table({"id": ["a", "b"], "system": ["", ""], "instruction": ["q", "r"],
                             "response": [long_answer, "x " * 500], "meta": [json.dumps({"answer": "4"}), "{}"]}), path)
    n = len(tok(long_answer, add_special_tokens=False)["input_ids"])
    assert generation_budget(path, tok, 4096) == int(1.5 * n) + 16  # the unscored row does not count
    assert generation_budget(path, tok, 100) == 50  # half the context at most


def test_heldout_errors_name_the_file(tmp_path, tiny_llama_dir):
    model, tok = load(tiny_llama_dir)
    with pytest.raises(ProfuserError, match="needs the held-out split"):
        evaluate_model(model, tok, ["profuser_heldout"])
    missing = tmp_path / "nope.parquet"
    with pytest.raises(DataError) as err:
        evaluate_model(model, tok, ["profuser_heldout"], heldout_path=missing)
    assert err.value.where == str(missing)
    empty = tmp_path / "no_answers.parquet"
    pq.write_table(pa.table({"id": ["x"], "system": [""], "instruction": ["hi"], "response": ["hello"], "meta": ["{}"]}), empty)
    with pytest.raises(DataError, match="none of the 1 held-out rows has meta.answer") as err:
        evaluate_model(model, tok, ["profuser_heldout"], heldout_path=empty)
    assert err.value.where == str(empty)


def test_bad_requests(tmp_path, tiny_llama_dir):
    model, tok = load(tiny_llama_dir)
    with pytest.raises(ProfuserError, match="num_fewshot names task"):
        evaluate_model(model, tok, ["gsm8k"], num_fewshot={"hellaswag": 3})
    with pytest.raises(ProfuserError, match="no tasks"):
        evaluate_model(model, tok, [])


def test_unknown_task_suggests(tmp_path):
    from lm_eval.tasks import TaskManager

    from profuser.evaluation.harness import _load

    write_task_yaml(tmp_path, "gsm8k", {"include": str(lm_eval_tasks_dir() / "gsm8k" / "gsm8k.yaml"), "task": "gsm8k"})
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(ProfuserError, match="unknown lm-eval task 'gsm8kk'; did you mean gsm8k"):
        _load(manager, "gsm8kk")


# --- the stage ------------------------------------------------------------------------------------


def test_evaluate_stage(tmp_path, tiny_llama_dir, monkeypatch):
    import profuser.stages.evaluate as stage
    from profuser.models import load_model

    def scripted_load(spec, **kwargs):
        model, tok = load_model(spec, **kwargs)
        return script(model, tok, heldout_reply), tok

    monkeypatch.setattr(stage, "load_model", scripted_load)
    data = tmp_path / "data"
    data.mkdir()
    heldout_parquet(data / "heldout.parquet")
    train = tmp_path / "train"
    shutil.copytree(tiny_llama_dir, train / "model")
    evaluation = {"tasks": ["profuser_heldout"], "limit": None, "num_fewshot": {}, "data_dir": None, "batch_size": 2}
    out = tmp_path / "out"
    out.mkdir()
    ctx = SimpleNamespace(
        config=stage.Config.model_validate({"model": None, "label": "fused", "evaluate": evaluation}),
        inputs={"model": train, "data": data}, out=out, stage=SimpleNamespace(id="evaluate/fused"),
        runtime=SimpleNamespace(torch_device=lambda: "cpu", cache_dir=None), engine=None,
    )
    metrics = stage.run(ctx)
    assert metrics == {"profuser_heldout": 0.5, "average": 0.5}
    results = json.loads((out / "results.json").read_text())
    assert results["label"] == "fused" and results["model"] == str(train / "model")
    assert results["primary"] == {"profuser_heldout": 0.5} and results["average"] == 0.5
    assert results["tasks"]["profuser_heldout"]["exact_match,answer"] == 0.5
    samples = [json.loads(line) for line in (out / "samples" / "profuser_heldout.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {s["target"] for s in samples} == {"4", "paris"}
    # per example, keyed by the held-out row id: what compare pairs across models
    per_example = pq.read_table(out / "per_example.parquet").to_pylist()
    assert sorted((r["task"], r["id"], r["value"]) for r in per_example) == [
        ("profuser_heldout", "a", 1.0), ("profuser_heldout", "b", 0.0)]

    # the fused model's train artifact must hold model/
    shutil.rmtree(train / "model")
    with pytest.raises(ProfuserError, match="no model/ folder"):
        stage.run(ctx)


# --- bits per byte --------------------------------------------------------------------------------


def _direct_bpb(model, tok, system, instruction, response):
    """Bits per byte straight from the model: the trainer's encoding (profuser.chat), labels scored."""
    from profuser.chat import encode_chat

    enc = encode_chat(tok, system, instruction, response, max_length=4096)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    nll = -logp[torch.arange(len(targets)), targets][enc.response_start - 1:].sum().item()
    return nll / (len(response.encode("utf-8")) * math.log(2))


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_heldout_bpb_matches_the_trainers_encoding(tmp_path, tiny_llama_dir, tiny_gemma_dir, which):
    model, tok = load(tiny_llama_dir if which == "llama" else tiny_gemma_dir)
    path = heldout_parquet(tmp_path / "heldout.parquet")
    out = evaluate_model(model, tok, ["profuser_heldout_bpb"], heldout_path=path, log_samples=True)
    samples = sorted(out["_samples"]["profuser_heldout_bpb"], key=lambda s: s["doc_id"])
    assert len(samples) == 3  # every row with a response, also those without a short answer
    rows = pq.read_table(path).to_pylist()
    direct = [_direct_bpb(model, tok, r["system"], r["instruction"], r["response"]) for r in rows]
    got = [s["metrics"]["bpb"] for s in samples]
    # the response and end of turn as the trainer scores them, plus the prompt's trailing newline
    # (lm-eval moves a context's trailing whitespace into the continuation and splits the tokens at
    # the boundary its own way): within about one token of the trainer's figure
    for g, d, r in zip(got, direct, rows):
        extra_nats = (g - d) * len(r["response"].encode("utf-8")) * math.log(2)
        assert abs(extra_nats) < 3 * math.log(len(tok))
    assert out["_primary"]["profuser_heldout_bpb"] == pytest.approx(sum(got) / 3)
    assert out["_config"]["profuser_heldout_bpb"]["chat_template"] is False  # formatted by profuser.chat
    from profuser.evaluation.heldout import heldout_ids

    assert heldout_ids(path, "profuser_heldout_bpb") == ["a", "b", "c"]
    assert heldout_ids(path, "profuser_heldout") == ["a", "b"]


def test_a_limit_per_task(tmp_path, tiny_llama_dir):
    """evaluate.limit: {task: N} caps those tasks only (the study scores bpb on every held-out row
    and exact match on fewer, since generation costs most)."""
    model, tok = load(tiny_llama_dir)
    path = heldout_parquet(tmp_path / "heldout.parquet")
    out = evaluate_model(model, tok, ["profuser_heldout_bpb", "profuser_heldout"], heldout_path=path,
                         limit={"profuser_heldout": 1}, log_samples=True, max_gen_toks=4)
    assert len(out["_samples"]["profuser_heldout"]) == 1 and len(out["_samples"]["profuser_heldout_bpb"]) == 3
    assert out["_config"]["profuser_heldout"]["limit"] == 1 and out["_config"]["profuser_heldout_bpb"]["limit"] is None


# --- judged win rate (any dataset: no meta.answer) ------------------------------------------------


def test_winrate_stage_with_the_real_generator_and_judge(tmp_path, tiny_llama_dir, tiny_gemma_dir):
    """The judge/<reference> stage answers and judges once; each evaluate stage's
    profuser_heldout_winrate reads it, with the hf generator and the judge reward model on tiny
    random models: one outcome per held-out prompt (meta.answer not needed), in {0, 1/2, 1},
    whose mean is the score; the reference against itself ties everywhere, generating nothing."""
    import profuser.stages.evaluate as stage
    import profuser.stages.judge as judge_stage
    from profuser.pipeline import Stage
    from profuser.plugins import Engine
    from profuser.runtime import Runtime
    from profuser.stages import StageContext

    engine = Engine(entrypoints=False)
    data = tmp_path / "data"
    data.mkdir()
    heldout_parquet(data / "heldout.parquet")
    judge = {"reward_model": {"name": "judge", "params": {"model": str(tiny_llama_dir)}},
             "generator": {"name": "hf", "params": {"do_sample": False, "max_new_tokens": 4}},
             "reference": {"ref": str(tiny_llama_dir), "label": "target"}}
    evaluation = {"tasks": ["profuser_heldout_winrate"], "judge": judge}
    runtime = Runtime(progress=False, device="cpu", cache_dir=tmp_path / "cache", engine=engine)
    answers = tmp_path / "judge"
    answers.mkdir()
    config = judge_stage.Config.model_validate({"model": {"ref": str(tiny_llama_dir)}, "generator": judge["generator"],
                                                "reward_model": judge["reward_model"], "limit": None})
    judge_stage.run(StageContext(stage=Stage("judge/target", "judge", config, {"data": "data"}),
                                 inputs={"data": data}, out=answers, runtime=runtime, engine=engine))
    reference = pq.read_table(answers / "answers.parquet").to_pylist()
    assert [r["id"] for r in reference] == ["a", "b", "c"]
    results = {}
    for label, model in (("gemma", tiny_gemma_dir), ("target", tiny_llama_dir)):
        out = tmp_path / label
        out.mkdir()
        config = stage.Config.model_validate({"model": {"ref": str(model)}, "label": label, "evaluate": evaluation})
        ctx = StageContext(stage=Stage(f"evaluate/{label}", "evaluate", config, {"data": "data", "judge": "judge/target"}),
                           inputs={"data": data, "judge": answers}, out=out, runtime=runtime, engine=engine)
        metrics = stage.run(ctx)
        rows = pq.read_table(out / "per_example.parquet").to_pylist()
        assert sorted(r["id"] for r in rows) == ["a", "b", "c"]  # "c" has no meta.answer and counts
        values = [r["value"] for r in rows]
        assert set(values) <= {0.0, 0.5, 1.0}
        assert metrics["profuser_heldout_winrate"] == pytest.approx(sum(values) / 3)
        saved = json.loads((out / "results.json").read_text())
        assert saved["config"]["profuser_heldout_winrate"]["judge"] == "judge"
        samples = [json.loads(line) for line in (out / "samples" / "profuser_heldout_winrate.jsonl").read_text().splitlines()]
        assert [s["reference_response"] for s in samples] == [r["response"] for r in reference]
        assert [s["reference_score"] for s in samples] == [r["score"] for r in reference]
        results[label] = values
    assert results["target"] == [0.5, 0.5, 0.5]


def test_winrate_outcomes_are_wins_ties_and_losses():
    from profuser.components import Prompt
    from profuser.evaluation.judged import answer_and_score, judged_winrate
    from profuser.recipe import ModelSpec

    prompts = [Prompt(str(i), "", f"q{i}") for i in range(5)]
    answers = {"mine": ["long answer", "x", "same", "long answer", "twin"],
               "ref": ["x", "long answer", "same", "yy", "twin"]}

    class Generator:
        def generate(self, model, prompts, *, seed):
            return answers[model.ref]

    class Judge:  # longer is better, and the reference's "twin" is scored a little off, as a padded batch may
        def score(self, items):
            return [len(item.response) + (0.001 if item.response == "twin" and Judge.calls else 0) for item in items]
        calls = 0

    mine = answer_and_score(ModelSpec(ref="mine"), prompts, generator=Generator(), judge=Judge())
    Judge.calls = 1
    theirs = answer_and_score(ModelSpec(ref="ref"), prompts, generator=Generator(), judge=Judge())
    result = judged_winrate(prompts, mine, theirs)
    assert result["values"] == [1.0, 0.0, 0.5, 1.0, 0.5]  # the same answer ties whatever its two scores
    assert result["metrics"]["winrate,none"] == pytest.approx(3 / 5)
    assert (result["metrics"]["wins,none"], result["metrics"]["ties,none"], result["metrics"]["losses,none"]) == (2, 2, 1)


def test_validate_says_which_task_needs_which_field(tmp_path, registry):
    from profuser.errors import RecipeError
    from profuser.recipe import load_recipe

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"r{i}"}) + "\n" for i in range(8)))
    base = ("name: mine\ntarget: some/target\nsources: [some/target, other/source]\n"
            f"data: {{source: {{name: file, params: {{path: {rows}}}}}, heldout: 2}}\n")
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(base + "evaluate: {tasks: [profuser_heldout_bpb, profuser_heldout]}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, registry=registry)
    [(where, message)] = err.value.problems
    assert where == "evaluate.tasks.1" and "meta.answer" in message and "profuser_heldout_bpb" in message
    recipe.write_text(base + "evaluate: {tasks: [profuser_heldout_winrate]}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, registry=registry)
    assert err.value.problems == [("evaluate.judge", ("profuser_heldout_winrate needs evaluate.judge.reward_model "
                                                      "(the reward model that compares the answers)"))]
    # with a judge: fine, and its reference is the target unless it names one
    recipe.write_text(base + "evaluate: {tasks: [profuser_heldout_bpb, profuser_heldout_winrate], "
                             "judge: {reward_model: {name: judge, params: {model: some/judge}}}}\n")
    loaded = load_recipe(recipe, registry=registry)
    assert loaded.evaluate.judge.reference.ref == "some/target" and loaded.evaluate.judge.generator.name == "hf"


def test_lm_evals_in_memory_model_warning_is_dropped_at_its_source(tmp_path, tiny_llama_dir, caplog):
    import logging

    model, tok = load(tiny_llama_dir)
    path = heldout_parquet(tmp_path / "heldout.parquet")
    with caplog.at_level(logging.WARNING):
        evaluate_model(model, tok, ["profuser_heldout_bpb"], heldout_path=path)
    assert not any("is not of type `str`" in r.getMessage() for r in caplog.records)
    # the filter is gone afterwards: lm-eval's logger says what it says to anyone else
    assert not logging.getLogger("lm_eval.models.huggingface").filters
