"""`profuser compare` end to end on the tiny models: two variants at two training seeds share every
stage before train, and the comparison carries intervals against the reference."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from profuser.cli import app
from profuser.compare import seed_overrides
from profuser.testing import tiny_recipe


def test_seed_changes_the_training_seed_only():
    assert seed_overrides(3) == ["train.seed=3"] and seed_overrides(None) == []


def test_tiny_compare_two_seeds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    judge = {"reward_model": {"name": "judge", "params": {"model": str(tmp_path / "models" / "tiny-llama")}},
             "generator": {"name": "hf", "params": {"do_sample": False, "max_new_tokens": 4}}}
    base = tiny_recipe(tmp_path, **{"evaluate.tasks": ["profuser_heldout", "profuser_heldout_bpb", "profuser_heldout_winrate"],
                                    "evaluate.baselines": True, "evaluate.judge": judge})
    csft = tmp_path / "csft.yaml"
    csft.write_text(f"extends: {base.name}\nname: csft\ncurriculum: csft\n", encoding="utf-8")
    out, runs = tmp_path / "cmp", tmp_path / "runs"
    result = CliRunner().invoke(app, ["compare", str(base), str(csft), "--seeds", "0,1", "--reference", "csft",
                                      "--out", str(out), "--runs-dir", str(runs), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "comparison.json").read_text())
    assert data["reference"] == "csft" and data["lower_is_better"] == ["profuser_heldout_bpb"]
    by_name = {v["variant"]: v for v in data["variants"]}
    tiny = next(e["variant"] for e in data["entries"] if e.get("recipe") == str(base))
    assert {tiny, "csft"} <= set(by_name)
    bpb = by_name[tiny]["tasks"]["profuser_heldout_bpb"]
    assert bpb["seeds"] == [0, 1] and bpb["n_examples"] >= 1 and bpb["std"] is not None
    lo, hi = bpb["delta"]["ci95"]
    assert lo <= bpb["delta"]["mean"] <= hi
    assert "delta" not in by_name["csft"]["tasks"]["profuser_heldout_bpb"]
    # a seed reruns train and the fused evaluation only; the win rate's reference is answered once
    second = [e for e in data["entries"] if e.get("seed") == 1]
    assert second and all(sorted(e["stages_ran"]) == ["evaluate/fused", "train"] for e in second)
    ran = [stage for e in data["entries"] for stage in e.get("stages_ran", [])]
    assert ran.count("judge/llama") == 1
    assert by_name[tiny]["tasks"]["profuser_heldout_winrate"]["seeds"] == [0, 1]
    assert "Δ Held-out bpb ↓ vs csft [95% CI]" in (out / "comparison.md").read_text()
    assert (out / "scores.png").stat().st_size > 0

    bad = CliRunner().invoke(app, ["compare", str(base), "--seeds", "0,x", "--runs-dir", str(runs)])
    assert bad.exit_code != 0 and "--seeds" in bad.output
