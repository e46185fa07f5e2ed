"""The paper's recipes (recipes/paper): they validate offline, pin the paper's settings, and their
dry run costs the paper scale without touching the hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from profuser.chat import CHAT_FORMATS, SCORING_TEMPLATES
from profuser.cli import app
from profuser.recipe import load_raw, load_recipe

PAPER = Path(__file__).resolve().parent.parent / "recipes" / "paper"
RECIPES = sorted(PAPER.glob("*.yaml"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to reach the hub fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run or validation tried to load a dataset")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_at_least_ten_recipes_validate_offline():
    assert len(RECIPES) >= 10
    result = CliRunner().invoke(app, ["validate", *map(str, RECIPES)])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok ") == len(RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_extends_the_paper_recipe_and_says_how_to_launch(path):
    text = path.read_text()
    assert text.startswith((f"# torchrun --nproc_per_node 8 -m profuser run recipes/paper/{path.name}", "# One 8-GPU node"))
    assert f"torchrun --nproc_per_node 8 -m profuser run recipes/paper/{path.name}" in text
    if path.name != "profuser-7b.yaml":
        assert load_raw(path) and "extends: profuser-7b.yaml" in text


def test_paper_settings_are_pinned(registry):
    r = load_recipe(PAPER / "profuser-7b.yaml", registry=registry)
    assert [s.chat_template for s in r.sources] == ["vicuna_v1.1", "llama2_chat", "mpt_chatml"]
    assert r.target.chat_template == "vicuna_v1.1" and all(s.chat_template in CHAT_FORMATS for s in r.sources)
    assert r.data.source.params["format"] == "orca_best" and r.data.source.params["name"] == "shahules786/orca-best"
    assert r.data.sample - r.data.heldout == 100_000  # §4.1.2: 100k training examples
    assert "<|im_end|>" in r.inference_mode.generator.params["stop"]
    eurus = next(rm for rm in r.inference_mode.reward_models if rm.key == "eurus-rm-7b")
    assert eurus.params["template"] == SCORING_TEMPLATES["eurus_rm"]
    assert (r.train.batch_size, r.train.max_length, r.train.lr) == (128, 2048, 1.5e-5)
    assert r.train.distributed == "deepspeed" and r.train.precision == "bf16"


def test_analysis_recipes(registry):
    ref = load_recipe(PAPER / "reference-score.yaml", registry=registry)
    assert ref.inference_mode.evaluator.name == "reference" and not ref.inference_mode.reward_models
    assert ref.inference_mode.evaluator.params["bertscore_model"] == "microsoft/deberta-v2-xlarge"  # the paper's footnote 4
    single = load_recipe(PAPER / "single-rm.yaml", registry=registry)
    assert [rm.key for rm in single.inference_mode.reward_models] == ["fsfairx-llama3-rm"]
    for name, other in (("one-source-llama2.yaml", "llama2-7b-chat"), ("one-source-mpt.yaml", "mpt-7b-8k-chat")):
        assert [s.key for s in load_recipe(PAPER / name, registry=registry).sources] == ["vicuna-7b", other]
    curricula = {p.stem: load_recipe(p, registry=registry).curriculum.name for p in RECIPES}
    assert {curricula[k] for k in ("csft", "fuse", "simulfuse", "reversefuse", "length-split", "rm-split")} == {
        "sft_only", "training_only", "simultaneous", "reverse", "length_split", "rm_split"}


def test_paper_dry_run_is_offline_json(tmp_path):
    result = CliRunner().invoke(app, ["run", str(PAPER / "profuser-7b.yaml"), "--dry-run", "--json",
                                      "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)  # pure JSON
    stages = {s["id"]: s for s in plan["stages"]}
    assert plan["sizes"]["examples"] == 100_000 and plan["sizes"]["from"].startswith("declared")
    for sid in ("generate/mpt-7b-8k-chat", "score/eurus-rm-7b", "logits/training/llama2-7b-chat", "train", "evaluate/fused"):
        assert stages[sid]["gpu_hours"] > 0 and stages[sid]["throughput"] > 0 and stages[sid]["gpu_memory_gb"] > 0
    assert stages["generate/vicuna-7b"]["tokens"] == 100_000 * 250
    assert stages["train"]["disk_gb"] > 13 and stages["train"]["scratch_gb"] > 100  # bf16 model, ZeRO-3 checkpoints
    assert stages["train"]["gpu_memory_gb"] < 80  # ZeRO-3 over 8 GPUs fits an A100-80GB
    assert plan["total"]["gpu_hours"] == pytest.approx(sum(s["gpu_hours"] for s in plan["stages"]), abs=0.2)
    assert set(plan["throughput_sources"]) == {"generate_vllm", "generate_hf", "forward", "train"}


def test_paper_suite_counts_shared_stages_once(tmp_path):
    result = CliRunner().invoke(app, ["compare", *map(str, RECIPES), "--dry-run", "--json", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    suite = json.loads(result.stdout)
    s = suite["suite"]
    assert len(suite["recipes"]) == len(RECIPES)
    assert s["stages"] < s["stages_if_each_ran_alone"]
    assert s["gpu_hours"] < s["gpu_hours_if_each_ran_alone"]
    # every stage key once: the data stage and the three generations are paid once for the suite
    distinct = {x["key"]: x["gpu_hours"] for p in suite["recipes"] for x in p["stages"]}
    assert s["gpu_hours"] == pytest.approx(sum(distinct.values()), abs=0.5)
    data_keys = {x["key"] for p in suite["recipes"] for x in p["stages"] if x["id"] == "data"}
    assert len(data_keys) == 1


def test_plain_dry_run_prints_a_table(tmp_path):
    result = CliRunner().invoke(app, ["run", str(PAPER / "fuse.yaml"), "--dry-run", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "plan for fuse-7b on 8 x A100-80GB" in result.output and "GPU-hours" in result.output
    assert "logits/training/vicuna-7b" in result.output and "generate/" not in result.output
