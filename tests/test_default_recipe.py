"""The default recipe on the real packaged models (SmolLM2 + Gemma-3), shrunk so that CI runs
it in minutes: every stage of the method runs for real, offline, on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from profuser.cli import app

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "data.source.params.n=10", "data.heldout=4",
    "inference_mode.generator.params.max_new_tokens=24",
    "train.batch_size=4", "train.micro_batch_size=2", "train.max_length=256", "distill.max_length=256",
    "evaluate.max_gen_toks=24",
]


@pytest.mark.slow
def test_default_recipe_fuses_the_packaged_models(tmp_path):
    args = ["run", str(REPO / "recipes" / "profuser.yaml"), "--runs-dir", str(tmp_path)]
    for item in SMALL:
        args += ["-o", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "profuser" / "run.json").read_text())
    by_id = {s["id"]: s for s in summary["stages"]}
    assert {"generate/gemma3", "score/judge-correct", "logits/training/gemma3", "align/training/gemma3", "train",
            "evaluate/fused", "evaluate/gemma3"} <= set(by_id)
    # a real heterogeneous alignment: most Gemma tokens map 1:1 onto SmolLM2's
    report = json.loads((Path(by_id["align/training/gemma3"]["path"]) / "report.json").read_text())
    assert report["exact_share"] > 0.5
    for mode in ("inference", "training"):
        shares = by_id[f"select/{mode}"]["metrics"]["win_share"]
        assert set(shares) == {"smollm2", "gemma3"} and abs(sum(shares.values()) - 1) < 1e-9
    # the fused model loads with transformers and its card names the recipe
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "runs" / "profuser" / "model"
    AutoModelForCausalLM.from_pretrained(model_dir)
    assert "profuser" in (model_dir / "README.md").read_text()
    metrics = [json.loads(line) for line in (Path(by_id["train"]["path"]) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["phase"] == "inference" and metrics[-1]["phase"] == "co-fusion"  # progressive: App. A
