"""LoRA through peft (``train.peft``) on the tiny Llama: only the adapter trains and gets optimizer
state, the loss falls, the adapter is saved (and, with ``merge``, the merged model beside it),
``load_model`` turns either folder into a plain model equal to base + adapter, a killed run resumes
exactly, and an unset ``peft`` leaves every dump (so every cache key) as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_trainer import Killed, read_metrics

from profuser.errors import ProfuserError
from profuser.models import load_model
from profuser.models.loading import local_model_problem
from profuser.recipe import ModelSpec, TrainSpec
from profuser.training import train
from profuser.training.data import ExampleSet

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def spec(**kw) -> TrainSpec:
    return TrainSpec(**{"lr": 2e-2, "batch_size": 4, "micro_batch_size": 2, "warmup_ratio": 0.1, "checkpoint_every": 3,
                        "report_to": [], "peft": LORA, **kw})


def batch_of(examples):
    data = ExampleSet.load(examples, max_length=64)
    return data.collate(np.arange(len(data)), np.ones(len(data)), pad_id=0)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [b, T, V]


def run(registry, model_dir, examples, out, train_spec, **kw):
    return train(str(model_dir), examples, registry.build("losses", "fuse_kl"), registry.build("curricula", "progressive"),
                 train_spec, out, device="cpu", **kw)


def test_lora_trains_only_the_adapter_and_saves_it_as_a_loadable_folder(tmp_path, tiny_llama_dir, examples, registry):
    # SFT for 8 epochs: a rank-4 update of two projections moves a random tiny model slowly
    training = {"training": examples["training"]}
    train(str(tiny_llama_dir), training, registry.build("losses", "sft"), registry.build("curricula", "sft_only", {"epochs": 8}),
          spec(), tmp_path, device="cpu", keep_checkpoints=True)
    model_dir = tmp_path / "model"
    assert {"adapter_model.safetensors", "adapter_config.json", "base_model.json", "tokenizer.json", "README.md"} <= {
        p.name for p in model_dir.iterdir()}
    assert not (model_dir / "model.safetensors").exists()  # the adapter only: the base stays where it is
    adapter = load_file(model_dir / "adapter_model.safetensors")
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert {k.split(".")[-3] for k in adapter} == {"q_proj", "v_proj"}  # target_modules
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert json.loads((model_dir / "base_model.json").read_text())["ref"] == str(tiny_llama_dir)

    # the checkpoint and the optimizer state hold the adapter's tensors only
    ckpt = next((tmp_path / "checkpoints").glob("step-*"))
    assert set(load_file(ckpt / "model.safetensors")) == {k.removesuffix(".weight") + ".default.weight"
                                                        for k in adapter}
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(state["state"]) == len(adapter) == sum(len(g["params"]) for g in state["param_groups"])

    # the folder loads as a plain model (what the evaluate stage does), and it learned
    assert local_model_problem(ModelSpec(ref=str(model_dir))) is None
    fused, tokenizer = load_model(ModelSpec(ref=str(model_dir)))
    base, _ = load_model(ModelSpec(ref=str(tiny_llama_dir)))
    assert type(fused) is type(base) and tokenizer.chat_template
    batch = batch_of(training)
    loss = registry.build("losses", "sft")
    before, after = (loss(logits(m, batch), batch, beta=0.5)[0].item() for m in (base, fused))
    assert after < before - 0.05, (before, after)  # measured: 6.25 -> 6.14
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 16 and metrics[-1]["loss"] < metrics[0]["loss"] - 0.05
    # the base weights did not move: every weight LoRA does not adapt equals the base's
    fused_state, base_state = fused.state_dict(), base.state_dict()
    untouched = [k for k in base_state if not k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert untouched and all(torch.equal(fused_state[k], base_state[k]) for k in untouched)
    assert not all(torch.equal(fused_state[k], base_state[k]) for k in base_state)  # the adapted ones did


def test_merge_saves_the_merged_model_equal_to_base_plus_adapter(tmp_path, tiny_llama_dir, examples, registry):
    from peft import PeftModel

    run(registry, tiny_llama_dir, examples, tmp_path, spec(peft={**LORA, "merge": True}))
    model_dir = tmp_path / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
    # the adapter beside full weights would be applied twice by from_pretrained: it has its own folder
    assert not (model_dir / "adapter_config.json").exists()
    assert (model_dir / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_model(ModelSpec(ref=str(model_dir)))[0]
    base = load_model(ModelSpec(ref=str(tiny_llama_dir)))[0]
    batch = batch_of(examples)
    plain_base = logits(base, batch)
    unmerged = PeftModel.from_pretrained(base, str(model_dir / "adapter")).eval()  # wraps base in place
    expected = logits(unmerged, batch)
    assert not torch.allclose(expected, plain_base, atol=1e-3)  # the adapter changes the outputs
    assert torch.allclose(logits(merged, batch), expected, atol=1e-4)
    # transformers' own loader reads the folder as the plain merged model too
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert torch.allclose(logits(plain, batch), expected, atol=1e-4)


def test_lora_resumes_exactly_after_a_kill(tmp_path, tiny_llama_dir, examples, registry):
    def go(out, kill_at=None):
        def kill(step, metrics):
            if step == kill_at:
                raise Killed
        return run(registry, tiny_llama_dir, examples, out, spec(), callbacks=[kill])

    go(tmp_path / "straight")
    with pytest.raises(Killed):
        go(tmp_path / "killed", kill_at=5)  # checkpoints at 2 (phase end) and 3
    summary = go(tmp_path / "killed")
    assert summary["resumed_from"] == 3
    straight, killed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")
    assert [m["step"] for m in killed] == [m["step"] for m in straight]
    for a, b in zip(straight, killed):
        assert (a["phase"], a["lr"]) == (b["phase"], b["lr"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "straight" / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_target_modules_that_match_nothing_are_one_line(tmp_path, tiny_llama_dir, examples, registry):
    with pytest.raises(ProfuserError, match="cannot add LoRA") as info:
        run(registry, tiny_llama_dir, examples, tmp_path, spec(peft={"target_modules": ["no_such_proj"]}))
    assert info.value.where == "train.peft.target_modules" and "\n" not in info.value.message


def test_a_missing_peft_package_is_one_line_before_anything_loads(tmp_path, tiny_llama_dir, examples, registry, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(ProfuserError, match=r"profuser\[peft\]") as info:
        run(registry, tiny_llama_dir, examples, tmp_path, spec())
    assert info.value.where == "train.peft" and not (tmp_path / "model").exists()


def test_unset_peft_and_attention_leave_dumps_and_keys_as_they_were():
    # the train stage's key hashes TrainSpec's dump and every ModelSpec identity
    assert "peft" not in TrainSpec().model_dump()
    assert "attn_implementation" not in ModelSpec(ref="x").identity()
    assert TrainSpec(peft={}).model_dump()["peft"] == {"method": "lora", "r": 8, "alpha": 16.0, "dropout": 0.0,
                                                       "target_modules": "all-linear", "merge": False}
    assert ModelSpec(ref="x", attn_implementation="sdpa").identity()["attn_implementation"] == "sdpa"
    assert TrainSpec(**TrainSpec(peft=LORA).model_dump()) == TrainSpec(peft=LORA)  # round trip (stage configs)


def test_recipes_take_peft_and_attention_and_refuse_an_unmerged_adapter_for_vllm(tmp_path, registry):
    from profuser.errors import RecipeError
    from profuser.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntarget: {ref: some/target, attn_implementation: sdpa}\nsources: [{ref: other/source}]\n"
                    "data: {source: {name: builtin_tasks, params: {n: 10}}, heldout: 2}\n"
                    "train: {peft: {r: 4, target_modules: [q_proj]}}\nevaluate: {tasks: [gsm8k]}\n")
    recipe = load_recipe(path, registry=registry)
    assert recipe.train.peft.r == 4 and recipe.train.peft.target_modules == ["q_proj"]
    assert recipe.target.attn_implementation == "sdpa"
    with pytest.raises(RecipeError, match="train.peft.merge: evaluate.backend vllm"):
        load_recipe(path, ["evaluate.backend=vllm"], registry=registry)
    assert load_recipe(path, ["evaluate.backend=vllm", "train.peft.merge=true"], registry=registry).train.peft.merge
    with pytest.raises(RecipeError, match="train.peft.method"):
        load_recipe(path, ["train.peft.method=qlora"], registry=registry)


def test_a_whole_tiny_run_with_lora_evaluates_the_adapter(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from profuser.cli import app
    from profuser.testing import tiny_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    recipe = tiny_recipe(tmp_path, **{"train.peft": {"r": 4, "target_modules": "all-linear"}, "train.report_to": [],
                                      "evaluate.tasks": ["profuser_heldout_bpb"], "evaluate.baselines": False})
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(recipe), "--runs-dir", str(runs), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    [model_dir] = [p.parent for p in runs.rglob("adapter_config.json")]
    assert (model_dir / "base_model.json").is_file() and not (model_dir / "model.safetensors").exists()
    [results] = list(runs.rglob("results.json"))  # evaluate/fused loaded base + adapter
    scores = json.loads(results.read_text())
    assert scores["label"] == "fused" and scores["primary"]["profuser_heldout_bpb"] > 0
