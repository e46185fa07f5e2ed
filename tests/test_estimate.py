"""profuser.estimate: sizes, throughputs and the offline rule of the dry run."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from profuser.cli import app
from profuser.estimate import PEAK_BF16_FLOPS, estimate_plan, model_size, throughputs
from profuser.pipeline import Runner, Runtime, plan, stage_keys
from profuser.plugins import get_engine
from profuser.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "recipes" / "paper" / "profuser-7b.yaml"


def runner_for(path, tmp_path, overrides=()):
    return Runner(load_recipe(path, list(overrides), registry=get_engine().registry), get_engine(), Runtime(runs_dir=tmp_path, progress=False))


def test_model_sizes():
    assert model_size("lmsys/vicuna-7b-v1.5") == (6.74e9, 32000)
    assert model_size("mosaicml/mpt-7b-8k-chat")[1] == 50432
    assert model_size("org/Some-13B-chat")[0] == 13e9
    assert model_size("HuggingFaceTB/SmolLM2-135M-Instruct")[0] == 135e6
    assert model_size("/models/my-finetune")[0] is None


def test_throughput_arithmetic_and_overrides(tmp_path):
    recipe = load_recipe(PAPER, registry=get_engine().registry)
    rates = throughputs(recipe, 7e9)
    assert rates["forward"] == pytest.approx(PEAK_BF16_FLOPS["A100-80GB"] * 0.40 / (2 * 7e9))
    assert rates["train"] == pytest.approx(PEAK_BF16_FLOPS["A100-80GB"] * 0.35 / (8 * 7e9))
    h100 = throughputs(load_recipe(PAPER, ["estimate.gpu=H100-80GB"], registry=get_engine().registry), 7e9)
    assert h100["train"] > 3 * rates["train"]
    base = {s["id"]: s for s in estimate_plan(runner_for(PAPER, tmp_path))["stages"]}
    slower = {s["id"]: s for s in estimate_plan(runner_for(PAPER, tmp_path, ["estimate.throughput.train=1000"]))["stages"]}
    assert slower["train"]["throughput"] == 1000
    assert slower["train"]["gpu_hours"] == pytest.approx(base["train"]["tokens"] / 1000 / 3600, abs=0.01)


def test_estimate_block_is_in_no_cache_key():
    engine = get_engine()
    keys = stage_keys(plan(load_recipe(PAPER, registry=get_engine().registry), engine), engine)
    other = stage_keys(plan(load_recipe(PAPER, ["estimate.response_tokens=999", "estimate.gpus=64"], registry=get_engine().registry), engine), engine)
    assert keys == other


def test_hub_data_without_declared_sizes_is_one_line_not_a_download(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("tried to download"))
    result = CliRunner().invoke(app, ["run", str(PAPER), "--dry-run", "--runs-dir", str(tmp_path),
                                      "-o", "estimate.response_tokens=null", "-o", "estimate.prompt_tokens=null"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "estimate" in result.output and "download" in result.output


def test_missing_token_length_names_the_field(tmp_path):
    result = CliRunner().invoke(app, ["run", str(PAPER), "--dry-run", "--runs-dir", str(tmp_path),
                                      "-o", "estimate.prompt_tokens=null"])
    assert result.exit_code != 0 and "estimate.prompt_tokens" in result.output and "Traceback" not in result.output


def test_local_recipe_reads_its_dataset(tmp_path):
    plan_ = estimate_plan(runner_for(ROOT / "recipes" / "profuser.yaml", tmp_path))
    assert plan_["sizes"]["examples"] == 48 and plan_["sizes"]["from"].startswith("the dataset source")
    train = next(s for s in plan_["stages"] if s["id"] == "train")
    assert train["tokens"] > 0 and train["gpus"] == 1  # distributed: none


def test_dry_run_names_a_machine_only_when_the_recipe_declares_one(tmp_path):
    default = CliRunner().invoke(app, ["run", str(ROOT / "recipes" / "profuser.yaml"), "--dry-run", "--runs-dir", str(tmp_path)])
    assert default.exit_code == 0, default.output
    header = default.output.splitlines()[0]
    assert header.strip() == "plan for profuser" and "estimate's defaults" in default.output
    paper = CliRunner().invoke(app, ["run", str(PAPER), "--dry-run", "--runs-dir", str(tmp_path)])
    assert paper.exit_code == 0, paper.output
    assert paper.output.splitlines()[0].strip() == "plan for profuser-7b on 8 x A100-80GB"
    assert estimate_plan(runner_for(PAPER, tmp_path))["hardware"]["declared"] is True


def test_the_generators_n_multiplies_generation_and_scoring(tmp_path):
    default = ROOT / "recipes" / "profuser.yaml"  # the hf generator: n samples per prompt
    one = estimate_plan(runner_for(default, tmp_path))
    four = estimate_plan(runner_for(default, tmp_path, ["inference_mode.generator.params.n=4"]))
    rows = {p: {s["id"]: s for s in plan_["stages"]} for p, plan_ in (("one", one), ("four", four))}
    for stage_id in rows["one"]:
        if stage_id.startswith(("generate/", "score/")):
            assert rows["four"][stage_id]["tokens"] == pytest.approx(4 * rows["one"][stage_id]["tokens"], rel=1e-3), stage_id
    generate = next(s for s in rows["four"] if s.startswith("generate/"))
    assert "4 samples" in rows["four"][generate]["note"]


def test_a_conversations_earlier_turns_count_as_prompt_tokens():
    from profuser.components import Record
    from profuser.estimate import _from_records

    recipe = load_recipe(ROOT / "recipes" / "profuser.yaml", registry=get_engine().registry)
    single = Record("a", "", "x" * 40, "y" * 80)
    turns = [{"role": "user", "content": "u" * 200}, {"role": "assistant", "content": "v" * 200}]
    multi = Record("b", "", "x" * 40, "y" * 80, {"history": turns})
    one, two = _from_records(recipe, [single], 0, "test"), _from_records(recipe, [multi], 0, "test")
    assert one.prompt_tokens == pytest.approx(10) and two.prompt_tokens == pytest.approx(110)  # 4 characters a token
    assert one.response_tokens == two.response_tokens == pytest.approx(20)
