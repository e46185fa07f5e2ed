"""Experiment tracking (``train.report_to``, accelerate's trackers): TensorBoard holds exactly the
scalars of metrics.jsonl, also across a resume; a missing tracker package is one line naming the
field and the package, at validate time; wandb offline when it is installed; no key holds it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_trainer import read_metrics, small_spec

from profuser.errors import ProfuserError, RecipeError
from profuser.plugins import Engine
from profuser.recipe import load_recipe
from profuser.testing import tiny_recipe
from profuser.training import train


class Killed(Exception):
    pass


def run(model_dir, examples, registry, out, spec=None, **kw):
    return train(str(model_dir), examples, registry.build("losses", "fuse_kl"), registry.build("curricula", "progressive"),
                 spec or small_spec(), out, device="cpu", **kw)


def tb_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard reads the event files (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    for tag, events in scalars.items():  # a step logged twice (not purged on resume) would hide in the dict
        assert len({e.step for e in events}) == len(events), tag
    return {tag: {e.step: e.value for e in events} for tag, events in scalars.items()}


def jsonl_scalars(out: Path) -> dict[str, dict[int, float]]:
    scalars: dict[str, dict[int, float]] = {}
    for row in read_metrics(out):
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                scalars.setdefault(f"train/{key}", {})[row["step"]] = float(value)
    return scalars


def assert_same(tb: dict, jsonl: dict) -> None:
    assert set(tb) == set(jsonl) and "train/loss" in tb and "train/lr" in tb
    for tag, values in jsonl.items():
        assert tb[tag].keys() == values.keys(), tag
        assert list(tb[tag].values()) == pytest.approx(list(values.values()), rel=1e-6, abs=1e-6), tag  # float32 in events


def test_tensorboard_holds_the_scalars_of_metrics_jsonl(tmp_path, tiny_llama_dir, examples, registry):
    run(tiny_llama_dir, examples, registry, tmp_path)
    assert_same(tb_scalars(tmp_path / "tb"), jsonl_scalars(tmp_path))
    assert not [p for p in (tmp_path / "tb").iterdir() if p.is_dir()]  # tb/ itself, no run or hparams folder


def test_a_resumed_training_logs_each_step_once(tmp_path, tiny_llama_dir, examples, registry):
    def kill(step, metrics):
        if step == 5:
            raise Killed

    spec = small_spec(checkpoint_every=3)
    with pytest.raises(Killed):
        run(tiny_llama_dir, examples, registry, tmp_path, spec, callbacks=[kill])
    summary = run(tiny_llama_dir, examples, registry, tmp_path, spec)  # from step 3: TensorBoard purges 4 and 5
    jsonl = jsonl_scalars(tmp_path)
    assert summary["resumed_from"] == 3 and sorted(jsonl["train/loss"]) == list(range(1, summary["steps"] + 1))
    assert_same(tb_scalars(tmp_path / "tb"), jsonl)


def test_report_to_nothing_writes_metrics_jsonl_only(tmp_path, tiny_llama_dir, examples, registry):
    run(tiny_llama_dir, examples, registry, tmp_path, small_spec(report_to=[]))
    assert len(read_metrics(tmp_path)) == 6 and not (tmp_path / "tb").exists()  # progressive: 2 + 4 steps (co-fusion per instruction)


def hide(monkeypatch, *packages: str) -> None:
    """Make ``packages`` look uninstalled, whatever this environment holds."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name in packages else real(name, *a, **k))


def test_a_missing_tracker_is_one_line_at_validate_time(tmp_path, monkeypatch, registry):
    hide(monkeypatch, "wandb")
    path = tiny_recipe(tmp_path, **{"train.report_to": ["tensorboard", "wandb"]})
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry=registry)
    assert info.value.lines() == [(f"{path}: train.report_to.1: wandb is not installed: pip install wandb "
                                  "(or remove it from train.report_to)")]
    with pytest.raises(RecipeError, match="train.report_to.0: Input should be 'tensorboard'"):
        load_recipe(tiny_recipe(tmp_path, **{"train.report_to": ["tensorbord"]}), registry=registry)
    with pytest.raises(RecipeError, match="trackers listed twice: tensorboard"):
        load_recipe(tiny_recipe(tmp_path, **{"train.report_to": ["tensorboard", "tensorboard"]}), registry=registry)


def test_a_missing_tracker_stops_training_before_the_model_loads(tmp_path, examples, registry, monkeypatch):
    hide(monkeypatch, "mlflow")
    with pytest.raises(ProfuserError) as info:  # never reaches the (missing) model
        run(tmp_path / "no-model", examples, registry, tmp_path / "out", small_spec(report_to=["mlflow"]))
    assert info.value.lines() == [("train.report_to.0: mlflow is not installed: pip install mlflow "
                                  "(or remove it from train.report_to)")]


def test_the_default_tensorboard_is_skipped_when_not_installed(tmp_path, tiny_llama_dir, examples, registry, monkeypatch):
    hide(monkeypatch, "tensorboard")
    run(tiny_llama_dir, examples, registry, tmp_path)
    assert len(read_metrics(tmp_path)) == 6 and not (tmp_path / "tb").exists()  # progressive: 2 + 4 steps (co-fusion per instruction)


def test_tracking_and_push_are_in_no_cache_key_nor_the_card(tmp_path):
    from profuser.pipeline import plan, stage_keys

    engine = Engine(entrypoints=False)
    plain = load_recipe(tiny_recipe(tmp_path), registry=engine.registry)
    tracked = load_recipe(tiny_recipe(tmp_path, **{"train.report_to": [], "train.push_to_hub": {"repo": "me/fused"}}),
                          registry=engine.registry)
    assert tracked.train.report_to == [] and tracked.train.push_to_hub.repo == "me/fused"
    assert stage_keys(plan(plain, engine), engine) == stage_keys(plan(tracked, engine), engine)
    card = next(s for s in plan(tracked, engine) if s.id == "train").config.card_recipe
    assert "report_to" not in card and "push_to_hub" not in card


def test_wandb_offline_gets_the_same_scalars(tmp_path, tiny_llama_dir, examples, registry, monkeypatch):
    pytest.importorskip("wandb")  # not a dependency: checked where it is installed
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tiny_llama_dir, examples, registry, tmp_path / "out", small_spec(report_to=["tensorboard", "wandb"]), run_name="unit")
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    summary = json.loads((runs[0] / "files" / "wandb-summary.json").read_text())
    last = read_metrics(tmp_path / "out")[-1]
    assert summary["train/loss"] == pytest.approx(last["loss"]) and summary["_step"] == last["step"]
