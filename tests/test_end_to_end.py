"""The whole pipeline on tiny heterogeneous models: every stage of both modes, training, the
held-out evaluation, resumption from the cache, and a side-by-side comparison."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from profuser.cli import app


@pytest.fixture(scope="module")
def tiny_recipe(tiny_llama_dir, tiny_gemma_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    (root / "tiny.yaml").write_text(textwrap.dedent(f"""
        name: tiny
        target: {{ref: {tiny_llama_dir}, label: llama}}
        sources:
          - {{ref: {tiny_llama_dir}, label: llama}}
          - {{ref: {tiny_gemma_dir}, label: gemma}}
        data:
          source: {{name: builtin_tasks, params: {{n: 14, seed: 0}}}}
          heldout: 4
        distill: {{top_k: 4, batch_size: 4, max_length: 384}}
        inference_mode:
          generator: {{name: hf, params: {{max_new_tokens: 12, batch_size: 4}}}}
          reward_models:
            - {{name: judge, label: judge-a, params: {{model: {tiny_llama_dir}, rubric: "Q: {{instruction}} A: {{response}} Good?"}}}}
            - {{name: judge, label: judge-b, params: {{model: {tiny_llama_dir}, rubric: "{{instruction}} -> {{response}} Correct?"}}}}
          evaluator: {{name: rm_vote, params: {{strongest: judge-b}}}}
        train: {{lr: 1.0e-3, batch_size: 4, micro_batch_size: 2, max_length: 384, checkpoint_every: 2}}
        evaluate: {{tasks: [profuser_heldout], batch_size: 4}}
    """))
    (root / "tiny-fuse.yaml").write_text("extends: tiny.yaml\nname: tiny-fuse\ncurriculum: training_only\n")
    return root


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_tiny_pipeline_runs_every_stage_then_reuses_them(tiny_recipe, tmp_path):
    runs = tmp_path / "runs"
    invoke("run", tiny_recipe / "tiny.yaml", "--runs-dir", runs)
    summary = json.loads((runs / "runs" / "tiny" / "run.json").read_text())
    ran = {s["id"] for s in summary["stages"] if not s["cached"]}
    for stage in ["data", "generate/gemma", "score/judge-a", "select/inference", "logits/inference/llama",
                  "logits/training/gemma", "select/training", "align/training/gemma", "build/training", "train",
                  "evaluate/fused", "evaluate/gemma"]:
        assert stage in ran
    model = runs / "runs" / "tiny" / "model"
    assert (model / "config.json").exists() and (model / "README.md").exists()
    assert any(model.glob("*.safetensors"))
    by_id = {s["id"]: s for s in summary["stages"]}
    win_share = by_id["select/training"]["metrics"]["win_share"]
    assert set(win_share) == {"llama", "gemma"} and abs(sum(win_share.values()) - 1) < 1e-9
    # the fused model has a real held-out score (a number, not necessarily a good one)
    scores = json.loads((Path(by_id["evaluate/fused"]["path"]) / "results.json").read_text())
    assert isinstance(scores["primary"]["profuser_heldout"], float)

    output = invoke("run", tiny_recipe / "tiny.yaml", "--runs-dir", runs)
    again = json.loads((runs / "runs" / "tiny" / "run.json").read_text())
    assert all(s["cached"] for s in again["stages"]), output

    # what a user looks at afterwards: the plan (all cached), the store, the run report
    plan = invoke("run", tiny_recipe / "tiny.yaml", "--runs-dir", runs, "--dry-run", "-o", "loss.params.temperature=1.5")
    assert "stages to run: 2 of" in plan  # train and evaluate/fused: nothing upstream of the loss
    stored = json.loads(invoke("runs", "--runs-dir", runs, "--json"))
    assert {a["stage"] for a in stored["artifacts"]} >= {"data", "train", "build/inference"}
    report = invoke("report", "tiny", "--runs-dir", runs)
    assert "train" in report and (runs / "runs" / "tiny" / "report" / "report.md").exists()


def test_align_command_reports_shares_and_speed(tiny_llama_dir, tiny_gemma_dir):
    out = json.loads(invoke("align", "--source", tiny_gemma_dir, "--target", tiny_llama_dir, "--limit", 20, "--json"))
    assert out["texts"] == 20 and out["tokens_per_second"] > 0
    shares = sum(out[f"{k}_share"] for k in ("exact", "one_to_many", "many_to_one", "soft", "fallback"))
    assert abs(shares - 1) < 1e-9 and out["exact_share"] > 0.5


def test_compare_runs_shared_stages_once(tiny_recipe, tmp_path):
    out = tmp_path / "cmp"
    invoke("compare", tiny_recipe / "tiny.yaml", tiny_recipe / "tiny-fuse.yaml", "--runs-dir", tmp_path / "runs", "--out", out)
    comparison = json.loads((out / "comparison.json").read_text())
    variants = {e["variant"]: e for e in comparison["entries"] if not e.get("baseline")}
    assert set(variants) == {"tiny", "tiny-fuse"}
    fuse = variants["tiny-fuse"]
    # the training-only ablation reuses data, logits, selection, alignment and build of the first recipe
    assert {"data", "logits/training/gemma", "select/training", "build/training"} <= set(fuse["stages_reused"])
    assert "train" in fuse["stages_ran"]
    assert (out / "comparison.md").read_text().count("|") > 10


@pytest.mark.slow
def test_a_two_process_launch_splits_preparation_and_training(tiny_recipe, tmp_path):
    """``torchrun --nproc_per_node 2 -m profuser run``: both ranks teacher-force and train, the store
    holds one artifact per stage, and a one-process run afterwards reuses all of it."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    runs = tmp_path / "runs"
    env = {**os.environ, "PROFUSER_DISABLE_ENTRYPOINTS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "profuser", "run", str(tiny_recipe / "tiny.yaml"),
                           "--runs-dir", str(runs)], env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((runs / "runs" / "tiny" / "run.json").read_text())
    by_id = {s["id"]: s for s in summary["stages"]}
    assert by_id["train"]["metrics"]["world_size"] == 2 and by_id["train"]["metrics"]["backend"] == "ddp"
    logits = Path(by_id["logits/training/gemma"]["path"])
    assert {p.name.split("-")[-1] for p in logits.glob("shard-*.arrow")} == {"r0.arrow", "r1.arrow"}
    assert by_id["logits/training/gemma"]["metrics"]["examples"] == 10
    assert not list((runs / "store").glob("*/*.partial"))
    output = invoke("run", tiny_recipe / "tiny.yaml", "--runs-dir", runs)
    again = json.loads((runs / "runs" / "tiny" / "run.json").read_text())
    assert all(s["cached"] for s in again["stages"]), output
